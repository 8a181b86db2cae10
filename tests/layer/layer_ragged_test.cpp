// SPDX-License-Identifier: Apache-2.0
// The layer with the ragged (dropless) layout on the host: it equals the capacity layer bit
// for bit where that layer drops nothing, it drops nothing where the capacity layer would,
// it gives zero gradients to experts that received no token, and it checks its new knob,
// expert_row_alignment.

#include "../support/expect.hpp"
#include "../support/parameters.hpp"

#include <doctest/doctest.h>

#include <moe/moe.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

using namespace moe;

namespace {

using gelu_ffn = expert::ffn<act::gelu>;

template <class Gate, class Layout, class Expert = gelu_ffn>
using layer_of = layer<Gate, Layout, comm::single_rank, Expert>;

/// Random parameters of a `Layer` (any layer of its expert takes them), x and dy for `args`,
/// at `tokens` tokens.
template <class Layer>
struct inputs {
  bool biases;
  host_parameters<Layer, double> params;
  test::host_tensor<double> x, dy;

  inputs(layer_args const& args, index_t tokens, std::mt19937_64& rng, bool with_biases = true)
      : biases(with_biases),
        params(Layer(args), {.biases = with_biases}),
        x(tokens * args.hidden),
        dy(tokens * args.hidden) {
    test::randomize(params, rng, 0.8);
    x.randomize(rng);
    dy.randomize(rng);
  }
};

/// One forward and one backward of `Layer` in double on the given inputs; every output
/// poisoned first.
template <class Layer>
struct pass {
  Layer layer;
  layer_stats stats;
  std::vector<std::int64_t> load;
  test::host_tensor<double> y, dx;
  host_parameters<Layer, double> grads;  // its gradients; its values stay zero

  template <class Inputs>
  pass(layer_args const& args, index_t tokens, Inputs const& in)
      : layer(args),
        y(tokens * args.hidden),
        dx(tokens * args.hidden),
        grads(layer, {.biases = in.biases}) {
    host_buffer ws(layer.workspace_bytes(host));
    index_t const h = args.hidden;
    y.poison();
    dx.poison();
    test::poison_gradients(grads);
    auto const p = in.params.params();
    layer.forward(host, in.x.cview(tokens, h), p, y.view(tokens, h), ws.view());
    layer.backward(host, in.dy.cview(tokens, h), p, dx.view(tokens, h), grads.gradients(),
                   ws.view());
    stats = layer.stats(host, ws.view());
    load.assign(stats.load.begin(), stats.load.end());
  }
};

/// y_t = Σ_j w_tj · ffn_{e_j}(x_t) straight from the definitions, in double: softmax of
/// x·W_gate, the k largest scores (ties to the lower expert) as weights, no renormalisation,
/// and each selected expert applied to x_t alone.
template <class Act, class Layer>
std::vector<double> direct_output(layer_args const& a, int k, index_t tokens,
                                  host_parameters<Layer, double> const& p,
                                  test::host_tensor<double> const& x) {
  index_t const H = a.hidden, F = a.ffn, E = a.gate.experts;
  // The tensors flat, in the order of parameter_shapes; b1 and b2 empty without biases.
  auto const gate = p.values(0), w1 = p.values(1), b1 = p.values(2), w2 = p.values(3),
             b2 = p.values(4);
  std::vector<double> y(tokens * H, 0.0), scores(E), inner(F);
  std::vector<index_t> order(E);
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t e = 0; e < E; ++e) {
      scores[e] = 0;
      for (index_t h = 0; h < H; ++h) scores[e] += x.data[t * H + h] * gate[h * E + e];
    }
    double const top = *std::max_element(scores.begin(), scores.end());
    double sum = 0;
    for (double& s : scores) sum += (s = std::exp(s - top));
    for (double& s : scores) s /= sum;
    std::iota(order.begin(), order.end(), index_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](index_t l, index_t r) { return scores[l] > scores[r]; });
    for (int j = 0; j < k; ++j) {
      index_t const e = order[j];
      for (index_t f = 0; f < F; ++f) {
        double pre = b1.empty() ? 0.0 : b1[e * F + f];
        for (index_t h = 0; h < H; ++h) pre += x.data[t * H + h] * w1[(e * H + h) * F + f];
        inner[f] = Act::forward(pre);
      }
      for (index_t h = 0; h < H; ++h) {
        double out = b2.empty() ? 0.0 : b2[e * H + h];
        for (index_t f = 0; f < F; ++f) out += inner[f] * w2[(e * F + f) * H + h];
        y[t * H + h] += scores[e] * out;
      }
    }
  }
  return y;
}

