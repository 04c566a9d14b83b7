// SPDX-License-Identifier: Apache-2.0
// CUDA device queries and the multi-stream chunked copy engine (Note [Stream ordering]).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>

#include "core/copy_engine.h"
#include "cuda/check.h"
#include "cuda/cuda_api.h"

namespace hw {
namespace cuda {

int runtime_version() {
  int v = 0;
  HW_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

int device_count(std::string* error) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (error) *error = str(cudaGetErrorName(e), ": ", cudaGetErrorString(e));
    cudaGetLastError();  // clear the sticky-free error state
    return 0;
  }
  return n;
}

namespace {
std::string format_uuid(const unsigned char* b) {
  char s[64];
  std::snprintf(s, sizeof(s),
                "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
                b[14], b[15]);
  return s;
}
}  // namespace

std::vector<DeviceInfo> devices() {
  std::vector<DeviceInfo> out;
  const int n = device_count(nullptr);
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p;
    HW_CUDA_CHECK(cudaGetDeviceProperties(&p, i));
    out.push_back({i, p.name, format_uuid(reinterpret_cast<const unsigned char*>(p.uuid.bytes)),
                   p.totalGlobalMem, p.major, p.minor, p.pciBusID, p.pciDeviceID, p.pciDomainID});
  }
  return out;
}

std::vector<std::vector<int>> peer_access_matrix() {
  const int n = device_count(nullptr);
  std::vector<std::vector<int>> m(n, std::vector<int>(n, 0));
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      if (i == j) {
        m[i][j] = 1;
        continue;
      }
      int can = 0;
      HW_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, i, j));
      m[i][j] = can;
    }
  return m;
}

bool enable_peer_access(int device, int peer) {
  if (device == peer) return true;
  int can = 0;
  HW_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, device, peer));
  if (!can) return false;
  DeviceGuard g(device);
  cudaError_t e = cudaDeviceEnablePeerAccess(peer, 0);
  if (e == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();  // clear it: already enabled is what we want
    return true;
  }
  HW_CUDA_CHECK(e);
  return true;
}

std::string device_uuid(int device) {
  cudaDeviceProp p;
  HW_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  return std::string(reinterpret_cast<const char*>(p.uuid.bytes), 16);
}

int device_from_uuid(const std::string& uuid16) {
  const int n = device_count(nullptr);
  for (int i = 0; i < n; ++i)
    if (device_uuid(i) == uuid16) return i;
  return -1;
}

// ---------------------------------------------------------------------------------------

CudaBatch::~CudaBatch() {
  // Destructors never throw: errors here can only be reported, not handled.
  if (acc_) cudaFreeAsync(acc_, static_cast<cudaStream_t>(stream_));
  // The block may be reused at once: a batch dropped before it ended still has its read-back
  // queued on stream_, and every later use of a block of this pool queues its own read-back
  // on the same stream, after it.
  if (host_) streams_owner_->give_pinned(host_, host_cls_);
  if (event_) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
}

bool CudaBatch::done() const {
  cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(event_));
  if (e == cudaErrorNotReady) return false;
  HW_CUDA_CHECK(e);
  return true;
}

bool CudaBatch::wait(double timeout_s) {
  // Note [Batch completion]: poll for up to spin_ns_ first (never past a deadline).
  const auto t0 = std::chrono::steady_clock::now();
  auto spin = std::chrono::nanoseconds(spin_ns_);
  if (timeout_s >= 0)
    spin = std::min(spin, std::chrono::nanoseconds(static_cast<int64_t>(timeout_s * 1e9)));
  while (std::chrono::steady_clock::now() - t0 < spin)
    if (done()) return true;
  // No deadline (every bucket's partial sums): block in the driver until the batch's event
  // (a BlockingSync event: the thread sleeps, no core spins). The sleep-poll this replaced
  // backed off to 500 us between polls, and on a VM each sleep also overshoots.
  if (timeout_s < 0) {
    HW_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event_)));
    return true;
  }
  // With a deadline (no timed event wait exists): poll every 50 us for the first 2 ms, then
  // back off to 1 ms (a drain may wait minutes on a stuck copy).
  auto sleep = std::chrono::microseconds(50);
  while (!done()) {
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (waited >= timeout_s) return false;
    std::this_thread::sleep_for(sleep);
    if (waited > 2e-3) sleep = std::min(sleep * 2, std::chrono::microseconds(1000));
  }
  return true;
}

