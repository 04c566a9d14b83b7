// SPDX-License-Identifier: Apache-2.0
// CPU kernels of the hw64 checksum (see Note [hw64 checksum] in checksum.h).
#include "core/checksum.h"

#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#define HW_HAVE_AVX2_PATH 1
#endif

namespace hw {

namespace {

// Scalar loops: four independent accumulators keep several multiplies in flight.
uint64_t partial_words_scalar(const unsigned char* p, size_t nwords, uint64_t base) {
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

uint64_t copy_partial_words_scalar(unsigned char* d, const unsigned char* s, size_t nwords,
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

#if HW_HAVE_AVX2_PATH
// AVX2: the same function on four 64-bit lanes at a time (bit-identical to the scalar loop).
// AVX2 has no 64-bit multiply; x * c = lo(x)lo(c) + ((lo(x)hi(c) + hi(x)lo(c)) << 32).
__attribute__((target("avx2"))) inline __m256i mul64c(__m256i x, uint64_t c) {
  const __m256i clo = _mm256_set1_epi64x(static_cast<long long>(c & 0xffffffffull));
  const __m256i chi = _mm256_set1_epi64x(static_cast<long long>(c >> 32));
  const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(x, chi),
                                         _mm256_mul_epu32(_mm256_srli_epi64(x, 32), clo));
  return _mm256_add_epi64(_mm256_mul_epu32(x, clo), _mm256_slli_epi64(cross, 32));
}

__attribute__((target("avx2"))) inline __m256i mix4(__m256i w, __m256i key) {
  __m256i x = mul64c(_mm256_xor_si256(w, key), kHwK1);
  x = _mm256_xor_si256(x, _mm256_srli_epi64(x, 32));
  x = mul64c(x, kHwK2);
  return _mm256_xor_si256(x, _mm256_srli_epi64(x, 29));
}

// Eight words per iteration in two independent chains; the keys i*K0 advance by additions.
template <bool kCopy>
__attribute__((target("avx2"))) uint64_t words_avx2(unsigned char* d, const unsigned char* s,
                                                    size_t nwords, uint64_t base) {
  __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
  const __m256i idx = _mm256_set_epi64x(static_cast<long long>(base + 3), static_cast<long long>(base + 2),
                                        static_cast<long long>(base + 1), static_cast<long long>(base));
  __m256i key0 = mul64c(idx, kHwK0);
  __m256i key1 = _mm256_add_epi64(key0, _mm256_set1_epi64x(static_cast<long long>(4 * kHwK0)));
  const __m256i step = _mm256_set1_epi64x(static_cast<long long>(8 * kHwK0));
  size_t i = 0;
  for (; i + 8 <= nwords; i += 8) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 8 * i));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 8 * i + 32));
    if (kCopy) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 8 * i), w0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 8 * i + 32), w1);
    }
    acc0 = _mm256_add_epi64(acc0, mix4(w0, key0));
    acc1 = _mm256_add_epi64(acc1, mix4(w1, key1));
    key0 = _mm256_add_epi64(key0, step);
    key1 = _mm256_add_epi64(key1, step);
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi64(acc0, acc1));
  uint64_t sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  const size_t rest = nwords - i;
  if (rest) {
    sum += kCopy ? copy_partial_words_scalar(d + 8 * i, s + 8 * i, rest, base + i)
                 : partial_words_scalar(s + 8 * i, rest, base + i);
  }
  return sum;
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2");
#endif

uint64_t partial_words(const unsigned char* p, size_t nwords, uint64_t base) {
#if HW_HAVE_AVX2_PATH
  if (kHasAvx2) return words_avx2<false>(nullptr, p, nwords, base);
#endif
  return partial_words_scalar(p, nwords, base);
}

uint64_t copy_partial_words(unsigned char* d, const unsigned char* s, size_t nwords, uint64_t base) {
#if HW_HAVE_AVX2_PATH
  if (kHasAvx2) return words_avx2<true>(d, s, nwords, base);
#endif
  return copy_partial_words_scalar(d, s, nwords, base);
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
