// SPDX-License-Identifier: Apache-2.0
#pragma once
// moe::layer: a gate, a dispatch layout, a collective and an expert composed into one MoE
// layer, forward and backward. This header holds the layer and its host backend.
//
//   x (T, H) ─ gate ─▶ routing ─ gather ─▶ batch (R, H) ─ expert ─▶ (R, H) ─ combine ─▶ y (T, H)
//
// The expert batch has R rows, expert e's segment [begin_e, begin_e + rows_e) of them, and
// assignment (t, j) sits in row begin_e + slot(t, j) (layout/row_map.hpp). The layout says
// where the segments lie: capacity, begin_e = e·C and R = E·C; ragged, begin_e = the
// exclusive scan of the padded loads and R = their sum.
//
// Memory contract (DESIGN §3): `workspace_bytes()` then forward and backward in that
// workspace; forward leaves in it what backward needs. Nothing is allocated inside.

#include <moe/comm/communicator_ref.hpp>
#include <moe/comm/concepts.hpp>
#include <moe/core/backend.hpp>
#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/expert/concepts.hpp>
#include <moe/gating/args.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/router.hpp>
#include <moe/layer/concepts.hpp>
#include <moe/layer/expert_parallel.hpp>
#include <moe/layout/args.hpp>
#include <moe/layout/capacity.hpp>
#include <moe/layout/concepts.hpp>
#include <moe/layout/ragged.hpp>
#include <moe/layout/row_map.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

namespace moe {

/// The run-time arguments of a layer. A dropless layout (`layout::ragged`) has no capacity:
/// the values of `capacity_factor`, `eval_capacity_factor` and `capacity_alignment` do not
/// matter to it (they are still checked to be finite and at least 1), and it never rejects a
/// factor for giving capacity 0. The gating knobs are gate_args's (gating/args.hpp), which
/// says what each does.
///
/// Limits (`layer::can_implement` rejects what exceeds them, naming the argument): every
/// array the layer lays out holds at most `max_array_elements` (2^52) elements, so that its
/// workspace in bytes, and every index into it, fits int64. That bounds each of tokens,
/// hidden, ffn, experts, min_capacity and both alignments by 2^52, and the products T·H,
/// T·E, T·2F (the widths of the arrays per token), E·H·F (the expert weights) and the expert
/// batch's rows times those widths. The rows are E·C with the capacity layout, so the
/// capacity factor (finite, any magnitude) and capacity_alignment must give a capacity C
/// whose E·C rows fit; with the ragged layout they are T·k + E·(expert_row_alignment − 1),
/// and with expert parallelism over W ranks, W·T·min(k, E/W) + E/W·(expert_row_alignment − 1)
/// (checked when the layer is built on its communicator).
struct layer_args {
  index_t tokens = 0;              ///< T: most tokens one call routes (workspace is sized for it)
  index_t hidden = 0;              ///< H
  index_t ffn = 0;                 ///< F: inner width of an expert
  index_t experts = 0;             ///< E
  int top_k = 0;                   ///< k for `top_any`; 0 or the static k for `top_k<K>`
  float capacity_factor = 1.0f;    ///< f: > 0 fixed, == 0 dynamic, < 0 dynamic capped
  index_t capacity_alignment = 1;  ///< capacity rounded up to a multiple of this
  /// `layout::ragged`: each expert's rows padded to a multiple of this (16, 32, 128: GEMM
  /// tiles). A layout that drops tokens sizes its rows by the capacity and takes only 1.
  index_t expert_row_alignment = 1;
  gating::renormalize normalize = gating::renormalize::none;
  float aux_loss_coef = 0.0f;  ///< the layer's objective adds aux_loss_coef · the gate's aux loss
  float z_loss_coef = 0.0f;    ///< … and z_loss_coef · z_loss

