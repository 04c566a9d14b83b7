// SPDX-License-Identifier: Apache-2.0
// Launchers of the KV-cache kernels (csrc/cuda/kv_kernels.cu), free of torch and CUDA headers
// so that csrc/ops/kv_ops.cpp can include them. Pointers are device addresses, streams are
// cudaStream_t passed as void*; every launcher throws std::runtime_error on a CUDA error and
// queues its work on `stream` without synchronizing.
#pragma once

#include <cstdint>

namespace hw {
namespace cuda {

// Note [KV head remap geometry]
// A non-overlapping, dense tensor whose head axis has size H > 1 and stride s (elements) is,
// in memory, an array [outer][H][inner] with inner = s and outer = numel / (H * s), whatever
// the order of its logical dims (vLLM's HND stride order included): the dims with a smaller
// stride than the head axis tile exactly s elements, those with a larger one step over whole
// H * s blocks. A head remap is then a permutation (or gather) of the middle axis, i.e. of
// contiguous rows of inner * element_size bytes, and is independent of the dtype. The output
// of the out-of-place op is allocated with the input's strides, so it has the same geometry.

/// dst[o][j][:] = src[o][map[j]][:] for rows of row_bytes bytes. map is a HOST int32[heads]
/// with entries in [0, heads), read before the call returns (it travels as a kernel parameter,
/// or as a stream-ordered device copy for many heads). src and dst must not overlap.
void launch_remap_heads(const void* src, void* dst, int64_t outer, int64_t heads,
                        int64_t row_bytes, const int32_t* host_map, void* stream);

/// In place: data[o][j][:] = (old data)[o][map[j]][:]; map (host) must be a permutation. Each block
/// stages whole [o][*][tile] slabs in shared memory, so every byte is read and written once.
/// Returns false (and queues nothing) when heads is too large for a slab to fit in shared
/// memory; the caller then stages through a temporary buffer.
bool launch_remap_heads_inplace(void* data, int64_t outer, int64_t heads, int64_t row_bytes,
                                const int32_t* host_map, void* stream);

enum class KvFloat : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

/// RoPE re-rotation of rows of a contiguous [rows][head_dim] K tensor (see
/// hotweights/kv.py rerotate_rope for the math). Pair i < half is (i, i + half) when neox,
/// (2i, 2i + 1) otherwise; dims >= 2 * half are copied unchanged. positions: device int64[rows];
/// inv_freq: device float32[half]. All arithmetic is fp32; the rotated dims are multiplied by
/// scale. k and out must not overlap.
void launch_rerotate_rope(const void* k, void* out, KvFloat dtype, int64_t rows,
                          int64_t head_dim, int64_t half, const int64_t* positions,
                          const float* old_inv_freq, const float* new_inv_freq, float scale,
                          bool neox, void* stream);

enum class Fp8Kind : int { kE4M3FN = 0, kE5M2 = 1 };

/// out[e] = fp8(float(q[e]) * s_old[h] / s_new[h]) over the n bytes of a dense tensor, where
/// h = (e / head_stride) % heads is the head of element e (Note [KV head remap geometry]); a
/// scale that is not per head is read at index 0. The conversion rounds to nearest even and
/// saturates to the largest finite value (e4m3fn 448, e5m2 57344); NaN stays NaN.
void launch_requantize_fp8(const uint8_t* q, uint8_t* out, int64_t n, Fp8Kind kind,
                           const float* s_old, bool s_old_per_head, const float* s_new,
                           bool s_new_per_head, int64_t head_stride, int64_t heads,
                           void* stream);

}  // namespace cuda
}  // namespace hw
