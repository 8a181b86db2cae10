// SPDX-License-Identifier: Apache-2.0
#pragma once
// Expert capacity: how many slots each expert's buffer has in the capacity layout
// [E, C, H]. The math is constexpr and host/device, shared by both backends.
//
// Tutel's rule (the default):
//   f > 0:   C = k · ⌊f · ⌈T/E⌉⌋
//   f == 0:  C = the largest per-expert load (all choices, before drops)
//   f < 0:   C = min(largest load, k · ⌊|f| · ⌈T/E⌉⌋)
// then rounded up to a multiple of `alignment`.

#include <moe/core/config.hpp>
#include <moe/core/view.hpp>

namespace moe::gating {

/// What capacity depends on, apart from the loads.
struct capacity_args {
  index_t tokens = 0;
  index_t experts = 0;
  int k = 0;
  float factor = 1.0f;
  index_t alignment = 1;
};

MOE_HOST_DEVICE constexpr index_t ceil_div(index_t a, index_t b) noexcept {
  return (a + b - 1) / b;
}

MOE_HOST_DEVICE constexpr index_t round_up(index_t value, index_t multiple) noexcept {
  return multiple > 1 ? ceil_div(value, multiple) * multiple : value;
}

/// k · ⌊|f| · ⌈T/E⌉⌋: the capacity a factor of magnitude |f| gives. The product is taken in
/// double, as Tutel's Python does.
MOE_HOST_DEVICE constexpr index_t factor_capacity(capacity_args const& a) noexcept {
  double const f = a.factor < 0 ? -static_cast<double>(a.factor) : static_cast<double>(a.factor);
  return static_cast<index_t>(a.k) *
         static_cast<index_t>(f * static_cast<double>(ceil_div(a.tokens, a.experts)));
}

/// True when capacity depends on the loads (f ≤ 0): it is known only after routing.
MOE_HOST_DEVICE constexpr bool is_dynamic_capacity(capacity_args const& a) noexcept {
  return !(a.factor > 0);
}

/// The capacity for the given largest per-expert load (ignored when f > 0).
MOE_HOST_DEVICE constexpr index_t resolve_capacity(capacity_args const& a,
                                                   index_t max_load) noexcept {
  index_t c = factor_capacity(a);
  if (a.factor == 0)
    c = max_load;
  else if (a.factor < 0)
    c = max_load < c ? max_load : c;
  return round_up(c, a.alignment);
}

/// An upper bound of the capacity over all routings, for sizing buffers: an expert receives
/// each token at most once, so no load exceeds T.
MOE_HOST_DEVICE constexpr index_t capacity_bound(capacity_args const& a) noexcept {
  return is_dynamic_capacity(a) ? resolve_capacity(a, a.tokens) : resolve_capacity(a, 0);
}

}  // namespace moe::gating
