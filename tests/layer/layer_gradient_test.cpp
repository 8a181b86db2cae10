// SPDX-License-Identifier: Apache-2.0
// Finite-difference checks, in double precision, of the host backend's backward: the
// gradient of every parameter and of x, through experts, combine weights, renormalisation,
// the softmax, the aux loss and the z-loss, with tokens dropped (capacity layout) and with
// none dropped and padded rows (ragged layout).

#include "../support/ffn_layer.hpp"

#include <doctest/doctest.h>

#include <moe/moe.hpp>

#include <algorithm>
#include <cmath>

namespace {

using namespace moe;

/// The objective whose gradient backward computes: ⟨dy, y⟩ + the layer's weighted losses.
template <class Layer>
double objective(Layer const& layer, matrix_view<double const> x,
                 typename Layer::template params<double> const& p, matrix_view<double const> dy,
                 test::host_tensor<double>& y, workspace ws) {
  auto const tokens = x.extent(0), hidden = x.extent(1);
  layer.forward(host, x, p, y.view(tokens, hidden), ws);
  double sum = 0;
  for (index_t t = 0; t < tokens; ++t)
    for (index_t h = 0; h < hidden; ++h) sum += dy(t, h) * y.data[t * hidden + h];
  return sum + layer.stats(host, ws).loss;
}

/// Central differences of `objective` against the analytic gradient, element by element.
void expect_close(double analytic, double numeric, char const* what, std::size_t i) {
  double const scale = std::max({1.0, std::abs(analytic), std::abs(numeric)});
  INFO(what << "[" << i << "]: analytic " << analytic << ", numeric " << numeric);
  CHECK(std::abs(analytic - numeric) <= 1e-6 * scale);
}

template <class Expert, class Gate = gating::top_k<2>, class Layout = layout::capacity>
void check_gradients(layer_args const& args, bool biases) {
  using layer_t = layer<Gate, Layout, comm::single_rank, Expert>;
  layer_t const layer(args);
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);

  index_t const tokens = args.gate.tokens, hidden = args.hidden;
  test::ffn_layer_storage<double> params(args, biases), grads(args, biases);
  params.randomize(rng, 0.8);
  test::host_tensor<double> x(tokens * hidden), dy(tokens * hidden), y(tokens * hidden),
      dx(tokens * hidden);
  x.randomize(rng, 1.0);
  dy.randomize(rng, 1.0);
  for (auto* g : grads.all()) g->poison();
  dx.poison();

  host_buffer ws(layer.workspace_bytes(host));
  auto const p = params.template params<Expert>();
  (void)objective(layer, x.cview(tokens, hidden), p, dy.cview(tokens, hidden), y, ws.view());
  layer.backward(host, dy.cview(tokens, hidden), p, dx.view(tokens, hidden),
                 grads.template gradients<Expert>(), ws.view());
  auto const dropped = layer.stats(host, ws.view()).dropped;
  if (!Layout::drops_tokens) CHECK(dropped == 0);

  double const eps = 1e-6;
  auto numeric = [&](double& v) {
    double const saved = v;
    v = saved + eps;
    double const up =
        objective(layer, x.cview(tokens, hidden), p, dy.cview(tokens, hidden), y, ws.view());
    v = saved - eps;
    double const down =
        objective(layer, x.cview(tokens, hidden), p, dy.cview(tokens, hidden), y, ws.view());
    v = saved;
    return (up - down) / (2 * eps);
  };

  char const* names[] = {"d_gate_weight", "d_w1", "d_b1", "d_w2", "d_b2"};
  auto const all_params = params.all();
  auto const all_grads = grads.all();
  for (std::size_t n = 0; n < all_params.size(); ++n)
    for (std::size_t i = 0; i < all_params[n]->data.size(); ++i)
      expect_close(all_grads[n]->data[i], numeric(all_params[n]->data[i]), names[n], i);
  for (std::size_t i = 0; i < x.data.size(); ++i)
    expect_close(dx.data[i], numeric(x.data[i]), "dx", i);
  // The routing of the last evaluation is that of the analytic pass: the check did not
  // cross a selection boundary, and the case did drop tokens where it meant to.
  CHECK(layer.stats(host, ws.view()).dropped == dropped);
}

}  // namespace

TEST_CASE("layer backward matches finite differences: every activation, with drops") {
  // T = 12, E = 4, k = 2, f = 1: C = 2·⌊1·3⌋ = 6 of 24 assignments over 4 experts: with
  // random routing some expert almost surely overflows.
  layer_args const args{.gate = {.tokens = 12,
                                 .experts = 4,
                                 .capacity_factor = 0.5f,
                                 .aux_loss_coef = 0.3f,
                                 .z_loss_coef = 0.2f},
                        .hidden = 5,
                        .ffn = 7};
  SUBCASE("relu") {
    check_gradients<expert::ffn<act::relu>>(args, true);
  }
  SUBCASE("gelu") {
    check_gradients<expert::ffn<act::gelu>>(args, true);
  }
  SUBCASE("silu") {
    check_gradients<expert::ffn<act::silu>>(args, false);
  }
  // The same factor means nothing to the ragged layout: it keeps all 24 assignments.
  SUBCASE("ragged, gelu") {
    check_gradients<expert::ffn<act::gelu>, gating::top_k<2>, layout::ragged>(args, true);
  }
  SUBCASE("ragged, relu, rows padded to 8") {
    auto padded = args;
    padded.expert_row_alignment = 8;
    check_gradients<expert::ffn<act::relu>, gating::top_k<2>, layout::ragged>(padded, true);
  }
}

TEST_CASE("layer backward matches finite differences: renormalisation and top_any") {
  layer_args args{.gate = {.tokens = 10,
                           .experts = 5,
                           .k = 3,
                           .capacity_factor = 0.7f,
                           .aux_loss_coef = 0.1f,
                           .z_loss_coef = 0.05f},
                  .hidden = 4,
                  .ffn = 6};
  using any = gating::top_any<>;
  SUBCASE("before drops") {
    args.gate.normalize = gating::renormalize::before_drops;
    check_gradients<expert::ffn<act::gelu>, any>(args, true);
  }
  SUBCASE("after drops") {
    args.gate.normalize = gating::renormalize::after_drops;
    check_gradients<expert::ffn<act::silu>, any>(args, true);
  }
  SUBCASE("dynamic capacity, aligned") {
    args.gate.capacity_factor = 0;
    args.gate.capacity_alignment = 4;
    check_gradients<expert::ffn<act::gelu>, any>(args, true);
  }
  SUBCASE("k = 1") {
    args.gate.k = 1;
    check_gradients<expert::ffn<act::gelu>, any>(args, false);
  }
  SUBCASE("ragged, after drops (none), rows padded to 4") {
    args.gate.normalize = gating::renormalize::after_drops;
    args.expert_row_alignment = 4;
    check_gradients<expert::ffn<act::silu>, any, layout::ragged>(args, true);
  }
  SUBCASE("ragged, k = 1") {
    args.gate.k = 1;
    check_gradients<expert::ffn<act::gelu>, any, layout::ragged>(args, false);
  }
}
