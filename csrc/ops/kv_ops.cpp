// SPDX-License-Identifier: Apache-2.0
// KV-cache dispatcher ops: KV-head remap (gather and in-place permutation), RoPE re-rotation
// and FP8 requantization. Schemas, CPU kernels and the CUDA bindings; the CUDA kernels live in
// csrc/cuda/kv_kernels.cu (no torch there). Python entry points: hotweights/ops.py, kv.py.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>


#ifdef HW_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kv_api.h"
#endif

namespace hw {
namespace ops {

namespace {

// CPU work is cut into tasks of at least this many bytes (ATen's intra-op thread pool).
constexpr int64_t kTaskBytes = 256 << 10;
// In-place CPU remap: rows are permuted in tiles of at most this many bytes (one temp tile).
constexpr int64_t kTileBytes = 64 << 10;

int64_t checked_axis(const at::Tensor& t, int64_t axis, const char* op, const char* arg,
                     const char* tname) {
  const int64_t d = t.dim();
  TORCH_CHECK(d > 0, "hotweights::", op, ": ", tname, " is 0-d; expected a tensor with a ", arg);
  TORCH_CHECK(axis >= -d && axis < d, "hotweights::", op, ": ", arg, "=", axis,
              " is out of range for ", tname, " of shape ", t.sizes(), " (expected ", -d,
              " <= ", arg, " < ", d, ")");
  return axis < 0 ? axis + d : axis;
}

// Geometry of Note [KV head remap geometry] (csrc/cuda/kv_api.h): memory as [outer][heads][inner].
struct HeadGeometry {
  int64_t outer, heads, inner;  // inner in elements
};

HeadGeometry head_geometry(const at::Tensor& dense, int64_t axis) {
  const int64_t h = dense.size(axis);
  if (h <= 1 || dense.numel() == 0) return {1, 1, dense.numel()};
  const int64_t inner = dense.stride(axis);
  return {dense.numel() / (h * inner), h, inner};
}

// A source with the strides at::empty_like gives (the output's, and the fake kernel's):
// the tensor itself when it is non-overlapping and dense, else a dense copy of it.
at::Tensor dense_like(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) return t;
  return at::empty_like(t).copy_(t);
}

// Validates head_map against the head axis of kv and returns it as host int32 values. A map
// on the GPU is read back (a small synchronous copy): entries are checked before any kernel
// indexes memory with them.
std::vector<int32_t> host_head_map(const at::Tensor& kv, const at::Tensor& head_map,
                                   int64_t axis, const char* op, bool need_permutation) {
  TORCH_CHECK(head_map.scalar_type() == at::kLong, "hotweights::", op,
              ": head_map must be int64 (torch.long), got ", head_map.scalar_type());
  TORCH_CHECK(head_map.dim() == 1, "hotweights::", op, ": head_map must be 1-D, got shape ",
              head_map.sizes());
  const int64_t heads = kv.size(axis);
  TORCH_CHECK(head_map.numel() == heads, "hotweights::", op, ": head_map has ",
              head_map.numel(), " entries, expected num_kv_heads=", heads, " (the size of axis ",
              axis, " of a cache of shape ", kv.sizes(), ")");
  TORCH_CHECK(head_map.device().is_cpu() || head_map.device() == kv.device(), "hotweights::",
              op, ": head_map is on ", head_map.device(), " but the cache is on ", kv.device(),
              "; expected the cache's device or cpu");
  const at::Tensor m = head_map.cpu().contiguous();
  const int64_t* p = m.data_ptr<int64_t>();
  std::vector<int32_t> out(static_cast<size_t>(heads));
  std::vector<int64_t> first(static_cast<size_t>(heads), -1);
  for (int64_t j = 0; j < heads; ++j) {
    TORCH_CHECK(p[j] >= 0 && p[j] < heads, "hotweights::", op, ": head_map[", j, "] = ", p[j],
                " is out of range: expected 0 <= entry < num_kv_heads=", heads);
    if (need_permutation) {
      TORCH_CHECK(first[p[j]] < 0, "hotweights::", op, ": head_map is not a permutation of 0..",
                  heads - 1, ": KV head ", p[j], " appears at entries ", first[p[j]], " and ", j,
                  "; the in-place op needs a permutation (remap_kv_heads gathers)");
      first[p[j]] = j;
    }
    out[static_cast<size_t>(j)] = static_cast<int32_t>(p[j]);
  }
  return out;
}

// Runs fn(begin, end) over [0, n) items of item_bytes each, in chunks of at least kTaskBytes,
// on ATen's intra-op pool (the threads torch.set_num_threads controls, already warm when the
// caller runs other torch CPU ops).
template <typename Fn>
void parallel_items(int64_t n, int64_t item_bytes, const Fn& fn) {
  if (n <= 0) return;
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(1, item_bytes));
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(b, e); });
}

