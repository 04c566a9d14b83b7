// SPDX-License-Identifier: Apache-2.0
// Batched copy + hw64 hash kernel: one launch moves (and/or hashes) any number of buffers.
// Only CUDA runtime headers here (no torch): see docs/build.md.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/checksum.h"
#include "cuda/check.h"
#include "cuda/cuda_api.h"

namespace hw {
namespace cuda {

namespace {

// Every unit is a slice of one descriptor; units are multiples of 16 bytes so a unit keeps
// the 16-byte alignment of its descriptor's pointers, and its words keep their hw64 index.
// Descriptor i owns units [first_unit[i], first_unit[i + 1]); a block finds its unit's
// descriptor by binary search, so the launch uploads n + 1 numbers, not one record per unit
// (an 8 GiB batch has 131,072 units).
constexpr uint64_t kUnitBytes = 64 * 1024;
constexpr int kThreads = 512;
constexpr int kUnroll = 4;

__device__ __forceinline__ uint64_t block_sum(uint64_t v) {
  __shared__ uint64_t warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  uint64_t total = 0;
  if (warp == 0) {
    total = lane < (blockDim.x >> 5) ? warp_sums[lane] : 0;
    for (int o = 16; o > 0; o >>= 1) total += __shfl_down_sync(0xffffffffu, total, o);
  }
  __syncthreads();  // warp_sums is reused by the next unit
  return total;
}

// hw64 terms of the two little-endian words of 16 bytes, the first with index `index`.
__device__ __forceinline__ uint64_t mix16(const uint4& v, uint64_t index) {
  const uint64_t w0 = static_cast<uint64_t>(v.x) | (static_cast<uint64_t>(v.y) << 32);
  const uint64_t w1 = static_cast<uint64_t>(v.z) | (static_cast<uint64_t>(v.w) << 32);
  return hw_mix_word(w0, index) + hw_mix_word(w1, index + 1);
}

__global__ void batched_copy_kernel(const CopyDesc* __restrict__ descs,
                                    const uint64_t* __restrict__ first_unit, size_t ndesc,
                                    uint64_t nunits, uint64_t* __restrict__ acc) {
  for (uint64_t u = blockIdx.x; u < nunits; u += gridDim.x) {
    // the descriptor holding unit u: first_unit[lo] <= u < first_unit[hi] throughout
    // (first_unit[0] = 0, first_unit[ndesc] = nunits; an empty descriptor owns no unit)
    size_t lo = 0, hi = ndesc;
    while (hi - lo > 1) {
      const size_t mid = lo + (hi - lo) / 2;
      if (first_unit[mid] <= u) lo = mid; else hi = mid;
    }
    const CopyDesc d = descs[lo];
    const uint64_t offset = (u - first_unit[lo]) * kUnitBytes;
    const uint32_t len = static_cast<uint32_t>(min(kUnitBytes, d.nbytes - offset));
    const unsigned char* src = static_cast<const unsigned char*>(d.src) + offset;
    unsigned char* dst = d.dst ? static_cast<unsigned char*>(d.dst) + offset : nullptr;
    const bool hash = d.hash_idx >= 0;  // uniform across the block
    const uint64_t base = d.hash_word_base + offset / 8;
    uint64_t sum = 0;
    uint32_t start = 0;
    if (((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15) == 0) {
      const uint32_t n16 = len / 16;
      const uint4* s4 = reinterpret_cast<const uint4*>(src);
      uint4* d4 = reinterpret_cast<uint4*>(dst);
      // kUnroll independent 16-byte loads per thread before any of them is used: enough
      // bytes in flight per SM to keep HBM busy while the hash's multiplies run
      uint32_t i = threadIdx.x;
      for (; i + (kUnroll - 1) * blockDim.x < n16; i += kUnroll * blockDim.x) {
        uint4 v[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) v[k] = s4[i + k * blockDim.x];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
          if (dst) d4[i + k * blockDim.x] = v[k];
          if (hash) sum += mix16(v[k], base + 2ull * (i + k * blockDim.x));
        }
      }
      for (; i < n16; i += blockDim.x) {
        const uint4 v = s4[i];
        if (dst) d4[i] = v;
        if (hash) sum += mix16(v, base + 2ull * i);
      }
      start = n16 * 16;
    }
    // Unaligned pointers, or the tail of an aligned unit: word by word, byte loads.
    for (uint32_t k = start / 8 + threadIdx.x; 8ull * k < len; k += blockDim.x) {
      const uint32_t b0 = 8 * k;
      const uint32_t nb = min(8u, len - b0);
      uint64_t w = 0;
      for (uint32_t j = 0; j < nb; ++j) w |= static_cast<uint64_t>(src[b0 + j]) << (8 * j);
      if (dst)
        for (uint32_t j = 0; j < nb; ++j) dst[b0 + j] = static_cast<unsigned char>(w >> (8 * j));
      if (hash) sum += hw_mix_word(w, base + k);
    }
    if (hash) {
      const uint64_t total = block_sum(sum);
      if (threadIdx.x == 0)
        atomicAdd(reinterpret_cast<unsigned long long*>(acc + d.hash_idx),
                  static_cast<unsigned long long>(total));
    }
  }
}

__global__ void finalize_kernel(const uint64_t* acc, const uint64_t* nbytes, uint64_t* out,
                                size_t n) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = hw_finalize(acc[i], nbytes[i]);
}

// Uploads host bytes to a stream-ordered device allocation (freed by the caller with
// cudaFreeAsync on the same stream). cudaMemcpyAsync from pageable memory returns once the
// bytes are staged, so the host buffer may go away right after.
void* upload(const void* host, size_t bytes, cudaStream_t stream) {
  void* dev = nullptr;
  HW_CUDA_CHECK(cudaMallocAsync(&dev, std::max<size_t>(bytes, 16), stream));
  HW_CUDA_CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, stream));
  return dev;
}

}  // namespace

