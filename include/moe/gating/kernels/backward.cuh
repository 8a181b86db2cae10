// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA router's backward up to d_logits (the device twin of the per-token loop of host
// route_backward, gating/router.hpp): aux-loss, renormalisation and score-function
// gradients, the z-loss and the logits' jitter, a warp per token. The GEMMs into dx and
// dW_gate are the caller's (router.cuh).

#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/kernels/shapes.cuh>
#include <moe/core/kernels/warp.cuh>
#include <moe/core/view.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/kernels/scores.cuh>
#include <moe/gating/philox.hpp>
#include <moe/gating/scores.hpp>
#include <moe/gating/weights.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moe::gating::detail {

/// d_logits of one token per warp, for the objective ⟨d_weight, weight⟩ + aux_coef · aux +
/// z_coef · z_loss, as host route_backward. The gradient of the scores is a dense part, the
/// aux loss's (aux_coef · ∂aux/∂p, through p = s / Σ s when the scores do not sum to one),
/// plus one entry per selected expert (through the renormalisation; none for a dropped or
/// left-out one). The score function's backward is linear in it, so the dense part is
/// applied over the row and each selected expert's entry is added afterwards by the lane
/// that holds it. The logits' jitter scales the result.
template <device_score_function Score>
struct router_backward : moe::detail::warp_per_token {
  using score = device_score<Score>;
  struct params {
    float const* logits;         // (tokens, experts) device memory, with the noise
    float const* scores;         // (tokens, experts)
    std::int32_t const* expert;  // (tokens, k)
    std::int64_t const* slot;    // (tokens, k)
    float const* aux_gradient;   // (aux rows, experts) ∂aux/∂p of each aux-loss group
    device_routing_scalars const* scalars;
    float const* d_weight;  // (tokens, k)
    float* d_logits;        // (tokens, experts) out
    index_t tokens;
    index_t experts;
    index_t aux_row_tokens;  // tokens per row of aux_gradient: S per local group, or T
    int k;
    renormalize normalize;
    float scaling_factor;  // α: w = α · s / D, so d_weight reaches s / D times α
    float aux_loss_coef;
    float z_loss_coef;
    float jitter;  // ε of the logits' jitter, 0 for none
    std::uint64_t seed;
  };
  /// The parameters of the backward of routing `r` under `args`, renormalising as `normalize`;
  /// aux_row_tokens: tokens per row of r.aux_gradient.
  static params to_params(device_routing const& r, float const* d_weight, float* d_logits,
                          gate_args const& args, renormalize normalize,
                          index_t aux_row_tokens) noexcept {
    return {.logits = r.logits.data_handle(),
            .scores = r.scores.data_handle(),
            .expert = r.expert.data_handle(),
            .slot = r.slot.data_handle(),
            .aux_gradient = r.aux_gradient.data_handle(),
            .scalars = r.scalars,
            .d_weight = d_weight,
            .d_logits = d_logits,
            .tokens = r.tokens(),
            .experts = r.experts(),
            .aux_row_tokens = aux_row_tokens,
            .k = r.k(),
            .normalize = normalize,
            .scaling_factor = static_cast<float>(args.scaling_factor),
            .aux_loss_coef = static_cast<float>(args.aux_loss_coef),
            .z_loss_coef = static_cast<float>(args.z_loss_coef),
            .jitter = args.training && args.jitter_on == jitter_target::logits ? args.jitter : 0.0f,
            .seed = args.seed};
  }

