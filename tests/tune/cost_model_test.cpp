// SPDX-License-Identifier: Apache-2.0
// The all-to-all cost model and planner: hand-computed predictions, message plans against
// the destinations each algorithm's definition gives every rank, degenerate shapes, the
// single crossover, calibration, and bad input naming the argument.

#include "../support/expect.hpp"
#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <moe/tune.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace moe;
using doctest::Approx;
using tune::all_to_all_algorithm;

namespace {

constexpr auto linear = all_to_all_algorithm::linear;
constexpr auto two_dim = all_to_all_algorithm::two_dimensional_hierarchical;

using moe::test::expect_rejected;

/// Round constants, so that the predictions below can be done by hand.
constexpr tune::cost_model round_model{.nvlink = {.alpha = 1e-6, .beta = 1e9},
                                       .network = {.alpha = 2e-6, .beta = 1e8},
                                       .hbm = {.alpha = 0, .beta = 1e10},
                                       .fixed = 1e-5};

/// The messages rank `rank` sends, derived from DESIGN §5 and the topology alone (not from
/// the planner): phase by phase, what goes to its node and what leaves it.
tune::message_plan sends_of(all_to_all_algorithm algorithm, std::int64_t bytes, comm::topology t,
                            int rank) {
  int const n = t.ranks_per_node, m = t.nodes, p = t.size();
  tune::message_plan out{.algorithm = algorithm};
  auto send = [&](tune::phase_plan& phase, int dst, std::int64_t chunk) {
    if (dst == rank) {
      phase.self_bytes += chunk;
      return;
    }
    tune::traffic& link = t.same_node(rank, dst) ? phase.intra_node : phase.inter_node;
    link = link + tune::traffic{1, chunk};
  };
  if (algorithm == linear || n == 1 || m == 1) {
    out.phase_count = 1;
    for (int dst = 0; dst < p; ++dst) send(out.phases[0], dst, bytes / p);
    return out;
  }
  out.phase_count = 2;
  out.phases[0].reorder_bytes = out.phases[1].reorder_bytes = bytes;
  for (int l = 0; l < n; ++l) send(out.phases[0], t.rank_of(t.node_of(rank), l), bytes / n);
  for (int node = 0; node < m; ++node)
    send(out.phases[1], t.rank_of(node, t.local_of(rank)), bytes / m);
  return out;
}

}  // namespace

TEST_CASE("predict: hand-computed times of both algorithms") {
  // N = 4, M = 2 (P = 8), S = 8 MB, round_model; one rank, all times in seconds.
  comm::topology const shape{.ranks_per_node = 4, .nodes = 2};
  // linear: chunk S/P = 1e6.
  //   own copy 2·1e6/1e10 = 2e-4, fixed 1e-5,
  //   max(NVLink 3·1e-6 + 3e6/1e9 = 3.003e-3, network 4·2e-6 + 4e6/1e8 = 4.0008e-2)
  //   = 2e-4 + 1e-5 + 4.0008e-2 = 4.0218e-2
  CHECK(tune::predict(linear, 8'000'000, shape, round_model) == Approx(4.0218e-2));
  // 2DH: phase 0, chunk S/N = 2e6: reorder 2·8e6/1e10 = 1.6e-3, own copy 4e-4, fixed 1e-5,
  //      NVLink 3·1e-6 + 6e6/1e9 = 6.003e-3                        → 8.013e-3
  //      phase 1, chunk S/M = 4e6: reorder 1.6e-3, own copy 8e-4, fixed 1e-5,
  //      network 2e-6 + 4e6/1e8 = 4.0002e-2                        → 4.2412e-2
  //   = 5.0425e-2: at these sizes the network's bandwidth, not its latency, dominates and
  //   the linear algorithm wins.
  CHECK(tune::predict(two_dim, 8'000'000, shape, round_model) == Approx(5.0425e-2));
  CHECK(tune::choose(8'000'000, shape, round_model) == linear);

  // The defaults, N = 8, M = 16 (P = 128), S = 1 MiB: latency-bound.
  comm::topology const hgx{.ranks_per_node = 8, .nodes = 16};
  // linear: chunk 8192. own copy 2·8192/4e12 = 4.096e-9, fixed 1.5e-5,
  //   max(NVLink 7·0.5e-6 + 7·8192/360e9 = 3.659e-6,
  //       network 120·1e-6 + 120·8192/45e9 = 1.2e-4 + 2.1845333e-5 = 1.41845333e-4)
  //   = 1.56849429e-4
  CHECK(tune::predict(linear, 1 << 20, hgx) == Approx(1.56849429e-4));
  // 2DH: phase 0, chunk 131072: reorder 2·2^20/4e12 = 5.24288e-7, own copy 6.5536e-8,
  //      fixed 1.5e-5, NVLink 7·0.5e-6 + 7·131072/360e9 = 6.048622e-6 → 2.1638446e-5
  //      phase 1, chunk 65536: reorder 5.24288e-7, own copy 3.2768e-8, fixed 1.5e-5,
  //      network 15·1e-6 + 15·65536/45e9 = 3.6845333e-5               → 5.2402390e-5
  //   = 7.4040836e-5: 15 network messages instead of 120, 2.12× faster.
  CHECK(tune::predict(two_dim, 1 << 20, hgx) == Approx(7.4040836e-5));
  CHECK(tune::choose(1 << 20, hgx) == two_dim);
}