std::vector<uint64_t> CudaBatch::hashes() {
  // The batch's accumulators were copied into host_ before its event (Note [Batch
  // completion]): once the event fired they are final here, with no read-back to queue (on
  // the batch's own stream a read-back would wait behind every batch submitted after it).
  if (num_hashes_ == 0) return {};
  wait(-1.0);
  return std::vector<uint64_t>(host_, host_ + num_hashes_);
}

CudaCopyEngine::CudaCopyEngine(int device, int streams, size_t chunk_bytes, int64_t spin_ns)
    : device_(device), chunk_bytes_(chunk_bytes), spin_ns_(spin_ns) {
  HW_CHECK_ARG(streams >= 1 && streams <= 32, "CudaCopyEngine: streams=", streams,
               ", expected 1..32");
  HW_CHECK_ARG(chunk_bytes >= 4096 && chunk_bytes % 256 == 0, "CudaCopyEngine: chunk_bytes=",
               chunk_bytes, ", expected a multiple of 256 of at least 4096");
  HW_CHECK_ARG(spin_ns >= 0 && spin_ns <= 1000000000, "CudaCopyEngine: spin_ns=", spin_ns,
               ", expected 0..1e9 (at most a second)");
  DeviceGuard g(device);
  auto set = std::make_shared<CudaStreams>();  // destroys what it holds if a create throws
  for (int i = 0; i < streams; ++i) {
    cudaStream_t s;
    HW_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    set->work.push_back(s);
  }
  streams_ = std::move(set);
}

CudaCopyEngine::~CudaCopyEngine() = default;  // the streams go with their last owner

CudaStreams::~CudaStreams() {
  // Never throws (a destructor); at interpreter exit the runtime may already be unloading.
  // The last owner is a batch or the engine, after every batch of the pool was destroyed;
  // a dropped batch's read-back may still be queued on work[0] (the only stream read-backs
  // use): wait for it before the blocks go.
  if (!pinned_.empty() && !work.empty()) cudaStreamSynchronize(static_cast<cudaStream_t>(work[0]));
  for (auto& b : pinned_) cudaFreeHost(b.second);
  for (void* s : work) cudaStreamDestroy(static_cast<cudaStream_t>(s));
}

void* CudaStreams::take_pinned(size_t bytes, size_t* cls) {
  size_t c = 4096;
  while (c < bytes) c <<= 1;
  *cls = c;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < pinned_.size(); ++i)
      if (pinned_[i].first == c) {
        void* p = pinned_[i].second;
        pinned_[i] = pinned_.back();
        pinned_.pop_back();
        return p;
      }
  }
  void* p = nullptr;
  HW_CUDA_CHECK(cudaHostAlloc(&p, c, cudaHostAllocDefault));
  return p;
}

void CudaStreams::give_pinned(void* p, size_t cls) {
  std::lock_guard<std::mutex> lock(mu_);
  pinned_.emplace_back(cls, p);
}

