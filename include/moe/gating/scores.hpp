// SPDX-License-Identifier: Apache-2.0
#pragma once
// Score functions: how a token's router logits become the scores that top-k ranks and that
// become combine weights. Host implementations work on one token's row in float64.
//
//   softmax        s_e = exp(l_e − max l) / Σ_e' exp(l_e' − max l), over all E experts
//                  (Tutel, GShard, DeepSpeed, Qwen3)
//   softmax_topk   top-k on the logits, the weights a softmax over the k selected (Mixtral,
//                  Megatron's default). Its scores are the full softmax: ranking them ranks
//                  the logits, the aux losses average them (as Mixtral and Megatron do), and
//                  the softmax over the selected logits is s_j / Σ_selected s, so the gate
//                  renormalises over the selected experts before drops.
//   sigmoid        s_e = 1 / (1 + exp(−l_e)), each expert on its own (DeepSeek-V3); the aux
//                  losses use s_e / Σ_e' s_e'. A selection bias (gate_args::expert_bias)
//                  changes which experts win, never the weights.
//
// Traits a score function may declare (absent means false):
//   sums_to_one         the scores are a distribution: the aux losses use them as they are
//   normalizes_selected the weights are renormalised over the selected experts, always
//   increasing          each score is increasing in its own logit, and a row's scores are
//                       all NaN or none is: without a bias, the top k of all experts rank the
//                       logits themselves (router.hpp), the exact order of the scores, which
//                       rounding can merge (a saturated sigmoid, an underflowed softmax)

#include <moe/core/config.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/concepts.hpp>

#include <cmath>
#include <cstddef>

namespace moe::gating {

namespace detail {

// exp and log in the precision of their argument. The per-expert math below is written once
// for both backends: the host's rows run it in double, the kernels (kernels/scores.cuh) in
// float, with expf and logf.
MOE_HOST_DEVICE inline float math_exp(float x) noexcept {
  return ::expf(x);
}
MOE_HOST_DEVICE inline double math_exp(double x) noexcept {
  return ::exp(x);
}
MOE_HOST_DEVICE inline float math_log(float x) noexcept {
  return ::logf(x);
}
MOE_HOST_DEVICE inline double math_log(double x) noexcept {
  return ::log(x);
}

/// log Σ_e exp(l_e) from a row's largest logit and Σ_e exp(l_e − max).
template <class Real>
MOE_HOST_DEVICE Real logsumexp_from(Real max_logit, Real sum) noexcept {
  return max_logit + math_log(sum);
}

}  // namespace detail

/// Softmax over all experts. Backward: d_l = s ⊙ (d_s − ⟨s, d_s⟩).
struct softmax {
  using moe_concept = score_function_tag;
  static constexpr bool sums_to_one = true;
  static constexpr bool increasing = true;

  /// [in] logits, [out] scores: one token's row, host memory.
  static void apply(span<double const> logits, span<double> scores) noexcept {
    double max_logit = -INFINITY;
    for (double l : logits) max_logit = l > max_logit ? l : max_logit;
    double sum = 0;
    for (double l : logits) sum += detail::math_exp(l - max_logit);
    for (std::size_t e = 0; e < logits.size(); ++e) scores[e] = score(logits[e], max_logit, sum);
  }

  /// [in] scores and their gradient, [out] the gradient of the logits.
  static void backward(span<double const> scores, span<double const> d_scores,
                       span<double> d_logits) noexcept {
    double dot = 0;
    for (std::size_t e = 0; e < scores.size(); ++e) dot += scores[e] * d_scores[e];
    for (std::size_t e = 0; e < scores.size(); ++e)
      d_logits[e] = d_logit(scores[e], d_scores[e], dot);
  }

  /// One expert's score from its row's largest logit and Σ_e exp(l_e − max).
  template <class Real>
  MOE_HOST_DEVICE static Real score(Real logit, Real max_logit, Real sum) noexcept {
    return detail::math_exp(logit - max_logit) / sum;
  }