  // --- gating knobs (gate_args) -------------------------------------------------------
  bool training = true;               ///< noise and random routing only in training
  float eval_capacity_factor = 1.0f;  ///< f while !training
  index_t min_capacity = 4;           ///< gating::deepspeed_capacity's lower bound
  index_t groups = 1;                 ///< local groups: T (every call's) a multiple of it
  float scaling_factor = 1.0f;        ///< combine weights times this, after renormalisation
  float jitter = 0.0f;                ///< ε of the jitter U[1−ε, 1+ε], training only
  gating::jitter_target jitter_on = gating::jitter_target::input;
  float gate_noise = 0.0f;  ///< Gaussian logit noise of std gate_noise / E, training only
  std::uint64_t seed = 0;   ///< key of the routing RNG; fold the step and rank into it
  /// (experts) selection bias, empty for none: host memory on the host backend, device memory
  /// on the CUDA one
  span<float const> expert_bias{};
};

/// Views of a layer's parameters (T const) or of their gradients (T).
template <class T, class Expert>
struct layer_params {
  matrix_view<T> gate_weight;                  // (hidden, experts)
  typename Expert::template params<T> expert;  // the expert's own views
};

/// What one forward call decided, read back with `layer::stats`.
struct layer_stats {
  index_t tokens = 0;
  /// C of the call; with a dropless layout, the largest per-expert load (nothing is dropped).
  index_t capacity = 0;
  index_t expert_rows = 0;  ///< rows of the expert batch, padding included (E·C for capacity)
  index_t dropped = 0;      ///< assignments that found no slot; 0 with a dropless layout
  double aux_loss = 0;      ///< gshard_aux, before its coefficient
  double z_loss = 0;        ///< z_loss, before its coefficient
  double loss = 0;          ///< aux_loss_coef · aux_loss + z_loss_coef · z_loss
  /// (experts) assignments per expert, before drops. A view into the workspace: the next
  /// forward call overwrites it.
  span<std::int64_t const> load;
};

namespace detail {

/// The CUDA backend of a layer. It is defined in <moe/layer/kernels/layer.cuh>, which
/// needs nvcc; the primary template only says where to find it.
template <class Layer>
struct cuda_layer {
  static_assert(sizeof(Layer) == 0,
                "moe::layer: the CUDA backend of the layer is defined in "
                "<moe/layer/kernels/layer.cuh>; include it in a .cu file compiled by nvcc.");
};

}  // namespace detail

/// An MoE layer.
/// @tparam Gate       a gating policy (moe::gating::top_k<2>, moe::gating::top_any<>, …)
/// @tparam Layout     a dispatch layout (moe::layout::capacity, moe::layout::ragged)
/// @tparam Collective a collective (moe::comm::single_rank)
/// @tparam Expert     an expert (moe::expert::ffn<moe::act::gelu>, …)
template <class Gate, class Layout, class Collective, class Expert>
class layer {
  static_assert(gating::gate<Gate>,
                "moe::layer: Gate is not a moe::gating::gate. Use a gating policy such as "
                "moe::gating::top_k<2> or moe::gating::top_any<>, or give your type "
                "`using moe_concept = moe::gating::gate_tag;`, a score_function, a priority, "
                "k(args) and can_implement(args).");
  static_assert(layout::dispatch_layout<Layout>,
                "moe::layer: Layout is not a moe::layout::dispatch_layout. Use "
                "moe::layout::capacity or moe::layout::ragged.");
  static_assert(comm::collective<Collective>,
                "moe::layer: Collective is not a moe::comm::collective. Use "
                "moe::comm::single_rank on one GPU.");
  static_assert(expert::expert<Expert>,
                "moe::layer: Expert is not a moe::expert::expert. Use moe::expert::ffn<Act> or "
                "a type that tags itself with moe::expert::expert_tag and provides params, "
                "check, carve_host_state and forward.");

 public:
  using gate_type = Gate;
  using layout_type = Layout;
  using collective_type = Collective;
  using expert_type = Expert;
  template <class T>
  using params = layer_params<T const, Expert>;
  template <class T>
  using gradients = layer_params<T, Expert>;

  /// A layer on one rank. Throws `moe::invalid_argument` when `can_implement(args)` fails.
  explicit layer(layer_args const& args) requires Collective::is_identity : args_(args) {
    can_implement(args).throw_if_failed();
  }

  /// A layer whose experts are split over the ranks of `comm` (expert parallelism): rank w
  /// holds experts [w·E/W, (w+1)·E/W), and its expert parameters are those E/W experts'.
  /// Every rank builds its layer with the same arguments. `comm` is borrowed: it must
  /// outlive the layer. Throws `moe::invalid_argument` when `can_implement(args)` fails or
  /// E is not a multiple of the world size.
  layer(layer_args const& args, comm::communicator_ref comm) requires(!Collective::is_identity)
      : args_(args), comm_(comm), ranks_(comm.size()), rank_(comm.rank()) {
    can_implement(args).throw_if_failed();
    MOE_EXPECTS(comm.size() >= 1 && args.experts % comm.size() == 0, "experts",
                std::to_string(args.experts) + " experts do not split evenly over " +
                    std::to_string(comm.size()) + " ranks");
    check_sizes(args, comm.size()).throw_if_failed();
  }

  /// Whether a layer can be built with these arguments, and if not, which argument is wrong:
  /// positive sizes, finite factors, the gate's own checks, a capacity of at least 1, and the
  /// limits layer_args states (every workspace array at most 2^52 elements), here for one
  /// rank (the constructor with a communicator checks them again for its world).
  [[nodiscard]] static status can_implement(layer_args const& args) noexcept {
    if (args.tokens < 1)
      return status::failure("tokens", "must be at least 1, got " + std::to_string(args.tokens));
    if (args.hidden < 1)
      return status::failure("hidden", "must be at least 1, got " + std::to_string(args.hidden));
    if (args.ffn < 1)
      return status::failure("ffn", "must be at least 1, got " + std::to_string(args.ffn));
    if (!std::isfinite(args.capacity_factor))
      return status::failure("capacity_factor",
                             "must be finite, got " + std::to_string(args.capacity_factor));
    if (args.capacity_alignment < 1)
      return status::failure("capacity_alignment",
                             "must be at least 1, got " + std::to_string(args.capacity_alignment));
    if (args.expert_row_alignment < 1)
      return status::failure("expert_row_alignment", "must be at least 1, got " +
                                                         std::to_string(args.expert_row_alignment));
    if (Layout::drops_tokens && args.expert_row_alignment != 1)
      return status::failure("expert_row_alignment",
                             "pads the rows of a dropless layout (layout::ragged) and must be 1 "
                             "here, got " +
                                 std::to_string(args.expert_row_alignment) +
                                 "; align the capacity with capacity_alignment instead");
    if (!std::isfinite(args.aux_loss_coef))
      return status::failure("aux_loss_coef", "must be finite");
    if (!std::isfinite(args.z_loss_coef)) return status::failure("z_loss_coef", "must be finite");
    gating::gate_args const gate_args = gate_args_of(args);
    if (auto s = Gate{}.can_implement(gate_args); !s) return s;
    if (auto s = check_sizes(args, 1); !s) return s;
    if (Layout::drops_tokens && capacity_bound_of(args) < 1)
      return status::failure("capacity_factor",
                             "gives capacity 0 at " + std::to_string(args.tokens) +
                                 " tokens over " + std::to_string(args.experts) +
                                 " experts; raise it, or use 0 for dynamic capacity");
    return {};
  }

