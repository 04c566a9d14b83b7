// SPDX-License-Identifier: Apache-2.0
#include "core/doorbell.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <ctime>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "core/common.h"

namespace hw {

namespace {
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}
}  // namespace

uint64_t atomic_load64(const void* p) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  uint64_t v = __atomic_load_n(static_cast<const uint64_t*>(p), __ATOMIC_ACQUIRE);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  return v;
}

void atomic_store64(void* p, uint64_t v) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  __atomic_store_n(static_cast<uint64_t*>(p), v, __ATOMIC_RELEASE);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

uint64_t atomic_add64(void* p, uint64_t v) {
  return __atomic_fetch_add(static_cast<uint64_t*>(p), v, __ATOMIC_SEQ_CST);
}

bool atomic_cas64(void* p, uint64_t expected, uint64_t desired) {
  return __atomic_compare_exchange_n(static_cast<uint64_t*>(p), &expected, desired, false,
                                     __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

uint32_t atomic_load32(const void* p) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  uint32_t v = __atomic_load_n(static_cast<const uint32_t*>(p), __ATOMIC_ACQUIRE);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  return v;
}

uint32_t atomic_add32(void* p, uint32_t v) {
  return __atomic_fetch_add(static_cast<uint32_t*>(p), v, __ATOMIC_SEQ_CST);
}

#if defined(__linux__)
bool futex_wait32(void* p, uint32_t expected, double timeout_s, double spin_s) {
  HW_CHECK_ARG(std::isfinite(timeout_s) && timeout_s >= 0 && timeout_s <= 86400.0, "futex_wait32: timeout_s=", timeout_s,
           ", expected seconds in [0, 86400]");
  HW_CHECK_ARG(std::isfinite(spin_s) && spin_s >= 0 && spin_s <= 1.0, "futex_wait32: spin_s=",
               spin_s, ", expected seconds in [0, 1]");
  if (spin_s > 0) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto spin = std::chrono::duration<double>(std::min(spin_s, timeout_s));
    do {
      for (int i = 0; i < 64; ++i) {  // a few microseconds between clock reads
        if (atomic_load32(p) != expected) return true;
        cpu_relax();
      }
    } while (std::chrono::steady_clock::now() - t0 < spin);
    timeout_s = std::max(0.0, timeout_s - std::chrono::duration<double>(
                                              std::chrono::steady_clock::now() - t0).count());
  }
  struct timespec ts;
  ts.tv_sec = static_cast<time_t>(timeout_s);
  ts.tv_nsec = static_cast<long>((timeout_s - static_cast<double>(ts.tv_sec)) * 1e9);
  // not FUTEX_PRIVATE_FLAG: the word is in a mapping shared with other processes
  long r = syscall(SYS_futex, static_cast<uint32_t*>(p), FUTEX_WAIT, expected, &ts, nullptr, 0);
  if (r == 0) return true;
  if (errno == EAGAIN || errno == EINTR) return true;  // changed already / a signal: re-read
  if (errno == ETIMEDOUT) return false;
  HW_CHECK(false, "futex_wait32 failed: errno ", errno);
  return false;
}

int futex_wake32(void* p, int n) {
  long r = syscall(SYS_futex, static_cast<uint32_t*>(p), FUTEX_WAKE, n, nullptr, nullptr, 0);
  HW_CHECK(r >= 0, "futex_wake32 failed: errno ", errno);
  return static_cast<int>(r);
}
#else
#error "the doorbell needs Linux futexes"
#endif

}  // namespace hw
