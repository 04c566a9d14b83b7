// SPDX-License-Identifier: Apache-2.0
// KV-cache kernels: head remap (gather and in-place permutation of contiguous head rows),
// RoPE re-rotation in fp32, FP8 requantization. Only CUDA headers here (no torch).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cuda/check.h"
#include "cuda/kv_api.h"

namespace hw {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
// Shared memory staged per block by the in-place remap: small enough for several resident
// blocks per SM and below the 48 KiB a launch may use without opting in.
constexpr int64_t kSlabBytes = 32 * 1024;

int blocks_for(int64_t work_items) {
  int dev = 0, sms = 1;
  HW_CUDA_CHECK(cudaGetDevice(&dev));
  HW_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t want = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, int64_t{sms} * 8)));
}

// Widest access (16, 8, 4, 2 or 1 bytes) that divides the row and every row start.
int vector_bytes(int64_t row_bytes, const void* a, const void* b) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b);
  for (int v = 16; v > 1; v >>= 1)
    if (row_bytes % v == 0 && addr % v == 0) return v;
  return 1;
}

// The head map reaches the kernels as a kernel parameter for up to kParamHeads heads (staged in
// shared memory by each block), else as a stream-ordered device copy: no allocation, no copy
// and no stream synchronization for the common case.
constexpr int kParamHeads = 256;
struct MapArg {
  int32_t m[kParamHeads];
};

class MapSource {
 public:
  MapSource(const int32_t* host, int64_t heads, cudaStream_t stream) : stream_(stream) {
    if (heads <= kParamHeads) {
      std::memcpy(param_.m, host, static_cast<size_t>(heads) * sizeof(int32_t));
    } else {
      const size_t bytes = static_cast<size_t>(heads) * sizeof(int32_t);
      HW_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&dev_), bytes, stream));
      // From pageable memory: staged before the call returns, so `host` may go away.
      HW_CUDA_CHECK(cudaMemcpyAsync(dev_, host, bytes, cudaMemcpyHostToDevice, stream));
    }
  }
  ~MapSource() {
    if (dev_) cudaFreeAsync(dev_, stream_);  // stream-ordered after the kernel
  }
  MapSource(const MapSource&) = delete;
  MapSource& operator=(const MapSource&) = delete;
  const MapArg& param() const { return param_; }
  const int32_t* device() const { return dev_; }

 private:
  MapArg param_{};
  int32_t* dev_ = nullptr;
  cudaStream_t stream_;
};

// Returns where this block reads map[j]: its shared copy of the parameter, or global memory.
// `global == nullptr` is uniform over the block, so the barrier is safe.
__device__ __forceinline__ const int32_t* stage_map(const MapArg& param, const int32_t* global,
                                                    int64_t heads, int32_t* shared) {
  if (global != nullptr) return global;
  for (int64_t i = threadIdx.x; i < heads; i += blockDim.x) shared[i] = param.m[i];
  __syncthreads();
  return shared;
}

// ---------------------------------------------------------------- gather (out of place)

// One thread moves kUnroll vectors per iteration: all loads are issued before the stores so
// that several requests are in flight per thread. Idx is uint32 when everything fits.
template <typename V, typename Idx>
__global__ void remap_heads_kernel(const V* __restrict__ src, V* __restrict__ dst, Idx total,
                                   Idx row_vecs, Idx heads, const MapArg pmap,
                                   const int32_t* __restrict__ gmap) {
  __shared__ int32_t smap[kParamHeads];
  const int32_t* map = stage_map(pmap, gmap, static_cast<int64_t>(heads), smap);
  const Idx stride = static_cast<Idx>(gridDim.x) * blockDim.x;
  for (Idx base = static_cast<Idx>(blockIdx.x) * blockDim.x + threadIdx.x; base < total;
       base += stride * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const Idx i = base + u * stride;
      if (i < total) {
        const Idx row = i / row_vecs;
        const Idx col = i - row * row_vecs;
        const Idx o = row / heads;
        const Idx j = row - o * heads;
        v[u] = src[(o * heads + static_cast<Idx>(map[j])) * row_vecs + col];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const Idx i = base + u * stride;
      if (i < total) dst[i] = v[u];
    }
  }
}

template <typename V>
void remap_typed(const void* src, void* dst, int64_t outer, int64_t heads, int64_t row_bytes,
                 const MapSource& map, cudaStream_t stream) {
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t total = outer * heads * row_vecs;
  const int blocks = blocks_for((total + kUnroll - 1) / kUnroll);
  // uint32 indices keep the divisions cheap; the bound leaves room for base + kUnroll*stride.
  if (total < (int64_t{1} << 31)) {
    remap_heads_kernel<V, uint32_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const V*>(src), static_cast<V*>(dst), static_cast<uint32_t>(total),
        static_cast<uint32_t>(row_vecs), static_cast<uint32_t>(heads), map.param(),
        map.device());
  } else {
    remap_heads_kernel<V, uint64_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const V*>(src), static_cast<V*>(dst), static_cast<uint64_t>(total),
        static_cast<uint64_t>(row_vecs), static_cast<uint64_t>(heads), map.param(),
        map.device());
  }
  HW_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- in-place permutation

