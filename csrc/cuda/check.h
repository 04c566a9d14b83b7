// SPDX-License-Identifier: Apache-2.0
// CUDA runtime error checks for the lean CUDA files: throw, never exit.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>

#include "core/common.h"

#define HW_CUDA_CHECK(expr)                                                              \
  do {                                                                                   \
    cudaError_t hw_err_ = (expr);                                                        \
    if (hw_err_ != cudaSuccess) {                                                        \
      throw std::runtime_error(::hw::str(#expr, " failed: ", cudaGetErrorName(hw_err_), \
                                         " (", cudaGetErrorString(hw_err_), ") at ",     \
                                         __FILE__, ":", __LINE__));                      \
    }                                                                                    \
  } while (0)

// After every kernel launch.
#define HW_CUDA_KERNEL_LAUNCH_CHECK() HW_CUDA_CHECK(cudaGetLastError())

namespace hw {
namespace cuda {
/// Sets the current device for a scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    HW_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) HW_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

/// For destructors, which must not throw: switches device best-effort.
class QuietDeviceGuard {
 public:
  explicit QuietDeviceGuard(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != device) cudaSetDevice(device);
  }
  ~QuietDeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  QuietDeviceGuard(const QuietDeviceGuard&) = delete;
  QuietDeviceGuard& operator=(const QuietDeviceGuard&) = delete;

 private:
  int prev_ = -1;
};
}  // namespace cuda
}  // namespace hw
