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

/// dtype_traits<T> describes an element type: its run-time tag, its name, the type that
/// accumulates it, and the conversions to and from float (or double for double).
template <class T>
struct dtype_traits;

namespace detail {

/// What every dtype_traits holds besides the conversions; the name is name_of(tag).
template <dtype Tag, class Accumulate, bool DeviceSupported>
struct dtype_description {
  static constexpr dtype tag = Tag;
  static constexpr char const* name = name_of(Tag);
  using accumulate_type = Accumulate;
  static constexpr bool device_supported = DeviceSupported;
};

/// The traits of a type that accumulates as itself: both conversions are the identity.
template <class T, dtype Tag, bool DeviceSupported>
struct self_accumulating : dtype_description<Tag, T, DeviceSupported> {
  MOE_HOST_DEVICE static constexpr T to_accumulate(T v) noexcept { return v; }
  MOE_HOST_DEVICE static constexpr T from_accumulate(T v) noexcept { return v; }
};

}  // namespace detail

// The CUDA backend takes float, half and bfloat16; double is the host backend's alone.
template <>
struct dtype_traits<double> : detail::self_accumulating<double, dtype::f64, false> {};

template <>
struct dtype_traits<float> : detail::self_accumulating<float, dtype::f32, true> {};

template <>
struct dtype_traits<__half> : detail::dtype_description<dtype::f16, float, true> {
  MOE_HOST_DEVICE static float to_accumulate(__half v) noexcept { return __half2float(v); }
  MOE_HOST_DEVICE static __half from_accumulate(float v) noexcept { return __float2half_rn(v); }
};

template <>
struct dtype_traits<__nv_bfloat16> : detail::dtype_description<dtype::bf16, float, true> {
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

}  // namespace moe
