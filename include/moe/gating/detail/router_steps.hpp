// SPDX-License-Identifier: Apache-2.0
#pragma once
// The steps of the host router (gating/router.hpp), forward and backward, one function per
// step of router.hpp's opening comment: `route` and `route_backward` call them in order.

#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/view.hpp>
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
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace moe::gating::detail {

/// The aux loss of routing `r` and, when `d_scores_of` is given, its gradient: for each
/// token t, `d_scores_of(t, g)` receives g = ∂loss/∂p_{t,·} (experts) to map into the
/// scores. Groups of the loss: G local groups when Aux averages per group, else one. An
/// empty call's loss is 0 (losses.hpp).
template <class Score, class Aux, class DScores>
double aux_loss(host_routing const& r, index_t local_groups, DScores&& d_scores_of) {
  index_t const tokens = r.tokens(), experts = r.experts();
  int const k = r.k();
  index_t const groups = Aux::per_group ? local_groups : 1, size = tokens / groups;
  if (size == 0) return 0;
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

/// Step 1: the logits x' · W_gate into r.logits, x' = x ⊙ jitter(t, h) when the call
/// jitters the input.
template <class T>
void router_logits(gate_args const& args, matrix_view<T const> x, matrix_view<T const> w_gate,
                   host_routing& r) {
  bool const jitter_x = args.training && args.jitter > 0 && args.jitter_on == jitter_target::input;
  moe::detail::host_gemm(
      x.extent(0), w_gate.extent(1), x.extent(1),
      [&](index_t t, index_t h) {
        double const v = static_cast<double>(to_accumulate(x(t, h)));
        return jitter_x ? v * jitter_factor(args.jitter, args.seed, t,
                                            static_cast<std::uint32_t>(h), rng_stream::jitter_input)
                        : v;
      },
      [&](index_t h, index_t e) { return to_accumulate(w_gate(h, e)); },
      [&](index_t t, index_t e, double v) { r.logits(t, e) = v; });
}

/// Steps 1 to 3 for every token: the training noise on the logits, scores, selection, the
/// z-loss, weights before drops and random routing of the 2nd choice (slot no_slot).
template <gate G>
void select_experts(gate_args const& args, renormalize normalize, host_routing& r,
                    routing_summary& summary) {
  using Score = typename G::score_function;
  using Selection = selection_of<G>;
  index_t const tokens = r.tokens(), experts = r.experts();
  int const k = r.k();
  auto const e_count = static_cast<std::size_t>(experts);
  bool const jitter_l = args.training && args.jitter > 0 && args.jitter_on == jitter_target::logits;
  double const noise_std =
      args.training ? static_cast<double>(args.gate_noise) / static_cast<double>(experts) : 0;
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
    span<double> const scores = mutable_row_of(r.scores, t);
    Score::apply(row_of(r.logits, t), scores);
    for (std::size_t e = 0; e < e_count; ++e)
      selection[e] = ranks_logits
                         ? (std::isnan(scores[e]) ? scores[e] : r.logits(t, e))
                         : scores[e] + (args.expert_bias.empty() ? 0.0 : args.expert_bias[e]);
    Selection::select(selection, {&r.expert(t, 0), static_cast<std::size_t>(k)});
    summary.z_loss += z_loss_term(row_of(r.logits, t), 0, {}) / static_cast<double>(tokens);

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
}

/// Step 4's order: local group g's assignments a = t·k + j, in the priority order of
/// Priority, into `order`.
template <class Priority>
void order_group(index_t g, index_t group_size, gate_args const& args, double scale,
                 host_routing& r, std::int64_t* order) {
  int const k = r.k();
  index_t const per_group = group_size * k;
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
    for_each_in_order<Priority>(
        group_size, k, [&](index_t t, int j) { order[n++] = (g * group_size + t) * k + j; });
  }
}

/// Step 4's positions: each local group orders its assignments (r.order) and numbers those
/// of each expert (r.slot, left-out ones skipped); r.load sums the groups. Returns the largest
/// per-(group, expert) load.
template <class Priority>
index_t assign_positions(gate_args const& args, double scale, host_routing& r) {
  index_t const experts = r.experts(), groups = args.groups, group_size = r.tokens() / groups;
  int const k = r.k();
  auto const e_count = static_cast<std::size_t>(experts);
  span<std::int64_t> const group_load = r.counts.first(e_count);
  for (index_t e = 0; e < experts; ++e) r.load(e) = 0;
  index_t max_load = 0;
  index_t const per_group = group_size * k;
  for (index_t g = 0; g < groups; ++g) {
    std::int64_t* const order = r.order.data() + g * per_group;
    order_group<Priority>(g, group_size, args, scale, r, order);
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
  return max_load;
}

/// Step 4's slots once the capacity is known (summary.max_load set): kept ones packed after
/// the earlier groups', dropped ones past C.
inline void slots_under_capacity(capacity_args const& cap, host_routing& r,
                                 routing_summary& summary) {
  index_t const experts = r.experts();
  int const k = r.k();
  auto const e_count = static_cast<std::size_t>(experts);
  index_t const group_cap = group_capacity(cap, summary.max_load);
  r.capacity = summary.capacity = resolve_capacity(cap, summary.max_load);
  span<std::int64_t> const kept = r.counts.first(e_count);
  span<std::int64_t> const dropped = r.counts.subspan(e_count, e_count);
  for (std::size_t e = 0; e < e_count; ++e) kept[e] = dropped[e] = 0;
  for (index_t i = 0; i < r.tokens() * k; ++i) {
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
}

/// Step 5's weights: α · s_j / D when kept, else 0 (weights.hpp).
inline void final_weights(renormalize normalize, double scale, host_routing& r) {
  for (index_t t = 0; t < r.tokens(); ++t)
    finalize_token_weights(&r.weight(t, 0), &r.slot(t, 0), r.k(), r.capacity,
                           normalize == renormalize::after_drops, scale);
}

/// Step 5's losses: me and ce over the call into r.mean_score and r.first_choice; returns
/// the aux loss.
template <class Score, class Aux>
double route_losses(index_t groups, host_routing& r) {
  index_t const tokens = r.tokens();
  auto const e_count = static_cast<std::size_t>(r.experts());
  gshard_aux_terms(as_const(r.scores), as_const(r.expert), r.mean_score, r.first_choice);
  if constexpr (!score_sums_to_one<Score>) {
    span<double> const p = r.scratch.first(e_count);
    for (std::size_t e = 0; e < e_count; ++e) r.mean_score[e] = 0;
    for (index_t t = 0; t < tokens; ++t) {
      (void)aux_probabilities<Score>(row_of(r.scores, t), p);
      for (std::size_t e = 0; e < e_count; ++e) r.mean_score[e] += p[e];
    }
    if (tokens > 0)  // an empty call's means are 0
      for (std::size_t e = 0; e < e_count; ++e) r.mean_score[e] /= static_cast<double>(tokens);
  }
  return aux_loss<Score, Aux>(r, groups, nullptr);
}

/// d_logits = the aux loss's gradient ∂/∂s (coefficient included), through p = s / Σ s
/// where needed; 0 without an aux loss. d_logits holds ∂/∂s until the score backward.
template <gate G>
void aux_score_gradient(gate_args const& args, host_routing const& r,
                        matrix_view<double> d_logits) {
  using Score = typename G::score_function;
  auto const e_count = static_cast<std::size_t>(r.experts());
  std::fill_n(d_logits.data_handle(), element_count(d_logits), 0.0);
  if (args.aux_loss_coef == 0) return;
  double const coef = static_cast<double>(args.aux_loss_coef);
  (void)aux_loss<Score, aux_loss_of<G>>(r, args.groups, [&](index_t t, span<double const> d_p) {
    span<double const> const s = row_of(r.scores, t);
    if constexpr (score_sums_to_one<Score>) {
      for (std::size_t e = 0; e < e_count; ++e) d_logits(t, e) += coef * d_p[e];
    } else {
      double sum = 0, dot = 0;
      for (std::size_t e = 0; e < e_count; ++e) sum += s[e];
      if (sum > 0) {
        for (std::size_t e = 0; e < e_count; ++e) dot += d_p[e] * s[e] / sum;
        for (std::size_t e = 0; e < e_count; ++e) d_logits(t, e) += coef * (d_p[e] - dot) / sum;
      }
    }
  });
}

/// Token t's d_scores (r.d_scores, from the aux part in d_logits) through w_j = α · s_j / D,
/// D the sum over the selected or the kept set.
inline void renormalization_gradient(index_t t, renormalize normalize, double scale,
                                     host_routing const& r, matrix_view<double const> d_weight,
                                     matrix_view<double const> d_logits) {
  int const k = r.k();
  span<double> const d_scores = r.d_scores;
  for (index_t e = 0; e < r.experts(); ++e) d_scores[static_cast<std::size_t>(e)] = d_logits(t, e);
  double sum = 0, weighted = 0;
  for (int j = 0; j < k; ++j) {
    if (in_divisor(normalize, r.kept(t, j))) sum += r.scores(t, r.expert(t, j));
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
      if (in_divisor(normalize, r.kept(t, j)))
        d_scores[static_cast<std::size_t>(r.expert(t, j))] -= weighted / (sum * sum);
    }
}

/// Every token's d_logits row: the renormalisation, the score function's backward, the
/// z-loss; the additive noise passes the gradient through, the logits' jitter scales it.
template <gate G>
void logits_gradient(gate_args const& args, host_routing const& r,
                     matrix_view<double const> d_weight, matrix_view<double> d_logits) {
  using Score = typename G::score_function;
  index_t const tokens = r.tokens(), experts = r.experts();
  renormalize const normalize = effective_renormalize<Score, renormalization_of<G>>(args, r.k());
  double const scale = static_cast<double>(args.scaling_factor);
  bool const jitter_l = args.training && args.jitter > 0 && args.jitter_on == jitter_target::logits;
  for (index_t t = 0; t < tokens; ++t) {
    renormalization_gradient(t, normalize, scale, r, d_weight, as_const(d_logits));
    span<double> const d_logits_row = mutable_row_of(d_logits, t);
    Score::backward(row_of(r.scores, t), r.d_scores, d_logits_row);
    if (args.z_loss_coef != 0)
      (void)z_loss_term(row_of(r.logits, t),
                        static_cast<double>(args.z_loss_coef) / static_cast<double>(tokens),
                        d_logits_row);
    if (jitter_l)
      for (index_t e = 0; e < experts; ++e)
        d_logits_row[static_cast<std::size_t>(e)] *= jitter_factor(
            args.jitter, args.seed, t, static_cast<std::uint32_t>(e), rng_stream::jitter_logits);
  }
}

}  // namespace moe::gating::detail
