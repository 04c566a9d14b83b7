// SPDX-License-Identifier: Apache-2.0
// See Note [Bucket packing] in pack.h.
#include "core/pack.h"

#include <algorithm>

#include "core/common.h"

namespace hw {

PackResult pack_buckets(const int64_t* nbytes, const int64_t* group, size_t n,
                        int64_t bucket_bytes, int64_t align) {
  HW_CHECK_ARG(align > 0 && (align & (align - 1)) == 0, "pack_buckets: align=", align,
               ", expected a power of two");
  HW_CHECK_ARG(bucket_bytes >= align && bucket_bytes % align == 0, "pack_buckets: bucket_bytes=",
               bucket_bytes, ", expected a positive multiple of align=", align);
  PackResult r;
  r.tensor.reserve(n);
  r.tensor_offset.reserve(n);
  r.length.reserve(n);
  r.bucket.reserve(n);
  r.slot_offset.reserve(n);
  int64_t cur = -1;  // current bucket
  int64_t pos = 0;   // aligned position of the next piece in the current bucket
  auto open_bucket = [&](int64_t g) {
    r.bucket_used.push_back(0);
    r.bucket_group.push_back(g);
    cur = static_cast<int64_t>(r.bucket_used.size()) - 1;
    pos = 0;
  };
  auto place = [&](size_t t, int64_t toff, int64_t len) {
    r.tensor.push_back(static_cast<int64_t>(t));
    r.tensor_offset.push_back(toff);
    r.length.push_back(len);
    r.bucket.push_back(cur);
    r.slot_offset.push_back(pos);
    r.bucket_used[cur] = pos + len;
    pos = (pos + len + align - 1) / align * align;
  };
  for (size_t t = 0; t < n; ++t) {
    const int64_t size = nbytes[t];
    HW_CHECK_ARG(size >= 0, "pack_buckets: nbytes[", t, "]=", size, ", expected >= 0");
    if (size == 0) continue;
    const int64_t g = group ? group[t] : 0;
    if (cur < 0 || r.bucket_group[cur] != g || pos >= bucket_bytes) open_bucket(g);
    const int64_t room = bucket_bytes - pos;
    if (size <= room) {
      place(t, 0, size);
      continue;
    }
    if (size <= bucket_bytes) {  // fits a fresh bucket whole
      open_bucket(g);
      place(t, 0, size);
      continue;
    }
    // Larger than a bucket: split, filling what is left of the current bucket first.
    int64_t off = 0;
    if (room >= align && room < bucket_bytes) {
      place(t, 0, room);
      off = room;
    } else if (pos > 0) {
      open_bucket(g);
    }
    while (off < size) {
      if (pos > 0) open_bucket(g);  // every further piece starts an empty bucket
      const int64_t len = std::min(bucket_bytes, size - off);
      place(t, off, len);
      off += len;
    }
  }
  return r;
}

}  // namespace hw
