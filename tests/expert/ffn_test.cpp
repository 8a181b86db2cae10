// SPDX-License-Identifier: Apache-2.0
// Hand-computed forward and backward of the FFN expert on the host, and its activations.

#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <moe/expert.hpp>

#include <array>
#include <cmath>

using namespace moe;
using doctest::Approx;

TEST_CASE("activations and their derivatives") {
  CHECK(act::relu::forward(-1.0) == 0);
  CHECK(act::relu::forward(2.0) == 2);
  CHECK(act::relu::derivative(-1.0) == 0);
  CHECK(act::relu::derivative(2.0) == 1);
  CHECK(act::gelu::forward(1.0) == Approx(0.8413447460685429));  // Φ(1)
  CHECK(act::gelu::forward(0.0f) == 0.0f);
  CHECK(act::silu::forward(1.0) == Approx(1.0 / (1.0 + std::exp(-1.0))));
  for (double x : {-2.0, -0.3, 0.4, 1.7}) {
    double const h = 1e-6;
    CHECK(act::gelu::derivative(x) ==
          Approx((act::gelu::forward(x + h) - act::gelu::forward(x - h)) / (2 * h)).epsilon(1e-7));
    CHECK(act::silu::derivative(x) ==
          Approx((act::silu::forward(x + h) - act::silu::forward(x - h)) / (2 * h)).epsilon(1e-7));
  }
}

TEST_CASE("ffn forward and backward by hand: one expert, one used row of two") {
  using ffn = expert::ffn<act::relu>;
  expert::expert_shape const shape{.experts = 1, .hidden = 1, .ffn = 2};
  std::array<double, 2> const w1{1, -1}, b1{0.5, 0.5}, w2{3, 4}, b2{1};
  expert::ffn_params<double const> const p{
      make_view(w1.data(), 1, 1, 2), make_view(b1.data(), 1, 2), make_view(w2.data(), 1, 2, 1),
      make_view(b2.data(), 1, 1)};
  CHECK(ffn::check(p, shape, "p").ok());

  workspace_carver counter;
  (void)ffn::carve_host_state(counter, shape, 2, 2);
  host_buffer buffer(counter.bytes());
  workspace_carver carver(buffer.view());
  auto const state = ffn::carve_host_state(carver, shape, 2, 2);

  std::array<double, 2> in{2, 9};  // row 1 is beyond the expert's rows: ignored
  std::array<double, 2> out{-1, -1};
  std::array<std::int64_t, 1> const rows{1};
  ffn::forward(host, shape, p, rows, make_view(std::as_const(in).data(), 1, 2, 1),
               make_view(out.data(), 1, 2, 1), state);
  // pre = (2·1 + 0.5, 2·(−1) + 0.5) = (2.5, −1.5); relu → (2.5, 0); out = 2.5·3 + 0·4 + 1.
  CHECK(out[0] == Approx(8.5));
  CHECK(out[1] == 0);

  std::array<double, 2> const d_out{1, 7};
  std::array<double, 2> d_in{-1, -1}, dw1{-1, -1}, db1{-1, -1}, dw2{-1, -1};
  std::array<double, 1> db2{-1};
  expert::ffn_params<double> const g{make_view(dw1.data(), 1, 1, 2), make_view(db1.data(), 1, 2),
                                     make_view(dw2.data(), 1, 2, 1), make_view(db2.data(), 1, 1)};
  ffn::backward(host, shape, p, rows, make_view(std::as_const(in).data(), 1, 2, 1),
                make_view(d_out.data(), 1, 2, 1), make_view(d_in.data(), 1, 2, 1), g, state);
  // d_pre = (3·1, 4·1·relu'(−1.5)) = (3, 0); dW2 = act = (2.5, 0); db2 = 1;
  // dW1 = x · d_pre = (6, 0); db1 = (3, 0); d_in = d_pre · W1ᵀ = 3.
  CHECK(dw2 == std::array<double, 2>{2.5, 0});
  CHECK(db2[0] == 1);
  CHECK(dw1 == std::array<double, 2>{6, 0});
  CHECK(db1 == std::array<double, 2>{3, 0});
  CHECK(d_in == std::array<double, 2>{3, 0});
}

TEST_CASE("an expert that received no row gets zero gradients, not garbage") {
  using ffn = expert::ffn<act::gelu>;
  expert::expert_shape const shape{.experts = 2, .hidden = 3, .ffn = 4};
  std::mt19937_64 rng(test::fresh_seed());
  test::host_tensor<double> w1(24), b1(8), w2(24), b2(6), in(2 * 2 * 3), d_out(2 * 2 * 3);
  for (auto* t : {&w1, &b1, &w2, &b2, &in, &d_out}) t->randomize(rng);
  test::host_tensor<double> dw1(24), db1(8), dw2(24), db2(6), d_in(12), out(12);
  for (auto* t : {&dw1, &db1, &dw2, &db2, &d_in, &out}) t->poison();
  expert::ffn_params<double const> const p{w1.cview(2, 3, 4), b1.cview(2, 4), w2.cview(2, 4, 3),
                                           b2.cview(2, 3)};
  expert::ffn_params<double> const g{dw1.view(2, 3, 4), db1.view(2, 4), dw2.view(2, 4, 3),
                                     db2.view(2, 3)};
  workspace_carver counter;
  (void)ffn::carve_host_state(counter, shape, 2, 2);
  host_buffer buffer(counter.bytes());
  workspace_carver carver(buffer.view());
  auto const state = ffn::carve_host_state(carver, shape, 2, 2);
  std::array<std::int64_t, 2> const rows{2, 0};  // expert 1 received nothing
  ffn::forward(host, shape, p, rows, in.cview(2, 2, 3), out.view(2, 2, 3), state);
  ffn::backward(host, shape, p, rows, in.cview(2, 2, 3), d_out.cview(2, 2, 3), d_in.view(2, 2, 3),
                g, state);
  for (index_t i = 12; i < 24; ++i) CHECK(dw1.data[i] == 0);
  for (index_t i = 12; i < 24; ++i) CHECK(dw2.data[i] == 0);
  for (index_t i = 4; i < 8; ++i) CHECK(db1.data[i] == 0);
  for (index_t i = 3; i < 6; ++i) CHECK(db2.data[i] == 0);
  for (index_t i = 6; i < 12; ++i) CHECK(out.data[i] == 0);
  for (index_t i = 0; i < 12; ++i) CHECK(std::isfinite(dw1.data[i]));
  CHECK(dw1.data[0] != 0);
}
