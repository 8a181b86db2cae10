// SPDX-License-Identifier: Apache-2.0
// What layer::stats reports on the host backend: the load and drops per expert that add up
// to the call's totals, GShard's unrouted 2nd choices, the gate's own aux loss by name, and
// the one-line formatter.

#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <moe/moe.hpp>

#include <numeric>
#include <string>
#include <vector>

namespace {

using namespace moe;

template <class Layer>
layer_stats forward_stats(layer_args const& args, std::uint64_t seed) {
  Layer const l(args);
  host_parameters<Layer, double> w(l);
  w.initialize(initializer::normal(1.0), seed);
  index_t const t = args.gate.tokens, h = args.hidden;
  test::host_tensor<double> x(t * h), y(t * h);
  std::mt19937_64 rng(seed);
  x.randomize(rng);
  std::vector<std::byte> ws(l.workspace_bytes(host));
  l.forward(host, x.cview(t, h), w.params(), y.view(t, h), ws);
  return l.stats(host, ws);
}

}  // namespace

TEST_CASE("stats: drops per expert add up to the call's, and the aux loss is named") {
  using layer_t = layer<gating::with<gating::top_k<2>, gating::switch_aux>, layout::capacity,
                        comm::single_rank, expert::glu<act::silu>>;
  layer_args const args{
      .gate = {.tokens = 64, .experts = 8, .capacity_factor = 0.5}, .hidden = 8, .ffn = 4};
  layer_stats const s = forward_stats<layer_t>(args, 3);
  REQUIRE(s.load.size() == 8);
  REQUIRE(s.dropped_per_expert.size() == 8);
  CHECK(s.dropped > 0);  // capacity factor 0.5 drops
  CHECK(std::accumulate(s.dropped_per_expert.begin(), s.dropped_per_expert.end(),
                        std::int64_t{0}) == s.dropped);
  CHECK(std::accumulate(s.load.begin(), s.load.end(), std::int64_t{0}) == 64 * 2);
  for (std::size_t e = 0; e < 8; ++e) {
    CHECK(s.dropped_per_expert[e] <= s.load[e]);
    CHECK(s.load[e] - s.dropped_per_expert[e] <= s.capacity);  // kept fit the capacity
  }
  CHECK(std::string(s.aux_loss_name) == "switch_aux");  // the gate's, not the default
  std::string const line = to_string(s);
  CHECK(line.find("switch_aux ") != std::string::npos);
  CHECK(line.find("dropped " + std::to_string(s.dropped)) != std::string::npos);
  CHECK(line.find("unrouted") == std::string::npos);  // nothing unrouted to report
}

TEST_CASE("stats: GShard's random routing reports the 2nd choices it left out") {
  using layer_t =
      layer<gating::preset::gshard, layout::capacity, comm::single_rank, expert::ffn<act::gelu>>;
  layer_args const args{.gate = {.tokens = 64, .experts = 4, .capacity_factor = 2.0, .seed = 1},
                        .hidden = 8,
                        .ffn = 4};
  layer_stats const s = forward_stats<layer_t>(args, 5);
  CHECK(s.unrouted > 0);
  CHECK(std::string(s.aux_loss_name) == "gshard_aux");
  // Unrouted choices count in no load and are not drops.
  CHECK(std::accumulate(s.load.begin(), s.load.end(), std::int64_t{0}) == 64 * 2 - s.unrouted);
  CHECK(to_string(s).find("unrouted " + std::to_string(s.unrouted)) != std::string::npos);
}
