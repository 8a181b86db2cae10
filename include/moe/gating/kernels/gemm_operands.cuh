// SPDX-License-Identifier: Apache-2.0
#pragma once
// The operands of the CUDA router's GEMMs that cuBLAS cannot take as they are: x ⊙ jitter
// (training, jitter on the input) in float, and elements converted to one type, since
// cuBLAS multiplies operands of one type.

#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/kernels/shapes.cuh>
#include <moe/core/view.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/philox.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moe::gating::detail {

/// Whether a call jitters the router's input x (training, jitter on the input).
inline bool jitters_input(gate_args const& args) noexcept {
  return args.training && args.jitter > 0 && args.jitter_on == jitter_target::input;
}

/// The jitter of the router's input, elementwise with j = jitter(t, h) (the host's double
/// products, rounded once): x' = x ⊙ j in float for the forward (and dW_gate), or
/// dx += g ⊙ j for the backward, g = d_logits · W_gateᵀ in float. A thread per element.
template <class T>
struct input_jitter : moe::detail::thread_per_item<input_jitter<T>> {
  struct params {
    T const* x;             // (tokens, hidden) device memory: x, to jitter into `jittered`
    float* jittered;        // (tokens, hidden)
    float const* gradient;  // (tokens, hidden) or, when x is null, g, to jitter into dx
    T* dx;                  // (tokens, hidden) accumulated into
    index_t tokens;
    index_t hidden;
    float epsilon;
    std::uint64_t seed;
  };
  static index_t items(params const& p) { return p.tokens * p.hidden; }

  __device__ void operator()(params const& p, char*) const {
    index_t const i = this->item();
    if (i >= p.tokens * p.hidden) return;
    index_t const t = i / p.hidden, h = i % p.hidden;
    double const j = jitter_factor(p.epsilon, p.seed, t, static_cast<std::uint32_t>(h),
                                   rng_stream::jitter_input);
    if (p.x != nullptr)
      p.jittered[i] = static_cast<float>(mul_rn(static_cast<double>(to_accumulate(p.x[i])), j));
    else
      p.dx[i] = from_accumulate<T>(static_cast<float>(
          to_accumulate(p.dx[i]) + mul_rn(static_cast<double>(p.gradient[i]), j)));
  }

  /// x' = x ⊙ j.
  static params forward(T const* x, float* jittered, index_t tokens, index_t hidden,
                        gate_args const& args) noexcept {
    return {x, jittered, nullptr, nullptr, tokens, hidden, args.jitter, args.seed};
  }
  /// dx += g ⊙ j.
  static params backward(float const* gradient, T* dx, index_t tokens, index_t hidden,
                         gate_args const& args) noexcept {
    return {nullptr, nullptr, gradient, dx, tokens, hidden, args.jitter, args.seed};
  }
};

/// dst = To(src), elementwise: cuBLAS multiplies operands of one type.
template <class From, class To>
struct convert_elements : moe::detail::thread_per_item<convert_elements<From, To>> {
  struct params {
    From const* source;  // (count) device memory
    To* destination;     // (count)
    index_t count;
  };
  static index_t items(params const& p) { return p.count; }

  __device__ void operator()(params const& p, char*) const {
    index_t const i = this->item();
    if (i < p.count) p.destination[i] = from_accumulate<To>(to_accumulate(p.source[i]));
  }
};

}  // namespace moe::gating::detail