TEST_CASE("plan: linear sends P-1 messages of S/P, 2DH N-1 of S/N then M-1 of S/M") {
  for (int n : {1, 2, 3, 4, 8}) {
    for (int m : {1, 2, 3, 5}) {
      comm::topology const t{.ranks_per_node = n, .nodes = m};
      std::int64_t const p = t.size(), s = p * 1024;
      CAPTURE(n);
      CAPTURE(m);
      auto const lin = tune::plan(linear, s, t);
      REQUIRE(lin.phase_count == 1);
      CHECK(lin.phases[0].intra_node == tune::traffic{n - 1, (n - 1) * (s / p)});
      CHECK(lin.phases[0].inter_node == tune::traffic{p - n, (p - n) * (s / p)});
      CHECK(lin.phases[0].self_bytes == s / p);
      CHECK(lin.sent().messages == p - 1);
      CHECK(lin.reorder_bytes() == 0);

      auto const hier = tune::plan(two_dim, s, t);
      if (n > 1 && m > 1) {
        REQUIRE(hier.phase_count == 2);
        CHECK(hier.phases[0].intra_node == tune::traffic{n - 1, (n - 1) * (s / n)});
        CHECK(hier.phases[0].inter_node == tune::traffic{});
        CHECK(hier.phases[1].intra_node == tune::traffic{});
        CHECK(hier.phases[1].inter_node == tune::traffic{m - 1, (m - 1) * (s / m)});
        CHECK(hier.reorder_bytes() == 2 * s);
      } else {  // one level is trivial: 2DH is the linear exchange
        CHECK(hier.phase_count == 1);
        CHECK(hier.phases == lin.phases);
      }
      // Same bytes over the network, (M − 1)·S/M, whichever the algorithm.
      CHECK(hier.inter_node().bytes == lin.inter_node().bytes);
      CHECK(lin.inter_node().bytes == (m - 1) * (s / m));

      // Every rank sends what the algorithm's definition says it does.
      for (int rank = 0; rank < p; ++rank) {
        CHECK(sends_of(linear, s, t, rank) == lin);
        CHECK(sends_of(two_dim, s, t, rank) == hier);
      }
    }
  }
}

TEST_CASE("degenerate shapes: one node, one rank per node, one rank") {
  tune::cost_model const model{};
  for (comm::topology const t :
       {comm::topology{8, 1}, comm::topology{1, 8}, comm::topology{1, 1}}) {
    CAPTURE(t.ranks_per_node);
    CAPTURE(t.nodes);
    for (std::int64_t s : {std::int64_t{8}, std::int64_t{8} << 20, std::int64_t{8} << 30}) {
      // The two are one exchange: equal times, and the tie goes to linear.
      CHECK(tune::predict(two_dim, s, t, model) == tune::predict(linear, s, t, model));
      CHECK(tune::choose(s, t, model) == linear);
      CHECK(tune::plan(two_dim, s, t).reorder_bytes() == 0);
    }
    CHECK(tune::crossover_bytes(t, model) == 0);
  }
  // One rank sends nothing: no collective, no fixed cost; only its own chunk is copied.
  auto const alone = tune::plan(linear, 4096, {1, 1});
  CHECK(alone.sent() == tune::traffic{});
  CHECK(alone.self_bytes() == 4096);
  CHECK(tune::predict(linear, 4096, {1, 1}, model) == Approx(2 * 4096 / model.hbm.beta));
  // One node: no network; eight nodes of one rank: no NVLink.
  CHECK(tune::plan(linear, 64, {8, 1}).inter_node() == tune::traffic{});
  CHECK(tune::plan(linear, 64, {1, 8}).intra_node() == tune::traffic{});
}

