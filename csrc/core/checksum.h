// SPDX-License-Identifier: Apache-2.0
// hw64: the one checksum of hotweights. Position-keyed sum of bijectively mixed 64-bit
// words, so it is exactly parallel (any split, any order) and bit-identical on CPU and GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace hw {

// Note [hw64 checksum]
// The data is read as little-endian 64-bit words w_i (the last partial word zero-extended).
// Each word is mixed with its index:  x = w_i ^ (i * K0); x *= K1; x ^= x >> 32;
// x *= K2; x ^= x >> 29, and the results are added mod 2^64. Every step of the mix is a
// bijection of x, so flipping any single bit changes exactly one term and therefore the
// sum: a single flipped bit is always detected, and the index key makes two swapped words
// visible (unless both are also XORed with their keys' difference: a collision is easy to
// build on purpose, so hw64 detects corruption, not tampering; the publisher and the
// coordinator token are what is trusted). Addition mod 2^64 is associative and commutative, so threads, CUDA blocks and
// atomics may combine partial sums in any order and still agree bit for bit.
// The digest is fmix64(sum ^ nbytes * K3 ^ SEED), which folds in the length.
// Partial sums over a sub-range starting at byte offset `off` (off % 8 == 0) use
// word_base = off / 8; this is how buckets and chunks are hashed in pieces.
constexpr uint64_t kHwK0 = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kHwK1 = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t kHwK2 = 0x94D049BB133111EBull;
constexpr uint64_t kHwK3 = 0xD6E8FEB86659FD93ull;
constexpr uint64_t kHwSeed = 0x68777765696768ull;  // "hweight"

#if defined(__CUDACC__)
#define HW_HD __host__ __device__ __forceinline__
#else
#define HW_HD inline
#endif

HW_HD uint64_t hw_mix_word(uint64_t w, uint64_t index) {
  uint64_t x = w ^ (index * kHwK0);
  x *= kHwK1;
  x ^= x >> 32;
  x *= kHwK2;
  x ^= x >> 29;
  return x;
}

HW_HD uint64_t hw_fmix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xFF51AFD7ED558CCDull;
  h ^= h >> 33;
  h *= 0xC4CEB9FE1A85EC53ull;
  h ^= h >> 33;
  return h;
}

HW_HD uint64_t hw_finalize(uint64_t sum, uint64_t nbytes) {
  return hw_fmix64(sum ^ (nbytes * kHwK3) ^ kHwSeed);
}

/// Partial sum of the words of [p, p + n) whose first word has index word_base.
uint64_t hw_partial(const void* p, size_t n, uint64_t word_base);

/// Copies n bytes from src to dst and returns the partial sum of the copied words
/// (same value as hw_partial(src, n, word_base)); one pass over memory.
uint64_t hw_copy_partial(void* dst, const void* src, size_t n, uint64_t word_base);

/// Digest of a whole buffer, single-threaded.
inline uint64_t hw_digest(const void* p, size_t n) { return hw_finalize(hw_partial(p, n, 0), n); }

}  // namespace hw
