// SPDX-License-Identifier: Apache-2.0
// Interface of the CUDA half of _C, free of torch and CUDA headers so that the bindings and
// the op file can include it. Streams travel as void* (a cudaStream_t), pointers as raw
// device addresses. Everything here throws std::runtime_error on a CUDA error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace hw {
namespace cuda {

struct DeviceInfo {
  int index;
  std::string name;
  std::string uuid;  // "GPU-xxxxxxxx-xxxx-..."
  size_t total_memory;
  int major, minor;
  int pci_bus, pci_device, pci_domain;
};

int runtime_version();
/// Driver version, or 0 when no driver is installed.
int driver_version();
/// Device count; on failure 0 and *error set to the CUDA error text.
int device_count(std::string* error);
std::vector<DeviceInfo> devices();
/// can[i][j]: device i can access device j's memory directly (cudaDeviceCanAccessPeer).
std::vector<std::vector<int>> peer_access_matrix();
/// Lets kernels on `device` read `peer`'s memory (cudaDeviceEnablePeerAccess, once per pair).
/// False when the pair cannot do peer access (copies then go through cudaMemcpyAsync).
bool enable_peer_access(int device, int peer);
/// 16 raw UUID bytes of a device, and the reverse lookup (-1 when not visible).
std::string device_uuid(int device);
int device_from_uuid(const std::string& uuid16);

/// One copy of a batch: see hw::CopyItem (core/copy_engine.h) for the meaning.
struct CopyDesc {
  const void* src;
  void* dst;
  uint64_t nbytes;
  int64_t hash_idx;
  uint64_t hash_word_base;
};

/// Launches the batched copy/hash kernel on `stream`. dst == nullptr in a desc means
/// "hash only". hash_acc points to device accumulators (zeroed by the caller).
void launch_batched_copy(const CopyDesc* descs, size_t n, uint64_t* hash_acc, void* stream);
/// out[i] = hw_finalize(acc[i], nbytes[i]) on device.
void launch_finalize(const uint64_t* acc, const uint64_t* nbytes, uint64_t* out, size_t n,
                     void* stream);
/// hw64 digests of n device buffers into out (device, n uint64) — stream-ordered.
void checksum_many(const void* const* ptrs, const uint64_t* sizes, size_t n, uint64_t* out,
                   void* stream);

/// A copy engine's streams and its pinned host blocks for hash read-backs, shared with every
/// batch it submits: a batch may outlive its engine (ops.set_link_classifier clears the engine
/// cache) and still returns its block here and frees its accumulators on work[0]. Destroyed
/// with the last owner.
struct CudaStreams {
  std::vector<void*> work;  // cudaStream_t: the copies
  CudaStreams() = default;
  CudaStreams(const CudaStreams&) = delete;
  CudaStreams& operator=(const CudaStreams&) = delete;
  ~CudaStreams();
  /// A pinned host block of at least `bytes` (power-of-two classes, reused).
  void* take_pinned(size_t bytes, size_t* cls);
  void give_pinned(void* p, size_t cls);

 private:
  std::mutex mu_;
  std::vector<std::pair<size_t, void*>> pinned_;  // free blocks (class, pointer)
};

// Note [Batch completion]
// A batch ends with a BlockingSync event recorded on the caller's stream after its copies
// and, when it hashes, after a copy of its accumulators into a pinned host block queued on
// the same stream as the kernel: once the event has fired the partial sums are on the host,
// with no second synchronization. wait() first polls the event for up to the engine's
// spin_ns (HOTWEIGHTS_SPIN_US): a bucket's copy is over in tens to hundreds of microseconds,
// and a thread woken from cudaEventSynchronize's sleep, on a VM above all, arrives late by
// about as much; then it sleeps in the driver (no core spins through a long copy).
class CudaBatch {
 public:
  ~CudaBatch();
  bool wait(double timeout_s);
  bool done() const;
  /// The batch's hash accumulators (synchronizes on the batch first).
  std::vector<uint64_t> hashes();
  size_t num_hashes() const { return num_hashes_; }