// ---------------------------------------------------------------- remap_kv_heads (CPU)

// dst row (o, j) = src row (o, map[j]); a row is cut into pieces of at most kTaskBytes so a
// few long rows (HF layout: seq * head_dim per head) still spread over every thread.
void remap_rows_cpu(const char* src, char* dst, const HeadGeometry& g, int64_t esize,
                    const std::vector<int32_t>& map) {
  const int64_t row = g.inner * esize;
  const int64_t piece = std::min(row, kTaskBytes);
  const int64_t pieces = (row + piece - 1) / piece;
  parallel_items(g.outer * g.heads * pieces, piece, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      const int64_t r = u / pieces, off = (u % pieces) * piece;
      const int64_t o = r / g.heads, j = r % g.heads;
      std::memcpy(dst + r * row + off, src + (o * g.heads + map[j]) * row + off,
                  static_cast<size_t>(std::min(piece, row - off)));
    }
  });
}

// In place, by cycles of the permutation: for a cycle c0 -> c1 -> ... (c_{i+1} = map[c_i]),
// row c_i takes row c_{i+1} and the last takes the saved first, one tile at a time.
void permute_rows_inplace_cpu(char* data, const HeadGeometry& g, int64_t esize,
                              const std::vector<int32_t>& map) {
  std::vector<std::vector<int32_t>> cycles;
  std::vector<char> seen(map.size(), 0);
  for (size_t s = 0; s < map.size(); ++s) {
    if (seen[s] || map[s] == static_cast<int32_t>(s)) continue;
    std::vector<int32_t> c;
    for (int32_t j = static_cast<int32_t>(s); !seen[j]; j = map[j]) {
      seen[j] = 1;
      c.push_back(j);
    }
    cycles.push_back(std::move(c));
  }
  if (cycles.empty()) return;  // identity
  const int64_t row = g.inner * esize;
  const int64_t tile = std::min(row, kTileBytes);
  const int64_t tiles = (row + tile - 1) / tile;
  parallel_items(g.outer * tiles, tile * g.heads, [&](int64_t b, int64_t e) {
    std::vector<char> tmp(static_cast<size_t>(tile));
    for (int64_t u = b; u < e; ++u) {
      const int64_t o = u / tiles, off = (u % tiles) * tile;
      const size_t n = static_cast<size_t>(std::min(tile, row - off));
      char* base = data + o * g.heads * row + off;
      for (const auto& c : cycles) {
        std::memcpy(tmp.data(), base + c[0] * row, n);
        for (size_t i = 0; i + 1 < c.size(); ++i)
          std::memcpy(base + c[i] * row, base + c[i + 1] * row, n);
        std::memcpy(base + c.back() * row, tmp.data(), n);
      }
    }
  });
}

at::Tensor remap_kv_heads_cpu(const at::Tensor& kv, const at::Tensor& head_map,
                              int64_t head_axis) {
  const int64_t axis = checked_axis(kv, head_axis, "remap_kv_heads", "head_axis", "the cache");
  const auto map = host_head_map(kv, head_map, axis, "remap_kv_heads", false);
  at::Tensor out = at::empty_like(kv);
  if (kv.numel() == 0) return out;
  const at::Tensor src = dense_like(kv);
  TORCH_INTERNAL_ASSERT(src.strides() == out.strides() || kv.size(axis) <= 1);
  remap_rows_cpu(static_cast<const char*>(src.data_ptr()), static_cast<char*>(out.data_ptr()),
                 head_geometry(src, axis), src.element_size(), map);
  return out;
}

