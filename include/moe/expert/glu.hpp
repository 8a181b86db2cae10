// SPDX-License-Identifier: Apache-2.0
#pragma once
// The gated (GLU) expert: out = (act(x · Wg + bg) ⊙ (x · Wu + bu)) · W2 + b2, one weight set
// per expert. SwiGLU (Mixtral, DeepSeek, Qwen) is glu<act::silu>; GeGLU is glu<act::gelu>.
//
// The gate and up projections are ONE weight, so that the CUDA backend runs them as one
// GEMM, stored as stacked halves [gate | up] along the last axis:
//
//   W13 (experts, hidden, 2·ffn)   W13[e, :, 0:F] = Wg[e],  W13[e, :, F:2F] = Wu[e]
//   b13 (experts, 2·ffn)           b13[e, 0:F]    = bg[e],  b13[e, F:2F]    = bu[e]  optional
//   W2  (experts, ffn, hidden)     b2  (experts, hidden)                            optional
//
// (A checkpoint that interleaves gate and up columns, or stores w1 and w3 separately as
// Mixtral's does, is converted once when loading.)
//
// Host backend: forward and backward over the expert batch (expert::row_segments), in
// float64; experts that received no row get zero gradients. CUDA backend: declared here,
// defined in kernels/glu.cuh (nvcc), as for expert::ffn.

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/detail/host_gemm.hpp>
#include <moe/expert/activation.hpp>
#include <moe/expert/concepts.hpp>
#include <moe/expert/device_state.hpp>
#include <moe/expert/ffn.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

namespace moe::expert {

/// Views of the parameters of a bank of GLU experts (T const) or of their gradients (T).
/// An empty bias view means "no bias"; a gradient bias view, when present, is written.
template <class T>
struct glu_params {
  tensor3_view<T> w13;  // (experts, hidden, 2·ffn)  [gate | up]
  matrix_view<T> b13;   // (experts, 2·ffn)          [gate | up]  optional
  tensor3_view<T> w2;   // (experts, ffn, hidden)
  matrix_view<T> b2;    // (experts, hidden)                      optional
};

/// GLU expert with gate activation `Act`: act::silu gives SwiGLU, act::gelu GeGLU.
template <act::activation Act>
struct glu {
  using moe_concept = expert_tag;
  using activation = Act;
  template <class T>
  using params = glu_params<T>;

  /// What the host backend keeps between forward and backward, per row of the batch.
  struct host_state {
    matrix_view<double> pre_activation;    // (rows, 2·ffn)  x · W13 + b13: [gate | up]
    matrix_view<double> d_pre_activation;  // (rows, 2·ffn)  backward scratch
  };

  /// Checks every view of `p` against `shape`; `name` prefixes the argument in the message.
  template <class T>
  [[nodiscard]] static status check(glu_params<T> const& p, expert_shape const& s,
                                    char const* name) {
    std::string const prefix = std::string(name) + ".";
    if (auto st = check_extents(p.w13, (prefix + "w13").c_str(), {s.experts, s.hidden, 2 * s.ffn});
        !st)
      return st;
    if (auto st = check_optional_extents(p.b13, (prefix + "b13").c_str(), {s.experts, 2 * s.ffn});
        !st)
      return st;
    if (auto st = check_extents(p.w2, (prefix + "w2").c_str(), {s.experts, s.ffn, s.hidden}); !st)
      return st;
    return check_optional_extents(p.b2, (prefix + "b2").c_str(), {s.experts, s.hidden});
  }

  /// Lays out the saved state for a batch of up to `max_rows` rows; views of `rows` rows.
  static host_state carve_host_state(workspace_carver& carver, expert_shape const& s,
                                     index_t max_rows, index_t rows) {
    index_t const n = max_rows * 2 * s.ffn;
    return {make_view(carver.take<double>(n), rows, 2 * s.ffn),
            make_view(carver.take<double>(n), rows, 2 * s.ffn)};
  }

