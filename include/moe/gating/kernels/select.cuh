// SPDX-License-Identifier: Apache-2.0
#pragma once
// The fused router kernel: one warp per token adds the training noise to the token's logits,
// turns them into scores and selects its top k experts (k ≤ 32), with the host's rules
// (gating/router.hpp steps 1–3): descending selection score, ties to the lower expert
// index, a NaN never beats a number. The selection score is the score plus the expert bias;
// group-limited selection first keeps the best M of N expert groups. The kernel also writes
// each selection's pre-drop weight (renormalised over the selected experts when the call
// does so before drops), GShard's random-routing decision for the 2nd choice, the token's
// score sum (for the aux losses of scores that do not sum to one) and its (logsumexp)².
//
// Selection is k rounds of a warp arg-max. Each lane owns the experts lane, lane + 32, …
// and holds its best one not yet selected; a round picks the best over the lanes, and only
// the lane that owned the winner rescans its experts for the next one. Rounds select in
// strictly decreasing order of a total order, so "not yet selected" is "ranked below the
// last winner", and no lane needs to remember what was taken. Any E works: lanes loop.

#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/kernels/shapes.cuh>
#include <moe/core/kernels/warp.cuh>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/groups.hpp>
#include <moe/gating/kernels/scores.cuh>
#include <moe/gating/philox.hpp>
#include <moe/gating/random_routing.hpp>
#include <moe/gating/top_k.hpp>

#include <cuda/std/limits>

#include <cstddef>
#include <cstdint>

namespace moe::gating {

namespace detail {

/// An expert as top-k sees it: its selection key and its index.
struct candidate {
  float key;
  std::int32_t expert;
};

/// The strict total order of selection: numbers by key, larger first, then NaN keys; equal
/// keys (or two NaNs) by the lower expert index. Host select_top_k ranks exactly so.
__device__ MOE_FORCEINLINE bool beats(candidate a, candidate b) {
  bool const a_nan = is_nan(a.key), b_nan = is_nan(b.key);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a.key != b.key) return a.key > b.key;
  return a.expert < b.expert;
}

/// Ranked below every expert: a lane with nothing left holds it (a NaN key with an index
/// beyond any expert's).
__device__ MOE_FORCEINLINE candidate no_candidate() {
  return {cuda::std::numeric_limits<float>::quiet_NaN(),
          cuda::std::numeric_limits<std::int32_t>::max()};
}

/// Ranked above every expert: the bound of the first scan.
__device__ MOE_FORCEINLINE candidate above_all() {
  return {cuda::std::numeric_limits<float>::infinity(), -1};
}

/// The best candidate over the warp, returned to every lane. `beats` is a strict total
/// order and only `no_candidate` repeats, so every lane ends with the same winner.
__device__ MOE_FORCEINLINE candidate warp_best(candidate c) {
  for (int mask = moe::detail::warp_size / 2; mask > 0; mask /= 2) {
    candidate const other{__shfl_xor_sync(moe::detail::full_warp, c.key, mask),
                          __shfl_xor_sync(moe::detail::full_warp, c.expert, mask)};
    if (beats(other, c)) c = other;
  }
  return c;
}

/// This lane's best expert in [begin, end) ranked below `bound` by key_of(e), or
/// no_candidate(). The lane owns the experts begin + lane, begin + lane + 32, …
template <class KeyOf>
__device__ MOE_FORCEINLINE candidate best_below(candidate bound, index_t begin, index_t end,
                                                int lane, KeyOf const& key_of) {
  candidate best = no_candidate();
  for (index_t e = begin + lane; e < end; e += moe::detail::warp_size) {
    candidate const c{key_of(e), static_cast<std::int32_t>(e)};
    if (beats(bound, c) && beats(c, best)) best = c;
  }
  return best;
}

/// Calls visit(j, winner) for the top `count` experts of [begin, end) by key_of, best
/// first: `count` rounds of a warp arg-max. Rounds select in strictly decreasing order of a
/// total order, so "not yet selected" is "ranked below the last winner", and only the lane
/// that owned a winner rescans. Every lane sees every winner. count ≤ end − begin.
template <class KeyOf, class Visit>
__device__ MOE_FORCEINLINE void for_each_best(int count, index_t begin, index_t end, int lane,
                                              KeyOf const& key_of, Visit&& visit) {
  candidate mine = best_below(above_all(), begin, end, lane, key_of);
  for (int j = 0; j < count; ++j) {
    candidate const winner = warp_best(mine);
    visit(j, winner);
    if (j + 1 < count && mine.expert == winner.expert)
      mine = best_below(winner, begin, end, lane, key_of);
  }
}

/// a ranks above b: greater, or a number against a NaN (groups.hpp's rule).
__device__ MOE_FORCEINLINE bool ranks_above(float a, float b) {
  return a > b || (is_nan(b) && !is_nan(a));
}

}  // namespace detail

