// SPDX-License-Identifier: Apache-2.0
// CUDA IPC: slot rings exported once with per-slot interprocess events, and export of
// arbitrary device memory as base allocation + offset (Note [CUDA IPC lifetime]).
#include <cuda.h>  // driver types only; symbols come from cudaGetDriverEntryPointByVersion
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <cstring>
#include <random>

#include "core/checksum.h"
#include "core/shm.h"
#include "cuda/check.h"
#include "cuda/cuda_api.h"

namespace hw {
namespace cuda {

namespace {

constexpr char kRingMagic[8] = {'H', 'W', 'C', 'U', 'R', 'G', '1', '\0'};
constexpr char kMemMagic[8] = {'H', 'W', 'C', 'U', 'M', 'H', '1', '\0'};
constexpr uint32_t kVersion = 1;
constexpr uint32_t kKindCudaRing = 2;
constexpr uint32_t kKindCudaMem = 3;

struct RingWire {
  char magic[8];
  uint32_t version;
  uint32_t kind;
  uint64_t boot_id;
  int32_t pid;
  int32_t slots;
  uint64_t slot_bytes;
  unsigned char uuid[16];
  unsigned char id[16];
  cudaIpcMemHandle_t mem;
};
static_assert(sizeof(cudaIpcMemHandle_t) == 64, "unexpected cudaIpcMemHandle_t size");
static_assert(sizeof(cudaIpcEventHandle_t) == 64, "unexpected cudaIpcEventHandle_t size");

struct MemWire {
  char magic[8];
  uint32_t version;
  uint32_t kind;
  uint64_t boot_id;
  int32_t pid;
  int32_t pad;
  unsigned char uuid[16];
  uint64_t offset;
  uint64_t size;
  cudaIpcMemHandle_t mem;
  uint64_t crc;
};

std::string hex(const unsigned char* b, size_t n) {
  static const char* h = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    s += h[b[i] >> 4];
    s += h[b[i] & 15];
  }
  return s;
}

template <typename Fn>
Fn driver_fn(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status;
  HW_CUDA_CHECK(cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &status));
  HW_CHECK(status == cudaDriverEntryPointSuccess && fn, "CUDA driver symbol ", name,
           " is not available");
  return reinterpret_cast<Fn>(fn);
}

void check_common(const char* what, const char* magic, const char* want_magic, uint32_t version,
                  uint32_t kind, uint32_t want_kind, uint64_t boot_id) {
  HW_CHECK_ARG(std::memcmp(magic, want_magic, 8) == 0, what, ": bad magic (not a hotweights ",
               what, ")");
  HW_CHECK_ARG(version == kVersion, what, ": version ", version, ", this build reads ", kVersion);
  HW_CHECK_ARG(kind == want_kind, what, ": kind ", kind, ", expected ", want_kind);
  HW_CHECK_ARG(boot_id == boot_id_hash(), what,
               ": foreign handle from another machine (boot id differs); CUDA IPC only works"
               " within one host");
}

int resolve_device(const unsigned char* uuid) {
  const int dev = device_from_uuid(std::string(reinterpret_cast<const char*>(uuid), 16));
  HW_CHECK(dev >= 0, "CUDA IPC handle: the exporting GPU (uuid ", hex(uuid, 16),
           ") is not visible in this process; check CUDA_VISIBLE_DEVICES");
  return dev;
}

}  // namespace

CudaRing::CudaRing(int device, size_t slot_bytes, int slots)
    : device_(device), slot_bytes_(slot_bytes), slots_(slots) {
  HW_CHECK_ARG(slots >= 1 && slots <= 1024, "CudaRing: slots=", slots, ", expected 1..1024");
  HW_CHECK_ARG(slot_bytes >= 256 && slot_bytes % 256 == 0, "CudaRing: slot_bytes=", slot_bytes,
               ", expected a positive multiple of 256");
  DeviceGuard g(device);
  HW_CUDA_CHECK(cudaMalloc(&base_, slot_bytes * slots));
  try {
    RingWire w{};
    std::memcpy(w.magic, kRingMagic, 8);
    w.version = kVersion;
    w.kind = kKindCudaRing;
    w.boot_id = boot_id_hash();
    w.pid = static_cast<int32_t>(getpid());
    w.slots = slots;
    w.slot_bytes = slot_bytes;
    const std::string uuid = device_uuid(device);
    std::memcpy(w.uuid, uuid.data(), 16);
    std::random_device rd;
    for (auto& b : id_) b = static_cast<unsigned char>(rd());
    std::memcpy(w.id, id_, 16);
    HW_CUDA_CHECK(cudaIpcGetMemHandle(&w.mem, base_));
    handle_.assign(reinterpret_cast<const char*>(&w), sizeof(w));
    for (int i = 0; i < slots; ++i) {
      cudaEvent_t e;
      HW_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventInterprocess));
      events_.push_back(e);
      cudaIpcEventHandle_t eh;
      HW_CUDA_CHECK(cudaIpcGetEventHandle(&eh, e));
      handle_.append(reinterpret_cast<const char*>(&eh), sizeof(eh));
    }
    const uint64_t crc = hw_digest(handle_.data(), handle_.size());
    handle_.append(reinterpret_cast<const char*>(&crc), sizeof(crc));
  } catch (...) {
    // A constructor that throws runs no destructor: release what was made so far.
    for (void* e : events_) cudaEventDestroy(static_cast<cudaEvent_t>(e));
    cudaFree(base_);
    throw;
  }
}

