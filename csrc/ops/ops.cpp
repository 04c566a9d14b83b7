// SPDX-License-Identifier: Apache-2.0
// The only translation unit that includes torch: dispatcher ops (schemas, CPU and CUDA
// implementations). Each torch-including file costs ~50 s to compile on a 2-core builder, so
// the kernels themselves live in csrc/core (CPU) and csrc/cuda (CUDA, no torch headers).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "core/checksum.h"
#include "core/thread_pool.h"

#ifdef HW_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/cuda_api.h"
#endif

namespace hw {
namespace ops {

namespace {

constexpr size_t kChunk = 4 << 20;

size_t nbytes_of(const at::Tensor& t) { return static_cast<size_t>(t.numel()) * t.element_size(); }

void check_hashable(const at::Tensor& t, const char* op, int64_t index) {
  TORCH_CHECK(t.is_contiguous(), "hotweights::", op, ": tensor ", index,
              " is not contiguous (shape ", t.sizes(), ", strides ", t.strides(),
              "); call .contiguous() first");
}

// Digests of host tensors, split into kChunk pieces claimed by every thread.
void digest_cpu(const std::vector<at::Tensor>& ts, int64_t* out) {
  std::vector<std::pair<size_t, size_t>> pieces;
  for (size_t i = 0; i < ts.size(); ++i) {
    const size_t n = nbytes_of(ts[i]);
    for (size_t off = 0; off < n; off += kChunk) pieces.emplace_back(i, off);
  }
  std::vector<std::atomic<uint64_t>> acc(ts.size());
  for (auto& a : acc) a.store(0);
  parallel_for(&default_pool(), pieces.size(), [&](size_t k) {
    const auto [i, off] = pieces[k];
    const size_t n = nbytes_of(ts[i]);
    const auto* base = static_cast<const char*>(ts[i].data_ptr());
    acc[i].fetch_add(hw_partial(base + off, std::min(kChunk, n - off), off / 8),
                     std::memory_order_relaxed);
  });
  for (size_t i = 0; i < ts.size(); ++i) {
    const uint64_t d = hw_finalize(acc[i].load(), nbytes_of(ts[i]));
    std::memcpy(out + i, &d, sizeof(d));  // the uint64 digest, bit for bit, as int64
  }
}

at::Tensor checksum_batch_cpu(at::TensorList tensors) {
  std::vector<at::Tensor> ts(tensors.begin(), tensors.end());
  for (size_t i = 0; i < ts.size(); ++i) {
    check_hashable(ts[i], "checksum_batch", static_cast<int64_t>(i));
    TORCH_CHECK(ts[i].device().is_cpu(), "hotweights::checksum_batch: tensor ", i, " is on ",
                ts[i].device(), ", expected cpu like tensor 0");
  }
  auto out = at::empty({static_cast<int64_t>(ts.size())}, at::TensorOptions().dtype(at::kLong));
  digest_cpu(ts, out.data_ptr<int64_t>());
  return out;
}

at::Tensor checksum_cpu(const at::Tensor& self) {
  check_hashable(self, "checksum", 0);
  auto out = at::empty({}, at::TensorOptions().dtype(at::kLong));
  digest_cpu({self}, out.data_ptr<int64_t>());
  return out;
}

// One row per tensor: data_ptr, nbytes, dtype code, device code, usable, shape hash. Usable:
// contiguous, not on the meta device, and not a lazy conjugate or negative view (its bytes
// are not its values; see the fallthroughs below).
// Lets Python validate and address 10,000 tensors in one call instead of 10,000 attribute
// reads (reading t.shape from Python costs ~10 us per tensor).
at::Tensor tensor_table(at::TensorList tensors) {
  auto out = at::empty({static_cast<int64_t>(tensors.size()), 6},
                       at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (const auto& t : tensors) {
    const auto dev = t.device();
    uint64_t h = 1469598103934665603ull;  // FNV-1a over (dim, sizes...)
    auto mix = [&](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    mix(static_cast<uint64_t>(t.dim()));
    for (auto d : t.sizes()) mix(static_cast<uint64_t>(d));
    o[0] = reinterpret_cast<int64_t>(t.data_ptr());
    o[1] = static_cast<int64_t>(nbytes_of(t));
    o[2] = static_cast<int64_t>(t.scalar_type());
    o[3] = static_cast<int64_t>(dev.type()) * 65536 + (dev.has_index() ? dev.index() + 1 : 0);
    o[4] = t.is_contiguous() && !t.is_meta() && !t.is_conj() && !t.is_neg() ? 1 : 0;
    std::memcpy(&o[5], &h, sizeof(h));
    o += 6;
  }
  return out;
}

#ifdef HW_WITH_CUDA
at::Tensor checksum_batch_cuda(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "hotweights::checksum_batch: needs at least one tensor");
  const auto dev = tensors[0].device();
  std::vector<uint64_t> ptrs, sizes;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_hashable(tensors[i], "checksum_batch", static_cast<int64_t>(i));
    TORCH_CHECK(tensors[i].device() == dev, "hotweights::checksum_batch: tensor ", i, " is on ",
                tensors[i].device(), ", expected ", dev, " like tensor 0");
    ptrs.push_back(reinterpret_cast<uint64_t>(tensors[i].data_ptr()));
    sizes.push_back(nbytes_of(tensors[i]));
  }
  const c10::cuda::CUDAGuard guard(dev);
  auto out = at::empty({static_cast<int64_t>(tensors.size())},
                       at::TensorOptions().dtype(at::kLong).device(dev));
  hw::cuda::checksum_many(reinterpret_cast<const void* const*>(ptrs.data()), sizes.data(),
                          ptrs.size(), reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()),
                          c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  return out;
}

at::Tensor checksum_cuda(const at::Tensor& self) {
  return checksum_batch_cuda({self}).reshape({});
}
#endif

}  // namespace

}  // namespace ops
}  // namespace hw