 private:
  friend class CudaCopyEngine;
  CudaBatch() = default;
  int device_ = 0;
  void* event_ = nullptr;   // cudaEvent_t
  void* stream_ = nullptr;  // the stream that owns acc_ (freed stream-ordered)
  std::shared_ptr<CudaStreams> streams_owner_;  // keeps stream_ and the pinned pool alive
  uint64_t* acc_ = nullptr;
  uint64_t* host_ = nullptr;  // pinned: acc_ copied here before event_ (Note [Batch completion])
  size_t host_cls_ = 0;
  size_t num_hashes_ = 0;
  int64_t spin_ns_ = 0;
};

// Note [Stream ordering]
// submit() forks from the caller's current stream: every worker stream waits on an event
// recorded on the caller's stream, so the copies see everything queued before them. It then
// joins: the caller's stream waits on an event recorded on each worker stream. Whatever the
// caller queues next (a free of a source tensor by the caching allocator included) is
// ordered after the copies, so no recordStream is needed. Large plain copies go to the copy
// engines (cudaMemcpyAsync) in chunks spread round-robin over the worker streams; hashed
// copies and many small copies go to one batched kernel launch.
class CudaCopyEngine {
 public:
  /// spin_ns: how long a batch's wait() polls before it sleeps (Note [Batch completion]).
  CudaCopyEngine(int device, int streams, size_t chunk_bytes, int64_t spin_ns = 0);
  ~CudaCopyEngine();
  /// kernel_ok: every pointer is device-accessible (device or peer memory), so the batched
  /// kernel may be used; otherwise only cudaMemcpyAsync is used and hashing is refused.
  std::shared_ptr<CudaBatch> submit(const std::vector<CopyDesc>& items, size_t num_hashes,
                                    void* caller_stream, bool kernel_ok);
  int device() const { return device_; }
  int streams() const { return static_cast<int>(streams_->work.size()); }

 private:
  int device_;
  size_t chunk_bytes_;
  int64_t spin_ns_;
  std::shared_ptr<CudaStreams> streams_;
};

// Note [CUDA IPC lifetime]
// A ring is one cudaMalloc allocation (never the caching allocator, so legacy IPC always
// works, whatever PYTORCH_CUDA_ALLOC_CONF says) with one interprocess event per slot. Its
// handle carries the memory handle of the base allocation, the device UUID (indices differ
// under CUDA_VISIBLE_DEVICES), the slot geometry, the event handles and a checksum. An
// importer opens it once (cudaIpcMemLazyEnablePeerAccess, so a peer GPU may read it), waits
// on a slot's event before reading it, and closes the mapping exactly once when the import
// object is destroyed. Exported arbitrary memory (export_memory) uses the base allocation
// found with cuMemGetAddressRange plus an offset; VMM memory (expandable segments) is
// detected with cuMemRetainAllocationHandle and refused with advice.
class CudaRing {
 public:
  CudaRing(int device, size_t slot_bytes, int slots);
  ~CudaRing();
  uintptr_t ptr() const { return reinterpret_cast<uintptr_t>(base_); }
  size_t slot_bytes() const { return slot_bytes_; }
  int slots() const { return slots_; }
  int device() const { return device_; }
  std::string handle() const { return handle_; }
  std::string id_hex() const;
  /// Records slot's interprocess event on `stream` (after the writes into the slot).
  void record(int slot, void* stream);

 private:
  int device_;
  size_t slot_bytes_;
  int slots_;
  void* base_ = nullptr;
  std::vector<void*> events_;
  std::string handle_;
  unsigned char id_[16] = {};
};

class CudaRingImport {
 public:
  /// Opens a ring handle on `local_device` (the importer's GPU; may differ from the ring's).
  CudaRingImport(const std::string& handle, int local_device);
  ~CudaRingImport();
  uintptr_t ptr() const { return reinterpret_cast<uintptr_t>(base_); }
  size_t slot_bytes() const { return slot_bytes_; }
  int slots() const { return slots_; }
  int ring_device() const { return ring_device_; }
  int local_device() const { return local_device_; }
  std::string id_hex() const;
  /// Makes `stream` wait for the exporter's writes into `slot`.
  void wait(int slot, void* stream);

 private:
  int local_device_;
  int ring_device_;
  size_t slot_bytes_ = 0;
  int slots_ = 0;
  void* base_ = nullptr;
  std::vector<void*> events_;
  unsigned char id_[16] = {};
};

/// Exports device memory [ptr, ptr + size) (base allocation + offset). Throws for memory
/// legacy IPC cannot export, with what to do.
std::string export_memory(uintptr_t ptr, size_t size);

class CudaMemImport {
 public:
  CudaMemImport(const std::string& handle, int local_device);
  ~CudaMemImport();
  uintptr_t ptr() const { return reinterpret_cast<uintptr_t>(base_) + offset_; }
  size_t size() const { return size_; }

 private:
  int local_device_;
  void* base_ = nullptr;
  size_t offset_ = 0, size_ = 0;
};

}  // namespace cuda
}  // namespace hw
