// SPDX-License-Identifier: Apache-2.0
#pragma once
// Score functions: how a token's router logits become the scores that top-k ranks and that
// become combine weights. Host implementations work on one token's row in float64.
//
//   softmax   s_e = exp(l_e − max l) / Σ_e' exp(l_e' − max l), over all E experts
//             (Tutel, GShard, DeepSpeed, Qwen3)

#include <moe/core/config.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/concepts.hpp>

#include <cmath>
#include <cstddef>

namespace moe::gating {

/// Softmax over all experts. Backward: d_l = s ⊙ (d_s − ⟨s, d_s⟩).
struct softmax {
  using moe_concept = score_function_tag;

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

/// log Σ_e exp(l_e), computed stably: the z-loss is its square.
inline double logsumexp(span<double const> logits) noexcept {
  double max_logit = -INFINITY;
  for (double l : logits) max_logit = l > max_logit ? l : max_logit;
  double sum = 0;
  for (double l : logits) sum += std::exp(l - max_logit);
  return max_logit + std::log(sum);
}

}  // namespace moe::gating