void check_inplace_target(const at::Tensor& kv, const char* op) {
  TORCH_CHECK(at::has_internal_overlap(kv) != at::MemOverlap::Yes, "hotweights::", op,
              ": the cache has overlapping memory (an expanded tensor, shape ", kv.sizes(),
              ", strides ", kv.strides(), "); remap a materialized cache");
}

void remap_kv_heads_inplace_cpu(const at::Tensor& kv, const at::Tensor& head_map,
                                int64_t head_axis) {
  const int64_t axis = checked_axis(kv, head_axis, "remap_kv_heads_", "head_axis", "the cache");
  const auto map = host_head_map(kv, head_map, axis, "remap_kv_heads_", true);
  check_inplace_target(kv, "remap_kv_heads_");
  if (kv.numel() == 0 || kv.size(axis) <= 1) return;
  at::Tensor work = dense_like(kv);
  permute_rows_inplace_cpu(static_cast<char*>(work.data_ptr()), head_geometry(work, axis),
                           work.element_size(), map);
  if (!work.is_same(kv)) kv.copy_(work);
}

// ---------------------------------------------------------------- rerotate_rope

struct RopeArgs {
  at::Tensor k, positions, old_inv, new_inv;  // k, positions contiguous; positions int64 rows
  int64_t rows, head_dim, half;
};

RopeArgs check_rope(const at::Tensor& k, const at::Tensor& positions,
                    const at::Tensor& old_inv_freq, const at::Tensor& new_inv_freq) {
  const auto st = k.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "hotweights::rerotate_rope: k must be float32, float16 or bfloat16, got ", st,
              " (dequantize an FP8 cache first: hotweights.kv.convert_kv_dtype)");
  TORCH_CHECK(k.dim() >= 1, "hotweights::rerotate_rope: k is 0-d; expected [..., head_dim]");
  const int64_t head_dim = k.size(-1);
  for (const auto* f : {&old_inv_freq, &new_inv_freq}) {
    const char* name = f == &old_inv_freq ? "old_inv_freq" : "new_inv_freq";
    TORCH_CHECK(f->scalar_type() == at::kFloat, "hotweights::rerotate_rope: ", name,
                " must be float32, got ", f->scalar_type());
    TORCH_CHECK(f->dim() == 1, "hotweights::rerotate_rope: ", name, " must be 1-D, got shape ",
                f->sizes());
    TORCH_CHECK(f->device().is_cpu() || f->device() == k.device(), "hotweights::rerotate_rope: ",
                name, " is on ", f->device(), " but k is on ", k.device());
  }
  const int64_t half = old_inv_freq.numel();
  TORCH_CHECK(new_inv_freq.numel() == half, "hotweights::rerotate_rope: old_inv_freq has ", half,
              " entries but new_inv_freq has ", new_inv_freq.numel(),
              "; re-rotation needs the same rotary dim (the pairing depends on it)");
  TORCH_CHECK(2 * half <= head_dim, "hotweights::rerotate_rope: ", half,
              " inverse frequencies rotate ", 2 * half, " dims, more than head_dim=", head_dim,
              " (the last axis of k with shape ", k.sizes(), ")");
  TORCH_CHECK(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt,
              "hotweights::rerotate_rope: positions must be int64 or int32, got ",
              positions.scalar_type());
  TORCH_CHECK(positions.device().is_cpu() || positions.device() == k.device(),
              "hotweights::rerotate_rope: positions is on ", positions.device(), " but k is on ",
              k.device());
  const auto lead = k.sizes().slice(0, k.dim() - 1);
  bool ok = positions.dim() <= static_cast<int64_t>(lead.size());
  for (int64_t i = 1; ok && i <= positions.dim(); ++i) {
    const int64_t p = positions.size(-i), want = lead[lead.size() - i];
    ok = p == want || p == 1;
  }
  TORCH_CHECK(ok, "hotweights::rerotate_rope: positions of shape ", positions.sizes(),
              " does not broadcast to the leading dims ", lead, " of k with shape ", k.sizes());
  RopeArgs a;
  a.k = k.contiguous();
  a.positions = positions.to(at::kLong).expand(lead).contiguous();
  a.old_inv = old_inv_freq.contiguous();
  a.new_inv = new_inv_freq.contiguous();
  a.rows = k.numel() / std::max<int64_t>(head_dim, 1);
  a.head_dim = head_dim;
  a.half = half;
  return a;
}

