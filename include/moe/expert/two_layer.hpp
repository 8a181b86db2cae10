// SPDX-License-Identifier: Apache-2.0
#pragma once
// The two-GEMM expert, one template for both of its policies: x ─ W1 ─▶ pre (rows, F1) ─ act
// ─▶ h (rows, F) ─ W2 ─▶ out, one weight set per expert.
//
//   ungated (expert::ffn, ffn.hpp):  F1 = F,    h = act(pre)
//   gated   (expert::glu, glu.hpp):  F1 = 2·F,  pre = [gate | up],  h = act(gate) ⊙ up
//
// Each policy keeps its own parameter names (ffn_params: w1, b1; glu_params: w13, b13); the
// backends see either as the first GEMM's weight and bias of width F1 (detail::first_layer).
//
// Host backend: forward and backward over the expert batch (expert::row_segments: each
// expert's segment of an (rows, hidden) matrix), in float64. Experts that received no row
// get zero gradients.
//
// CUDA backend (declared here, defined in kernels/two_layer.cuh, which needs nvcc): the same
// over device memory in float, __half or __nv_bfloat16 with float accumulation, through
// cuBLAS, for a capacity batch (`uniform_segments`: batched GEMMs, no host synchronisation)
// or a ragged one (`row_segments` in host memory: one GEMM per non-empty expert).

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/parameter_shape.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/detail/host_gemm.hpp>
#include <moe/expert/activation.hpp>
#include <moe/expert/concepts.hpp>
#include <moe/expert/device_state.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <source_location>
#include <string>
#include <type_traits>

namespace moe::expert {

/// Views of the parameters of a bank of two-GEMM experts (T const) or of their gradients
/// (T). An empty bias view means "no bias"; a gradient bias view, when present, is written.
/// One template, so that the expert's `params<T>` deduces T; its two layouts follow.
template <class T, bool Gated>
struct two_layer_params;

/// The FFN expert's parameters.
template <class T>
struct two_layer_params<T, false> {
  tensor3_view<T> w1;  // (experts, hidden, ffn)
  matrix_view<T> b1;   // (experts, ffn)     optional
  tensor3_view<T> w2;  // (experts, ffn, hidden)
  matrix_view<T> b2;   // (experts, hidden)  optional

  /// Writable views are also read-only ones.
  operator read_only_target<T, two_layer_params<T const, false>>() const {
    return two_layer_params<T const, false>{w1, b1, w2, b2};
  }
};

/// The GLU expert's parameters: the gate and up projections side by side in one weight.
template <class T>
struct two_layer_params<T, true> {
  tensor3_view<T> w13;  // (experts, hidden, 2·ffn)  [gate | up]
  matrix_view<T> b13;   // (experts, 2·ffn)          [gate | up]  optional
  tensor3_view<T> w2;   // (experts, ffn, hidden)
  matrix_view<T> b2;    // (experts, hidden)                      optional

  /// Writable views are also read-only ones.
  operator read_only_target<T, two_layer_params<T const, true>>() const {
    return two_layer_params<T const, true>{w13, b13, w2, b2};
  }
};

template <class T>
using ffn_params = two_layer_params<T, false>;
template <class T>
using glu_params = two_layer_params<T, true>;

namespace detail {

/// The first GEMM's weight and bias under one name (w1, b1, of width F1): what the backends
/// compute with.
template <class T>
ffn_params<T> first_layer(ffn_params<T> const& p) noexcept {
  return p;
}
template <class T>
ffn_params<T> first_layer(glu_params<T> const& p) noexcept {
  return {p.w13, p.b13, p.w2, p.b2};
}

}  // namespace detail

/// The two-GEMM expert with activation `Act` (act::relu, act::gelu, act::silu).
/// @tparam Gated false: expert::ffn; true: expert::glu, whose first GEMM is [gate | up]
template <act::activation Act, bool Gated>
struct two_layer {
  using moe_concept = expert_tag;
  using activation = Act;
  template <class T>
  using params = two_layer_params<T, Gated>;

  /// F1, the first GEMM's width.
  [[nodiscard]] static constexpr index_t first_width(expert_shape const& s) noexcept {
    return Gated ? 2 * s.ffn : s.ffn;
  }

  /// What the host backend keeps between forward and backward, per row of the batch.
  struct host_state {
    matrix_view<double> pre_activation;    // (rows, F1)  x · W1 + b1 (glu: [gate | up])
    matrix_view<double> d_pre_activation;  // (rows, F1)  backward scratch
  };

