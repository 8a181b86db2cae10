// SPDX-License-Identifier: Apache-2.0
// Expert parallelism on the host backend: a layer whose E experts are split over the W
// ranks of a simulated world gives the single-rank layer's results on the same global
// batch. Outputs and dx are bit-identical (every row is computed by the same expert with
// the same weights, and combine sums a token's choices in the same order). Parameter
// gradients are sums over rows whose order differs between the layouts when k > 1 (and the
// gate's is a sum of per-rank partial sums), so they agree to rounding there and exactly
// when k = 1.

#include "../support/parameters.hpp"

#include <moe/moe.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using namespace moe;
using comm::simulated_world;
using comm::topology;
using expert_t = expert::ffn<act::gelu>;

/// The largest error relative to want's largest magnitude; NaN where got holds one (a
/// poisoned element never written), which std::max would pass over.
double max_relative_error(span<double const> got, span<double const> want) {
  double worst = 0, scale = 0;
  for (double v : want) scale = std::max(scale, std::abs(v));
  for (std::size_t i = 0; i < got.size(); ++i) {
    double const error = std::abs(got[i] - want[i]) / std::max(scale, 1e-300);
    if (std::isnan(error) || error > worst) worst = error;
  }
  return worst;
}

/// Runs the W-rank layer and the single-rank layer on the same global batch and compares.
/// With `uniform_gate` every score ties, so that every token picks the lowest experts and
/// the last experts receive no row.
template <int K, class Layout, class Collective>
void check_against_single_rank(topology t, layer_args args, std::uint64_t seed,
                               bool uniform_gate = false) {
  CAPTURE(t.ranks_per_node);
  CAPTURE(t.nodes);
  int const w = t.size();
  index_t const tokens = args.gate.tokens, global_tokens = tokens * w, h = args.hidden;
  index_t const e = args.gate.experts, local_e = e / w;
  std::mt19937_64 rng(seed);

  // The reference: one rank, all experts, all tokens.
  layer_args global_args = args;
  global_args.gate.tokens = global_tokens;
  using single_t = moe::layer<gating::top_k<K>, Layout, comm::single_rank, expert_t>;
  single_t single(global_args);
  host_parameters<single_t, double> whole(single, {.biases = true});
  test::randomize(whole, rng, 0.5);
  if (uniform_gate) std::fill(whole.values(0).begin(), whole.values(0).end(), 0.0);
  test::host_tensor<double> x(global_tokens * h), dy(global_tokens * h);
  x.randomize(rng);
  dy.randomize(rng);
  std::vector<std::byte> ws(single.workspace_bytes(host));
  test::host_tensor<double> y_ref(global_tokens * h), dx_ref(global_tokens * h);
  single.forward(host, x.cview(global_tokens, h), whole.params(), y_ref.view(global_tokens, h), ws);
  single.backward(host, dy.cview(global_tokens, h), whole.params(), dx_ref.view(global_tokens, h),
                  whole.gradients(), ws);
  CHECK(single.stats(host, ws).dropped == 0);

  // W ranks: rank r routes tokens [r·T, (r+1)·T) and holds experts [r·E_l, (r+1)·E_l), its
  // part of `whole`'s values. Its expert gradients go back to their place in `gathered`, its
  // gate weight gradient (a partial sum over its tokens) to gate_grads[r].
  test::host_tensor<double> y(global_tokens * h), dx(global_tokens * h);
  host_parameters<single_t, double> gathered(single, {.biases = true});
  std::vector<test::host_tensor<double>> gate_grads(w, test::host_tensor<double>(h * e));
  y.poison();
  dx.poison();
  test::poison_gradients(gathered);
  std::vector<index_t> capacity(w), largest_load(w);
  using parallel_t = moe::layer<gating::top_k<K>, Layout, Collective, expert_t>;
  simulated_world world(t);
  world.run([&](simulated_world::rank_communicator& comm) {
    int const r = comm.rank();
    parallel_t layer(args, comm);
    REQUIRE(layer.expert_shape().experts == local_e);
    REQUIRE(layer.first_expert() == r * local_e);
    host_parameters<parallel_t, double> part(layer, {.biases = true});
    test::poison_gradients(part);
    // Tensor i of this rank within the whole layer's: every rank holds the gate weight (0)
    // whole; the expert tensors are expert-major, so its experts are one run of them.
    auto within = [&](auto whole_tensor, std::size_t i) {
      std::size_t const n = part.values(i).size();
      return i == 0 ? whole_tensor : whole_tensor.subspan(static_cast<std::size_t>(r) * n, n);
    };
    for (std::size_t i = 0; i < part.shapes().size(); ++i)
      std::ranges::copy(within(whole.values(i), i), part.values(i).begin());
    std::vector<std::byte> rank_ws(layer.workspace_bytes(host));
    auto rows = [&](auto& tensor) { return tensor.data.data() + r * tokens * h; };
    layer.forward(host, make_view(static_cast<double const*>(rows(x)), tokens, h), part.params(),
                  make_view(rows(y), tokens, h), rank_ws);
    layer.backward(host, make_view(static_cast<double const*>(rows(dy)), tokens, h), part.params(),
                   make_view(rows(dx), tokens, h), part.gradients(), rank_ws);
    std::ranges::copy(part.gradients(0), gate_grads[static_cast<std::size_t>(r)].data.begin());
    for (std::size_t i = 1; i < part.shapes().size(); ++i)
      std::ranges::copy(part.gradients(i), within(gathered.gradients(i), i).begin());
    auto const s = layer.stats(host, rank_ws);
    CHECK(s.dropped == 0);
    capacity[static_cast<std::size_t>(r)] = s.capacity;
    largest_load[static_cast<std::size_t>(r)] = *std::max_element(s.load.begin(), s.load.end());
  });

  CHECK(y.data == y_ref.data);
  CHECK(dx.data == dx_ref.data);
  double const tolerance = K == 1 ? 0 : 1e-12;
  for (std::size_t i = 1; i < 5; ++i) {  // w1, b1, w2, b2
    CAPTURE(whole.shapes()[i].name);
    CHECK(max_relative_error(gathered.gradients(i), whole.gradients(i)) <= tolerance);
  }
  test::host_tensor<double> gate_sum(h * e);
  for (auto const& gg : gate_grads)
    for (std::size_t i = 0; i < gate_sum.data.size(); ++i) gate_sum.data[i] += gg.data[i];
  CHECK(max_relative_error(gate_sum.flat(), whole.gradients(0)) <= 1e-12);
  if constexpr (Layout::drops_tokens) {
    // Dynamic capacity is the largest load over all ranks, the same on every rank.
    index_t const expected = *std::max_element(largest_load.begin(), largest_load.end());
    for (index_t c : capacity) CHECK(c == expected);
  }
}

