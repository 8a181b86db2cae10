// SPDX-License-Identifier: Apache-2.0
#pragma once
// The device side of score functions (gating/scores.hpp): `device_score<Score>` is the hook
// through which the router kernels (select.cuh, router.cuh) turn one token's logits into
// scores, rank experts, and run the backward. A score function gains a CUDA path by
// specialising it; sigmoid and biased variants are added the same way.
//
// A specialisation provides, for one token's row of E logits in float:
//   row                                  per-token statistics, e.g. softmax's max and sum
//   statistics(logits, experts, lane)    the row's statistics; warp-cooperative (all 32
//                                        lanes, one row), returned to every lane
//   score(logit, row)                    the score of one expert
//   select_key(logit, row)               what top-k ranks, larger first; a NaN key never
//                                        beats a number (host select_top_k's rule)
//   logsumexp(row)                       log Σ_e exp(l_e), for the z-loss
//   d_logit(score, d_score, dot)         one entry of the vector–Jacobian product, linear in
//                                        d_score; `dot` is ⟨scores, d_scores⟩ over the row

#include <moe/core/config.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/kernels/reduce.cuh>
#include <moe/gating/scores.hpp>

#include <cuda/std/limits>

namespace moe::gating {

/// The CUDA path of score function `Score`; see the file comment for what a specialisation
/// provides. Left undefined for score functions without one.
template <class Score>
struct device_score;

/// A score function with a CUDA path.
template <class Score>
concept device_score_function = score_function<Score> && requires {
  typename device_score<Score>::row;
};

/// Softmax over all E experts, in float: s_e = exp(l_e − max) / Σ exp(l_e' − max).
template <>
struct device_score<softmax> {
  struct row {
    float max;  ///< the largest logit; NaNs are skipped, as the host does
    float sum;  ///< Σ_e exp(l_e − max)
  };

  /// @param logits (experts) one token's logits, device memory
  __device__ static row statistics(float const* logits, index_t experts, int lane) {
    float max = -cuda::std::numeric_limits<float>::infinity();
    for (index_t e = lane; e < experts; e += detail::warp_size) {
      float const l = logits[e];
      max = l > max ? l : max;  // false for a NaN: skipped
    }
    max = detail::warp_all_reduce(max, detail::maximum{});
    float sum = 0;
    for (index_t e = lane; e < experts; e += detail::warp_size) sum += expf(logits[e] - max);
    return {max, detail::warp_all_reduce(sum, detail::plus{})};
  }

  __device__ static float score(float logit, row const& r) { return expf(logit - r.max) / r.sum; }

  /// Softmax is increasing, so ranking the logits ranks the scores, without float
  /// underflow merging distinct scores into ties. A NaN or +inf logit, or a row of −inf,
  /// makes the sum NaN and then every score NaN, as on the host: every key is then NaN and
  /// the selection falls back to expert order, as host select_top_k does.
  __device__ static float select_key(float logit, row const& r) {
    return detail::is_nan(r.sum) ? cuda::std::numeric_limits<float>::quiet_NaN() : logit;
  }

  __device__ static float logsumexp(row const& r) { return r.max + logf(r.sum); }

  /// d_l_e = s_e · (d_s_e − ⟨s, d_s⟩).
  __device__ static float d_logit(float score, float d_score, float dot) {
    return score * (d_score - dot);
  }
};
static_assert(device_score_function<softmax>);

}  // namespace moe::gating
