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
//   weights: renormalise, scale, zero drops  finalize_weights, reading C from device memory
//   me, ce, the gate's aux loss, z_loss      losses.cuh, fixed-order reductions
// `read_summary` brings the scalars to the host; it is the one call that synchronises.
//
// Backward: d_logits by a warp per token (aux-loss, renormalisation and score-function
// gradients, the z-loss, the logits' jitter), then dx += d_logits · W_gateᵀ and
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
#include <moe/gating/device_routing.hpp>
#include <moe/gating/kernels/losses.cuh>
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

/// Turns the pre-drop weights into combine weights once the capacity is known (weights.hpp):
/// w = α · s / D for a kept assignment and 0 for a dropped one. router_select already
/// divided by the selected experts' sum when the call renormalises before drops; after
/// drops, D is the sum over the kept ones (1 when it is 0). A thread per token.
struct finalize_weights {
  static constexpr int threads = 256;
  struct params {
    std::int64_t const* slot;  // (tokens, k) device memory
    float* weight;             // (tokens, k) in: pre-drop weights; out: combine weights
    index_t tokens;
    int k;
    bool normalize_after;                   // divide by the sum over the kept assignments
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
    if (p.normalize_after) {
      float sum = 0;
      for (int j = 0; j < p.k; ++j)
        if (slot[j] < capacity) sum += weight[j];
      if (sum > 0)
        for (int j = 0; j < p.k; ++j) weight[j] /= sum;
    }
    for (int j = 0; j < p.k; ++j) weight[j] = slot[j] < capacity ? p.scaling_factor * weight[j] : 0;
  }
};

/// d_logits of one token per warp, for the objective ⟨d_weight, weight⟩ + aux_coef · aux +
/// z_coef · z_loss, as host route_backward. The gradient of the scores is a dense part, the
/// aux loss's (aux_coef · ∂aux/∂p, through p = s / Σ s when the scores do not sum to one),
/// plus one entry per selected expert (through the renormalisation; none for a dropped or
/// left-out one). The score function's backward is linear in it, so the dense part is
/// applied over the row and each selected expert's entry is added afterwards by the lane
/// that holds it. The logits' jitter scales the result.
template <device_score_function Score>
struct router_backward {
  using score = device_score<Score>;
  static constexpr int warps_per_block = 8;
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
  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(ceil_div(p.tokens, warps_per_block)));
  }
  static dim3 block(params const&) { return dim3(warps_per_block * moe::detail::warp_size); }
  static std::size_t smem_bytes(params const&) { return 0; }

  __device__ void operator()(params const& p, char*) const {
    int const lane = static_cast<int>(threadIdx.x) % moe::detail::warp_size;
    index_t const t =
        static_cast<index_t>(blockIdx.x) * warps_per_block + threadIdx.x / moe::detail::warp_size;
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

/// The jitter of the router's input, elementwise with j = jitter(t, h) (the host's double
/// products, rounded once): x' = x ⊙ j in float for the forward (and dW_gate), or
/// dx += g ⊙ j for the backward, g = d_logits · W_gateᵀ in float. A thread per element.
template <class T>
struct input_jitter {
  static constexpr int threads = 256;
  struct params {
    T const* x;             // (tokens, hidden) device memory: x, to jitter into `jittered`
    float* jittered;        // (tokens, hidden)
    float const* gradient;  // (tokens, hidden) or, when x is null, g, to jitter into dx
    T* dx;                  // (tokens, hidden) accumulated into
    index_t tokens;
    index_t hidden;
    float epsilon;
    std::uint64_t seed;
  };
  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(ceil_div(p.tokens * p.hidden, threads)));
  }
  static dim3 block(params const&) { return dim3(threads); }
  static std::size_t smem_bytes(params const&) { return 0; }

  __device__ void operator()(params const& p, char*) const {
    index_t const i = static_cast<index_t>(blockIdx.x) * threads + threadIdx.x;
    if (i >= p.tokens * p.hidden) return;
    index_t const t = i / p.hidden, h = i % p.hidden;
    double const j = jitter_factor(p.epsilon, p.seed, t, static_cast<std::uint32_t>(h),
                                   rng_stream::jitter_input);
    if (p.x != nullptr)
      p.jittered[i] = static_cast<float>(mul_rn(static_cast<double>(to_accumulate(p.x[i])), j));
    else
      p.dx[i] = from_accumulate<T>(static_cast<float>(
          to_accumulate(p.dx[i]) + mul_rn(static_cast<double>(p.gradient[i]), j)));
  }

  /// x' = x ⊙ j.
  static params forward(T const* x, float* jittered, index_t tokens, index_t hidden,
                        gate_args const& args) noexcept {
    return {x, jittered, nullptr, nullptr, tokens, hidden, args.jitter, args.seed};
  }
  /// dx += g ⊙ j.
  static params backward(float const* gradient, T* dx, index_t tokens, index_t hidden,
                         gate_args const& args) noexcept {
    return {nullptr, nullptr, gradient, dx, tokens, hidden, args.jitter, args.seed};
  }
};

