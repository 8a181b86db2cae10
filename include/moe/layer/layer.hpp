// SPDX-License-Identifier: Apache-2.0
#pragma once
// moe::layer: a gate, a dispatch layout, a collective and an expert composed into one MoE
// layer, forward and backward, on the host backend (layer/host_layer.hpp) or the CUDA one
// (layer/kernels/layer.cuh). This header holds the class: its checks and its entry points.
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
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/parameter_shape.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/expert/concepts.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/router.hpp>
#include <moe/layer/args.hpp>
#include <moe/layer/host_layer.hpp>
#include <moe/layer/sizes.hpp>
#include <moe/layout/concepts.hpp>

#include <exception>
#include <optional>
#include <source_location>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace moe {

/// An MoE layer.
/// @tparam Gate       a gating policy (moe::gating::top_k<2>, moe::gating::top_any<>, …)
/// @tparam Layout     a dispatch layout (moe::layout::capacity, moe::layout::ragged)
/// @tparam Collective a collective (moe::comm::single_rank; with expert parallelism
///                    moe::comm::linear_all_to_all or moe::comm::all_to_all_2dh)
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
  /// (Every entry point takes the caller's location last, defaulted: errors name it.)
  explicit layer(layer_args const& args,
                 std::source_location caller = std::source_location::current()) requires
      Collective::is_identity : args_(args) {
    detail::at_entry_point(caller, [&] { can_implement(args).throw_if_failed(); });
  }

  /// A layer whose experts are split over the ranks of `comm` (expert parallelism): rank w
  /// holds experts [w·E/W, (w+1)·E/W), and its expert parameters are those E/W experts'.
  /// Every rank builds its layer with the same arguments, and calls forward and backward in
  /// the same order (they communicate through `comm`, on either backend: on the CUDA one the
  /// communicator's messages are enqueued on the call's stream). `comm` is borrowed: it must
  /// outlive the layer. Throws `moe::invalid_argument` when `can_implement(args)` fails or
  /// E is not a multiple of the world size.
  layer(layer_args const& args, comm::communicator_ref comm,
        std::source_location caller =
            std::source_location::current()) requires(!Collective::is_identity)
      : args_(args), comm_(comm), ranks_(comm.size()), rank_(comm.rank()) {
    detail::at_entry_point(caller, [&] {
      can_implement(args).throw_if_failed();
      MOE_EXPECTS(comm.size() >= 1 && args.gate.experts % comm.size() == 0, "experts",
                  std::to_string(args.gate.experts) + " experts do not split evenly over " +
                      std::to_string(comm.size()) + " ranks");
      sizes::check_sizes(args, comm.size()).throw_if_failed();
    });
  }

  /// Whether a layer can be built with these arguments, and if not, which argument is wrong:
  /// positive sizes, finite factors, the gate's own checks, a capacity of at least 1, and the
  /// limits layer_args states (every workspace array at most 2^52 elements), here for one
  /// rank (the constructor with a communicator checks them again for its world).
  [[nodiscard]] static status can_implement(layer_args const& args) noexcept {
    if (args.gate.tokens < 1)
      return status::failure("tokens",
                             "must be at least 1, got " + std::to_string(args.gate.tokens));
    if (args.gate.capacity_tokens != 0)
      return status::failure("capacity_tokens",
                             "is the layer's to set per call (the largest T over the ranks); "
                             "leave it 0, got " +
                                 std::to_string(args.gate.capacity_tokens));
    if (args.hidden < 1)
      return status::failure("hidden", "must be at least 1, got " + std::to_string(args.hidden));
    if (args.ffn < 1)
      return status::failure("ffn", "must be at least 1, got " + std::to_string(args.ffn));
    if (args.expert_row_alignment < 1)
      return status::failure("expert_row_alignment", "must be at least 1, got " +
                                                         std::to_string(args.expert_row_alignment));
    if (Layout::drops_tokens && args.expert_row_alignment != 1)
      return status::failure("expert_row_alignment",
                             "pads the rows of a dropless layout (layout::ragged) and must be 1 "
                             "here, got " +
                                 std::to_string(args.expert_row_alignment) +
                                 "; align the capacity with capacity_alignment instead");
    // The knobs as given (a dropless layout ignores the capacity ones, but they must be
    // sane), then the gate on the arguments it routes with.
    if (auto s = gating::detail::check_knobs(args.gate); !s) return s;
    if (auto s = Gate{}.can_implement(gate_args_of(args)); !s) return s;
    if (auto s = sizes::check_sizes(args, 1); !s) return s;
    if (Layout::drops_tokens && sizes::capacity_bound_of(args) < 1)
      return status::failure("capacity_factor",
                             "gives capacity 0 at " + std::to_string(args.gate.tokens) +
                                 " tokens over " + std::to_string(args.gate.experts) +
                                 " experts; raise it, or use 0 for dynamic capacity");
    return {};
  }

  [[nodiscard]] layer_args const& args() const noexcept { return args_; }
  [[nodiscard]] int k() const noexcept { return sizes::k_of(args_); }
  /// The experts on this rank: all E on one rank, E/W with expert parallelism.
  [[nodiscard]] expert::expert_shape expert_shape() const noexcept {
    return {args_.gate.experts / ranks(), args_.hidden, args_.ffn};
  }
  /// The gate weight: (hidden, experts), all E experts on every rank.
  [[nodiscard]] parameter_shape gate_weight_shape() const {
    return {.name = "gate_weight",
            .rank = 2,
            .axes = {{{"hidden", args_.hidden}, {"experts", args_.gate.experts}}},
            .fan_in = args_.hidden,
            .torch = "the router's nn.Linear(hidden, experts).weight.T"};
  }

  /// Every parameter of this rank's layer, named as its checks name them: the gate weight,
  /// then the expert's own ("expert.w13"), with their axes, extents and PyTorch layouts.
  [[nodiscard]] std::vector<parameter_shape> parameter_shapes()
      const requires expert::describes_parameters<Expert> {
    std::vector<parameter_shape> shapes{gate_weight_shape()};
    for (parameter_shape p : Expert::parameter_shapes(expert_shape())) {
      p.name = "expert." + p.name;
      shapes.push_back(std::move(p));
    }
    return shapes;
  }

  /// The world size the experts are split over (1 on one rank).
  [[nodiscard]] int ranks() const noexcept { return ranks_; }
  /// The first expert this rank holds.
  [[nodiscard]] index_t first_expert() const noexcept { return rank_ * expert_shape().experts; }

  /// Checks a forward call, as forward does before any work, and writes nothing: x's tokens
  /// (0 to args().gate.tokens, a multiple of the local groups; at least 1 on the CUDA
  /// backend for now), the views' extents, the workspace's size, and on the host the values
  /// of `gate.expert_bias` (host memory there); on the CUDA backend a cuBLAS handle (its
  /// workspace size needs <moe/layer/kernels/layer.cuh>).
  template <element T, class Backend>
  requires backend<Backend>
  [[nodiscard]] status can_implement(Backend on, matrix_view<std::type_identity_t<T> const> x,
                                     params<std::type_identity_t<T>> const& p, matrix_view<T> y,
                                     workspace ws) const noexcept {
    if (auto s = check_backend(on); !s) return s;
    if constexpr (std::is_same_v<Backend, host_backend>)
      if (auto s = gating::check_host_expert_bias(gate_args_of(args_)); !s) return s;
    if (auto s = check_backend_tokens(on, x.extent(0), "x"); !s) return s;
    if (auto s = check_call(x, "x", y, "y", p); !s) return s;
    return check_workspace<T>(on, ws);
  }

  /// Checks a backward call, as backward does before any work, and writes nothing: dy and dx
  /// have the forward call's tokens (on the host read from the workspace's header; the CUDA
  /// workspace keeps none the host could read without synchronising, so there dy's tokens are
  /// checked as x's were), the parameters' and gradients' extents, the workspace.
  template <element T, class Backend>
  requires backend<Backend>
  [[nodiscard]] status can_implement(Backend on, matrix_view<std::type_identity_t<T> const> dy,
                                     params<std::type_identity_t<T>> const& p, matrix_view<T> dx,
                                     gradients<T> const& g, workspace ws) const noexcept {
    if (auto s = check_backend(on); !s) return s;
    if (auto s = check_workspace<T>(on, ws); !s) return s;
    if constexpr (std::is_same_v<Backend, host_backend>) {
      auto const h = detail::host_layer<layer>::header_of(ws);
      if (!h.forward_done())
        return status::failure("ws", "holds no forward call's state; call forward first");
      if (dy.extent(0) != h.forward_tokens)
        return status::failure("dy", "has " + std::to_string(dy.extent(0)) +
                                         " tokens; the forward call had " +
                                         std::to_string(h.forward_tokens));
    }
    if (auto s = check_backend_tokens(on, dy.extent(0), "dy"); !s) return s;
    if (auto s = check_call(dy, "dy", dx, "dx", p); !s) return s;
    return check_params(g, "gradients");
  }

  /// Bytes of host workspace that forward and backward need (host backend).
  [[nodiscard]] std::size_t workspace_bytes(host_backend) const {
    return detail::host_layer<layer>::workspace_bytes(*this);
  }

  /// Bytes of device workspace that forward and backward with elements T need on the CUDA
  /// backend.
  template <element T>
  [[nodiscard]] std::size_t workspace_bytes(
      cuda_backend cuda, std::source_location caller = std::source_location::current()) const {
    return detail::at_entry_point(caller, [&] {
      return detail::cuda_layer<layer>::template workspace_bytes<T>(*this, cuda);
    });
  }

  /// Forward: y = Σ_j w_{t,j} · expert_{e_j}(x_t) over kept choices. Throws
  /// `moe::invalid_argument`, having written nothing, when `can_implement` says no.
  ///
  /// On the host, every view is host memory. On the CUDA backend every view is device memory
  /// and the work is enqueued on `cuda.stream` with `cuda.blas` for the GEMMs: the capacity
  /// layout with a fixed capacity factor never synchronises, on one rank or with expert
  /// parallelism (a CUDA graph can capture it); dynamic capacity and the ragged layout read
  /// the expert batch's size on the host once (one stream synchronisation each), because the
  /// expert GEMMs need it there: dynamic capacity reads C (the maximum over the ranks, reduced
  /// on the device), the ragged layout its rows per expert and, with expert parallelism, the
  /// rows every rank sends it (exchanged on the device), from which the all-to-allv is sized
  /// without another synchronisation.
  ///
  /// A call may have no tokens (0 ≤ tokens ≤ args().gate.tokens; the CUDA backend takes at
  /// least 1 for now): y is then empty, and with expert parallelism the rank still computes
  /// the rows the others send its experts, issuing every collective they issue. With the
  /// capacity layout over several ranks, T may differ between the ranks on the host backend:
  /// C is sized for the largest T (gathered over the ranks; Tutel's `inequivalent_tokens`), so
  /// every rank sends blocks of one size, and a rank with fewer tokens leaves its unused slots
  /// zero. The CUDA backend needs as many tokens on every rank there (it would have to
  /// synchronise to learn the largest T, and cannot check it without synchronising).
  /// @param[in]  x  (tokens, hidden), 0 ≤ tokens ≤ args().gate.tokens
  /// @param[in]  p  parameters
  /// @param[out] y  (tokens, hidden)
  /// @param[in,out] ws workspace of `workspace_bytes` bytes; keeps what backward needs
  template <class T, class Backend>
  requires backend<Backend>
  void forward(Backend on, matrix_view<std::type_identity_t<T> const> x,
               params<std::type_identity_t<T>> const& p, matrix_view<T> y, workspace ws,
               std::source_location caller = std::source_location::current()) const {
    if constexpr (is_element<T>())
      detail::at_entry_point(caller, [&] { backend_of<Backend>::forward(*this, on, x, p, y, ws); });
  }

  /// Backward, of the objective ⟨dy, y⟩ + the layer's losses, after `forward` in the same
  /// workspace (and on the CUDA backend the same stream): writes dx and every gradient (zero
  /// for experts that received no token). Synchronises as the forward did: never with the
  /// capacity layout and a fixed factor; otherwise once, reading back the forward's C or row
  /// counts from the workspace (no count is exchanged again). After an empty call dx is
  /// empty, the gate weight's gradient zero (an empty call has no loss), and the expert
  /// gradients those of the rows this rank's experts received from the others.
  /// @param[in]  dy (tokens, hidden), the same tokens as the forward call
  /// @param[out] dx (tokens, hidden)
  /// @param[out] g  gradients, overwritten
  template <class T, class Backend>
  requires backend<Backend>
  void backward(Backend on, matrix_view<std::type_identity_t<T> const> dy,
                params<std::type_identity_t<T>> const& p, matrix_view<T> dx, gradients<T> const& g,
                workspace ws, std::source_location caller = std::source_location::current()) const {
    static_assert(expert::trainable_expert<Expert>,
                  "moe::layer::backward: Expert has no backward (it is not a "
                  "moe::expert::trainable_expert). Give it backward(...) as expert/two_layer.hpp "
                  "does, or use the layer for inference only.");
    if constexpr (is_element<T>() && expert::trainable_expert<Expert>)
      detail::at_entry_point(caller,
                             [&] { backend_of<Backend>::backward(*this, on, dy, p, dx, g, ws); });
  }

  /// What the last forward call in `ws` decided (host backend).
  [[nodiscard]] layer_stats stats(
      host_backend, workspace ws,
      std::source_location caller = std::source_location::current()) const {
    return detail::at_entry_point(caller,
                                  [&] { return detail::host_layer<layer>::stats(*this, ws); });
  }

  /// What the last forward call in `ws` decided (CUDA backend), in host memory. Synchronises
  /// `cuda.stream` and copies the call's scalars, load and assignments (tokens · k · 12
  /// bytes, for the drops per expert) to the host: a report, not a per-step call. With expert
  /// parallelism the load and drops are this rank's tokens', the expert rows its expert
  /// batch's (as on the host backend); it communicates nothing.
  [[nodiscard]] layer_stats stats(
      cuda_backend cuda, workspace ws, index_t tokens,
      std::source_location caller = std::source_location::current()) const {
    return detail::at_entry_point(
        caller, [&] { return detail::cuda_layer<layer>::stats(*this, cuda, ws, tokens); });
  }

 private:
  friend struct detail::host_layer<layer>;
  friend struct detail::cuda_layer<layer>;
  using sizes = detail::layer_sizes<Gate, Layout, Collective>;
  template <class Backend>
  using backend_of = std::conditional_t<std::is_same_v<Backend, host_backend>,
                                        detail::host_layer<layer>, detail::cuda_layer<layer>>;

  /// The one check of the element type, with the message that names the fix.
  template <class T>
  static constexpr bool is_element() noexcept {
    static_assert(element<T>,
                  "moe::layer: the elements of x, y and the parameters must be float, __half or "
                  "__nv_bfloat16 (double on the host backend). Convert them, or instantiate "
                  "with one of those.");
    return element<T>;
  }

  static gating::gate_args gate_args_of(layer_args const& a) noexcept {
    return sizes::gate_args_of(a);
  }
  [[nodiscard]] index_t local_row_alignment() const noexcept {
    return sizes::local_row_alignment(args_);
  }
  [[nodiscard]] index_t max_local_rows() const noexcept { return sizes::local_rows_bound(args_); }
  [[nodiscard]] index_t max_expert_rows() const noexcept {
    return sizes::expert_rows_bound(args_, ranks());
  }

  template <class T>
  [[nodiscard]] status check_params(layer_params<T, Expert> const& p, char const* name) const {
    if (auto s = check_parameter(p.gate_weight, gate_weight_shape(), std::string(name) + "."); !s)
      return s;
    return Expert::check(p.expert, expert_shape(), (std::string(name) + ".expert").c_str());
  }

  /// The stats of a call both backends report: its summary, expert rows, and the load and
  /// drops per expert (host memory).
  [[nodiscard]] layer_stats stats_of(gating::routing_summary const& s, index_t expert_rows,
                                     span<std::int64_t const> load,
                                     std::vector<std::int64_t> dropped) const {
    return {.tokens = s.tokens,
            .capacity = s.capacity,
            .expert_rows = expert_rows,
            .dropped = s.dropped,
            .unrouted = s.unrouted,
            .aux_loss = s.aux_loss,
            .aux_loss_name = gating::aux_loss_of<Gate>::name,
            .z_loss = s.z_loss,
            .loss = args_.gate.aux_loss_coef * s.aux_loss + args_.gate.z_loss_coef * s.z_loss,
            .load = {load.begin(), load.end()},
            .dropped_per_expert = std::move(dropped)};
  }

  /// What a call on `on` needs of the backend itself.
  [[nodiscard]] static status check_backend(host_backend) noexcept { return {}; }
  [[nodiscard]] static status check_backend(cuda_backend cuda) noexcept {
    if (cuda.blas == nullptr)
      return status::failure("cuda.blas", "no cuBLAS handle: pass one (moe::blas_handle)");
    return {};
  }

  /// What a call's tokens must be on `on`, beyond check_call's: at least 1 on the CUDA
  /// backend, whose router and expert kernels do not yet take an empty call.
  [[nodiscard]] static status check_backend_tokens(host_backend, index_t, char const*) noexcept {
    return {};
  }
  [[nodiscard]] static status check_backend_tokens(cuda_backend, index_t tokens,
                                                   char const* name) noexcept {
    if (tokens < 1)
      return status::failure(name,
                             "has no tokens: the CUDA backend takes at least 1 per call "
                             "for now (the host backend takes an empty call)");
    return {};
  }

  /// The checks every call shares: the tokens of `in` (0 to the layer's, a multiple of the
  /// local groups), `in`'s and `out`'s extents, the parameters'.
  template <element T>
  [[nodiscard]] status check_call(matrix_view<T const> in, char const* in_name, matrix_view<T> out,
                                  char const* out_name, params<T> const& p) const {
    index_t const tokens = in.extent(0);
    if (tokens < 0 || tokens > args_.gate.tokens)
      return status::failure(in_name, "has " + std::to_string(tokens) +
                                          " tokens; the layer takes 0 to " +
                                          std::to_string(args_.gate.tokens));
    if (auto s = gating::check_call_tokens(gate_args_of(args_), tokens, in_name); !s) return s;
    if (auto s = check_extents(in, in_name, {tokens, args_.hidden}); !s) return s;
    if (auto s = check_extents(out, out_name, {tokens, args_.hidden}); !s) return s;
    return check_params(p, "params");
  }

  /// The workspace of a call with elements T on `on`: non-null and large enough.
  template <class T, class Backend>
  [[nodiscard]] status check_workspace(Backend on, workspace ws) const {
    std::size_t needed = 0;
    if constexpr (std::is_same_v<Backend, host_backend>) {
      needed = workspace_bytes(on);
    } else {
      try {
        needed = workspace_bytes<T>(on);
      } catch (std::exception const& e) {
        return status::failure("ws", std::string("could not be sized: ") + e.what());
      }
    }
    if (ws.size() < needed || ws.data() == nullptr)
      return status::failure("ws", "holds " + std::to_string(ws.size()) + " bytes; " +
                                       std::to_string(needed) + " are needed (workspace_bytes)");
    return {};
  }

  layer_args args_;
  std::optional<comm::communicator_ref> comm_;  // borrowed; empty on one rank
  int ranks_ = 1, rank_ = 0;
};

}  // namespace moe