template <typename T>
void rerotate_rows_cpu(const T* k, T* out, const int64_t* pos, const float* w0, const float* w1,
                       int64_t rows, int64_t d, int64_t half, float scale, bool neox) {
  parallel_items(rows, d * static_cast<int64_t>(sizeof(T)) * 4, [&](int64_t b, int64_t e) {
    // Rows of one position (the KV heads of a token) share the delta rotation: computed once.
    std::vector<float> cd(static_cast<size_t>(half)), sd(static_cast<size_t>(half));
    bool have = false;
    int64_t last = 0;
    for (int64_t r = b; r < e; ++r) {
      const T* kr = k + r * d;
      T* orow = out + r * d;
      if (!have || pos[r] != last) {
        const float p = static_cast<float>(pos[r]);
        for (int64_t i = 0; i < half; ++i) {
          // fp32 angles as a fresh RoPE computes them, composed as in HF SinkCache: see
          // rerotate_rope_kernel in csrc/cuda/kv_kernels.cu.
          const float a0 = p * w0[i], a1 = p * w1[i];
          const float s0 = std::sin(a0), c0 = std::cos(a0), s1 = std::sin(a1), c1 = std::cos(a1);
          cd[i] = c1 * c0 + s1 * s0;
          sd[i] = s1 * c0 - c1 * s0;
        }
        have = true;
        last = pos[r];
      }
      for (int64_t i = 0; i < half; ++i) {
        const int64_t i1 = neox ? i : 2 * i, i2 = neox ? i + half : 2 * i + 1;
        const float x1 = static_cast<float>(kr[i1]), x2 = static_cast<float>(kr[i2]);
        orow[i1] = static_cast<T>((x1 * cd[i] - x2 * sd[i]) * scale);
        orow[i2] = static_cast<T>((x2 * cd[i] + x1 * sd[i]) * scale);
      }
      for (int64_t i = 2 * half; i < d; ++i) orow[i] = kr[i];
    }
  });
}

at::Tensor rerotate_rope_cpu(const at::Tensor& k, const at::Tensor& positions,
                             const at::Tensor& old_inv_freq, const at::Tensor& new_inv_freq,
                             double scale, bool neox) {
  auto a = check_rope(k, positions, old_inv_freq, new_inv_freq);
  at::Tensor out = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  if (a.rows == 0 || a.head_dim == 0) return out;
  const auto* pos = a.positions.data_ptr<int64_t>();
  const auto* w0 = a.old_inv.data_ptr<float>();
  const auto* w1 = a.new_inv.data_ptr<float>();
  const float s = static_cast<float>(scale);
  switch (k.scalar_type()) {
    case at::kFloat:
      rerotate_rows_cpu(a.k.data_ptr<float>(), out.data_ptr<float>(), pos, w0, w1, a.rows,
                        a.head_dim, a.half, s, neox);
      break;
    case at::kHalf:
      rerotate_rows_cpu(a.k.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), pos, w0, w1,
                        a.rows, a.head_dim, a.half, s, neox);
      break;
    default:
      rerotate_rows_cpu(a.k.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), pos, w0,
                        w1, a.rows, a.head_dim, a.half, s, neox);
  }
  return out;
}

// ---------------------------------------------------------------- requantize_fp8

struct QuantArgs {
  at::Tensor src, out, s_old, s_new;  // scales: float32, contiguous, 1 or heads entries
  bool old_per_head, new_per_head;
  int64_t head_stride, heads;
};

bool is_fp8(at::ScalarType t) {
  return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2;
}

