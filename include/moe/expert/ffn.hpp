// SPDX-License-Identifier: Apache-2.0
#pragma once
// The feed-forward expert: out = act(x · W1 + b1) · W2 + b2, one weight set per expert.
//
//   W1 (experts, hidden, ffn)   b1 (experts, ffn)     optional
//   W2 (experts, ffn, hidden)   b2 (experts, hidden)  optional
//
// Host backend: forward and backward over the expert batch (expert::row_segments: each
// expert's segment of an (rows, hidden) matrix), in float64. Experts that received no row
// get zero gradients.
//
// CUDA backend (declared here, defined in kernels/ffn.cuh, which needs nvcc): the same over
// device memory in float, __half or __nv_bfloat16 with float accumulation, through cuBLAS,
// for a capacity batch (`uniform_segments`: batched GEMMs, no host synchronisation) or a
// ragged one (`row_segments` in host memory: one GEMM per non-empty expert).

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

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

namespace moe::expert {

/// Views of the parameters of a bank of FFN experts (T const) or of their gradients (T).
/// An empty bias view means "no bias"; a gradient bias view, when present, is written.
template <class T>
struct ffn_params {
  tensor3_view<T> w1;  // (experts, hidden, ffn)
  matrix_view<T> b1;   // (experts, ffn)     optional
  tensor3_view<T> w2;  // (experts, ffn, hidden)
  matrix_view<T> b2;   // (experts, hidden)  optional
};

/// FFN expert with activation `Act` (act::relu, act::gelu, act::silu).
template <act::activation Act>
struct ffn {
  using moe_concept = expert_tag;
  using activation = Act;
  template <class T>
  using params = ffn_params<T>;

  /// What the host backend keeps between forward and backward, per row of the batch.
  struct host_state {
    matrix_view<double> pre_activation;    // (rows, ffn)  x · W1 + b1
    matrix_view<double> d_pre_activation;  // (rows, ffn)  backward scratch
  };

  /// Checks every view of `p` against `shape`; `name` prefixes the argument in the message.
  template <class T>
  [[nodiscard]] static status check(ffn_params<T> const& p, expert_shape const& s,
                                    char const* name) {
    std::string const prefix = std::string(name) + ".";
    if (auto st = check_extents(p.w1, (prefix + "w1").c_str(), {s.experts, s.hidden, s.ffn}); !st)
      return st;
    if (auto st = check_optional_extents(p.b1, (prefix + "b1").c_str(), {s.experts, s.ffn}); !st)
      return st;
    if (auto st = check_extents(p.w2, (prefix + "w2").c_str(), {s.experts, s.ffn, s.hidden}); !st)
      return st;
    return check_optional_extents(p.b2, (prefix + "b2").c_str(), {s.experts, s.hidden});
  }

  /// Lays out the saved state for a batch of up to `max_rows` rows; views of `rows` rows.
  static host_state carve_host_state(workspace_carver& carver, expert_shape const& s,
                                     index_t max_rows, index_t rows) {
    index_t const n = max_rows * s.ffn;
    return {make_view(carver.take<double>(n), rows, s.ffn),
            make_view(carver.take<double>(n), rows, s.ffn)};
  }

  // --- CUDA backend ---------------------------------------------------------------------

  /// The device state of the CUDA backend (expert::device_state: F1 = ffn).
  template <element T>
  using device_state = expert::device_state<T>;

  /// Lays out the CUDA backend's state for up to `max_rows` rows; views of `rows` rows.
  /// `expert_pass::forward_only` leaves out backward's scratch.
  template <element T>
  static device_state<T> carve_device_state(workspace_carver& carver, expert_shape const& s,
                                            index_t max_rows, index_t rows,
                                            expert_pass pass = expert_pass::training) {
    return detail::carve_two_layer_state<T>(carver, s, s.ffn, max_rows, rows, pass);
  }

  /// Bytes of device workspace that `carve_device_state<T>` takes for `max_rows` rows.
  template <element T>
  [[nodiscard]] static std::size_t device_workspace_bytes(
      expert_shape const& s, index_t max_rows, expert_pass pass = expert_pass::training) {
    return detail::two_layer_state_bytes<T>(s, s.ffn, max_rows, pass);
  }

  /// Whether a CUDA forward call can run with these arguments; reads nothing on the device.
  template <element T, segment_description Segments>
  [[nodiscard]] static status check_forward(cuda_backend const& cuda, expert_shape const& s,
                                            ffn_params<T const> const& p, Segments const& segments,
                                            matrix_view<std::type_identity_t<T> const> in,
                                            matrix_view<std::type_identity_t<T>> out,
                                            device_state<std::type_identity_t<T>> const& state) {
    return detail::check_forward_call<T>(cuda, s, s.ffn, check(p, s, "params"), segments, in, out,
                                         state);
  }