/// dst = To(src), elementwise: cuBLAS multiplies operands of one type.
template <class From, class To>
struct convert_elements {
  static constexpr int threads = 256;
  struct params {
    From const* source;  // (count) device memory
    To* destination;     // (count)
    index_t count;
  };
  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(ceil_div(p.count, threads)));
  }
  static dim3 block(params const&) { return dim3(threads); }
  static std::size_t smem_bytes(params const&) { return 0; }

  __device__ void operator()(params const& p, char*) const {
    index_t const i = static_cast<index_t>(blockIdx.x) * threads + threadIdx.x;
    if (i < p.count) p.destination[i] = from_accumulate<To>(to_accumulate(p.source[i]));
  }
};

/// Whether a call jitters the router's input x (training, jitter on the input).
inline bool jitters_input(gate_args const& args) noexcept {
  return args.training && args.jitter > 0 && args.jitter_on == jitter_target::input;
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

/// The largest E the loss kernels' grids take (⌈E/32⌉ blocks in y).
inline constexpr index_t max_device_experts = index_t{65535} * moe::detail::warp_size;

/// The gates the CUDA router implements: a score function, a priority and a selection policy
/// with a CUDA path (every one of gating/ has one); any capacity rule, renormalisation,
/// 2nd-expert policy and aux loss.
template <class G>
inline constexpr bool cuda_routable = device_score_function<typename G::score_function>&&
    device_priority_order<typename G::priority>&& device_selection_policy<selection_of<G>>;

/// The run-time limits of the CUDA router beyond the gate's own checks.
inline status check_cuda_knobs(gate_args const& args) {
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
                "moe::gating (CUDA router): this gate has no CUDA path. Its score function needs "
                "a device_score (scores.cuh), its priority a device_priority (slots.cuh) and its "
                "selection a device_selection (select.cuh); route it on the host backend.");
  check_gate(gate, args).throw_if_failed();
  check_cuda_knobs(args).throw_if_failed();
  int const k = gate.k(args);
  check_slot_sizes(args.tokens, k, args.experts, args.groups).throw_if_failed();
  return k;
}

/// check_cuda_gate, and the cuBLAS handle the call needs.
template <gate G>
int check_cuda_call(cuda_backend cuda, G const& gate, gate_args const& args) {
  int const k = check_cuda_gate(gate, args);
  MOE_EXPECTS(cuda.blas != nullptr, "blas",
              "the CUDA router runs cuBLAS: lend it a handle (moe::blas_handle) in cuda.blas");
  return k;
}

/// The router's input width for sizing: needed only when the call jitters the input.
inline void check_hidden_for_sizing(gate_args const& args, index_t hidden) {
  MOE_EXPECTS(!jitters_input(args) || hidden >= 1, "hidden",
              "the call jitters the router's input (training, jitter on x): give x's width to "
              "size the jittered copy");
}

