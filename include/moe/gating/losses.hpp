// SPDX-License-Identifier: Apache-2.0
#pragma once
// Load-balancing losses of the router, with their gradients. Both are normalised so that
// uniform routing gives 1 for the aux loss; the layer adds coef · loss to the objective.
//
//   gshard_aux = E · Σ_e me_e · ce_e    me_e = mean_t s_{t,e}  (the router's probabilities)
//                                       ce_e = fraction of tokens whose 1st choice is e,
//                                              counted before drops; not differentiated
//   z_loss     = mean_t (logsumexp_e l_{t,e})²

#include <moe/core/config.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/scores.hpp>

#include <cmath>
#include <cstdint>

namespace moe::gating {

/// me and ce of the GShard aux loss, over the tokens of one call (host memory).
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
