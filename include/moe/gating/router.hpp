// SPDX-License-Identifier: Apache-2.0
#pragma once
// The host backend of a whole gate, forward and backward: router logits x · W_gate (with
// training noise), scores, expert selection (bias, groups), combine weights
// (renormalisation, scaling), GShard's random routing, slot assignment under a priority per
// local group, capacity, and the load-balancing losses; then the gradient back through all
// of them into x and W_gate.
//
// Forward, per call of T tokens, k choices, G local groups of S = T/G tokens:
//   1. l = x' · W_gate, x' = x ⊙ jitter(t, h) when training with jitter on the input;
//      when training: l ⊙= jitter(t, e) (jitter on the logits), then l += (gate_noise/E) ·
//      normal(t, e). `logits` holds the l the scores see.
//   2. s = Score(l); experts = Selection(s + expert_bias) (ties: lower index); without a bias,
//      the top k of all experts rank the logits when the scores rank as they do (a NaN score
//      ranks as NaN), so that scores rounding merges still rank apart.
//   3. weights before drops: s_j, divided by Σ_selected s when the call renormalises before
//      drops; random routing (training, k = 2) then leaves out the 2nd choice unless
//      2 · w_1 > u(t).
//   4. each group orders its assignments by the priority; positions per (group, expert); the
//      largest position count goes through `reduce_max_load`; C_g = the capacity policy's;
//      kept iff position < C_g. Slots: a group's kept assignments of expert e follow those of
//      the groups before it (slot = kept so far), dropped ones get C + (dropped so far), so
//      that kept ⇔ slot < C = G · C_g and the capacity layout's [E, C, H] holds every group.
//      With G = 1 the slot is the position.
//   5. final weights α · s_j / D (weights.hpp), 0 when not kept; the aux loss (losses.hpp) and
//      the z-loss over the noisy logits.

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/detail/host_gemm.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/groups.hpp>
#include <moe/gating/host_routing.hpp>
#include <moe/gating/losses.hpp>
#include <moe/gating/philox.hpp>
#include <moe/gating/policies.hpp>
#include <moe/gating/priority.hpp>
#include <moe/gating/random_routing.hpp>
#include <moe/gating/scores.hpp>
#include <moe/gating/top_k.hpp>
#include <moe/gating/weights.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>

