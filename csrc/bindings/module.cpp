// SPDX-License-Identifier: Apache-2.0
// pybind11 module hotweights._C: the stateful engines (copy engines, shared-memory regions,
// CUDA rings, window controller) and raw-pointer helpers. This file does not include torch,
// so it compiles in seconds; the Python facade (hotweights/ops.py) turns tensors into
// pointers and checks them. Tensor ops live in csrc/ops/ops.cpp (the dispatcher).
#ifndef HW_WITH_CUDA
#define HW_WITH_CUDA 0
#endif

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstring>
#include <limits>

#include "core/checksum.h"
#include "core/common.h"
#include "core/copy_engine.h"
#include "core/doorbell.h"
#include "core/pack.h"
#include "core/shm.h"
#include "core/thread_pool.h"
#include "core/window.h"
#include "generated/build_info.h"
#if HW_WITH_CUDA
#include "cuda/cuda_api.h"
#endif

namespace py = pybind11;

namespace {

using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;
using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

constexpr size_t kDigestChunk = 4 << 20;
constexpr size_t kManyChunk = 1 << 20;  // hw64_digest_many: pieces of a few MiB still spread

// The word of `width` bytes at `off` in a region, checked: in bounds and naturally aligned.
void* region_word(const hw::ShmRegion& r, size_t off, size_t width) {
  HW_CHECK_ARG(off % width == 0 && off <= r.size() && r.size() - off >= width, "offset ", off,
               ": expected a multiple of ", width, " with ", width, " bytes inside the region of ",
               r.size(), " bytes");
  return static_cast<char*>(r.data()) + off;
}

// Multi-threaded hw64 digest of one host buffer (Note [hw64 checksum]: any split adds up).
uint64_t digest_host(uintptr_t ptr, size_t n) {
  const size_t chunks = (n + kDigestChunk - 1) / kDigestChunk;
  if (chunks <= 1) return hw::hw_digest(reinterpret_cast<const void*>(ptr), n);
  std::atomic<uint64_t> acc{0};
  hw::parallel_for(&hw::default_pool(), chunks, [&](size_t c) {
    const size_t off = c * kDigestChunk;
    const size_t len = std::min(kDigestChunk, n - off);
    acc.fetch_add(hw::hw_partial(reinterpret_cast<const char*>(ptr) + off, len, off / 8),
                  std::memory_order_relaxed);
  });
  return hw::hw_finalize(acc.load(), n);
}

// Digests of many host buffers: pieces of at most kManyChunk, claimed by all threads.
py::array_t<uint64_t> digest_host_many(const U64Array& ptrs, const U64Array& sizes) {
  HW_CHECK_ARG(ptrs.ndim() == 1 && sizes.ndim() == 1 && ptrs.size() == sizes.size(),
               "hw64_digest_many: ptrs and sizes must be 1-D arrays of equal length, got ",
               ptrs.size(), " and ", sizes.size());
  const size_t n = static_cast<size_t>(ptrs.size());
  const uint64_t* p = ptrs.data();
  const uint64_t* s = sizes.data();
  std::vector<std::pair<size_t, size_t>> pieces;  // (buffer, offset)
  for (size_t i = 0; i < n; ++i) {
    if (s[i] == 0) continue;
    for (size_t off = 0; off < s[i]; off += kManyChunk) pieces.emplace_back(i, off);
  }
  std::unique_ptr<std::atomic<uint64_t>[]> acc(new std::atomic<uint64_t>[n ? n : 1]);
  for (size_t i = 0; i < n; ++i) acc[i].store(0);
  {
    py::gil_scoped_release nogil;
    // Tasks of consecutive pieces, closed at kManyChunk bytes or 64 pieces: small pieces
    // share a task (the shared counter stays cheap), a few large ones still spread over the
    // threads (10 MiB in three tensors was one task, one thread, before).
    constexpr size_t kGroup = 64;
    std::vector<size_t> starts{0};
    size_t bytes = 0;
    for (size_t k = 0; k < pieces.size(); ++k) {
      const auto [i, off] = pieces[k];
      bytes += std::min<size_t>(kManyChunk, s[i] - off);
      if (bytes >= kManyChunk || k + 1 - starts.back() >= kGroup) {
        starts.push_back(k + 1);
        bytes = 0;
      }
    }
    if (starts.back() != pieces.size()) starts.push_back(pieces.size());
    const size_t groups = starts.size() - 1;
    hw::parallel_for(&hw::default_pool(), groups, [&](size_t g) {
      for (size_t k = starts[g]; k < starts[g + 1]; ++k) {
        const auto [i, off] = pieces[k];
        const size_t len = std::min<size_t>(kManyChunk, s[i] - off);
        acc[i].fetch_add(hw::hw_partial(reinterpret_cast<const char*>(p[i]) + off, len, off / 8),
                         std::memory_order_relaxed);
      }
    });
  }
  py::array_t<uint64_t> out(static_cast<py::ssize_t>(n));
  auto* o = out.mutable_data();
  for (size_t i = 0; i < n; ++i) o[i] = hw::hw_finalize(acc[i].load(), s[i]);
  return out;
}

// Builds a copy batch from parallel arrays; hash arrays may be None.
template <typename Item>
std::vector<Item> make_items(const U64Array& dst, const U64Array& src, const U64Array& sizes,
                             const py::object& hash_idx, const py::object& hash_base) {
  const auto n = dst.size();
  HW_CHECK_ARG(dst.ndim() == 1 && src.size() == n && sizes.size() == n,
               "copy batch: dst, src and sizes must be 1-D arrays of equal length, got ", n, ", ",
               src.size(), ", ", sizes.size());
  std::vector<int64_t> hidx(n, -1);
  std::vector<uint64_t> hbase(n, 0);
  if (!hash_idx.is_none()) {
    auto a = hash_idx.cast<I64Array>();
    auto b = hash_base.cast<U64Array>();
    HW_CHECK_ARG(a.size() == n && b.size() == n,
                 "copy batch: hash_idx and hash_base must have one entry per item");
    std::memcpy(hidx.data(), a.data(), n * sizeof(int64_t));
    std::memcpy(hbase.data(), b.data(), n * sizeof(uint64_t));
  }
  std::vector<Item> items(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    Item& it = items[i];
    it.dst = reinterpret_cast<void*>(dst.data()[i]);
    it.src = reinterpret_cast<const void*>(src.data()[i]);
    it.nbytes = sizes.data()[i];
    it.hash_idx = hidx[i];
    it.hash_word_base = hbase[i];
  }
  return items;
}

py::dict build_info() {
  py::dict d;
  d["version"] = HW_VERSION;
  d["torch_version"] = HW_TORCH_VERSION;
  d["torch_cuda_version"] = HW_TORCH_CUDA_VERSION;
  d["nvcc_version"] = HW_NVCC_VERSION;
  d["cuda_arch_list"] = HW_CUDA_ARCH_LIST;
  d["cuda_decision"] = HW_CUDA_DECISION;
  d["git_sha"] = HW_GIT_SHA;
  d["build_time"] = HW_BUILD_TIME;
  d["compiler"] = HW_COMPILER;
  d["with_cuda"] = static_cast<bool>(HW_WITH_CUDA);
  return d;
}

py::dict estimates_dict(const hw::WindowEstimates& e) {
  py::dict d;
  d["t_min_s"] = e.t_min_s;
  d["t_ewma_s"] = e.t_ewma_s;
  d["t_dev_s"] = e.t_dev_s;
  d["bandwidth_Bps"] = e.bandwidth_Bps;
  d["queue_buckets"] = e.queue_buckets;
  d["congestion"] = e.congestion;
  d["rounds"] = e.rounds;
  d["ups"] = e.ups;
  d["downs"] = e.downs;
  d["probes"] = e.probes;
  d["completions"] = e.completions;
  return d;
}

template <typename T>
py::array_t<int64_t> to_array(const std::vector<T>& v) {
  py::array_t<int64_t> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(int64_t));
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hotweights compiled core (see hotweights/ops.py for the typed facade)";
  m.attr("with_cuda") = static_cast<bool>(HW_WITH_CUDA);
  m.def("build_info", &build_info, "What this _C was built with.");

