// SPDX-License-Identifier: Apache-2.0
// What a layer says of its parameters (names, axes, extents, PyTorch layouts), the messages
// that name them, and the host container that owns them: its views, initialisers and
// gradients, and draws that do not depend on the world size the experts are split over.

#include "../support/expect.hpp"
#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <moe/comm/simulated_world.hpp>
#include <moe/layer/parameters.hpp>
#include <moe/moe.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace {

using namespace moe;
using glu_t = expert::glu<act::silu>;
using ffn_t = expert::ffn<act::gelu>;
using glu_layer = layer<gating::top_k<2>, layout::ragged, comm::single_rank, glu_t>;

layer_args small_args() {
  return {.gate = {.tokens = 8, .experts = 4, .capacity_factor = 0}, .hidden = 6, .ffn = 5};
}

}  // namespace

TEST_CASE("a layer lists its parameters with their axes, extents and PyTorch layouts") {
  glu_layer const l(small_args());
  auto const shapes = l.parameter_shapes();
  REQUIRE(shapes.size() == 5);
  std::vector<std::string> names;
  for (auto const& p : shapes) names.push_back(p.name);
  CHECK(names == std::vector<std::string>{"gate_weight", "expert.w13", "expert.b13", "expert.w2",
                                          "expert.b2"});
  CHECK(describe(shapes[0]) == "(hidden, experts) = (6, 4)");
  CHECK(describe(shapes[1]) == "(experts, hidden, 2·ffn) = (4, 6, 10)");
  CHECK(describe(shapes[3]) == "(experts, ffn, hidden) = (4, 5, 6)");
  CHECK(shapes[2].bias);
  CHECK_FALSE(shapes[1].bias);
  CHECK(shapes[1].fan_in == 6);
  CHECK(shapes[3].fan_in == 5);
  CHECK(std::string(shapes[1].torch).find("up_proj") != std::string::npos);
}

TEST_CASE("a transposed weight is rejected with its axes named and the transpose pointed out") {
  glu_layer const l(small_args());
  host_parameters<glu_layer, double> w(l);
  std::vector<double> transposed(4 * 10 * 6);
  auto p = w.params();
  p.expert.w13 = make_view(static_cast<double const*>(transposed.data()), 4, 10, 6);
  test::host_tensor<double> x(8 * 6), y(8 * 6);
  std::vector<std::byte> ws(l.workspace_bytes(host));
  y.poison();
  std::string const message = test::expect_rejected(
      [&] { l.forward(host, x.cview(8, 6), p, y.view(8, 6), ws); }, "params.expert.w13");
  CHECK(message.find("expected (experts, hidden, 2·ffn) = (4, 6, 10), got (4, 10, 6)") !=
        std::string::npos);
  CHECK(message.find("transpose") != std::string::npos);
  CHECK(y.is_poisoned());
  // what() names the caller's line (this file), not the library's internals; where() keeps
  // the library's check.
  try {
    l.forward(host, x.cview(8, 6), p, y.view(8, 6), ws);
  } catch (moe::invalid_argument const& e) {
    REQUIRE(e.called_from().has_value());
    CHECK(std::string(e.called_from()->file_name()).find("parameters_test.cpp") !=
          std::string::npos);
    CHECK(std::string(e.what()).find("[called from ") != std::string::npos);
    CHECK(std::string(e.what()).find("host_layer") == std::string::npos);
    CHECK(std::string(e.where().file_name()).find("include/moe/") != std::string::npos);
    CHECK(std::string(e.what()).size() < 400);
  }
}