layer_args small_args(index_t experts) {
  return {.gate = {.tokens = 6,
                   .experts = experts,
                   .capacity_factor = 0.0f,  // dynamic: nothing dropped, on one rank or many
                   .normalize = gating::renormalize::before_drops},
          .hidden = 5,
          .ffn = 7};
}

}  // namespace

TEST_CASE("expert parallelism: the capacity layout over W ranks equals one rank") {
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  for (topology const t : {topology{1, 1}, topology{2, 1}, topology{1, 2}, topology{2, 2},
                           topology{4, 1}, topology{1, 4}, topology{4, 2}}) {
    check_against_single_rank<2, layout::capacity, comm::linear_all_to_all>(t, small_args(8), seed);
    check_against_single_rank<2, layout::capacity, comm::all_to_all_2dh>(t, small_args(8), seed);
    check_against_single_rank<1, layout::capacity, comm::all_to_all_2dh>(t, small_args(8), seed);
  }
}

TEST_CASE("expert parallelism: the ragged layout over W ranks equals one rank") {
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  for (topology const t : {topology{1, 1}, topology{2, 1}, topology{2, 2}, topology{4, 2}}) {
    check_against_single_rank<2, layout::ragged, comm::linear_all_to_all>(t, small_args(8), seed);
    check_against_single_rank<1, layout::ragged, comm::linear_all_to_all>(t, small_args(8), seed);
    layer_args padded = small_args(8);
    padded.expert_row_alignment = 4;
    check_against_single_rank<3, layout::ragged, comm::linear_all_to_all>(t, padded, seed);
  }
}

TEST_CASE("expert parallelism: experts that receive no row, last in the batch") {
  // Every token picks expert 0: on each rank the last local experts' pieces are empty and
  // begin at the end of the expert batch, a row no view may index.
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  for (topology const t : {topology{2, 1}, topology{2, 2}}) {
    check_against_single_rank<1, layout::ragged, comm::linear_all_to_all>(t, small_args(4), seed,
                                                                          true);
    check_against_single_rank<1, layout::capacity, comm::linear_all_to_all>(t, small_args(4), seed,
                                                                            true);
  }
}

TEST_CASE("expert parallelism: bad compositions are rejected on every rank") {
  using parallel_t =
      moe::layer<gating::top_k<2>, layout::capacity, comm::linear_all_to_all, expert_t>;
  simulated_world world({.ranks_per_node = 3, .nodes = 1});
  CHECK_THROWS_WITH_AS(world.run([](simulated_world::rank_communicator& comm) {
    parallel_t layer(small_args(8), comm);  // 8 experts over 3 ranks
  }),
                       doctest::Contains("do not split evenly over 3 ranks"),
                       moe::invalid_argument);

  // With a capacity, every rank must route as many tokens.
  simulated_world two({.ranks_per_node = 2, .nodes = 1});
  layer_args const args = small_args(4);
  std::vector<int> rejected(2, 0);
  CHECK_THROWS_AS(two.run([&](simulated_world::rank_communicator& comm) {
    parallel_t layer(args, comm);
    test::host_tensor<float> x(args.gate.tokens * args.hidden), y(args.gate.tokens * args.hidden);
    // One generator per rank: the ranks are threads (ThreadSanitizer saw them share one).
    std::mt19937_64 rank_rng(2 + static_cast<std::uint64_t>(comm.rank()));
    x.randomize(rank_rng);
    index_t const tokens = comm.rank() == 0 ? args.gate.tokens : args.gate.tokens - 1;
    host_parameters<parallel_t, float> w(layer);
    w.initialize(initializer::uniform(0.5), 1);  // each rank its experts' part of one draw
    std::vector<std::byte> ws(layer.workspace_bytes(host));
    try {
      layer.forward(host, x.cview(tokens, args.hidden), w.params(), y.view(tokens, args.hidden),
                    ws);
    } catch (moe::invalid_argument const& e) {
      rejected[static_cast<std::size_t>(comm.rank())] =
          std::string(e.what()).find("every rank routes as many tokens") != std::string::npos;
      throw;
    }
  }),
                  moe::invalid_argument);
  CHECK(rejected == std::vector<int>{1, 1});
}