  // --- checksum (Note [hw64 checksum]) ---
  m.def("hw64_partial", [](uintptr_t p, size_t n, uint64_t base) {
    py::gil_scoped_release nogil;
    return hw::hw_partial(reinterpret_cast<const void*>(p), n, base);
  }, py::arg("ptr"), py::arg("nbytes"), py::arg("word_base") = 0);
  m.def("hw64_finalize", &hw::hw_finalize, py::arg("sum"), py::arg("nbytes"));
  m.def("hw64_digest", [](uintptr_t p, size_t n) {
    py::gil_scoped_release nogil;
    return digest_host(p, n);
  }, py::arg("ptr"), py::arg("nbytes"), "Multi-threaded hw64 digest of host memory.");
  m.def("hw64_bytes", [](py::bytes b) {
    std::string s = b;
    return hw::hw_digest(s.data(), s.size());
  }, "hw64 digest of a bytes object.");
  m.def("hw64_digest_many", &digest_host_many, py::arg("ptrs"), py::arg("sizes"));

  // --- CPU copy engine ---
  py::class_<hw::Completion, std::shared_ptr<hw::Completion>>(m, "Completion")
      .def("wait", [](hw::Completion& c, double timeout) {
        py::gil_scoped_release nogil;
        return c.wait(timeout);
      }, py::arg("timeout") = -1.0, "Waits up to timeout seconds (<0: forever); True if done.")
      .def("done", &hw::Completion::done)
      .def("rethrow", &hw::Completion::rethrow)
      .def("hashes", &hw::Completion::hashes);
  py::class_<hw::CpuCopyEngine, std::shared_ptr<hw::CpuCopyEngine>>(m, "CpuCopyEngine")
      .def(py::init<int, size_t>(), py::arg("threads"), py::arg("chunk_bytes"))
      .def_property_readonly("threads", &hw::CpuCopyEngine::threads)
      .def_property_readonly("chunk_bytes", &hw::CpuCopyEngine::chunk_bytes)
      .def("submit", [](hw::CpuCopyEngine& e, const U64Array& dst, const U64Array& src,
                        const U64Array& sizes, const py::object& hash_idx,
                        const py::object& hash_base, size_t num_hashes) {
        auto items = make_items<hw::CopyItem>(dst, src, sizes, hash_idx, hash_base);
        py::gil_scoped_release nogil;
        return e.submit(std::move(items), num_hashes);
      }, py::arg("dst"), py::arg("src"), py::arg("sizes"), py::arg("hash_idx") = py::none(),
         py::arg("hash_base") = py::none(), py::arg("num_hashes") = 0);
  m.def("check_no_overlap", [](const U64Array& dst, const U64Array& src, const U64Array& sizes) {
    hw::check_no_overlap(make_items<hw::CopyItem>(dst, src, sizes, py::none(), py::none()));
  });