  /// Every parameter, in the order of `params`' members: name, axes, whether a bias, fan-in,
  /// and the PyTorch tensor (moe stores each weight (in, out), the transpose of nn.Linear's).
  [[nodiscard]] static std::array<parameter_shape, 4> parameter_shapes(expert_shape const& s) {
    index_t const f1 = first_width(s);
    parameter_axis const experts{"experts", s.experts}, hidden{"hidden", s.hidden},
        ffn{"ffn", s.ffn}, first{Gated ? "2·ffn" : "ffn", f1};
    return {{{.name = Gated ? "w13" : "w1",
              .rank = 3,
              .axes = {experts, hidden, first},
              .fan_in = s.hidden,
              .torch = Gated ? "cat(gate_proj.weight, up_proj.weight).T of each expert"
                             : "fc1.weight.T of each expert"},
             {.name = Gated ? "b13" : "b1",
              .rank = 2,
              .axes = {experts, first},
              .bias = true,
              .fan_in = s.hidden,
              .torch = Gated ? "cat(gate_proj.bias, up_proj.bias) of each expert"
                             : "fc1.bias of each expert"},
             {.name = "w2",
              .rank = 3,
              .axes = {experts, ffn, hidden},
              .fan_in = s.ffn,
              .torch = Gated ? "down_proj.weight.T of each expert" : "fc2.weight.T of each expert"},
             {.name = "b2",
              .rank = 2,
              .axes = {experts, hidden},
              .bias = true,
              .fan_in = s.ffn,
              .torch = Gated ? "down_proj.bias of each expert" : "fc2.bias of each expert"}}};
  }

  /// Views of the parameters laid out at `data`, one pointer per entry of parameter_shapes in
  /// its order; a null bias pointer gives "no bias".
  template <class T>
  [[nodiscard]] static params<T> view_parameters(expert_shape const& s, span<T* const> data) {
    auto const shapes = parameter_shapes(s);
    auto axis = [&](std::size_t i, std::size_t a) { return shapes[i].axes[a].extent; };
    auto bias = [&](std::size_t i) {
      return data[i] != nullptr ? make_view(data[i], axis(i, 0), axis(i, 1)) : matrix_view<T>{};
    };
    return {make_view(data[0], axis(0, 0), axis(0, 1), axis(0, 2)), bias(1),
            make_view(data[2], axis(2, 0), axis(2, 1), axis(2, 2)), bias(3)};
  }

  /// Checks every view of `p` against parameter_shapes; `name` prefixes the argument in the
  /// message ("params.expert.w13").
  template <class T>
  [[nodiscard]] static status check(params<T> const& p, expert_shape const& s, char const* name) {
    std::string const prefix = std::string(name) + ".";
    auto const shapes = parameter_shapes(s);
    ffn_params<T> const layers = detail::first_layer(p);
    if (auto st = check_parameter(layers.w1, shapes[0], prefix); !st) return st;
    if (auto st = check_parameter(layers.b1, shapes[1], prefix); !st) return st;
    if (auto st = check_parameter(layers.w2, shapes[2], prefix); !st) return st;
    return check_parameter(layers.b2, shapes[3], prefix);
  }

  /// Lays out the saved state for a batch of up to `max_rows` rows; views of `rows` rows.
  static host_state carve_host_state(workspace_carver& carver, expert_shape const& s,
                                     index_t max_rows, index_t rows) {
    index_t const f1 = first_width(s), n = max_rows * f1;
    return {make_view(carver.take<double>(n), rows, f1),
            make_view(carver.take<double>(n), rows, f1)};
  }

  // --- CUDA backend ---------------------------------------------------------------------

  /// The device state of the CUDA backend (expert::device_state of width F1).
  template <element T>
  using device_state = expert::device_state<T>;

  /// Lays out the CUDA backend's state for up to `max_rows` rows; views of `rows` rows.
  /// `expert_pass::forward_only` leaves out backward's scratch.
  template <element T>
  static device_state<T> carve_device_state(workspace_carver& carver, expert_shape const& s,
                                            index_t max_rows, index_t rows,
                                            expert_pass pass = expert_pass::training) {
    return detail::carve_two_layer_state<T>(carver, s, first_width(s), max_rows, rows, pass);
  }

  /// Bytes of device workspace that `carve_device_state<T>` takes for `max_rows` rows.
  template <element T>
  [[nodiscard]] static std::size_t device_workspace_bytes(
      expert_shape const& s, index_t max_rows, expert_pass pass = expert_pass::training) {
    return detail::two_layer_state_bytes<T>(s, first_width(s), max_rows, pass);
  }

