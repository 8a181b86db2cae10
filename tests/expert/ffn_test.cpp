// SPDX-License-Identifier: Apache-2.0
// Hand-computed forward and backward of the FFN expert on the host, and its activations.

#include "../support/expect.hpp"
#include "two_layer_support.hpp"

#include <doctest/doctest.h>

#include <moe/expert.hpp>

#include <array>
#include <cmath>
#include <string>

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
  // x = 2 in row 0; row 1 (x = 9) is outside the expert's segment: ignored.
  auto const r = test::run_by_hand<expert::ffn<act::relu>>({.ffn = 2,
                                                            .w1 = {1, -1},
                                                            .b1 = {0.5, 0.5},
                                                            .w2 = {3, 4},
                                                            .b2 = {1},
                                                            .in = {2, 9},
                                                            .d_out = {1, 7}});
  // pre = (2·1 + 0.5, 2·(−1) + 0.5) = (2.5, −1.5); relu → (2.5, 0); out = 2.5·3 + 0·4 + 1.
  CHECK(r.out[0] == Approx(8.5));
  CHECK(r.out[1] == 0);
  // d_pre = (3·1, 4·1·relu'(−1.5)) = (3, 0); dW2 = act = (2.5, 0); db2 = 1;
  // dW1 = x · d_pre = (6, 0); db1 = (3, 0); d_in = d_pre · W1ᵀ = 3.
  CHECK(r.w2 == std::vector<double>{2.5, 0});
  CHECK(r.b2[0] == 1);
  CHECK(r.w1 == std::vector<double>{6, 0});
  CHECK(r.b1 == std::vector<double>{3, 0});
  CHECK(r.d_in == std::vector<double>{3, 0});
}

TEST_CASE("an expert that received no row gets zero gradients, not garbage") {
  using ffn = expert::ffn<act::gelu>;
  expert::expert_shape const shape{.experts = 2, .hidden = 3, .ffn = 4};
  std::mt19937_64 rng(test::fresh_seed());
  test::host_tensor<double> w1(24), b1(8), w2(24), b2(6), in(4 * 3), d_out(4 * 3);
  for (auto* t : {&w1, &b1, &w2, &b2, &in, &d_out}) t->randomize(rng);
  test::host_tensor<double> dw1(24), db1(8), dw2(24), db2(6), d_in(12), out(12);
  for (auto* t : {&dw1, &db1, &dw2, &db2, &d_in, &out}) t->poison();
  expert::ffn_params<double const> const p{w1.cview(2, 3, 4), b1.cview(2, 4), w2.cview(2, 4, 3),
                                           b2.cview(2, 3)};
  expert::ffn_params<double> const g{dw1.view(2, 3, 4), db1.view(2, 4), dw2.view(2, 4, 3),
                                     db2.view(2, 3)};
  test::owned_host_state<ffn> const host_state(shape, 4);
  auto const& state = host_state.state;
  // The capacity layout's batch with C = 2: expert 0 holds rows [0, 2), expert 1 received
  // nothing (its rows [2, 4) are no expert's).
  std::array<std::int64_t, 2> const begin{0, 2}, rows{2, 0};
  expert::row_segments const segments{begin, rows};
  ffn::forward(host, shape, p, segments, in.cview(4, 3), out.view(4, 3), state);
  ffn::backward(host, shape, p, segments, in.cview(4, 3), d_out.cview(4, 3), d_in.view(4, 3), g,
                state);
  for (index_t i = 12; i < 24; ++i) CHECK(dw1.data[i] == 0);
  for (index_t i = 12; i < 24; ++i) CHECK(dw2.data[i] == 0);
  for (index_t i = 4; i < 8; ++i) CHECK(db1.data[i] == 0);
  for (index_t i = 3; i < 6; ++i) CHECK(db2.data[i] == 0);
  for (index_t i = 6; i < 12; ++i) CHECK(out.data[i] == 0);
  for (index_t i = 6; i < 12; ++i) CHECK(d_in.data[i] == 0);
  for (index_t i = 0; i < 12; ++i) CHECK(std::isfinite(dw1.data[i]));
  CHECK(dw1.data[0] != 0);
}