/// Makes every token select the experts in `favoured`: x_t0 = 1, a gate weight of 2, 1.5, …
/// from feature 0 to each favoured expert and 0 to the others, and the other features'
/// gate weights scaled down so that they move a logit by at most (H − 1)·0.08 < 0.9.
template <class Inputs>
void favour(layer_args const& a, Inputs& in, std::vector<index_t> const& favoured, index_t tokens) {
  for (index_t t = 0; t < tokens; ++t) in.x.data[t * a.hidden] = 1.0;
  auto const w = in.params.values(0);  // the gate weight
  for (index_t e = 0; e < a.gate.experts; ++e) w[e] = 0;
  for (index_t i = a.gate.experts; i < a.hidden * a.gate.experts; ++i) w[i] *= 0.1;
  for (std::size_t i = 0; i < favoured.size(); ++i)
    w[favoured[i]] = 2.0 - 0.5 * static_cast<double>(i);
}

using moe::test::expect_rejected;

}  // namespace

TEST_CASE("the ragged layer equals the capacity layer that drops nothing, bit for bit") {
  // Both run the same router; with nothing dropped the same assignments reach the same
  // experts in the same slot order, and every sum (combine and dx over j in order, expert
  // GEMMs and parameter gradients over each expert's rows in slot order, the router's
  // backward) runs over the same terms in the same order. Only where the rows sit in the
  // batch differs: e·C + slot against offset_e + slot. So the results are identical.
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  layer_args args{
      .gate = {.tokens = 12,
               .experts = 4,
               .capacity_factor = 8.0f,  // C = 2·⌊8·3⌋ = 48 ≥ every load: nothing dropped
               .aux_loss_coef = 0.3f,
               .z_loss_coef = 0.2f},
      .hidden = 5,
      .ffn = 7};

  auto compare = [&]<class Gate>(Gate, layer_args const& a, index_t tokens, index_t alignment) {
    INFO("tokens " << tokens << ", alignment " << alignment << ", k " << a.gate.k);
    inputs<layer_of<Gate, layout::capacity>> in(a, tokens, rng);
    pass<layer_of<Gate, layout::capacity>> dense(a, tokens, in);
    layer_args ragged_args = a;
    ragged_args.expert_row_alignment = alignment;
    pass<layer_of<Gate, layout::ragged>> ragged(ragged_args, tokens, in);
    REQUIRE(dense.stats.dropped == 0);
    CHECK(ragged.stats.dropped == 0);
    CHECK(ragged.stats.tokens == tokens);
    CHECK(ragged.load == dense.load);
    CHECK(ragged.stats.capacity == *std::max_element(dense.load.begin(), dense.load.end()));
    index_t padded = 0;
    for (auto l : dense.load) padded += layout::padded_rows(l, alignment);
    CHECK(ragged.stats.expert_rows == padded);
    CHECK(dense.stats.expert_rows == a.gate.experts * dense.stats.capacity);
    CHECK(ragged.stats.aux_loss == dense.stats.aux_loss);
    CHECK(ragged.stats.z_loss == dense.stats.z_loss);
    CHECK(ragged.stats.loss == dense.stats.loss);
    CHECK(ragged.y.data == dense.y.data);
    CHECK(ragged.dx.data == dense.dx.data);
    for (std::size_t n = 0; n < dense.grads.shapes().size(); ++n) {
      auto const g_ragged = ragged.grads.gradients(n), g_dense = dense.grads.gradients(n);
      CHECK(std::equal(g_ragged.begin(), g_ragged.end(), g_dense.begin(), g_dense.end()));
    }
    for (double v : ragged.y.data) CHECK(std::isfinite(v));
  };

  SUBCASE("top-2, every row alignment") {
    for (index_t alignment : {1, 4, 16}) compare(gating::top_k<2>{}, args, 12, alignment);
  }
  SUBCASE("fewer tokens than the layer was sized for") {
    compare(gating::top_k<2>{}, args, 5, 8);
  }
  SUBCASE("top-3 of 5, renormalised, one token") {
    args.gate.experts = 5;
    args.gate.k = 3;
    args.gate.normalize = gating::renormalize::after_drops;
    compare(gating::top_any<>{}, args, 10, 3);
    compare(gating::top_any<>{}, args, 1, 2);
  }
  SUBCASE("one expert") {
    args.gate.experts = 1;
    args.gate.k = 1;
    compare(gating::top_any<>{}, args, 12, 5);
  }
}

