// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA backend of a whole gate, forward and backward: the device twin of `route` and
// `route_backward` in gating/router.hpp, with float router math and the same semantics.
//
// Forward, all stream-ordered on the caller's stream, no host synchronisation:
//   logits = x · W_gate                      cuBLAS (moe::gemm), float output
//   scores, top-k, pre-drop weights, lse²    router_select (select.cuh), a warp per token
//   slots, loads, capacity, drops            assign_slots (slots.cuh), capacity on the device
//   weights: renormalise, zero the dropped   finalize_weights, reading C from device memory
//   me, ce, gshard_aux, z_loss               losses.cuh, fixed-order reductions
// `read_summary` brings the scalars to the host; it is the one call that synchronises.
//
// Backward: d_logits by a warp per token (aux-loss, renormalisation and score-function
// gradients, plus the z-loss), then dx += d_logits · W_gateᵀ and dW_gate = xᵀ · d_logits.

#include <moe/core/backend.hpp>
#include <moe/core/blas.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/kernels/losses.cuh>
#include <moe/gating/kernels/reduce.cuh>
#include <moe/gating/kernels/scores.cuh>
#include <moe/gating/kernels/select.cuh>
#include <moe/gating/kernels/slots.cuh>
#include <moe/gating/policies.hpp>
#include <moe/gating/router.hpp>
#include <moe/gating/weights.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

namespace moe::gating {

namespace detail {

/// The k of a gate as a template constant: G::static_k, or 0 when k is given at run time.
template <gate G>
inline constexpr int static_k_of = [] {
  if constexpr (static_k_gate<G>)
    return G::static_k;
  else
    return 0;
}();

/// Turns the selected scores into combine weights once the capacity is known (weights.hpp):
/// w = α · s / D for a kept assignment, D the sum the renormalisation divides by (1 for
/// none, or when the sum is 0), and 0 for a dropped one. A thread per token.
struct finalize_weights {
  static constexpr int threads = 256;
  struct params {
    std::int64_t const* slot;  // (tokens, k) device memory
    float* weight;             // (tokens, k) in: selected scores; out: combine weights
    index_t tokens;
    int k;
    renormalize normalize;
    float scaling_factor;                   // α
    device_routing_scalars const* scalars;  // capacity, written by assign_slots
  };
  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(ceil_div(p.tokens, threads)));
  }
  static dim3 block(params const&) { return dim3(threads); }
  static std::size_t smem_bytes(params const&) { return 0; }

  __device__ void operator()(params const& p, char*) const {
    index_t const t = static_cast<index_t>(blockIdx.x) * threads + threadIdx.x;
    if (t >= p.tokens) return;
    std::int64_t const capacity = p.scalars->capacity;
    std::int64_t const* slot = p.slot + t * p.k;
    float* weight = p.weight + t * p.k;
    if (p.normalize != renormalize::none) {
      float sum = 0;
      for (int j = 0; j < p.k; ++j)
        if (p.normalize == renormalize::before_drops || slot[j] < capacity) sum += weight[j];
      if (sum > 0)
        for (int j = 0; j < p.k; ++j) weight[j] /= sum;
    }
    for (int j = 0; j < p.k; ++j) weight[j] = slot[j] < capacity ? p.scaling_factor * weight[j] : 0;
  }
};