TORCH_LIBRARY(hotweights, m) {
  m.set_python_module("hotweights.ops");
  // hw64 digest of a contiguous tensor's bytes, as a 0-d int64 tensor on its device (the
  // uint64 value reinterpreted). Same bytes -> same value on CPU and CUDA.
  m.def("checksum(Tensor self) -> Tensor");
  // hw64 digests of many tensors of one device in one call: int64[len(tensors)].
  m.def("checksum_batch(Tensor[] tensors) -> Tensor");
  // Metadata of many tensors at once (int64[n, 6]: ptr, nbytes, dtype, device, contiguous,
  // shape hash); a host-side helper of the copy facade, registered as CompositeExplicit.
  m.def("tensor_table(Tensor[] tensors) -> Tensor");
}

TORCH_LIBRARY_IMPL(hotweights, CompositeExplicitAutograd, m) {
  m.impl("tensor_table", &hw::ops::tensor_table);
}

// The table must see lazy conjugate / negative views as themselves (marked unusable), not
// the resolved temporaries the Conjugate and Negative fallbacks would make (their addresses
// are freed as soon as the call returns).
TORCH_LIBRARY_IMPL(hotweights, Conjugate, m) {
  m.impl("tensor_table", torch::CppFunction::makeFallthrough());
}
TORCH_LIBRARY_IMPL(hotweights, Negative, m) {
  m.impl("tensor_table", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(hotweights, CPU, m) {
  m.impl("checksum", &hw::ops::checksum_cpu);
  m.impl("checksum_batch", &hw::ops::checksum_batch_cpu);
}

#ifdef HW_WITH_CUDA
TORCH_LIBRARY_IMPL(hotweights, CUDA, m) {
  m.impl("checksum", &hw::ops::checksum_cuda);
  m.impl("checksum_batch", &hw::ops::checksum_batch_cuda);
}
#endif