  // --- CUDA backend ---------------------------------------------------------------------

  /// The device state of the CUDA backend (expert::device_state: F1 = 2·ffn, [gate | up]).
  template <element T>
  using device_state = expert::device_state<T>;

  /// Lays out the CUDA backend's state for up to `max_rows` rows; views of `rows` rows.
  template <element T>
  static device_state<T> carve_device_state(workspace_carver& carver, expert_shape const& s,
                                            index_t max_rows, index_t rows,
                                            expert_pass pass = expert_pass::training) {
    return detail::carve_two_layer_state<T>(carver, s, 2 * s.ffn, max_rows, rows, pass);
  }

  /// Bytes of device workspace that `carve_device_state<T>` takes for `max_rows` rows.
  template <element T>
  [[nodiscard]] static std::size_t device_workspace_bytes(
      expert_shape const& s, index_t max_rows, expert_pass pass = expert_pass::training) {
    return detail::two_layer_state_bytes<T>(s, 2 * s.ffn, max_rows, pass);
  }

  /// Whether a CUDA forward call can run with these arguments; reads nothing on the device.
  template <element T, segment_description Segments>
  [[nodiscard]] static status check_forward(cuda_backend const& cuda, expert_shape const& s,
                                            glu_params<T const> const& p, Segments const& segments,
                                            matrix_view<std::type_identity_t<T> const> in,
                                            matrix_view<std::type_identity_t<T>> out,
                                            device_state<std::type_identity_t<T>> const& state) {
    return detail::check_forward_call<T>(cuda, s, 2 * s.ffn, check(p, s, "params"), segments, in,
                                         out, state);
  }

  /// Whether a CUDA backward call can run with these arguments; reads nothing on the device.
  template <element T, class G, segment_description Segments>
  [[nodiscard]] static status check_backward(cuda_backend const& cuda, expert_shape const& s,
                                             glu_params<T const> const& p, Segments const& segments,
                                             matrix_view<std::type_identity_t<T> const> in,
                                             matrix_view<std::type_identity_t<T> const> d_out,
                                             matrix_view<std::type_identity_t<T>> d_in,
                                             glu_params<G> const& g,
                                             device_state<std::type_identity_t<T>> const& state) {
    return detail::check_backward_call<T>(cuda, s, 2 * s.ffn, check(p, s, "params"),
                                          check(g, s, "gradients"), segments, in, d_out, d_in,
                                          state);
  }

  /// Forward on the CUDA backend: as ffn's (see ffn::forward), with one GEMM into the
  /// [gate | up] halves and act(gate) ⊙ up in the kernel after it. Defined in kernels/glu.cuh.
  /// @param[in]  p        parameters, device memory
  /// @param[in]  segments `uniform_segments` (its `claimed` on the device) or `row_segments`
  ///                      in host memory
  /// @param[in]  in       (rows, hidden) device memory
  /// @param[out] out      (rows, hidden) device memory
  /// @param[out] state    carved for `rows` rows, device memory: what backward needs
  template <element T, segment_description Segments>
  static void forward(cuda_backend cuda, expert_shape const& s, glu_params<T const> const& p,
                      Segments const& segments, matrix_view<std::type_identity_t<T> const> in,
                      matrix_view<std::type_identity_t<T>> out,
                      device_state<std::type_identity_t<T>> const& state) {
    check_forward(cuda, s, p, segments, in, out, state).throw_if_failed();
    detail::cuda_backend_of<glu>::forward(cuda, s, stacked(p), segments, in, out, state);
  }