namespace moe::gating {

/// What the T of one call (x's rows) must be under `args`: at least 1 and a multiple of the
/// local groups. The router and every entry point that takes x run this one check.
inline status check_call_tokens(gate_args const& args, index_t tokens, char const* argument = "x") {
  if (tokens < 1) return status::failure(argument, "has no tokens");
  if (args.groups > 1 && tokens % args.groups != 0)
    return status::failure(argument, "has " + std::to_string(tokens) +
                                         " tokens, not a multiple of the " +
                                         std::to_string(args.groups) + " local groups");
  return {};
}

/// The values of `args.expert_bias`, host memory on the host backend: all finite. The
/// router and the host layer's check of a call run this one check (the bias's size and
/// pointer are the gate's `can_implement`'s, which reads no memory).
inline status check_host_expert_bias(gate_args const& args) {
  for (float b : args.expert_bias)
    if (!std::isfinite(b)) return status::failure("expert_bias", "holds a non-finite value");
  return {};
}

namespace detail {

/// Everything route checks before any work.
template <gate G, class T>
status check_route(G const& gate, gate_args const& args, matrix_view<T const> x,
                   matrix_view<T const> w_gate, host_routing const& r) {
  if (auto s = check_gate(gate, args); !s) return s;
  index_t const tokens = x.extent(0), experts = w_gate.extent(1);
  if (w_gate.extent(0) != x.extent(1) || experts != args.experts)
    return status::failure("w_gate",
                           "is " + moe::detail::format_extents(moe::detail::extents_of(w_gate)) +
                               "; expected (" + std::to_string(x.extent(1)) + ", " +
                               std::to_string(args.experts) + ")");
  if (auto s = check_host_expert_bias(args); !s) return s;
  if (auto s = check_call_tokens(args, tokens); !s) return s;
  return check_routing_state(r, tokens, experts, gate.k(args));
}

/// The aux loss of routing `r` and, when `d_scores_of` is given, its gradient: for each
/// token t, `d_scores_of(t, g)` receives g = ∂loss/∂p_{t,·} (experts) to map into the
/// scores. Groups of the loss: G local groups when Aux averages per group, else one.
template <class Score, class Aux, class DScores>
double aux_loss(host_routing const& r, index_t local_groups, DScores&& d_scores_of) {
  index_t const tokens = r.tokens(), experts = r.experts();
  int const k = r.k();
  index_t const groups = Aux::per_group ? local_groups : 1, size = tokens / groups;
  int const counted = Aux::first_choice_only ? 1 : k;
  auto const e_count = static_cast<std::size_t>(experts);
  span<double> const mean = r.scratch.first(e_count);
  span<double> const fraction = r.scratch.subspan(e_count, e_count);
  span<double> const p = r.scratch.subspan(2 * e_count, e_count);
  double loss = 0;
  for (index_t g = 0; g < groups; ++g) {
    for (std::size_t e = 0; e < e_count; ++e) mean[e] = fraction[e] = 0;
    for (index_t t = g * size; t < (g + 1) * size; ++t) {
      (void)aux_probabilities<Score>(row_of(r.scores, t), p);
      for (std::size_t e = 0; e < e_count; ++e) mean[e] += p[e];
      for (int j = 0; j < counted; ++j) fraction[static_cast<std::size_t>(r.expert(t, j))] += 1;
    }
    for (std::size_t e = 0; e < e_count; ++e) {
      mean[e] /= static_cast<double>(size);
      fraction[e] /= static_cast<double>(counted * size);
    }
    loss += gshard_aux_loss(mean, fraction);
    // ∂/∂p_{t,e} = E · f_e / (G · S), the same for every token of the group.
    if constexpr (!std::is_same_v<std::remove_cvref_t<DScores>, std::nullptr_t>) {
      for (std::size_t e = 0; e < e_count; ++e)
        p[e] = static_cast<double>(experts) * fraction[e] /
               (static_cast<double>(groups) * static_cast<double>(size));
      for (index_t t = g * size; t < (g + 1) * size; ++t) d_scores_of(t, span<double const>(p));
    }
  }
  return loss / static_cast<double>(groups);
}

}  // namespace detail

/// Forward of gate G on the host: fills `r` and returns the call's scalars. Throws
/// `invalid_argument` before any work when the arguments or shapes do not suit G.
/// @param[in]  x      (tokens, hidden)  host memory
/// @param[in]  w_gate (hidden, experts) host memory
/// @param[out] r      routing state, carved for x's T and the gate's k (carve_host_routing)
/// @param reduce_max_load maps this call's largest per-(group, expert) load to the one dynamic
///        capacity uses: the identity on one rank, the maximum over the ranks with several
///        (Tutel all-reduces it). Called once, on every call.
template <gate G, element T, class ReduceMaxLoad = std::identity>
routing_summary route(host_backend, G const& gate, gate_args const& args, matrix_view<T const> x,
                      matrix_view<T const> w_gate, host_routing& r,
                      ReduceMaxLoad reduce_max_load = {}) {
  using Score = typename G::score_function;
  using Priority = typename G::priority;
  using Selection = selection_of<G>;
  detail::check_route(gate, args, x, w_gate, r).throw_if_failed();

  index_t const tokens = x.extent(0), hidden = x.extent(1), experts = w_gate.extent(1);
  int const k = gate.k(args);
  index_t const groups = args.groups, group_size = tokens / groups;
  auto const e_count = static_cast<std::size_t>(experts);
  renormalize const normalize = effective_renormalize<Score, renormalization_of<G>>(args, k);
  double const scale = static_cast<double>(args.scaling_factor);
  bool const jitter_x = args.training && args.jitter > 0 && args.jitter_on == jitter_target::input;
  bool const jitter_l = args.training && args.jitter > 0 && args.jitter_on == jitter_target::logits;
  double const noise_std =
      args.training ? static_cast<double>(args.gate_noise) / static_cast<double>(experts) : 0;

  // 1. Logits, with the training noise.
  moe::detail::host_gemm(
      tokens, experts, hidden,
      [&](index_t t, index_t h) {
        double const v = static_cast<double>(to_accumulate(x(t, h)));
        return jitter_x ? v * jitter_factor(args.jitter, args.seed, t,
                                            static_cast<std::uint32_t>(h), rng_stream::jitter_input)
                        : v;
      },
      [&](index_t h, index_t e) { return to_accumulate(w_gate(h, e)); },
      [&](index_t t, index_t e, double v) { r.logits(t, e) = v; });

  routing_summary summary{.tokens = tokens};
  span<double> const selection = r.scratch.first(e_count);
  // Without a bias, all experts compete on their logits when the scores rank as they do: the
  // same order, without the ties rounding makes among scores (scores.hpp, `increasing`).
  bool const ranks_logits = score_is_increasing<Score> && args.expert_bias.empty() &&
                            std::is_same_v<Selection, all_experts>;
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t e = 0; e < experts; ++e) {
      auto const column = static_cast<std::uint32_t>(e);
      if (jitter_l)
        r.logits(t, e) *=
            jitter_factor(args.jitter, args.seed, t, column, rng_stream::jitter_logits);
      if (noise_std > 0)
        r.logits(t, e) += noise_std * rng_normal(args.seed, t, column, rng_stream::logit_noise);
    }
    // 2. Scores and selection.
    span<double> const scores = detail::mutable_row_of(r.scores, t);
    Score::apply(detail::row_of(r.logits, t), scores);
    for (std::size_t e = 0; e < e_count; ++e)
      selection[e] = ranks_logits
                         ? (std::isnan(scores[e]) ? scores[e] : r.logits(t, e))
                         : scores[e] + (args.expert_bias.empty() ? 0.0 : args.expert_bias[e]);
    Selection::select(selection, {&r.expert(t, 0), static_cast<std::size_t>(k)});
    summary.z_loss += z_loss_term(detail::row_of(r.logits, t), 0, {}) / static_cast<double>(tokens);