  /// One expert's d_l, dot = ⟨s, d_s⟩ over the row.
  template <class Real>
  MOE_HOST_DEVICE static Real d_logit(Real score, Real d_score, Real dot) noexcept {
    return score * (d_score - dot);
  }
};
static_assert(score_function<softmax>);

/// Top-k on the logits, then a softmax over the k selected (Mixtral; Megatron with
/// moe_router_pre_softmax off). Scores and backward are the full softmax's; the gate
/// renormalises the k weights over the selected experts (see the top of this file).
struct softmax_topk : softmax {
  using moe_concept = score_function_tag;
  static constexpr bool normalizes_selected = true;
};
static_assert(score_function<softmax_topk>);

/// Logistic sigmoid of each logit (DeepSeek-V3). Backward: d_l = d_s · s · (1 − s).
struct sigmoid {
  using moe_concept = score_function_tag;
  static constexpr bool sums_to_one = false;
  static constexpr bool increasing = true;

  /// [in] logits, [out] scores: one token's row, host memory.
  static void apply(span<double const> logits, span<double> scores) noexcept {
    for (std::size_t e = 0; e < logits.size(); ++e) scores[e] = score(logits[e]);
  }

  /// [in] scores and their gradient, [out] the gradient of the logits.
  static void backward(span<double const> scores, span<double const> d_scores,
                       span<double> d_logits) noexcept {
    for (std::size_t e = 0; e < scores.size(); ++e) d_logits[e] = d_logit(scores[e], d_scores[e]);
  }

  /// One expert's score; exp of a non-positive argument only: no overflow for either sign.
  template <class Real>
  MOE_HOST_DEVICE static Real score(Real logit) noexcept {
    return logit >= 0 ? 1 / (1 + detail::math_exp(-logit))
                      : detail::math_exp(logit) / (1 + detail::math_exp(logit));
  }

  /// One expert's d_l: each expert on its own.
  template <class Real>
  MOE_HOST_DEVICE static Real d_logit(Real score, Real d_score) noexcept {
    return d_score * score * (1 - score);
  }
};
static_assert(score_function<sigmoid>);

// Near-misses: a score function needs the tag, apply and backward.
namespace detail {
struct score_without_backward {
  using moe_concept = score_function_tag;
  static void apply(span<double const>, span<double>) noexcept {}
};
}  // namespace detail
static_assert(!score_function<detail::score_without_backward> && !score_function<int>);

/// Whether S's scores form a distribution over the experts (S::sums_to_one; false if absent).
template <class S>
inline constexpr bool score_sums_to_one = requires {
  requires static_cast<bool>(S::sums_to_one);
};

/// Whether S renormalises the weights over the selected experts (S::normalizes_selected).
template <class S>
inline constexpr bool score_normalizes_selected = requires {
  requires static_cast<bool>(S::normalizes_selected);
};

/// Whether S's scores rank as its logits do (S::increasing; false if absent).
template <class S>
inline constexpr bool score_is_increasing = requires {
  requires static_cast<bool>(S::increasing);
};

/// One aux-loss probability: score s of a token whose scores sum to `sum`, s / sum (0 when
/// the sum is 0).
template <class Real>
MOE_HOST_DEVICE Real aux_probability(Real score, Real sum) noexcept {
  return sum > 0 ? score / sum : Real{0};
}

/// The probabilities p the aux losses average, from one token's scores: the scores
/// themselves when they sum to one, else s / Σ s (0 when the sum is 0).
/// @param[in]  scores        (experts)
/// @param[out] probabilities (experts)
/// @return Σ s, the divisor (1 when the scores are used as they are)
template <class S>
double aux_probabilities(span<double const> scores, span<double> probabilities) noexcept {
  if constexpr (score_sums_to_one<S>) {
    for (std::size_t e = 0; e < scores.size(); ++e) probabilities[e] = scores[e];
    return 1;
  } else {
    double sum = 0;
    for (double s : scores) sum += s;
    for (std::size_t e = 0; e < scores.size(); ++e)
      probabilities[e] = aux_probability(scores[e], sum);
    return sum;
  }
}

/// log Σ_e exp(l_e), computed stably: the z-loss is its square.
inline double logsumexp(span<double const> logits) noexcept {
  double max_logit = -INFINITY;
  for (double l : logits) max_logit = l > max_logit ? l : max_logit;
  double sum = 0;
  for (double l : logits) sum += detail::math_exp(l - max_logit);
  return detail::logsumexp_from(max_logit, sum);
}

}  // namespace moe::gating