// A unit is a slab: `group` consecutive outer indices (when a whole [H][inner] block fits) or
// one outer index and a tile of `tile_vecs` vectors of every head row. The block copies the
// slab into shared memory, waits, then writes row j of the slab from staged row map[j]. Units
// are disjoint, so no block reads bytes another block writes.
template <typename V>
__global__ void remap_heads_inplace_kernel(V* __restrict__ data, int64_t outer, int32_t heads,
                                           int64_t row_vecs, int32_t tile_vecs, int32_t group,
                                           int64_t n_tiles, int64_t units, const MapArg pmap,
                                           const int32_t* __restrict__ gmap) {
  __shared__ int32_t smap[kParamHeads];
  const int32_t* map = stage_map(pmap, gmap, heads, smap);
  extern __shared__ __align__(16) unsigned char slab_raw[];
  V* slab = reinterpret_cast<V*>(slab_raw);
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t tile = u % n_tiles;
    const int64_t o0 = (u / n_tiles) * group;
    const int32_t no = static_cast<int32_t>(outer - o0 < group ? outer - o0 : group);
    const int64_t v0 = tile * tile_vecs;
    const int32_t nv = static_cast<int32_t>(row_vecs - v0 < tile_vecs ? row_vecs - v0 : tile_vecs);
    const int32_t per_o = heads * nv;
    const int32_t n = no * per_o;
    for (int32_t k = threadIdx.x; k < n; k += blockDim.x) {
      const int32_t oo = k / per_o;
      const int32_t rem = k - oo * per_o;
      const int32_t j = rem / nv;
      const int32_t c = rem - j * nv;
      slab[k] = data[((o0 + oo) * heads + j) * row_vecs + v0 + c];
    }
    __syncthreads();
    for (int32_t k = threadIdx.x; k < n; k += blockDim.x) {
      const int32_t oo = k / per_o;
      const int32_t rem = k - oo * per_o;
      const int32_t j = rem / nv;
      const int32_t c = rem - j * nv;
      data[((o0 + oo) * heads + j) * row_vecs + v0 + c] = slab[oo * per_o + map[j] * nv + c];
    }
    __syncthreads();  // the slab is refilled by the next unit
  }
}

template <typename V>
bool remap_inplace_typed(void* data, int64_t outer, int64_t heads, int64_t row_bytes,
                         const MapSource& map, cudaStream_t stream) {
  constexpr int64_t vb = sizeof(V);
  const int64_t row_vecs = row_bytes / vb;
  const int64_t slab_vecs = kSlabBytes / vb;
  if (heads > slab_vecs) return false;  // not even one vector per head row fits
  int64_t tile_vecs, group;
  if (heads * row_vecs <= slab_vecs) {
    tile_vecs = row_vecs;
    group = std::max<int64_t>(1, slab_vecs / (heads * row_vecs));
  } else {
    tile_vecs = slab_vecs / heads;
    group = 1;
  }
  group = std::min(group, outer);
  const int64_t n_tiles = (row_vecs + tile_vecs - 1) / tile_vecs;
  const int64_t units = ((outer + group - 1) / group) * n_tiles;
  const size_t smem = static_cast<size_t>(group * heads * tile_vecs * vb);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(
      units, blocks_for(units * kThreads))));
  remap_heads_inplace_kernel<V><<<blocks, kThreads, smem, stream>>>(
      static_cast<V*>(data), outer, static_cast<int32_t>(heads), row_vecs,
      static_cast<int32_t>(tile_vecs), static_cast<int32_t>(group), n_tiles, units,
      map.param(), map.device());
  HW_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// ---------------------------------------------------------------- RoPE re-rotation