  /// Backward on the CUDA backend, after `forward` with the same state and segments: as
  /// ffn's (see ffn::backward). Gradients are T or float. Defined in kernels/glu.cuh.
  /// @param[in]  in, d_out (rows, hidden) device memory
  /// @param[out] d_in      (rows, hidden) device memory
  /// @param[out] g         gradients, device memory
  /// @param[in]  state     forward's state, carved for `expert_pass::training`
  template <element T, class G, segment_description Segments>
  requires(std::same_as<G, T> || std::same_as<G, float>) static void backward(
      cuda_backend cuda, expert_shape const& s, glu_params<T const> const& p,
      Segments const& segments, matrix_view<std::type_identity_t<T> const> in,
      matrix_view<std::type_identity_t<T> const> d_out, matrix_view<std::type_identity_t<T>> d_in,
      glu_params<G> const& g, device_state<std::type_identity_t<T>> const& state) {
    check_backward(cuda, s, p, segments, in, d_out, d_in, g, state).throw_if_failed();
    detail::cuda_backend_of<glu>::backward(cuda, s, stacked(p), segments, in, d_out, d_in,
                                           stacked(g), state);
  }

  // --- host backend ---------------------------------------------------------------------

  /// Forward of every expert's segment of the batch; rows outside every segment of `out`
  /// are zero.
  /// @param[in]  segments expert e's rows are [begin[e], begin[e] + rows[e]), host memory
  /// @param[in]  in       (rows, hidden)  host memory
  /// @param[out] out      (rows, hidden)  host memory
  /// @param[in]  state    carved for `rows` rows; keeps what backward needs
  template <class T>
  static void forward(host_backend, expert_shape const& s, glu_params<T const> const& p,
                      row_segments const& segments, matrix_view<double const> in,
                      matrix_view<double> out, host_state const& state) {
    check_batch(s, segments, in, out, state).throw_if_failed();
    std::fill_n(out.data_handle(), element_count(out), 0.0);
    index_t const f_width = s.ffn;
    for (index_t e = 0; e < s.experts; ++e) {
      index_t const first = segments.begin[e], n = segments.rows[e];
      auto const pre = [&](index_t c, index_t j) -> double& {
        return state.pre_activation(first + c, j);
      };
      moe::detail::host_gemm(
          n, 2 * f_width, s.hidden, [&](index_t c, index_t h) { return in(first + c, h); },
          [&](index_t h, index_t j) { return to_accumulate(p.w13(e, h, j)); },
          [&](index_t c, index_t j, double v) {
            pre(c, j) = v + (is_present(p.b13) ? to_accumulate(p.b13(e, j)) : 0);
          });
      moe::detail::host_gemm(
          n, s.hidden, f_width,
          [&](index_t c, index_t f) { return Act::forward(pre(c, f)) * pre(c, f_width + f); },
          [&](index_t f, index_t h) { return to_accumulate(p.w2(e, f, h)); },
          [&](index_t c, index_t h, double v) {
            out(first + c, h) = v + (is_present(p.b2) ? to_accumulate(p.b2(e, h)) : 0);
          });
    }
  }

