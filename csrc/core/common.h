// SPDX-License-Identifier: Apache-2.0
// Error helpers shared by the torch-free core. Library code throws, never exits:
// std::invalid_argument becomes ValueError in Python, std::runtime_error RuntimeError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace hw {

/// str(..., Hex{p}, ...) writes p in hexadecimal.
struct Hex {
  uint64_t v;
};

namespace detail {
// Messages are built without iostreams: no locale, no num_put facet. (On the GPU image an
// ostringstream with std::hex crashed inside libstdc++'s locale code: docs/BENCHMARKS.md,
// "GPU, session 5".)
template <typename T>
void put(std::string& s, const T& v) {
  using D = std::decay_t<T>;
  char b[64];
  int n = 0;
  if constexpr (std::is_same_v<D, Hex>) {
    n = std::snprintf(b, sizeof b, "%llx", static_cast<unsigned long long>(v.v));
  } else if constexpr (std::is_same_v<D, bool>) {
    s += v ? "true" : "false";
  } else if constexpr (std::is_same_v<D, char>) {
    s += v;
  } else if constexpr (std::is_enum_v<D>) {
    n = std::snprintf(b, sizeof b, "%lld", static_cast<long long>(v));
  } else if constexpr (std::is_integral_v<D> && std::is_signed_v<D>) {
    n = std::snprintf(b, sizeof b, "%lld", static_cast<long long>(v));
  } else if constexpr (std::is_integral_v<D>) {
    n = std::snprintf(b, sizeof b, "%llu", static_cast<unsigned long long>(v));
  } else if constexpr (std::is_floating_point_v<D>) {
    n = std::snprintf(b, sizeof b, "%g", static_cast<double>(v));
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    if constexpr (std::is_pointer_v<T>) {  // (an array is never null)
      if (v == nullptr) {
        s += "(null)";
        return;
      }
    }
    s += std::string_view(v);
  } else if constexpr (std::is_pointer_v<D>) {
    n = std::snprintf(b, sizeof b, "%p", static_cast<const void*>(v));
  } else {
    static_assert(sizeof(D) == 0, "hw::str: no formatting for this type");
  }
  if (n > 0) s.append(b, static_cast<size_t>(n) < sizeof b ? static_cast<size_t>(n) : sizeof b - 1);
}
}  // namespace detail

template <typename... Args>
std::string str(const Args&... args) {
  std::string s;
  (detail::put(s, args), ...);
  return s;
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