inline void check_scratch(workspace scratch, std::size_t needed) {
  MOE_EXPECTS(scratch.size() >= needed && (needed == 0 || scratch.data() != nullptr), "scratch",
              "holds " + std::to_string(scratch.size()) + " bytes; the call needs " +
                  std::to_string(needed));
}

/// What `route` and `route_backward` check of a call before any work: T = x's rows (at
/// least 1, a multiple of the local groups, within what slot assignment sorts), W_gate's
/// extents, and the routing state `r` carved for T, E, k and the local groups.
template <class T>
void check_routing_call(gate_args const& args, int k, matrix_view<T const> x,
                        matrix_view<T const> w_gate, device_routing const& r) {
  index_t const tokens = x.extent(0), experts = args.experts;
  MOE_EXPECTS(tokens >= 1, "x", "has no tokens");  // as the host backend
  MOE_EXPECTS(tokens % args.groups == 0, "x",
              "has " + std::to_string(tokens) + " tokens, not a multiple of the " +
                  std::to_string(args.groups) + " local groups");
  check_slot_sizes(tokens, k, experts, args.groups).throw_if_failed();
  check_extents(w_gate, "w_gate", {x.extent(1), experts}).throw_if_failed();
  check_extents(r.logits, "r.logits", {tokens, experts}).throw_if_failed();
  check_extents(r.scores, "r.scores", {tokens, experts}).throw_if_failed();
  check_extents(r.expert, "r.expert", {tokens, k}).throw_if_failed();
  check_extents(r.weight, "r.weight", {tokens, k}).throw_if_failed();
  check_extents(r.slot, "r.slot", {tokens, k}).throw_if_failed();
  check_extents(r.load, "r.load", {experts}).throw_if_failed();
  check_extents(r.mean_score, "r.mean_score", {experts}).throw_if_failed();
  check_extents(r.first_choice, "r.first_choice", {experts}).throw_if_failed();
  MOE_EXPECTS(r.aux_gradient.extent(0) >= args.groups && r.aux_gradient.extent(1) == experts,
              "r.aux_gradient",
              "needs (groups, experts) = (" + std::to_string(args.groups) + ", " +
                  std::to_string(experts) + "): carve_device_routing with args.groups");
  MOE_EXPECTS(r.scalars != nullptr, "r.scalars", "null: the call's scalars lie in device memory");
}

}  // namespace detail

/// Scratch bytes of the CUDA `route` for up to `args.tokens` tokens. Needs a CUDA device
/// (CUB sizes its sort for the device's architecture).
/// @param hidden H of x: needed only when the call jitters the router's input (training,
///        args.jitter > 0 on jitter_target::input), which takes a float copy of x
/// @throws invalid_argument when the gate rejects `args`
template <element T, gate G>
std::size_t route_workspace_bytes(G const& gate, gate_args const& args, index_t hidden = 0) {
  int const k = detail::check_cuda_gate(gate, args);
  detail::check_hidden_for_sizing(args, hidden);
  workspace_carver counter;
  (void)detail::carve_route_scratch<G, T>(counter, args, args.tokens, hidden, k);
  return counter.bytes();
}