/// d_logits of one token per warp, for the objective ⟨d_weight, weight⟩ + aux_coef ·
/// gshard_aux + z_coef · z_loss, as host route_backward. The gradient of the scores is a
/// dense part, aux_coef · E · ce_e / T for every e, plus one entry per selected expert
/// (through the renormalisation; none for a dropped one). The score function's backward
/// is linear in it, so the dense part is applied over the row and each selected expert's
/// entry is added afterwards by the lane that holds it.
template <device_score_function Score>
struct router_backward {
  using score = device_score<Score>;
  static constexpr int warps_per_block = 8;
  struct params {
    float const* logits;         // (tokens, experts) device memory
    float const* scores;         // (tokens, experts)
    std::int32_t const* expert;  // (tokens, k)
    std::int64_t const* slot;    // (tokens, k)
    float const* first_choice;   // (experts)
    device_routing_scalars const* scalars;
    float const* d_weight;  // (tokens, k)
    float* d_logits;        // (tokens, experts) out
    index_t tokens;
    index_t experts;
    int k;
    renormalize normalize;
    float scaling_factor;  // α: w = α · s / D, so d_weight reaches s / D times α
    float aux_loss_coef;
    float z_loss_coef;
  };
  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(ceil_div(p.tokens, warps_per_block)));
  }
  static dim3 block(params const&) { return dim3(warps_per_block * warp_size); }
  static std::size_t smem_bytes(params const&) { return 0; }

  __device__ void operator()(params const& p, char*) const {
    int const lane = static_cast<int>(threadIdx.x) % warp_size;
    index_t const t = static_cast<index_t>(blockIdx.x) * warps_per_block + threadIdx.x / warp_size;
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
    bool const in_set = holds && (p.normalize == renormalize::before_drops ||
                                  (p.normalize == renormalize::after_drops && kept));
    float const sum = warp_all_reduce(in_set ? s_j : 0.0f, plus{});
    bool const divided = p.normalize != renormalize::none && sum > 0;
    float delta = 0;  // this lane's entry of d_scores at e_j, beyond the dense part
    if (divided) {    // the same on every lane (sum is warp-reduced): all 32 lanes shuffle
      float const m = warp_all_reduce(kept ? dw_j * (s_j / sum) : 0.0f, plus{});
      delta = ((kept ? dw_j : 0.0f) - (in_set ? m : 0.0f)) / sum;
    } else if (kept) {
      delta = dw_j;
    }

    // The host's order: coef · (E · ce_e / T).
    float const experts = static_cast<float>(p.experts), tokens = static_cast<float>(p.tokens);
    auto dense = [&](index_t e) {
      return p.aux_loss_coef * (experts * p.first_choice[e] / tokens);
    };

    // ⟨s, d_s⟩ over the row: the dense part, then each selected expert's entry.
    float dot = valid ? s_j * delta : 0.0f;
    for (index_t e = lane; e < p.experts; e += warp_size) dot += scores[e] * dense(e);
    dot = warp_all_reduce(dot, plus{});

    // The z-loss: d_l_e += z_coef / T · 2 · lse · exp(l_e − lse).
    float lse = 0;
    if (p.z_loss_coef != 0) lse = score::logsumexp(score::statistics(logits, p.experts, lane));
    float const z_scale = p.z_loss_coef / tokens * 2 * lse;

    for (index_t e = lane; e < p.experts; e += warp_size) {
      float d = score::d_logit(scores[e], dense(e), dot);
      if (p.z_loss_coef != 0) d += z_scale * expf(logits[e] - lse);
      d_logits[e] = d;
    }
    __syncwarp();  // every lane's entries are written before a selected one is rewritten
    if (valid) {
      // A selected expert's entry in one expression, d_s = dense + delta, so that it cancels
      // against `dot` exactly where the math does (E = 1: s = 1 and d_s = dot). __fadd_rn
      // keeps nvcc from fusing coef · X + delta into an FMA, which would break that.
      float d = score::d_logit(s_j, __fadd_rn(dense(e_j), delta), dot);
      if (p.z_loss_coef != 0) d += z_scale * expf(logits[e_j] - lse);
      d_logits[e_j] = d;
    }
  }
};

/// dst = T(src), elementwise: the float d_logits as cuBLAS's operand type.
template <class T>
struct convert_elements {
  static constexpr int threads = 256;
  struct params {
    float const* source;  // (count) device memory
    T* destination;       // (count)
    index_t count;
  };
  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(ceil_div(p.count, threads)));
  }
  static dim3 block(params const&) { return dim3(threads); }
  static std::size_t smem_bytes(params const&) { return 0; }

  __device__ void operator()(params const& p, char*) const {
    index_t const i = static_cast<index_t>(blockIdx.x) * threads + threadIdx.x;
    if (i < p.count) p.destination[i] = from_accumulate<T>(p.source[i]);
  }
};

