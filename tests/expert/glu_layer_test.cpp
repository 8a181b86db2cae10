// SPDX-License-Identifier: Apache-2.0
// moe::layer is generic over the expert concept: the GLU expert runs in it on the host in
// float (its gradients through the layer are checked in tests/layer/layer_gradient_test.cpp).

#include "../support/parameters.hpp"

#include <doctest/doctest.h>

#include <moe/moe.hpp>

#include <algorithm>
#include <cmath>

using namespace moe;

TEST_CASE("a layer of GLU experts runs in float on the host") {
  using layer_t = layer<gating::top_k<2>, layout::capacity, comm::single_rank, expert::swiglu>;
  layer_args const args{
      .gate = {.tokens = 16, .experts = 4, .capacity_factor = 2}, .hidden = 8, .ffn = 6};
  layer_t const layer(args);
  std::mt19937_64 rng(test::fresh_seed());
  index_t const t = args.gate.tokens, h = args.hidden;
  host_parameters<layer_t, float> w(layer);  // W_gate, W13 and W2; no biases
  test::randomize(w, rng, 0.5);
  test::host_tensor<float> x(t * h), y(t * h);
  x.randomize(rng, 0.5);
  y.poison();
  host_buffer ws(layer.workspace_bytes(host));
  layer.forward(host, x.cview(t, h), w.params(), y.view(t, h), ws.view());
  CHECK(layer.stats(host, ws.view()).dropped == 0);
  for (float v : y.data) CHECK(std::isfinite(v));
  CHECK(std::any_of(y.data.begin(), y.data.end(), [](float v) { return v != 0; }));
}