  [[nodiscard]] layer_args const& args() const noexcept { return args_; }
  [[nodiscard]] int k() const noexcept { return Gate{}.k(gate_args_of(args_)); }
  /// The experts on this rank: all E on one rank, E/W with expert parallelism.
  [[nodiscard]] expert::expert_shape expert_shape() const noexcept {
    return {args_.experts / ranks(), args_.hidden, args_.ffn};
  }
  /// The world size the experts are split over (1 on one rank).
  [[nodiscard]] int ranks() const noexcept { return ranks_; }
  /// The first expert this rank holds.
  [[nodiscard]] index_t first_expert() const noexcept { return rank_ * expert_shape().experts; }

  /// Bytes of host workspace that forward and backward need (host backend).
  [[nodiscard]] std::size_t workspace_bytes(host_backend) const {
    workspace_carver counter;
    (void)carve(counter, args_.tokens, max_local_rows(), max_expert_rows());
    return counter.bytes();
  }

  /// Checks a forward call on the host backend: its tokens, the views, the workspace and
  /// the values of `expert_bias` (host memory here), as forward does; writes nothing.
  template <element T>
  [[nodiscard]] status can_implement(matrix_view<std::type_identity_t<T> const> x,
                                     params<T> const& p, matrix_view<T> y,
                                     workspace ws) const noexcept {
    index_t const tokens = x.extent(0);
    if (tokens < 1 || tokens > args_.tokens)
      return status::failure("x", "has " + std::to_string(tokens) +
                                      " tokens; the layer takes 1 to " +
                                      std::to_string(args_.tokens));
    if (auto s = gating::check_call_tokens(gate_args_of(args_), tokens); !s) return s;
    if (auto s = gating::check_host_expert_bias(gate_args_of(args_)); !s) return s;
    if (auto s = check_extents(x, "x", {tokens, args_.hidden}); !s) return s;
    if (auto s = check_extents(y, "y", {tokens, args_.hidden}); !s) return s;
    if (auto s = check_params(p, "params"); !s) return s;
    return check_workspace(ws);
  }

  /// Forward on the host: y = Σ_j w_{t,j} · expert_{e_j}(x_t) over kept choices.
  /// @param[in]  x  (tokens, hidden) host memory, 1 ≤ tokens ≤ args().tokens
  /// @param[in]  p  parameters, host memory
  /// @param[out] y  (tokens, hidden) host memory
  /// @param[in,out] ws host workspace of `workspace_bytes(host)` bytes; keeps what backward needs
  template <class T>
  void forward(host_backend, matrix_view<std::type_identity_t<T> const> x, params<T> const& p,
               matrix_view<T> y, workspace ws) const {
    static_assert(element<T>,
                  "moe::layer: the elements of x, y and the parameters must be float, __half or "
                  "__nv_bfloat16 (double on the host backend). Convert them, or instantiate "
                  "with one of those.");
    if constexpr (element<T>) forward_on_host(x, p, y, ws);
  }

  /// Backward on the host, of the objective ⟨dy, y⟩ + the layer's losses: writes dx and
  /// every gradient (zero for experts that received no token). Call it after `forward`
  /// with the same workspace.
  /// @param[in]  dy (tokens, hidden) host memory, the same tokens as the forward call
  /// @param[out] dx (tokens, hidden) host memory
  /// @param[out] g  gradients, host memory, overwritten
  template <class T>
  void backward(host_backend, matrix_view<std::type_identity_t<T> const> dy, params<T> const& p,
                matrix_view<T> dx, gradients<T> const& g, workspace ws) const {
    static_assert(element<T>,
                  "moe::layer: the elements of x, y and the parameters must be float, __half or "
                  "__nv_bfloat16 (double on the host backend). Convert them, or instantiate "
                  "with one of those.");
    static_assert(expert::trainable_expert<Expert>,
                  "moe::layer::backward: Expert has no backward (it is not a "
                  "moe::expert::trainable_expert). Give it backward(...) as expert/ffn.hpp "
                  "does, or use the layer for inference only.");
    if constexpr (element<T> && expert::trainable_expert<Expert>)
      backward_on_host(dy, p, dx, g, ws);
  }