CudaRing::~CudaRing() {
  QuietDeviceGuard g(device_);
  for (void* e : events_) cudaEventDestroy(static_cast<cudaEvent_t>(e));
  // CUDA documents a cudaFree before every importer's cudaIpcCloseMemHandle as undefined
  // behaviour; in practice the driver keeps the physical allocation while a mapping is open.
  // Subscribers close their mapping when they see the publisher gone or its ring replaced
  // (replicate.py, _drop_dead_rings), but nothing here waits for them: known gap, see
  // docs/replication.md (CUDA rings).
  if (base_) cudaFree(base_);
}

std::string CudaRing::id_hex() const { return hex(id_, 16); }

void CudaRing::record(int slot, void* stream) {
  HW_CHECK_ARG(slot >= 0 && slot < slots_, "CudaRing.record: slot=", slot, ", expected 0..",
               slots_ - 1);
  DeviceGuard g(device_);
  HW_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(events_[slot]),
                                static_cast<cudaStream_t>(stream)));
}

CudaRingImport::CudaRingImport(const std::string& handle, int local_device)
    : local_device_(local_device) {
  HW_CHECK_ARG(handle.size() >= sizeof(RingWire) + 8,
               "CUDA ring handle: ", handle.size(), " bytes, too short (truncated?)");
  RingWire w;
  std::memcpy(&w, handle.data(), sizeof(w));
  check_common("CUDA ring handle", w.magic, kRingMagic, w.version, w.kind, kKindCudaRing,
               w.boot_id);
  HW_CHECK_ARG(w.slots >= 1 && w.slots <= 1024, "CUDA ring handle: slots=", w.slots);
  const size_t want = sizeof(RingWire) + static_cast<size_t>(w.slots) * 64 + 8;
  HW_CHECK_ARG(handle.size() == want, "CUDA ring handle: ", handle.size(), " bytes, expected ",
               want, " for ", w.slots, " slots (truncated?)");
  uint64_t crc;
  std::memcpy(&crc, handle.data() + want - 8, 8);
  HW_CHECK_ARG(crc == hw_digest(handle.data(), want - 8),
               "CUDA ring handle: checksum mismatch (corrupted handle)");
  HW_CHECK(static_cast<int32_t>(getpid()) != w.pid,
           "CUDA ring handle: cannot import a ring in the process that exported it");
  ring_device_ = resolve_device(w.uuid);
  slots_ = w.slots;
  slot_bytes_ = w.slot_bytes;
  std::memcpy(id_, w.id, 16);
  DeviceGuard g(local_device);
  cudaError_t e = cudaIpcOpenMemHandle(&base_, w.mem, cudaIpcMemLazyEnablePeerAccess);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(str("CUDA ring handle: cudaIpcOpenMemHandle failed: ",
                                 cudaGetErrorName(e), " (", cudaGetErrorString(e),
                                 "); the exporter (pid ", w.pid,
                                 ") may have exited, or the GPUs cannot reach each other"));
  }
  for (int i = 0; i < slots_; ++i) {
    cudaIpcEventHandle_t eh;
    std::memcpy(&eh, handle.data() + sizeof(RingWire) + 64 * i, 64);
    cudaEvent_t ev;
    cudaError_t ee = cudaIpcOpenEventHandle(&ev, eh);
    if (ee != cudaSuccess) {
      for (void* x : events_) cudaEventDestroy(static_cast<cudaEvent_t>(x));
      cudaIpcCloseMemHandle(base_);
      HW_CUDA_CHECK(ee);
    }
    events_.push_back(ev);
  }
}

