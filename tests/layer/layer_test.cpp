// SPDX-License-Identifier: Apache-2.0
// The layer on the host: bad input throws moe::invalid_argument naming the argument and
// leaves every output untouched (poisoned before, still poisoned after), and the workspace
// state of an earlier forward survives a rejected call.

#include "../support/expect.hpp"
#include "../support/parameters.hpp"

#include <doctest/doctest.h>

#include <moe/moe.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

using namespace moe;

namespace {

using ffn_t = expert::ffn<act::gelu>;
using layer_t = layer<gating::top_k<2>, layout::capacity, comm::single_rank, ffn_t>;
using any_layer_t = layer<gating::top_any<>, layout::capacity, comm::single_rank, ffn_t>;

layer_args const good{
    .gate = {.tokens = 16, .experts = 4, .capacity_factor = 1.25f}, .hidden = 8, .ffn = 12};

/// Expects `call` to throw invalid_argument naming `argument`, quoted in its message.
template <class Call>
void expect_rejected(Call&& call, std::string const& argument) {
  std::string const what = test::expect_rejected(call, argument);
  if (!what.empty()) CHECK(what.find("'" + argument + "'") != std::string::npos);
}

}  // namespace

TEST_CASE("bad layer arguments are rejected, naming the argument") {
  auto with = [](auto change) {
    layer_args a = good;
    change(a);
    return a;
  };
  CHECK(layer_t::can_implement(good).ok());
  expect_rejected([&] { any_layer_t{with([](auto& a) { a.gate.k = 5; })}; }, "k");  // k > E
  expect_rejected([&] { any_layer_t{with([](auto& a) { a.gate.k = 0; })}; }, "k");
  expect_rejected([&] { layer_t{with([](auto& a) { a.gate.k = 3; })}; }, "k");  // ≠ static k
  expect_rejected(
      [&] { layer<gating::top_k<8>, layout::capacity, comm::single_rank, ffn_t>{good}; }, "k");
  expect_rejected([&] { layer_t{with([](auto& a) { a.gate.experts = 0; })}; }, "experts");
  expect_rejected([&] { layer_t{with([](auto& a) { a.gate.capacity_factor = NAN; })}; },
                  "capacity_factor");
  expect_rejected(
      [&] {
        layer_t{
            with([](auto& a) { a.gate.capacity_factor = std::numeric_limits<float>::infinity(); })};
      },
      "capacity_factor");
  // ⌊0.1·⌈16/4⌉⌋ = 0: capacity 0 would drop every token.
  expect_rejected([&] { layer_t{with([](auto& a) { a.gate.capacity_factor = 0.1f; })}; },
                  "capacity_factor");
  expect_rejected([&] { layer_t{with([](auto& a) { a.gate.tokens = 0; })}; }, "tokens");
  expect_rejected([&] { layer_t{with([](auto& a) { a.hidden = -1; })}; }, "hidden");
  expect_rejected([&] { layer_t{with([](auto& a) { a.ffn = 0; })}; }, "ffn");
  expect_rejected([&] { layer_t{with([](auto& a) { a.gate.capacity_alignment = 0; })}; },
                  "capacity_alignment");
  CHECK(layer_t::can_implement(with([](auto& a) { a.gate.capacity_factor = 0; })).ok());  // dynamic
  CHECK(layer_t::can_implement(with([](auto& a) { a.gate.capacity_factor = -1; })).ok());
}