bool check_scale(const at::Tensor& q, const at::Tensor& s, int64_t axis, const char* name) {
  TORCH_CHECK(at::isFloatingType(s.scalar_type()) && !is_fp8(s.scalar_type()),
              "hotweights::requantize_fp8: ", name, " must be a floating tensor, got ",
              s.scalar_type());
  TORCH_CHECK(s.device().is_cpu() || s.device() == q.device(), "hotweights::requantize_fp8: ",
              name, " is on ", s.device(), " but q is on ", q.device());
  const int64_t heads = q.size(axis);
  if (s.dim() == 0 || (s.dim() == 1 && s.numel() == 1)) return false;  // per tensor
  TORCH_CHECK(s.dim() == 1 && s.numel() == heads, "hotweights::requantize_fp8: ", name,
              " has shape ", s.sizes(), ", expected a per-tensor scale (0-d or one element) "
              "or a per-head scale of length num_kv_heads=", heads, " (the size of axis ",
              axis, " of q with shape ", q.sizes(), ")");
  return true;
}

QuantArgs check_quant(const at::Tensor& q, const at::Tensor& s_old, const at::Tensor& s_new,
                      int64_t head_axis) {
  TORCH_CHECK(is_fp8(q.scalar_type()), "hotweights::requantize_fp8: q must be float8_e4m3fn or "
              "float8_e5m2, got ", q.scalar_type(),
              " (other dtypes: hotweights.kv.convert_kv_dtype)");
  const int64_t axis = checked_axis(q, head_axis, "requantize_fp8", "head_axis", "q");
  QuantArgs a;
  a.old_per_head = check_scale(q, s_old, axis, "s_old");
  a.new_per_head = check_scale(q, s_new, axis, "s_new");
  a.src = dense_like(q);
  a.out = at::empty_like(q);
  a.s_old = s_old.to(at::kFloat).reshape({-1}).contiguous();
  a.s_new = s_new.to(at::kFloat).reshape({-1}).contiguous();
  const bool per_head = a.old_per_head || a.new_per_head;
  const auto g = per_head ? head_geometry(a.src, axis) : HeadGeometry{1, 1, q.numel()};
  a.heads = g.heads;
  a.head_stride = std::max<int64_t>(g.inner, 1);
  return a;
}

template <typename F8>
void requantize_cpu_typed(const uint8_t* q, uint8_t* out, int64_t n, const float* so, bool so_h,
                          const float* sn, bool sn_h, int64_t head_stride, int64_t heads) {
  const float fmax = static_cast<float>(std::numeric_limits<F8>::max());
  float decode[256];  // every FP8 value, exactly
  for (int v = 0; v < 256; ++v)
    decode[v] = static_cast<float>(F8(static_cast<uint8_t>(v), F8::from_bits()));
  parallel_items(n, 4, [&](int64_t b, int64_t e) {
    // Runs of head_stride elements share a head, hence a pair of scales.
    for (int64_t i = b; i < e;) {
      const int64_t h = (i / head_stride) % heads;
      const int64_t run_end = std::min(e, (i / head_stride + 1) * head_stride);
      const float s_old = so[so_h ? h : 0], s_new = sn[sn_h ? h : 0];
      for (; i < run_end; ++i) {
        const float y = (decode[q[i]] * s_old) / s_new;
        // Saturate (c10's conversion would give NaN or inf above the largest finite value);
        // written so that NaN passes through unchanged.
        out[i] = F8(std::max(std::min(y, fmax), -fmax)).x;
      }
    }
  });
}

at::Tensor requantize_fp8_cpu(const at::Tensor& q, const at::Tensor& s_old,
                              const at::Tensor& s_new, int64_t head_axis) {
  auto a = check_quant(q, s_old, s_new, head_axis);
  const float* so = a.s_old.data_ptr<float>();
  const float* sn = a.s_new.data_ptr<float>();
  for (int64_t i = 0; i < a.s_new.numel(); ++i)
    TORCH_CHECK(std::isfinite(sn[i]) && sn[i] > 0, "hotweights::requantize_fp8: s_new[", i,
                "] = ", sn[i], "; expected a finite scale > 0");
  for (int64_t i = 0; i < a.s_old.numel(); ++i)
    TORCH_CHECK(std::isfinite(so[i]) && so[i] >= 0, "hotweights::requantize_fp8: s_old[", i,
                "] = ", so[i], "; expected a finite scale >= 0");
  const auto* src = static_cast<const uint8_t*>(a.src.data_ptr());
  auto* dst = static_cast<uint8_t*>(a.out.data_ptr());
  if (q.scalar_type() == at::kFloat8_e4m3fn)
    requantize_cpu_typed<c10::Float8_e4m3fn>(src, dst, q.numel(), so, a.old_per_head, sn,
                                             a.new_per_head, a.head_stride, a.heads);
  else
    requantize_cpu_typed<c10::Float8_e5m2>(src, dst, q.numel(), so, a.old_per_head, sn,
                                           a.new_per_head, a.head_stride, a.heads);
  return a.out;
}