  /// Whether a CUDA backward call can run with these arguments; reads nothing on the device.
  template <element T, class G, segment_description Segments>
  [[nodiscard]] static status check_backward(cuda_backend const& cuda, expert_shape const& s,
                                             ffn_params<T const> const& p, Segments const& segments,
                                             matrix_view<std::type_identity_t<T> const> in,
                                             matrix_view<std::type_identity_t<T> const> d_out,
                                             matrix_view<std::type_identity_t<T>> d_in,
                                             ffn_params<G> const& g,
                                             device_state<std::type_identity_t<T>> const& state) {
    return detail::check_backward_call<T>(cuda, s, s.ffn, check(p, s, "params"),
                                          check(g, s, "gradients"), segments, in, d_out, d_in,
                                          state);
  }

  /// Forward on the CUDA backend, enqueued on `cuda.stream` with the borrowed `cuda.blas`:
  /// out = act(in · W1 + b1) · W2 + b2 on each expert's rows; rows of no expert are zero.
  /// Checks every argument first and throws `moe::invalid_argument` before any device work.
  /// A `uniform_segments` batch runs batched GEMMs over all E·C rows and never synchronises
  /// (capturable in a CUDA graph; cuBLAS then needs a workspace set on the handle with
  /// cublasSetWorkspace); a `row_segments` batch (host memory: the caller copied the counts
  /// to the host once) runs one GEMM per non-empty expert. Defined in kernels/ffn.cuh.
  /// @param[in]  p        parameters, device memory
  /// @param[in]  segments `uniform_segments` (its `claimed` on the device) or `row_segments`
  ///                      in host memory
  /// @param[in]  in       (rows, hidden) device memory
  /// @param[out] out      (rows, hidden) device memory
  /// @param[out] state    carved for `rows` rows, device memory: what backward needs
  template <element T, segment_description Segments>
  static void forward(cuda_backend cuda, expert_shape const& s, ffn_params<T const> const& p,
                      Segments const& segments, matrix_view<std::type_identity_t<T> const> in,
                      matrix_view<std::type_identity_t<T>> out,
                      device_state<std::type_identity_t<T>> const& state) {
    check_forward(cuda, s, p, segments, in, out, state).throw_if_failed();
    detail::cuda_backend_of<ffn>::forward(cuda, s, p, segments, in, out, state);
  }

  /// Backward on the CUDA backend, after `forward` with the same state and segments: d_in
  /// (zero on rows of no expert) and every parameter gradient, overwritten; experts with no
  /// rows get zero gradients. Bias gradients are column sums in a fixed order (no atomics):
  /// the result is deterministic. Gradients are T or float. Defined in kernels/ffn.cuh.
  /// @param[in]  in, d_out (rows, hidden) device memory
  /// @param[out] d_in      (rows, hidden) device memory
  /// @param[out] g         gradients, device memory
  /// @param[in]  state     forward's state, carved for `expert_pass::training`
  template <element T, class G, segment_description Segments>
  requires(std::same_as<G, T> || std::same_as<G, float>) static void backward(
      cuda_backend cuda, expert_shape const& s, ffn_params<T const> const& p,
      Segments const& segments, matrix_view<std::type_identity_t<T> const> in,
      matrix_view<std::type_identity_t<T> const> d_out, matrix_view<std::type_identity_t<T>> d_in,
      ffn_params<G> const& g, device_state<std::type_identity_t<T>> const& state) {
    check_backward(cuda, s, p, segments, in, d_out, d_in, g, state).throw_if_failed();
    detail::cuda_backend_of<ffn>::backward(cuda, s, p, segments, in, d_out, d_in, g, state);
  }

  // --- host backend ---------------------------------------------------------------------

  /// Forward of every expert's segment of the batch; rows outside every segment of `out`
  /// are zero.
  /// @param[in]  segments expert e's rows are [begin[e], begin[e] + rows[e]), host memory
  /// @param[in]  in       (rows, hidden)  host memory
  /// @param[out] out      (rows, hidden)  host memory
  /// @param[in]  state    carved for `rows` rows; keeps what backward needs
  template <class T>
  static void forward(host_backend, expert_shape const& s, ffn_params<T const> const& p,
                      row_segments const& segments, matrix_view<double const> in,
                      matrix_view<double> out, host_state const& state) {
    check_batch(s, segments, in, out, state).throw_if_failed();
    std::fill_n(out.data_handle(), element_count(out), 0.0);
    for (index_t e = 0; e < s.experts; ++e) {
      index_t const first = segments.begin[e], n = segments.rows[e];
      moe::detail::host_gemm(
          n, s.ffn, s.hidden, [&](index_t c, index_t h) { return in(first + c, h); },
          [&](index_t h, index_t f) { return to_accumulate(p.w1(e, h, f)); },
          [&](index_t c, index_t f, double v) {
            state.pre_activation(first + c, f) =
                v + (is_present(p.b1) ? to_accumulate(p.b1(e, f)) : 0);
          });
      moe::detail::host_gemm(
          n, s.hidden, s.ffn,
          [&](index_t c, index_t f) { return Act::forward(state.pre_activation(first + c, f)); },
          [&](index_t f, index_t h) { return to_accumulate(p.w2(e, f, h)); },
          [&](index_t c, index_t h, double v) {
            out(first + c, h) = v + (is_present(p.b2) ? to_accumulate(p.b2(e, h)) : 0);
          });
    }
  }

