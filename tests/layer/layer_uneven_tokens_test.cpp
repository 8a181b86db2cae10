// SPDX-License-Identifier: Apache-2.0
// Zero and uneven token counts per rank (expert parallelism, host backend): a rank may call
// the layer with any T, 0 included, and the ranks need not agree. Each W-rank run on a
// simulated world is compared with the one-rank layer on the concatenated global batch:
// outputs and dx bit-equal (every row meets the same expert with the same weights; combine
// sums a token's choices in the same order), parameter gradients to rounding (sums whose
// order differs). With the capacity layout the one-rank reference has its own capacity and
// priority order, so the comparisons use capacities that drop nothing, and the common C is
// checked separately against the capacity rule at the largest T.
//
// Every token carries its provenance: x[t][0] = its rank, x[t][1] = its index there, the rest
// random, so that a row that lands at the wrong token names where it came from.

#include "expert_parallel_reference.hpp"

#include <moe/moe.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace {

using namespace moe;
using comm::simulated_world;
using comm::topology;
using expert_t = expert::ffn<act::gelu>;

/// The first of a rank's rows that differs from the reference's rows from `first` on, named
/// by its rank, its index there and the provenance its input row carries; empty when none.
std::string first_wrong_row(std::vector<double> const& rows, test::host_tensor<double> const& want,
                            test::host_tensor<double> const& x, index_t first, int rank,
                            index_t hidden) {
  auto const tokens = static_cast<index_t>(rows.size()) / hidden;
  for (index_t t = 0; t < tokens; ++t) {
    auto const mine = rows.begin() + t * hidden;
    auto const row = static_cast<std::size_t>((first + t) * hidden);
    if (std::equal(mine, mine + hidden, want.data.begin() + static_cast<std::ptrdiff_t>(row)))
      continue;
    std::ostringstream out;
    out << "rank " << rank << " token " << t << " (x carries rank " << x.data[row] << ", token "
        << x.data[row + 1] << "): got " << mine[0] << " " << mine[1] << " …, want "
        << want.data[row] << " " << want.data[row + 1] << " …";
    return out.str();
  }
  return {};
}

