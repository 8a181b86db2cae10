// SPDX-License-Identifier: Apache-2.0
// Finite-difference checks, in double precision, of the host backend's backward: the
// gradient of every parameter and of x, through experts, combine weights, renormalisation,
// the softmax, the aux loss and the z-loss, with tokens dropped (capacity layout) and with
// none dropped and padded rows (ragged layout).

#include "../support/finite_differences.hpp"
#include "../support/parameters.hpp"

#include <doctest/doctest.h>

#include <moe/moe.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace {

using namespace moe;

/// Backward of a layer of `Expert`s against central differences of its objective ⟨dy, y⟩ +
/// the layer's weighted losses, for every parameter and x.
template <class Expert, class Gate = gating::top_k<2>, class Layout = layout::capacity>
void check_gradients(layer_args const& args, bool biases) {
  using layer_t = layer<Gate, Layout, comm::single_rank, Expert>;
  layer_t const layer(args);
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);

  index_t const tokens = args.gate.tokens, hidden = args.hidden;
  host_parameters<layer_t, double> w(layer, {.biases = biases});
  test::randomize(w, rng, 0.8);
  test::host_tensor<double> x(tokens * hidden), dy(tokens * hidden), y(tokens * hidden),
      dx(tokens * hidden);
  x.randomize(rng, 1.0);
  dy.randomize(rng, 1.0);
  test::poison_gradients(w);
  dx.poison();
  y.poison();

  host_buffer ws(layer.workspace_bytes(host));
  auto const p = w.params();
  auto objective = [&] {
    layer.forward(host, x.cview(tokens, hidden), p, y.view(tokens, hidden), ws.view());
    double sum = 0;
    for (std::size_t i = 0; i < y.data.size(); ++i) sum += dy.data[i] * y.data[i];
    return sum + layer.stats(host, ws.view()).loss;
  };
  (void)objective();
  for (double v : y.data) CHECK(std::isfinite(v));
  layer.backward(host, dy.cview(tokens, hidden), p, dx.view(tokens, hidden), w.gradients(),
                 ws.view());
  auto const dropped = layer.stats(host, ws.view()).dropped;
  if (!Layout::drops_tokens) CHECK(dropped == 0);

  std::vector<span<double>> values, gradients;
  std::vector<std::string> names;
  for (std::size_t i = 0; i < w.shapes().size(); ++i) {
    values.push_back(w.values(i));
    gradients.push_back(w.gradients(i));
    names.push_back("d_" + w.shapes()[i].name);
  }
  values.push_back(x.flat());
  gradients.push_back(dx.flat());
  names.emplace_back("dx");
  test::check_gradients(objective, values, gradients, names);
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

TEST_CASE("a layer of GLU experts on the host: backward matches finite differences") {
  layer_args const args{.gate = {.tokens = 10,
                                 .experts = 4,
                                 .capacity_factor = 0.5f,
                                 .aux_loss_coef = 0.2f,
                                 .z_loss_coef = 0.1f},
                        .hidden = 4,
                        .ffn = 3};
  SUBCASE("swiglu, capacity with drops, biases") {
    check_gradients<expert::glu<act::silu>>(args, true);
  }
  SUBCASE("geglu, capacity, no biases") {
    check_gradients<expert::glu<act::gelu>>(args, false);
  }
  SUBCASE("swiglu, ragged, rows padded to 4") {
    auto padded = args;
    padded.expert_row_alignment = 4;
    check_gradients<expert::glu<act::silu>, gating::top_k<2>, layout::ragged>(padded, true);
  }
}