TEST_CASE("ffn over a batch with gaps: each expert's segment, padding rows zero") {
  // The same rows, laid out twice: packed, expert 0 in rows [0, 2) and expert 1 in [2, 3) of
  // 3; and with padding, expert 0 in [0, 2) and expert 1 in [4, 5) of 6 (the ragged layout
  // at alignment 4, say). Each row's result, and every gradient, must be the same bit for
  // bit (the sums run over the same rows in the same order); padding rows are zero in `out`
  // and `d_in` even where `in` and `d_out` hold values there.
  using ffn = expert::ffn<act::silu>;
  expert::expert_shape const shape{.experts = 2, .hidden = 3, .ffn = 5};
  std::mt19937_64 rng(test::fresh_seed());
  test::host_tensor<double> w1(30), b1(10), w2(30), b2(6);
  for (auto* t : {&w1, &b1, &w2, &b2}) t->randomize(rng);
  expert::ffn_params<double const> const p{w1.cview(2, 3, 5), b1.cview(2, 5), w2.cview(2, 5, 3),
                                           b2.cview(2, 3)};

  struct run {
    test::host_tensor<double> in, d_out, out, d_in, dw1{30}, db1{10}, dw2{30}, db2{6};
    explicit run(index_t rows) : in(rows * 3), d_out(rows * 3), out(rows * 3), d_in(rows * 3) {}
  };
  auto compute = [&](run& r, index_t rows, std::array<std::int64_t, 2> const& begin) {
    std::array<std::int64_t, 2> const counts{2, 1};
    expert::row_segments const segments{begin, counts};
    for (auto* t : {&r.out, &r.d_in, &r.dw1, &r.db1, &r.dw2, &r.db2}) t->poison();
    test::owned_host_state<ffn> const host_state(shape, rows);
    auto const& state = host_state.state;
    ffn::forward(host, shape, p, segments, r.in.cview(rows, 3), r.out.view(rows, 3), state);
    ffn::backward(host, shape, p, segments, r.in.cview(rows, 3), r.d_out.cview(rows, 3),
                  r.d_in.view(rows, 3),
                  expert::ffn_params<double>{r.dw1.view(2, 3, 5), r.db1.view(2, 5),
                                             r.dw2.view(2, 5, 3), r.db2.view(2, 3)},
                  state);
  };

  run packed(3), padded(6);
  packed.in.randomize(rng);
  packed.d_out.randomize(rng);
  padded.in.randomize(rng);  // padding rows keep these values: they must not leak
  padded.d_out.randomize(rng);
  index_t const padded_row_of[3] = {0, 1, 4};
  for (index_t row = 0; row < 3; ++row)
    for (index_t h = 0; h < 3; ++h) {
      padded.in.data[padded_row_of[row] * 3 + h] = packed.in.data[row * 3 + h];
      padded.d_out.data[padded_row_of[row] * 3 + h] = packed.d_out.data[row * 3 + h];
    }
  compute(packed, 3, {0, 2});
  compute(padded, 6, {0, 4});

  for (index_t row = 0; row < 3; ++row)
    for (index_t h = 0; h < 3; ++h) {
      CHECK(padded.out.data[padded_row_of[row] * 3 + h] == packed.out.data[row * 3 + h]);
      CHECK(padded.d_in.data[padded_row_of[row] * 3 + h] == packed.d_in.data[row * 3 + h]);
    }
  for (index_t row : {2, 3, 5})
    for (index_t h = 0; h < 3; ++h) {
      CHECK(padded.out.data[row * 3 + h] == 0);
      CHECK(padded.d_in.data[row * 3 + h] == 0);
    }
  CHECK(padded.dw1.data == packed.dw1.data);
  CHECK(padded.db1.data == packed.db1.data);
  CHECK(padded.dw2.data == packed.dw2.data);
  CHECK(padded.db2.data == packed.db2.data);
  for (double v : packed.out.data) CHECK(std::isfinite(v));
  for (double v : packed.dw1.data) CHECK(std::isfinite(v));
}

