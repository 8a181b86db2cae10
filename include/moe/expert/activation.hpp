// SPDX-License-Identifier: Apache-2.0
#pragma once
// Activation functions of the experts, with their derivatives, usable on host and device.
//
//   relu  max(x, 0)
//   gelu  x · Φ(x) = x/2 · (1 + erf(x/√2))   (exact, as PyTorch's default)
//   silu  x · σ(x)

#include <moe/core/concepts.hpp>
#include <moe/core/config.hpp>
#include <moe/gating/concepts.hpp>

#include <cuda/std/cmath>

#include <concepts>

namespace moe::act {

struct activation_tag {};

/// A models activation if it is a stateless policy tagged `activation_tag` whose static
/// `forward(x)` and `derivative(x)` map float and double to the same type.
template <class A>
concept activation = std::semiregular<A> && tagged_as<A, activation_tag> &&
    requires(float f, double d) {
  { A::forward(f) } -> std::same_as<float>;
  { A::derivative(f) } -> std::same_as<float>;
  { A::forward(d) } -> std::same_as<double>;
  { A::derivative(d) } -> std::same_as<double>;
};

struct relu {
  using moe_concept = activation_tag;
  template <std::floating_point F>
  MOE_HOST_DEVICE static F forward(F x) noexcept {
    return x > F(0) ? x : F(0);
  }
  template <std::floating_point F>
  MOE_HOST_DEVICE static F derivative(F x) noexcept {
    return x > F(0) ? F(1) : F(0);
  }
};
static_assert(activation<relu>);

struct gelu {
  using moe_concept = activation_tag;
  template <std::floating_point F>
  MOE_HOST_DEVICE static F forward(F x) noexcept {
    return F(0.5) * x * (F(1) + cuda::std::erf(x * F(0.70710678118654752440)));
  }
  /// Φ(x) + x · φ(x)
  template <std::floating_point F>
  MOE_HOST_DEVICE static F derivative(F x) noexcept {
    F const cdf = F(0.5) * (F(1) + cuda::std::erf(x * F(0.70710678118654752440)));
    F const pdf = F(0.39894228040143267794) * cuda::std::exp(F(-0.5) * x * x);
    return cdf + x * pdf;
  }
};
static_assert(activation<gelu>);

struct silu {
  using moe_concept = activation_tag;
  template <std::floating_point F>
  MOE_HOST_DEVICE static F forward(F x) noexcept {
    return x / (F(1) + cuda::std::exp(-x));
  }
  /// σ(x) · (1 + x · (1 − σ(x)))
  template <std::floating_point F>
  MOE_HOST_DEVICE static F derivative(F x) noexcept {
    F const sigmoid = F(1) / (F(1) + cuda::std::exp(-x));
    return sigmoid * (F(1) + x * (F(1) - sigmoid));
  }
};
static_assert(activation<silu>);

}  // namespace moe::act
