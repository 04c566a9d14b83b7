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
  if (event_) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
}

bool CudaBatch::done() const {
  cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(event_));
  if (e == cudaErrorNotReady) return false;
  HW_CUDA_CHECK(e);
  return true;
}

bool CudaBatch::wait(double timeout_s) {
  // No deadline (every bucket's partial sums): block in the driver until the batch's event
  // (a BlockingSync event: the thread sleeps, no core spins) and wake when it completes. The
  // sleep-poll this replaces backed off to 500 us between polls, and on a VM each sleep also
  // overshoots: a bucket whose copy took 0.1-0.5 ms could be seen done a few hundred
  // microseconds late, on both sides of every bucket, while the harness's 4 KiB buckets
  // (done before the first poll) never paid it.
  if (timeout_s < 0) {
    HW_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event_)));
    return true;
  }
  // With a deadline (no timed event wait exists): poll every 50 us for the first 2 ms, then
  // back off to 1 ms (a drain may wait minutes on a stuck copy).
  const auto t0 = std::chrono::steady_clock::now();
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
  std::vector<uint64_t> out(num_hashes_);
  if (num_hashes_ == 0) return out;
  DeviceGuard g(device_);
  HW_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event_)));
  // The batch is done, so acc_ is final. Read it back on the engine's read-back stream (non-
  // blocking, nothing else queued there): on the batch's own stream the copy would queue
  // behind every batch submitted after this one (a subscriber's read-ahead), and a plain
  // cudaMemcpy runs on the legacy default stream, behind whatever is queued there (a model's
  // forward, say). acc_ is freed on stream_ only when the batch is destroyed, after this.
  auto s = static_cast<cudaStream_t>(readback_ ? readback_ : stream_);
  HW_CUDA_CHECK(cudaMemcpyAsync(out.data(), acc_, num_hashes_ * sizeof(uint64_t),
                                cudaMemcpyDeviceToHost, s));
  HW_CUDA_CHECK(cudaStreamSynchronize(s));
  return out;
}

CudaCopyEngine::CudaCopyEngine(int device, int streams, size_t chunk_bytes)
    : device_(device), chunk_bytes_(chunk_bytes) {
  HW_CHECK_ARG(streams >= 1 && streams <= 32, "CudaCopyEngine: streams=", streams,
               ", expected 1..32");
  HW_CHECK_ARG(chunk_bytes >= 4096 && chunk_bytes % 256 == 0, "CudaCopyEngine: chunk_bytes=",
               chunk_bytes, ", expected a multiple of 256 of at least 4096");
  DeviceGuard g(device);
  auto set = std::make_shared<CudaStreams>();  // destroys what it holds if a create throws
  for (int i = 0; i < streams; ++i) {
    cudaStream_t s;
    HW_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    set->work.push_back(s);
  }
  cudaStream_t rb;
  HW_CUDA_CHECK(cudaStreamCreateWithFlags(&rb, cudaStreamNonBlocking));
  set->readback = rb;
  streams_ = std::move(set);
}

CudaCopyEngine::~CudaCopyEngine() = default;  // the streams go with their last owner

CudaStreams::~CudaStreams() {
  // Never throws (a destructor); at interpreter exit the runtime may already be unloading.
  for (void* s : work) cudaStreamDestroy(static_cast<cudaStream_t>(s));
  if (readback) cudaStreamDestroy(static_cast<cudaStream_t>(readback));
}

std::shared_ptr<CudaBatch> CudaCopyEngine::submit(const std::vector<CopyDesc>& items,
                                                  size_t num_hashes, void* caller_stream_,
                                                  bool kernel_ok) {
  HW_CHECK_ARG(kernel_ok || num_hashes == 0,
               "CudaCopyEngine: hashing needs device-accessible source and destination");
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
  cudaEvent_t fork;
  HW_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  HW_CUDA_CHECK(cudaEventRecord(fork, caller));
  for (void* s : work) HW_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(s), fork, 0));
  HW_CUDA_CHECK(cudaEventDestroy(fork));  // released once its pending uses are done

  auto batch = std::shared_ptr<CudaBatch>(new CudaBatch());
  batch->device_ = device_;
  batch->stream_ = s0;
  batch->readback_ = streams_->readback;
  batch->streams_owner_ = streams_;  // the batch may outlive this engine
  batch->num_hashes_ = num_hashes;
  if (num_hashes) {
    HW_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&batch->acc_),
                                  num_hashes * sizeof(uint64_t), s0));
    HW_CUDA_CHECK(cudaMemsetAsync(batch->acc_, 0, num_hashes * sizeof(uint64_t), s0));
  }
  std::vector<CopyDesc> kernel_items;
  size_t rr = 0;
  for (const auto& it : items) {
    if (it.nbytes == 0) continue;
    if (kernel_ok && (it.hash_idx >= 0 || it.nbytes < chunk_bytes_)) {
      kernel_items.push_back(it);
      continue;
    }
    for (uint64_t off = 0; off < it.nbytes; off += chunk_bytes_) {
      const uint64_t len = std::min<uint64_t>(chunk_bytes_, it.nbytes - off);
      auto s = static_cast<cudaStream_t>(work[rr++ % work.size()]);
      HW_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(it.dst) + off,
                                    static_cast<const char*>(it.src) + off, len, cudaMemcpyDefault,
                                    s));
    }
  }
  if (!kernel_items.empty())
    launch_batched_copy(kernel_items.data(), kernel_items.size(), batch->acc_, s0);
  for (void* sv : work) {
    cudaEvent_t join;
    HW_CUDA_CHECK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
    HW_CUDA_CHECK(cudaEventRecord(join, static_cast<cudaStream_t>(sv)));
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
