// SPDX-License-Identifier: Apache-2.0
// The GLU expert on the host: a hand-computed forward and backward that pins the [gate | up]
// layout of W13, finite-difference checks of every gradient of both two-GEMM experts over a
// batch with padding rows and an expert with no rows, and the concept checks.

#include "two_layer_support.hpp"

#include <doctest/doctest.h>

#include <moe/expert.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

using namespace moe;
using doctest::Approx;

namespace {

/// A near miss: an expert without a backward runs in a layer but cannot be trained.
struct forward_only_expert {
  using moe_concept = expert::expert_tag;
  template <class T>
  using params = expert::ffn_params<T>;
  using host_state = expert::ffn<act::relu>::host_state;
  template <class T>
  static status check(params<T> const& p, expert::expert_shape const& s, char const* name) {
    return expert::ffn<act::relu>::check(p, s, name);
  }
  static host_state carve_host_state(workspace_carver& c, expert::expert_shape const& s,
                                     index_t max_rows, index_t rows) {
    return expert::ffn<act::relu>::carve_host_state(c, s, max_rows, rows);
  }
  template <class T>
  static void forward(host_backend, expert::expert_shape const& s, params<T const> const& p,
                      expert::row_segments const& segments, matrix_view<double const> in,
                      matrix_view<double> out, host_state const& state) {
    expert::ffn<act::relu>::forward(host, s, p, segments, in, out, state);
  }
};

/// A near miss: everything but the tag.
struct untagged_glu : expert::glu<act::silu> {
  using moe_concept = void;
};

}  // namespace

static_assert(expert::trainable_expert<expert::glu<act::silu>>);
static_assert(expert::trainable_expert<expert::swiglu> && expert::trainable_expert<expert::geglu>);
static_assert(expert::expert<forward_only_expert> &&
              !expert::trainable_expert<forward_only_expert>);
static_assert(!expert::expert<untagged_glu>);
static_assert(expert::cuda_expert<expert::glu<act::silu>, __nv_bfloat16>);
static_assert(!expert::cuda_expert<forward_only_expert, float>);

namespace {

/// Central differences of ⟨d_out, out⟩ against X's backward, for every parameter and input,
/// on a batch of 11 rows: expert 0 rows [1, 4), expert 1 none, expert 2 rows [5, 9); rows
/// 0, 4, 9 and 10 are no expert's and hold values that must not leak.
template <class X>
void check_expert_gradients(bool biases) {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  expert::expert_shape const shape{.experts = 3, .hidden = 4, .ffn = 3};
  index_t const rows = 11, h = shape.hidden;
  std::array<std::int64_t, 3> const begin{1, 4, 5}, counts{3, 0, 4};
  expert::row_segments const segments{begin, counts};

  index_t const w = X::first_width(shape);
  test::two_layer_tensors<double> params{shape, w, biases}, grads{shape, w, biases};
  for (auto* t : params.all()) t->randomize(rng, 0.8);
  for (auto* t : grads.all()) t->poison();
  test::host_tensor<double> in(rows * h), d_out(rows * h), out(rows * h), d_in(rows * h);
  in.randomize(rng);
  d_out.randomize(rng);
  d_in.poison();

  test::owned_host_state<X> const host_state(shape, rows);
  auto const& state = host_state.state;
  auto const p = params.views<X, double const>();

  auto objective = [&] {
    X::forward(host, shape, p, segments, in.cview(rows, h), out.view(rows, h), state);
    double sum = 0;
    for (std::size_t i = 0; i < out.data.size(); ++i) sum += d_out.data[i] * out.data[i];
    return sum;
  };
  out.poison();
  (void)objective();
  for (index_t row : {0, 4, 9, 10})
    for (index_t c = 0; c < h; ++c) CHECK(out.data[row * h + c] == 0);
  X::backward(host, shape, p, segments, in.cview(rows, h), d_out.cview(rows, h), d_in.view(rows, h),
              grads.views<X, double>(), state);

  test::check_gradients(
      objective,
      {params.w1.flat(), params.b1.flat(), params.w2.flat(), params.b2.flat(), in.flat()},
      {grads.w1.flat(), grads.b1.flat(), grads.w2.flat(), grads.b2.flat(), d_in.flat()},
      {"d_w1", "d_b1", "d_w2", "d_b2", "d_in"});

  // Expert 1 received nothing: its gradients are zero, exactly.
  for (index_t i = h * w; i < 2 * h * w; ++i) CHECK(grads.w1.data[i] == 0);
  for (index_t i = shape.ffn * h; i < 2 * shape.ffn * h; ++i) CHECK(grads.w2.data[i] == 0);
  if (biases) {
    for (index_t i = w; i < 2 * w; ++i) CHECK(grads.b1.data[i] == 0);
    for (index_t i = h; i < 2 * h; ++i) CHECK(grads.b2.data[i] == 0);
  }
  for (index_t row : {0, 4, 9, 10})
    for (index_t c = 0; c < h; ++c) CHECK(d_in.data[row * h + c] == 0);
}

}  // namespace