  // --- shared memory (Note [Shared-memory lifetime]) ---
  py::class_<hw::ShmRegion>(m, "ShmRegion", py::buffer_protocol())
      .def_static("create", &hw::ShmRegion::create, py::arg("size"), py::arg("name") = "region")
      .def_static("import_handle", [](py::bytes h) { return hw::ShmRegion::import(h); })
      .def_property_readonly("ptr", [](const hw::ShmRegion& r) {
        return reinterpret_cast<uintptr_t>(r.data());
      })
      .def_property_readonly("size", &hw::ShmRegion::size)
      .def_property_readonly("owner", &hw::ShmRegion::owner)
      .def_property_readonly("name", &hw::ShmRegion::name)
      .def_property_readonly("id", &hw::ShmRegion::id_hex)
      .def_property_readonly("generation", &hw::ShmRegion::generation)
      .def("stale", &hw::ShmRegion::stale)
      .def("bump_generation", &hw::ShmRegion::bump_generation)
      .def("handle", [](const hw::ShmRegion& r) { return py::bytes(r.handle()); })
      // cross-process atomics on the region's words (Note [Doorbell], hotweights/doorbell.py)
      .def("load64", [](const hw::ShmRegion& r, size_t off) {
        return hw::atomic_load64(region_word(r, off, 8));
      }, py::arg("offset"))
      .def("store64", [](hw::ShmRegion& r, size_t off, uint64_t v) {
        hw::atomic_store64(region_word(r, off, 8), v);
      }, py::arg("offset"), py::arg("value"))
      .def("add64", [](hw::ShmRegion& r, size_t off, uint64_t v) {
        return hw::atomic_add64(region_word(r, off, 8), v);
      }, py::arg("offset"), py::arg("value"))
      .def("cas64", [](hw::ShmRegion& r, size_t off, uint64_t expected, uint64_t desired) {
        return hw::atomic_cas64(region_word(r, off, 8), expected, desired);
      }, py::arg("offset"), py::arg("expected"), py::arg("desired"))
      .def("load32", [](const hw::ShmRegion& r, size_t off) {
        return hw::atomic_load32(region_word(r, off, 4));
      }, py::arg("offset"))
      .def("add32", [](hw::ShmRegion& r, size_t off, uint32_t v) {
        return hw::atomic_add32(region_word(r, off, 4), v);
      }, py::arg("offset"), py::arg("value"))
      .def("wait32", [](hw::ShmRegion& r, size_t off, uint32_t expected, double timeout_s,
                        double spin_s) {
        void* p = region_word(r, off, 4);
        py::gil_scoped_release nogil;
        return hw::futex_wait32(p, expected, timeout_s, spin_s);
      }, py::arg("offset"), py::arg("expected"), py::arg("timeout_s"), py::arg("spin_s") = 0.0)
      .def("wake32", [](hw::ShmRegion& r, size_t off, int n) {
        return hw::futex_wake32(region_word(r, off, 4), n);
      }, py::arg("offset"), py::arg("n") = std::numeric_limits<int>::max())
      .def_buffer([](hw::ShmRegion& r) {
        return py::buffer_info(r.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(r.size())}, {1});
      });
  m.attr("SHM_HANDLE_BYTES") = hw::kShmHandleBytes;

  // --- window controller (Note [Window controller]) ---
  py::class_<hw::WindowController>(m, "WindowController")
      .def(py::init([](int base, int64_t byte_cap, bool adapt, int min_window, int max_window,
                       double target_s, double alpha, double beta, int history_rounds,
                       int probe_every_rounds, double dev_allowance) {
             hw::WindowConfig c;
             c.base = base;
             c.byte_cap = byte_cap;
             c.adapt = adapt;
             c.min_window = min_window;
             c.max_window = max_window;
             c.target_s = target_s;
             c.alpha = alpha;
             c.beta = beta;
             c.history_rounds = history_rounds;
             c.probe_every_rounds = probe_every_rounds;
             c.dev_allowance = dev_allowance;
             return new hw::WindowController(c);
           }),
           py::arg("base") = 4, py::arg("byte_cap") = 0, py::arg("adapt") = true,
           py::arg("min_window") = 1, py::arg("max_window") = 16, py::arg("target_s") = 0.25,
           py::arg("alpha") = 0.5, py::arg("beta") = 1.5, py::arg("history_rounds") = 10,
           py::arg("probe_every_rounds") = 30, py::arg("dev_allowance") = 1.0)
      .def("can_admit", &hw::WindowController::can_admit, py::arg("inflight_buckets"),
           py::arg("inflight_bytes"), py::arg("next_bytes"))
      .def("on_complete", &hw::WindowController::on_complete, py::arg("now_s"),
           py::arg("service_s"), py::arg("bytes"))
      .def("on_start", &hw::WindowController::on_start, py::arg("now_s"))
      .def_property_readonly("current", &hw::WindowController::current)
      .def_property_readonly("recommended", &hw::WindowController::recommended)
      .def_property_readonly("target", &hw::WindowController::target)
      .def_property_readonly("probing", &hw::WindowController::probing)
      .def("estimates", [](const hw::WindowController& w) { return estimates_dict(w.estimates()); });

  // --- bucket packing (Note [Bucket packing]) ---
  m.def("pack_buckets", [](const I64Array& nbytes, const py::object& group, int64_t bucket_bytes,
                           int64_t align) {
    const int64_t* g = nullptr;
    I64Array garr;
    if (!group.is_none()) {
      garr = group.cast<I64Array>();
      HW_CHECK_ARG(garr.size() == nbytes.size(), "pack_buckets: group has ", garr.size(),
                   " entries, nbytes has ", nbytes.size());
      g = garr.data();
    }
    hw::PackResult r;
    {
      py::gil_scoped_release nogil;
      r = hw::pack_buckets(nbytes.data(), g, static_cast<size_t>(nbytes.size()), bucket_bytes,
                           align);
    }
    py::dict d;
    d["tensor"] = to_array(r.tensor);
    d["tensor_offset"] = to_array(r.tensor_offset);
    d["length"] = to_array(r.length);
    d["bucket"] = to_array(r.bucket);
    d["slot_offset"] = to_array(r.slot_offset);
    d["bucket_used"] = to_array(r.bucket_used);
    d["bucket_group"] = to_array(r.bucket_group);
    return d;
  }, py::arg("nbytes"), py::arg("group"), py::arg("bucket_bytes"), py::arg("align") = 256);