/// The same for float x (jitter on the input sizes a float copy of W_gate for other T).
template <gate G>
std::size_t route_workspace_bytes(G const& gate, gate_args const& args, index_t hidden = 0) {
  return route_workspace_bytes<float>(gate, args, hidden);
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
           ReduceMaxLoad&& reduce_max_load = {}) {
  using Score = typename G::score_function;
  using Priority = typename G::priority;
  using U = std::remove_cv_t<T>;
  static_assert(dtype_traits<U>::device_supported,
                "moe::gating::route (CUDA): x and W_gate must be float, __half or __nv_bfloat16.");

  int const k = detail::check_cuda_call(cuda, gate, args);
  index_t const tokens = x.extent(0), hidden = x.extent(1), experts = args.experts;
  detail::check_routing_call(args, k, x, w_gate, r);
  {
    workspace_carver counter;
    (void)detail::carve_route_scratch<G, T>(counter, args, tokens, hidden, k);
    detail::check_scratch(scratch, counter.bytes());
  }
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
    float const* w = nullptr;
    if constexpr (std::is_same_v<U, float>) {
      w = w_gate.data_handle();
    } else {
      launch<detail::convert_elements<U, float>>(
          {w_gate.data_handle(), s.gate_weight, hidden * experts}, cuda.stream);
      w = s.gate_weight;
    }
    gemm(cuda.blas, cuda.stream, logits_shape, 1.0f, static_cast<float const*>(s.jittered_x), w,
         0.0f, r.logits.data_handle());
  } else {
    gemm(cuda.blas, cuda.stream, logits_shape, 1.0f, x.data_handle(), w_gate.data_handle(), 0.0f,
         r.logits.data_handle());
  }

  // Noise, scores, selection, pre-drop weights and random routing (select.cuh).
  renormalize const normalize = effective_renormalize<Score, renormalization_of<G>>(args, k);
  bool const random_second = second_expert_of<G>::random && args.training;
  using select = router_select<Score, detail::static_k_of<G>, selection_of<G>>;
  typename select::params sp = select::to_params(r, s.logsumexp_squared);
  sp.score_sum = s.score_sum;
  sp.bias = args.expert_bias.empty() ? nullptr : args.expert_bias.data();
  sp.normalize_before = normalize == renormalize::before_drops;
  sp.random_second = random_second;
  sp.jitter = args.training && args.jitter_on == jitter_target::logits ? args.jitter : 0.0f;
  sp.noise_std =
      args.training ? static_cast<double>(args.gate_noise) / static_cast<double>(experts) : 0.0;
  sp.seed = args.seed;
  launch<select>(sp, cuda.stream);

  // Slots per local group under the gate's capacity rule, the training or evaluation factor.
  capacity_args const cap = capacity_args_of(args, k, capacity_of<G>::rounding, tokens);
  detail::assign_slots_unchecked<Priority>(cuda, cap,
                                           slot_args{.seed = args.seed,
                                                     .scaling_factor = args.scaling_factor,
                                                     .left_out_marked = random_second},
                                           r, s.slots, reduce_max_load);

  launch<detail::finalize_weights>(
      {r.slot.data_handle(), r.weight.data_handle(), tokens, k,
       normalize == renormalize::after_drops, args.scaling_factor, r.scalars},
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

}  // namespace detail