TEST_CASE("host_parameters: views over owned memory, zero gradients, seeded initialisers") {
  glu_layer const l(small_args());
  host_parameters<glu_layer, double> w(l, {.biases = true});
  auto const shapes = w.shapes();
  for (std::size_t i = 0; i < shapes.size(); ++i)
    CHECK(static_cast<index_t>(w.values(i).size()) == shapes[i].elements());
  // Everything starts zero, and forward accepts the views as they are.
  for (std::size_t i = 0; i < shapes.size(); ++i)
    CHECK(std::all_of(w.values(i).begin(), w.values(i).end(), [](double v) { return v == 0; }));
  CHECK(l.can_implement<double>(host, make_view(static_cast<double const*>(nullptr), 0, 6),
                                w.params(), make_view(static_cast<double*>(nullptr), 0, 6), {})
            .argument() == "ws");  // the parameters and the empty call pass; no workspace

  SUBCASE("torch_linear: U(−1/√fan_in, 1/√fan_in), biases too, spread over the interval") {
    w.initialize(initializer::torch_linear(), 7);
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      CAPTURE(shapes[i].name);
      double const bound = 1 / std::sqrt(static_cast<double>(shapes[i].fan_in));
      auto const v = w.values(i);
      auto const [lo, hi] = std::minmax_element(v.begin(), v.end());
      CHECK(*lo >= -bound);
      CHECK(*hi <= bound);
      if (v.size() >= 40) {  // spread: both ends of the interval reached within 25%
        CHECK(*lo < -0.75 * bound);
        CHECK(*hi > 0.75 * bound);
      }
    }
  }
  SUBCASE("normal: N(0, 0.02²) weights, zero biases") {
    w.initialize(initializer::normal(0.02), 7);
    double sum = 0, squares = 0;
    std::size_t n = 0;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      for (double v : w.values(i)) {
        if (shapes[i].bias) {
          CHECK(v == 0);
          continue;
        }
        sum += v;
        squares += v * v;
        ++n;
      }
    }
    double const mean = sum / n, std = std::sqrt(squares / n - mean * mean);
    CHECK(std::abs(mean) < 0.004);  // 4 standard errors of the mean over 560 draws
    CHECK(std == doctest::Approx(0.02).epsilon(0.12));
  }
  SUBCASE("the same seed gives the same values, another seed others") {
    w.initialize(initializer::torch_linear(), 7);
    host_parameters<glu_layer, double> same(l, {.biases = true}), other(l, {.biases = true});
    same.initialize(initializer::torch_linear(), 7);
    other.initialize(initializer::torch_linear(), 8);
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      CHECK(std::equal(w.values(i).begin(), w.values(i).end(), same.values(i).begin()));
      CHECK_FALSE(std::equal(w.values(i).begin(), w.values(i).end(), other.values(i).begin()));
    }
  }
  SUBCASE("without biases the bias views are absent and the weights unchanged") {
    host_parameters<glu_layer, double> no_bias(l);
    w.initialize(initializer::torch_linear(), 3);
    no_bias.initialize(initializer::torch_linear(), 3);
    CHECK(no_bias.params().expert.b13.size() == 0);
    CHECK(no_bias.values(2).empty());
    CHECK(std::equal(w.values(1).begin(), w.values(1).end(), no_bias.values(1).begin()));
  }
  SUBCASE("backward writes the gradients; zero_gradients clears them") {
    w.initialize(initializer::torch_linear(), 1);
    test::host_tensor<double> x(8 * 6), y(8 * 6), dy(8 * 6), dx(8 * 6);
    std::mt19937_64 rng(5);
    x.randomize(rng);
    dy.randomize(rng);
    std::vector<std::byte> ws(l.workspace_bytes(host));
    l.forward(host, x.cview(8, 6), w.params(), y.view(8, 6), ws);
    l.backward(host, dy.cview(8, 6), w.params(), dx.view(8, 6), w.gradients(), ws);
    auto const g = w.gradients(1);
    CHECK(std::any_of(g.begin(), g.end(), [](double v) { return v != 0; }));
    w.zero_gradients();
    CHECK(std::all_of(g.begin(), g.end(), [](double v) { return v == 0; }));
  }
}

TEST_CASE("initialised experts do not depend on the world size they are split over") {
  using single_t = layer<gating::top_k<1>, layout::capacity, comm::single_rank, ffn_t>;
  using parallel_t = layer<gating::top_k<1>, layout::capacity, comm::linear_all_to_all, ffn_t>;
  layer_args const args{.gate = {.tokens = 4, .experts = 4}, .hidden = 3, .ffn = 2};
  single_t const single(args);
  host_parameters<single_t, double> whole(single, {.biases = true});
  whole.initialize(initializer::torch_linear(), 11);
  comm::simulated_world world({.ranks_per_node = 2, .nodes = 1});
  std::vector<std::vector<std::vector<double>>> per_rank(2);
  world.run([&](comm::simulated_world::rank_communicator& c) {
    parallel_t const l(args, c);
    host_parameters<parallel_t, double> part(l, {.biases = true});
    part.initialize(initializer::torch_linear(), 11);
    for (std::size_t i = 0; i < part.shapes().size(); ++i)
      per_rank[static_cast<std::size_t>(c.rank())].emplace_back(part.values(i).begin(),
                                                                part.values(i).end());
  });
  for (std::size_t i = 0; i < whole.shapes().size(); ++i) {
    CAPTURE(whole.shapes()[i].name);
    std::vector<double> const want(whole.values(i).begin(), whole.values(i).end());
    if (i == 0) {  // the gate weight: every rank holds all of it
      CHECK(per_rank[0][i] == want);
      CHECK(per_rank[1][i] == want);
      continue;
    }
    std::vector<double> joined = per_rank[0][i];  // rank 0 holds experts 0–1, rank 1 2–3
    joined.insert(joined.end(), per_rank[1][i].begin(), per_rank[1][i].end());
    CHECK(joined == want);
  }
}

TEST_CASE("writable parameter views convert to the read-only ones forward takes") {
  glu_layer const l(small_args());
  host_parameters<glu_layer, double> w(l);
  w.initialize(initializer::torch_linear(), 2);
  test::host_tensor<double> x(8 * 6), y_const(8 * 6), y_mutable(8 * 6);
  std::mt19937_64 rng(9);
  x.randomize(rng);
  std::vector<std::byte> ws(l.workspace_bytes(host));
  l.forward(host, x.cview(8, 6), w.params(), y_const.view(8, 6), ws);
  layer_params<double, glu_t> const writable = w.values();
  l.forward(host, x.cview(8, 6), writable, y_mutable.view(8, 6), ws);  // converts
  CHECK(y_mutable.data == y_const.data);
  static_assert(
      std::is_convertible_v<layer_params<float, glu_t>, layer_params<float const, glu_t>>);
  static_assert(
      !std::is_convertible_v<layer_params<float const, glu_t>, layer_params<float, glu_t>>);
}