// ---------------------------------------------------------------- CUDA bindings

#ifdef HW_WITH_CUDA
void check_cuda(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(t.is_cuda(), "hotweights::", op, ": ", what, " is on ", t.device(),
              " while another argument is on a GPU; expected ", what, " on the GPU");
}

void* stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

at::Tensor remap_kv_heads_cuda(const at::Tensor& kv, const at::Tensor& head_map,
                               int64_t head_axis) {
  check_cuda(kv, "remap_kv_heads", "the cache");
  const c10::cuda::CUDAGuard guard(kv.device());
  const int64_t axis = checked_axis(kv, head_axis, "remap_kv_heads", "head_axis", "the cache");
  const auto map = host_head_map(kv, head_map, axis, "remap_kv_heads", false);
  at::Tensor out = at::empty_like(kv);
  if (kv.numel() == 0) return out;
  const at::Tensor src = dense_like(kv);
  const auto g = head_geometry(src, axis);
  hw::cuda::launch_remap_heads(src.data_ptr(), out.data_ptr(), g.outer, g.heads,
                               g.inner * src.element_size(), map.data(), stream_of(kv));
  return out;
}

void remap_kv_heads_inplace_cuda(const at::Tensor& kv, const at::Tensor& head_map,
                                 int64_t head_axis) {
  check_cuda(kv, "remap_kv_heads_", "the cache");
  const c10::cuda::CUDAGuard guard(kv.device());
  const int64_t axis = checked_axis(kv, head_axis, "remap_kv_heads_", "head_axis", "the cache");
  const auto map = host_head_map(kv, head_map, axis, "remap_kv_heads_", true);
  check_inplace_target(kv, "remap_kv_heads_");
  if (kv.numel() == 0 || kv.size(axis) <= 1) return;
  bool identity = true;
  for (size_t j = 0; j < map.size(); ++j) identity = identity && map[j] == static_cast<int32_t>(j);
  if (identity) return;
  at::Tensor work = dense_like(kv);
  const auto g = head_geometry(work, axis);
  const int64_t row_bytes = g.inner * work.element_size();
  if (!hw::cuda::launch_remap_heads_inplace(work.data_ptr(), g.outer, g.heads, row_bytes,
                                            map.data(), stream_of(kv))) {
    // Too many heads for a shared-memory slab: gather into a temporary and copy back.
    at::Tensor tmp = at::empty_like(work);
    hw::cuda::launch_remap_heads(work.data_ptr(), tmp.data_ptr(), g.outer, g.heads, row_bytes,
                                 map.data(), stream_of(kv));
    work.copy_(tmp);
  }
  if (!work.is_same(kv)) kv.copy_(work);
}

at::Tensor rerotate_rope_cuda(const at::Tensor& k, const at::Tensor& positions,
                              const at::Tensor& old_inv_freq, const at::Tensor& new_inv_freq,
                              double scale, bool neox) {
  check_cuda(k, "rerotate_rope", "k");
  const c10::cuda::CUDAGuard guard(k.device());
  auto a = check_rope(k, positions, old_inv_freq, new_inv_freq);
  at::Tensor out = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  if (a.rows == 0 || a.head_dim == 0) return out;
  const at::Tensor pos = a.positions.to(k.device());
  const at::Tensor w0 = a.old_inv.to(k.device());
  const at::Tensor w1 = a.new_inv.to(k.device());
  const auto dt = k.scalar_type() == at::kFloat  ? hw::cuda::KvFloat::kFloat32
                  : k.scalar_type() == at::kHalf ? hw::cuda::KvFloat::kFloat16
                                                 : hw::cuda::KvFloat::kBFloat16;
  hw::cuda::launch_rerotate_rope(a.k.data_ptr(), out.data_ptr(), dt, a.rows, a.head_dim, a.half,
                                 pos.data_ptr<int64_t>(), w0.data_ptr<float>(),
                                 w1.data_ptr<float>(), static_cast<float>(scale), neox,
                                 stream_of(k));
  return out;
}