TEST_CASE("bad views are rejected before anything is written") {
  layer_t const layer(good);
  std::mt19937_64 rng(test::fresh_seed());
  index_t const T = good.gate.tokens, H = good.hidden;
  host_parameters<layer_t, float> w(layer, {.biases = true});
  test::randomize(w, rng, 0.5);
  test::host_tensor<float> x(T * H), y(T * H), dy(T * H), dx(T * H), wide(T * (H + 1));
  x.randomize(rng);
  dy.randomize(rng);
  host_buffer ws(layer.workspace_bytes(host));
  auto const p = w.params();

  // A good forward first: its state must survive every rejected call below.
  layer.forward(host, x.cview(T, H), p, y.view(T, H), ws.view());
  auto const before = layer.stats(host, ws.view());
  std::vector<float> const y_good = y.data;
  y.poison();

  SUBCASE("forward") {
    auto forward = [&](auto xv, auto pv, auto yv, workspace w) {
      return [=, &layer] { layer.forward(host, xv, pv, yv, w); };
    };
    expect_rejected(forward(wide.cview(T, H + 1), p, y.view(T, H), ws.view()), "x");
    expect_rejected(forward(x.cview(T, H), p, wide.view(T, H + 1), ws.view()), "y");
    expect_rejected(forward(x.cview(T, H), p, y.view(T - 1, H), ws.view()), "y");
    expect_rejected(
        forward(make_view(static_cast<float const*>(nullptr), T, H), p, y.view(T, H), ws.view()),
        "x");
    auto no_gate = p;
    no_gate.gate_weight = make_view(static_cast<float const*>(nullptr), H, good.gate.experts);
    expect_rejected(forward(x.cview(T, H), no_gate, y.view(T, H), ws.view()), "params.gate_weight");
    auto bad_w1 = p;
    bad_w1.expert.w1 = make_view(p.expert.w1.data_handle(), good.gate.experts, good.ffn, H);
    expect_rejected(forward(x.cview(T, H), bad_w1, y.view(T, H), ws.view()), "params.expert.w1");
    auto bad_b2 = p;
    bad_b2.expert.b2 = make_view(p.expert.b2.data_handle(), good.gate.experts, H - 1);
    expect_rejected(forward(x.cview(T, H), bad_b2, y.view(T, H), ws.view()), "params.expert.b2");
    expect_rejected(forward(x.cview(T, H), p, y.view(T, H), ws.view().first(ws.size() - 1)), "ws");
    test::host_tensor<float> big(2 * T * H);
    expect_rejected(forward(big.cview(2 * T, H), p, big.view(2 * T, H), ws.view()), "x");
    CHECK(y.is_poisoned());
  }

  SUBCASE("backward") {
    test::poison_gradients(w);
    dx.poison();
    auto const g = w.gradients();
    expect_rejected(
        [&] { layer.backward(host, dy.cview(T - 1, H), p, dx.view(T, H), g, ws.view()); }, "dy");
    expect_rejected(
        [&] { layer.backward(host, dy.cview(T, H), p, dx.view(T, H - 1), g, ws.view()); }, "dx");
    auto bad_g = g;
    bad_g.expert.w2 = make_view(g.expert.w2.data_handle(), good.gate.experts, H, good.ffn);
    expect_rejected(
        [&] { layer.backward(host, dy.cview(T, H), p, dx.view(T, H), bad_g, ws.view()); },
        "gradients.expert.w2");
    host_buffer fresh(layer.workspace_bytes(host));
    std::memset(fresh.view().data(), 0, fresh.size());
    expect_rejected(
        [&] { layer.backward(host, dy.cview(T, H), p, dx.view(T, H), g, fresh.view()); }, "ws");
    CHECK(dx.is_poisoned());
    CHECK(test::gradients_poisoned(w));
  }

  // Nothing was lost: the earlier forward's state still drives stats and backward.
  auto const after = layer.stats(host, ws.view());
  CHECK(after.capacity == before.capacity);
  CHECK(after.dropped == before.dropped);
  CHECK(after.aux_loss == before.aux_loss);
  CHECK_NOTHROW(layer.backward(host, dy.cview(T, H), p, dx.view(T, H), w.gradients(), ws.view()));
  layer.forward(host, x.cview(T, H), p, y.view(T, H), ws.view());
  CHECK(y.data == y_good);  // deterministic
}

TEST_CASE("forward takes fewer tokens than the layer was sized for, and mutable inputs") {
  layer_t const layer(good);
  std::mt19937_64 rng(test::fresh_seed());
  host_parameters<layer_t, float> w(layer);
  test::randomize(w, rng, 0.5);
  index_t const T = 5, H = good.hidden;
  test::host_tensor<float> x(T * H), y(T * H);
  x.randomize(rng);
  y.poison();
  host_buffer ws(layer.workspace_bytes(host));
  layer.forward(host, x.view(T, H), w.params(), y.view(T, H), ws.view());
  auto const stats = layer.stats(host, ws.view());
  CHECK(stats.tokens == T);
  CHECK(stats.capacity == 2 * 2);  // k·⌊1.25·⌈5/4⌉⌋ = 2·2
  std::int64_t assigned = 0;
  for (auto l : stats.load) assigned += l;
  CHECK(assigned == 2 * T);
  for (float v : y.data) CHECK(std::isfinite(v));
}

