// SPDX-License-Identifier: Apache-2.0
// moe::layer is generic over the expert concept: the GLU expert runs in it on the host with
// either layout, and the layer's backward through it matches finite differences of every
// parameter (gate, W13, b13, W2, b2) and of x, with tokens dropped and with padded rows.

#include "two_layer_support.hpp"

#include <doctest/doctest.h>

#include <moe/moe.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using namespace moe;

/// Owned parameters (or gradients) of a layer with GLU experts.
struct glu_layer_storage {
  index_t hidden, ffn, experts;
  bool biases;
  test::host_tensor<double> gate_weight{hidden * experts};
  test::host_tensor<double> w13{experts * hidden * 2 * ffn};
  test::host_tensor<double> b13{biases ? experts * 2 * ffn : 0};
  test::host_tensor<double> w2{experts * ffn * hidden};
  test::host_tensor<double> b2{biases ? experts * hidden : 0};

  glu_layer_storage(layer_args const& a, bool with_biases)
      : hidden(a.hidden), ffn(a.ffn), experts(a.gate.experts), biases(with_biases) {}

  template <class Expert, class U>
  layer_params<U, Expert> views() {
    auto bias = [&](test::host_tensor<double>& b, index_t width) {
      return biases ? make_view(static_cast<U*>(b.data.data()), experts, width) : matrix_view<U>{};
    };
    return {
        make_view(static_cast<U*>(gate_weight.data.data()), hidden, experts),
        {make_view(static_cast<U*>(w13.data.data()), experts, hidden, 2 * ffn), bias(b13, 2 * ffn),
         make_view(static_cast<U*>(w2.data.data()), experts, ffn, hidden), bias(b2, hidden)}};
  }
  std::vector<test::host_tensor<double>*> all() { return {&gate_weight, &w13, &b13, &w2, &b2}; }
};

template <class Expert, class Layout>
void check_layer_gradients(layer_args const& args, bool biases) {
  using layer_t = layer<gating::top_k<2>, Layout, comm::single_rank, Expert>;
  layer_t const layer(args);
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);

  index_t const tokens = args.gate.tokens, hidden = args.hidden;
  glu_layer_storage params(args, biases), grads(args, biases);
  for (auto* t : params.all()) t->randomize(rng, 0.8);
  for (auto* t : grads.all()) t->poison();
  test::host_tensor<double> x(tokens * hidden), dy(tokens * hidden), y(tokens * hidden),
      dx(tokens * hidden);
  x.randomize(rng);
  dy.randomize(rng);
  dx.poison();
  y.poison();

  host_buffer ws(layer.workspace_bytes(host));
  auto const p = params.views<Expert, double const>();
  auto objective = [&] {
    layer.forward(host, x.cview(tokens, hidden), p, y.view(tokens, hidden), ws.view());
    double sum = 0;
    for (std::size_t i = 0; i < y.data.size(); ++i) sum += dy.data[i] * y.data[i];
    return sum + layer.stats(host, ws.view()).loss;
  };
  (void)objective();
  for (double v : y.data) CHECK(std::isfinite(v));
  layer.backward(host, dy.cview(tokens, hidden), p, dx.view(tokens, hidden),
                 grads.views<Expert, double>(), ws.view());
  auto const dropped = layer.stats(host, ws.view()).dropped;
  if (!Layout::drops_tokens) CHECK(dropped == 0);

  auto values = params.all(), gradients = grads.all();
  values.push_back(&x);
  gradients.push_back(&dx);
  test::check_gradients(objective, values, gradients,
                        {"d_gate_weight", "d_w13", "d_b13", "d_w2", "d_b2", "dx"});
  CHECK(layer.stats(host, ws.view()).dropped == dropped);  // no selection boundary crossed
}

}  // namespace

TEST_CASE("a layer of GLU experts on the host: backward matches finite differences") {
  layer_args const args{.gate = {.tokens = 10,
                                 .experts = 4,
                                 .capacity_factor = 0.5f,
                                 .aux_loss_coef = 0.2f,
                                 .z_loss_coef = 0.1f},
                        .hidden = 4,
                        .ffn = 3};
  SUBCASE("swiglu, capacity with drops, biases") {
    check_layer_gradients<expert::glu<act::silu>, layout::capacity>(args, true);
  }
  SUBCASE("geglu, capacity, no biases") {
    check_layer_gradients<expert::glu<act::gelu>, layout::capacity>(args, false);
  }
  SUBCASE("swiglu, ragged, rows padded to 4") {
    auto padded = args;
    padded.expert_row_alignment = 4;
    check_layer_gradients<expert::glu<act::silu>, layout::ragged>(padded, true);
  }
}

TEST_CASE("a layer of GLU experts runs in float on the host") {
  using layer_t = layer<gating::top_k<2>, layout::capacity, comm::single_rank, expert::swiglu>;
  layer_args const args{
      .gate = {.tokens = 16, .experts = 4, .capacity_factor = 2}, .hidden = 8, .ffn = 6};
  layer_t const layer(args);
  std::mt19937_64 rng(test::fresh_seed());
  index_t const t = args.gate.tokens, h = args.hidden, f = args.ffn, e = args.gate.experts;
  test::host_tensor<float> gate(h * e), w13(e * h * 2 * f), w2(e * f * h), x(t * h), y(t * h);
  for (auto* v : {&gate, &w13, &w2, &x}) v->randomize(rng, 0.5);
  y.poison();
  layer_t::params<float> const p{gate.cview(h, e),
                                 {w13.cview(e, h, 2 * f), {}, w2.cview(e, f, h), {}}};
  host_buffer ws(layer.workspace_bytes(host));
  layer.forward(host, x.cview(t, h), p, y.view(t, h), ws.view());
  CHECK(layer.stats(host, ws.view()).dropped == 0);
  for (float v : y.data) CHECK(std::isfinite(v));
  CHECK(std::any_of(y.data.begin(), y.data.end(), [](float v) { return v != 0; }));
}