 private:
  template <element T>
  void forward_on_host(matrix_view<T const> x, params<T> const& p, matrix_view<T> y,
                       workspace ws) const {
    can_implement(x, p, y, ws).throw_if_failed();
    index_t const tokens = x.extent(0);
    workspace_carver carver(ws);
    auto state = carve(carver, tokens, max_local_rows(), max_expert_rows());
    check_tokens_agree(state, tokens);
    gating::routing_summary const summary =
        gating::route(host, Gate{}, gate_args_of(args_), x, p.gate_weight, state.routing,
                      [&](index_t load) { return max_over_ranks(state, load); });
    index_t const local_rows = lay_out_local_batch(state, summary.capacity);
    index_t const expert_rows = lay_out_expert_batch(state, summary.capacity, local_rows);
    workspace_carver resized(ws);
    state = carve(resized, tokens, local_rows, expert_rows);
    state.routing.capacity = summary.capacity;

    for (index_t t = 0; t < tokens; ++t)
      for (index_t h = 0; h < args_.hidden; ++h) state.x(t, h) = to_accumulate(x(t, h));
    auto const row_of = row_map_of(state);
    layout::gather(host, state.routing, row_of, x, state.local_in);
    to_experts(state, as_const(state.local_in), state.dispatched);
    Expert::forward(host, expert_shape(), p.expert, segments_of(state), as_const(state.dispatched),
                    state.expert_out, state.expert);
    to_ranks(state, as_const(state.expert_out), state.local_out);
    layout::combine(host, state.routing, row_of, as_const(state.local_out), y);
    // The type is named: nvcc 13.0 ignores the designators of a braced list assigned to an
    // object of a dependent type, and fills the fields in order.
    *state.header = forward_header{.forward_tokens = tokens,
                                   .local_rows = local_rows,
                                   .expert_rows = expert_rows,
                                   .summary = summary};
  }

  template <element T>
  void backward_on_host(matrix_view<T const> dy, params<T> const& p, matrix_view<T> dx,
                        gradients<T> const& g, workspace ws) const {
    check_backward(dy, p, dx, g, ws).throw_if_failed();
    index_t const tokens = dy.extent(0);
    forward_header const header = header_of(ws);
    workspace_carver carver(ws);
    auto state = carve(carver, tokens, header.local_rows, header.expert_rows);
    state.routing.capacity = header.summary.capacity;

    auto const row_of = row_map_of(state);
    layout::combine_backward(host, state.routing, row_of, dy, as_const(state.local_out),
                             state.local_d_out, state.d_weight);
    to_experts(state, as_const(state.local_d_out), state.d_expert_out);
    Expert::backward(host, expert_shape(), p.expert, segments_of(state), as_const(state.dispatched),
                     as_const(state.d_expert_out), state.d_dispatched, g.expert, state.expert);
    to_ranks(state, as_const(state.d_dispatched), state.local_d_in);
    layout::gather_backward(host, state.routing, row_of, as_const(state.local_d_in), state.dx);
    gating::route_backward(host, Gate{}, gate_args_of(args_), state.routing,
                           as_const(state.d_weight), as_const(state.x), p.gate_weight,
                           state.d_logits, state.dx, g.gate_weight);
    for (index_t t = 0; t < dx.extent(0); ++t)
      for (index_t h = 0; h < dx.extent(1); ++h)
        dx(t, h) = from_accumulate<T>(static_cast<accumulate_t<T>>(state.dx(t, h)));
  }

 public:
  // --- CUDA backend (defined in layer/kernels/layer.cuh) ------------------------------

  /// Bytes of device workspace that forward and backward with elements T need on the CUDA
  /// backend (it queries the device: CUB sizes its sort for the architecture).
  template <element T>
  [[nodiscard]] std::size_t workspace_bytes(cuda_backend cuda) const {
    return detail::cuda_layer<layer>::template workspace_bytes<T>(*this, cuda);
  }

  /// Forward on the CUDA backend, enqueued on `cuda.stream` with `cuda.blas` for the GEMMs.
  /// The capacity layout with a fixed capacity factor never synchronises (a CUDA graph can
  /// capture it); dynamic capacity and the ragged layout read the expert batch's size on the
  /// host once (one stream synchronisation each), because the expert GEMMs need it there.
  /// @param[in]  x  (tokens, hidden) device memory, 1 ≤ tokens ≤ args().tokens
  /// @param[in]  p  parameters, device memory
  /// @param[out] y  (tokens, hidden) device memory
  /// @param[in,out] ws device workspace of `workspace_bytes<T>(cuda)` bytes; keeps what
  ///                backward needs (a copy of x among it)
  template <class T>
  void forward(cuda_backend cuda, matrix_view<std::type_identity_t<T> const> x, params<T> const& p,
               matrix_view<T> y, workspace ws) const {
    static_assert(element<T>,
                  "moe::layer: the elements of x, y and the parameters must be float, __half or "
                  "__nv_bfloat16 (double on the host backend). Convert them, or instantiate "
                  "with one of those.");
    if constexpr (element<T>) detail::cuda_layer<layer>::forward(*this, cuda, x, p, y, ws);
  }