/// The device side of selection policy S (groups.hpp): `keep(key_of, experts, k, lane)`
/// returns, to every lane, the experts a token may select, as `mask.keeps(e)`; the router
/// then takes the top k of the kept ones. `ranks_scores` says that S compares score values
/// (so the selection key is s_e + b_e, never the logit). Specialise it to give a selection
/// policy a CUDA path.
template <class S>
struct device_selection;

/// A selection policy with a CUDA path.
template <class S>
concept device_selection_policy = selection_policy<S> && requires {
  { device_selection<S>::ranks_scores } -> std::convertible_to<bool>;
};

/// Every expert may be selected.
template <>
struct device_selection<all_experts> {
  static constexpr bool ranks_scores = false;
  struct mask {
    __device__ static constexpr bool keeps(index_t) { return true; }
  };
  template <class KeyOf>
  __device__ static mask keep(KeyOf const&, index_t, int, int) {
    return {};
  }
};
static_assert(device_selection_policy<all_experts>);

/// DeepSeek-V3's group-limited selection: each group's score is the sum of its top-c
/// selection scores (c from the group score policy), best first (the host's order), and the
/// best M groups are kept, ties to the lower group. Every lane computes the same group
/// ranking from warp-wide values.
template <int Groups, int TopGroups, int Experts, class GroupScore>
struct device_selection<group_limited<Groups, TopGroups, Experts, GroupScore>> {
  static_assert(Groups <= 64,
                "moe::gating::group_limited (CUDA): at most 64 expert groups on the device.");
  static constexpr bool ranks_scores = true;
  struct mask {
    std::uint64_t groups;  // bit g: group g is kept
    index_t size;          // experts per group
    __device__ bool keeps(index_t e) const { return (groups >> (e / size)) & 1u; }
  };

  template <class KeyOf>
  __device__ static mask keep(KeyOf const& key_of, index_t experts, int k, int lane) {
    index_t const size = experts / Groups;
    int const c = group_limited<Groups, TopGroups, Experts, GroupScore>::per_group(k);
    float group_score[Groups];
    for (int g = 0; g < Groups; ++g) {
      float sum = 0;
      detail::for_each_best(c, g * size, (g + 1) * size, lane, key_of,
                            [&](int, detail::candidate winner) { sum += winner.key; });
      group_score[g] = sum;
    }
    std::uint64_t kept = 0;
    for (int m = 0; m < TopGroups; ++m) {
      int pick = -1;
      for (int g = 0; g < Groups; ++g)
        if (!((kept >> g) & 1u) &&
            (pick < 0 || detail::ranks_above(group_score[g], group_score[pick])))
          pick = g;
      kept |= std::uint64_t{1} << pick;
    }
    return {kept, size};
  }
};

/// Scores and top-k of every token, one warp per token (device algorithm, STYLE §11).
/// @tparam Score     score function with a `device_score` specialisation
/// @tparam K         k when the gate fixes it at compile time, 0 when it is `params::k`
/// @tparam Selection selection policy with a `device_selection` specialisation
template <device_score_function Score, int K = 0, device_selection_policy Selection = all_experts>
struct router_select : moe::detail::warp_per_token {
  static_assert(K >= 0 && K <= max_k, "moe::gating::router_select: K must be in [0, 32].");
  using score = device_score<Score>;
  using selection = device_selection<Selection>;
  struct params {
    float* logits;             // (tokens, experts) in: x · W_gate; out: with the noise
    float* scores;             // (tokens, experts)
    std::int32_t* expert;      // (tokens, k)
    float* weight;             // (tokens, k)  weights before drops, not yet scaled
    std::int64_t* slot;        // (tokens, k)  0, or no_slot for a 2nd choice left out;
                               //              written only with random_second
    float* score_sum;          // (tokens)     Σ_e s_e, or null when not needed
    float* logsumexp_squared;  // (tokens)
    float const* bias;         // (experts)    the selection bias, or null
    index_t tokens;
    index_t experts;
    int k;  // 1 ≤ k ≤ min(experts, 32), checked on the host; equals K when K > 0
    bool normalize_before;  // divide the weights by their sum over the k selected
    bool random_second;     // GShard's random routing of the 2nd choice (k = 2)
    float jitter;           // ε of the logits' jitter, 0 for none
    double noise_std;       // σ of the additive logit noise, 0 for none
    std::uint64_t seed;
  };

  /// The parameters of a plain call that fills `r`'s logits → scores, expert and weight and
  /// the z-loss terms: no noise, no bias, no renormalisation, every choice routed.
  static params to_params(device_routing const& r, float* logsumexp_squared) noexcept {
    return {.logits = r.logits.data_handle(),
            .scores = r.scores.data_handle(),
            .expert = r.expert.data_handle(),
            .weight = r.weight.data_handle(),
            .slot = r.slot.data_handle(),
            .score_sum = nullptr,
            .logsumexp_squared = logsumexp_squared,
            .bias = nullptr,
            .tokens = r.tokens(),
            .experts = r.experts(),
            .k = r.k(),
            .normalize_before = false,
            .random_second = false,
            .jitter = 0,
            .noise_std = 0,
            .seed = 0};
  }