TEST_CASE("the host layer runs in half and bfloat16: only the output is rounded") {
  // The float reference runs on the same rounded inputs, so routing is identical and the
  // two differ by the final rounding of y alone: the host accumulates in double either way.
  layer_args const args{
      .gate = {.tokens = 32, .experts = 4, .capacity_factor = 2.0f}, .hidden = 16, .ffn = 24};
  layer_t const layer(args);
  index_t const T = args.gate.tokens, H = args.hidden;
  host_buffer ws(layer.workspace_bytes(host));

  auto check_as = [&]<class E>(E, double tolerance) {
    std::mt19937_64 rng(test::fresh_seed());
    host_parameters<layer_t, E> p(layer, {.biases = true});
    test::randomize(p, rng, 0.4);
    host_parameters<layer_t, float> reference(layer, {.biases = true});
    for (std::size_t n = 0; n < p.shapes().size(); ++n)
      std::transform(p.values(n).begin(), p.values(n).end(), reference.values(n).begin(),
                     [](E v) { return to_accumulate(v); });
    test::host_tensor<E> xe(T * H), ye(T * H);
    xe.randomize(rng);
    test::host_tensor<float> x(T * H), y(T * H);
    for (std::size_t i = 0; i < x.data.size(); ++i) x.data[i] = to_accumulate(xe.data[i]);
    ye.poison();
    y.poison();
    layer.forward(host, x.cview(T, H), reference.params(), y.view(T, H), ws.view());
    layer.forward(host, xe.cview(T, H), p.params(), ye.view(T, H), ws.view());
    for (std::size_t i = 0; i < y.data.size(); ++i) {
      double const ref = y.data[i];
      CHECK(std::abs(to_accumulate(ye.data[i]) - ref) <= tolerance * std::abs(ref) + 1e-7);
    }
  };
  check_as(__half{}, 1.0 / 1024);
  check_as(__nv_bfloat16{}, 1.0 / 128);
}

TEST_CASE("sizes whose workspace does not fit int64 are rejected, naming the argument") {
  using relu_layer_t =
      layer<gating::top_any<>, layout::capacity, comm::single_rank, expert::ffn<act::relu>>;
  using ragged_layer_t =
      layer<gating::top_any<>, layout::ragged, comm::single_rank, expert::ffn<act::relu>>;
  index_t const huge = index_t{1} << 62;
  // T = 2^62 once gave a workspace of 14,080 bytes and a forward that wrote past it.
  layer_args const big{.gate = {.tokens = huge,
                                .experts = 8,
                                .k = 3,
                                .capacity_factor = 0.75f,
                                .capacity_alignment = 7},
                       .hidden = 3,
                       .ffn = 12};
  CHECK(relu_layer_t::can_implement(big).argument() == "tokens");
  expect_rejected([&] { relu_layer_t{big}; }, "tokens");

  layer_args const fine{.gate = {.tokens = 16, .experts = 4, .k = 2}, .hidden = 8, .ffn = 12};
  REQUIRE(relu_layer_t::can_implement(fine).ok());
  auto with = [&](auto change) {
    layer_args a = fine;
    change(a);
    return a;
  };
  CHECK(relu_layer_t::can_implement(with([&](auto& a) { a.hidden = huge; })).argument() ==
        "hidden");
  CHECK(relu_layer_t::can_implement(with([&](auto& a) { a.ffn = huge; })).argument() == "ffn");
  CHECK(relu_layer_t::can_implement(with([&](auto& a) { a.gate.experts = huge; })).argument() ==
        "experts");
  // Each fits alone; their product, the expert weights E·H·F, does not.
  CHECK(relu_layer_t::can_implement(with([&](auto& a) {
          a.hidden = index_t{1} << 20;
          a.ffn = index_t{1} << 20;
          a.gate.experts = index_t{1} << 14;
        })).argument() == "ffn");
  // A huge finite factor: the float-to-integer step of the capacity was undefined.
  for (float f : {1e30f, std::numeric_limits<float>::max(), 1e19f, 1e15f}) {
    CAPTURE(f);
    CHECK(relu_layer_t::can_implement(with([&](auto& a) {
            a.gate.capacity_factor = f;
          })).argument() == "capacity_factor");
    expect_rejected([&] { relu_layer_t{with([&](auto& a) { a.gate.capacity_factor = f; })}; },
                    "capacity_factor");
  }
  // A capped dynamic factor of any size is fine: the capacity is at most the largest load.
  CHECK(relu_layer_t::can_implement(with([](auto& a) { a.gate.capacity_factor = -1e30f; })).ok());
  // An alignment of 2^62 once passed can_implement and threw after writing the workspace.
  CHECK(relu_layer_t::can_implement(with([&](auto& a) {
          a.gate.capacity_alignment = huge;
        })).argument() == "capacity_alignment");
  CHECK(relu_layer_t::can_implement(with([](auto& a) {
          a.gate.capacity_alignment = index_t{1} << 50;
        })).argument() == "capacity_alignment");
  CHECK(ragged_layer_t::can_implement(with([&](auto& a) {
          a.expert_row_alignment = huge;
        })).argument() == "expert_row_alignment");
  CHECK(ragged_layer_t::can_implement(with([](auto& a) {
          a.expert_row_alignment = index_t{1} << 50;
        })).argument() == "expert_row_alignment");
  CHECK(ragged_layer_t::can_implement(with([&](auto& a) {
          a.gate.tokens = index_t{1} << 50;
        })).argument() == "tokens");
  CHECK(ragged_layer_t::can_implement(fine).ok());
}

