// SPDX-License-Identifier: Apache-2.0
#pragma once
// Element types of activations and parameters, and their conversions to and from the types
// that router math and accumulation use. All conversions work on the host and the device.
//
// Activations are float, __half or __nv_bfloat16; router math and accumulation are float.
// double is accepted by the host backend only, for finite-difference gradient checks.

#include <moe/core/config.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <concepts>
#include <cstdint>
#include <type_traits>

namespace moe {

/// Run-time tag of an element type, for messages and type-erased dispatch.
enum class dtype : std::uint8_t { f64, f32, f16, bf16 };

/// dtype_traits<T> describes an element type: its run-time tag, its name, the type that
/// accumulates it, and the conversions to and from float (or double for double).
template <class T>
struct dtype_traits;

template <>
struct dtype_traits<double> {
  static constexpr dtype tag = dtype::f64;
  static constexpr char const* name = "double";
  using accumulate_type = double;
  static constexpr bool device_supported = false;  // the CUDA backend takes float, half, bf16
  MOE_HOST_DEVICE static constexpr double to_accumulate(double v) noexcept { return v; }
  MOE_HOST_DEVICE static constexpr double from_accumulate(double v) noexcept { return v; }
};

template <>
struct dtype_traits<float> {
  static constexpr dtype tag = dtype::f32;
  static constexpr char const* name = "float";
  using accumulate_type = float;
  static constexpr bool device_supported = true;
  MOE_HOST_DEVICE static constexpr float to_accumulate(float v) noexcept { return v; }
  MOE_HOST_DEVICE static constexpr float from_accumulate(float v) noexcept { return v; }
};

template <>
struct dtype_traits<__half> {
  static constexpr dtype tag = dtype::f16;
  static constexpr char const* name = "half";
  using accumulate_type = float;
  static constexpr bool device_supported = true;
  MOE_HOST_DEVICE static float to_accumulate(__half v) noexcept { return __half2float(v); }
  MOE_HOST_DEVICE static __half from_accumulate(float v) noexcept { return __float2half_rn(v); }
};

template <>
struct dtype_traits<__nv_bfloat16> {
  static constexpr dtype tag = dtype::bf16;
  static constexpr char const* name = "bfloat16";
  using accumulate_type = float;
  static constexpr bool device_supported = true;
  MOE_HOST_DEVICE static float to_accumulate(__nv_bfloat16 v) noexcept {
    return __bfloat162float(v);
  }
  MOE_HOST_DEVICE static __nv_bfloat16 from_accumulate(float v) noexcept {
    return __float2bfloat16_rn(v);
  }
};

/// An element type the library knows: float, double, __half or __nv_bfloat16.
template <class T>
concept element = requires {
  dtype_traits<std::remove_cv_t<T>>::tag;
};

/// An element type the CUDA backend takes: float, __half or __nv_bfloat16.
template <class T>
concept device_element = element<T> && dtype_traits<std::remove_cv_t<T>>::device_supported;

/// The accumulation type of T: float for float/half/bfloat16, double for double.
template <element T>
using accumulate_t = typename dtype_traits<std::remove_cv_t<T>>::accumulate_type;

/// Converts an element to its accumulation type (float, or double for double).
template <element T>
MOE_HOST_DEVICE constexpr accumulate_t<T> to_accumulate(T v) noexcept {
  return dtype_traits<std::remove_cv_t<T>>::to_accumulate(v);
}

/// Converts an accumulated value back to the element type T, rounding to nearest even.
template <element T>
MOE_HOST_DEVICE constexpr std::remove_cv_t<T> from_accumulate(accumulate_t<T> v) noexcept {
  return dtype_traits<std::remove_cv_t<T>>::from_accumulate(v);
}

/// The run-time tag of T.
template <element T>
inline constexpr dtype dtype_of = dtype_traits<std::remove_cv_t<T>>::tag;

/// The name of a run-time tag, for messages.
constexpr char const* name_of(dtype d) noexcept {
  switch (d) {
    case dtype::f64:
      return "double";
    case dtype::f32:
      return "float";
    case dtype::f16:
      return "half";
    case dtype::bf16:
      return "bfloat16";
  }
  return "unknown";
}

}  // namespace moe