CudaRingImport::~CudaRingImport() {
  QuietDeviceGuard g(local_device_);
  for (void* e : events_) cudaEventDestroy(static_cast<cudaEvent_t>(e));
  if (base_) cudaIpcCloseMemHandle(base_);  // exactly once, here
}

std::string CudaRingImport::id_hex() const { return hex(id_, 16); }

void CudaRingImport::wait(int slot, void* stream) {
  HW_CHECK_ARG(slot >= 0 && slot < slots_, "CudaRingImport.wait: slot=", slot,
               ", expected 0..", slots_ - 1);
  DeviceGuard g(local_device_);
  HW_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream),
                                    static_cast<cudaEvent_t>(events_[slot]), 0));
}

std::string export_memory(uintptr_t ptr, size_t size) {
  using GetRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  using Retain = CUresult (*)(CUmemGenericAllocationHandle*, void*);
  using Release = CUresult (*)(CUmemGenericAllocationHandle);
  cudaPointerAttributes attr;
  HW_CUDA_CHECK(cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(ptr)));
  HW_CHECK_ARG(attr.type == cudaMemoryTypeDevice, "export_memory: pointer 0x",
               Hex{ptr}, " is not device memory");
  DeviceGuard g(attr.device);
  // VMM allocations (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, cuMemCreate) cannot go
  // through legacy IPC: detect them up front and say what to do.
  CUmemGenericAllocationHandle vmm;
  if (driver_fn<Retain>("cuMemRetainAllocationHandle")(&vmm, reinterpret_cast<void*>(ptr)) ==
      CUDA_SUCCESS) {
    driver_fn<Release>("cuMemRelease")(vmm);
    throw std::runtime_error(
        "export_memory: this memory comes from a VMM allocation (PyTorch's expandable_segments"
        " allocator or cuMemCreate), which legacy CUDA IPC cannot export. Stage it through a"
        " hotweights slot ring (allocated with cudaMalloc, always exportable) or unset"
        " expandable_segments in PYTORCH_CUDA_ALLOC_CONF");
  }
  CUdeviceptr base = 0;
  size_t alloc = 0;
  HW_CHECK(driver_fn<GetRange>("cuMemGetAddressRange")(&base, &alloc, ptr) == CUDA_SUCCESS,
           "export_memory: cuMemGetAddressRange failed for 0x",
           Hex{ptr});
  HW_CHECK_ARG(ptr + size <= base + alloc, "export_memory: [ptr, ptr + ", size,
               ") runs past the end of its allocation (", alloc, " bytes)");
  MemWire w{};
  std::memcpy(w.magic, kMemMagic, 8);
  w.version = kVersion;
  w.kind = kKindCudaMem;
  w.boot_id = boot_id_hash();
  w.pid = static_cast<int32_t>(getpid());
  const std::string uuid = device_uuid(attr.device);
  std::memcpy(w.uuid, uuid.data(), 16);
  w.offset = ptr - base;
  w.size = size;
  HW_CUDA_CHECK(cudaIpcGetMemHandle(&w.mem, reinterpret_cast<void*>(base)));
  w.crc = hw_digest(&w, offsetof(MemWire, crc));
  return std::string(reinterpret_cast<const char*>(&w), sizeof(w));
}

CudaMemImport::CudaMemImport(const std::string& handle, int local_device)
    : local_device_(local_device) {
  HW_CHECK_ARG(handle.size() == sizeof(MemWire), "CUDA memory handle: ", handle.size(),
               " bytes, expected ", sizeof(MemWire), " (truncated?)");
  MemWire w;
  std::memcpy(&w, handle.data(), sizeof(w));
  check_common("CUDA memory handle", w.magic, kMemMagic, w.version, w.kind, kKindCudaMem,
               w.boot_id);
  HW_CHECK_ARG(w.crc == hw_digest(&w, offsetof(MemWire, crc)),
               "CUDA memory handle: checksum mismatch (corrupted handle)");
  resolve_device(w.uuid);
  DeviceGuard g(local_device);
  HW_CUDA_CHECK(cudaIpcOpenMemHandle(&base_, w.mem, cudaIpcMemLazyEnablePeerAccess));
  offset_ = w.offset;
  size_ = w.size;
}

CudaMemImport::~CudaMemImport() {
  QuietDeviceGuard g(local_device_);
  if (base_) cudaIpcCloseMemHandle(base_);
}

}  // namespace cuda
}  // namespace hw