  /// Backward on the CUDA backend, after `forward` on the same stream and workspace: writes
  /// dx and every gradient (zero for experts that received no token). Synchronises as the
  /// forward did (dynamic capacity and ragged read the batch's size again). dy must have the
  /// forward call's tokens: the device workspace keeps no header the host could check
  /// without synchronising.
  template <class T>
  void backward(cuda_backend cuda, matrix_view<std::type_identity_t<T> const> dy,
                params<T> const& p, matrix_view<T> dx, gradients<T> const& g, workspace ws) const {
    static_assert(element<T>,
                  "moe::layer: the elements of x, y and the parameters must be float, __half or "
                  "__nv_bfloat16 (double on the host backend). Convert them, or instantiate "
                  "with one of those.");
    static_assert(expert::trainable_expert<Expert>,
                  "moe::layer::backward: Expert has no backward (it is not a "
                  "moe::expert::trainable_expert). Give it backward(...) as expert/ffn.hpp "
                  "does, or use the layer for inference only.");
    if constexpr (element<T> && expert::trainable_expert<Expert>)
      detail::cuda_layer<layer>::backward(*this, cuda, dy, p, dx, g, ws);
  }

  /// What the last forward call in `ws` decided (CUDA backend). Synchronises `cuda.stream`
  /// to read the call's scalars; `load` is a view of device memory.
  [[nodiscard]] layer_stats stats(cuda_backend cuda, workspace ws, index_t tokens) const {
    return detail::cuda_layer<layer>::stats(*this, cuda, ws, tokens);
  }

  /// What the last forward call in `ws` decided (host backend).
  [[nodiscard]] layer_stats stats(host_backend, workspace ws) const {
    if (auto s = check_workspace(ws); !s) s.throw_if_failed();
    forward_header const h = header_of(ws);
    MOE_EXPECTS(h.magic == forward_header::forward_done, "ws", "holds no forward call's state");
    workspace_carver carver(ws);
    auto const state = carve(carver, h.forward_tokens, h.local_rows, h.expert_rows);
    return {.tokens = h.forward_tokens,
            .capacity = h.summary.capacity,
            .expert_rows = h.expert_rows,
            .dropped = h.summary.dropped,
            .aux_loss = h.summary.aux_loss,
            .z_loss = h.summary.z_loss,
            .loss = args_.aux_loss_coef * h.summary.aux_loss + args_.z_loss_coef * h.summary.z_loss,
            .load = {state.routing.load.data_handle(), static_cast<std::size_t>(args_.experts)}};
  }

 private:
  friend struct detail::cuda_layer<layer>;

  /// The first bytes of the workspace: what forward tells backward.
  struct forward_header {
    static constexpr std::uint64_t forward_done = 0x6d6f652d66776421;  // "moe-fwd!"
    std::uint64_t magic = forward_done;
    index_t forward_tokens = 0;
    index_t local_rows = 0;   // rows of the local batch
    index_t expert_rows = 0;  // rows of the expert batch
    gating::routing_summary summary;
  };

  /// The host backend's workspace, carved for `tokens` tokens, a local batch of
  /// `local_rows` rows and an expert batch of `expert_rows` rows. On one rank the two
  /// batches are one (the local_* views alias the expert batch's).
  struct host_state {
    forward_header* header;
    matrix_view<double> x;  // (tokens, hidden)  the forward's input
    gating::host_routing routing;
    span<std::int64_t> local_begin;  // (experts) the local batch: first row of each expert
    span<std::int64_t> local_rows;   // (experts) … and its rows
    span<std::int64_t> begin;        // (local experts) the expert batch: first row of each
    span<std::int64_t> rows;         // (local experts) … and its rows
    matrix_view<double> dispatched;  // (expert rows, hidden)
    matrix_view<double> expert_out;  // (expert rows, hidden)
    typename Expert::host_state expert;
    matrix_view<double> d_expert_out;  // (expert rows, hidden)
    matrix_view<double> d_dispatched;  // (expert rows, hidden)
    matrix_view<double> local_in;      // (local rows, hidden)  dispatched, before the exchange
    matrix_view<double> local_out;     // (local rows, hidden)  expert output, back home
    matrix_view<double> local_d_out;   // (local rows, hidden)
    matrix_view<double> local_d_in;    // (local rows, hidden)
    matrix_view<double> d_weight;      // (tokens, k)
    matrix_view<double> d_logits;      // (tokens, experts)
    matrix_view<double> dx;            // (tokens, hidden)
    // Expert parallelism only:
    span<std::byte> exchange;                  // scratch of the all-to-alls
    detail::ragged_exchange::plan plan;        // rows sent and received per (rank, expert)
    span<std::uint64_t> byte_counts;           // (2·ranks) all_to_allv's counts
    span<std::int64_t> gathered, gather_send;  // (ranks) each an all-gather's
  };