  /// Backward: d_in (zero outside every segment) and every parameter gradient, overwritten;
  /// an expert with no rows gets zero gradients. Call it after `forward` with the same state.
  /// With h = act(g) ⊙ u: dh = d_out · W2ᵀ, dg = dh ⊙ u ⊙ act'(g), du = dh ⊙ act(g).
  /// @param[in]  in, d_out (rows, hidden)  host memory
  /// @param[out] d_in      (rows, hidden)  host memory
  /// @param[out] g         gradients, same shapes as the parameters, host memory
  template <class T, class G>
  static void backward(host_backend, expert_shape const& s, glu_params<T const> const& p,
                       row_segments const& segments, matrix_view<double const> in,
                       matrix_view<double const> d_out, matrix_view<double> d_in,
                       glu_params<G> const& g, host_state const& state) {
    check_batch(s, segments, in, d_in, state).throw_if_failed();
    check_extents(d_out, "d_out", {in.extent(0), s.hidden}).throw_if_failed();
    std::fill_n(d_in.data_handle(), element_count(d_in), 0.0);
    auto store = [](auto& view, double v) {
      view = from_accumulate<G>(static_cast<accumulate_t<G>>(v));
    };
    index_t const f_width = s.ffn;
    for (index_t e = 0; e < s.experts; ++e) {
      index_t const first = segments.begin[e], n = segments.rows[e];
      auto const pre = [&](index_t c, index_t j) -> double& {
        return state.pre_activation(first + c, j);
      };
      auto const d_pre = [&](index_t c, index_t j) -> double& {
        return state.d_pre_activation(first + c, j);
      };
      // [dg | du] from dh = d_out · W2ᵀ
      moe::detail::host_gemm(
          n, f_width, s.hidden, [&](index_t c, index_t h) { return d_out(first + c, h); },
          [&](index_t h, index_t f) { return to_accumulate(p.w2(e, f, h)); },
          [&](index_t c, index_t f, double dh) {
            double const gate = pre(c, f), up = pre(c, f_width + f);
            d_pre(c, f) = dh * up * Act::derivative(gate);
            d_pre(c, f_width + f) = dh * Act::forward(gate);
          });
      // dW2 = hᵀ · d_out, dW13 = inᵀ · [dg | du]: sums over this expert's rows, in row order.
      moe::detail::host_gemm(
          f_width, s.hidden, n,
          [&](index_t f, index_t c) { return Act::forward(pre(c, f)) * pre(c, f_width + f); },
          [&](index_t c, index_t h) { return d_out(first + c, h); },
          [&](index_t f, index_t h, double v) { store(g.w2(e, f, h), v); });
      moe::detail::host_gemm(
          s.hidden, 2 * f_width, n, [&](index_t h, index_t c) { return in(first + c, h); },
          [&](index_t c, index_t j) { return d_pre(c, j); },
          [&](index_t h, index_t j, double v) { store(g.w13(e, h, j), v); });
      if (is_present(g.b2))
        for (index_t h = 0; h < s.hidden; ++h) {
          double sum = 0;
          for (index_t c = 0; c < n; ++c) sum += d_out(first + c, h);
          store(g.b2(e, h), sum);
        }
      if (is_present(g.b13))
        for (index_t j = 0; j < 2 * f_width; ++j) {
          double sum = 0;
          for (index_t c = 0; c < n; ++c) sum += d_pre(c, j);
          store(g.b13(e, j), sum);
        }
      // d_in = [dg | du] · W13ᵀ
      moe::detail::host_gemm(
          n, s.hidden, 2 * f_width, [&](index_t c, index_t j) { return d_pre(c, j); },
          [&](index_t j, index_t h) { return to_accumulate(p.w13(e, h, j)); },
          [&](index_t c, index_t h, double v) { d_in(first + c, h) = v; });
    }
  }

 private:
  /// The two-GEMM expert's view of the parameters: W13 is the first GEMM's weight.
  template <class T>
  static ffn_params<T> stacked(glu_params<T> const& p) noexcept {
    return {p.w13, p.b13, p.w2, p.b2};
  }

  /// The batch's views agree with each other and its segments fit in them.
  [[nodiscard]] static status check_batch(expert_shape const& s, row_segments const& segments,
                                          matrix_view<double const> in, matrix_view<double> out,
                                          host_state const& state) {
    index_t const rows = in.extent(0);
    if (auto st = check_extents(in, "in", {rows, s.hidden}); !st) return st;
    if (auto st = check_extents(out, "out", {rows, s.hidden}); !st) return st;
    if (auto st = check_extents(state.pre_activation, "state", {rows, 2 * s.ffn}); !st) return st;
    return check_segments(segments, s.experts, rows, "segments");
  }
};
static_assert(trainable_expert<glu<act::silu>> && trainable_expert<glu<act::gelu>>);
static_assert(cuda_expert<glu<act::silu>, __nv_bfloat16> && cuda_expert<glu<act::gelu>, float>);

/// SwiGLU (Mixtral, DeepSeek-V3, Qwen3): glu<act::silu>.
using swiglu = glu<act::silu>;
/// GeGLU: glu<act::gelu>.
using geglu = glu<act::gelu>;

}  // namespace moe::expert
