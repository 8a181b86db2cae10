// SPDX-License-Identifier: Apache-2.0
// The gating knobs through a whole layer: layer_args maps onto gate_args (evaluation factor,
// local groups, scaling, bias, noise), the workspace is sized by the gate's own capacity rule,
// presets run forward and backward, and the gradients match finite differences.

#include "../support/finite_differences.hpp"
#include "../support/parameters.hpp"

#include <doctest/doctest.h>

#include <moe/moe.hpp>

#include <algorithm>
#include <array>
#include <cmath>

using namespace moe;

namespace {

template <class Gate, class Layout>
using relu_layer = layer<Gate, Layout, comm::single_rank, expert::ffn<act::relu>>;

/// Forward, stats and a finite-difference check of backward for `Layer` at `args`.
template <class Layer>
layer_stats check_layer(layer_args const& args, std::uint64_t seed) {
  Layer const layer(args);
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  index_t const T = args.gate.tokens, H = args.hidden;
  host_parameters<Layer, double> w(layer, {.biases = true});
  test::randomize(w, rng, 0.8);
  test::host_tensor<double> x(T * H), dy(T * H), y(T * H), dx(T * H);
  x.randomize(rng, 1.0);
  dy.randomize(rng, 1.0);
  host_buffer ws(layer.workspace_bytes(host));
  auto const p = w.params();
  auto const objective = [&] {
    layer.forward(host, x.cview(T, H), p, y.view(T, H), ws.view());
    double sum = 0;
    for (std::size_t i = 0; i < y.data.size(); ++i) sum += dy.data[i] * y.data[i];
    return sum + layer.stats(host, ws.view()).loss;
  };
  (void)objective();
  layer_stats const stats = layer.stats(host, ws.view());
  std::vector<std::int64_t> const load(stats.load.begin(), stats.load.end());
  layer.backward(host, dy.cview(T, H), p, dx.view(T, H), w.gradients(), ws.view());
  int checked = 0;
  auto const numeric = [&](double& v, double analytic) {
    double const n = test::central_difference(objective, v);
    auto const now = layer.stats(host, ws.view());
    if (!std::equal(load.begin(), load.end(), now.load.begin()) || now.dropped != stats.dropped)
      return;  // crossed a routing boundary
    ++checked;
    test::expect_derivative(analytic, n);
  };
  // The gate weight whole and every third element of W1 (tensors 0 and 1).
  for (std::size_t i = 0; i < w.values(0).size(); ++i) numeric(w.values(0)[i], w.gradients(0)[i]);
  for (std::size_t i = 0; i < w.values(1).size(); i += 3)
    numeric(w.values(1)[i], w.gradients(1)[i]);
  for (std::size_t i = 0; i < x.data.size(); ++i) numeric(x.data[i], dx.data[i]);
  CHECK(checked > 0);
  return stats;
}

}  // namespace

TEST_CASE("layer: a dropless preset with the ragged layout, bias, scaling and groups") {
  std::array<float, 4> const bias{0.2f, -0.1f, 0.0f, 0.3f};
  layer_args const args{.gate = {.tokens = 8,
                                 .experts = 4,
                                 .capacity_factor = 0.25f,  // means nothing to a dropless gate
                                 .aux_loss_coef = 0.3f,
                                 .z_loss_coef = 0.1f,
                                 .groups = 2,
                                 .scaling_factor = 2.5f,
                                 .expert_bias = bias},
                        .hidden = 4,
                        .ffn = 5};
  auto const stats =
      check_layer<relu_layer<gating::preset::deepseek<2, 2, 1>, layout::ragged>>(args, 31);
  CHECK(stats.dropped == 0);
  auto const mixtral = check_layer<relu_layer<gating::preset::mixtral, layout::ragged>>(
      {.gate = {.tokens = 8, .experts = 4, .aux_loss_coef = 0.2f}, .hidden = 4, .ffn = 5}, 32);
  CHECK(mixtral.dropped == 0);
}

TEST_CASE("layer: GShard with local groups and random routing on the capacity layout") {
  // f = 0.5 with GShard's rule: C_g = ⌊4 · 0.5 / 4⌋ = 0 → 4, C = 2 · 4 = 8. Tutel's rule at
  // this factor would give 0 slots: the workspace must be sized by the gate's rule.
  layer_args const args{.gate = {.tokens = 8,
                                 .experts = 4,
                                 .capacity_factor = 0.5f,
                                 .aux_loss_coef = 0.3f,
                                 .groups = 2,
                                 .seed = 7},
                        .hidden = 4,
                        .ffn = 5};
  auto const stats = check_layer<relu_layer<gating::preset::gshard, layout::capacity>>(args, 33);
  CHECK(stats.capacity == 8);
  CHECK(stats.expert_rows == 4 * 8);
}

TEST_CASE("layer: training and evaluation capacity factors, and noise") {
  layer_args args{.gate = {.tokens = 12,
                           .experts = 4,
                           .capacity_factor = 0.5f,
                           .eval_capacity_factor = 2.0f,
                           .jitter = 0.1f,
                           .gate_noise = 1.0f,
                           .seed = 3},
                  .hidden = 4,
                  .ffn = 5};
  using layer_t = relu_layer<gating::preset::tutel, layout::capacity>;
  args.gate.k = 2;
  auto stats = check_layer<layer_t>(args, 34);
  CHECK(stats.capacity == 2 * 1);  // 2 · ⌊0.5 · ⌈12/4⌉⌋
  args.gate.training = false;
  stats = check_layer<layer_t>(args, 34);
  CHECK(stats.capacity == 2 * 6);  // 2 · ⌊2 · 3⌋
  CHECK(stats.dropped == 0);
  // A layer rejects the knobs the gate rejects, naming them.
  args.gate.groups = 5;
  CHECK(layer_t::can_implement(args).argument() == "groups");
  args.gate.groups = 1;
  args.gate.jitter = 1.5f;
  CHECK(layer_t::can_implement(args).argument() == "jitter");
}