TEST_CASE("crossover: 2DH wins small all-to-alls on many nodes, linear wins large ones") {
  // With the defaults, the linear algorithm pays (P − N)·alpha_net = 8·(M − 1) µs of network
  // latency (its NVLink latency hides behind it), 2DH (M − 1) µs plus a second fixed cost and
  // 7 NVLink latencies: 2DH saves 7·(M − 1) − 18.5 µs. On two nodes that is negative and 2DH
  // never wins. From four nodes on it wins below the size where its extra cost per byte,
  // about 3.5 ps (two reorders 1 ps, NVLink no longer hidden 2.4 ps, larger own copies),
  // eats the saving: (7·(M − 1) − 18.5 µs) / 3.5 ps, growing with M (24.6 MB on 16 nodes).
  tune::cost_model const model{};
  CHECK(tune::crossover_bytes({8, 2}, model) == 0);
  double previous = 0;
  for (int nodes = 4; nodes <= 256; nodes *= 2) {
    comm::topology const t{8, nodes};
    CAPTURE(nodes);
    double const crossover = tune::crossover_bytes(t, model);
    CHECK(crossover > previous);
    previous = crossover;
    CHECK(tune::choose(std::int64_t{1} << 10, t, model) == two_dim);
    CHECK(tune::choose(std::int64_t{1} << 30, t, model) == linear);
    CHECK(tune::choose(static_cast<std::int64_t>(crossover * 0.99), t, model) == two_dim);
    CHECK(tune::choose(static_cast<std::int64_t>(crossover * 1.01), t, model) == linear);
  }
  // The values for 16 and 256 nodes: 23.4 MiB and 482 MiB.
  CHECK(tune::crossover_bytes({8, 16}, model) == Approx(24571076.3).epsilon(1e-6));
  CHECK(tune::crossover_bytes({8, 256}, model) == Approx(505470391.4).epsilon(1e-6));
  // Free reorders and NVLink: 2DH costs nothing per byte more than the linear algorithm,
  // so it wins at every size.
  tune::cost_model free_local = model;
  free_local.nvlink.beta = free_local.hbm.beta = std::numeric_limits<double>::infinity();
  CHECK(tune::crossover_bytes({8, 16}, free_local) == std::numeric_limits<double>::infinity());
}

TEST_CASE("t_2dh - t_linear never decreases with S, whatever the constants: one crossover") {
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto log_uniform = [&](double low, double high) {
    std::uniform_real_distribution<double> u(std::log(low), std::log(high));
    return std::exp(u(rng));
  };
  auto any_link = [&] { return tune::link{log_uniform(1e-9, 1e-3), log_uniform(1e6, 1e14)}; };
  for (int trial = 0; trial < 2000; ++trial) {
    tune::cost_model const model{.nvlink = any_link(),
                                 .network = any_link(),
                                 .hbm = any_link(),
                                 .fixed = log_uniform(1e-9, 1e-3)};
    comm::topology const t{1 + static_cast<int>(rng() % 9), 1 + static_cast<int>(rng() % 64)};
    double const crossover = tune::crossover_bytes(t, model);
    double previous = -std::numeric_limits<double>::infinity();
    bool two_dim_won = true;
    for (std::int64_t s = 1; s < (std::int64_t{1} << 44); s = s * 3 / 2 + 1) {
      double const hier = tune::predict(two_dim, s, t, model);
      double const lin = tune::predict(linear, s, t, model);
      double const gap = hier - lin;
      REQUIRE(gap >= previous - 1e-12 * (hier + lin));  // to within rounding
      previous = gap;
      // Hence the winners form one run of 2DH, then one of linear.
      bool const wins = tune::choose(s, t, model) == two_dim;
      REQUIRE((two_dim_won || !wins));
      two_dim_won = wins;
      // ... below crossover_bytes and not from there on (away from rounding at S*).
      auto const size = static_cast<double>(s);
      if (std::abs(size - crossover) > 1e-9 * crossover) REQUIRE(wins == (size < crossover));
    }
  }
}

