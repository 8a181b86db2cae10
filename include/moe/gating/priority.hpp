// SPDX-License-Identifier: Apache-2.0
#pragma once
// Slot priority: who keeps a slot when an expert overflows. Each assignment (token t, choice
// j) claims the next free slot of its expert in priority order; a slot ≥ C is dropped.
//
//   choice_major   all 1st choices in token order, then all 2nd choices, … (GShard, Tutel)

#include <moe/core/config.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/concepts.hpp>

#include <cstdint>

namespace moe::gating {

/// All 1st choices before all 2nd choices; token order inside a choice rank.
struct choice_major {
  using moe_concept = priority_tag;

  /// Calls `visit(t, j)` for every assignment, in priority order.
  template <class Visit>
  static void for_each_in_order(index_t tokens, int k, Visit&& visit) {
    for (int j = 0; j < k; ++j)
      for (index_t t = 0; t < tokens; ++t) visit(t, j);
  }
};
static_assert(priority<choice_major>);

/// Host backend of slot assignment: gives each assignment its position in its expert's
/// buffer, in the priority order of P, and counts the load of every expert before drops.
/// @param[in]  expert (tokens, k) selected experts, host memory
/// @param[out] slot   (tokens, k) position in the expert's buffer; kept iff < capacity
/// @param[out] load   (experts)   assignments per expert, dropped ones included
template <priority P>
void assign_slots(P, matrix_view<std::int32_t const> expert, matrix_view<std::int64_t> slot,
                  vector_view<std::int64_t> load) {
  for (index_t e = 0; e < load.extent(0); ++e) load(e) = 0;
  P::for_each_in_order(expert.extent(0), static_cast<int>(expert.extent(1)),
                       [&](index_t t, int j) { slot(t, j) = load(expert(t, j))++; });
}

}  // namespace moe::gating
