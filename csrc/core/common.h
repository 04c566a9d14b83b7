// SPDX-License-Identifier: Apache-2.0
// Error helpers shared by the torch-free core. Library code throws, never exits:
// std::invalid_argument becomes ValueError in Python, std::runtime_error RuntimeError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace hw {

namespace detail {
inline void cat(std::ostringstream&) {}
template <typename T, typename... Rest>
void cat(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  cat(os, rest...);
}
}  // namespace detail

template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  detail::cat(os, args...);
  return os.str();
}

}  // namespace hw

// HW_CHECK_ARG: a caller passed a bad value (ValueError).
#define HW_CHECK_ARG(cond, ...)                                  \
  do {                                                           \
    if (!(cond)) throw std::invalid_argument(::hw::str(__VA_ARGS__)); \
  } while (0)

// HW_CHECK: a runtime condition failed (RuntimeError).
#define HW_CHECK(cond, ...)                                      \
  do {                                                           \
    if (!(cond)) throw std::runtime_error(::hw::str(__VA_ARGS__)); \
  } while (0)
