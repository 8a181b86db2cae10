// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA backend of a whole gate, forward and backward: the device twin of `route` and
// `route_backward` in gating/router.hpp, with float router math and the same semantics.
//
// Forward, all stream-ordered on the caller's stream, no host synchronisation:
//   x' = x ⊙ jitter (training, jitter on the input only), in float
//   logits = x' · W_gate                     cuBLAS (moe::gemm), float output
//   noise, scores, selection (bias, expert   router_select (select.cuh), a warp per token
//   groups), pre-drop weights, random
//   routing, score sums, lse²
//   slots per local group, loads, capacity,  assign_slots (slots.cuh), capacity on the device;
//   drops, left-out 2nd choices              the largest load may be reduced over the ranks
//   weights: renormalise, scale, zero drops  finalize_weights (weights.cuh), C from the device
//   me, ce, the gate's aux loss, z_loss      losses.cuh, fixed-order reductions
// `read_summary` brings the scalars to the host; it is the one call that synchronises.
//
// Backward: d_logits by a warp per token (backward.cuh; aux-loss, renormalisation and
// score-function gradients, the z-loss, the logits' jitter), then dx += d_logits · W_gateᵀ and
// dW_gate = x'ᵀ · d_logits (through the input's jitter when there is one).
//
// Random numbers come from the counter-based Philox of gating/philox.hpp, keyed as on the
// host, so that noise, random routing and the random priority draw the host's numbers.

#include <moe/core/backend.hpp>
#include <moe/core/blas.hpp>
#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/kernels/warp.cuh>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/detail/router_checks.cuh>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/kernels/backward.cuh>
#include <moe/gating/kernels/gemm_operands.cuh>
#include <moe/gating/kernels/losses.cuh>
#include <moe/gating/kernels/scores.cuh>
#include <moe/gating/kernels/select.cuh>
#include <moe/gating/kernels/slots.cuh>
#include <moe/gating/kernels/weights.cuh>
#include <moe/gating/policies.hpp>
#include <moe/gating/router.hpp>
#include <moe/gating/weights.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <source_location>
#include <string>
#include <type_traits>

