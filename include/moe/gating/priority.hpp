// SPDX-License-Identifier: Apache-2.0
#pragma once
// Slot priority: who keeps a slot when an expert overflows. Each assignment (token t, choice
// j) claims the next free slot of its expert in priority order; a slot ≥ C is dropped.
// With local groups, each group orders its own assignments and has its own capacity.
//
//   choice_major       all 1st choices in token order, then all 2nd choices, … (GShard, Tutel)
//   token_major        token order over all k (Megatron/DeepSpeed "position", MegaBlocks)
//   by_score           higher combine weight (before drops) first, ties by token, then choice
//                      (Megatron's "probs" drop policy)
//   batch_prioritized  choice-major, but inside a choice rank the tokens go by descending
//                      score of their 1st choice (Tutel's batch_prioritized_routing); equal to
//                      by_score for k = 1 with unnormalised weights
//   random_order       a seeded random order: descending u(seed, t, j) (DeepSpeed's RTS keeps
//                      the same assignments; it numbers the kept ones in token order instead,
//                      which only permutes rows inside an expert's buffer)
//
// An order is a sort key: a priority maps each assignment's facts to (primary, secondary),
// and assignments claim slots in ascending (primary, secondary, token, choice), a total
// order, so that both backends agree. The key math is constexpr and host/device.

#include <moe/core/config.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/philox.hpp>

#include <concepts>
#include <cstdint>

namespace moe::gating {

/// What a priority may look at to order one assignment (token t, choice j).
struct assignment_facts {
  index_t token = 0;       ///< t, its index in the call
  int choice = 0;          ///< j
  double weight = 0;       ///< its combine weight before drops (renormalised if before, scaled)
  double first_score = 0;  ///< the score of the token's 1st choice
  std::uint64_t seed = 0;  ///< gate_args::seed
};

/// The sort key of an assignment; (token, choice) break its ties.
struct priority_key {
  double primary = 0;
  double secondary = 0;
};

/// Whether assignment (ta, ja) of key a claims a slot before (tb, jb) of key b.
MOE_HOST_DEVICE constexpr bool precedes(priority_key a, index_t ta, int ja, priority_key b,
                                        index_t tb, int jb) noexcept {
  if (a.primary != b.primary) return a.primary < b.primary;
  if (a.secondary != b.secondary) return a.secondary < b.secondary;
  if (ta != tb) return ta < tb;
  return ja < jb;
}

/// One assignment: token t's j-th choice.
struct assignment_index {
  index_t token;
  int choice;
};

/// All 1st choices before all 2nd choices; token order inside a choice rank.
struct choice_major {
  using moe_concept = priority_tag;

  MOE_HOST_DEVICE static constexpr priority_key key(assignment_facts const& a) noexcept {
    return {static_cast<double>(a.choice), 0};
  }

  /// The assignment at position p = j·T + t.
  MOE_HOST_DEVICE static constexpr assignment_index at(index_t p, index_t tokens, int) noexcept {
    return {p % tokens, static_cast<int>(p / tokens)};
  }
};
static_assert(priority<choice_major>);

/// Token order over all k choices.
struct token_major {
  using moe_concept = priority_tag;

  MOE_HOST_DEVICE static constexpr priority_key key(assignment_facts const&) noexcept {
    return {0, 0};
  }

  /// The assignment at position p = t·k + j.
  MOE_HOST_DEVICE static constexpr assignment_index at(index_t p, index_t, int k) noexcept {
    return {p / k, static_cast<int>(p % k)};
  }
};
static_assert(priority<token_major>);

/// Higher weight first; ties by token index, then choice.
struct by_score {
  using moe_concept = priority_tag;

  MOE_HOST_DEVICE static constexpr priority_key key(assignment_facts const& a) noexcept {
    return {-a.weight, 0};
  }
};
static_assert(priority<by_score>);

/// Choice-major; inside a choice rank, tokens by descending score of their 1st choice.
struct batch_prioritized {
  using moe_concept = priority_tag;

  MOE_HOST_DEVICE static constexpr priority_key key(assignment_facts const& a) noexcept {
    return {static_cast<double>(a.choice), -a.first_score};
  }
};
static_assert(priority<batch_prioritized>);

/// A seeded random order: descending u = rng_uniform(seed, t, j, random_priority).
struct random_order {
  using moe_concept = priority_tag;

  MOE_HOST_DEVICE static constexpr priority_key key(assignment_facts const& a) noexcept {
    return {-rng_uniform(a.seed, a.token, static_cast<std::uint32_t>(a.choice),
                         rng_stream::random_priority),
            0};
  }
};
static_assert(priority<random_order>);

/// P orders assignments by a sort key (every priority of this header does).
template <class P>
concept keyed_priority = priority<P> && requires(assignment_facts const& a) {
  { P::key(a) } -> std::same_as<priority_key>;
};
static_assert(keyed_priority<choice_major> && keyed_priority<random_order>);
static_assert(!priority<int> && !priority<assignment_facts>);

/// P's order needs no data: `P::at(p, tokens, k)` is the assignment at position p of
/// tokens·k, on the host and on the device alike (choice_major, token_major).
template <class P>
concept positional_priority = priority<P> && requires(index_t p, index_t tokens, int k) {
  { P::at(p, tokens, k) } -> std::same_as<assignment_index>;
};
static_assert(positional_priority<token_major> && !positional_priority<by_score>);

/// Calls `visit(t, j)` for every assignment of `tokens` tokens, in the order of P.
template <positional_priority P, class Visit>
void for_each_in_order(index_t tokens, int k, Visit&& visit) {
  for (index_t p = 0; p < tokens * k; ++p) {
    assignment_index const a = P::at(p, tokens, k);
    visit(a.token, a.choice);
  }
}

/// Host backend of slot assignment for a priority that needs no data (choice_major,
/// token_major): gives each assignment its position in its expert's buffer, in the priority
/// order of P, and counts the load of every expert before drops. The router (router.hpp)
/// does the general case: keyed priorities, local groups and left-out 2nd choices.
/// @param[in]  expert (tokens, k) selected experts, host memory
/// @param[out] slot   (tokens, k) position in the expert's buffer; kept iff < capacity
/// @param[out] load   (experts)   assignments per expert, dropped ones included
template <positional_priority P>
void assign_slots(P, matrix_view<std::int32_t const> expert, matrix_view<std::int64_t> slot,
                  vector_view<std::int64_t> load) {
  for (index_t e = 0; e < load.extent(0); ++e) load(e) = 0;
  for_each_in_order<P>(expert.extent(0), static_cast<int>(expert.extent(1)),
                       [&](index_t t, int j) { slot(t, j) = load(expert(t, j))++; });
}

}  // namespace moe::gating
