// SPDX-License-Identifier: Apache-2.0
#pragma once
// The host backend of a whole gate, forward and backward: router logits x · W_gate (with
// training noise), scores, expert selection (bias, groups), combine weights
// (renormalisation, scaling), GShard's random routing, slot assignment under a priority per
// local group, capacity, and the load-balancing losses; then the gradient back through all
// of them into x and W_gate.
//
// Forward, per call of T tokens, k choices, G local groups of S = T/G tokens:
//   1. l = x' · W_gate, x' = x ⊙ jitter(t, h) when training with jitter on the input;
//      when training: l ⊙= jitter(t, e) (jitter on the logits), then l += (gate_noise/E) ·
//      normal(t, e). `logits` holds the l the scores see.
//   2. s = Score(l); experts = Selection(s + expert_bias) (ties: lower index); without a bias,
//      the top k of all experts rank the logits when the scores rank as they do (a NaN score
//      ranks as NaN), so that scores rounding merges still rank apart.
//   3. weights before drops: s_j, divided by Σ_selected s when the call renormalises before
//      drops; random routing (training, k = 2) then leaves out the 2nd choice unless
//      2 · w_1 > u(t).
//   4. each group orders its assignments by the priority; positions per (group, expert); the
//      largest position count goes through `reduce_max_load`; C_g = the capacity policy's
//      (sized for `capacity_tokens` when set, so that ranks with different T agree on it);
//      kept iff position < C_g. Slots: a group's kept assignments of expert e follow those of
//      the groups before it (slot = kept so far), dropped ones get C + (dropped so far), so
//      that kept ⇔ slot < C = G · C_g and the capacity layout's [E, C, H] holds every group.
//      With G = 1 the slot is the position.
//   5. final weights α · s_j / D (weights.hpp), 0 when not kept; the aux loss (losses.hpp) and
//      the z-loss over the noisy logits.

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/detail/host_gemm.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/detail/router_steps.hpp>
#include <moe/gating/groups.hpp>
#include <moe/gating/host_routing.hpp>
#include <moe/gating/losses.hpp>
#include <moe/gating/philox.hpp>
#include <moe/gating/policies.hpp>
#include <moe/gating/priority.hpp>
#include <moe/gating/random_routing.hpp>
#include <moe/gating/scores.hpp>
#include <moe/gating/top_k.hpp>
#include <moe/gating/weights.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <source_location>
#include <string>
#include <type_traits>

