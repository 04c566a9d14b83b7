// SPDX-License-Identifier: Apache-2.0
#include "core/doorbell.h"

#include <cerrno>
#include <cmath>
#include <ctime>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "core/common.h"

namespace hw {

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
bool futex_wait32(void* p, uint32_t expected, double timeout_s) {
  HW_CHECK_ARG(std::isfinite(timeout_s) && timeout_s >= 0 && timeout_s <= 86400.0, "futex_wait32: timeout_s=", timeout_s,
           ", expected seconds in [0, 86400]");
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