  /// Backward: d_in (zero outside every segment) and every parameter gradient, overwritten;
  /// an expert with no rows gets zero gradients. Call it after `forward` with the same state.
  /// @param[in]  in, d_out (rows, hidden)  host memory
  /// @param[out] d_in      (rows, hidden)  host memory
  /// @param[out] g         gradients, same shapes as the parameters, host memory
  template <class T, class G>
  static void backward(host_backend, expert_shape const& s, ffn_params<T const> const& p,
                       row_segments const& segments, matrix_view<double const> in,
                       matrix_view<double const> d_out, matrix_view<double> d_in,
                       ffn_params<G> const& g, host_state const& state) {
    check_batch(s, segments, in, d_in, state).throw_if_failed();
    check_extents(d_out, "d_out", {in.extent(0), s.hidden}).throw_if_failed();
    std::fill_n(d_in.data_handle(), element_count(d_in), 0.0);
    auto store = [](auto& view, double v) {
      view = from_accumulate<G>(static_cast<accumulate_t<G>>(v));
    };
    for (index_t e = 0; e < s.experts; ++e) {
      index_t const first = segments.begin[e], n = segments.rows[e];
      auto const pre = [&](index_t c, index_t f) -> double& {
        return state.pre_activation(first + c, f);
      };
      auto const d_pre = [&](index_t c, index_t f) -> double& {
        return state.d_pre_activation(first + c, f);
      };
      // d_pre = (d_out · W2ᵀ) ⊙ act'(pre)
      moe::detail::host_gemm(
          n, s.ffn, s.hidden, [&](index_t c, index_t h) { return d_out(first + c, h); },
          [&](index_t h, index_t f) { return to_accumulate(p.w2(e, f, h)); },
          [&](index_t c, index_t f, double v) { d_pre(c, f) = v * Act::derivative(pre(c, f)); });
      // dW2 = act(pre)ᵀ · d_out, dW1 = inᵀ · d_pre: sums over this expert's rows only, in
      // row order.
      moe::detail::host_gemm(
          s.ffn, s.hidden, n, [&](index_t f, index_t c) { return Act::forward(pre(c, f)); },
          [&](index_t c, index_t h) { return d_out(first + c, h); },
          [&](index_t f, index_t h, double v) { store(g.w2(e, f, h), v); });
      moe::detail::host_gemm(
          s.hidden, s.ffn, n, [&](index_t h, index_t c) { return in(first + c, h); },
          [&](index_t c, index_t f) { return d_pre(c, f); },
          [&](index_t h, index_t f, double v) { store(g.w1(e, h, f), v); });
      if (is_present(g.b2))
        for (index_t h = 0; h < s.hidden; ++h) {
          double sum = 0;
          for (index_t c = 0; c < n; ++c) sum += d_out(first + c, h);
          store(g.b2(e, h), sum);
        }
      if (is_present(g.b1))
        for (index_t f = 0; f < s.ffn; ++f) {
          double sum = 0;
          for (index_t c = 0; c < n; ++c) sum += d_pre(c, f);
          store(g.b1(e, f), sum);
        }
      // d_in = d_pre · W1ᵀ
      moe::detail::host_gemm(
          n, s.hidden, s.ffn, [&](index_t c, index_t f) { return d_pre(c, f); },
          [&](index_t f, index_t h) { return to_accumulate(p.w1(e, h, f)); },
          [&](index_t c, index_t h, double v) { d_in(first + c, h) = v; });
    }
  }

 private:
  /// The batch's views agree with each other and its segments fit in them.
  [[nodiscard]] static status check_batch(expert_shape const& s, row_segments const& segments,
                                          matrix_view<double const> in, matrix_view<double> out,
                                          host_state const& state) {
    index_t const rows = in.extent(0);
    if (auto st = check_extents(in, "in", {rows, s.hidden}); !st) return st;
    if (auto st = check_extents(out, "out", {rows, s.hidden}); !st) return st;
    if (auto st = check_extents(state.pre_activation, "state", {rows, s.ffn}); !st) return st;
    return check_segments(segments, s.experts, rows, "segments");
  }
};
static_assert(trainable_expert<ffn<act::relu>> && trainable_expert<ffn<act::gelu>> &&
              trainable_expert<ffn<act::silu>>);
static_assert(cuda_expert<ffn<act::gelu>, float> && cuda_expert<ffn<act::gelu>, __half> &&
              cuda_expert<ffn<act::silu>, __nv_bfloat16>);

}  // namespace moe::expert
