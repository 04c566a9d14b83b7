// SPDX-License-Identifier: Apache-2.0
#include "core/copy_engine.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <string>

#include "core/checksum.h"
#include "core/common.h"

namespace hw {

void check_no_overlap(const std::vector<CopyItem>& items) {
  struct Span {
    uintptr_t lo, hi;
    size_t item;
    bool is_dst;
  };
  std::vector<Span> spans;
  spans.reserve(items.size() * 2);
  for (size_t i = 0; i < items.size(); ++i) {
    const auto& it = items[i];
    if (it.nbytes == 0) continue;
    HW_CHECK_ARG(it.dst != nullptr && it.src != nullptr, "copy batch: item ", i,
                 " has a null pointer with nbytes=", it.nbytes);
    auto d = reinterpret_cast<uintptr_t>(it.dst), s = reinterpret_cast<uintptr_t>(it.src);
    spans.push_back({d, d + it.nbytes, i, true});
    spans.push_back({s, s + it.nbytes, i, false});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.lo < b.lo || (a.lo == b.lo && a.hi < b.hi);
  });
  // Sweep in start order keeping the destination span and the span of either kind that
  // reach furthest. If A starts first and overlaps B: when A is a destination the furthest
  // destination covers B's start; when B is one, the furthest span does. Either way an
  // overlapping pair is reported (an item whose source and destination overlap included).
  const Span* far_dst = nullptr;
  const Span* far_any = nullptr;
  auto describe = [&](const Span& s) {
    return str(s.is_dst ? "destination" : "source", " of item ", s.item, " [0x", Hex{s.lo},
               ", 0x", Hex{s.hi}, ")");
  };
  for (const auto& s : spans) {
    const Span* other = nullptr;
    if (far_dst && far_dst->hi > s.lo) other = far_dst;
    if (!other && s.is_dst && far_any && far_any->hi > s.lo) other = far_any;
    if (other) {
      // A destination that equals its own source is an overlap as well (in-place copy).
      throw std::invalid_argument(str("copy batch: ", describe(s), " overlaps ",
                                      describe(*other)));
    }
    if (s.is_dst && (!far_dst || s.hi > far_dst->hi)) far_dst = &s;
    if (!far_any || s.hi > far_any->hi) far_any = &s;
  }
}

namespace {

struct Segment {
  uint32_t item;
  size_t offset;
  size_t len;
};

struct Batch {
  std::vector<CopyItem> items;
  std::vector<Segment> segments;
  std::vector<size_t> piece_begin;  // piece p = segments[piece_begin[p], piece_begin[p+1])
  std::atomic<size_t> next{0};
  std::shared_ptr<Completion> completion;
};

void run_piece(Batch& b, size_t p) {
  for (size_t s = b.piece_begin[p]; s < b.piece_begin[p + 1]; ++s) {
    const Segment& seg = b.segments[s];
    const CopyItem& it = b.items[seg.item];
    auto* d = static_cast<unsigned char*>(it.dst) + seg.offset;
    const auto* src = static_cast<const unsigned char*>(it.src) + seg.offset;
    if (it.hash_idx >= 0) {
      b.completion->add_hash(static_cast<size_t>(it.hash_idx),
                             hw_copy_partial(d, src, seg.len, it.hash_word_base + seg.offset / 8));
    } else {
      std::memcpy(d, src, seg.len);
    }
  }
}

}  // namespace

CpuCopyEngine::CpuCopyEngine(int threads, size_t chunk_bytes)
    : pool_(threads), chunk_bytes_(chunk_bytes) {
  HW_CHECK_ARG(chunk_bytes >= 4096 && chunk_bytes % 256 == 0, "CpuCopyEngine: chunk_bytes=",
               chunk_bytes, ", expected a multiple of 256 of at least 4096");
}

std::shared_ptr<Completion> CpuCopyEngine::submit(std::vector<CopyItem> items,
                                                  size_t num_hashes) {
  check_no_overlap(items);
  auto batch = std::make_shared<Batch>();
  for (size_t i = 0; i < items.size(); ++i) {
    HW_CHECK_ARG(items[i].hash_idx < static_cast<int64_t>(num_hashes), "copy batch: item ", i,
                 " hash_idx=", items[i].hash_idx, ", expected < num_hashes=", num_hashes);
  }
  batch->items = std::move(items);
  // Cut into pieces (Note [Copy chunking]).
  size_t room = chunk_bytes_;
  batch->piece_begin.push_back(0);
  for (size_t i = 0; i < batch->items.size(); ++i) {
    size_t off = 0, n = batch->items[i].nbytes;
    while (off < n) {
      size_t len = std::min(n - off, room);
      if (len < n - off) len -= len % 8;  // interior cuts on word boundaries
      if (len == 0) {                      // piece too full for a word: close it
        batch->piece_begin.push_back(batch->segments.size());
        room = chunk_bytes_;
        continue;
      }
      batch->segments.push_back({static_cast<uint32_t>(i), off, len});
      off += len;
      room -= len;
      if (room < 8) {
        batch->piece_begin.push_back(batch->segments.size());
        room = chunk_bytes_;
      }
    }
  }
  if (batch->piece_begin.back() != batch->segments.size())
    batch->piece_begin.push_back(batch->segments.size());
  const size_t pieces = batch->piece_begin.size() - 1;
  const int tasks = static_cast<int>(std::min<size_t>(pool_.size(), pieces));
  // The batch is done when its *pieces* are: a task that the scheduler starts late (a busy
  // host: more runnable threads than cores) finds nothing left and is not waited for.
  batch->completion = std::make_shared<Completion>(static_cast<int>(pieces), num_hashes);
  auto completion = batch->completion;
  for (int t = 0; t < tasks; ++t) {
    pool_.submit([batch, pieces] {
      for (size_t p; (p = batch->next.fetch_add(1)) < pieces;) {
        std::string err;
        try {
          run_piece(*batch, p);
        } catch (const std::exception& e) {
          err = e.what();
        }
        batch->completion->task_done(err);
      }
    });
  }
  return completion;
}

}  // namespace hw