std::shared_ptr<CudaBatch> CudaCopyEngine::submit(const std::vector<CopyDesc>& items,
                                                  size_t num_hashes, void* caller_stream_,
                                                  bool kernel_ok) {
  HW_CHECK_ARG(kernel_ok || num_hashes == 0,
               "CudaCopyEngine: hashing needs device-accessible source and destination");
  HW_CHECK_ARG(num_hashes <= (size_t(1) << 32), "CudaCopyEngine: num_hashes=", num_hashes,
               ", expected at most 2^32 accumulators");
  {  // the CPU engine's rule (one address space: UVA): no destination overlaps anything
    std::vector<CopyItem> spans;
    spans.reserve(items.size());
    for (const auto& it : items)
      if (it.dst != nullptr) spans.push_back({it.dst, it.src, it.nbytes, -1, 0});
    check_no_overlap(spans);
  }
  DeviceGuard g(device_);
  auto caller = static_cast<cudaStream_t>(caller_stream_);
  const auto& work = streams_->work;
  auto s0 = static_cast<cudaStream_t>(work[0]);
  // Plan first, so that only the streams that get work fork from the caller and join it
  // (a hashed bucket is one kernel on work[0]: one fork and one join, not one per stream).
  struct Chunk {
    void* dst;
    const void* src;
    uint64_t nbytes;
    size_t stream;
  };
  std::vector<CopyDesc> kernel_items;
  std::vector<Chunk> chunks;
  size_t rr = 0;
  for (const auto& it : items) {
    if (it.nbytes == 0) continue;
    if (kernel_ok && (it.hash_idx >= 0 || it.nbytes < chunk_bytes_)) {
      kernel_items.push_back(it);
      continue;
    }
    for (uint64_t off = 0; off < it.nbytes; off += chunk_bytes_)
      chunks.push_back({static_cast<char*>(it.dst) + off, static_cast<const char*>(it.src) + off,
                        std::min<uint64_t>(chunk_bytes_, it.nbytes - off), rr++ % work.size()});
  }
  std::vector<char> used(work.size(), 0);
  if (num_hashes || !kernel_items.empty()) used[0] = 1;
  for (const auto& c : chunks) used[c.stream] = 1;

  auto batch = std::shared_ptr<CudaBatch>(new CudaBatch());
  batch->device_ = device_;
  batch->stream_ = s0;
  batch->streams_owner_ = streams_;  // the batch may outlive this engine
  batch->num_hashes_ = num_hashes;
  batch->spin_ns_ = spin_ns_;
  if (num_hashes)
    batch->host_ = static_cast<uint64_t*>(
        streams_->take_pinned(num_hashes * sizeof(uint64_t), &batch->host_cls_));
  cudaEvent_t fork;
  HW_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  HW_CUDA_CHECK(cudaEventRecord(fork, caller));
  for (size_t i = 0; i < work.size(); ++i)
    if (used[i]) HW_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(work[i]), fork, 0));
  HW_CUDA_CHECK(cudaEventDestroy(fork));  // released once its pending uses are done
  if (num_hashes) {
    HW_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&batch->acc_),
                                  num_hashes * sizeof(uint64_t), s0));
    HW_CUDA_CHECK(cudaMemsetAsync(batch->acc_, 0, num_hashes * sizeof(uint64_t), s0));
  }
  for (const auto& c : chunks)
    HW_CUDA_CHECK(cudaMemcpyAsync(c.dst, c.src, c.nbytes, cudaMemcpyDefault,
                                  static_cast<cudaStream_t>(work[c.stream])));
  if (!kernel_items.empty())
    launch_batched_copy(kernel_items.data(), kernel_items.size(), batch->acc_, s0);
  if (num_hashes)  // Note [Batch completion]: the partial sums reach the host before the event
    HW_CUDA_CHECK(cudaMemcpyAsync(batch->host_, batch->acc_, num_hashes * sizeof(uint64_t),
                                  cudaMemcpyDeviceToHost, s0));
  for (size_t i = 0; i < work.size(); ++i) {
    if (!used[i]) continue;
    cudaEvent_t join;
    HW_CUDA_CHECK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
    HW_CUDA_CHECK(cudaEventRecord(join, static_cast<cudaStream_t>(work[i])));
    HW_CUDA_CHECK(cudaStreamWaitEvent(caller, join, 0));
    HW_CUDA_CHECK(cudaEventDestroy(join));
  }
  cudaEvent_t done;
  // BlockingSync: a host waiting without a deadline (CudaBatch::wait) sleeps in the driver
  // until the batch ends instead of spinning a core for the whole copy
  HW_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming | cudaEventBlockingSync));
  HW_CUDA_CHECK(cudaEventRecord(done, caller));
  batch->event_ = done;
  return batch;
}

}  // namespace cuda
}  // namespace hw