namespace moe::gating {

namespace detail {

/// `source` as float: itself for float, else converted into `copy` (count elements).
template <class T>
float const* float_elements(cuda_backend cuda, T const* source, float* copy, index_t count) {
  if constexpr (std::is_same_v<T, float>) {
    return source;
  } else {
    launch<convert_elements<T, float>>({source, copy, count}, cuda.stream);
    return copy;
  }
}

/// The scratch of the CUDA `route`, laid out by `carve_route_scratch`.
struct route_scratch {
  float* logsumexp_squared;  // (tokens)
  float* score_sum;          // (tokens) when the scores do not sum to one, else null
  float* jittered_x;         // (tokens, hidden) when the call jitters the input, else null
  float* gate_weight;        // (hidden, experts) W_gate in float, when x is jittered and T is not
  loss_scratch losses;
  workspace slots;  // assign_slots's scratch
};

/// Lays out the scratch of `route` for `tokens` tokens of `hidden` features; a counting
/// carver gives its size. The same code sizes and runs.
template <gate G, class T>
route_scratch carve_route_scratch(workspace_carver& carver, gate_args const& args, index_t tokens,
                                  index_t hidden, int k) {
  index_t const experts = args.experts;
  route_scratch s{};
  s.logsumexp_squared = carver.take<float>(tokens);
  if constexpr (!score_sums_to_one<typename G::score_function>)
    s.score_sum = carver.take<float>(tokens);
  if (jitters_input(args)) {
    s.jittered_x = carver.take<float>(tokens * hidden);
    if constexpr (!std::is_same_v<std::remove_cv_t<T>, float>)
      s.gate_weight = carver.take<float>(hidden * experts);
  }
  s.losses = carve_loss_scratch<aux_loss_of<G>>(carver, tokens, experts, k, args.groups);
  std::size_t const slots_bytes =
      slots_workspace_bytes<typename G::priority>(tokens, k, experts, args.groups);
  s.slots = {carver.take<std::byte>(static_cast<index_t>(slots_bytes)), slots_bytes};
  return s;
}

}  // namespace detail

/// Scratch bytes of the CUDA `route` for up to `args.tokens` tokens, computed on the host:
/// no device is needed (a program may size its memory on a machine without one).
/// @param hidden H of x: needed only when the call jitters the router's input (training,
///        args.jitter > 0 on jitter_target::input), which takes a float copy of x
/// @throws invalid_argument when the gate rejects `args`
template <element T, gate G>
std::size_t route_workspace_bytes(G const& gate, gate_args const& args, index_t hidden = 0) {
  detail::check_cuda_gate(gate, args).throw_if_failed();
  detail::check_hidden_for_sizing(args, hidden);
  workspace_carver counter;
  (void)detail::carve_route_scratch<G, T>(counter, args, args.tokens, hidden, gate.k(args));
  return counter.bytes();
}

/// The same for float x (jitter on the input sizes a float copy of W_gate for other T).
template <gate G>
std::size_t route_workspace_bytes(G const& gate, gate_args const& args, index_t hidden = 0) {
  return route_workspace_bytes<float>(gate, args, hidden);
}

/// Checks a CUDA `route` call as `route` does before any device work, and writes nothing:
/// the gate and its policies, the CUDA router's limits, the cuBLAS handle, x's tokens (a
/// multiple of the local groups), W_gate's and `r`'s extents, and the scratch's size.
template <gate G, element T>
[[nodiscard]] status can_implement(cuda_backend cuda, G const& gate, gate_args const& args,
                                   matrix_view<T const> x, matrix_view<T const> w_gate,
                                   device_routing const& r, workspace scratch) noexcept {
  if (auto s = detail::check_cuda_call(cuda, gate, args); !s) return s;
  int const k = gate.k(args);
  if (auto s = detail::check_routing_call(args, k, x, w_gate, r); !s) return s;
  return detail::check_scratch(scratch, [&](workspace_carver& counter) {
    return detail::carve_route_scratch<G, T>(counter, args, x.extent(0), x.extent(1), k);
  });
}

/// Forward of gate G on the CUDA backend: the device twin of host `route` (router.hpp),
/// with float router math. Everything is enqueued on `cuda.stream`; nothing synchronises,
/// and the call's scalars stay in `r.scalars` (read them with `read_summary`).
/// @param cuda        stream and a borrowed cuBLAS handle (required)
/// @param args        as the host's: E, k, capacity rule and factors, local groups,
///                    renormalisation, scaling, noise and seed. `args.expert_bias` is device
///                    memory here (its values are not checked: a NaN bias never wins).
/// @param[in]  x      (tokens, hidden)  device memory
/// @param[in]  w_gate (hidden, experts) device memory
/// @param[out] r      device memory, carved for x's T, args' E, k and groups
///                    (carve_device_routing): every view and the scalars are written
/// @param scratch     device memory, at least route_workspace_bytes<T>(gate, args, H) for
///                    args.tokens ≥ T
/// @param reduce_max_load enqueues, on cuda.stream, the reduction of the call's largest
///        per-(group, expert) load (one int64 in device memory) over the ranks, for dynamic
///        capacity (comm/kernels/max_over_ranks.cuh); nothing on one rank
/// @throws invalid_argument before any device work when the gate rejects args, an extent
///         is wrong, the scratch is too small or there is no cuBLAS handle: nothing was written
template <gate G, element T, class ReduceMaxLoad = local_max_load>
void route(cuda_backend cuda, G const& gate, gate_args const& args, matrix_view<T const> x,
           matrix_view<T const> w_gate, device_routing& r, workspace scratch,
           ReduceMaxLoad&& reduce_max_load = {},
           std::source_location caller = std::source_location::current()) {
  using Score = typename G::score_function;
  using Priority = typename G::priority;
  using U = std::remove_cv_t<T>;
  static_assert(dtype_traits<U>::device_supported,
                "moe::gating::route (CUDA): x and W_gate must be float, __half or __nv_bfloat16.");

  moe::detail::at_entry_point(
      caller, [&] { can_implement(cuda, gate, args, x, w_gate, r, scratch).throw_if_failed(); });
  int const k = gate.k(args);
  index_t const tokens = x.extent(0), hidden = x.extent(1), experts = args.experts;
  workspace_carver carver(scratch);
  detail::route_scratch const s =
      detail::carve_route_scratch<G, T>(carver, args, tokens, hidden, k);

  // logits (T, E) = x (T, H) · W_gate (H, E), accumulated in float; with the input's
  // jitter, x' = x ⊙ jitter in float, and W_gate in float to match.
  gemm_shape const logits_shape{
      .m = tokens, .n = experts, .depth = hidden, .lda = hidden, .ldb = experts, .ldc = experts};
  if (detail::jitters_input(args)) {
    using jitter = detail::input_jitter<U>;
    launch<jitter>(jitter::forward(x.data_handle(), s.jittered_x, tokens, hidden, args),
                   cuda.stream);
    float const* const w =
        detail::float_elements(cuda, w_gate.data_handle(), s.gate_weight, hidden * experts);
    gemm(cuda.blas, cuda.stream, logits_shape, 1.0f, static_cast<float const*>(s.jittered_x), w,
         0.0f, r.logits.data_handle());
  } else {
    gemm(cuda.blas, cuda.stream, logits_shape, 1.0f, x.data_handle(), w_gate.data_handle(), 0.0f,
         r.logits.data_handle());
  }

  // Noise, scores, selection, pre-drop weights and random routing (select.cuh).
  renormalize const normalize = effective_renormalize<Score, renormalization_of<G>>(args, k);
  bool const random_second = second_expert_of<G>::random && args.training;
  using select = router_select<Score, detail::static_k_or<G>(0), selection_of<G>>;
  launch<select>(select::to_params(r, s.logsumexp_squared, s.score_sum, args,
                                   normalize == renormalize::before_drops, random_second),
                 cuda.stream);

  // Slots per local group under the gate's capacity rule, the training or evaluation factor.
  capacity_args const cap = capacity_args_of(args, k, capacity_of<G>::rounding, tokens);
  detail::assign_slots_unchecked<Priority>(cuda, cap,
                                           slot_args{.seed = args.seed,
                                                     .scaling_factor = args.scaling_factor,
                                                     .left_out_marked = random_second},
                                           r, s.slots, reduce_max_load);

  launch<detail::finalize_weights>(
      {r.slot.data_handle(), r.weight.data_handle(), tokens, k,
       normalize == renormalize::after_drops, static_cast<float>(args.scaling_factor), r.scalars},
      cuda.stream);

  detail::launch_losses<aux_loss_of<G>>(
      cuda.stream,
      detail::loss_inputs{.scores = r.scores.data_handle(),
                          .expert = r.expert.data_handle(),
                          .score_sum = s.score_sum,
                          .logsumexp_squared = s.logsumexp_squared,
                          .tokens = tokens,
                          .experts = experts,
                          .k = k,
                          .groups = args.groups},
      s.losses, r);
}

/// The call's scalars, copied to the host. This synchronises `cuda.stream` — the one
/// synchronisation of CUDA routing, made only here, when the caller asks for the numbers.
/// @param[in] r device memory, after `route` on the same stream
inline routing_summary read_summary(cuda_backend cuda, device_routing const& r) {
  MOE_EXPECTS(r.scalars != nullptr, "r.scalars", "null: no scalars to read");
  device_routing_scalars s{};
  MOE_CUDA_TRY(cudaMemcpyAsync(&s, r.scalars, sizeof s, cudaMemcpyDeviceToHost, cuda.stream));
  MOE_CUDA_TRY(cudaStreamSynchronize(cuda.stream));
  return {.tokens = r.tokens(),
          .capacity = s.capacity,
          .dropped = s.dropped,
          .aux_loss = s.aux_loss,
          .z_loss = s.z_loss,
          .unrouted = s.unrouted,
          .max_load = s.max_load};
}

namespace detail {

/// The scratch of the CUDA `route_backward` with elements T, laid out by
/// `carve_route_backward_scratch`: d_logits in T for cuBLAS (none for float); with the
/// input's jitter, float copies of W_gate and dW_gate (none for float) and one (T, H) float
/// buffer, first d_logits · W_gateᵀ, then x'.
template <class T>
struct route_backward_scratch {
  T* d_logits;
  float* gate_weight;
  float* d_gate_weight;
  float* rows;
};

template <class T>
route_backward_scratch<T> carve_route_backward_scratch(workspace_carver& carver,
                                                       gate_args const& args, index_t tokens,
                                                       index_t hidden) {
  constexpr bool is_float = std::is_same_v<T, float>;
  route_backward_scratch<T> s{};
  if (jitters_input(args)) {
    s.rows = carver.take<float>(tokens * hidden);
    if constexpr (!is_float) {
      s.gate_weight = carver.take<float>(hidden * args.experts);
      s.d_gate_weight = carver.take<float>(hidden * args.experts);
    }
  } else if constexpr (!is_float) {
    s.d_logits = carver.take<T>(tokens * args.experts);
  }
  return s;
}

/// dx (T, H) += d_logits (T, E) · W_gateᵀ (E, H) and dW_gate (H, E) = x'ᵀ (H, T) · d_logits,
/// x' = x ⊙ jitter when the call jitters the input (then in float), else x.
template <class T>
void gate_gradients(cuda_backend cuda, gate_args const& args, matrix_view<T const> x,
                    matrix_view<T const> w_gate, matrix_view<float const> d_logits,
                    matrix_view<T> dx, matrix_view<T> d_w_gate,
                    route_backward_scratch<T> const& s) {
  index_t const tokens = x.extent(0), hidden = x.extent(1), experts = w_gate.extent(1);
  gemm_shape const dx_shape{.m = tokens,
                            .n = hidden,
                            .depth = experts,
                            .trans_a = transpose::no,
                            .trans_b = transpose::yes,
                            .lda = experts,
                            .ldb = experts,
                            .ldc = hidden};
  gemm_shape const dw_shape{.m = hidden,
                            .n = experts,
                            .depth = tokens,
                            .trans_a = transpose::yes,
                            .trans_b = transpose::no,
                            .lda = hidden,
                            .ldb = experts,
                            .ldc = experts};
  if (!jitters_input(args)) {
    // cuBLAS multiplies operands of one type: d_logits in T, unless T is float.
    T const* d_logits_t = nullptr;
    if constexpr (std::is_same_v<T, float>) {
      d_logits_t = d_logits.data_handle();
    } else {
      launch<convert_elements<float, T>>({d_logits.data_handle(), s.d_logits, tokens * experts},
                                         cuda.stream);
      d_logits_t = s.d_logits;
    }
    gemm(cuda.blas, cuda.stream, dx_shape, 1.0f, d_logits_t, w_gate.data_handle(), 1.0f,
         dx.data_handle());
    gemm(cuda.blas, cuda.stream, dw_shape, 1.0f, x.data_handle(), d_logits_t, 0.0f,
         d_w_gate.data_handle());
    return;
  }

  // Through x' = x ⊙ jitter, in float: g = d_logits · W_gateᵀ, dx += g ⊙ jitter, then the
  // same buffer takes x' again for dW_gate = x'ᵀ · d_logits.
  float const* const w =
      float_elements(cuda, w_gate.data_handle(), s.gate_weight, hidden * experts);
  float* d_w = nullptr;
  if constexpr (std::is_same_v<T, float>)
    d_w = d_w_gate.data_handle();
  else
    d_w = s.d_gate_weight;
  float const* const d_l = d_logits.data_handle();
  gemm(cuda.blas, cuda.stream, dx_shape, 1.0f, d_l, w, 0.0f, s.rows);
  using jitter = input_jitter<T>;
  launch<jitter>(jitter::backward(s.rows, dx.data_handle(), tokens, hidden, args), cuda.stream);
  launch<jitter>(jitter::forward(x.data_handle(), s.rows, tokens, hidden, args), cuda.stream);
  gemm(cuda.blas, cuda.stream, dw_shape, 1.0f, static_cast<float const*>(s.rows), d_l, 0.0f, d_w);
  if constexpr (!std::is_same_v<T, float>)
    launch<convert_elements<float, T>>({d_w, d_w_gate.data_handle(), hidden * experts},
                                       cuda.stream);
}

}  // namespace detail

/// Scratch bytes of the CUDA `route_backward` for up to `args.tokens` tokens with element
/// type T: d_logits converted to T for cuBLAS (none for float); with the input's jitter, a
/// (T, H) float buffer and float copies of W_gate and dW_gate (`hidden` is then needed).
template <element T, gate G>
std::size_t route_backward_workspace_bytes(G const& gate, gate_args const& args,
                                           index_t hidden = 0) {
  detail::check_cuda_gate(gate, args).throw_if_failed();
  detail::check_hidden_for_sizing(args, hidden);
  workspace_carver counter;
  (void)detail::carve_route_backward_scratch<std::remove_cv_t<T>>(counter, args, args.tokens,
                                                                  hidden);
  return counter.bytes();
}

/// Checks a CUDA `route_backward` call as it does before any device work, and writes
/// nothing: what `can_implement` of route checks, and the extents of d_weight, d_logits, dx
/// and d_w_gate.
template <gate G, element T>
[[nodiscard]] status can_implement(cuda_backend cuda, G const& gate, gate_args const& args,
                                   device_routing const& r, matrix_view<float const> d_weight,
                                   matrix_view<T const> x, matrix_view<T const> w_gate,
                                   matrix_view<float> d_logits, matrix_view<T> dx,
                                   matrix_view<T> d_w_gate, workspace scratch) noexcept {
  if (auto s = detail::check_cuda_call(cuda, gate, args); !s) return s;
  int const k = gate.k(args);
  index_t const tokens = x.extent(0), hidden = x.extent(1), experts = args.experts;
  if (auto s = detail::check_routing_call(args, k, x, w_gate, r); !s) return s;
  for (status s : {check_extents(d_weight, "d_weight", {tokens, k}),
                   check_extents(d_logits, "d_logits", {tokens, experts}),
                   check_extents(dx, "dx", {tokens, hidden}),
                   check_extents(d_w_gate, "d_w_gate", {hidden, experts})})
    if (!s) return s;
  return detail::check_scratch(scratch, [&](workspace_carver& counter) {
    return detail::carve_route_backward_scratch<std::remove_cv_t<T>>(counter, args, tokens, hidden);
  });
}

/// Backward of gate G on the CUDA backend: the device twin of host `route_backward`
/// (router.hpp), for the objective ⟨d_weight, weight⟩ + aux_loss_coef · aux_loss +
/// z_loss_coef · z_loss. Dropped and left-out assignments receive no gradient through their
/// weight; the bias, the selection and the noise receive none. Stream-ordered on
/// `cuda.stream`; nothing synchronises.
/// @param[in]    r        device memory, as the forward left it (same args)
/// @param[in]    d_weight (tokens, k)       device memory
/// @param[in]    x        (tokens, hidden)  device memory, the forward's input
/// @param[in]    w_gate   (hidden, experts) device memory
/// @param[out]   d_logits (tokens, experts) device memory
/// @param[inout] dx       (tokens, hidden)  device memory, accumulated into
/// @param[out]   d_w_gate (hidden, experts) device memory, overwritten
/// @param scratch         device memory, route_backward_workspace_bytes<T>(gate, args, H)
/// @throws invalid_argument before any device work when an argument does not fit
template <gate G, element T>
void route_backward(cuda_backend cuda, G const& gate, gate_args const& args,
                    device_routing const& r, matrix_view<float const> d_weight,
                    matrix_view<T const> x, matrix_view<T const> w_gate,
                    matrix_view<float> d_logits, matrix_view<T> dx, matrix_view<T> d_w_gate,
                    workspace scratch,
                    std::source_location caller = std::source_location::current()) {
  using Score = typename G::score_function;
  using U = std::remove_cv_t<T>;
  static_assert(dtype_traits<U>::device_supported,
                "moe::gating::route_backward (CUDA): x and W_gate must be float, __half or "
                "__nv_bfloat16.");

  moe::detail::at_entry_point(caller, [&] {
    can_implement(cuda, gate, args, r, d_weight, x, w_gate, d_logits, dx, d_w_gate, scratch)
        .throw_if_failed();
  });
  int const k = gate.k(args);
  index_t const tokens = x.extent(0), hidden = x.extent(1);
  workspace_carver carver(scratch);
  auto const s = detail::carve_route_backward_scratch<U>(carver, args, tokens, hidden);

  index_t const aux_row_tokens = aux_loss_of<G>::per_group ? tokens / args.groups : tokens;
  using backward_kernel = detail::router_backward<Score>;
  launch<backward_kernel>(
      backward_kernel::to_params(r, d_weight.data_handle(), d_logits.data_handle(), args,
                                 effective_renormalize<Score, renormalization_of<G>>(args, k),
                                 aux_row_tokens),
      cuda.stream);

  detail::gate_gradients(cuda, args, x, w_gate, as_const(d_logits), dx, d_w_gate, s);
}

}  // namespace moe::gating