  /// The gate's arguments. A dropless layout routes with dynamic capacity (f = 0 in training
  /// and evaluation, no alignment): the capacity is then the largest load, and no assignment
  /// is dropped. A dropless gate (capacity policy gating::dropless) needs a dropless layout.
  static gating::gate_args gate_args_of(layer_args const& a) noexcept {
    static_assert(gate_capacity_fits_layout<Gate, Layout>,
                  "moe::layer: the gate is dropless (capacity policy gating::dropless) but "
                  "layout::capacity drops assignments past its capacity. Use layout::ragged, or "
                  "a gate with a capacity policy such as gating::tutel_capacity.");
    return {.tokens = a.tokens,
            .experts = a.experts,
            .k = a.top_k,
            .capacity_factor = Layout::drops_tokens ? a.capacity_factor : 0.0f,
            .capacity_alignment = Layout::drops_tokens ? a.capacity_alignment : 1,
            .normalize = a.normalize,
            .aux_loss_coef = a.aux_loss_coef,
            .z_loss_coef = a.z_loss_coef,
            .training = a.training,
            .eval_capacity_factor = Layout::drops_tokens ? a.eval_capacity_factor : 0.0f,
            .min_capacity = a.min_capacity,
            .groups = a.groups,
            .scaling_factor = a.scaling_factor,
            .jitter = a.jitter,
            .jitter_on = a.jitter_on,
            .gate_noise = a.gate_noise,
            .seed = a.seed,
            .expert_bias = a.expert_bias};
  }

  /// The capacity arguments of a call of `tokens` tokens (gating/capacity.hpp).
  static gating::capacity_args capacity_args_of(layer_args const& a, index_t tokens) noexcept {
    gating::gate_args const g = gate_args_of(a);
    return gating::capacity_args_of(g, Gate{}.k(g), gating::capacity_of<Gate>::rounding, tokens);
  }

  /// The capacity bound of calls of up to `a.tokens` tokens; `size_overflow` past index_t.
  static index_t capacity_bound_of(layer_args const& a) noexcept {
    return gating::capacity_bound(capacity_args_of(a, a.tokens));
  }

  [[nodiscard]] index_t max_capacity() const noexcept { return capacity_bound_of(args_); }

  /// What the layout's size math needs, for `tokens` tokens and capacity `capacity`.
  static layout::layout_args layout_args_of(layer_args const& a, index_t tokens, index_t capacity,
                                            index_t row_alignment) noexcept {
    return {.tokens = tokens,
            .experts = a.experts,
            .k = Gate{}.k(gate_args_of(a)),
            .capacity = capacity,
            .row_alignment = row_alignment};
  }
  [[nodiscard]] layout::layout_args layout_args_of(index_t tokens, index_t capacity,
                                                   index_t row_alignment) const noexcept {
    return layout_args_of(args_, tokens, capacity, row_alignment);
  }

  /// Padding belongs to the batch the experts compute on: with expert parallelism the local
  /// batch travels unpadded and the expert batch is padded on arrival.
  static index_t local_row_alignment(layer_args const& a) noexcept {
    return Collective::is_identity ? a.expert_row_alignment : 1;
  }
  [[nodiscard]] index_t local_row_alignment() const noexcept { return local_row_alignment(args_); }

  /// The most rows of a local batch: what the workspace is sized for (`size_overflow` when
  /// it does not fit index_t).
  static index_t local_rows_bound(layer_args const& a) noexcept {
    return layout::rows_bound(
        Layout{}, layout_args_of(a, a.tokens, capacity_bound_of(a), local_row_alignment(a)));
  }
  [[nodiscard]] index_t max_local_rows() const noexcept { return local_rows_bound(args_); }

  /// The most rows of an expert batch over `ranks` ranks. The capacity layout's is the local
  /// batch's size (E_local · W·C = E·C); the ragged one receives at most min(k, E_local) rows
  /// per token of every rank, plus padding. `size_overflow` when it does not fit index_t.
  static index_t expert_rows_bound(layer_args const& a, int ranks) noexcept {
    if (Collective::is_identity || Layout::drops_tokens) return local_rows_bound(a);
    index_t const local_experts = a.experts / ranks;
    index_t const per_token = std::min<index_t>(Gate{}.k(gate_args_of(a)), local_experts);
    return checked_add(checked_mul(checked_mul(ranks, a.tokens), per_token),
                       checked_mul(local_experts, a.expert_row_alignment - 1));
  }
  [[nodiscard]] index_t max_expert_rows() const noexcept {
    return expert_rows_bound(args_, ranks());
  }

