// SPDX-License-Identifier: Apache-2.0
#pragma once
// Top-k selection: the gates `top_k<K>` (k fixed at compile time) and `top_any` (k given
// per call, Tutel's dynamic top-ANY), and their host backend: selection with ties broken
// by the lower expert index, and the renormalisation of the k combine weights.

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/priority.hpp>
#include <moe/gating/scores.hpp>

#include <cmath>
#include <cstdint>
#include <string>

namespace moe::gating {

/// The largest k a gate may select: one warp's worth of candidates per token.
inline constexpr int max_k = 32;

namespace detail {

inline status check_k(int k, gate_args const& args) {
  if (args.experts < 1)
    return status::failure("experts", "must be at least 1, got " + std::to_string(args.experts));
  if (k < 1 || k > max_k)
    return status::failure(
        "k", "must be in [1, " + std::to_string(max_k) + "], got " + std::to_string(k));
  if (k > args.experts)
    return status::failure("k", "selects " + std::to_string(k) +
                                    " experts per token but there "
                                    "are only " +
                                    std::to_string(args.experts) + " experts");
  return {};
}

/// The run-time knobs every gate shares, checked before any work: finite factors, positive
/// alignment, groups that divide T, a positive scaling factor, jitter in [0, 1), gate noise
/// ≥ 0, and a bias of E values (non-null) or none. Reads no memory the arguments point to.
inline status check_knobs(gate_args const& args) {
  if (!std::isfinite(args.capacity_factor))
    return status::failure("capacity_factor",
                           "must be finite, got " + std::to_string(args.capacity_factor));
  if (!std::isfinite(args.eval_capacity_factor))
    return status::failure("eval_capacity_factor",
                           "must be finite, got " + std::to_string(args.eval_capacity_factor));
  if (args.capacity_alignment < 1)
    return status::failure("capacity_alignment",
                           "must be at least 1, got " + std::to_string(args.capacity_alignment));
  if (args.min_capacity < 0)
    return status::failure("min_capacity",
                           "must be at least 0, got " + std::to_string(args.min_capacity));
  if (args.groups < 1)
    return status::failure("groups", "must be at least 1, got " + std::to_string(args.groups));
  if (args.tokens % args.groups != 0)
    return status::failure("groups", std::to_string(args.tokens) + " tokens do not split into " +
                                         std::to_string(args.groups) + " equal local groups");
  if (args.normalize != renormalize::none && args.normalize != renormalize::before_drops &&
      args.normalize != renormalize::after_drops)
    return status::failure("normalize", "is not a renormalize value");
  if (!(std::isfinite(args.scaling_factor) && args.scaling_factor > 0))
    return status::failure("scaling_factor", "must be finite and positive, got " +
                                                 std::to_string(args.scaling_factor));
  if (!(args.jitter >= 0 && args.jitter < 1))
    return status::failure("jitter", "must be in [0, 1), got " + std::to_string(args.jitter));
  if (args.jitter_on != jitter_target::input && args.jitter_on != jitter_target::logits)
    return status::failure("jitter_on", "is not a jitter_target value");
  if (!(std::isfinite(args.gate_noise) && args.gate_noise >= 0))
    return status::failure("gate_noise",
                           "must be finite and at least 0, got " + std::to_string(args.gate_noise));
  if (!std::isfinite(args.aux_loss_coef)) return status::failure("aux_loss_coef", "must be finite");
  if (!std::isfinite(args.z_loss_coef)) return status::failure("z_loss_coef", "must be finite");
  // The bias may lie in device memory: only its size is checked here (the host router
  // checks its values).
  if (!args.expert_bias.empty() && static_cast<index_t>(args.expert_bias.size()) != args.experts)
    return status::failure("expert_bias", "holds " + std::to_string(args.expert_bias.size()) +
                                              " values for " + std::to_string(args.experts) +
                                              " experts");
  if (!args.expert_bias.empty() && args.expert_bias.data() == nullptr)
    return status::failure("expert_bias", "null data for " +
                                              std::to_string(args.expert_bias.size()) +
                                              " values; pass the bias, or an empty span for none");
  return {};
}

}  // namespace detail

/// Top-k gate with k fixed at compile time. `args.k` must be 0 or K.
/// @tparam K        experts per token, 1 ≤ K ≤ 32
/// @tparam Score    score function (softmax by default)
/// @tparam Priority slot priority (choice_major by default)
template <int K, score_function Score = softmax, priority Priority = choice_major>
struct top_k {
  static_assert(K >= 1 && K <= max_k, "moe::gating::top_k<K>: K must be in [1, 32].");
  using moe_concept = gate_tag;
  using score_function = Score;
  using priority = Priority;
  static constexpr int static_k = K;

  [[nodiscard]] constexpr int k(gate_args const&) const noexcept { return K; }

  [[nodiscard]] status can_implement(gate_args const& args) const {
    if (args.k != 0 && args.k != K)
      return status::failure("k", "top_k<" + std::to_string(K) +
                                      "> was given k = " + std::to_string(args.k) + "; pass 0 or " +
                                      std::to_string(K) + ", or use top_any");
    if (auto s = detail::check_k(K, args); !s) return s;
    return detail::check_knobs(args);
  }
};
static_assert(gate<top_k<1>> && gate<top_k<2>> && static_k_gate<top_k<2>>);

/// Top-k gate with k chosen at run time (`args.k`, 1 ≤ k ≤ min(E, 32)). k may change from
/// call to call: carve the routing state for the largest k (`carve_host_routing`'s max_k)
/// and each call's views for its own k.
template <score_function Score = softmax, priority Priority = choice_major>
struct top_any {
  using moe_concept = gate_tag;
  using score_function = Score;
  using priority = Priority;

  [[nodiscard]] constexpr int k(gate_args const& args) const noexcept { return args.k; }

  [[nodiscard]] status can_implement(gate_args const& args) const {
    if (auto s = detail::check_k(args.k, args); !s) return s;
    return detail::check_knobs(args);
  }
};
static_assert(gate<top_any<>> && !static_k_gate<top_any<>>);

/// Host backend of selection: the k experts of largest score, in descending order of score;
/// equal scores go to the lower expert index. A NaN score never beats a number.
/// @param[in]  scores  (experts) one token's scores
/// @param[out] experts (k)       the selected experts
inline void select_top_k(span<double const> scores, span<std::int32_t> experts) noexcept {
  auto const count = static_cast<std::int32_t>(scores.size());
  for (std::size_t j = 0; j < experts.size(); ++j) {
    std::int32_t best = -1;
    for (std::int32_t e = 0; e < count; ++e) {
      bool taken = false;
      for (std::size_t i = 0; i < j; ++i) taken = taken || experts[i] == e;
      if (taken) continue;
      // Strictly greater: the first (lowest) index wins a tie.
      if (best < 0 || scores[e] > scores[best] ||
          (scores[best] != scores[best] && scores[e] == scores[e]))
        best = e;
    }
    experts[j] = best;
  }
}

}  // namespace moe::gating