TEST_CASE("calibrate recovers alpha and beta from measured transfers") {
  tune::link const truth{.alpha = 1.5e-6, .beta = 42e9};
  std::vector<tune::calibration_sample> samples;
  for (std::int64_t messages : {1, 7, 63})
    for (std::int64_t bytes = 1024; bytes <= (std::int64_t{1} << 30); bytes *= 32)
      samples.push_back({messages, bytes, truth.seconds(messages, bytes)});
  tune::link const fitted = tune::calibrate(samples);
  CHECK(fitted.alpha == Approx(truth.alpha).epsilon(1e-9));
  CHECK(fitted.beta == Approx(truth.beta).epsilon(1e-9));

  // With ±2 % noise the fit stays within a few per cent.
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> noise(0.98, 1.02);
  auto noisy = samples;
  for (auto& s : noisy) s.seconds *= noise(rng);
  tune::link const rough = tune::calibrate(noisy);
  CHECK(rough.alpha == Approx(truth.alpha).epsilon(0.05));
  CHECK(rough.beta == Approx(truth.beta).epsilon(0.05));

  // Two samples are enough when they differ in shape.
  std::array<tune::calibration_sample, 2> const two{
      {{1, 0, truth.seconds(1, 0)}, {1, 1 << 20, truth.seconds(1, 1 << 20)}}};
  CHECK(tune::calibrate(two).alpha == Approx(truth.alpha));
  CHECK(tune::calibrate(two).beta == Approx(truth.beta));

  // Times that fall below the latency a positive alpha would imply: alpha clamps to 0.
  std::array<tune::calibration_sample, 2> const no_latency{{{1, 1000, 0.5e-6}, {2, 4000, 2.1e-6}}};
  tune::link const clamped = tune::calibrate(no_latency);
  CHECK(clamped.alpha == 0);
  CHECK(clamped.beta > 0);

  // A calibrated link goes straight into a model.
  tune::cost_model model{};
  model.network = fitted;
  CHECK(tune::predict(linear, 1 << 20, {8, 4}, model) > 0);
}

TEST_CASE("bad input is rejected, naming the argument") {
  comm::topology const good{8, 4};
  tune::cost_model const model{};
  for (comm::topology const t : {comm::topology{0, 4}, comm::topology{8, 0}, comm::topology{-1, 2},
                                 comm::topology{1 << 16, 1 << 16}}) {
    expect_rejected([&] { (void)tune::plan(linear, 1024, t); }, "topology");
    expect_rejected([&] { (void)tune::predict(two_dim, 1024, t); }, "topology");
    expect_rejected([&] { (void)tune::crossover_bytes(t); }, "topology");
  }
  for (std::int64_t s : {std::int64_t{0}, std::int64_t{-64}}) {
    expect_rejected([&] { (void)tune::plan(linear, s, good); }, "bytes_per_rank");
    expect_rejected([&] { (void)tune::predict(linear, s, good); }, "bytes_per_rank");
    expect_rejected([&] { (void)tune::choose(s, good); }, "bytes_per_rank");
  }
  // A plan is whole messages: S must split into P equal chunks. A prediction need not.
  expect_rejected([&] { (void)tune::plan(two_dim, 1000, good); }, "bytes_per_rank");
  CHECK(tune::predict(two_dim, 1000, good) > 0);

  auto with = [&](auto change) {
    tune::cost_model m = model;
    change(m);
    return m;
  };
  for (tune::cost_model const& m :
       {with([](auto& m) { m.nvlink.beta = 0; }), with([](auto& m) { m.network.beta = -1; }),
        with([](auto& m) { m.hbm.alpha = -1e-6; }), with([](auto& m) { m.fixed = -1; }),
        with([](auto& m) { m.fixed = std::nan(""); }),
        with([](auto& m) { m.network = {.alpha = 2e-6}; })}) {  // beta left at 0
    expect_rejected([&] { (void)tune::predict(linear, 1024, good, m); }, "model");
    expect_rejected([&] { (void)tune::choose(1024, good, m); }, "model");
    expect_rejected([&] { (void)tune::crossover_bytes(good, m); }, "model");
  }

  using sample = tune::calibration_sample;
  auto calibrate = [](std::vector<sample> const& s) { (void)tune::calibrate(s); };
  expect_rejected([&] { calibrate({}); }, "samples");
  expect_rejected([&] { calibrate({{1, 1024, 1e-6}}); }, "samples");
  // Distinct samples, but proportional: alpha and beta cannot be told apart.
  expect_rejected([&] { calibrate({{1, 1024, 1e-6}, {4, 4096, 4e-6}}); }, "samples");
  expect_rejected([&] { calibrate({{1, 1024, 1e-6}, {1, 1024, 1.1e-6}}); }, "samples");
  expect_rejected([&] { calibrate({{1, 1024, 1e-6}, {1, 4096, -1e-6}}); }, "samples");
  expect_rejected([&] { calibrate({{1, 1024, 1e-6}, {1, 4096, 0}}); }, "samples");
  expect_rejected([&] { calibrate({{1, 1024, 1e-6}, {1, 4096, std::nan("")}}); }, "samples");
  expect_rejected([&] { calibrate({{1, 1024, 1e-6}, {-1, 4096, 1e-6}}); }, "samples");
  expect_rejected([&] { calibrate({{1, 1024, 1e-6}, {0, 0, 1e-6}}); }, "samples");
  // Longer for fewer bytes: no positive bandwidth.
  expect_rejected([&] { calibrate({{1, 1024, 2e-6}, {1, 1 << 20, 1e-6}}); }, "samples");
}
