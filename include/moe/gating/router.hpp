// SPDX-License-Identifier: Apache-2.0
#pragma once
// The host backend of a whole gate, forward and backward: router logits x · W_gate, scores,
// top-k selection, combine weights, slot assignment under a priority, capacity, and the
// load-balancing losses; then the gradient back through all of them into x and W_gate.

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/detail/host_gemm.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/losses.hpp>
#include <moe/gating/priority.hpp>
#include <moe/gating/scores.hpp>
#include <moe/gating/top_k.hpp>

#include <algorithm>
#include <cstdint>
#include <functional>

namespace moe::gating {

/// The scalars of one routing call.
struct routing_summary {
  index_t tokens = 0;    ///< T of the call
  index_t capacity = 0;  ///< C of the call (resolved, aligned)
  index_t dropped = 0;   ///< assignments that found no slot
  double aux_loss = 0;   ///< gshard_aux, before its coefficient
  double z_loss = 0;     ///< z_loss, before its coefficient
};

/// The routing state of one call, in host memory. Shapes use the call's T.
struct host_routing {
  matrix_view<double> logits;        // (tokens, experts)
  matrix_view<double> scores;        // (tokens, experts)
  matrix_view<std::int32_t> expert;  // (tokens, k)  by descending score
  matrix_view<double> weight;        // (tokens, k)  combine weights; 0 when dropped
  matrix_view<std::int64_t> slot;    // (tokens, k)  position in the expert; kept iff < capacity
  vector_view<std::int64_t> load;    // (experts)    assignments before drops
  span<double> mean_score;           // (experts)    me of the aux loss
  span<double> first_choice;         // (experts)    ce of the aux loss
  span<double> d_scores;             // (experts)    backward scratch of one token
  index_t capacity = 0;