  /// The parameters of a router call under `args`: to_params(r, …) with the call's score
  /// sums, selection bias, renormalisation, random routing and training noise.
  static params to_params(device_routing const& r, float* logsumexp_squared, float* score_sum,
                          gate_args const& args, bool normalize_before,
                          bool random_second) noexcept {
    params p = to_params(r, logsumexp_squared);
    p.score_sum = score_sum;
    p.bias = args.expert_bias.empty() ? nullptr : args.expert_bias.data();
    p.normalize_before = normalize_before;
    p.random_second = random_second;
    p.jitter = args.training && args.jitter_on == jitter_target::logits ? args.jitter : 0.0f;
    p.noise_std = args.training
                      ? static_cast<double>(args.gate_noise) / static_cast<double>(r.experts())
                      : 0.0;
    p.seed = args.seed;
    return p;
  }

  __device__ void operator()(params const& p, char*) const {
    int const lane = moe::detail::warp_per_token::lane();
    index_t const t = moe::detail::warp_per_token::token();
    // t is the same on all lanes of a warp: whole warps leave, and the shuffles below always
    // see 32 lanes. The kernel has no block barrier.
    if (t >= p.tokens) return;
    int const k = K > 0 ? K : p.k;

    float* logits = p.logits + t * p.experts;
    float* scores = p.scores + t * p.experts;
    // The training noise, in double as the host computes it (one rounding per operation,
    // never contracted), then rounded once to float. Each lane reads back only its own.
    if (p.jitter > 0 || p.noise_std > 0)
      for (index_t e = lane; e < p.experts; e += moe::detail::warp_size) {
        auto const column = static_cast<std::uint32_t>(e);
        double l = logits[e];
        if (p.jitter > 0)
          l = detail::mul_rn(l,
                             jitter_factor(p.jitter, p.seed, t, column, rng_stream::jitter_logits));
        if (p.noise_std > 0)
          l = l +
              detail::mul_rn(p.noise_std, rng_normal(p.seed, t, column, rng_stream::logit_noise));
        logits[e] = static_cast<float>(l);
      }

    auto const row = score::statistics(logits, p.experts, lane);
    float sum = 0;
    for (index_t e = lane; e < p.experts; e += moe::detail::warp_size) {
      scores[e] = score::score(logits[e], row);
      sum += scores[e];
    }
    if (p.score_sum != nullptr) {
      sum = moe::detail::warp_all_reduce(sum, moe::detail::plus{});
      if (lane == 0) p.score_sum[t] = sum;
    }
    // Group-limited selection scans each group from its first expert, so a lane reads
    // logits and scores that another lane wrote: make them visible (shuffles order nothing).
    __syncwarp();

    // What selection ranks: the logit (the host's key too), or, with a bias or group-limited
    // selection, the score plus the bias in float. Scores that float rounds to one value (a
    // sigmoid is 1.0f above l ≈ 16.6) then tie and go to the lower index, where the host's
    // double would still order them.
    bool const ranks_scores = selection::ranks_scores || p.bias != nullptr;
    auto const key_of = [&](index_t e) {
      return ranks_scores ? scores[e] + (p.bias != nullptr ? p.bias[e] : 0.0f)
                          : score::select_key(logits[e], row);
    };
    auto const mask = selection::keep(key_of, p.experts, k, lane);
    auto const kept_key_of = [&](index_t e) {
      return mask.keeps(e) ? key_of(e) : -cuda::std::numeric_limits<float>::infinity();
    };
    std::int32_t selected = 0;  // lane j keeps the j-th winner
    detail::for_each_best(k, 0, p.experts, lane, kept_key_of, [&](int j, detail::candidate winner) {
      if (lane == j) selected = winner.expert;
    });

    // The weights before drops: the very scores written (the host's), renormalised over the
    // k selected when the call does so before drops.
    float weight = lane < k ? scores[selected] : 0.0f;
    if (p.normalize_before) {
      float const selected_sum = moe::detail::warp_all_reduce(weight, moe::detail::plus{});
      if (selected_sum > 0) weight /= selected_sum;
    }
    if (lane < k) {
      p.expert[t * k + lane] = selected;
      p.weight[t * k + lane] = weight;
      if (p.random_second)
        p.slot[t * k + lane] = lane == 1 && !keeps_second_expert(weight, p.seed, t) ? no_slot : 0;
    }
    if (lane == 0) {
      float const lse = score::logsumexp(row);
      p.logsumexp_squared[t] = lse * lse;
    }
  }
};

}  // namespace moe::gating