/// The scratch of the CUDA `route`, laid out by `carve_route_scratch`.
struct route_scratch {
  float* logsumexp_squared;     // (tokens)
  float* partial_score;         // (chunks, experts)
  std::int32_t* partial_count;  // (chunks, experts)
  workspace slots;              // assign_slots's scratch
};

/// Lays out the scratch of `route` for `tokens` tokens; a counting carver gives its size.
inline route_scratch carve_route_scratch(workspace_carver& carver, index_t tokens, index_t experts,
                                         int k) {
  route_scratch s{};
  s.logsumexp_squared = carver.take<float>(tokens);
  s.partial_score = carver.take<float>(loss_chunks(tokens) * experts);
  s.partial_count = carver.take<std::int32_t>(loss_chunks(tokens) * experts);
  std::size_t const slots_bytes = slots_workspace_bytes(tokens, k, experts);
  s.slots = {carver.take<std::byte>(static_cast<index_t>(slots_bytes)), slots_bytes};
  return s;
}

/// The largest E the loss kernels' grids take (⌈E/32⌉ blocks in y).
inline constexpr index_t max_device_experts = index_t{65535} * warp_size;

/// The gates the CUDA router implements: a score function and a priority with a CUDA path,
/// any capacity rule and renormalisation, the top k of all experts, every selected expert
/// kept, and the GShard aux loss. Other policies are rejected at compile time.
template <class G>
inline constexpr bool cuda_routable =
    device_score_function<typename G::score_function>&& device_priority_order<
        typename G::priority>&& std::is_same_v<selection_of<G>, all_experts> &&
    !second_expert_of<G>::random && std::is_same_v<aux_loss_of<G>, gshard_aux>;

/// The run-time knobs the CUDA router does not implement yet; a call that sets one is
/// rejected, naming it.
inline status check_cuda_knobs(gate_args const& args) {
  if (args.groups != 1)
    return status::failure(
        "groups", "the CUDA router routes one local group; got " + std::to_string(args.groups));
  if (args.training && args.jitter != 0)
    return status::failure("jitter", "the CUDA router has no jitter yet; set it to 0");
  if (args.training && args.gate_noise != 0)
    return status::failure("gate_noise", "the CUDA router has no gate noise yet; set it to 0");
  if (!args.expert_bias.empty())
    return status::failure("expert_bias", "the CUDA router has no selection bias yet");
  if (args.experts > max_device_experts)
    return status::failure("experts", "the CUDA router takes at most " +
                                          std::to_string(max_device_experts) + " experts, got " +
                                          std::to_string(args.experts));
  return {};
}

/// Checks what `route`, `route_backward` and their workspace queries share: the gate's and
/// its policies' checks (policies.hpp), then the CUDA router's own limits. Returns k.
template <gate G>
int check_cuda_gate(G const& gate, gate_args const& args) {
  static_assert(cuda_routable<G>,
                "moe::gating (CUDA router): this gate has no CUDA path. It needs a score "
                "function with a device_score (softmax), a priority with a device_priority "
                "(choice_major, token_major), selection all_experts, no random routing and the "
                "gshard_aux loss; route it on the host backend.");
  check_gate(gate, args).throw_if_failed();
  check_cuda_knobs(args).throw_if_failed();
  return gate.k(args);
}

/// check_cuda_gate, and the cuBLAS handle the call needs.
template <gate G>
int check_cuda_call(cuda_backend cuda, G const& gate, gate_args const& args) {
  int const k = check_cuda_gate(gate, args);
  MOE_EXPECTS(cuda.blas != nullptr, "blas",
              "the CUDA router runs cuBLAS: lend it a handle (moe::blas_handle) in cuda.blas");
  return k;
}

