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
    for (std::size_t e = 0; e < logits.size(); ++e) {
      scores[e] = std::exp(logits[e] - max_logit);
      sum += scores[e];
    }
    for (double& s : scores) s /= sum;
  }

  /// [in] scores and their gradient, [out] the gradient of the logits.
  static void backward(span<double const> scores, span<double const> d_scores,
                       span<double> d_logits) noexcept {
    double dot = 0;
    for (std::size_t e = 0; e < scores.size(); ++e) dot += scores[e] * d_scores[e];
    for (std::size_t e = 0; e < scores.size(); ++e) d_logits[e] = scores[e] * (d_scores[e] - dot);
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
    for (std::size_t e = 0; e < logits.size(); ++e) {
      // exp of a non-positive argument only: no overflow for either sign.
      double const l = logits[e];
      scores[e] = l >= 0 ? 1 / (1 + std::exp(-l)) : std::exp(l) / (1 + std::exp(l));
    }
  }

  /// [in] scores and their gradient, [out] the gradient of the logits.
  static void backward(span<double const> scores, span<double const> d_scores,
                       span<double> d_logits) noexcept {
    for (std::size_t e = 0; e < scores.size(); ++e)
      d_logits[e] = d_scores[e] * scores[e] * (1 - scores[e]);
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
      probabilities[e] = sum > 0 ? scores[e] / sum : 0;
    return sum;
  }
}

/// log Σ_e exp(l_e), computed stably: the z-loss is its square.
inline double logsumexp(span<double const> logits) noexcept {
  double max_logit = -INFINITY;
  for (double l : logits) max_logit = l > max_logit ? l : max_logit;
  double sum = 0;
  for (double l : logits) sum += std::exp(l - max_logit);
  return max_logit + std::log(sum);
}

}  // namespace moe::gating