template <typename T>
__device__ __forceinline__ float load_f(const T* p);
template <>
__device__ __forceinline__ float load_f<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_f<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load_f<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T>
__device__ __forceinline__ void store_f(T* p, float v);
template <>
__device__ __forceinline__ void store_f<float>(float* p, float v) { *p = v; }
template <>
__device__ __forceinline__ void store_f<__half>(__half* p, float v) { *p = __float2half_rn(v); }
template <>
__device__ __forceinline__ void store_f<__nv_bfloat16>(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

// Work item (row, c): c < half rotates pair c, c >= half copies pass-through dim 2*half + c - half.
// The delta rotation is composed from the two absolute angles, as HF SinkCache does
// (cos(a'-a) = cos a' cos a + sin a' sin a, sin(a'-a) = sin a' cos a - cos a' sin a), so the
// result matches a fresh rotation by the fp32 angle p * w' rather than by fp32(p * (w' - w)).
template <typename T>
__global__ void rerotate_rope_kernel(const T* __restrict__ k, T* __restrict__ out, int64_t rows,
                                     int32_t head_dim, int32_t half,
                                     const int64_t* __restrict__ positions,
                                     const float* __restrict__ inv_old,
                                     const float* __restrict__ inv_new, float scale, bool neox) {
  const int32_t per_row = head_dim - half;  // half pairs + (head_dim - 2*half) pass-through
  const int64_t total = rows * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / per_row;
    const int32_t c = static_cast<int32_t>(i - row * per_row);
    const T* kr = k + row * head_dim;
    T* orow = out + row * head_dim;
    if (c < half) {
      const float p = static_cast<float>(__ldg(positions + row));
      float s0, c0, s1, c1;
      sincosf(p * __ldg(inv_old + c), &s0, &c0);
      sincosf(p * __ldg(inv_new + c), &s1, &c1);
      const float cd = c1 * c0 + s1 * s0;
      const float sd = s1 * c0 - c1 * s0;
      const int32_t i1 = neox ? c : 2 * c;
      const int32_t i2 = neox ? c + half : 2 * c + 1;
      const float x1 = load_f(kr + i1);
      const float x2 = load_f(kr + i2);
      store_f(orow + i1, (x1 * cd - x2 * sd) * scale);
      store_f(orow + i2, (x2 * cd + x1 * sd) * scale);
    } else {
      const int32_t d = 2 * half + (c - half);
      orow[d] = kr[d];
    }
  }
}

template <typename T>
void rerotate_typed(const void* k, void* out, int64_t rows, int64_t head_dim, int64_t half,
                    const int64_t* positions, const float* inv_old, const float* inv_new,
                    float scale, bool neox, cudaStream_t stream) {
  const int64_t total = rows * (head_dim - half);
  rerotate_rope_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
      static_cast<const T*>(k), static_cast<T*>(out), rows, static_cast<int32_t>(head_dim),
      static_cast<int32_t>(half), positions, inv_old, inv_new, scale, neox);
  HW_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- FP8 requantization

template <__nv_fp8_interpretation_t Kind>
__device__ __forceinline__ uint8_t requant_one(uint8_t q, float s_old, float s_new) {
  __half xh;
  xh = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(q), Kind);  // exact
  // Same operation order as the CPU kernel: (dequant(q) * s_old) / s_new, IEEE fp32.
  const float y = __fdiv_rn(__fmul_rn(__half2float(xh), s_old), s_new);
  // NaN keeps its sign, as torch's conversion (and the CPU kernel) does: 0x7F | sign. The GPU
  // arithmetic returns a canonical positive NaN, so the sign comes from q (scales are finite).
  if (isnan(y)) return static_cast<uint8_t>(0x7F | (q & 0x80));
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(y, __NV_SATFINITE, Kind));
}

// Scalar path: any geometry.
template <__nv_fp8_interpretation_t Kind>
__global__ void requantize_fp8_kernel(const uint8_t* __restrict__ q, uint8_t* __restrict__ out,
                                      int64_t n, const float* __restrict__ s_old,
                                      int64_t s_old_step, const float* __restrict__ s_new,
                                      int64_t s_new_step, int64_t head_stride, int64_t heads) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t h = (e / head_stride) % heads;
    out[e] = requant_one<Kind>(q[e], __ldg(s_old + h * s_old_step), __ldg(s_new + h * s_new_step));
  }
}

// 16 bytes per thread when a run of one head is a multiple of 16 bytes: one head lookup per
// 16 elements instead of a 64-bit division per element.
template <__nv_fp8_interpretation_t Kind>
__global__ void requantize_fp8_vec_kernel(const uint4* __restrict__ q, uint4* __restrict__ out,
                                          int64_t n16, const float* __restrict__ s_old,
                                          int64_t s_old_step, const float* __restrict__ s_new,
                                          int64_t s_new_step, int64_t head_stride16,
                                          int64_t heads) {
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n16;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t h = (v / head_stride16) % heads;
    const float so = __ldg(s_old + h * s_old_step), sn = __ldg(s_new + h * s_new_step);
    uint4 in = q[v], res;
    const uint8_t* a = reinterpret_cast<const uint8_t*>(&in);
    uint8_t* b = reinterpret_cast<uint8_t*>(&res);
#pragma unroll
    for (int j = 0; j < 16; ++j) b[j] = requant_one<Kind>(a[j], so, sn);
    out[v] = res;
  }
}

