// SPDX-License-Identifier: Apache-2.0
#pragma once
// The feed-forward expert: out = act(x · W1 + b1) · W2 + b2, one weight set per expert.
//
//   W1 (experts, hidden, ffn)   b1 (experts, ffn)     optional
//   W2 (experts, ffn, hidden)   b2 (experts, hidden)  optional
//
// Host backend: forward and backward over the rows that the layout dispatched to each
// expert, in float64. Experts that received no row get zero gradients.

#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/detail/host_gemm.hpp>
#include <moe/expert/activation.hpp>
#include <moe/expert/concepts.hpp>

#include <algorithm>
#include <cstdint>
#include <string>

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

  /// What the host backend keeps between forward and backward.
  struct host_state {
    tensor3_view<double> pre_activation;    // (experts, rows, ffn)  x · W1 + b1
    tensor3_view<double> d_pre_activation;  // (experts, rows, ffn)  backward scratch
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

  /// Lays out the saved state for up to `max_rows` rows per expert; views of `rows`.
  static host_state carve_host_state(workspace_carver& carver, expert_shape const& s,
                                     index_t max_rows, index_t rows) {
    index_t const n = s.experts * max_rows * s.ffn;
    return {make_view(carver.take<double>(n), s.experts, rows, s.ffn),
            make_view(carver.take<double>(n), s.experts, rows, s.ffn)};
  }

  /// Forward of rows [0, rows[e]) of every expert; the other rows of `out` are zero.
  /// @param[in]  in  (experts, capacity, hidden)  host memory
  /// @param[out] out (experts, capacity, hidden)  host memory
  template <class T>
  static void forward(host_backend, expert_shape const& s, ffn_params<T const> const& p,
                      span<std::int64_t const> rows, tensor3_view<double const> in,
                      tensor3_view<double> out, host_state const& state) {
    std::fill_n(out.data_handle(), element_count(out), 0.0);
    for (index_t e = 0; e < s.experts; ++e) {
      index_t const n = rows[e];
      detail::host_gemm(
          n, s.ffn, s.hidden, [&](index_t c, index_t h) { return in(e, c, h); },
          [&](index_t h, index_t f) { return to_accumulate(p.w1(e, h, f)); },
          [&](index_t c, index_t f, double v) {
            state.pre_activation(e, c, f) = v + (is_present(p.b1) ? to_accumulate(p.b1(e, f)) : 0);
          });
      detail::host_gemm(
          n, s.hidden, s.ffn,
          [&](index_t c, index_t f) { return Act::forward(state.pre_activation(e, c, f)); },
          [&](index_t f, index_t h) { return to_accumulate(p.w2(e, f, h)); },
          [&](index_t c, index_t h, double v) {
            out(e, c, h) = v + (is_present(p.b2) ? to_accumulate(p.b2(e, h)) : 0);
          });
    }
  }

  /// Backward: d_in (rows beyond rows[e] zero) and every parameter gradient, overwritten.
  /// @param[in]  in, d_out (experts, capacity, hidden)
  /// @param[out] d_in      (experts, capacity, hidden)
  /// @param[out] g         gradients, same shapes as the parameters
  template <class T, class G>
  static void backward(host_backend, expert_shape const& s, ffn_params<T const> const& p,
                       span<std::int64_t const> rows, tensor3_view<double const> in,
                       tensor3_view<double const> d_out, tensor3_view<double> d_in,
                       ffn_params<G> const& g, host_state const& state) {
    std::fill_n(d_in.data_handle(), element_count(d_in), 0.0);
    auto store = [](auto& view, double v) {
      view = from_accumulate<G>(static_cast<accumulate_t<G>>(v));
    };
    for (index_t e = 0; e < s.experts; ++e) {
      index_t const n = rows[e];
      auto const act = [&](index_t c, index_t f) {
        return Act::forward(state.pre_activation(e, c, f));
      };
      // d_pre = (d_out · W2ᵀ) ⊙ act'(pre)
      detail::host_gemm(
          n, s.ffn, s.hidden, [&](index_t c, index_t h) { return d_out(e, c, h); },
          [&](index_t h, index_t f) { return to_accumulate(p.w2(e, f, h)); },
          [&](index_t c, index_t f, double v) {
            state.d_pre_activation(e, c, f) = v * Act::derivative(state.pre_activation(e, c, f));
          });
      // dW2 = act(pre)ᵀ · d_out, dW1 = inᵀ · d_pre: sums over this expert's rows only.
      detail::host_gemm(
          s.ffn, s.hidden, n, [&](index_t f, index_t c) { return act(c, f); },
          [&](index_t c, index_t h) { return d_out(e, c, h); },
          [&](index_t f, index_t h, double v) { store(g.w2(e, f, h), v); });
      detail::host_gemm(
          s.hidden, s.ffn, n, [&](index_t h, index_t c) { return in(e, c, h); },
          [&](index_t c, index_t f) { return state.d_pre_activation(e, c, f); },
          [&](index_t h, index_t f, double v) { store(g.w1(e, h, f), v); });
      if (is_present(g.b2))
        for (index_t h = 0; h < s.hidden; ++h) {
          double sum = 0;
          for (index_t c = 0; c < n; ++c) sum += d_out(e, c, h);
          store(g.b2(e, h), sum);
        }
      if (is_present(g.b1))
        for (index_t f = 0; f < s.ffn; ++f) {
          double sum = 0;
          for (index_t c = 0; c < n; ++c) sum += state.d_pre_activation(e, c, f);
          store(g.b1(e, f), sum);
        }
      // d_in = d_pre · W1ᵀ
      detail::host_gemm(
          n, s.hidden, s.ffn, [&](index_t c, index_t f) { return state.d_pre_activation(e, c, f); },
          [&](index_t f, index_t h) { return to_accumulate(p.w1(e, h, f)); },
          [&](index_t c, index_t h, double v) { d_in(e, c, h) = v; });
    }
  }
};
static_assert(trainable_expert<ffn<act::relu>> && trainable_expert<ffn<act::gelu>> &&
              trainable_expert<ffn<act::silu>>);

}  // namespace moe::expert
