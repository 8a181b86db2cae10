// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA path of slot priorities (gating/priority.hpp) that slot assignment (slots.cuh)
// sorts by: `device_priority<P>`, positional (the host's own `at`) or a packed sort key that
// orders as the host's (primary, secondary) doubles, and the kernel that writes those keys.

#include <moe/core/config.hpp>
#include <moe/core/kernels/shapes.cuh>
#include <moe/core/view.hpp>
#include <moe/gating/priority.hpp>

#include <cuda_runtime.h>
#include <cuda/std/bit>

#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>

namespace moe::gating {

/// The device side of priority P. Either positional: `at(p, tokens, k)` is the assignment at
/// position p of P's order, for 0 ≤ p < tokens·k; or keyed: `sort_key(facts)` packs P::key
/// into an unsigned `key_type` whose ascending order over its low `key_bits(k)` bits is P's
/// (primary, secondary) order. A priority gains a CUDA path by specialising it.
template <class P>
struct device_priority;

/// A priority whose order the device knows without looking at the data.
template <class P>
concept positional_device_priority = priority<P> && requires(index_t p, index_t tokens, int k) {
  { device_priority<P>::at(p, tokens, k) } -> std::same_as<assignment_index>;
};

/// A priority whose order the device sorts out by a packed key.
template <class P>
concept keyed_device_priority = keyed_priority<P> && requires(assignment_facts const& a, int k) {
  requires std::unsigned_integral<typename device_priority<P>::key_type>;
  { device_priority<P>::key_bits(k) } -> std::same_as<int>;
  { device_priority<P>::sort_key(a) } -> std::same_as<typename device_priority<P>::key_type>;
};

/// A priority with a CUDA path.
template <class P>
concept device_priority_order = positional_device_priority<P> || keyed_device_priority<P>;

namespace detail {

/// The order-preserving image of a float among the unsigned integers: x < y ⇔ image(x) <
/// image(y) for numbers; −0 and +0 compare equal, so they share one image.
MOE_HOST_DEVICE inline std::uint32_t ordered_bits(float x) noexcept {
  std::uint32_t const u = cuda::std::bit_cast<std::uint32_t>(x == 0.0f ? 0.0f : x);
  return (u & 0x80000000u) != 0 ? ~u : u | 0x80000000u;
}

}  // namespace detail

/// A positional priority (choice_major, token_major): the host's own positions.
template <positional_priority P>
struct device_priority<P> {
  MOE_HOST_DEVICE static constexpr assignment_index at(index_t p, index_t tokens, int k) noexcept {
    return P::at(p, tokens, k);
  }
};
static_assert(device_priority_order<choice_major> && device_priority_order<token_major>);

/// By score: −weight, rounded to float.
template <>
struct device_priority<by_score> {
  using key_type = std::uint32_t;
  static constexpr int key_bits(int) noexcept { return 32; }
  MOE_HOST_DEVICE static key_type sort_key(assignment_facts const& a) noexcept {
    return detail::ordered_bits(static_cast<float>(by_score::key(a).primary));
  }
};
static_assert(keyed_device_priority<by_score>);

/// Batch-prioritized: the choice above −(1st choice's score), rounded to float.
template <>
struct device_priority<batch_prioritized> {
  using key_type = std::uint64_t;
  static constexpr int key_bits(int k) noexcept {
    return 32 + static_cast<int>(std::bit_width(static_cast<unsigned>(k - 1)));
  }
  MOE_HOST_DEVICE static key_type sort_key(assignment_facts const& a) noexcept {
    priority_key const key = batch_prioritized::key(a);
    return (static_cast<std::uint64_t>(key.primary) << 32) |
           detail::ordered_bits(static_cast<float>(key.secondary));
  }
};
static_assert(keyed_device_priority<batch_prioritized>);

/// Random order: primary = −m·2^−53 with m < 2^53, so (1 + primary)·2^53 = 2^53 − m is an
/// exact integer in [1, 2^53]: the host's order, exactly.
template <>
struct device_priority<random_order> {
  using key_type = std::uint64_t;
  static constexpr int key_bits(int) noexcept { return 54; }
  MOE_HOST_DEVICE static key_type sort_key(assignment_facts const& a) noexcept {
    return static_cast<std::uint64_t>((1.0 + random_order::key(a).primary) * 0x1p53);
  }
};
static_assert(keyed_device_priority<random_order>);
static_assert(!device_priority_order<int>);

namespace detail {

/// Writes the priority sort's input in token-major order: key = P's packed key of
/// assignment a = t·k + j, value = a.
template <class P>
struct priority_keys : moe::detail::thread_per_item<priority_keys<P>> {
  using key_type = typename device_priority<P>::key_type;
  struct params {
    std::int32_t const* expert;  // (tokens, k)       device memory
    float const* weight;         // (tokens, k)       before drops, not yet scaled
    float const* scores;         // (tokens, experts)
    index_t tokens;
    int k;
    index_t experts;
    double scaling_factor;  // by_score orders α · w in double, as the host does
    std::uint64_t seed;
    key_type* keys;        // (tokens·k)
    std::int32_t* values;  // (tokens·k)
  };
  static index_t items(params const& p) { return p.tokens * p.k; }

  __device__ void operator()(params const& p, char*) const {
    index_t const a = this->item();
    if (a >= p.tokens * p.k) return;
    index_t const t = a / p.k;
    std::int32_t const first = p.expert[t * p.k];
    // An id outside [0, E) (never from the router) has no score to read.
    double const first_score =
        first >= 0 && first < p.experts ? static_cast<double>(p.scores[t * p.experts + first]) : 0;
    assignment_facts const facts{.token = t,
                                 .choice = static_cast<int>(a % p.k),
                                 .weight = static_cast<double>(p.weight[a]) * p.scaling_factor,
                                 .first_score = first_score,
                                 .seed = p.seed};
    p.keys[a] = device_priority<P>::sort_key(facts);
    p.values[a] = static_cast<std::int32_t>(a);
  }
};

}  // namespace detail

}  // namespace moe::gating