  [[nodiscard]] bool kept(index_t t, index_t j) const noexcept { return slot(t, j) < capacity; }
  [[nodiscard]] index_t tokens() const noexcept { return logits.extent(0); }
  [[nodiscard]] index_t experts() const noexcept { return logits.extent(1); }
  [[nodiscard]] int k() const noexcept { return static_cast<int>(expert.extent(1)); }
};

/// Lays out the routing state for up to `max_tokens` tokens and returns views of `tokens`.
inline host_routing carve_host_routing(workspace_carver& carver, index_t max_tokens, index_t tokens,
                                       index_t experts, int k) {
  host_routing r;
  r.logits = make_view(carver.take<double>(max_tokens * experts), tokens, experts);
  r.scores = make_view(carver.take<double>(max_tokens * experts), tokens, experts);
  r.expert = make_view(carver.take<std::int32_t>(max_tokens * k), tokens, k);
  r.weight = make_view(carver.take<double>(max_tokens * k), tokens, k);
  r.slot = make_view(carver.take<std::int64_t>(max_tokens * k), tokens, k);
  r.load = make_view(carver.take<std::int64_t>(experts), experts);
  r.mean_score = {carver.take<double>(experts), static_cast<std::size_t>(experts)};
  r.first_choice = {carver.take<double>(experts), static_cast<std::size_t>(experts)};
  r.d_scores = {carver.take<double>(experts), static_cast<std::size_t>(experts)};
  return r;
}

namespace detail {

/// Divides the weights of one token by the sum of its scores over the selected (or only the
/// kept) assignments, as `normalize` says.
inline void renormalize_row(host_routing& r, index_t t, renormalize normalize) {
  if (normalize == renormalize::none) return;
  double sum = 0;
  for (int j = 0; j < r.k(); ++j)
    if (normalize == renormalize::before_drops || r.kept(t, j)) sum += r.scores(t, r.expert(t, j));
  if (sum > 0)
    for (int j = 0; j < r.k(); ++j) r.weight(t, j) /= sum;
}

inline span<double const> row_of(matrix_view<double> m, index_t t) {
  return {&m(t, 0), static_cast<std::size_t>(m.extent(1))};
}

}  // namespace detail

/// Forward of gate G on the host: fills `r` and returns the call's scalars.
/// @param[in]  x      (tokens, hidden)  host memory
/// @param[in]  w_gate (hidden, experts) host memory
/// @param[out] r      routing state, carved for x's T
/// @param reduce_max_load maps this call's largest per-expert load to the one dynamic
///        capacity uses: the identity on one rank, the maximum over the ranks with several
///        (Tutel all-reduces it). Called once, on every call.
template <gate G, element T, class ReduceMaxLoad = std::identity>
routing_summary route(host_backend, G const& gate, gate_args const& args, matrix_view<T const> x,
                      matrix_view<T const> w_gate, host_routing& r,
                      ReduceMaxLoad reduce_max_load = {}) {
  using Score = typename G::score_function;
  index_t const tokens = x.extent(0), hidden = x.extent(1), experts = w_gate.extent(1);
  int const k = gate.k(args);

  moe::detail::host_gemm(
      tokens, experts, hidden, [&](index_t t, index_t h) { return to_accumulate(x(t, h)); },
      [&](index_t h, index_t e) { return to_accumulate(w_gate(h, e)); },
      [&](index_t t, index_t e, double v) { r.logits(t, e) = v; });

  routing_summary summary{.tokens = tokens};
  for (index_t t = 0; t < tokens; ++t) {
    span<double> scores{&r.scores(t, 0), static_cast<std::size_t>(experts)};
    Score::apply(detail::row_of(r.logits, t), scores);
    select_top_k(scores, {&r.expert(t, 0), static_cast<std::size_t>(k)});
    summary.z_loss += z_loss_term(detail::row_of(r.logits, t), 0, {}) / static_cast<double>(tokens);
  }

  assign_slots(typename G::priority{}, as_const(r.expert), r.slot, r.load);
  index_t const max_load = static_cast<index_t>(
      reduce_max_load(*std::max_element(r.load.data_handle(), r.load.data_handle() + experts)));
  capacity_args const cap{.tokens = tokens,
                          .experts = experts,
                          .k = k,
                          .factor = args.capacity_factor,
                          .alignment = args.capacity_alignment};
  r.capacity = summary.capacity = resolve_capacity(cap, max_load);

  for (index_t t = 0; t < tokens; ++t) {
    for (int j = 0; j < k; ++j) {
      r.weight(t, j) = r.scores(t, r.expert(t, j));
      if (!r.kept(t, j)) ++summary.dropped;
    }
    detail::renormalize_row(r, t, args.normalize);
    for (int j = 0; j < k; ++j)
      if (!r.kept(t, j)) r.weight(t, j) = 0;
  }

  gshard_aux_terms(as_const(r.scores), as_const(r.expert), r.mean_score, r.first_choice);
  summary.aux_loss = gshard_aux_loss(r.mean_score, r.first_choice);
  return summary;
}

/// Backward of gate G on the host, for the objective ⟨d_weight, weight⟩ + aux_loss_coef ·
/// gshard_aux + z_loss_coef · z_loss. Dropped assignments receive no gradient.
/// @param[in]    d_weight (tokens, k)       gradient of the combine weights
/// @param[in]    x        (tokens, hidden)  the forward's input
/// @param[inout] d_logits (tokens, experts) scratch, overwritten
/// @param[inout] dx       (tokens, hidden)  accumulated into
/// @param[out]   d_w_gate (hidden, experts) overwritten
template <gate G, element T>
void route_backward(host_backend, G const&, gate_args const& args, host_routing const& r,
                    matrix_view<double const> d_weight, matrix_view<double const> x,
                    matrix_view<T const> w_gate, matrix_view<double> d_logits,
                    matrix_view<double> dx, matrix_view<T> d_w_gate) {
  using Score = typename G::score_function;
  index_t const tokens = r.tokens(), experts = r.experts(), hidden = x.extent(1);
  int const k = r.k();

  for (index_t t = 0; t < tokens; ++t) {
    span<double> const d_scores = r.d_scores;
    for (index_t e = 0; e < experts; ++e)
      d_scores[e] =
          args.aux_loss_coef * gshard_aux_score_gradient(r.first_choice[e], experts, tokens);

    // Through the renormalisation w_j = s_j / Σ_{i∈S} s_i, S the selected or kept set.
    double sum = 0, weighted = 0;
    for (int j = 0; j < k; ++j) {
      bool const in_set = args.normalize == renormalize::before_drops ||
                          (args.normalize == renormalize::after_drops && r.kept(t, j));
      if (!in_set) continue;
      double const s = r.scores(t, r.expert(t, j));
      sum += s;
      weighted += d_weight(t, j) * s;
    }
    for (int j = 0; j < k; ++j) {
      if (!r.kept(t, j)) continue;
      d_scores[r.expert(t, j)] +=
          args.normalize == renormalize::none || sum == 0 ? d_weight(t, j) : d_weight(t, j) / sum;
    }
    if (args.normalize != renormalize::none && sum > 0)
      for (int j = 0; j < k; ++j) {
        bool const in_set = args.normalize == renormalize::before_drops || r.kept(t, j);
        if (in_set) d_scores[r.expert(t, j)] -= weighted / (sum * sum);
      }

    span<double> const d_logits_row{&d_logits(t, 0), static_cast<std::size_t>(experts)};
    Score::backward(detail::row_of(r.scores, t), d_scores, d_logits_row);
    if (args.z_loss_coef != 0)
      (void)z_loss_term(detail::row_of(r.logits, t), args.z_loss_coef / static_cast<double>(tokens),
                        d_logits_row);
  }

  moe::detail::host_gemm(
      tokens, hidden, experts, [&](index_t t, index_t e) { return d_logits(t, e); },
      [&](index_t e, index_t h) { return to_accumulate(w_gate(h, e)); },
      [&](index_t t, index_t h, double v) { dx(t, h) += v; });
  moe::detail::host_gemm(
      hidden, experts, tokens, [&](index_t h, index_t t) { return x(t, h); },
      [&](index_t t, index_t e) { return d_logits(t, e); },
      [&](index_t h, index_t e, double v) {
        d_w_gate(h, e) = from_accumulate<T>(static_cast<accumulate_t<T>>(v));
      });
}

}  // namespace moe::gating
