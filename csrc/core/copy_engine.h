// SPDX-License-Identifier: Apache-2.0
// Chunked multi-threaded copy engine for host memory: batches of (dst, src, nbytes) split
// into chunks spread over a worker pool, optionally hashing what it copies (hw64).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/thread_pool.h"

namespace hw {

/// One copy of a batch. hash_idx >= 0 adds the hw64 partial sum of the copied bytes,
/// keyed from word hash_word_base, to accumulator hash_idx of the batch's Completion.
struct CopyItem {
  void* dst;
  const void* src;
  size_t nbytes;
  int64_t hash_idx;
  uint64_t hash_word_base;
};

/// Throws std::invalid_argument when a destination overlaps another destination or any
/// source (sources may overlap each other). Zero-size items are ignored.
void check_no_overlap(const std::vector<CopyItem>& items);

// Note [Copy chunking]
// A batch is cut into pieces of at most chunk_bytes: large items are split, small items are
// grouped, so 10,000 tiny tensors cost ~total/chunk tasks rather than 10,000. Cuts inside
// an item fall on multiples of 8 bytes so that hashing a piece keys its words correctly.
// Pieces are claimed dynamically by the workers (an atomic counter), which balances
// uneven items. The caller keeps the memory alive until the Completion is done.
class CpuCopyEngine {
 public:
  CpuCopyEngine(int threads, size_t chunk_bytes);
  /// Starts the batch and returns at once; wait on the Completion.
  std::shared_ptr<Completion> submit(std::vector<CopyItem> items, size_t num_hashes);
  int threads() const { return pool_.size(); }
  size_t chunk_bytes() const { return chunk_bytes_; }

 private:
  ThreadPool pool_;
  size_t chunk_bytes_;
};

}  // namespace hw
