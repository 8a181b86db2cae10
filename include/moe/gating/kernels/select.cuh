// SPDX-License-Identifier: Apache-2.0
#pragma once
// The fused router kernel: one warp per token turns the token's logits into scores and
// selects its top k experts (k ≤ 32), with the host's rules: descending score, ties to the
// lower expert index, a NaN never beats a number. It also writes each selection's score
// (the pre-drop combine weight) and the token's (logsumexp)² for the z-loss.
//
// Selection is k rounds of a warp arg-max. Each lane owns the experts lane, lane + 32, …
// and holds its best one not yet selected; a round picks the best over the lanes, and only
// the lane that owned the winner rescans its experts for the next one. Rounds select in
// strictly decreasing order of a total order, so "not yet selected" is "ranked below the
// last winner", and no lane needs to remember what was taken. Any E works: lanes loop.

#include <moe/core/config.hpp>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/kernels/reduce.cuh>
#include <moe/gating/kernels/scores.cuh>
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
  for (int mask = warp_size / 2; mask > 0; mask /= 2) {
    candidate const other{__shfl_xor_sync(full_warp, c.key, mask),
                          __shfl_xor_sync(full_warp, c.expert, mask)};
    if (beats(other, c)) c = other;
  }
  return c;
}

}  // namespace detail

/// Scores and top-k of every token, one warp per token (device algorithm, STYLE §11).
/// @tparam Score score function with a `device_score` specialisation
/// @tparam K     k when the gate fixes it at compile time, 0 when it is `params::k`
template <device_score_function Score, int K = 0>
struct router_select {
  static_assert(K >= 0 && K <= max_k, "moe::gating::router_select: K must be in [0, 32].");
  using score = device_score<Score>;
  static constexpr int warps_per_block = 8;

  struct params {
    float const* logits;       // (tokens, experts) device memory
    float* scores;             // (tokens, experts)
    std::int32_t* expert;      // (tokens, k)
    float* weight;             // (tokens, k)  the selected scores: weights before drops
    float* logsumexp_squared;  // (tokens)
    index_t tokens;
    index_t experts;
    int k;  // 1 ≤ k ≤ min(experts, 32), checked on the host; equals K when K > 0
  };

  /// The parameters that fill `r`'s logits → scores, expert and weight, and the z-loss terms.
  static params to_params(device_routing const& r, float* logsumexp_squared) noexcept {
    return {r.logits.data_handle(),
            r.scores.data_handle(),
            r.expert.data_handle(),
            r.weight.data_handle(),
            logsumexp_squared,
            r.tokens(),
            r.experts(),
            r.k()};
  }

  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(ceil_div(p.tokens, warps_per_block)));
  }
  static dim3 block(params const&) { return dim3(warps_per_block * detail::warp_size); }
  static std::size_t smem_bytes(params const&) { return 0; }

  __device__ void operator()(params const& p, char*) const {
    int const lane = static_cast<int>(threadIdx.x) % detail::warp_size;
    index_t const t =
        static_cast<index_t>(blockIdx.x) * warps_per_block + threadIdx.x / detail::warp_size;
    // t is the same on all lanes of a warp: whole warps leave, and the shuffles below always
    // see 32 lanes. The kernel has no block barrier.
    if (t >= p.tokens) return;
    int const k = K > 0 ? K : p.k;

    float const* logits = p.logits + t * p.experts;
    float* scores = p.scores + t * p.experts;
    auto const row = score::statistics(logits, p.experts, lane);
    for (index_t e = lane; e < p.experts; e += detail::warp_size)
      scores[e] = score::score(logits[e], row);

    // This lane's best expert ranked below `bound`, or no_candidate().
    auto best_below = [&](detail::candidate bound) {
      detail::candidate best = detail::no_candidate();
      for (index_t e = lane; e < p.experts; e += detail::warp_size) {
        detail::candidate const c{score::select_key(logits[e], row), static_cast<std::int32_t>(e)};
        if (detail::beats(bound, c) && detail::beats(c, best)) best = c;
      }
      return best;
    };

    detail::candidate mine = best_below(detail::above_all());
    std::int32_t selected = 0;  // lane j keeps the j-th winner
    for (int j = 0; j < k; ++j) {
      // k ≤ E, so every round's winner is a real expert and only its owner matches it.
      detail::candidate const winner = detail::warp_best(mine);
      if (lane == j) selected = winner.expert;
      if (j + 1 < k && mine.expert == winner.expert) mine = best_below(winner);
    }

    __syncwarp();  // the scores written by other lanes above are visible below
    if (lane < k) {
      p.expert[t * k + lane] = selected;
      p.weight[t * k + lane] = scores[selected];  // the very score written: host's weight
    }
    if (lane == 0) {
      float const lse = score::logsumexp(row);
      p.logsumexp_squared[t] = lse * lse;
    }
  }
};

}  // namespace moe::gating