template <__nv_fp8_interpretation_t Kind>
void requantize_typed(const uint8_t* q, uint8_t* out, int64_t n, const float* s_old, int64_t so,
                      const float* s_new, int64_t sn, int64_t head_stride, int64_t heads,
                      cudaStream_t stream) {
  const bool vec = n % 16 == 0 && head_stride % 16 == 0 &&
                   ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(out)) & 15) == 0;
  if (vec) {
    requantize_fp8_vec_kernel<Kind><<<blocks_for(n / 16), kThreads, 0, stream>>>(
        reinterpret_cast<const uint4*>(q), reinterpret_cast<uint4*>(out), n / 16, s_old, so,
        s_new, sn, head_stride / 16, heads);
  } else {
    requantize_fp8_kernel<Kind><<<blocks_for(n), kThreads, 0, stream>>>(
        q, out, n, s_old, so, s_new, sn, head_stride, heads);
  }
  HW_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_remap_heads(const void* src, void* dst, int64_t outer, int64_t heads,
                        int64_t row_bytes, const int32_t* host_map, void* stream_) {
  if (outer == 0 || heads == 0 || row_bytes == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_);
  const MapSource map(host_map, heads, stream);
  switch (vector_bytes(row_bytes, src, dst)) {
    case 16: return remap_typed<uint4>(src, dst, outer, heads, row_bytes, map, stream);
    case 8: return remap_typed<uint2>(src, dst, outer, heads, row_bytes, map, stream);
    case 4: return remap_typed<uint32_t>(src, dst, outer, heads, row_bytes, map, stream);
    case 2: return remap_typed<uint16_t>(src, dst, outer, heads, row_bytes, map, stream);
    default: return remap_typed<uint8_t>(src, dst, outer, heads, row_bytes, map, stream);
  }
}

bool launch_remap_heads_inplace(void* data, int64_t outer, int64_t heads, int64_t row_bytes,
                                const int32_t* host_map, void* stream_) {
  if (outer == 0 || heads == 0 || row_bytes == 0) return true;
  auto stream = static_cast<cudaStream_t>(stream_);
  if (heads > kSlabBytes) return false;  // cannot fit even at 1-byte rows; caller stages
  const MapSource map(host_map, heads, stream);
  switch (vector_bytes(row_bytes, data, data)) {
    case 16: return remap_inplace_typed<uint4>(data, outer, heads, row_bytes, map, stream);
    case 8: return remap_inplace_typed<uint2>(data, outer, heads, row_bytes, map, stream);
    case 4: return remap_inplace_typed<uint32_t>(data, outer, heads, row_bytes, map, stream);
    case 2: return remap_inplace_typed<uint16_t>(data, outer, heads, row_bytes, map, stream);
    default: return remap_inplace_typed<uint8_t>(data, outer, heads, row_bytes, map, stream);
  }
}

void launch_rerotate_rope(const void* k, void* out, KvFloat dtype, int64_t rows,
                          int64_t head_dim, int64_t half, const int64_t* positions,
                          const float* old_inv_freq, const float* new_inv_freq, float scale,
                          bool neox, void* stream_) {
  if (rows == 0 || head_dim == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_);
  switch (dtype) {
    case KvFloat::kFloat32:
      return rerotate_typed<float>(k, out, rows, head_dim, half, positions, old_inv_freq,
                                   new_inv_freq, scale, neox, stream);
    case KvFloat::kFloat16:
      return rerotate_typed<__half>(k, out, rows, head_dim, half, positions, old_inv_freq,
                                    new_inv_freq, scale, neox, stream);
    case KvFloat::kBFloat16:
      return rerotate_typed<__nv_bfloat16>(k, out, rows, head_dim, half, positions,
                                           old_inv_freq, new_inv_freq, scale, neox, stream);
  }
  throw std::invalid_argument("launch_rerotate_rope: unknown dtype code");
}

void launch_requantize_fp8(const uint8_t* q, uint8_t* out, int64_t n, Fp8Kind kind,
                           const float* s_old, bool s_old_per_head, const float* s_new,
                           bool s_new_per_head, int64_t head_stride, int64_t heads,
                           void* stream_) {
  if (n == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_);
  const int64_t so = s_old_per_head ? 1 : 0, sn = s_new_per_head ? 1 : 0;
  if (kind == Fp8Kind::kE4M3FN)
    requantize_typed<__NV_E4M3>(q, out, n, s_old, so, s_new, sn, head_stride, heads, stream);
  else
    requantize_typed<__NV_E5M2>(q, out, n, s_old, so, s_new, sn, head_stride, heads, stream);
}

}  // namespace cuda
}  // namespace hw