  /// Whether a CUDA forward call can run with these arguments: the one check `forward` runs
  /// first. Reads nothing on the device.
  template <element T, segment_description Segments>
  [[nodiscard]] static status can_implement(
      cuda_backend const& cuda, expert_shape const& s, params<T const> const& p,
      Segments const& segments, matrix_view<std::type_identity_t<T> const> in,
      matrix_view<std::type_identity_t<T>> out,
      device_state<std::type_identity_t<T>> const& state) noexcept {
    return detail::check_forward_call<T>(cuda, s, first_width(s), check(p, s, "params"), segments,
                                         in, out, state);
  }

  /// Whether a CUDA backward call can run with these arguments: the one check `backward`
  /// runs first. Reads nothing on the device.
  template <element T, class G, segment_description Segments>
  [[nodiscard]] static status can_implement(
      cuda_backend const& cuda, expert_shape const& s, params<T const> const& p,
      Segments const& segments, matrix_view<std::type_identity_t<T> const> in,
      matrix_view<std::type_identity_t<T> const> d_out, matrix_view<std::type_identity_t<T>> d_in,
      params<G> const& g, device_state<std::type_identity_t<T>> const& state) noexcept {
    return detail::check_backward_call<T>(cuda, s, first_width(s), check(p, s, "params"),
                                          check(g, s, "gradients"), segments, in, d_out, d_in,
                                          state);
  }

  /// Forward on the CUDA backend, enqueued on `cuda.stream` with the borrowed `cuda.blas`:
  /// out = h · W2 + b2 on each expert's rows (glu: one GEMM into the [gate | up] halves, and
  /// act(gate) ⊙ up in the kernel after it); rows of no expert are zero.
  /// Checks every argument first and throws `moe::invalid_argument` before any device work.
  /// A `uniform_segments` batch runs batched GEMMs over all E·C rows and never synchronises
  /// (capturable in a CUDA graph; cuBLAS then needs a workspace set on the handle with
  /// cublasSetWorkspace); a `row_segments` batch (host memory: the caller copied the counts
  /// to the host once) runs one GEMM per non-empty expert. Defined in kernels/two_layer.cuh.
  /// @param[in]  p        parameters, device memory
  /// @param[in]  segments `uniform_segments` (its `claimed` on the device) or `row_segments`
  ///                      in host memory
  /// @param[in]  in       (rows, hidden) device memory
  /// @param[out] out      (rows, hidden) device memory
  /// @param[out] state    carved for `rows` rows, device memory: what backward needs
  template <element T, segment_description Segments>
  static void forward(cuda_backend cuda, expert_shape const& s, params<T const> const& p,
                      Segments const& segments, matrix_view<std::type_identity_t<T> const> in,
                      matrix_view<std::type_identity_t<T>> out,
                      device_state<std::type_identity_t<T>> const& state,
                      std::source_location caller = std::source_location::current()) {
    moe::detail::at_entry_point(
        caller, [&] { can_implement(cuda, s, p, segments, in, out, state).throw_if_failed(); });
    detail::cuda_backend_of<two_layer>::forward(cuda, s, detail::first_layer(p), segments, in, out,
                                                state);
  }

  /// Backward on the CUDA backend, after `forward` with the same state and segments: d_in
  /// (zero on rows of no expert) and every parameter gradient, overwritten; experts with no
  /// rows get zero gradients. Bias gradients are column sums in a fixed order (no atomics):
  /// the result is deterministic. Gradients are T or float. Defined in kernels/two_layer.cuh.
  /// @param[in]  in, d_out (rows, hidden) device memory
  /// @param[out] d_in      (rows, hidden) device memory
  /// @param[out] g         gradients, device memory
  /// @param[in]  state     forward's state, carved for `expert_pass::training`
  template <element T, class G, segment_description Segments>
  requires(std::same_as<G, T> || std::same_as<G, float>) static void backward(
      cuda_backend cuda, expert_shape const& s, params<T const> const& p, Segments const& segments,
      matrix_view<std::type_identity_t<T> const> in,
      matrix_view<std::type_identity_t<T> const> d_out, matrix_view<std::type_identity_t<T>> d_in,
      params<G> const& g, device_state<std::type_identity_t<T>> const& state,
      std::source_location caller = std::source_location::current()) {
    moe::detail::at_entry_point(caller, [&] {
      can_implement(cuda, s, p, segments, in, d_out, d_in, g, state).throw_if_failed();
    });
    detail::cuda_backend_of<two_layer>::backward(cuda, s, detail::first_layer(p), segments, in,
                                                 d_out, d_in, detail::first_layer(g), state);
  }