#if HW_WITH_CUDA
  namespace hc = hw::cuda;
  auto c = m.def_submodule("cuda", "CUDA half of _C (present in CUDA builds only)");
  c.def("runtime_version", &hc::runtime_version);
  c.def("driver_version", &hc::driver_version);
  c.def("device_count", [] {
    std::string err;
    int n = hc::device_count(&err);
    return py::make_tuple(n, err);
  }, "(count, error text); count is 0 with the reason when no usable device exists.");
  c.def("devices", [] {
    py::list out;
    for (const auto& d : hc::devices()) {
      py::dict x;
      x["index"] = d.index;
      x["name"] = d.name;
      x["uuid"] = d.uuid;
      x["total_memory"] = d.total_memory;
      x["capability"] = py::make_tuple(d.major, d.minor);
      x["pci"] = py::make_tuple(d.pci_domain, d.pci_bus, d.pci_device);
      out.append(x);
    }
    return out;
  });
  c.def("peer_access_matrix", &hc::peer_access_matrix);
  c.def("enable_peer_access", &hc::enable_peer_access, py::arg("device"), py::arg("peer"));
  c.def("checksum_many", [](const U64Array& ptrs, const U64Array& sizes, uintptr_t out,
                            uintptr_t stream) {
    HW_CHECK_ARG(ptrs.size() == sizes.size(), "checksum_many: ptrs and sizes differ in length");
    hc::checksum_many(reinterpret_cast<const void* const*>(ptrs.data()), sizes.data(),
                      static_cast<size_t>(ptrs.size()), reinterpret_cast<uint64_t*>(out),
                      reinterpret_cast<void*>(stream));
  });
  py::class_<hc::CudaBatch, std::shared_ptr<hc::CudaBatch>>(c, "CudaBatch")
      .def("wait", [](hc::CudaBatch& b, double timeout) {
        py::gil_scoped_release nogil;
        return b.wait(timeout);
      }, py::arg("timeout") = -1.0)
      .def("done", &hc::CudaBatch::done)
      .def("rethrow", [](hc::CudaBatch&) {})
      .def("hashes", [](hc::CudaBatch& b) {
        py::gil_scoped_release nogil;
        return b.hashes();
      });
  py::class_<hc::CudaCopyEngine, std::shared_ptr<hc::CudaCopyEngine>>(c, "CudaCopyEngine")
      .def(py::init<int, int, size_t, int64_t>(), py::arg("device"), py::arg("streams"),
           py::arg("chunk_bytes"), py::arg("spin_ns") = 0)
      .def_property_readonly("device", &hc::CudaCopyEngine::device)
      .def_property_readonly("streams", &hc::CudaCopyEngine::streams)
      .def("submit", [](hc::CudaCopyEngine& e, const U64Array& dst, const U64Array& src,
                        const U64Array& sizes, const py::object& hash_idx,
                        const py::object& hash_base, size_t num_hashes, uintptr_t stream,
                        bool kernel_ok) {
        auto items = make_items<hc::CopyDesc>(dst, src, sizes, hash_idx, hash_base);
        py::gil_scoped_release nogil;
        return e.submit(items, num_hashes, reinterpret_cast<void*>(stream), kernel_ok);
      }, py::arg("dst"), py::arg("src"), py::arg("sizes"), py::arg("hash_idx"),
         py::arg("hash_base"), py::arg("num_hashes"), py::arg("stream"), py::arg("kernel_ok"));
  py::class_<hc::CudaRing>(c, "CudaRing")
      .def(py::init<int, size_t, int>(), py::arg("device"), py::arg("slot_bytes"),
           py::arg("slots"))
      .def_property_readonly("ptr", &hc::CudaRing::ptr)
      .def_property_readonly("slot_bytes", &hc::CudaRing::slot_bytes)
      .def_property_readonly("slots", &hc::CudaRing::slots)
      .def_property_readonly("device", &hc::CudaRing::device)
      .def_property_readonly("id", &hc::CudaRing::id_hex)
      .def("handle", [](const hc::CudaRing& r) { return py::bytes(r.handle()); })
      .def("record", [](hc::CudaRing& r, int slot, uintptr_t stream) {
        r.record(slot, reinterpret_cast<void*>(stream));
      });
  py::class_<hc::CudaRingImport>(c, "CudaRingImport")
      .def(py::init([](py::bytes h, int dev) { return new hc::CudaRingImport(h, dev); }),
           py::arg("handle"), py::arg("local_device"))
      .def_property_readonly("ptr", &hc::CudaRingImport::ptr)
      .def_property_readonly("slot_bytes", &hc::CudaRingImport::slot_bytes)
      .def_property_readonly("slots", &hc::CudaRingImport::slots)
      .def_property_readonly("ring_device", &hc::CudaRingImport::ring_device)
      .def_property_readonly("local_device", &hc::CudaRingImport::local_device)
      .def_property_readonly("id", &hc::CudaRingImport::id_hex)
      .def("wait", [](hc::CudaRingImport& r, int slot, uintptr_t stream) {
        r.wait(slot, reinterpret_cast<void*>(stream));
      });
  c.def("export_memory", [](uintptr_t ptr, size_t size) {
    return py::bytes(hc::export_memory(ptr, size));
  });
  py::class_<hc::CudaMemImport>(c, "CudaMemImport")
      .def(py::init([](py::bytes h, int dev) { return new hc::CudaMemImport(h, dev); }),
           py::arg("handle"), py::arg("local_device"))
      .def_property_readonly("ptr", &hc::CudaMemImport::ptr)
      .def_property_readonly("size", &hc::CudaMemImport::size);
#endif
}