at::Tensor requantize_fp8_cuda(const at::Tensor& q, const at::Tensor& s_old,
                               const at::Tensor& s_new, int64_t head_axis) {
  check_cuda(q, "requantize_fp8", "q");
  const c10::cuda::CUDAGuard guard(q.device());
  auto a = check_quant(q, s_old, s_new, head_axis);
  const at::Tensor so = a.s_old.to(q.device());
  const at::Tensor sn = a.s_new.to(q.device());
  hw::cuda::launch_requantize_fp8(
      static_cast<const uint8_t*>(a.src.data_ptr()), static_cast<uint8_t*>(a.out.data_ptr()),
      q.numel(),
      q.scalar_type() == at::kFloat8_e4m3fn ? hw::cuda::Fp8Kind::kE4M3FN
                                            : hw::cuda::Fp8Kind::kE5M2,
      so.data_ptr<float>(), a.old_per_head, sn.data_ptr<float>(), a.new_per_head,
      a.head_stride, a.heads, stream_of(q));
  return a.out;
}
#endif

}  // namespace

}  // namespace ops
}  // namespace hw

// ops.cpp owns TORCH_LIBRARY(hotweights); these schemas join it as a fragment.
TORCH_LIBRARY_FRAGMENT(hotweights, m) {
  m.set_python_module("hotweights.ops");
  // out.select(head_axis, j) = kv.select(head_axis, head_map[j]): a gather over the KV-head
  // axis (duplicates allowed). head_map: int64[kv.size(head_axis)] on kv's device or CPU.
  // The output has kv's strides when kv is dense (Note [KV head remap geometry]).
  m.def("remap_kv_heads(Tensor kv, Tensor head_map, int head_axis) -> Tensor");
  // The same, in place; head_map must be a permutation.
  m.def("remap_kv_heads_(Tensor(a!) kv, Tensor head_map, int head_axis) -> ()");
  // Cached keys rotated by RoPE with old_inv_freq, re-rotated to new_inv_freq at their
  // positions (broadcast over k's leading dims), fp32 math, rotated dims times scale.
  // Returns a contiguous tensor shaped like k.
  m.def(
      "rerotate_rope(Tensor k, Tensor positions, Tensor old_inv_freq, Tensor new_inv_freq, "
      "float scale, bool neox) -> Tensor");
  // q' = fp8(dequant(q) * s_old / s_new) with saturation; per-tensor or per-head scales.
  m.def("requantize_fp8(Tensor q, Tensor s_old, Tensor s_new, int head_axis) -> Tensor");
}

TORCH_LIBRARY_IMPL(hotweights, CPU, m) {
  m.impl("remap_kv_heads", &hw::ops::remap_kv_heads_cpu);
  m.impl("remap_kv_heads_", &hw::ops::remap_kv_heads_inplace_cpu);
  m.impl("rerotate_rope", &hw::ops::rerotate_rope_cpu);
  m.impl("requantize_fp8", &hw::ops::requantize_fp8_cpu);
}

#ifdef HW_WITH_CUDA
TORCH_LIBRARY_IMPL(hotweights, CUDA, m) {
  m.impl("remap_kv_heads", &hw::ops::remap_kv_heads_cuda);
  m.impl("remap_kv_heads_", &hw::ops::remap_kv_heads_inplace_cuda);
  m.impl("rerotate_rope", &hw::ops::rerotate_rope_cuda);
  m.impl("requantize_fp8", &hw::ops::requantize_fp8_cuda);
}
#endif