  __device__ void operator()(params const& p, char*) const {
    int const lane = moe::detail::warp_per_token::lane();
    index_t const t = moe::detail::warp_per_token::token();
    if (t >= p.tokens) return;  // whole warps: every shuffle below sees 32 lanes
    std::int64_t const capacity = p.scalars->capacity;
    float const* logits = p.logits + t * p.experts;
    float const* scores = p.scores + t * p.experts;
    float* d_logits = p.d_logits + t * p.experts;

    // Lane j < k holds assignment j.
    bool const holds = lane < p.k;
    std::int32_t const e_j = holds ? p.expert[t * p.k + lane] : -1;
    bool const valid = e_j >= 0 && e_j < p.experts;  // always, from the router
    bool const kept = holds && p.slot[t * p.k + lane] < capacity;
    float const s_j = valid ? scores[e_j] : 0.0f;
    float const dw_j = holds ? p.scaling_factor * p.d_weight[t * p.k + lane] : 0.0f;

    // Through w_j = α · s_j / D for kept j (0 for dropped), D = Σ_{i∈S} s_i over S the
    // selected (before_drops) or kept (after_drops) assignments, or 1 (none, or a zero sum):
    //   ∂/∂s_j = α ([j kept] dw_j − [j ∈ S] m) / D,   m = Σ_{i kept} dw_i · s_i / D,
    // the host's formula regrouped so that float cancels exactly where the math does (one
    // kept assignment after drops: s / D = 1, so dw − m = 0).
    bool const in_set = holds && in_divisor(p.normalize, kept);
    float const sum = moe::detail::warp_all_reduce(in_set ? s_j : 0.0f, moe::detail::plus{});
    bool const divided = p.normalize != renormalize::none && sum > 0;
    float delta = 0;  // this lane's entry of d_scores at e_j, beyond the dense part
    if (divided) {    // the same on every lane (sum is warp-reduced): all 32 lanes shuffle
      float const m =
          moe::detail::warp_all_reduce(kept ? dw_j * (s_j / sum) : 0.0f, moe::detail::plus{});
      delta = ((kept ? dw_j : 0.0f) - (in_set ? m : 0.0f)) / sum;
    } else if (kept) {
      delta = dw_j;
    }

    // The dense part, the host's order: coef · ∂aux/∂p_e, and through p = s / Σ s when the
    // scores do not sum to one: coef · (∂aux/∂p_e − ⟨∂aux/∂p, s⟩ / Σ s) / Σ s.
    float const* d_p = p.aux_gradient + (t / p.aux_row_tokens) * p.experts;
    float score_sum = 1, p_dot = 0;
    if constexpr (!score_sums_to_one<Score>) {
      if (p.aux_loss_coef != 0) {
        score_sum = 0;
        for (index_t e = lane; e < p.experts; e += moe::detail::warp_size) score_sum += scores[e];
        score_sum = moe::detail::warp_all_reduce(score_sum, moe::detail::plus{});
        for (index_t e = lane; e < p.experts; e += moe::detail::warp_size)
          p_dot += d_p[e] * scores[e] / score_sum;
        p_dot = moe::detail::warp_all_reduce(p_dot, moe::detail::plus{});
      }
    }
    auto dense = [&](index_t e) {
      if (p.aux_loss_coef == 0) return 0.0f;
      if constexpr (score_sums_to_one<Score>)
        return p.aux_loss_coef * d_p[e];
      else
        return score_sum > 0 ? p.aux_loss_coef * ((d_p[e] - p_dot) / score_sum) : 0.0f;
    };

    // ⟨s, d_s⟩ over the row: the dense part, then each selected expert's entry.
    float dot = valid ? s_j * delta : 0.0f;
    for (index_t e = lane; e < p.experts; e += moe::detail::warp_size) dot += scores[e] * dense(e);
    dot = moe::detail::warp_all_reduce(dot, moe::detail::plus{});

    // The z-loss, d_l_e += z_coef / T · 2 · lse · exp(l_e − lse); then the logits' jitter.
    float lse = 0;
    if (p.z_loss_coef != 0) lse = score::logsumexp(score::statistics(logits, p.experts, lane));
    float const z_scale = p.z_loss_coef / static_cast<float>(p.tokens) * 2 * lse;
    auto finish = [&](index_t e, float d) {
      if (p.z_loss_coef != 0) d += z_scale * expf(logits[e] - lse);
      if (p.jitter > 0)
        d = static_cast<float>(d * jitter_factor(p.jitter, p.seed, t, static_cast<std::uint32_t>(e),
                                                 rng_stream::jitter_logits));
      return d;
    };

    for (index_t e = lane; e < p.experts; e += moe::detail::warp_size)
      d_logits[e] = finish(e, score::d_logit(scores[e], dense(e), dot));
    __syncwarp();  // every lane's entries are written before a selected one is rewritten
    if (valid) {
      // A selected expert's entry in one expression, d_s = dense + delta, so that it cancels
      // against `dot` exactly where the math does (E = 1: s = 1 and d_s = dot). __fadd_rn
      // keeps nvcc from fusing coef · X + delta into an FMA, which would break that.
      d_logits[e_j] = finish(e_j, score::d_logit(s_j, __fadd_rn(dense(e_j), delta), dot));
    }
  }
};

}  // namespace moe::gating::detail
