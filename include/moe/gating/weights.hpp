// SPDX-License-Identifier: Apache-2.0
#pragma once
// Renormalisation of the combine weights, as a policy: whether a call divides a token's k
// weights by their sum over the selected experts (before drops) or over the kept ones (after
// drops), or leaves them as the scores. Then every weight is multiplied by
// gate_args::scaling_factor, and a dropped one is 0:
//
//   w_{t,j} = α · s_j / D   for kept (t, j),   D = 1 | Σ_{i selected} s_i | Σ_{i kept} s_i
//
// (D = 1 too when the sum is 0). `args_renormalization` (the default) reads
// gate_args::normalize; `fixed_renormalization<R, FromK>` is a preset's fixed choice, applied
// when k ≥ FromK (Tutel and DeepSeek-V3 renormalise only for k > 1). A score function that
// normalises over the selected experts (softmax_topk) turns `none` into `before_drops`.

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/scores.hpp>

#include <cstdint>
#include <string>

namespace moe::gating {

/// Renormalisation as gate_args::normalize says (the default).
struct args_renormalization {
  using moe_concept = renormalization_tag;

  [[nodiscard]] static constexpr renormalize resolve(gate_args const& args, int) noexcept {
    return args.normalize;
  }
};
static_assert(renormalization_policy<args_renormalization>);

/// Renormalisation fixed by the gate: R when k ≥ FromK, none below. gate_args::normalize must
/// then be left at none or equal R.
template <renormalize R, int FromK = 1>
struct fixed_renormalization {
  using moe_concept = renormalization_tag;
  static constexpr renormalize value = R;

  [[nodiscard]] static constexpr renormalize resolve(gate_args const&, int k) noexcept {
    return k >= FromK ? R : renormalize::none;
  }

  [[nodiscard]] static status check(gate_args const& args, int) {
    if (args.normalize != renormalize::none && args.normalize != R)
      return status::failure("normalize",
                             "is fixed by this gate (its renormalization policy); leave it at "
                             "renormalize::none or set the gate's own value");
    return {};
  }
};
static_assert(renormalization_policy<fixed_renormalization<renormalize::before_drops>>);
static_assert(!renormalization_policy<renormalize> && !renormalization_policy<softmax>);

/// Whether an assignment counts in D, the divisor of its token's weights: every selected one
/// before drops, the kept ones after drops, none without renormalisation.
MOE_HOST_DEVICE constexpr bool in_divisor(renormalize normalize, bool kept) noexcept {
  return normalize == renormalize::before_drops || (normalize == renormalize::after_drops && kept);
}

/// Turns one token's k pre-drop weights (the scores, divided already when the call
/// renormalises before drops) into combine weights once its slots are known: divided by the
/// kept ones' sum after drops (unless it is 0), times α, and 0 where slot ≥ capacity. The
/// host (double) and the device (float) run this one loop.
/// @param[inout] weight (k)
/// @param[in]    slot   (k)
template <class Real>
MOE_HOST_DEVICE constexpr void finalize_token_weights(Real* weight, std::int64_t const* slot, int k,
                                                      std::int64_t capacity, bool normalize_after,
                                                      Real scale) noexcept {
  if (normalize_after) {
    Real sum = 0;
    for (int j = 0; j < k; ++j)
      if (slot[j] < capacity) sum += weight[j];
    if (sum > 0)
      for (int j = 0; j < k; ++j) weight[j] /= sum;
  }
  for (int j = 0; j < k; ++j) weight[j] = slot[j] < capacity ? scale * weight[j] : 0;
}

/// How a call of gate policies (Score, Renormalization) with k experts per token renormalises.
template <class Score, renormalization_policy Renormalization>
[[nodiscard]] constexpr renormalize effective_renormalize(gate_args const& args, int k) noexcept {
  renormalize const r = Renormalization::resolve(args, k);
  return score_normalizes_selected<Score> && r == renormalize::none ? renormalize::before_drops : r;
}

}  // namespace moe::gating