TEST_CASE("glu forward and backward by hand: [gate | up] halves, one used row of two") {
  // ReGLU: exact numbers. x = 2 in row 0; row 1 (x = 9) is outside the expert's segment.
  auto const r = test::run_by_hand<expert::glu<act::relu>>({.ffn = 2,
                                                            // W13: gate | up
                                                            .w1 = {1, -1, 2, 0.5},
                                                            // b13: gate | up
                                                            .b1 = {0.5, 0.5, 0, 1},
                                                            .w2 = {3, 4},
                                                            .b2 = {1},
                                                            .in = {2, 9},
                                                            .d_out = {1, 7}});
  // gate = 2·(1, −1) + (0.5, 0.5) = (2.5, −1.5); up = 2·(2, 0.5) + (0, 1) = (4, 2);
  // h = relu(gate) ⊙ up = (10, 0); out = 10·3 + 0·4 + 1 = 31.
  CHECK(r.out[0] == Approx(31));
  CHECK(r.out[1] == 0);
  // dh = d_out · W2ᵀ = (3, 4); dg = dh ⊙ up ⊙ relu'(gate) = (12, 0); du = dh ⊙ relu(gate) =
  // (7.5, 0); dW2 = h = (10, 0); db2 = 1; dW13 = x · [dg | du] = (24, 0 | 15, 0);
  // db13 = (12, 0 | 7.5, 0); d_in = [dg | du] · W13ᵀ = 12·1 + 0·(−1) + 7.5·2 + 0·0.5 = 27.
  CHECK(r.w2 == std::vector<double>{10, 0});
  CHECK(r.b2[0] == 1);
  CHECK(r.w1 == std::vector<double>{24, 0, 15, 0});
  CHECK(r.b1 == std::vector<double>{12, 0, 7.5, 0});
  CHECK(r.d_in == std::vector<double>{27, 0});
}

TEST_CASE("glu rejects a W13 that is not (experts, hidden, 2·ffn)") {
  expert::expert_shape const shape{.experts = 2, .hidden = 3, .ffn = 4};
  std::vector<double> w13(2 * 3 * 8), w2(2 * 4 * 3);
  expert::glu_params<double const> p{
      make_view(w13.data(), 2, 3, 8), {}, make_view(w2.data(), 2, 4, 3), {}};
  CHECK(expert::swiglu::check(p, shape, "p").ok());
  p.w13 = make_view(w13.data(), 2, 3, 4);  // one half only
  auto const st = expert::swiglu::check(p, shape, "p");
  CHECK_FALSE(st.ok());
  CHECK(st.argument() == "p.w13");
}

TEST_CASE("expert backward matches finite differences, padding rows and an empty expert") {
  SUBCASE("glu<silu>, biases") {
    check_expert_gradients<expert::glu<act::silu>>(true);
  }
  SUBCASE("glu<gelu>, no biases") {
    check_expert_gradients<expert::glu<act::gelu>>(false);
  }
  SUBCASE("glu<silu>, no biases") {
    check_expert_gradients<expert::glu<act::silu>>(false);
  }
  SUBCASE("ffn<gelu>, biases") {
    check_expert_gradients<expert::ffn<act::gelu>>(true);
  }
  SUBCASE("ffn<silu>, no biases") {
    check_expert_gradients<expert::ffn<act::silu>>(false);
  }
}

TEST_CASE("glu in float and bfloat16 parameters: the host accumulates in double") {
  // The host backend takes any element type for the parameters; with the same (rounded)
  // values it computes the same result as with double parameters, bit for bit.
  using glu = expert::glu<act::gelu>;
  expert::expert_shape const shape{.experts = 2, .hidden = 3, .ffn = 2};
  std::mt19937_64 rng(test::fresh_seed());
  test::host_tensor<__nv_bfloat16> w13(2 * 3 * 4), w2(2 * 2 * 3);
  w13.randomize(rng);
  w2.randomize(rng);
  test::host_tensor<double> w13d(w13.data.size()), w2d(w2.data.size()), in(4 * 3);
  for (std::size_t i = 0; i < w13.data.size(); ++i) w13d.data[i] = to_accumulate(w13.data[i]);
  for (std::size_t i = 0; i < w2.data.size(); ++i) w2d.data[i] = to_accumulate(w2.data[i]);
  in.randomize(rng);
  std::array<std::int64_t, 2> const begin{0, 2}, rows{2, 2};
  test::owned_host_state<glu> const host_state(shape, 4);
  auto const& state = host_state.state;
  test::host_tensor<double> a(12), b(12);
  glu::forward(
      host, shape,
      expert::glu_params<__nv_bfloat16 const>{w13.cview(2, 3, 4), {}, w2.cview(2, 2, 3), {}},
      {begin, rows}, in.cview(4, 3), a.view(4, 3), state);
  glu::forward(host, shape,
               expert::glu_params<double const>{w13d.cview(2, 3, 4), {}, w2d.cview(2, 2, 3), {}},
               {begin, rows}, in.cview(4, 3), b.view(4, 3), state);
  CHECK(a.data == b.data);
}