/// A W-rank layer with `counts[r]` tokens on rank r against the one-rank layer on the global
/// batch (the ranks' tokens in rank order). Returns each rank's stats.
template <int K, class Layout, class Collective>
std::vector<layer_stats> check_against_single_rank(topology t, std::vector<index_t> const& counts,
                                                   layer_args args, std::uint64_t seed) {
  CAPTURE(t.ranks_per_node);
  CAPTURE(t.nodes);
  std::string counts_text;
  for (index_t n : counts) counts_text += std::to_string(n) + " ";
  CAPTURE(counts_text);
  int const w = t.size();
  REQUIRE(static_cast<int>(counts.size()) == w);
  index_t const h = args.hidden;
  std::vector<index_t> first(counts.size(), 0);  // each rank's first row of the global batch
  for (std::size_t r = 1; r < counts.size(); ++r) first[r] = first[r - 1] + counts[r - 1];
  index_t const global_tokens = first.back() + counts.back();
  std::mt19937_64 rng(seed);
  test::one_rank_reference<gating::top_k<K>, Layout, expert_t> const ref(args, global_tokens, rng,
                                                                         false, counts);
  REQUIRE(ref.stats.dropped == 0);

  // Each rank's expert gradients go back to their place in `gathered`; its gate weight
  // gradient (a partial sum over its tokens) into the sum of all ranks'.
  using parallel_t = moe::layer<gating::top_k<K>, Layout, Collective, expert_t>;
  host_parameters<typename decltype(ref)::layer_type, double> gathered(ref.layer, {.biases = true});
  test::poison_gradients(gathered);
  test::host_tensor<double> gate_sum(h * args.gate.experts);
  std::vector<std::string> wrong_y(counts.size()), wrong_dx(counts.size());
  std::vector<int> gate_gradient_zero(counts.size(), 0);
  std::vector<layer_stats> stats(counts.size());
  simulated_world world(t);
  world.run([&](simulated_world::rank_communicator& comm) {
    int const r = comm.rank();
    auto const ru = static_cast<std::size_t>(r);
    auto const run = test::run_rank<parallel_t>(comm, args, ref, first[ru], counts[ru]);
    wrong_y[ru] = first_wrong_row(run.y, ref.y, ref.x, first[ru], r, h);
    wrong_dx[ru] = first_wrong_row(run.dx, ref.dx, ref.x, first[ru], r, h);
    for (std::size_t i = 1; i < run.part.shapes().size(); ++i)
      std::ranges::copy(
          run.part.gradients(i),
          ref.part_of(gathered.gradients(i), i, r, run.part.gradients(i).size()).begin());
    gate_gradient_zero[ru] =
        std::ranges::all_of(run.part.gradients(0), [](double v) { return v == 0.0; });
    stats[ru] = run.stats;
    static std::mutex sum;  // the ranks are threads
    std::lock_guard lock(sum);
    for (std::size_t i = 0; i < gate_sum.data.size(); ++i)
      gate_sum.data[i] += run.part.gradients(0)[i];
  });

  for (std::size_t r = 0; r < counts.size(); ++r) {
    CAPTURE(r);
    CHECK_MESSAGE(wrong_y[r].empty(), "y differs at " << wrong_y[r]);
    CHECK_MESSAGE(wrong_dx[r].empty(), "dx differs at " << wrong_dx[r]);
    CHECK(stats[r].tokens == counts[r]);
    CHECK(stats[r].dropped == 0);
    CHECK(std::isfinite(stats[r].aux_loss));
    CHECK(std::isfinite(stats[r].z_loss));
    if (counts[r] == 0) {  // an empty call: no loss, no load, no gate gradient
      CHECK(gate_gradient_zero[r] == 1);
      CHECK(stats[r].aux_loss == 0);
      CHECK(stats[r].z_loss == 0);
      CHECK(std::ranges::all_of(stats[r].load, [](std::int64_t l) { return l == 0; }));
    }
    CHECK(stats[r].capacity == stats[0].capacity);  // one C, whatever each rank's T
  }
  // Every expert's gradients, from its rank (an empty rank's from the rows it received).
  for (std::size_t i = 1; i < 5; ++i) {  // w1, b1, w2, b2
    CAPTURE(ref.whole.shapes()[i].name);
    CHECK(test::max_relative_error(gathered.gradients(i), ref.whole.gradients(i)) <= 1e-12);
  }
  CHECK(test::max_relative_error(gate_sum.flat(), ref.whole.gradients(0)) <= 1e-12);
  return stats;
}

/// The provenance probe: experts that pass their rows through (relu(x + 64) − 64 with
/// identity weights, exact on the integers a row's provenance is written in) and k = 1
/// (weight 1), so y[t] must carry (rank, t) back: a row that comes back to the wrong token
/// names the token it belongs to.
template <class Layout, class Collective>
void check_provenance(topology t, std::vector<index_t> const& counts, std::uint64_t seed) {
  CAPTURE(t.ranks_per_node);
  CAPTURE(t.nodes);
  index_t const h = 4, e = 8;
  layer_args const args{.gate = {.tokens = 16,
                                 .experts = e,
                                 .capacity_factor = static_cast<double>(e),  // drops nothing
                                 .normalize = gating::renormalize::before_drops},
                        .hidden = h,
                        .ffn = h};
  using probe_t = moe::layer<gating::top_k<1>, Layout, Collective, expert::ffn<act::relu>>;
  std::vector<std::string> misrouted(counts.size());
  simulated_world world(t);
  world.run([&](simulated_world::rank_communicator& comm) {
    auto const r = static_cast<std::size_t>(comm.rank());
    index_t const tokens = counts[r], local_e = e / comm.size();
    probe_t layer(args, comm);
    host_parameters<probe_t, double> w(layer, {.biases = true});
    std::mt19937_64 gate_rng(seed);  // the same gate on every rank
    test::randomize(w.values(0), gate_rng, 0.5);
    for (std::size_t i = 1; i < 5; ++i) std::ranges::fill(w.values(i), 0.0);
    for (index_t local = 0; local < local_e; ++local)
      for (index_t j = 0; j < h; ++j) {
        auto const diagonal = static_cast<std::size_t>((local * h + j) * h + j);
        w.values(1)[diagonal] = w.values(3)[diagonal] = 1.0;  // w1, w2 (E_l, H, H): identity
        w.values(2)[static_cast<std::size_t>(local * h + j)] = 64.0;   // b1
        w.values(4)[static_cast<std::size_t>(local * h + j)] = -64.0;  // b2
      }
    std::mt19937_64 rng(seed + r + 1);
    test::host_tensor<double> x(tokens * h), y(tokens * h);
    x.randomize(rng);
    test::write_provenance(x.view(tokens, h), static_cast<int>(r));
    y.poison();
    std::vector<std::byte> ws(layer.workspace_bytes(host));
    layer.forward(host, x.cview(tokens, h), w.params(), y.view(tokens, h), ws);
    for (index_t i = 0; i < tokens && misrouted[r].empty(); ++i) {
      double const from_rank = y.data[static_cast<std::size_t>(i * h)];
      double const from_token = y.data[static_cast<std::size_t>(i * h + 1)];
      if (from_rank != static_cast<double>(r) || from_token != static_cast<double>(i)) {
        std::ostringstream out;
        out << "rank " << r << " token " << i << " got the row of rank " << from_rank << " token "
            << from_token;
        misrouted[r] = out.str();
      }
    }
  });
  for (std::string const& m : misrouted) CHECK_MESSAGE(m.empty(), m);
}