TEST_CASE("the ragged layer drops nothing where the capacity layer would") {
  // Every token's first choice is expert 0, so its load is T = 16, twice the capacity
  // 2·⌊1·⌈16/4⌉⌋ = 8 of the capacity layer at f = 1: that layer drops at least those 8
  // assignments (more when 9 of the second choices, spread at random over experts 1 to 3,
  // meet). The ragged layer keeps all 32 and matches the direct per-token sum
  // Σ_j w_tj · ffn_e(x_t).
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  layer_args const args{
      .gate = {.tokens = 16, .experts = 4, .capacity_factor = 1.0f}, .hidden = 6, .ffn = 5};
  index_t const T = args.gate.tokens;
  inputs<layer_of<gating::top_k<2>, layout::capacity>> in(args, T, rng);
  favour(args, in, {0}, T);

  pass<layer_of<gating::top_k<2>, layout::capacity>> const dense(args, T, in);
  CHECK(dense.stats.capacity == 8);
  CHECK(dense.stats.dropped >= 8);

  for (index_t alignment : {1, 32}) {
    layer_args ragged_args = args;
    ragged_args.expert_row_alignment = alignment;
    pass<layer_of<gating::top_k<2>, layout::ragged>> const ragged(ragged_args, T, in);
    CHECK(ragged.stats.dropped == 0);
    CHECK(ragged.load[0] == T);
    CHECK(ragged.stats.capacity == T);  // the largest load
    CHECK(std::accumulate(ragged.load.begin(), ragged.load.end(), std::int64_t{0}) == 2 * T);
    std::vector<double> const expected = direct_output<act::gelu>(args, 2, T, in.params, in.x);
    for (std::size_t i = 0; i < expected.size(); ++i) {
      INFO("y[" << i << "]");
      CHECK(std::abs(ragged.y.data[i] - expected[i]) <= 1e-12 * (1 + std::abs(expected[i])));
    }
    // The capacity layer lost part of some tokens; the ragged one did not.
    bool differs = false;
    for (std::size_t i = 0; i < expected.size(); ++i)
      differs = differs || std::abs(dense.y.data[i] - expected[i]) > 1e-6;
    CHECK(differs);
  }
}

TEST_CASE("the ragged layer gives zero gradients to experts that received no token") {
  // Every token chooses experts 0 and 1; experts 2 and 3 get no row, and their gradients are
  // zero, not garbage (poisoned before), with and without padding.
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  layer_args const args{.gate = {.tokens = 7, .experts = 4}, .hidden = 4, .ffn = 6};
  using layer_t = layer_of<gating::top_k<2>, layout::ragged, expert::ffn<act::silu>>;
  inputs<layer_t> in(args, args.gate.tokens, rng);
  favour(args, in, {0, 1}, args.gate.tokens);
  for (index_t alignment : {1, 16}) {
    layer_args a = args;
    a.expert_row_alignment = alignment;
    pass<layer_t> ragged(a, a.gate.tokens, in);
    CHECK(ragged.load == std::vector<std::int64_t>{7, 7, 0, 0});
    CHECK(ragged.stats.expert_rows == 2 * layout::padded_rows(7, alignment));
    auto const w1 = ragged.grads.gradients(1), b1 = ragged.grads.gradients(2),
               w2 = ragged.grads.gradients(3), b2 = ragged.grads.gradients(4);
    index_t const H = a.hidden, F = a.ffn;
    for (index_t e = 0; e < 4; ++e) {
      bool const used = e < 2;
      for (index_t i = 0; i < H * F; ++i) {
        CHECK((w1[e * H * F + i] == 0) == !used);
        CHECK((w2[e * H * F + i] == 0) == !used);
      }
      for (index_t f = 0; f < F; ++f) CHECK((b1[e * F + f] == 0) == !used);
      for (index_t h = 0; h < H; ++h) CHECK((b2[e * H + h] == 0) == !used);
    }
    for (double v : ragged.dx.data) CHECK(std::isfinite(v));
  }
}

