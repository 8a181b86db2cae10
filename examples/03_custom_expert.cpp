// SPDX-License-Identifier: Apache-2.0
// 03_custom_expert: why the expert is a concept, not a class you must use.
//
// The layer routes, dispatches, combines and differentiates; what each expert computes is
// yours. Any type that models moe::expert::expert (a tag, parameter views it can check, a
// saved state it lays out in the layer's workspace, and a forward over its rows of the
// batch) runs in moe::layer, and one that also has a backward trains in it; one that lists
// its parameters (parameter_shapes) gets them owned by moe::host_parameters. This program
// writes such a type, a linear map per expert with a learned gain, out = s_e · (x · W_e),
// runs it in a layer on the host backend, and checks the output against numbers worked out
// by hand and one gradient against a finite difference. It needs no GPU.

#include <moe/moe.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <vector>

namespace {

/// out = s_e · (x · W_e): a linear map per expert with a learned scalar gain.
struct scaled_linear {
  using moe_concept = moe::expert::expert_tag;

  template <class T>  // T const: parameters; T: gradients
  struct params {
    moe::tensor3_view<T> w;     // (experts, hidden, hidden)
    moe::vector_view<T> scale;  // (experts)
  };

  struct host_state {};  // nothing to save: backward recomputes x · W_e from its input

  /// Its parameters by name and axes (what errors print, and what moe::host_parameters lays
  /// out), in the order of `params`' members.
  static std::array<moe::parameter_shape, 2> parameter_shapes(moe::expert::expert_shape const& s) {
    return {{{.name = "w",
              .rank = 3,
              .axes = {{{"experts", s.experts}, {"hidden", s.hidden}, {"hidden", s.hidden}}},
              .fan_in = s.hidden,
              .torch = "nn.Linear(hidden, hidden, bias=False).weight.T of each expert"},
             {.name = "scale",
              .rank = 1,
              .axes = {{{"experts", s.experts}}},
              .fan_in = 1,
              .torch = "a Parameter of shape (experts,)"}}};
  }

  /// Views over one pointer per tensor of parameter_shapes.
  template <class T>
  static params<T> view_parameters(moe::expert::expert_shape const& s, moe::span<T* const> data) {
    return {moe::make_view(data[0], s.experts, s.hidden, s.hidden),
            moe::make_view(data[1], s.experts)};
  }

  template <class T>
  static moe::status check(params<T> const& p, moe::expert::expert_shape const& s,
                           char const* name) {
    std::string const prefix = std::string(name) + ".";
    auto const shapes = parameter_shapes(s);
    if (auto st = moe::check_parameter(p.w, shapes[0], prefix); !st) return st;
    return moe::check_parameter(p.scale, shapes[1], prefix);
  }

  static host_state carve_host_state(moe::workspace_carver&, moe::expert::expert_shape const&,
                                     moe::index_t /*max_rows*/, moe::index_t /*rows*/) {
    return {};
  }

  /// Expert e maps its rows [begin[e], begin[e] + rows[e]); every other row is zero.
  template <class T>
  static void forward(moe::host_backend, moe::expert::expert_shape const& s,
                      params<T const> const& p, moe::expert::row_segments const& segments,
                      moe::matrix_view<double const> in, moe::matrix_view<double> out,
                      host_state const&) {
    std::fill_n(out.data_handle(), moe::element_count(out), 0.0);
    for (moe::index_t e = 0; e < s.experts; ++e)
      for (moe::index_t r = segments.begin[e]; r < segments.begin[e] + segments.rows[e]; ++r)
        for (moe::index_t j = 0; j < s.hidden; ++j)
          out(r, j) = moe::to_accumulate(p.scale(e)) * linear(p, e, in, r, j, s.hidden);
  }

  /// d_in = s_e · d_out · W_eᵀ, dW_e = s_e · xᵀ · d_out, ds_e = Σ ⟨x · W_e, d_out⟩; zero
  /// gradients for an expert with no rows.
  template <class T, class G>
  static void backward(moe::host_backend, moe::expert::expert_shape const& s,
                       params<T const> const& p, moe::expert::row_segments const& segments,
                       moe::matrix_view<double const> in, moe::matrix_view<double const> d_out,
                       moe::matrix_view<double> d_in, params<G> const& g, host_state const&) {
    auto store = [](auto& to, double v) {
      to = moe::from_accumulate<G>(static_cast<moe::accumulate_t<G>>(v));
    };
    std::fill_n(d_in.data_handle(), moe::element_count(d_in), 0.0);
    for (moe::index_t e = 0; e < s.experts; ++e) {
      moe::index_t const first = segments.begin[e], last = first + segments.rows[e];
      double const scale = moe::to_accumulate(p.scale(e));
      double d_scale = 0;
      for (moe::index_t r = first; r < last; ++r)
        for (moe::index_t j = 0; j < s.hidden; ++j) {
          d_scale += linear(p, e, in, r, j, s.hidden) * d_out(r, j);
          for (moe::index_t h = 0; h < s.hidden; ++h)
            d_in(r, h) += scale * d_out(r, j) * moe::to_accumulate(p.w(e, h, j));
        }
      store(g.scale(e), d_scale);
      for (moe::index_t h = 0; h < s.hidden; ++h)
        for (moe::index_t j = 0; j < s.hidden; ++j) {
          double sum = 0;
          for (moe::index_t r = first; r < last; ++r) sum += in(r, h) * d_out(r, j);
          store(g.w(e, h, j), scale * sum);
        }
    }
  }