/// Tutel's rule, written out: k · ⌊f · ⌈S/E⌉⌋.
index_t tutel_rule(int k, double f, index_t tokens, index_t experts) {
  return k * static_cast<index_t>(
                 std::floor(f * static_cast<double>((tokens + experts - 1) / experts)));
}

layer_args uneven_args(index_t experts, double capacity_factor) {
  return {.gate = {.tokens = 16,
                   .experts = experts,
                   .capacity_factor = capacity_factor,
                   .normalize = gating::renormalize::before_drops},
          .hidden = 5,
          .ffn = 7};
}

/// Both collectives, both layouts (the capacity one with a factor that drops nothing and a
/// dynamic one), on topology t with these counts.
void check_every_composition(topology t, std::vector<index_t> const& counts, std::uint64_t seed) {
  index_t const experts = 8, largest = *std::max_element(counts.begin(), counts.end());
  // f = E gives k · E · ⌈T/E⌉ ≥ k · T slots: no expert overflows on one rank or many.
  double const no_drops = static_cast<double>(experts);
  for (auto const& stats : {check_against_single_rank<2, layout::capacity, comm::linear_all_to_all>(
                                t, counts, uneven_args(experts, no_drops), seed),
                            check_against_single_rank<2, layout::capacity, comm::all_to_all_2dh>(
                                t, counts, uneven_args(experts, no_drops), seed)})
    CHECK(stats[0].capacity == tutel_rule(2, no_drops, largest, experts));
  check_against_single_rank<2, layout::capacity, comm::all_to_all_2dh>(
      t, counts, uneven_args(experts, 0.0), seed);  // dynamic: the largest load over the ranks
  check_against_single_rank<1, layout::capacity, comm::linear_all_to_all>(
      t, counts, uneven_args(experts, no_drops), seed);
  check_against_single_rank<2, layout::ragged, comm::linear_all_to_all>(
      t, counts, uneven_args(experts, 1.0), seed);
  check_against_single_rank<2, layout::ragged, comm::all_to_all_2dh>(
      t, counts, uneven_args(experts, 1.0), seed);
  check_provenance<layout::capacity, comm::linear_all_to_all>(t, counts, seed);
  check_provenance<layout::capacity, comm::all_to_all_2dh>(t, counts, seed);
  check_provenance<layout::ragged, comm::linear_all_to_all>(t, counts, seed);
  check_provenance<layout::ragged, comm::all_to_all_2dh>(t, counts, seed);
}

}  // namespace

TEST_CASE("uneven tokens: one rank with no tokens") {
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  check_every_composition(topology{2, 1}, {0, 6}, seed);
  check_every_composition(topology{2, 1}, {6, 0}, seed);
  check_every_composition(topology{2, 2}, {5, 0, 3, 6}, seed);
}

