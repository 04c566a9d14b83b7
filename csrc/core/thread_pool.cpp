// SPDX-License-Identifier: Apache-2.0
#include "core/thread_pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <exception>
#include <stdexcept>

#include "core/common.h"

namespace hw {

Completion::Completion(int tasks, size_t num_hashes)
    : remaining_(tasks), num_hashes_(num_hashes),
      hashes_(new std::atomic<uint64_t>[num_hashes ? num_hashes : 1]) {
  for (size_t i = 0; i < (num_hashes ? num_hashes : 1); ++i) hashes_[i].store(0);
}

void Completion::task_done(const std::string& error) {
  std::lock_guard<std::mutex> g(mu_);
  if (!error.empty() && error_.empty()) error_ = error;
  if (--remaining_ <= 0) cv_.notify_all();
}

bool Completion::wait(double timeout_s) {
  std::unique_lock<std::mutex> lk(mu_);
  auto pred = [&] { return remaining_ <= 0; };
  if (timeout_s < 0) {
    cv_.wait(lk, pred);
    return true;
  }
  return cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), pred);
}

bool Completion::done() const {
  std::lock_guard<std::mutex> g(mu_);
  return remaining_ <= 0;
}

void Completion::rethrow() const {
  std::lock_guard<std::mutex> g(mu_);
  HW_CHECK(remaining_ <= 0, "Completion::rethrow: batch still running");
  if (!error_.empty()) throw std::runtime_error(error_);
}

std::vector<uint64_t> Completion::hashes() const {
  std::vector<uint64_t> out(num_hashes_);
  for (size_t i = 0; i < num_hashes_; ++i) out[i] = hashes_[i].load();
  return out;
}

ThreadPool::ThreadPool(int threads) {
  HW_CHECK_ARG(threads >= 1 && threads <= 256, "ThreadPool: threads=", threads,
               ", expected 1..256");
  workers_.reserve(threads);
  for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::submit(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> g(mu_);
    queue_.push_back(std::move(fn));
  }
  cv_.notify_one();
}

void ThreadPool::loop() {
  for (;;) {
    std::function<void()> fn;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and drained
      fn = std::move(queue_.front());
      queue_.pop_front();
    }
    fn();  // tasks report their own errors through their Completion
  }
}

namespace {

// One parallel_for's shared state. Helpers hold it by shared_ptr: the caller waits for the
// *indices* to be done, not for every helper to have run, so a helper the scheduler starts
// late (more runnable threads than cores) finds nothing left, never touches fn, and is not
// waited for.
struct ForState {
  ForState(size_t n, const std::function<void(size_t)>* fn) : n(n), fn(fn) {}
  const size_t n;
  const std::function<void(size_t)>* fn;  // valid while some index is not done
  std::atomic<size_t> next{0};
  std::atomic<size_t> completed{0};
  std::mutex mu;
  std::condition_variable cv;
  std::exception_ptr err;  // under mu

  void run() {
    for (size_t i; (i = next.fetch_add(1)) < n;) {
      try {
        (*fn)(i);
      } catch (...) {
        std::lock_guard<std::mutex> g(mu);
        if (!err) err = std::current_exception();
      }
      if (completed.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> g(mu);  // the waiter is waiting or will see n
        cv.notify_all();
      }
    }
  }
};

}  // namespace

void parallel_for(ThreadPool* pool, size_t n, const std::function<void(size_t)>& fn) {
  if (n == 0) return;
  auto st = std::make_shared<ForState>(n, &fn);
  const int helpers = pool ? static_cast<int>(std::min<size_t>(pool->size(), n - 1)) : 0;
  for (int h = 0; h < helpers; ++h) pool->submit([st] { st->run(); });
  st->run();
  std::unique_lock<std::mutex> lk(st->mu);
  st->cv.wait(lk, [&] { return st->completed.load() == n; });
  if (st->err) std::rethrow_exception(st->err);
}

ThreadPool& default_pool() {
  // The caller of parallel_for works too, so the pool holds one thread less than the
  // hardware offers. Never call parallel_for from a pool task (it would wait on itself).
  const unsigned hc = std::thread::hardware_concurrency();
  static ThreadPool pool(hc > 1 ? static_cast<int>(hc - 1) : 1);
  return pool;
}

}  // namespace hw
