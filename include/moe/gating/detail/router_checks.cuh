// SPDX-License-Identifier: Apache-2.0
#pragma once
// What the CUDA router (gating/kernels/router.cuh) checks of a call before any device work:
// the gate and its policies, the CUDA router's own limits, the cuBLAS handle, the extents of
// x, W_gate and the routing state, and the scratch.

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/kernels/warp.cuh>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/kernels/gemm_operands.cuh>
#include <moe/gating/kernels/scores.cuh>
#include <moe/gating/kernels/select.cuh>
#include <moe/gating/kernels/slots.cuh>
#include <moe/gating/policies.hpp>
#include <moe/gating/router.hpp>

#include <cmath>
#include <cstddef>
#include <exception>
#include <limits>
#include <string>
#include <utility>

namespace moe::gating::detail {

/// The largest E the loss kernels' grids take (⌈E/32⌉ blocks in y).
inline constexpr index_t max_device_experts = index_t{65535} * moe::detail::warp_size;

/// The gates the CUDA router implements: a score function, a priority and a selection policy
/// with a CUDA path (every one of gating/ has one); any capacity rule, renormalisation,
/// 2nd-expert policy and aux loss.
template <class G>
inline constexpr bool cuda_routable = device_score_function<typename G::score_function>&&
    device_priority_order<typename G::priority>&& device_selection_policy<selection_of<G>>;

/// The run-time limits of the CUDA router beyond the gate's own checks: its experts, and the
/// real knobs its float kernels take as float (finite there too).
inline status check_cuda_knobs(gate_args const& args) {
  if (args.experts > max_device_experts)
    return status::failure("experts", "the CUDA router takes at most " +
                                          std::to_string(max_device_experts) + " experts, got " +
                                          std::to_string(args.experts));
  constexpr double float_max = std::numeric_limits<float>::max();
  for (auto const& [name, value] :
       {std::pair{"scaling_factor", args.scaling_factor},
        std::pair{"aux_loss_coef", args.aux_loss_coef}, std::pair{"z_loss_coef", args.z_loss_coef}})
    if (std::abs(value) > float_max)
      return status::failure(name, std::to_string(value) +
                                       " overflows the float the CUDA router computes in; use "
                                       "at most 3.4e38");
  return {};
}

/// What `route`, `route_backward` and their workspace queries check of the gate: its and its
/// policies' checks (policies.hpp), then the CUDA router's own limits.
template <gate G>
status check_cuda_gate(G const& gate, gate_args const& args) {
  static_assert(cuda_routable<G>,
                "moe::gating (CUDA router): this gate has no CUDA path. Its score function needs "
                "a device_score (scores.cuh), its priority a device_priority (slots.cuh) and its "
                "selection a device_selection (select.cuh); route it on the host backend.");
  if (auto s = check_gate(gate, args); !s) return s;
  if (auto s = check_cuda_knobs(args); !s) return s;
  return check_slot_sizes(args.tokens, gate.k(args), args.experts, args.groups);
}

/// check_cuda_gate, and the cuBLAS handle a call needs.
template <gate G>
status check_cuda_call(cuda_backend cuda, G const& gate, gate_args const& args) {
  if (auto s = check_cuda_gate(gate, args); !s) return s;
  if (cuda.blas == nullptr)
    return status::failure(
        "blas", "the CUDA router runs cuBLAS: lend it a handle (moe::blas_handle) in cuda.blas");
  return {};
}

/// The router's input width for sizing: needed only when the call jitters the input.
inline void check_hidden_for_sizing(gate_args const& args, index_t hidden) {
  MOE_EXPECTS(!jitters_input(args) || hidden >= 1, "hidden",
              "the call jitters the router's input (training, jitter on x): give x's width to "
              "size the jittered copy");
}

/// The scratch a call carves with `carve` (a workspace_carver& → anything): non-null and
/// large enough. Sizing runs on the host; an error it raises becomes the status, so that
/// can_implement stays noexcept.
template <class Carve>
status check_scratch(workspace scratch, Carve&& carve) noexcept {
  try {
    workspace_carver counter;
    (void)carve(counter);
    std::size_t const needed = counter.bytes();
    if (scratch.size() >= needed && (needed == 0 || scratch.data() != nullptr)) return {};
    return status::failure("scratch", "holds " + std::to_string(scratch.size()) +
                                          " bytes; the call needs " + std::to_string(needed));
  } catch (std::exception const& e) {
    return status::failure("scratch", std::string("could not be sized: ") + e.what());
  }
}

/// What `route` and `route_backward` check of a call before any work: T = x's rows (as every
/// entry point that takes x, check_call_tokens; at least 1, as the host's empty call is not
/// yet the device kernels'; within what slot assignment sorts), W_gate's extents, and the
/// routing state `r` carved for T, E, k and the local groups.
template <class T>
status check_routing_call(gate_args const& args, int k, matrix_view<T const> x,
                          matrix_view<T const> w_gate, device_routing const& r) {
  index_t const tokens = x.extent(0), experts = args.experts;
  if (tokens < 1)
    return status::failure("x",
                           "has no tokens: the CUDA router takes at least 1 per call for "
                           "now (the host router takes an empty call)");
  if (auto s = check_call_tokens(args, tokens); !s) return s;
  if (auto s = check_slot_sizes(tokens, k, experts, args.groups); !s) return s;
  for (status s :
       {check_extents(w_gate, "w_gate", {x.extent(1), experts}),
        check_extents(r.logits, "r.logits", {tokens, experts}),
        check_extents(r.scores, "r.scores", {tokens, experts}),
        check_extents(r.expert, "r.expert", {tokens, k}),
        check_extents(r.weight, "r.weight", {tokens, k}),
        check_extents(r.slot, "r.slot", {tokens, k}), check_extents(r.load, "r.load", {experts}),
        check_extents(r.mean_score, "r.mean_score", {experts}),
        check_extents(r.first_choice, "r.first_choice", {experts})})
    if (!s) return s;
  if (r.aux_gradient.extent(0) < args.groups || r.aux_gradient.extent(1) != experts)
    return status::failure(
        "r.aux_gradient", "needs (groups, experts) = (" + std::to_string(args.groups) + ", " +
                              std::to_string(experts) + "): carve_device_routing with args.groups");
  if (r.scalars == nullptr)
    return status::failure("r.scalars", "null: the call's scalars lie in device memory");
  return {};
}

}  // namespace moe::gating::detail
