// SPDX-License-Identifier: Apache-2.0
// Bucket packing for delta plans: tensors (in the caller's order) packed into buckets of at
// most bucket_bytes at aligned offsets; a tensor larger than a bucket is split.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace hw {

struct PackResult {
  // One row per piece (a whole tensor, or a slice of a split one).
  std::vector<int64_t> tensor;         // index into the input arrays
  std::vector<int64_t> tensor_offset;  // byte offset of the piece inside the tensor
  std::vector<int64_t> length;         // bytes
  std::vector<int64_t> bucket;         // bucket index
  std::vector<int64_t> slot_offset;    // byte offset inside the bucket (aligned)
  // One row per bucket.
  std::vector<int64_t> bucket_used;    // bytes from 0 to the end of the last piece
  std::vector<int64_t> bucket_group;   // group of every piece in the bucket
};

// Note [Bucket packing]
// Next-fit in input order: deterministic for the same inputs and order-preserving (plans
// list layers bottom to top, so a consumer can act on early layers first). A piece starts
// at the next multiple of `align` after the previous one. A tensor that does not fit the
// room left starts a new bucket; a tensor larger than a bucket fills the room left (when
// at least one alignment unit remains), then whole buckets, then a tail. Tensors of
// different groups (the set of consumers that need them) never share a bucket, so each
// bucket has one set of expected consumers. Zero-byte tensors get no piece.
PackResult pack_buckets(const int64_t* nbytes, const int64_t* group, size_t n,
                        int64_t bucket_bytes, int64_t align);

}  // namespace hw