  /// The limits of layer_args: every array the layer lays out for `ranks` ranks holds at
  /// most `max_array_elements` elements. Runs after the arguments' own checks (positive
  /// sizes, the gate's k, finite factors).
  static status check_sizes(layer_args const& a, int ranks) {
    constexpr index_t limit = max_array_elements;
    auto const too_large = [](char const* argument, std::string const& what) {
      return status::failure(argument, what + " exceeds the limit of 2^52 elements per array of " +
                                           "the layer's workspace (so that its bytes fit int64); " +
                                           "lower it");
    };
    struct named {
      char const* name;
      index_t value;
    };
    for (named const n :
         {named{"tokens", a.tokens}, named{"hidden", a.hidden}, named{"ffn", a.ffn},
          named{"experts", a.experts}, named{"capacity_alignment", a.capacity_alignment},
          named{"expert_row_alignment", a.expert_row_alignment},
          named{"min_capacity", a.min_capacity}})
      if (n.value > limit) return too_large(n.name, std::to_string(n.value));
    // The widest row of a per-token or per-row array: hidden, the expert's (up to 2F for a
    // gated expert), the logits', and the router's 2k keys.
    int const k = Gate{}.k(gate_args_of(a));
    index_t const width = std::max({a.hidden, checked_mul(2, a.ffn), a.experts, index_t{2} * k});
    if (checked_mul(a.tokens, width) > limit)
      return too_large("tokens",
                       std::to_string(a.tokens) + " tokens of width " + std::to_string(width));
    if (checked_mul(checked_mul(a.experts, a.hidden), a.ffn) > limit)
      return too_large("ffn", "E·H·F of the expert weights, " + std::to_string(a.experts) + "·" +
                                  std::to_string(a.hidden) + "·" + std::to_string(a.ffn) + ",");
    index_t const rows = std::max(local_rows_bound(a), expert_rows_bound(a, ranks));
    if (checked_mul(rows, width) <= limit) return {};
    std::string const what = (rows == size_overflow ? std::string("more than 2^63 rows")
                                                    : std::to_string(rows) + " rows") +
                             " of width " + std::to_string(width) + " in the expert batch";
    if constexpr (Layout::drops_tokens) {
      // The capacity sets the rows: blame the alignment when the factor alone fits.
      layer_args unaligned = a;
      unaligned.capacity_alignment = 1;
      bool const factor_fits = checked_mul(local_rows_bound(unaligned), width) <= limit;
      return too_large(factor_fits ? "capacity_alignment" : "capacity_factor", what);
    } else {
      return too_large(
          a.expert_row_alignment > 1 && checked_mul(checked_mul(a.tokens, k), width) <= limit
              ? "expert_row_alignment"
              : "tokens",
          what);
    }
  }

  host_state carve(workspace_carver& carver, index_t tokens, index_t local_rows,
                   index_t expert_rows) const {
    index_t const max_tokens = args_.tokens, max_rows = max_expert_rows();
    index_t const e = args_.experts, h = args_.hidden, local_e = expert_shape().experts;
    int const k = this->k();
    auto batch = [&](index_t most, index_t rows) {
      return make_view(carver.take<double>(most * h), rows, h);
    };
    auto integers = [&](index_t n) {
      return span<std::int64_t>(carver.take<std::int64_t>(n), static_cast<std::size_t>(n));
    };
    host_state s;
    s.header = carver.take<forward_header>(1);
    s.x = make_view(carver.take<double>(max_tokens * h), tokens, h);
    s.routing = gating::carve_host_routing(carver, max_tokens, tokens, e, k);
    s.begin = integers(local_e);
    s.rows = integers(local_e);
    s.dispatched = batch(max_rows, expert_rows);
    s.expert_out = batch(max_rows, expert_rows);
    s.expert = Expert::carve_host_state(carver, expert_shape(), max_rows, expert_rows);
    s.d_expert_out = batch(max_rows, expert_rows);
    s.d_dispatched = batch(max_rows, expert_rows);
    s.d_weight = make_view(carver.take<double>(max_tokens * k), tokens, k);
    s.d_logits = make_view(carver.take<double>(max_tokens * e), tokens, e);
    s.dx = make_view(carver.take<double>(max_tokens * h), tokens, h);
    if constexpr (Collective::is_identity) {
      s.local_begin = s.begin;
      s.local_rows = s.rows;
      s.local_in = s.dispatched;
      s.local_out = s.expert_out;
      s.local_d_out = s.d_expert_out;
      s.local_d_in = s.d_dispatched;
    } else {
      index_t const max_local = max_local_rows(), w = ranks();
      s.local_begin = integers(e);
      s.local_rows = integers(e);
      s.local_in = batch(max_local, local_rows);
      s.local_out = batch(max_local, local_rows);
      s.local_d_out = batch(max_local, local_rows);
      s.local_d_in = batch(max_local, local_rows);
      std::size_t const largest = static_cast<std::size_t>(std::max(max_local, max_rows) * h);
      std::size_t const exchange =
          largest * sizeof(double) +
          Collective::scratch_bytes(largest * sizeof(double), comm_->topology());
      s.exchange = {carver.take<std::byte>(exchange), exchange};
      s.plan = {integers(w * local_e), integers(w * local_e)};
      s.byte_counts = {carver.take<std::uint64_t>(2 * w), static_cast<std::size_t>(2 * w)};
      s.gathered = integers(w);
      s.gather_send = integers(w);
    }
    return s;
  }

  /// The forward's header, at the start of the workspace.
  static forward_header header_of(workspace ws) {
    workspace_carver carver(ws);
    return *carver.take<forward_header>(1);
  }

  /// With a capacity the all-to-all moves equal blocks, so every rank must route the same
  /// number of tokens; all ranks see the same gathered counts and throw alike.
  void check_tokens_agree(host_state const& s, index_t tokens) const {
    if constexpr (!Collective::is_identity && Layout::drops_tokens) {
      detail::all_gather(*comm_, tokens, s.gathered, s.gather_send);
      for (std::size_t w = 0; w < s.gathered.size(); ++w)
        MOE_EXPECTS(s.gathered[w] == tokens, "x",
                    "has " + std::to_string(tokens) + " tokens on rank " +
                        std::to_string(comm_->rank()) + " but " + std::to_string(s.gathered[w]) +
                        " on rank " + std::to_string(w) +
                        ": with the capacity layout every rank routes as many tokens");
    }
  }

