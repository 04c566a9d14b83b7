// SPDX-License-Identifier: Apache-2.0
// A fixed pool of worker threads and a completion object that Python can wait on with
// a timeout (the GIL is released by the bindings while waiting).
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <deque>
#include <vector>

namespace hw {

/// Shared state of one asynchronous batch: counts outstanding tasks, keeps the first
/// error and per-batch hash accumulators (hw64 partial sums, added in any order).
class Completion {
 public:
  explicit Completion(int tasks, size_t num_hashes = 0);
  /// Marks one task finished (with an error message, or empty on success).
  void task_done(const std::string& error = std::string());
  /// Waits up to timeout_s seconds (negative: forever). True when every task finished.
  bool wait(double timeout_s);
  bool done() const;
  /// Throws std::runtime_error with the first task error, if any. Requires done().
  void rethrow() const;
  void add_hash(size_t idx, uint64_t partial) { hashes_[idx].fetch_add(partial, std::memory_order_relaxed); }
  std::vector<uint64_t> hashes() const;
  size_t num_hashes() const { return num_hashes_; }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int remaining_;
  std::string error_;
  size_t num_hashes_;
  std::unique_ptr<std::atomic<uint64_t>[]> hashes_;
};

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  void submit(std::function<void()> fn);
  int size() const { return static_cast<int>(workers_.size()); }

 private:
  void loop();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
};

/// Runs fn(i) for i in [0, n) on the pool plus the calling thread and blocks until all
/// are done; the first exception is rethrown. Used by the synchronous batch helpers.
void parallel_for(ThreadPool* pool, size_t n, const std::function<void(size_t)>& fn);

/// A process-wide pool sized to the hardware (at least 1), for the synchronous helpers.
ThreadPool& default_pool();

}  // namespace hw