TEST_CASE("ffn rejects segments that overlap or leave the batch, writing nothing") {
  using ffn = expert::ffn<act::relu>;
  expert::expert_shape const shape{.experts = 2, .hidden = 1, .ffn = 1};
  std::array<double, 2> const w1{1, 2}, w2{3, 4};
  expert::ffn_params<double const> const p{
      make_view(w1.data(), 2, 1, 1), {}, make_view(w2.data(), 2, 1, 1), {}};
  test::owned_host_state<ffn> const host_state(shape, 4);
  auto const& state = host_state.state;
  std::array<double, 4> const in{1, 2, 3, 4};
  test::host_tensor<double> out(4);

  auto rejects = [&](std::array<std::int64_t, 2> begin, std::array<std::int64_t, 2> rows) {
    out.poison();
    CHECK_FALSE(expert::check_segments({begin, rows}, 2, 4, "segments").ok());
    CHECK_THROWS_AS(ffn::forward(host, shape, p, expert::row_segments{begin, rows},
                                 make_view(in.data(), 4, 1), out.view(4, 1), state),
                    moe::invalid_argument);
    CHECK(out.is_poisoned());
  };
  rejects({0, 1}, {2, 1});   // expert 1 starts inside expert 0
  rejects({2, 0}, {1, 1});   // out of expert order
  rejects({0, 3}, {2, 2});   // past the 4 rows of the batch
  rejects({0, 2}, {-1, 1});  // a negative count
  std::array<std::int64_t, 1> const one{0};
  CHECK_FALSE(expert::check_segments({one, one}, 2, 4, "segments").ok());  // wrong size
  std::array<std::int64_t, 2> const begin{0, 3}, rows{2, 1};               // a gap at row 2 is fine
  CHECK(expert::check_segments({begin, rows}, 2, 4, "segments").ok());
}

TEST_CASE("the host expert checks its parameters, gradients and state before any write") {
  using ffn = expert::ffn<act::relu>;
  expert::expert_shape const shape{.experts = 2, .hidden = 1, .ffn = 1};
  std::array<double, 2> const w1{1, 2}, w2{3, 4};
  std::array<double, 2> dw1{}, dw2{};
  expert::ffn_params<double const> const p{
      make_view(w1.data(), 2, 1, 1), {}, make_view(w2.data(), 2, 1, 1), {}};
  expert::ffn_params<double> const g{
      make_view(dw1.data(), 2, 1, 1), {}, make_view(dw2.data(), 2, 1, 1), {}};
  test::owned_host_state<ffn> const host_state(shape, 4);
  auto const& state = host_state.state;
  std::array<std::int64_t, 2> const begin{0, 2}, rows{2, 2};
  expert::row_segments const segments{begin, rows};
  std::array<double, 4> const in_data{1, 2, 3, 4}, d_out_data{1, 1, 1, 1};
  auto const in = make_view(in_data.data(), 4, 1);
  auto const d_out = make_view(d_out_data.data(), 4, 1);
  test::host_tensor<double> out(4), d_in(4);

  // Forward and backward each run can_implement first: the same verdict, nothing written.
  auto forward_rejects = [&](auto const& params, auto const& st, std::string const& argument) {
    out.poison();
    CHECK(ffn::can_implement(host, shape, params, segments, in, out.view(4, 1), st).argument() ==
          argument);
    CHECK(test::rejected_argument([&] {
            ffn::forward(host, shape, params, segments, in, out.view(4, 1), st);
          }) == argument);
    CHECK(out.is_poisoned());
  };
  auto backward_rejects = [&](auto const& grads, auto const& st, std::string const& argument) {
    d_in.poison();
    CHECK(ffn::can_implement(host, shape, p, segments, in, d_out, d_in.view(4, 1), grads, st)
              .argument() == argument);
    CHECK(test::rejected_argument([&] {
            ffn::backward(host, shape, p, segments, in, d_out, d_in.view(4, 1), grads, st);
          }) == argument);
    CHECK(d_in.is_poisoned());
  };
  CHECK(ffn::can_implement(host, shape, p, segments, in, out.view(4, 1), state).ok());
  CHECK(ffn::can_implement(host, shape, p, segments, in, d_out, d_in.view(4, 1), g, state).ok());

  auto bad_p = p;
  bad_p.w2 = make_view(w2.data(), 1, 2, 1);  // (ffn, experts) swapped
  forward_rejects(bad_p, state, "params.w2");
  auto bad_g = g;
  bad_g.w1 = make_view(dw1.data(), 2, 1, 0);
  backward_rejects(bad_g, state, "gradients.w1");
  auto short_state = state;
  short_state.pre_activation = make_view(state.pre_activation.data_handle(), 3, 1);
  forward_rejects(p, short_state, "state.pre_activation");
  auto no_scratch = state;
  no_scratch.d_pre_activation = {};
  backward_rejects(g, no_scratch, "state.d_pre_activation");
}