TEST_CASE("uneven tokens: no rank has a token") {
  // Every call empty: C is 0 with Tutel's rule, and the [E, 0, H] blocks are still exchanged.
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  check_every_composition(topology{2, 1}, {0, 0}, seed);
  check_every_composition(topology{2, 2}, {0, 0, 0, 0}, seed);
}

TEST_CASE("uneven tokens: every token on one rank") {
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  check_every_composition(topology{1, 2}, {0, 9}, seed);
  check_every_composition(topology{2, 2}, {0, 0, 11, 0}, seed);
}

TEST_CASE("uneven tokens: skewed counts") {
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  check_every_composition(topology{2, 1}, {1, 13}, seed);
  check_every_composition(topology{2, 2}, {1, 7, 0, 13}, seed);
  check_every_composition(topology{4, 1}, {16, 2, 9, 1}, seed);
}

TEST_CASE("uneven tokens: the capacity layout sizes C for the largest T over the ranks") {
  // A factor that drops: every rank's C is the rule at the largest T (13 here), not at its
  // own, and a rank's drops are those of its own tokens under that C. A zero gate weight
  // ties every score, so every token picks experts 0 and 1 and the drops are known.
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::vector<index_t> const counts{1, 7, 0, 13};
  layer_args const args = uneven_args(8, 1.0);
  index_t const expected = tutel_rule(2, 1.0, 13, 8);
  using parallel_t = moe::layer<gating::top_k<2>, layout::capacity, comm::all_to_all_2dh, expert_t>;
  std::vector<layer_stats> stats(counts.size());
  std::vector<index_t> router_dropped(counts.size(), -1);
  simulated_world world(topology{2, 2});
  world.run([&](simulated_world::rank_communicator& comm) {
    auto const r = static_cast<std::size_t>(comm.rank());
    index_t const tokens = counts[r], h = args.hidden;
    parallel_t layer(args, comm);
    host_parameters<parallel_t, double> w(layer);
    w.initialize(initializer::uniform(0.5), 1);
    std::ranges::fill(w.values(0), 0.0);
    std::mt19937_64 rng(seed + r);
    test::host_tensor<double> x(tokens * h), y(tokens * h);
    x.randomize(rng);
    std::vector<std::byte> ws(layer.workspace_bytes(host));
    layer.forward(host, x.cview(tokens, h), w.params(), y.view(tokens, h), ws);
    stats[r] = layer.stats(host, ws);
    // The router alone on this rank's tokens, told the same T to size for.
    gating::gate_args g = args.gate;
    g.capacity_tokens = 13;
    std::vector<std::byte> routing_ws(1 << 16);
    workspace_carver carver(workspace{routing_ws.data(), routing_ws.size()});
    gating::host_routing routing = gating::carve_host_routing(carver, 16, tokens, 8, 2);
    auto const summary = gating::route(host, gating::top_k<2>{}, g, x.cview(tokens, h),
                                       w.params().gate_weight, routing);
    CHECK(summary.capacity == expected);
    router_dropped[r] = summary.dropped;
  });
  for (std::size_t r = 0; r < counts.size(); ++r) {
    CAPTURE(r);
    CHECK(stats[r].capacity == expected);
    CHECK(stats[r].tokens == counts[r]);
    CHECK(stats[r].dropped == router_dropped[r]);
    CHECK(stats[r].expert_rows == 8 * expected);
  }
  CHECK(stats[3].dropped == 2 * (13 - expected));  // experts 0 and 1 keep C of 13 each
}