/// Scratch bytes of the CUDA `route_backward` for up to `args.tokens` tokens with element
/// type T: d_logits converted to T for cuBLAS (none for float); with the input's jitter, a
/// (T, H) float buffer and float copies of W_gate and dW_gate (`hidden` is then needed).
template <element T, gate G>
std::size_t route_backward_workspace_bytes(G const& gate, gate_args const& args,
                                           index_t hidden = 0) {
  (void)detail::check_cuda_gate(gate, args);
  detail::check_hidden_for_sizing(args, hidden);
  workspace_carver counter;
  (void)detail::carve_route_backward_scratch<std::remove_cv_t<T>>(counter, args, args.tokens,
                                                                  hidden);
  return counter.bytes();
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
                    workspace scratch) {
  using Score = typename G::score_function;
  using U = std::remove_cv_t<T>;
  static_assert(dtype_traits<U>::device_supported,
                "moe::gating::route_backward (CUDA): x and W_gate must be float, __half or "
                "__nv_bfloat16.");

  int const k = detail::check_cuda_call(cuda, gate, args);
  index_t const tokens = x.extent(0), hidden = x.extent(1), experts = args.experts;
  detail::check_routing_call(args, k, x, w_gate, r);
  check_extents(d_weight, "d_weight", {tokens, k}).throw_if_failed();
  check_extents(d_logits, "d_logits", {tokens, experts}).throw_if_failed();
  check_extents(dx, "dx", {tokens, hidden}).throw_if_failed();
  check_extents(d_w_gate, "d_w_gate", {hidden, experts}).throw_if_failed();
  {
    workspace_carver counter;
    (void)detail::carve_route_backward_scratch<U>(counter, args, tokens, hidden);
    detail::check_scratch(scratch, counter.bytes());
  }
  workspace_carver carver(scratch);
  auto const s = detail::carve_route_backward_scratch<U>(carver, args, tokens, hidden);

  index_t const aux_row_tokens = aux_loss_of<G>::per_group ? tokens / args.groups : tokens;
  using backward_kernel = detail::router_backward<Score>;
  launch<backward_kernel>(
      typename backward_kernel::params{
          .logits = r.logits.data_handle(),
          .scores = r.scores.data_handle(),
          .expert = r.expert.data_handle(),
          .slot = r.slot.data_handle(),
          .aux_gradient = r.aux_gradient.data_handle(),
          .scalars = r.scalars,
          .d_weight = d_weight.data_handle(),
          .d_logits = d_logits.data_handle(),
          .tokens = tokens,
          .experts = experts,
          .aux_row_tokens = aux_row_tokens,
          .k = k,
          .normalize = effective_renormalize<Score, renormalization_of<G>>(args, k),
          .scaling_factor = args.scaling_factor,
          .aux_loss_coef = args.aux_loss_coef,
          .z_loss_coef = args.z_loss_coef,
          .jitter = args.training && args.jitter_on == jitter_target::logits ? args.jitter : 0.0f,
          .seed = args.seed},
      cuda.stream);

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
  if (!detail::jitters_input(args)) {
    // cuBLAS multiplies operands of one type: d_logits in T, unless T is float.
    U const* d_logits_t = nullptr;
    if constexpr (std::is_same_v<U, float>) {
      d_logits_t = d_logits.data_handle();
    } else {
      launch<detail::convert_elements<float, U>>(
          {d_logits.data_handle(), s.d_logits, tokens * experts}, cuda.stream);
      d_logits_t = s.d_logits;
    }
    // dx (T, H) += d_logits (T, E) · W_gateᵀ (E, H); dW_gate (H, E) = xᵀ (H, T) · d_logits.
    gemm(cuda.blas, cuda.stream, dx_shape, 1.0f, d_logits_t, w_gate.data_handle(), 1.0f,
         dx.data_handle());
    gemm(cuda.blas, cuda.stream, dw_shape, 1.0f, x.data_handle(), d_logits_t, 0.0f,
         d_w_gate.data_handle());
    return;
  }

  // Through x' = x ⊙ jitter, in float: g = d_logits · W_gateᵀ, dx += g ⊙ jitter, then the
  // same buffer takes x' again for dW_gate = x'ᵀ · d_logits.
  float const* w = nullptr;
  float* d_w = nullptr;
  if constexpr (std::is_same_v<U, float>) {
    w = w_gate.data_handle();
    d_w = d_w_gate.data_handle();
  } else {
    launch<detail::convert_elements<U, float>>(
        {w_gate.data_handle(), s.gate_weight, hidden * experts}, cuda.stream);
    w = s.gate_weight;
    d_w = s.d_gate_weight;
  }
  float const* const d_l = d_logits.data_handle();
  gemm(cuda.blas, cuda.stream, dx_shape, 1.0f, d_l, w, 0.0f, s.rows);
  using jitter = detail::input_jitter<U>;
  launch<jitter>(jitter::backward(s.rows, dx.data_handle(), tokens, hidden, args), cuda.stream);
  launch<jitter>(jitter::forward(x.data_handle(), s.rows, tokens, hidden, args), cuda.stream);
  gemm(cuda.blas, cuda.stream, dw_shape, 1.0f, static_cast<float const*>(s.rows), d_l, 0.0f, d_w);
  if constexpr (!std::is_same_v<U, float>)
    launch<detail::convert_elements<float, U>>({d_w, d_w_gate.data_handle(), hidden * experts},
                                               cuda.stream);
}

}  // namespace moe::gating