TEST_CASE("expert_row_alignment: checked, ragged only, and it sizes the workspace") {
  layer_args const good{
      .gate = {.tokens = 16, .experts = 4, .capacity_factor = 1.25f}, .hidden = 8, .ffn = 12};
  using ragged_t = layer_of<gating::top_k<2>, layout::ragged>;
  using dense_t = layer_of<gating::top_k<2>, layout::capacity>;
  auto with = [&](auto change) {
    layer_args a = good;
    change(a);
    return a;
  };
  CHECK(ragged_t::can_implement(good).ok());
  expect_rejected([&] { ragged_t{with([](auto& a) { a.expert_row_alignment = 0; })}; },
                  "expert_row_alignment");
  expect_rejected([&] { ragged_t{with([](auto& a) { a.expert_row_alignment = -4; })}; },
                  "expert_row_alignment");
  expect_rejected([&] { dense_t{with([](auto& a) { a.expert_row_alignment = 0; })}; },
                  "expert_row_alignment");
  // The capacity layout sizes its rows by the capacity: padding its experts is refused.
  expect_rejected([&] { dense_t{with([](auto& a) { a.expert_row_alignment = 16; })}; },
                  "expert_row_alignment");
  CHECK(ragged_t::can_implement(with([](auto& a) { a.expert_row_alignment = 128; })).ok());
  // No capacity applies to the ragged layout: a factor that gives the capacity layout zero
  // slots (⌊0.1·⌈16/4⌉⌋ = 0) is no reason to refuse it.
  CHECK_FALSE(dense_t::can_implement(with([](auto& a) { a.gate.capacity_factor = 0.1f; })).ok());
  CHECK(ragged_t::can_implement(with([](auto& a) { a.gate.capacity_factor = 0.1f; })).ok());
  CHECK(ragged_t::can_implement(with([](auto& a) { a.gate.capacity_factor = -3; })).ok());

  // The workspace holds T·k + E·(alignment − 1) rows: padding costs rows of workspace.
  ragged_t const plain(good);
  ragged_t const padded(with([](auto& a) { a.expert_row_alignment = 128; }));
  std::size_t const row_bytes = 4 * good.hidden * sizeof(double);  // four (rows, H) buffers
  CHECK(padded.workspace_bytes(host) >= plain.workspace_bytes(host) + 4 * 127 * row_bytes);

  // Every token picks experts 2 and 3: 16 rows each, padded to 128. A workspace one byte
  // short is refused before anything is written.
  std::mt19937_64 rng(test::fresh_seed());
  layer_args const a = with([](auto& a) { a.expert_row_alignment = 128; });
  inputs<ragged_t> in(a, a.gate.tokens, rng);
  favour(a, in, {2, 3}, a.gate.tokens);
  host_buffer ws(padded.workspace_bytes(host));
  test::host_tensor<double> y(a.gate.tokens * a.hidden);
  y.poison();
  auto const p = in.params.params();
  expect_rejected(
      [&] {
        padded.forward(host, in.x.cview(a.gate.tokens, a.hidden), p,
                       y.view(a.gate.tokens, a.hidden), ws.view().first(ws.size() - 1));
      },
      "ws");
  CHECK(y.is_poisoned());
  padded.forward(host, in.x.cview(a.gate.tokens, a.hidden), p, y.view(a.gate.tokens, a.hidden),
                 ws.view());
  auto const stats = padded.stats(host, ws.view());
  CHECK(stats.expert_rows == 2 * 128);
  CHECK(stats.dropped == 0);
  for (double v : y.data) CHECK(std::isfinite(v));
}