void launch_batched_copy(const CopyDesc* descs, size_t n, uint64_t* hash_acc, void* stream_) {
  auto stream = static_cast<cudaStream_t>(stream_);
  std::vector<uint64_t> first_unit(n + 1);
  uint64_t nunits = 0;
  for (size_t i = 0; i < n; ++i) {
    if (descs[i].hash_idx >= 0 && hash_acc == nullptr)
      throw std::invalid_argument("launch_batched_copy: hashing requested without accumulators");
    first_unit[i] = nunits;
    nunits += (descs[i].nbytes + kUnitBytes - 1) / kUnitBytes;
  }
  first_unit[n] = nunits;
  if (nunits == 0) return;
  // CopyDesc is 40 bytes, so the uint64 table after the descriptors stays 8-byte aligned
  static_assert(sizeof(CopyDesc) % sizeof(uint64_t) == 0, "CopyDesc size");
  std::vector<unsigned char> host(n * sizeof(CopyDesc) + (n + 1) * sizeof(uint64_t));
  std::memcpy(host.data(), descs, n * sizeof(CopyDesc));
  std::memcpy(host.data() + n * sizeof(CopyDesc), first_unit.data(), (n + 1) * sizeof(uint64_t));
  auto* dev = static_cast<unsigned char*>(upload(host.data(), host.size(), stream));
  const int grid = static_cast<int>(std::min<uint64_t>(nunits, 1 << 16));
  batched_copy_kernel<<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const CopyDesc*>(dev),
      reinterpret_cast<const uint64_t*>(dev + n * sizeof(CopyDesc)), n, nunits, hash_acc);
  HW_CUDA_KERNEL_LAUNCH_CHECK();
  HW_CUDA_CHECK(cudaFreeAsync(dev, stream));
}

void launch_finalize(const uint64_t* acc, const uint64_t* nbytes, uint64_t* out, size_t n,
                     void* stream_) {
  if (n == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_);
  const int grid = static_cast<int>(std::min<size_t>((n + 255) / 256, 1024));
  finalize_kernel<<<grid, 256, 0, stream>>>(acc, nbytes, out, n);
  HW_CUDA_KERNEL_LAUNCH_CHECK();
}

void checksum_many(const void* const* ptrs, const uint64_t* sizes, size_t n, uint64_t* out,
                   void* stream_) {
  if (n == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_);
  std::vector<CopyDesc> descs(n);
  for (size_t i = 0; i < n; ++i)
    descs[i] = {ptrs[i], nullptr, sizes[i], static_cast<int64_t>(i), 0};
  // Accumulators and sizes in one stream-ordered allocation.
  uint64_t* acc = nullptr;
  HW_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&acc), 2 * n * sizeof(uint64_t), stream));
  HW_CUDA_CHECK(cudaMemsetAsync(acc, 0, n * sizeof(uint64_t), stream));
  HW_CUDA_CHECK(cudaMemcpyAsync(acc + n, sizes, n * sizeof(uint64_t), cudaMemcpyHostToDevice,
                                stream));
  launch_batched_copy(descs.data(), n, acc, stream);
  launch_finalize(acc, acc + n, out, n, stream);
  HW_CUDA_CHECK(cudaFreeAsync(acc, stream));
}

}  // namespace cuda
}  // namespace hw