    // 3. Weights before drops, and random routing of the 2nd choice.
    double sum = 0;
    for (int j = 0; j < k; ++j) sum += scores[static_cast<std::size_t>(r.expert(t, j))];
    for (int j = 0; j < k; ++j) {
      double const s = scores[static_cast<std::size_t>(r.expert(t, j))];
      r.weight(t, j) = normalize == renormalize::before_drops && sum > 0 ? s / sum : s;
      r.slot(t, j) = 0;
    }
    if constexpr (second_expert_of<G>::random)
      if (args.training && !keeps_second_expert(r.weight(t, 1), args.seed, t)) {
        r.slot(t, 1) = no_slot;
        ++summary.unrouted;
      }
  }

  // 4. Priority order and positions per local group.
  span<std::int64_t> const group_load = r.counts.first(e_count);
  for (index_t e = 0; e < experts; ++e) r.load(e) = 0;
  index_t max_load = 0;
  index_t const per_group = group_size * k;
  for (index_t g = 0; g < groups; ++g) {
    std::int64_t* const order = r.order.data() + g * per_group;
    if constexpr (keyed_priority<Priority>) {
      for (index_t i = 0; i < per_group; ++i) {
        index_t const a = g * per_group + i, t = a / k;
        int const j = static_cast<int>(a % k);
        priority_key const key = Priority::key({.token = t,
                                                .choice = j,
                                                .weight = r.weight(t, j) * scale,
                                                .first_score = r.scores(t, r.expert(t, 0)),
                                                .seed = args.seed});
        r.key[static_cast<std::size_t>(2 * a)] = key.primary;
        r.key[static_cast<std::size_t>(2 * a + 1)] = key.secondary;
        order[i] = a;
      }
      std::sort(order, order + per_group, [&](std::int64_t a, std::int64_t b) {
        auto const key_of = [&](std::int64_t i) {
          return priority_key{r.key[static_cast<std::size_t>(2 * i)],
                              r.key[static_cast<std::size_t>(2 * i + 1)]};
        };
        return precedes(key_of(a), a / k, static_cast<int>(a % k), key_of(b), b / k,
                        static_cast<int>(b % k));
      });
    } else {
      index_t n = 0;
      Priority::for_each_in_order(
          group_size, k, [&](index_t t, int j) { order[n++] = (g * group_size + t) * k + j; });
    }
    for (std::size_t e = 0; e < e_count; ++e) group_load[e] = 0;
    for (index_t i = 0; i < per_group; ++i) {
      index_t const t = order[i] / k;
      int const j = static_cast<int>(order[i] % k);
      if (r.slot(t, j) == no_slot) continue;
      r.slot(t, j) = group_load[static_cast<std::size_t>(r.expert(t, j))]++;
    }
    for (std::size_t e = 0; e < e_count; ++e) {
      r.load(static_cast<index_t>(e)) += group_load[e];
      max_load = std::max<index_t>(max_load, group_load[e]);
    }
  }

  // Capacity, then slots: kept ones packed after the earlier groups', dropped ones past C.
  capacity_args const cap = capacity_args_of(args, k, capacity_of<G>::rounding, tokens);
  summary.max_load = static_cast<index_t>(reduce_max_load(max_load));
  index_t const group_cap = group_capacity(cap, summary.max_load);
  r.capacity = summary.capacity = resolve_capacity(cap, summary.max_load);
  span<std::int64_t> const kept = r.counts.first(e_count);
  span<std::int64_t> const dropped = r.counts.subspan(e_count, e_count);
  for (std::size_t e = 0; e < e_count; ++e) kept[e] = dropped[e] = 0;
  for (index_t i = 0; i < tokens * k; ++i) {
    index_t const t = r.order[static_cast<std::size_t>(i)] / k;
    int const j = static_cast<int>(r.order[static_cast<std::size_t>(i)] % k);
    if (r.slot(t, j) == no_slot) continue;
    auto const e = static_cast<std::size_t>(r.expert(t, j));
    if (r.slot(t, j) < group_cap) {
      r.slot(t, j) = kept[e]++;
    } else {
      r.slot(t, j) = summary.capacity + dropped[e]++;
      ++summary.dropped;
    }
  }

  // 5. Final weights.
  for (index_t t = 0; t < tokens; ++t) {
    double kept_sum = 0;
    if (normalize == renormalize::after_drops)
      for (int j = 0; j < k; ++j)
        if (r.kept(t, j)) kept_sum += r.scores(t, r.expert(t, j));
    for (int j = 0; j < k; ++j) {
      if (!r.kept(t, j)) {
        r.weight(t, j) = 0;
        continue;
      }
      double const w = normalize == renormalize::after_drops && kept_sum > 0
                           ? r.scores(t, r.expert(t, j)) / kept_sum
                           : r.weight(t, j);
      r.weight(t, j) = w * scale;
    }
  }

  gshard_aux_terms(as_const(r.scores), as_const(r.expert), r.mean_score, r.first_choice);
  if constexpr (!score_sums_to_one<Score>) {
    span<double> const p = r.scratch.first(e_count);
    for (std::size_t e = 0; e < e_count; ++e) r.mean_score[e] = 0;
    for (index_t t = 0; t < tokens; ++t) {
      (void)aux_probabilities<Score>(detail::row_of(r.scores, t), p);
      for (std::size_t e = 0; e < e_count; ++e) r.mean_score[e] += p[e];
    }
    for (std::size_t e = 0; e < e_count; ++e) r.mean_score[e] /= static_cast<double>(tokens);
  }
  summary.aux_loss = detail::aux_loss<Score, aux_loss_of<G>>(r, groups, nullptr);
  return summary;
}