namespace moe::gating {

/// What the T of one call (x's rows) must be under `args`: a multiple of the local groups
/// (0 is one: an empty call routes nothing, and its losses are 0); and `args.capacity_tokens`,
/// when set, at least T and a multiple of the local groups too. The router and every entry
/// point that takes x run this one check.
inline status check_call_tokens(gate_args const& args, index_t tokens, char const* argument = "x") {
  auto const split_into_groups = [&](index_t n, char const* name, char const* verb) {
    if (args.groups > 1 && n % args.groups != 0)
      return status::failure(name, std::string(verb) + std::to_string(n) +
                                       " tokens, not a multiple of the " +
                                       std::to_string(args.groups) + " local groups");
    return status{};
  };
  if (auto s = split_into_groups(tokens, argument, "has "); !s) return s;
  if (args.capacity_tokens == 0) return {};
  if (args.capacity_tokens < tokens)
    return status::failure("capacity_tokens", "is " + std::to_string(args.capacity_tokens) +
                                                  ", fewer than the call's " +
                                                  std::to_string(tokens) + " tokens");
  return split_into_groups(args.capacity_tokens, "capacity_tokens", "is ");
}

/// The values of `args.expert_bias`, host memory on the host backend: all finite. The
/// router and the host layer's check of a call run this one check (the bias's size and
/// pointer are the gate's `can_implement`'s, which reads no memory).
inline status check_host_expert_bias(gate_args const& args) {
  for (float b : args.expert_bias)
    if (!std::isfinite(b)) return status::failure("expert_bias", "holds a non-finite value");
  return {};
}

/// Checks a host `route` call as route does before any work, and writes nothing: the gate and
/// its policies, W_gate's extents, the bias's values (host memory here), x's tokens, and the
/// routing state `r`.
template <gate G, class T>
[[nodiscard]] status can_implement(host_backend, G const& gate, gate_args const& args,
                                   matrix_view<T const> x, matrix_view<T const> w_gate,
                                   host_routing const& r) noexcept {
  if (auto s = check_gate(gate, args); !s) return s;
  index_t const tokens = x.extent(0), experts = w_gate.extent(1);
  if (w_gate.extent(0) != x.extent(1) || experts != args.experts)
    return status::failure("w_gate",
                           "is " + moe::detail::format_extents(moe::detail::extents_of(w_gate)) +
                               "; expected (" + std::to_string(x.extent(1)) + ", " +
                               std::to_string(args.experts) + ")");
  if (auto s = check_host_expert_bias(args); !s) return s;
  if (auto s = check_call_tokens(args, tokens); !s) return s;
  return detail::check_routing_state(r, tokens, experts, gate.k(args));
}

/// Checks a host `route_backward` call as it does before any work, and writes nothing: the
/// gate, the routing state, and the extents of every view.
template <gate G, class T>
[[nodiscard]] status can_implement(host_backend, G const& gate, gate_args const& args,
                                   host_routing const& r, matrix_view<double const> d_weight,
                                   matrix_view<double const> x, matrix_view<T const> w_gate,
                                   matrix_view<double> d_logits, matrix_view<double> dx,
                                   matrix_view<T> d_w_gate) noexcept {
  index_t const tokens = r.tokens(), experts = r.experts(), hidden = x.extent(1);
  if (auto s = check_gate(gate, args); !s) return s;
  if (auto s = detail::check_routing_state(r, tokens, experts, gate.k(args)); !s) return s;
  for (status s :
       {check_extents(d_weight, "d_weight", {tokens, r.k()}),
        check_extents(x, "x", {tokens, hidden}), check_extents(w_gate, "w_gate", {hidden, experts}),
        check_extents(d_logits, "d_logits", {tokens, experts}),
        check_extents(dx, "dx", {tokens, hidden}),
        check_extents(d_w_gate, "d_w_gate", {hidden, experts})})
    if (!s) return s;
  return {};
}

/// Forward of gate G on the host: fills `r` and returns the call's scalars. Throws
/// `invalid_argument` before any work when the arguments or shapes do not suit G.
/// @param[in]  x      (tokens, hidden)  host memory
/// @param[in]  w_gate (hidden, experts) host memory
/// @param[out] r      routing state, carved for x's T and the gate's k (carve_host_routing)
/// @param reduce_max_load maps this call's largest per-(group, expert) load to the one dynamic
///        capacity uses: the identity on one rank, the maximum over the ranks with several
///        (Tutel all-reduces it). Called once, on every call.
template <gate G, element T, class ReduceMaxLoad = std::identity>
routing_summary route(host_backend, G const& gate, gate_args const& args, matrix_view<T const> x,
                      matrix_view<T const> w_gate, host_routing& r,
                      ReduceMaxLoad reduce_max_load = {},
                      std::source_location caller = std::source_location::current()) {
  using Score = typename G::score_function;
  moe::detail::at_entry_point(
      caller, [&] { can_implement(host, gate, args, x, w_gate, r).throw_if_failed(); });
  index_t const tokens = x.extent(0);
  int const k = gate.k(args);
  renormalize const normalize = effective_renormalize<Score, renormalization_of<G>>(args, k);
  double const scale = static_cast<double>(args.scaling_factor);

  routing_summary summary{.tokens = tokens};
  detail::router_logits(args, x, w_gate, r);               // 1.
  detail::select_experts<G>(args, normalize, r, summary);  // 1. (noise) to 3.
  // 4. Positions per local group, capacity, then slots.
  index_t const max_load = detail::assign_positions<typename G::priority>(args, scale, r);
  capacity_args const cap = capacity_args_of(args, k, capacity_of<G>::rounding, tokens);
  summary.max_load = static_cast<index_t>(reduce_max_load(max_load));
  detail::slots_under_capacity(cap, r, summary);
  detail::final_weights(normalize, scale, r);  // 5.
  summary.aux_loss = detail::route_losses<Score, aux_loss_of<G>>(args.groups, r);
  return summary;
}

/// Backward of gate G on the host, for the objective ⟨d_weight, weight⟩ + aux_loss_coef ·
/// aux_loss + z_loss_coef · z_loss. Dropped and left-out assignments receive no gradient
/// through their weight; the expert bias, the selection and the noise receive none. Call it
/// with the forward's arguments and state.
/// @param[in]    d_weight (tokens, k)       gradient of the combine weights
/// @param[in]    x        (tokens, hidden)  the forward's input
/// @param[inout] d_logits (tokens, experts) scratch, overwritten
/// @param[inout] dx       (tokens, hidden)  accumulated into
/// @param[out]   d_w_gate (hidden, experts) overwritten
template <gate G, element T>
void route_backward(host_backend, G const& gate, gate_args const& args, host_routing const& r,
                    matrix_view<double const> d_weight, matrix_view<double const> x,
                    matrix_view<T const> w_gate, matrix_view<double> d_logits,
                    matrix_view<double> dx, matrix_view<T> d_w_gate,
                    std::source_location caller = std::source_location::current()) {
  moe::detail::at_entry_point(caller, [&] {
    can_implement(host, gate, args, r, d_weight, x, w_gate, d_logits, dx, d_w_gate)
        .throw_if_failed();
  });
  detail::aux_score_gradient<G>(args, r, d_logits);
  detail::logits_gradient<G>(args, r, d_weight, d_logits);

  // dx += d_logits · W_gateᵀ and dW_gate = x'ᵀ · d_logits, through the input's jitter.
  index_t const tokens = r.tokens(), experts = r.experts(), hidden = x.extent(1);
  bool const jitter_x = args.training && args.jitter > 0 && args.jitter_on == jitter_target::input;
  auto const jitter_of = [&](index_t t, index_t h) {
    return jitter_x ? jitter_factor(args.jitter, args.seed, t, static_cast<std::uint32_t>(h),
                                    rng_stream::jitter_input)
                    : 1.0;
  };
  moe::detail::host_gemm(
      tokens, hidden, experts, [&](index_t t, index_t e) { return d_logits(t, e); },
      [&](index_t e, index_t h) { return to_accumulate(w_gate(h, e)); },
      [&](index_t t, index_t h, double v) { dx(t, h) += jitter_x ? v * jitter_of(t, h) : v; });
  moe::detail::host_gemm(
      hidden, experts, tokens,
      [&](index_t h, index_t t) { return jitter_x ? x(t, h) * jitter_of(t, h) : x(t, h); },
      [&](index_t t, index_t e) { return d_logits(t, e); },
      [&](index_t h, index_t e, double v) {
        d_w_gate(h, e) = from_accumulate<T>(static_cast<accumulate_t<T>>(v));
      });
}

}  // namespace moe::gating