// SPDX-License-Identifier: Apache-2.0
#pragma once
// The device side of score functions (gating/scores.hpp): `device_score<Score>` is the hook
// through which the router kernels (select.cuh, router.cuh) turn one token's logits into
// scores, rank experts, and run the backward. A score function gains a CUDA path by
// specialising it: softmax, softmax_topk and sigmoid have one. With an expert bias, or with
// group-limited selection, the router ranks s_e + b_e instead of `select_key`.
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
#include <moe/core/kernels/warp.cuh>
#include <moe/core/view.hpp>
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

namespace detail {

/// NaN test that needs no math header on either side: only NaN differs from itself.
MOE_HOST_DEVICE constexpr bool is_nan(float x) noexcept {
  return x != x;
}

/// The statistics of a row of logits that softmax and the z-loss need: the largest logit
/// and Σ_e exp(l_e − max).
struct logit_statistics {
  float max;  ///< the largest logit; NaNs are skipped, as the host does
  float sum;  ///< Σ_e exp(l_e − max)
};

/// @param logits (experts) one token's logits, device memory; warp-cooperative
__device__ inline logit_statistics statistics_of(float const* logits, index_t experts, int lane) {
  float max = -cuda::std::numeric_limits<float>::infinity();
  for (index_t e = lane; e < experts; e += moe::detail::warp_size) {
    float const l = logits[e];
    max = l > max ? l : max;  // false for a NaN: skipped
  }
  max = moe::detail::warp_all_reduce(max, moe::detail::maximum{});
  float sum = 0;
  for (index_t e = lane; e < experts; e += moe::detail::warp_size) sum += math_exp(logits[e] - max);
  return {max, moe::detail::warp_all_reduce(sum, moe::detail::plus{})};
}

__device__ inline float logsumexp_of(logit_statistics const& r) {
  return logsumexp_from(r.max, r.sum);
}

}  // namespace detail

/// Softmax over all E experts, in float: s_e = exp(l_e − max) / Σ exp(l_e' − max).
template <>
struct device_score<softmax> {
  using row = detail::logit_statistics;

  /// @param logits (experts) one token's logits, device memory
  __device__ static row statistics(float const* logits, index_t experts, int lane) {
    return detail::statistics_of(logits, experts, lane);
  }

  __device__ static float score(float logit, row const& r) {
    return softmax::score(logit, r.max, r.sum);
  }

  /// Softmax is increasing, so ranking the logits ranks the scores, without underflow
  /// merging distinct scores into ties; the host ranks the same keys (scores.hpp). A NaN or +inf
  /// logit, or a row of −inf, makes the sum NaN and then every score NaN, as on the host: every key
  /// is then NaN and the selection falls back to expert order, as host select_top_k does.
  __device__ static float select_key(float logit, row const& r) {
    return detail::is_nan(r.sum) ? cuda::std::numeric_limits<float>::quiet_NaN() : logit;
  }

  __device__ static float logsumexp(row const& r) { return detail::logsumexp_of(r); }

  /// d_l_e = s_e · (d_s_e − ⟨s, d_s⟩).
  __device__ static float d_logit(float score, float d_score, float dot) {
    return softmax::d_logit(score, d_score, dot);
  }
};
static_assert(device_score_function<softmax>);

/// Mixtral's softmax over the selected logits: the full softmax's scores, ranking and
/// backward (scores.hpp); the gate renormalises over the selected experts.
template <>
struct device_score<softmax_topk> : device_score<softmax> {};
static_assert(device_score_function<softmax_topk>);

/// The logistic sigmoid of each logit, in float (DeepSeek-V3). The row statistics serve the
/// z-loss only.
template <>
struct device_score<sigmoid> {
  using row = detail::logit_statistics;

  /// @param logits (experts) one token's logits, device memory
  __device__ static row statistics(float const* logits, index_t experts, int lane) {
    return detail::statistics_of(logits, experts, lane);
  }

  /// exp of a non-positive argument only, as the host: no overflow for either sign.
  __device__ static float score(float logit, row const&) { return sigmoid::score(logit); }

  /// The sigmoid is increasing: ranking the logits ranks the scores, and saturation at 1
  /// merges no distinct logits into ties; the host ranks the same keys (scores.hpp). A NaN
  /// logit has a NaN score and key and never wins, as on the host.
  __device__ static float select_key(float logit, row const&) { return logit; }

  __device__ static float logsumexp(row const& r) { return detail::logsumexp_of(r); }

  /// d_l_e = d_s_e · s_e · (1 − s_e); each expert on its own, so `dot` is unused.
  __device__ static float d_logit(float score, float d_score, float) {
    return sigmoid::d_logit(score, d_score);
  }
};
static_assert(device_score_function<sigmoid>);

}  // namespace moe::gating