/// Backward of gate G on the host, for the objective ⟨d_weight, weight⟩ + aux_loss_coef ·
/// aux_loss + z_loss_coef · z_loss. Dropped and left-out assignments receive no gradient
/// through their weight; the expert bias, the selection and the noise receive none. Call it
/// with the forward's arguments and state.
/// @param[in]    d_weight (tokens, k)       gradient of the combine weights
/// @param[in]    x        (tokens, hidden)  the forward's input
/// @param[inout] d_logits (tokens, experts) scratch, overwritten
/// @param[inout] dx       (tokens, hidden)  accumulated into
/// @param[out]   d_w_gate (hidden, experts) overwritten
template <gate G, element T>
void route_backward(host_backend, G const& gate, gate_args const& args, host_routing const& r,
                    matrix_view<double const> d_weight, matrix_view<double const> x,
                    matrix_view<T const> w_gate, matrix_view<double> d_logits,
                    matrix_view<double> dx, matrix_view<T> d_w_gate) {
  using Score = typename G::score_function;
  index_t const tokens = r.tokens(), experts = r.experts(), hidden = x.extent(1);
  int const k = r.k();
  auto const e_count = static_cast<std::size_t>(experts);
  {
    if (auto s = check_gate(gate, args); !s) s.throw_if_failed();
    if (auto s = detail::check_routing_state(r, tokens, experts, gate.k(args)); !s)
      s.throw_if_failed();
    auto const expect = [](auto const& v, char const* name, index_t rows, index_t cols) {
      if (auto s = check_extents(v, name, {rows, cols}); !s) s.throw_if_failed();
    };
    expect(d_weight, "d_weight", tokens, k);
    expect(x, "x", tokens, hidden);
    expect(w_gate, "w_gate", hidden, experts);
    expect(d_logits, "d_logits", tokens, experts);
    expect(dx, "dx", tokens, hidden);
    expect(d_w_gate, "d_w_gate", hidden, experts);
  }
  renormalize const normalize = effective_renormalize<Score, renormalization_of<G>>(args, k);
  double const scale = static_cast<double>(args.scaling_factor);
  bool const jitter_x = args.training && args.jitter > 0 && args.jitter_on == jitter_target::input;
  bool const jitter_l = args.training && args.jitter > 0 && args.jitter_on == jitter_target::logits;

  // The aux loss's gradient, ∂/∂p, into d_scores through p = s / Σ s where needed.
  std::fill_n(d_logits.data_handle(), element_count(d_logits), 0.0);
  if (args.aux_loss_coef != 0) {
    double const coef = static_cast<double>(args.aux_loss_coef);
    (void)detail::aux_loss<Score, aux_loss_of<G>>(
        r, args.groups, [&](index_t t, span<double const> d_p) {
          // d_logits holds ∂/∂s until the score backward below.
          span<double const> const s = detail::row_of(r.scores, t);
          if constexpr (score_sums_to_one<Score>) {
            for (std::size_t e = 0; e < e_count; ++e) d_logits(t, e) += coef * d_p[e];
          } else {
            double sum = 0, dot = 0;
            for (std::size_t e = 0; e < e_count; ++e) sum += s[e];
            if (sum > 0) {
              for (std::size_t e = 0; e < e_count; ++e) dot += d_p[e] * s[e] / sum;
              for (std::size_t e = 0; e < e_count; ++e)
                d_logits(t, e) += coef * (d_p[e] - dot) / sum;
            }
          }
        });
  }

  for (index_t t = 0; t < tokens; ++t) {
    span<double> const d_scores = r.d_scores;
    for (std::size_t e = 0; e < e_count; ++e) d_scores[e] = d_logits(t, e);

    // Through w_j = α · s_j / D, D the sum over the selected or the kept set.
    double sum = 0, weighted = 0;
    for (int j = 0; j < k; ++j) {
      bool const in_set = normalize == renormalize::before_drops ||
                          (normalize == renormalize::after_drops && r.kept(t, j));
      if (in_set) sum += r.scores(t, r.expert(t, j));
      if (r.kept(t, j)) weighted += scale * d_weight(t, j) * r.scores(t, r.expert(t, j));
    }
    bool const divided = normalize != renormalize::none && sum > 0;
    for (int j = 0; j < k; ++j) {
      if (!r.kept(t, j)) continue;
      double const d = scale * d_weight(t, j);
      d_scores[static_cast<std::size_t>(r.expert(t, j))] += divided ? d / sum : d;
    }
    if (divided)
      for (int j = 0; j < k; ++j) {
        bool const in_set = normalize == renormalize::before_drops || r.kept(t, j);
        if (in_set) d_scores[static_cast<std::size_t>(r.expert(t, j))] -= weighted / (sum * sum);
      }

    span<double> const d_logits_row = detail::mutable_row_of(d_logits, t);
    Score::backward(detail::row_of(r.scores, t), d_scores, d_logits_row);
    if (args.z_loss_coef != 0)
      (void)z_loss_term(detail::row_of(r.logits, t),
                        static_cast<double>(args.z_loss_coef) / static_cast<double>(tokens),
                        d_logits_row);
    // The additive noise passes the gradient through; the jitter of the logits scales it.
    if (jitter_l)
      for (index_t e = 0; e < experts; ++e)
        d_logits_row[static_cast<std::size_t>(e)] *= jitter_factor(
            args.jitter, args.seed, t, static_cast<std::uint32_t>(e), rng_stream::jitter_logits);
  }

  auto const jitter_of = [&](index_t t, index_t h) {
    return jitter_x ? jitter_factor(args.jitter, args.seed, t, static_cast<std::uint32_t>(h),
                                    rng_stream::jitter_input)
                    : 1.0;
  };
  moe::detail::host_gemm(
      tokens, hidden, experts, [&](index_t t, index_t e) { return d_logits(t, e); },
      [&](index_t e, index_t h) { return to_accumulate(w_gate(h, e)); },
      [&](index_t t, index_t h, double v) { dx(t, h) += jitter_x ? v * jitter_of(t, h) : v; });
  moe::detail::host_gemm(
      hidden, experts, tokens,
      [&](index_t h, index_t t) { return jitter_x ? x(t, h) * jitter_of(t, h) : x(t, h); },
      [&](index_t t, index_t e) { return d_logits(t, e); },
      [&](index_t h, index_t e, double v) {
        d_w_gate(h, e) = from_accumulate<T>(static_cast<accumulate_t<T>>(v));
      });
}

}  // namespace moe::gating
