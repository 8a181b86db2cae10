// SPDX-License-Identifier: Apache-2.0
#pragma once
// The routing state of one call on the CUDA backend, in device memory: what the router
// writes (gating/kernels/router.cuh), what slot assignment adds (gating/kernels/slots.cuh),
// and what the layouts read (layout/kernels/). It mirrors `host_routing` (host_routing.hpp) with
// float router math. The scalars of a call stay on the device, so that routing never
// synchronises; `read_summary` (router.cuh) copies them to the host, and says so.

#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/detail/carve_routing.hpp>

#include <cstdint>
#include <string>

namespace moe::gating {

/// The scalars of one routing call, as they lie in device memory.
struct device_routing_scalars {
  std::int64_t capacity;  ///< C of the call: resolved and aligned (computed on the device)
  std::int64_t max_load;  ///< the largest per-(group, expert) load, before drops, after the
                          ///< reduction over the ranks when there is one
  std::int64_t dropped;   ///< assignments that found no slot
  std::int64_t unrouted;  ///< 2nd choices random routing left out (not in `dropped`)
  float aux_loss;         ///< gshard_aux, before its coefficient
  float z_loss;           ///< z_loss, before its coefficient
};

/// The routing state of one call, in device memory. Shapes use the call's T.
struct device_routing {
  matrix_view<float> logits;         // (tokens, experts)
  matrix_view<float> scores;         // (tokens, experts)
  matrix_view<std::int32_t> expert;  // (tokens, k)  by descending score; ties: lower index
  matrix_view<float> weight;         // (tokens, k)  combine weights; 0 when dropped
  matrix_view<std::int64_t> slot;    // (tokens, k)  position in the expert; kept iff < C
  vector_view<std::int64_t> load;    // (experts)    assignments before drops
  vector_view<float> mean_score;     // (experts)    mean probability over the call
  vector_view<float> first_choice;   // (experts)    1st-choice fraction over the call
  /// (groups, experts) ∂aux_loss/∂p_{t,e}, the same for every token t of an aux-loss group:
  /// row g for local group g when the aux loss averages per group, else row 0 for all.
  matrix_view<float> aux_gradient;
  device_routing_scalars* scalars = nullptr;  // one, device memory

  [[nodiscard]] index_t tokens() const noexcept { return logits.extent(0); }
  [[nodiscard]] index_t experts() const noexcept { return logits.extent(1); }
  [[nodiscard]] int k() const noexcept { return static_cast<int>(expert.extent(1)); }
};

/// Lays out the routing state for up to `max_tokens` tokens, up to `max_k` choices and
/// `groups` local groups (gate_args::groups), and returns views of `tokens` tokens and `k`
/// choices: the layout depends on neither, so that memory carved once serves calls whose T
/// and k vary (top_any). With a default-constructed carver, only counts the bytes (all
/// pointers null).
inline device_routing carve_device_routing(workspace_carver& carver, index_t max_tokens, int max_k,
                                           index_t tokens, index_t experts, int k,
                                           index_t groups = 1) {
  device_routing r;
  detail::carve_routing_views<float>(carver, r, max_tokens, max_k, tokens, experts, k);
  r.mean_score = make_view(carver.take<float>(experts), experts);
  r.first_choice = make_view(carver.take<float>(experts), experts);
  r.aux_gradient = make_view(carver.take<float>(groups * experts), groups, experts);
  r.scalars = carver.take<device_routing_scalars>(1);
  return r;
}

/// The same for calls that all select k experts.
inline device_routing carve_device_routing(workspace_carver& carver, index_t max_tokens,
                                           index_t tokens, index_t experts, int k,
                                           index_t groups = 1) {
  return carve_device_routing(carver, max_tokens, k, tokens, experts, k, groups);
}

}  // namespace moe::gating