inline void check_scratch(workspace scratch, std::size_t needed) {
  MOE_EXPECTS(scratch.size() >= needed && (needed == 0 || scratch.data() != nullptr), "scratch",
              "holds " + std::to_string(scratch.size()) + " bytes; the call needs " +
                  std::to_string(needed));
}

}  // namespace detail

/// Scratch bytes of the CUDA `route` for up to `args.tokens` tokens. Needs a CUDA device
/// (CUB sizes its sort for the device's architecture).
/// @throws invalid_argument when the gate rejects `args`
template <gate G>
std::size_t route_workspace_bytes(G const& gate, gate_args const& args) {
  int const k = detail::check_cuda_gate(gate, args);
  workspace_carver counter;
  (void)detail::carve_route_scratch(counter, args.tokens, args.experts, k);
  return counter.bytes();
}

/// Forward of gate G on the CUDA backend: the device twin of host `route` (router.hpp),
/// with float router math. Everything is enqueued on `cuda.stream`; nothing synchronises,
/// and the call's scalars stay in `r.scalars` (read them with `read_summary`).
/// @param cuda        stream and a borrowed cuBLAS handle (required)
/// @param args        E = args.experts, k = gate.k(args), the capacity factor (training or
///                    evaluation), alignment, renormalisation and scaling factor; T is x's.
///                    Local groups, noise and the selection bias are rejected for now.
/// @param[in]  x      (tokens, hidden)  device memory
/// @param[in]  w_gate (hidden, experts) device memory
/// @param[out] r      device memory, carved for x's T and args' E and k
///                    (carve_device_routing): every view and the scalars are written
/// @param scratch     device memory, at least route_workspace_bytes(gate, args) for
///                    args.tokens ≥ T
/// @throws invalid_argument before any device work when the gate rejects args, an extent
///         is wrong, the scratch is too small or there is no cuBLAS handle: nothing was written
template <gate G, element T>
void route(cuda_backend cuda, G const& gate, gate_args const& args, matrix_view<T const> x,
           matrix_view<T const> w_gate, device_routing& r, workspace scratch) {
  using Score = typename G::score_function;
  using Priority = typename G::priority;
  static_assert(device_score_function<Score>,
                "moe::gating::route (CUDA): this score function has no CUDA path; specialise "
                "moe::gating::device_score<Score> (gating/kernels/scores.cuh).");
  static_assert(device_priority_order<Priority>,
                "moe::gating::route (CUDA): this priority has no CUDA path; specialise "
                "moe::gating::device_priority<P> (gating/kernels/slots.cuh).");
  static_assert(dtype_traits<std::remove_cv_t<T>>::device_supported,
                "moe::gating::route (CUDA): x and W_gate must be float, __half or __nv_bfloat16.");

  int const k = detail::check_cuda_call(cuda, gate, args);
  index_t const tokens = x.extent(0), hidden = x.extent(1), experts = args.experts;
  MOE_EXPECTS(tokens >= 1, "x", "has no tokens");  // as the host backend
  check_extents(x, "x", {tokens, hidden}).throw_if_failed();
  check_extents(w_gate, "w_gate", {hidden, experts}).throw_if_failed();
  check_extents(r.logits, "r.logits", {tokens, experts}).throw_if_failed();
  check_extents(r.scores, "r.scores", {tokens, experts}).throw_if_failed();
  check_extents(r.expert, "r.expert", {tokens, k}).throw_if_failed();
  check_extents(r.weight, "r.weight", {tokens, k}).throw_if_failed();
  check_extents(r.slot, "r.slot", {tokens, k}).throw_if_failed();
  check_extents(r.load, "r.load", {experts}).throw_if_failed();
  check_extents(r.mean_score, "r.mean_score", {experts}).throw_if_failed();
  check_extents(r.first_choice, "r.first_choice", {experts}).throw_if_failed();
  MOE_EXPECTS(r.scalars != nullptr, "r.scalars", "null: the call's scalars need device memory");
  detail::check_slot_sizes(tokens, k, experts).throw_if_failed();
  {
    workspace_carver counter;
    (void)detail::carve_route_scratch(counter, tokens, experts, k);
    detail::check_scratch(scratch, counter.bytes());
  }
  workspace_carver carver(scratch);
  detail::route_scratch const s = detail::carve_route_scratch(carver, tokens, experts, k);

  // logits (T, E) = x (T, H) · W_gate (H, E), accumulated in float.
  gemm(cuda.blas, cuda.stream,
       {.m = tokens, .n = experts, .depth = hidden, .lda = hidden, .ldb = experts, .ldc = experts},
       1.0f, x.data_handle(), w_gate.data_handle(), 0.0f, r.logits.data_handle());

  using select = router_select<Score, detail::static_k_of<G>>;
  launch<select>(select::to_params(r, s.logsumexp_squared), cuda.stream);

  // The training or evaluation factor, under the gate's capacity rule (capacity.hpp).
  capacity_args const cap = capacity_args_of(args, k, capacity_of<G>::rounding, tokens);
  detail::assign_slots_unchecked<Priority>(cuda, cap, r, s.slots);

  launch<detail::finalize_weights>({r.slot.data_handle(), r.weight.data_handle(), tokens, k,
                                    effective_renormalize<Score, renormalization_of<G>>(args, k),
                                    args.scaling_factor, r.scalars},
                                   cuda.stream);

  launch<detail::expert_partials>({r.scores.data_handle(), r.expert.data_handle(), tokens, experts,
                                   k, s.partial_score, s.partial_count},
                                  cuda.stream);
  launch<detail::expert_totals>({s.partial_score, s.partial_count, tokens, experts,
                                 r.mean_score.data_handle(), r.first_choice.data_handle()},
                                cuda.stream);
  launch<detail::loss_totals>({r.mean_score.data_handle(), r.first_choice.data_handle(),
                               s.logsumexp_squared, tokens, experts, r.scalars},
                              cuda.stream);
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
          .unrouted = 0,  // random routing has no CUDA path yet
          .max_load = s.max_load};
}

