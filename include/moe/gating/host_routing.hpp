// SPDX-License-Identifier: Apache-2.0
#pragma once
// The routing state of one call on the host backend, in host memory: what the host router
// writes (gating/router.hpp), what slot assignment adds, and what the layouts read
// (layout/capacity.hpp, layout/ragged.hpp, layout/row_map.hpp), with its workspace carve.
// The CUDA backend's counterpart is gating/device_routing.hpp.

#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/detail/carve_routing.hpp>
#include <moe/gating/random_routing.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace moe::gating {

/// The scalars of one routing call.
struct routing_summary {
  index_t tokens = 0;    ///< T of the call
  index_t capacity = 0;  ///< C of the call (resolved, aligned; G · C_g with local groups)
  index_t dropped = 0;   ///< assignments that found no slot
  double aux_loss = 0;   ///< the gate's aux loss (gshard_aux by default), before its coefficient
  double z_loss = 0;     ///< z_loss, before its coefficient
  index_t unrouted = 0;  ///< 2nd choices random routing left out (not counted in `dropped`)
  index_t max_load = 0;  ///< the largest per-(group, expert) load after `reduce_max_load`
};

/// The routing state of one call, in host memory. Shapes use the call's T.
struct host_routing {
  matrix_view<double> logits;        // (tokens, experts)
  matrix_view<double> scores;        // (tokens, experts)
  matrix_view<std::int32_t> expert;  // (tokens, k)  by descending score
  matrix_view<double> weight;        // (tokens, k)  combine weights; 0 when dropped
  matrix_view<std::int64_t> slot;    // (tokens, k)  position in the expert; kept iff < capacity
  vector_view<std::int64_t> load;    // (experts)    assignments before drops
  span<double> mean_score;           // (experts)    me over the call (mean probability)
  span<double> first_choice;         // (experts)    ce over the call (1st-choice fraction)
  span<double> d_scores;             // (experts)    backward scratch of one token
  // Scratch of the router (carve_host_routing lays it out):
  span<std::int64_t> order;   // (tokens · k)      each group's assignments in priority order
  span<double> key;           // (2 · tokens · k)  each assignment's priority key
  span<std::int64_t> counts;  // (2 · experts)     per-expert counters
  span<double> scratch;       // (3 · experts)     one token's or one group's rows
  index_t capacity = 0;

  [[nodiscard]] bool kept(index_t t, index_t j) const noexcept { return slot(t, j) < capacity; }
  [[nodiscard]] index_t tokens() const noexcept { return logits.extent(0); }
  [[nodiscard]] index_t experts() const noexcept { return logits.extent(1); }
  [[nodiscard]] int k() const noexcept { return static_cast<int>(expert.extent(1)); }
};

/// Lays out the routing state for up to `max_tokens` tokens and up to `max_k` choices, and
/// returns views of `tokens` tokens and `k` choices: the layout does not depend on `tokens`
/// and `k`, so that a workspace sized once serves calls whose T and k vary (top_any).
inline host_routing carve_host_routing(workspace_carver& carver, index_t max_tokens, int max_k,
                                       index_t tokens, index_t experts, int k) {
  auto const doubles = [&](index_t n) {
    return span<double>(carver.take<double>(n), static_cast<std::size_t>(n));
  };
  host_routing r;
  detail::carve_routing_views<double>(carver, r, max_tokens, max_k, tokens, experts, k);
  r.mean_score = doubles(experts);
  r.first_choice = doubles(experts);
  r.d_scores = doubles(experts);
  r.order = {carver.take<std::int64_t>(max_tokens * max_k), static_cast<std::size_t>(tokens * k)};
  r.key = {carver.take<double>(2 * max_tokens * max_k), static_cast<std::size_t>(2 * tokens * k)};
  r.counts = {carver.take<std::int64_t>(2 * experts), static_cast<std::size_t>(2 * experts)};
  r.scratch = doubles(3 * experts);
  return r;
}

/// The same for calls that all select k experts.
inline host_routing carve_host_routing(workspace_carver& carver, index_t max_tokens, index_t tokens,
                                       index_t experts, int k) {
  return carve_host_routing(carver, max_tokens, k, tokens, experts, k);
}

/// Per expert, the assignments that found no slot: those of expert e whose slot is past the
/// capacity (GShard's unrouted 2nd choices, slot `no_slot`, count in no load and are not
/// dropped). Host memory; the sum is the summary's `dropped`.
inline std::vector<std::int64_t> dropped_per_expert(matrix_view<std::int32_t const> expert,
                                                    matrix_view<std::int64_t const> slot,
                                                    index_t capacity, index_t experts) {
  std::vector<std::int64_t> dropped(static_cast<std::size_t>(experts), 0);
  for (index_t t = 0; t < expert.extent(0); ++t)
    for (index_t j = 0; j < expert.extent(1); ++j)
      if (slot(t, j) >= capacity && slot(t, j) != no_slot)
        ++dropped[static_cast<std::size_t>(expert(t, j))];
  return dropped;
}

namespace detail {

inline span<double const> row_of(matrix_view<double> m, index_t t) {
  return {&m(t, 0), static_cast<std::size_t>(m.extent(1))};
}

inline span<double> mutable_row_of(matrix_view<double> m, index_t t) {
  return {&m(t, 0), static_cast<std::size_t>(m.extent(1))};
}

/// Whether `r` was carved for T tokens, E experts and k choices, scratch included.
inline status check_routing_state(host_routing const& r, index_t tokens, index_t experts, int k) {
  if (r.tokens() != tokens || r.experts() != experts || r.k() != k ||
      r.scores.extent(0) != tokens || r.weight.extent(0) != tokens || r.slot.extent(1) != k ||
      r.load.extent(0) != experts)
    return status::failure("r", "was carved for " + std::to_string(r.tokens()) + " tokens, " +
                                    std::to_string(r.experts()) +
                                    " experts and k = " + std::to_string(r.k()) +
                                    "; the call has " + std::to_string(tokens) + ", " +
                                    std::to_string(experts) + " and k = " + std::to_string(k));
  auto const n = static_cast<std::size_t>(tokens * k), e = static_cast<std::size_t>(experts);
  if (r.order.size() < n || r.key.size() < 2 * n || r.counts.size() < 2 * e ||
      r.scratch.size() < 3 * e || r.d_scores.size() < e || r.mean_score.size() < e ||
      r.first_choice.size() < e)
    return status::failure("r", "lacks the router's scratch; lay it out with carve_host_routing");
  return {};
}

}  // namespace detail

}  // namespace moe::gating