 private:
  /// (x · W_e)[r, j]
  template <class T>
  static double linear(params<T const> const& p, moe::index_t e, moe::matrix_view<double const> in,
                       moe::index_t r, moe::index_t j, moe::index_t hidden) {
    double sum = 0;
    for (moe::index_t h = 0; h < hidden; ++h) sum += in(r, h) * moe::to_accumulate(p.w(e, h, j));
    return sum;
  }
};
static_assert(moe::expert::trainable_expert<scaled_linear> &&
              moe::expert::describes_parameters<scaled_linear>);

// Top-1 routing, the weight renormalised to exactly 1, so that y_t = s_e · (x_t · W_e).
using layer_t =
    moe::layer<moe::gating::top_k<1>, moe::layout::capacity, moe::comm::single_rank, scaled_linear>;

int run() {
  // T = 4 tokens, H = 2, E = 2. `ffn` is not used by this expert (it must still be ≥ 1).
  moe::layer_args const args{.gate = {.tokens = 4,
                                      .experts = 2,
                                      .capacity_factor = 2.0,  // C = ⌊2 · ⌈4/2⌉⌋ = 4: no drops
                                      .normalize = moe::gating::renormalize::before_drops},
                             .hidden = 2,
                             .ffn = 1};
  layer_t const layer(args);  // rejected arguments throw moe::invalid_argument (see main)

  // Its parameters and their gradients, laid out from the layer (parameter_shapes).
  moe::host_parameters<layer_t, float> params(layer);
  auto set = [&](std::size_t tensor, std::initializer_list<float> values) {
    std::copy(values.begin(), values.end(), params.values(tensor).begin());
  };
  // Gate weight (hidden, experts) = [[1, −1], [0, 0]]: logits (x0, −x0), so a token with
  // x0 > 0 goes to expert 0 and one with x0 < 0 to expert 1.
  set(0, {1, -1, 0, 0});
  // W_0 = [[1, 2], [3, 4]], s_0 = 0.5;  W_1 = [[0, 1], [1, 0]] (a swap), s_1 = 2.
  set(1, {1, 2, 3, 4, 0, 1, 1, 0});
  set(2, {0.5f, 2.0f});
  float& gain_1 = params.values(2)[1];
  std::array<float, 8> const x{1, 2, -1, 3, 2, -1, -3, 0.5f};
  // By hand:  (1, 2) · W_0 = (7, 10),   · 0.5 = (3.5, 5)
  //          (−1, 3) · W_1 = (3, −1),   · 2   = (6, −2)
  //          (2, −1) · W_0 = (−1, 0),   · 0.5 = (−0.5, 0)
  //         (−3, 0.5) · W_1 = (0.5, −3), · 2  = (1, −6)
  std::array<float, 8> const expected{3.5f, 5, 6, -2, -0.5f, 0, 1, -6};

  auto matrix = [&](auto* data) { return moe::make_view(data, args.gate.tokens, args.hidden); };
  auto const p = params.params();
  moe::host_buffer ws(layer.workspace_bytes(moe::host));
  std::array<float, 8> y{};
  if (auto const s =
          layer.can_implement(moe::host, matrix(x.data()), p, matrix(y.data()), ws.view());
      !s) {
    std::fprintf(stderr, "cannot run the layer: %s\n", s.to_string().c_str());
    return EXIT_FAILURE;
  }
  layer.forward(moe::host, matrix(x.data()), p, matrix(y.data()), ws.view());

  int failures = 0;
  for (std::size_t i = 0; i < y.size(); ++i)
    if (std::abs(y[i] - expected[i]) > 1e-6f * (1 + std::abs(expected[i]))) {
      std::fprintf(stderr, "y[%zu] = %g, expected %g\n", i, double(y[i]), double(expected[i]));
      ++failures;
    }
  std::printf("y = s_e · (x · W_e) through the layer:");
  for (float v : y) std::printf(" %g", double(v));
  std::printf("\n");

  // Backward of L = Σ y (dy = 1) into gradients the caller owns, and the gain of expert 1
  // against a central difference of L.
  std::array<float, 8> const dy{1, 1, 1, 1, 1, 1, 1, 1};
  std::array<float, 8> dx{};
  layer.backward(moe::host, matrix(dy.data()), p, matrix(dx.data()), params.gradients(), ws.view());
  float const d_gain_1 = params.gradients(2)[1];
  auto loss = [&] {
    layer.forward(moe::host, matrix(x.data()), p, matrix(y.data()), ws.view());
    double sum = 0;
    for (float v : y) sum += v;
    return sum;
  };
  float const saved = gain_1, h = 1e-2f;  // L is linear in s_1: the difference is exact
  gain_1 = saved + h;
  double const up = loss();
  gain_1 = saved - h;
  double const down = loss();
  gain_1 = saved;
  double const numeric = (up - down) / (2.0 * h);
  // By hand: dL/ds_1 = Σ over expert 1's tokens of Σ_j (x · W_1)_j = (3 − 1) + (0.5 − 3) = −0.5.
  std::printf("dL/ds_1 = %g (finite difference %g, by hand -0.5)\n", double(d_gain_1), numeric);
  if (std::abs(d_gain_1 - (-0.5f)) > 1e-6f || std::abs(numeric - (-0.5)) > 1e-4) {
    std::fprintf(stderr, "the gradient of s_1 is wrong\n");
    ++failures;
  }
  if (failures > 0) return EXIT_FAILURE;
  std::printf("custom expert: OK\n");
  return EXIT_SUCCESS;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (moe::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return EXIT_FAILURE;
  }
}