namespace {

/// One host layer with random float parameters and inputs, poisoned outputs, and a
/// workspace: the calls of the tests below, `t` tokens each.
struct host_call {
  layer_t layer;
  index_t hidden;
  host_parameters<layer_t, float> w;
  test::host_tensor<float> x, y, dy, dx;
  host_buffer ws;

  explicit host_call(layer_args const& a)
      : layer(a),
        hidden(a.hidden),
        w(layer, {.biases = true}),
        x(size(a)),
        y(size(a)),
        dy(size(a)),
        dx(size(a)),
        ws(layer.workspace_bytes(host)) {
    std::mt19937_64 rng(test::fresh_seed());
    test::randomize(w, rng, 0.5);
    x.randomize(rng);
    dy.randomize(rng);
    y.poison();
    dx.poison();
  }
  static index_t size(layer_args const& a) { return a.gate.tokens * a.hidden; }
  status can_forward(index_t t) {
    return layer.can_implement<float>(host, x.cview(t, hidden), w.params(), y.view(t, hidden),
                                      ws.view());
  }
  void forward(index_t t) {
    layer.forward(host, x.cview(t, hidden), w.params(), y.view(t, hidden), ws.view());
  }
  status can_backward(index_t t, index_t dx_width) {
    return layer.can_implement<float>(host, dy.cview(t, hidden), w.params(), dx.view(t, dx_width),
                                      w.gradients(), ws.view());
  }
  void backward(index_t t) {
    layer.backward(host, dy.cview(t, hidden), w.params(), dx.view(t, hidden), w.gradients(),
                   ws.view());
  }
};

}  // namespace

TEST_CASE("can_implement and forward agree on tokens that do not fill the local groups") {
  host_call c({.gate = {.tokens = 16, .experts = 4, .capacity_factor = 1.25f, .groups = 2},
               .hidden = 8,
               .ffn = 12});
  CHECK(c.can_forward(3).argument() == "x");
  expect_rejected([&] { c.forward(3); }, "x");
  CHECK(c.y.is_poisoned());
  CHECK(c.can_forward(4).ok());
}

TEST_CASE("can_implement of a backward call says what backward would throw") {
  host_call c(good);
  std::memset(c.ws.view().data(), 0, c.ws.view().size());  // holds no forward call
  CHECK(c.can_backward(4, c.hidden).argument() == "ws");
  c.forward(4);
  CHECK(c.can_backward(4, c.hidden).ok());
  CHECK(c.can_backward(8, c.hidden).argument() == "dy");  // not the forward call's tokens
  expect_rejected([&] { c.backward(8); }, "dy");
  CHECK(c.can_backward(4, c.hidden + 1).argument() == "dx");
  CHECK(c.dx.is_poisoned());
}

TEST_CASE("can_implement and forward agree on a non-finite expert_bias") {
  // layer_args_fuzz: can_implement(views) accepted a call whose host router then threw.
  float const bias[4] = {0.0f, std::numeric_limits<float>::infinity(), 0.0f, 0.0f};
  // The bias's size is right, so the layer is built; its values are the call's to check.
  host_call c({.gate = {.tokens = 4, .experts = 4, .expert_bias = span<float const>(bias, 4)},
               .hidden = 8,
               .ffn = 12});
  CHECK(c.can_forward(4).argument() == "expert_bias");
  expect_rejected([&] { c.forward(4); }, "expert_bias");
  CHECK(c.y.is_poisoned());
}

TEST_CASE("an empty test tensor can be poisoned") {
  test::host_tensor<float> empty;
  empty.poison();  // memset of a null pointer, even of 0 bytes, is undefined
  CHECK(empty.is_poisoned());
}