/// Scratch bytes of the CUDA `route_backward` for up to `args.tokens` tokens with element
/// type T: d_logits converted to T for cuBLAS, none for float.
template <element T, gate G>
std::size_t route_backward_workspace_bytes(G const& gate, gate_args const& args) {
  (void)detail::check_cuda_gate(gate, args);
  workspace_carver counter;
  if constexpr (!std::is_same_v<std::remove_cv_t<T>, float>)
    (void)counter.take<std::remove_cv_t<T>>(args.tokens * args.experts);
  return counter.bytes();
}

/// Backward of gate G on the CUDA backend: the device twin of host `route_backward`
/// (router.hpp), for the objective ⟨d_weight, weight⟩ + aux_loss_coef · gshard_aux +
/// z_loss_coef · z_loss. Dropped assignments receive no gradient. Stream-ordered on
/// `cuda.stream`; nothing synchronises.
/// @param[in]    r        device memory, as the forward left it (same args)
/// @param[in]    d_weight (tokens, k)       device memory
/// @param[in]    x        (tokens, hidden)  device memory, the forward's input
/// @param[in]    w_gate   (hidden, experts) device memory
/// @param[out]   d_logits (tokens, experts) device memory
/// @param[inout] dx       (tokens, hidden)  device memory, accumulated into
/// @param[out]   d_w_gate (hidden, experts) device memory, overwritten
/// @param scratch         device memory, route_backward_workspace_bytes<T>(gate, args)
/// @throws invalid_argument before any device work when an argument does not fit
template <gate G, element T>
void route_backward(cuda_backend cuda, G const& gate, gate_args const& args,
                    device_routing const& r, matrix_view<float const> d_weight,
                    matrix_view<T const> x, matrix_view<T const> w_gate,
                    matrix_view<float> d_logits, matrix_view<T> dx, matrix_view<T> d_w_gate,
                    workspace scratch) {
  using Score = typename G::score_function;
  using U = std::remove_cv_t<T>;
  static_assert(device_score_function<Score>,
                "moe::gating::route_backward (CUDA): this score function has no CUDA path; "
                "specialise moe::gating::device_score<Score> (gating/kernels/scores.cuh).");
  static_assert(dtype_traits<U>::device_supported,
                "moe::gating::route_backward (CUDA): x and W_gate must be float, __half or "
                "__nv_bfloat16.");

  int const k = detail::check_cuda_call(cuda, gate, args);
  index_t const tokens = x.extent(0), hidden = x.extent(1), experts = args.experts;
  check_extents(x, "x", {tokens, hidden}).throw_if_failed();
  check_extents(w_gate, "w_gate", {hidden, experts}).throw_if_failed();
  check_extents(r.logits, "r.logits", {tokens, experts}).throw_if_failed();
  check_extents(r.scores, "r.scores", {tokens, experts}).throw_if_failed();
  check_extents(r.expert, "r.expert", {tokens, k}).throw_if_failed();
  check_extents(r.slot, "r.slot", {tokens, k}).throw_if_failed();
  check_extents(r.first_choice, "r.first_choice", {experts}).throw_if_failed();
  MOE_EXPECTS(r.scalars != nullptr, "r.scalars", "null: the forward's capacity is read there");
  check_extents(d_weight, "d_weight", {tokens, k}).throw_if_failed();
  check_extents(d_logits, "d_logits", {tokens, experts}).throw_if_failed();
  check_extents(dx, "dx", {tokens, hidden}).throw_if_failed();
  check_extents(d_w_gate, "d_w_gate", {hidden, experts}).throw_if_failed();
  workspace_carver counter;
  if constexpr (!std::is_same_v<U, float>) (void)counter.take<U>(tokens * experts);
  detail::check_scratch(scratch, counter.bytes());

  launch<detail::router_backward<Score>>(
      {r.logits.data_handle(), r.scores.data_handle(), r.expert.data_handle(), r.slot.data_handle(),
       r.first_choice.data_handle(), r.scalars, d_weight.data_handle(), d_logits.data_handle(),
       tokens, experts, k, effective_renormalize<Score, renormalization_of<G>>(args, k),
       args.scaling_factor, args.aux_loss_coef, args.z_loss_coef},
      cuda.stream);

  // cuBLAS multiplies operands of one type: d_logits in T, unless T is float.
  U const* d_logits_t = nullptr;
  if constexpr (std::is_same_v<U, float>) {
    d_logits_t = d_logits.data_handle();
  } else {
    workspace_carver carver(scratch);
    U* converted = carver.take<U>(tokens * experts);
    launch<detail::convert_elements<U>>({d_logits.data_handle(), converted, tokens * experts},
                                        cuda.stream);
    d_logits_t = converted;
  }

  // dx (T, H) += d_logits (T, E) · W_gateᵀ (E, H).
  gemm(cuda.blas, cuda.stream,
       {.m = tokens,
        .n = hidden,
        .depth = experts,
        .trans_a = transpose::no,
        .trans_b = transpose::yes,
        .lda = experts,
        .ldb = experts,
        .ldc = hidden},
       1.0f, d_logits_t, w_gate.data_handle(), 1.0f, dx.data_handle());
  // dW_gate (H, E) = xᵀ (H, T) · d_logits (T, E).
  gemm(cuda.blas, cuda.stream,
       {.m = hidden,
        .n = experts,
        .depth = tokens,
        .trans_a = transpose::yes,
        .trans_b = transpose::no,
        .lda = hidden,
        .ldb = experts,
        .ldc = experts},
       1.0f, x.data_handle(), d_logits_t, 0.0f, d_w_gate.data_handle());
}

}  // namespace moe::gating