namespace {

/// One rank, no tokens: forward, backward and stats are legal, write nothing through the
/// empty views, and give zero gradients and losses (finite, with both coefficients on).
template <class Gate, class Layout>
void check_empty_call(index_t expected_capacity) {
  layer_args args = uneven_args(8, 1.0);
  args.gate.aux_loss_coef = 0.01;
  args.gate.z_loss_coef = 0.001;
  using layer_t = moe::layer<Gate, Layout, comm::single_rank, expert_t>;
  layer_t layer(args);
  host_parameters<layer_t, double> w(layer, {.biases = true});
  std::mt19937_64 rng(3);
  test::randomize(w, rng, 0.5);
  test::poison_gradients(w);
  index_t const h = args.hidden;
  test::host_tensor<double> sentinel(4 * h);
  sentinel.poison();
  auto const empty = make_view(sentinel.data.data(), 0, h);
  std::vector<std::byte> ws(layer.workspace_bytes(host));
  CHECK(layer
            .template can_implement<double>(host, as_const(empty), w.params(), empty,
                                            {ws.data(), ws.size()})
            .ok());
  layer.forward(host, as_const(empty), w.params(), empty, ws);
  layer.backward(host, as_const(empty), w.params(), empty, w.gradients(), ws);
  CHECK(sentinel.is_poisoned());
  for (std::size_t i = 0; i < w.shapes().size(); ++i) {
    CAPTURE(w.shapes()[i].name);
    CHECK(std::ranges::all_of(w.gradients(i), [](double v) { return v == 0.0; }));
  }
  layer_stats const s = layer.stats(host, ws);
  CHECK(s.tokens == 0);
  CHECK(s.capacity == expected_capacity);
  CHECK(s.dropped == 0);
  CHECK(s.aux_loss == 0);
  CHECK(s.z_loss == 0);
  CHECK(s.loss == 0);
  CHECK(std::ranges::all_of(s.load, [](std::int64_t l) { return l == 0; }));
  CHECK(std::ranges::all_of(s.dropped_per_expert, [](std::int64_t d) { return d == 0; }));
  // A call after the empty one works on the same workspace.
  test::host_tensor<double> x(3 * h), y(3 * h);
  x.randomize(rng);
  y.poison();
  layer.forward(host, x.cview(3, h), w.params(), y.view(3, h), ws);
  CHECK(!y.is_poisoned());
}

}  // namespace

TEST_CASE("uneven tokens: an empty call on one rank") {
  // The capacity rules at T = 0: Tutel's gives 0, GShard's its floor of 4 slots.
  check_empty_call<gating::top_k<2>, layout::capacity>(0);
  check_empty_call<gating::top_k<2>, layout::ragged>(0);
  check_empty_call<gating::top_k<1>, layout::capacity>(0);
  check_empty_call<gating::preset::gshard, layout::capacity>(4);
}

TEST_CASE("uneven tokens: the capacity rules at T = 0, and capacity_tokens") {
  for (auto const& [rounding, want] :
       {std::pair{gating::capacity_rounding::tutel, index_t{0}},
        std::pair{gating::capacity_rounding::gshard, index_t{4}},
        std::pair{gating::capacity_rounding::deepspeed, index_t{4}},  // min_capacity
        std::pair{gating::capacity_rounding::megatron, index_t{0}},
        std::pair{gating::capacity_rounding::switch_tf, index_t{4}}}) {
    CAPTURE(static_cast<int>(rounding));
    gating::gate_args g{.tokens = 16, .experts = 8, .capacity_factor = 1.25};
    CHECK(gating::resolve_capacity(gating::capacity_args_of(g, 2, rounding, 0), 0) == want);
    // Sized for 13 tokens, an empty call has the capacity of 13.
    g.capacity_tokens = 13;
    CHECK(gating::resolve_capacity(gating::capacity_args_of(g, 2, rounding, 0), 0) ==
          gating::resolve_capacity(
              gating::capacity_args_of(
                  gating::gate_args{.tokens = 16, .experts = 8, .capacity_factor = 1.25}, 2,
                  rounding, 13),
              0));
  }
  gating::gate_args g{.tokens = 16, .experts = 8, .groups = 2};
  g.capacity_tokens = 6;
  CHECK(gating::check_call_tokens(g, 0).ok());
  CHECK(gating::check_call_tokens(g, 6).ok());
  CHECK(!gating::check_call_tokens(g, 8).ok());  // fewer than the call's
  g.capacity_tokens = 7;
  CHECK(!gating::check_call_tokens(g, 4).ok());  // not a multiple of the groups
}

TEST_CASE("uneven tokens: the layer sets capacity_tokens itself") {
  layer_args args = uneven_args(8, 1.0);
  args.gate.capacity_tokens = 4;
  using layer_t = moe::layer<gating::top_k<2>, layout::capacity, comm::single_rank, expert_t>;
  status const s = layer_t::can_implement(args);
  CHECK(!s.ok());
  CHECK(s.message().find("the layer's to set") != std::string::npos);
}