  /// The largest load over the ranks, for dynamic capacity (Tutel's all-reduce MAX).
  index_t max_over_ranks(host_state const& s, index_t load) const {
    if constexpr (Collective::is_identity) {
      return load;
    } else {
      detail::all_gather(*comm_, load, s.gathered, s.gather_send);
      return *std::max_element(s.gathered.begin(), s.gathered.end());
    }
  }

  /// Lays out the local batch after routing, the one place that does: writes each
  /// expert's segment (begin, rows) as the layout says and returns the batch's rows.
  [[nodiscard]] index_t lay_out_local_batch(host_state const& s, index_t capacity) const {
    span<std::int64_t const> const load{s.routing.load.data_handle(), s.local_begin.size()};
    return layout::offsets(host, Layout{},
                           layout_args_of(s.routing.tokens(), capacity, local_row_alignment()),
                           load, s.local_begin, s.local_rows);
  }

  /// Lays out the expert batch: the local batch on one rank; with expert parallelism, the
  /// capacity layout's [E_local, W·C] (every row computed, unclaimed ones zero) or the
  /// ragged rows every rank sends, counted first.
  [[nodiscard]] index_t lay_out_expert_batch(host_state const& s, index_t capacity,
                                             index_t local_rows) const {
    if constexpr (Collective::is_identity) {
      return local_rows;
    } else if constexpr (Layout::drops_tokens) {
      index_t const per_expert = ranks() * capacity;
      for (std::size_t e = 0; e < s.begin.size(); ++e) {
        s.begin[e] = static_cast<index_t>(e) * per_expert;
        s.rows[e] = per_expert;
      }
      return static_cast<index_t>(s.begin.size()) * per_expert;
    } else {
      return detail::ragged_exchange::exchange_counts(
          *comm_, s.local_rows, args_.expert_row_alignment, s.plan, s.begin, s.rows);
    }
  }

  /// Moves local-batch rows to the ranks that own their experts (no-op on one rank).
  void to_experts(host_state const& s, matrix_view<double const> local,
                  matrix_view<double> expert) const {
    if constexpr (!Collective::is_identity) {
      if constexpr (Layout::drops_tokens)
        detail::capacity_exchange<Collective>::to_experts(*comm_, s.routing.capacity, local, expert,
                                                          s.exchange);
      else
        detail::ragged_exchange::to_experts(*comm_, s.plan, s.begin, local, expert, s.exchange,
                                            s.byte_counts);
    }
  }

  /// The way back: expert-batch rows to the ranks their tokens live on.
  void to_ranks(host_state const& s, matrix_view<double const> expert,
                matrix_view<double> local) const {
    if constexpr (!Collective::is_identity) {
      if constexpr (Layout::drops_tokens)
        detail::capacity_exchange<Collective>::to_ranks(*comm_, s.routing.capacity, expert, local,
                                                        s.exchange);
      else
        detail::ragged_exchange::to_ranks(*comm_, s.plan, s.begin, expert, local, s.exchange,
                                          s.byte_counts);
    }
  }

  /// The expert batch as the expert sees it.
  static expert::row_segments segments_of(host_state const& s) noexcept {
    return {s.begin, s.rows};
  }

  /// The row of each assignment (t, j) in the local batch, the one place that says:
  /// begin_e + slot(t, j) while the slot lies inside expert e's segment, dropped past it.
  static layout::segment_rows row_map_of(host_state const& s) noexcept {
    return {as_const(s.routing.expert), as_const(s.routing.slot), s.local_begin, s.local_rows};
  }

  template <class T>
  [[nodiscard]] status check_params(layer_params<T, Expert> const& p, char const* name) const {
    std::string const arg = std::string(name) + ".gate_weight";
    if (auto s = check_extents(p.gate_weight, arg.c_str(), {args_.hidden, args_.experts}); !s)
      return s;
    return Expert::check(p.expert, expert_shape(), (std::string(name) + ".expert").c_str());
  }

  [[nodiscard]] status check_workspace(workspace ws) const {
    std::size_t const needed = workspace_bytes(host);
    if (ws.size() < needed || ws.data() == nullptr)
      return status::failure("ws", "holds " + std::to_string(ws.size()) + " bytes; " +
                                       std::to_string(needed) + " are needed");
    return {};
  }

  template <element T>
  [[nodiscard]] status check_backward(matrix_view<T const> dy, params<T> const& p,
                                      matrix_view<T> dx, gradients<T> const& g,
                                      workspace ws) const {
    if (auto s = check_workspace(ws); !s) return s;
    forward_header const h = header_of(ws);
    if (h.magic != forward_header::forward_done)
      return status::failure("ws", "holds no forward call's state; call forward first");
    index_t const tokens = h.forward_tokens;
    if (auto s = check_extents(dy, "dy", {tokens, args_.hidden}); !s) return s;
    if (auto s = check_extents(dx, "dx", {tokens, args_.hidden}); !s) return s;
    if (auto s = check_params(p, "params"); !s) return s;
    return check_params(g, "gradients");
  }

  layer_args args_;
  std::optional<comm::communicator_ref> comm_;  // borrowed; empty on one rank
  int ranks_ = 1, rank_ = 0;
};

}  // namespace moe