  // --- host backend ---------------------------------------------------------------------

  /// Whether a host forward call can run with these arguments: the parameters against the
  /// shape, the batch's views against each other, the segments inside the batch. The one
  /// check `forward` runs first.
  template <class T>
  [[nodiscard]] static status can_implement(host_backend, expert_shape const& s,
                                            params<T const> const& p, row_segments const& segments,
                                            matrix_view<double const> in, matrix_view<double> out,
                                            host_state const& state) noexcept {
    if (auto st = check(p, s, "params"); !st) return st;
    if (auto st = check_extents(out, "out", {in.extent(0), s.hidden}); !st) return st;
    return check_host_batch(s, segments, in, state.pre_activation);
  }

  /// Whether a host backward call can run with these arguments: forward's checks, the
  /// gradients against the shape, and backward's views and scratch. The one check `backward`
  /// runs first.
  template <class T, class G>
  [[nodiscard]] static status can_implement(host_backend, expert_shape const& s,
                                            params<T const> const& p, row_segments const& segments,
                                            matrix_view<double const> in,
                                            matrix_view<double const> d_out,
                                            matrix_view<double> d_in, params<G> const& g,
                                            host_state const& state) noexcept {
    if (auto st = check(p, s, "params"); !st) return st;
    if (auto st = check(g, s, "gradients"); !st) return st;
    if (auto st = check_extents(d_out, "d_out", {in.extent(0), s.hidden}); !st) return st;
    if (auto st = check_extents(d_in, "d_in", {in.extent(0), s.hidden}); !st) return st;
    if (auto st = check_host_batch(s, segments, in, state.pre_activation); !st) return st;
    return check_extents(state.d_pre_activation, "state.d_pre_activation",
                         {in.extent(0), first_width(s)});
  }

  /// Forward of every expert's segment of the batch; rows outside every segment of `out`
  /// are zero.
  /// @param[in]  segments expert e's rows are [begin[e], begin[e] + rows[e]), host memory
  /// @param[in]  in       (rows, hidden)  host memory
  /// @param[out] out      (rows, hidden)  host memory
  /// @param[in]  state    carved for `rows` rows; keeps what backward needs
  template <class T>
  static void forward(host_backend, expert_shape const& s, params<T const> const& p,
                      row_segments const& segments, matrix_view<double const> in,
                      matrix_view<double> out, host_state const& state,
                      std::source_location caller = std::source_location::current()) {
    moe::detail::at_entry_point(
        caller, [&] { can_implement(host, s, p, segments, in, out, state).throw_if_failed(); });
    std::fill_n(out.data_handle(), element_count(out), 0.0);
    ffn_params<T const> const layers = detail::first_layer(p);
    index_t const f1 = first_width(s);
    for (index_t e = 0; e < s.experts; ++e) {
      index_t const first = segments.begin[e], n = segments.rows[e];
      auto const pre = [&](index_t c, index_t j) -> double& {
        return state.pre_activation(first + c, j);
      };
      moe::detail::host_gemm(
          n, f1, s.hidden, [&](index_t c, index_t h) { return in(first + c, h); },
          [&](index_t h, index_t j) { return to_accumulate(layers.w1(e, h, j)); },
          [&](index_t c, index_t j, double v) {
            pre(c, j) = v + (is_present(layers.b1) ? to_accumulate(layers.b1(e, j)) : 0);
          });
      moe::detail::host_gemm(
          n, s.hidden, s.ffn, [&](index_t c, index_t f) { return activated(pre, c, f, s.ffn); },
          [&](index_t f, index_t h) { return to_accumulate(layers.w2(e, f, h)); },
          [&](index_t c, index_t h, double v) {
            out(first + c, h) = v + (is_present(layers.b2) ? to_accumulate(layers.b2(e, h)) : 0);
          });
    }
  }

