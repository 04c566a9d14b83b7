// SPDX-License-Identifier: Apache-2.0
// CPU kernels of the hw64 checksum (see Note [hw64 checksum] in checksum.h).
#include "core/checksum.h"

#include <cstring>

namespace hw {

namespace {

// Four independent accumulators keep several multiplies in flight; the compiler may
// vectorize the loop further (target_clones builds an AVX2 variant next to the default).
__attribute__((target_clones("avx2", "default")))
uint64_t partial_words(const unsigned char* p, size_t nwords, uint64_t base) {
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  size_t i = 0;
  for (; i + 4 <= nwords; i += 4) {
    uint64_t w0, w1, w2, w3;
    std::memcpy(&w0, p + 8 * i, 8);
    std::memcpy(&w1, p + 8 * i + 8, 8);
    std::memcpy(&w2, p + 8 * i + 16, 8);
    std::memcpy(&w3, p + 8 * i + 24, 8);
    a0 += hw_mix_word(w0, base + i);
    a1 += hw_mix_word(w1, base + i + 1);
    a2 += hw_mix_word(w2, base + i + 2);
    a3 += hw_mix_word(w3, base + i + 3);
  }
  for (; i < nwords; ++i) {
    uint64_t w;
    std::memcpy(&w, p + 8 * i, 8);
    a0 += hw_mix_word(w, base + i);
  }
  return a0 + a1 + a2 + a3;
}

__attribute__((target_clones("avx2", "default")))
uint64_t copy_partial_words(unsigned char* d, const unsigned char* s, size_t nwords,
                            uint64_t base) {
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  size_t i = 0;
  for (; i + 4 <= nwords; i += 4) {
    uint64_t w0, w1, w2, w3;
    std::memcpy(&w0, s + 8 * i, 8);
    std::memcpy(&w1, s + 8 * i + 8, 8);
    std::memcpy(&w2, s + 8 * i + 16, 8);
    std::memcpy(&w3, s + 8 * i + 24, 8);
    std::memcpy(d + 8 * i, &w0, 8);
    std::memcpy(d + 8 * i + 8, &w1, 8);
    std::memcpy(d + 8 * i + 16, &w2, 8);
    std::memcpy(d + 8 * i + 24, &w3, 8);
    a0 += hw_mix_word(w0, base + i);
    a1 += hw_mix_word(w1, base + i + 1);
    a2 += hw_mix_word(w2, base + i + 2);
    a3 += hw_mix_word(w3, base + i + 3);
  }
  for (; i < nwords; ++i) {
    uint64_t w;
    std::memcpy(&w, s + 8 * i, 8);
    std::memcpy(d + 8 * i, &w, 8);
    a0 += hw_mix_word(w, base + i);
  }
  return a0 + a1 + a2 + a3;
}

uint64_t tail_word(const unsigned char* p, size_t n) {
  uint64_t w = 0;
  std::memcpy(&w, p, n);  // little-endian host: the missing high bytes stay zero
  return w;
}

}  // namespace

uint64_t hw_partial(const void* p, size_t n, uint64_t word_base) {
  const auto* b = static_cast<const unsigned char*>(p);
  const size_t nwords = n / 8;
  uint64_t acc = partial_words(b, nwords, word_base);
  if (n % 8) acc += hw_mix_word(tail_word(b + 8 * nwords, n % 8), word_base + nwords);
  return acc;
}

uint64_t hw_copy_partial(void* dst, const void* src, size_t n, uint64_t word_base) {
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  const size_t nwords = n / 8;
  uint64_t acc = copy_partial_words(d, s, nwords, word_base);
  const size_t rem = n % 8;
  if (rem) {
    std::memcpy(d + 8 * nwords, s + 8 * nwords, rem);
    acc += hw_mix_word(tail_word(s + 8 * nwords, rem), word_base + nwords);
  }
  return acc;
}

}  // namespace hw
