// SPDX-License-Identifier: Apache-2.0
// Expert parallelism on the host backend: a layer whose E experts are split over the W
// ranks of a simulated world gives the single-rank layer's results on the same global
// batch. Outputs and dx are bit-identical (every row is computed by the same expert with
// the same weights, and combine sums a token's choices in the same order). Parameter
// gradients are sums over rows whose order differs between the layouts when k > 1 (and the
// gate's is a sum of per-rank partial sums), so they agree to rounding there and exactly
// when k = 1.

#include "expert_parallel_reference.hpp"

#include <moe/moe.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

namespace {

using namespace moe;
using comm::simulated_world;
using comm::topology;
using expert_t = expert::ffn<act::gelu>;

/// Runs the W-rank layer and the single-rank layer on the same global batch and compares.
/// With `uniform_gate` every score ties, so that the last experts receive no row.
template <int K, class Layout, class Collective>
void check_against_single_rank(topology t, layer_args args, std::uint64_t seed,
                               bool uniform_gate = false) {
  CAPTURE(t.ranks_per_node);
  CAPTURE(t.nodes);
  int const w = t.size();
  index_t const tokens = args.gate.tokens, h = args.hidden;
  std::mt19937_64 rng(seed);
  test::one_rank_reference<gating::top_k<K>, Layout, expert_t> const ref(args, tokens * w, rng,
                                                                         uniform_gate);
  CHECK(ref.stats.dropped == 0);

  // W ranks, rank r routing tokens [r·T, (r+1)·T). Its expert gradients go back to their
  // place in `gathered`, its gate weight gradient (a partial sum) into the sum of all ranks'.
  using parallel_t = moe::layer<gating::top_k<K>, Layout, Collective, expert_t>;
  host_parameters<typename decltype(ref)::layer_type, double> gathered(ref.layer, {.biases = true});
  test::poison_gradients(gathered);
  test::host_tensor<double> gate_sum(h * args.gate.experts);
  std::vector<int> rows_match(w);
  std::vector<index_t> capacity(w), largest_load(w);
  simulated_world world(t);
  world.run([&](simulated_world::rank_communicator& comm) {
    int const r = comm.rank();
    auto const run = test::run_rank<parallel_t>(comm, args, ref, r * tokens, tokens);
    rows_match[r] = test::rows_equal(run.y, ref.y, r * tokens, h) &&
                    test::rows_equal(run.dx, ref.dx, r * tokens, h);
    for (std::size_t i = 1; i < run.part.shapes().size(); ++i)
      std::ranges::copy(
          run.part.gradients(i),
          ref.part_of(gathered.gradients(i), i, r, run.part.gradients(i).size()).begin());
    CHECK(run.stats.dropped == 0);
    capacity[r] = run.stats.capacity;
    largest_load[r] = *std::max_element(run.stats.load.begin(), run.stats.load.end());
    static std::mutex sum;  // the ranks are threads
    std::lock_guard lock(sum);
    for (std::size_t i = 0; i < gate_sum.data.size(); ++i)
      gate_sum.data[i] += run.part.gradients(0)[i];
  });

  CHECK(rows_match == std::vector<int>(w, 1));
  double const tolerance = K == 1 ? 0 : 1e-12;
  for (std::size_t i = 1; i < 5; ++i) {  // w1, b1, w2, b2
    CAPTURE(ref.whole.shapes()[i].name);
    CHECK(test::max_relative_error(gathered.gradients(i), ref.whole.gradients(i)) <= tolerance);
  }
  CHECK(test::max_relative_error(gate_sum.flat(), ref.whole.gradients(0)) <= 1e-12);
  if constexpr (Layout::drops_tokens) {
    // Dynamic capacity is the largest load over all ranks, the same on every rank.
    index_t const expected = *std::max_element(largest_load.begin(), largest_load.end());
    for (index_t c : capacity) CHECK(c == expected);
  }
}

}  // namespace

TEST_CASE("expert parallelism: the capacity layout over W ranks equals one rank") {
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  for (topology const t : {topology{1, 1}, topology{2, 1}, topology{1, 2}, topology{2, 2},
                           topology{4, 1}, topology{1, 4}, topology{4, 2}}) {
    check_against_single_rank<2, layout::capacity, comm::linear_all_to_all>(t, test::small_args(8),
                                                                            seed);
    check_against_single_rank<2, layout::capacity, comm::all_to_all_2dh>(t, test::small_args(8),
                                                                         seed);
    check_against_single_rank<1, layout::capacity, comm::all_to_all_2dh>(t, test::small_args(8),
                                                                         seed);
  }
}

TEST_CASE("expert parallelism: the ragged layout over W ranks equals one rank") {
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  for (topology const t : {topology{1, 1}, topology{2, 1}, topology{2, 2}, topology{4, 2}}) {
    check_against_single_rank<2, layout::ragged, comm::linear_all_to_all>(t, test::small_args(8),
                                                                          seed);
    check_against_single_rank<1, layout::ragged, comm::linear_all_to_all>(t, test::small_args(8),
                                                                          seed);
    layer_args padded = test::small_args(8);
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
    check_against_single_rank<1, layout::ragged, comm::linear_all_to_all>(t, test::small_args(4),
                                                                          seed, true);
    check_against_single_rank<1, layout::capacity, comm::linear_all_to_all>(t, test::small_args(4),
                                                                            seed, true);
  }
}

TEST_CASE("expert parallelism: bad compositions are rejected on every rank") {
  using parallel_t =
      moe::layer<gating::top_k<2>, layout::capacity, comm::linear_all_to_all, expert_t>;
  simulated_world world({.ranks_per_node = 3, .nodes = 1});
  CHECK_THROWS_WITH_AS(world.run([](simulated_world::rank_communicator& comm) {
    parallel_t layer(test::small_args(8), comm);  // 8 experts over 3 ranks
  }),
                       doctest::Contains("do not split evenly over 3 ranks"),
                       moe::invalid_argument);
}