  /// Backward: d_in (zero outside every segment) and every parameter gradient, overwritten;
  /// an expert with no rows gets zero gradients. Call it after `forward` with the same state.
  /// With dh = d_out · W2ᵀ: ffn d_pre = dh ⊙ act'(pre); glu [dg | du] with dg = dh ⊙ u ⊙
  /// act'(g), du = dh ⊙ act(g).
  /// @param[in]  in, d_out (rows, hidden)  host memory
  /// @param[out] d_in      (rows, hidden)  host memory
  /// @param[out] g         gradients, same shapes as the parameters, host memory
  template <class T, class G>
  static void backward(host_backend, expert_shape const& s, params<T const> const& p,
                       row_segments const& segments, matrix_view<double const> in,
                       matrix_view<double const> d_out, matrix_view<double> d_in,
                       params<G> const& g, host_state const& state,
                       std::source_location caller = std::source_location::current()) {
    moe::detail::at_entry_point(caller, [&] {
      can_implement(host, s, p, segments, in, d_out, d_in, g, state).throw_if_failed();
    });
    std::fill_n(d_in.data_handle(), element_count(d_in), 0.0);
    ffn_params<T const> const layers = detail::first_layer(p);
    ffn_params<G> const grads = detail::first_layer(g);
    index_t const f1 = first_width(s);
    auto store = [](auto& view, double v) {
      view = from_accumulate<G>(static_cast<accumulate_t<G>>(v));
    };
    for (index_t e = 0; e < s.experts; ++e) {
      index_t const first = segments.begin[e], n = segments.rows[e];
      auto const pre = [&](index_t c, index_t j) -> double& {
        return state.pre_activation(first + c, j);
      };
      auto const d_pre = [&](index_t c, index_t j) -> double& {
        return state.d_pre_activation(first + c, j);
      };
      // d_pre from dh = d_out · W2ᵀ
      moe::detail::host_gemm(
          n, s.ffn, s.hidden, [&](index_t c, index_t h) { return d_out(first + c, h); },
          [&](index_t h, index_t f) { return to_accumulate(layers.w2(e, f, h)); },
          [&](index_t c, index_t f, double dh) {
            double const gate = pre(c, f);
            if constexpr (Gated) {
              double const up = pre(c, s.ffn + f);
              d_pre(c, f) = dh * up * Act::derivative(gate);
              d_pre(c, s.ffn + f) = dh * Act::forward(gate);
            } else {
              d_pre(c, f) = dh * Act::derivative(gate);
            }
          });
      // dW2 = hᵀ · d_out, dW1 = inᵀ · d_pre: sums over this expert's rows only, in row order.
      moe::detail::host_gemm(
          s.ffn, s.hidden, n, [&](index_t f, index_t c) { return activated(pre, c, f, s.ffn); },
          [&](index_t c, index_t h) { return d_out(first + c, h); },
          [&](index_t f, index_t h, double v) { store(grads.w2(e, f, h), v); });
      moe::detail::host_gemm(
          s.hidden, f1, n, [&](index_t h, index_t c) { return in(first + c, h); },
          [&](index_t c, index_t j) { return d_pre(c, j); },
          [&](index_t h, index_t j, double v) { store(grads.w1(e, h, j), v); });
      if (is_present(grads.b2))
        for (index_t h = 0; h < s.hidden; ++h) {
          double sum = 0;
          for (index_t c = 0; c < n; ++c) sum += d_out(first + c, h);
          store(grads.b2(e, h), sum);
        }
      if (is_present(grads.b1))
        for (index_t j = 0; j < f1; ++j) {
          double sum = 0;
          for (index_t c = 0; c < n; ++c) sum += d_pre(c, j);
          store(grads.b1(e, j), sum);
        }
      // d_in = d_pre · W1ᵀ
      moe::detail::host_gemm(
          n, s.hidden, f1, [&](index_t c, index_t j) { return d_pre(c, j); },
          [&](index_t j, index_t h) { return to_accumulate(layers.w1(e, h, j)); },
          [&](index_t c, index_t h, double v) { d_in(first + c, h) = v; });
    }
  }

 private:
  /// h(c, f) from row c of the saved pre-activation: act(pre), or act(gate) ⊙ up.
  template <class Pre>
  static double activated(Pre const& pre, index_t c, index_t f, index_t ffn) {
    if constexpr (Gated)
      return Act::forward(pre(c, f)) * pre(c, ffn + f);
    else
      return Act::forward(pre(c, f));
  }

  /// The batch's input against the shape, the saved pre-activation against the batch, and its
  /// segments inside it.
  [[nodiscard]] static status check_host_batch(expert_shape const& s, row_segments const& segments,
                                               matrix_view<double const> in,
                                               matrix_view<double> pre_activation) {
    index_t const rows = in.extent(0);
    if (auto st = check_extents(in, "in", {rows, s.hidden}); !st) return st;
    if (auto st = check_extents(pre_activation, "state.pre_activation", {rows, first_width(s)});
        !st)
      return st;
    return check_segments(segments, s.experts, rows, "segments");
  }
};

}  // namespace moe::expert
