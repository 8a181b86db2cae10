// SPDX-License-Identifier: Apache-2.0
// Expert parallelism across real processes (run by mpiexec with 2 and 4 ranks, label mpi):
// the host layer over comm::mpi_communicator gives, on every rank, the one-rank layer's rows
// of y and dx bit for bit on the same global batch, and its gradients to rounding (see
// expert_parallel_reference.hpp): both layouts, linear and 2DH (2 ranks per pretend node),
// dynamic capacity, the same tokens on every rank or a different number on each (one rank
// with none); and a bad composition is rejected on every rank alike.

#include "../support/mpi.hpp"
#include "expert_parallel_reference.hpp"

#include <moe/comm/mpi_communicator.hpp>
#include <moe/moe.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using namespace moe;
using comm::mpi_communicator;
using expert_t = expert::ffn<act::gelu>;

/// Every rank computes the reference itself (the same seed gives the same batch), runs its
/// part over MPI, and checks its own rows and gradients; the gate gradient's partial sums are
/// added over the ranks first. Rank r routes `counts[r]` tokens (each args.gate.tokens when
/// `counts` is empty).
template <int K, class Layout, class Collective>
void check_against_single_rank(mpi_communicator& comm, layer_args args, std::uint64_t seed,
                               std::vector<index_t> counts = {}) {
  CAPTURE(comm.topology().ranks_per_node);
  int const w = comm.size(), r = comm.rank();
  index_t const h = args.hidden;
  if (counts.empty()) counts.assign(static_cast<std::size_t>(w), args.gate.tokens);
  index_t first = 0, global_tokens = 0;
  for (int v = 0; v < w; ++v) {
    if (v == r) first = global_tokens;
    global_tokens += counts[static_cast<std::size_t>(v)];
  }
  index_t const tokens = counts[static_cast<std::size_t>(r)];
  CAPTURE(tokens);
  std::mt19937_64 rng(seed);
  test::one_rank_reference<gating::top_k<K>, Layout, expert_t> const ref(args, global_tokens, rng,
                                                                         false, counts);
  using parallel_t = moe::layer<gating::top_k<K>, Layout, Collective, expert_t>;
  auto run = test::run_rank<parallel_t>(comm, args, ref, first, tokens);

  CHECK(test::rows_equal(run.y, ref.y, first, h));
  CHECK(test::rows_equal(run.dx, ref.dx, first, h));
  double const tolerance = K == 1 ? 0 : 1e-12;
  for (std::size_t i = 1; i < run.part.shapes().size(); ++i) {
    CAPTURE(run.part.shapes()[i].name);
    auto const want = ref.part_of(ref.whole.gradients(i), i, r, run.part.gradients(i).size());
    CHECK(test::max_relative_error(run.part.gradients(i), want) <= tolerance);
  }
  auto gate = run.part.gradients(0);
  std::vector<double> gate_sum(gate.size());
  MPI_Allreduce(gate.data(), gate_sum.data(), static_cast<int>(gate.size()), MPI_DOUBLE, MPI_SUM,
                MPI_COMM_WORLD);
  CHECK(test::max_relative_error(gate_sum, ref.whole.gradients(0)) <= 1e-12);
  CHECK(run.stats.dropped == 0);
  if constexpr (Layout::drops_tokens) {
    // Dynamic capacity is the largest load over all ranks, a fixed factor's is sized for the
    // largest T over them: the same on every rank either way.
    index_t largest = *std::max_element(run.stats.load.begin(), run.stats.load.end());
    MPI_Allreduce(MPI_IN_PLACE, &largest, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
    if (args.gate.capacity_factor == 0) CHECK(run.stats.capacity == largest);
    index_t smallest = run.stats.capacity, widest = run.stats.capacity;
    MPI_Allreduce(MPI_IN_PLACE, &smallest, 1, MPI_INT64_T, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &widest, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
    CHECK(smallest == widest);
  }
}

}  // namespace

TEST_CASE("expert parallelism over MPI: every rank's rows equal the one-rank layer's") {
  std::uint64_t const seed = test::shared_seed();
  INFO("seed " << seed);
  mpi_communicator flat(MPI_COMM_WORLD);
  // Two ranks per pretend node: with 4 ranks, 2DH runs both of its levels.
  mpi_communicator nodes(MPI_COMM_WORLD, {.ranks_per_node = 2});
  index_t const experts = 2 * flat.size();
  check_against_single_rank<2, layout::capacity, comm::linear_all_to_all>(
      flat, test::small_args(experts), seed);
  check_against_single_rank<2, layout::capacity, comm::all_to_all_2dh>(
      nodes, test::small_args(experts), seed);
  check_against_single_rank<1, layout::capacity, comm::all_to_all_2dh>(
      nodes, test::small_args(experts), seed);
  check_against_single_rank<2, layout::ragged, comm::linear_all_to_all>(
      flat, test::small_args(experts), seed);
  layer_args padded = test::small_args(experts);
  padded.expert_row_alignment = 4;
  check_against_single_rank<3, layout::ragged, comm::all_to_all_2dh>(nodes, padded, seed);
}

TEST_CASE("expert parallelism over MPI: skewed token counts, one rank empty, all on one rank") {
  std::uint64_t const seed = test::shared_seed();
  INFO("seed " << seed);
  mpi_communicator flat(MPI_COMM_WORLD);
  mpi_communicator nodes(MPI_COMM_WORLD, {.ranks_per_node = 2});
  int const w = flat.size();
  std::vector<index_t> skewed, one_rank(static_cast<std::size_t>(w), 0);
  for (int r = 0; r < w; ++r) skewed.push_back(r == 1 ? 0 : 1 + (5 * r) % 6);  // 1, 0, 5, 4
  one_rank.back() = 6;  // every token on the last rank
  index_t const experts = 2 * w;
  for (std::vector<index_t> const& counts : {skewed, one_rank}) {
    CAPTURE(counts.front());
    layer_args no_drops = test::small_args(experts);
    no_drops.gate.capacity_factor = static_cast<double>(experts);  // C from the largest T
    check_against_single_rank<2, layout::capacity, comm::linear_all_to_all>(flat, no_drops, seed,
                                                                            counts);
    check_against_single_rank<2, layout::capacity, comm::all_to_all_2dh>(
        nodes, test::small_args(experts), seed, counts);
    check_against_single_rank<2, layout::ragged, comm::all_to_all_2dh>(
        nodes, test::small_args(experts), seed, counts);
  }
}

TEST_CASE("expert parallelism over MPI: experts that do not split evenly are rejected alike") {
  mpi_communicator comm(MPI_COMM_WORLD);
  using parallel_t =
      moe::layer<gating::top_k<2>, layout::capacity, comm::linear_all_to_all, expert_t>;
  std::string const expected = "do not split evenly over " + std::to_string(comm.size()) + " ranks";
  CHECK_THROWS_WITH_AS(parallel_t(test::small_args(comm.size() + 1), comm),
                       doctest::Contains(expected.c_str()), moe::invalid_argument);
}
