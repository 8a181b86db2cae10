// SPDX-License-Identifier: Apache-2.0
#pragma once
// Load-balancing losses of the router, with their gradients. The aux losses are normalised
// so that uniform routing gives 1; the layer adds coef · loss to the objective. A gate
// names one aux loss (`G::aux_loss`, gshard_aux by default); all are over the T tokens of
// one call (per rank), with p_{t,e} the router's probabilities (the scores when they sum to
// one, else s / Σ_e s) and choices counted before drops and before random routing (the
// counts are not differentiated):
//
//   gshard_aux   = (1/G) Σ_g E · Σ_e me_{g,e} · ce_{g,e}       (GShard, Tutel, DeepSpeed)
//                  me = mean of p over the group's S tokens, ce = fraction of its tokens whose
//                  1st choice is e; G = 1: E · Σ_e me_e · ce_e over the call
//   switch_aux   = E / (k·T) · Σ_e count_e · me_e              (Megatron "aux_loss", Mixtral)
//                  count_e = selections of e over all k choices of the call's T tokens
//   sequence_aux = (1/G) Σ_g E / (k·S) · Σ_e count_{g,e} · me_{g,e}   (DeepSeek-V3; Megatron
//                  "seq_aux_loss"): switch_aux of each local group (a sequence), averaged
//   z_loss       = mean_t (logsumexp_e l_{t,e})²              (ST-MoE)
//
// An empty call (T = 0: a rank with no tokens under expert parallelism) has every loss 0,
// and no gradient: a mean over no token is taken as 0, never 0/0.
//
// Gradients: ∂/∂p_{t,e} = E · f_{g,e} / (G' · S'), f the fraction the loss multiplies me by
// (ce, or count / (k·S')), S' the tokens it averages over, G' the groups (1 for switch_aux);
// then through p = s / Σ s where the scores do not sum to one.
//
// Hugging Face's load_balancing_loss_func (Mixtral, Qwen3) returns E/T · Σ count_e · me_e,
// which is k · switch_aux: use aux_loss_coef = k · its router_aux_loss_coef.

#include <moe/core/config.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/scores.hpp>

#include <cmath>
#include <cstdint>

namespace moe::gating {

/// GShard's aux loss (the default): 1st choices, per local group.
struct gshard_aux {
  using moe_concept = aux_loss_tag;
  static constexpr char const* name = "gshard_aux";
  static constexpr bool first_choice_only = true;
  static constexpr bool per_group = true;
};
static_assert(aux_loss_policy<gshard_aux>);

/// The Switch/Megatron aux loss: all k choices, over the whole call.
struct switch_aux {
  using moe_concept = aux_loss_tag;
  static constexpr char const* name = "switch_aux";
  static constexpr bool first_choice_only = false;
  static constexpr bool per_group = false;
};
static_assert(aux_loss_policy<switch_aux>);

/// The sequence-level aux loss (DeepSeek-V3): switch_aux of each local group, averaged.
struct sequence_aux {
  using moe_concept = aux_loss_tag;
  static constexpr char const* name = "sequence_aux";
  static constexpr bool first_choice_only = false;
  static constexpr bool per_group = true;
};
static_assert(aux_loss_policy<sequence_aux>);
static_assert(!aux_loss_policy<int> && !aux_loss_policy<softmax>);

/// me and ce of the GShard aux loss, over the tokens of one call (host memory); all 0 over
/// an empty call (a mean over no token is taken as 0, so that its loss is 0, not 0/0).
/// @param[in]  scores (tokens, experts)
/// @param[in]  expert (tokens, k)  column 0 is each token's 1st choice
/// @param[out] mean_score, first_choice_fraction (experts)
inline void gshard_aux_terms(matrix_view<double const> scores,
                             matrix_view<std::int32_t const> expert, span<double> mean_score,
                             span<double> first_choice_fraction) noexcept {
  index_t const tokens = scores.extent(0), experts = scores.extent(1);
  for (index_t e = 0; e < experts; ++e) mean_score[e] = first_choice_fraction[e] = 0;
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t e = 0; e < experts; ++e) mean_score[e] += scores(t, e);
    first_choice_fraction[expert(t, 0)] += 1;
  }
  if (tokens == 0) return;
  for (index_t e = 0; e < experts; ++e) {
    mean_score[e] /= static_cast<double>(tokens);
    first_choice_fraction[e] /= static_cast<double>(tokens);
  }
}

/// E · Σ_e me_e · ce_e.
inline double gshard_aux_loss(span<double const> mean_score,
                              span<double const> first_choice_fraction) noexcept {
  double sum = 0;
  for (std::size_t e = 0; e < mean_score.size(); ++e)
    sum += mean_score[e] * first_choice_fraction[e];
  return static_cast<double>(mean_score.size()) * sum;
}

/// ∂ gshard_aux / ∂ s_{t,e} = E · ce_e / T, the same for every token.
inline double gshard_aux_score_gradient(double first_choice_fraction, index_t experts,
                                        index_t tokens) noexcept {
  return static_cast<double>(experts) * first_choice_fraction / static_cast<double>(tokens);
}

}  // namespace moe::gating

namespace moe::gating {

/// One token's term of the z-loss, (logsumexp l)², and the gradient of `scale` times it:
/// d_l_e += scale · 2 · lse · exp(l_e − lse).
/// @param[in]    logits   (experts)
/// @param[inout] d_logits (experts) accumulated into
inline double z_loss_term(span<double const> logits, double scale, span<double> d_logits) noexcept {
  double const lse = logsumexp(logits);
  if (scale != 0)
    for (std::size_t e = 0; e < logits.size(); ++e)
      d_logits[e] += scale * 2 * lse * std::exp(logits[e] - lse);
  return lse * lse;
}

}  // namespace moe::gating

namespace moe::gating {

/// One step of aux-loss-free balancing (DeepSeek-V3) for one expert: rate · sign(mean − load),
/// sign(0) = 0. An overloaded expert's bias goes down, an underloaded one's up.
MOE_HOST_DEVICE constexpr float expert_bias_step(std::int64_t load, double mean_load,
                                                 float rate) noexcept {
  double const d = mean_load - static_cast<double>(load);
  return d > 0 ? rate : d < 0 ? -rate : 0.0f;
}

/// b_e += rate · sign(mean − load_e) for every expert, mean = Σ_e load_e / E: the update of
/// gate_args::expert_bias between steps, from the loads a call reports (host memory).
/// @param[inout] bias (experts)
/// @param[in]    load (experts) assignments per expert, e.g. layer_stats::load
inline void update_expert_bias(span<float> bias, span<std::int64_t const> load,
                               float rate) noexcept {
  double total = 0;
  for (std::int64_t l : load) total += static_cast<double>(l);
  double const mean = load.empty() ? 0 : total / static_cast<double>(load.size());
  for (std::size_t e = 0; e < bias.size() && e < load.size(); ++e)
    bias[e] += expert_bias_step(load[e], mean, rate);
}

}  // namespace moe::gating
