// SPDX-License-Identifier: Apache-2.0
// 02_plan_all_to_all: why the all-to-all algorithm is chosen per size and world.
//
// Expert parallelism sends every rank's dispatched tokens to every other rank. The linear
// all-to-all does it in P − 1 messages per rank, most of them across the network; Tutel's
// two-dimensional hierarchical (2DH) one first exchanges inside the node, so that only M − 1
// larger messages cross it, at the price of two local reorders and a second phase. On many
// nodes with small messages the network's per-message latency dominates and 2DH wins; with
// large messages bandwidth dominates, both send the same bytes over the network, and the
// linear algorithm wins by skipping 2DH's extra work. Where the switch lies is what the
// cost model of moe/tune answers.
//
// This program prints the model's choice for 8 ranks per node (an HGX node) on 2..256 nodes
// and 1 KiB..1 GiB per rank, with the speed-up of the faster algorithm, and the size where
// each row switches. It then checks what the model guarantees: each row switches at most
// once, from 2DH to linear, exactly at `crossover_bytes`; both algorithms send the same bytes
// over the network; and, with these constants, the switch comes later on more nodes.
//
// Pure arithmetic: needs no GPU.   Usage: 02_plan_all_to_all

#include <moe/moe.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace {

using moe::tune::all_to_all_algorithm;

/// "1K", "256M", "1G": the column headings (sizes are powers of two).
std::string short_size(std::int64_t bytes) {
  char const* units[] = {"", "K", "M", "G", "T"};
  int unit = 0;
  while (bytes >= 1024 && bytes % 1024 == 0 && unit < 4) bytes /= 1024, ++unit;
  return std::to_string(bytes) + units[unit];
}

/// "23.4 MiB": the crossover sizes.
std::string readable_size(double bytes) {
  char const* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 4) bytes /= 1024, ++unit;
  char text[32];
  std::snprintf(text, sizeof text, "%.1f %s", bytes, units[unit]);
  return text;
}

int run() {
  // example-begin plan_all_to_all
  // The defaults describe one rank of an HGX node; override what differs, e.g.
  //   moe::tune::cost_model const model{.network = {.alpha = 2e-6, .beta = 25e9}};
  // or fit a link to measured transfers with moe::tune::calibrate.
  moe::tune::cost_model const model{};
  moe::comm::topology const world{.ranks_per_node = 8, .nodes = 16};
  std::int64_t const bytes_per_rank = std::int64_t{1} << 20;

  all_to_all_algorithm const best = moe::tune::choose(bytes_per_rank, world, model);
  double const seconds = moe::tune::predict(best, bytes_per_rank, world, model);
  // What one rank sends, phase by phase: what a trace of the exchange shows.
  moe::tune::message_plan const plan = moe::tune::plan(best, bytes_per_rank, world);
  // example-end plan_all_to_all
  std::printf("1 MiB per rank on 16 nodes of 8: %s, %.1f us, %lld messages in %d phases\n\n",
              std::string(moe::tune::name(best)).c_str(), seconds * 1e6,
              static_cast<long long>(plan.sent().messages), plan.phase_count);

  std::vector<std::int64_t> sizes;  // 1 KiB, 4 KiB, ..., 1 GiB
  for (std::int64_t s = std::int64_t{1} << 10; s <= (std::int64_t{1} << 30); s *= 4)
    sizes.push_back(s);

  std::printf(
      "faster all-to-all and its speed-up (slower / faster), 8 ranks per node, bytes per "
      "rank:\n");
  std::printf("%5s", "nodes");
  for (std::int64_t s : sizes) std::printf(" %9s", short_size(s).c_str());
  std::printf("\n");

  int failures = 0;
  auto fail = [&](std::string const& what) {
    std::fprintf(stderr, "check failed: %s\n", what.c_str());
    ++failures;
  };
  std::vector<std::string> crossover_lines;
  double previous_crossover = 0;
  for (int nodes = 2; nodes <= 256; nodes *= 2) {
    moe::comm::topology const t{.ranks_per_node = 8, .nodes = nodes};
    double const crossover = moe::tune::crossover_bytes(t, model);
    std::printf("%5d", nodes);
    bool linear_seen = false;
    for (std::int64_t s : sizes) {
      double const linear = moe::tune::predict(all_to_all_algorithm::linear, s, t, model);
      double const two_dim =
          moe::tune::predict(all_to_all_algorithm::two_dimensional_hierarchical, s, t, model);
      all_to_all_algorithm const choice = moe::tune::choose(s, t, model);
      bool const is_two_dim = choice == all_to_all_algorithm::two_dimensional_hierarchical;
      std::printf(" %4s %4.2f", is_two_dim ? "2dh" : "lin",
                  is_two_dim ? linear / two_dim : two_dim / linear);

      std::string const cell = std::to_string(nodes) + " nodes, " + short_size(s);
      if (is_two_dim && linear_seen) fail(cell + ": 2DH wins again after linear did");
      linear_seen = linear_seen || !is_two_dim;
      if (is_two_dim != (static_cast<double>(s) < crossover))
        fail(cell + ": the choice disagrees with crossover_bytes");
    }
    std::printf("\n");

    // Same network bytes, (M − 1)·S/M, in M − 1 messages instead of P − N.
    std::int64_t const s = std::int64_t{1} << 30;
    auto const linear_plan = moe::tune::plan(all_to_all_algorithm::linear, s, t);
    auto const two_dim_plan =
        moe::tune::plan(all_to_all_algorithm::two_dimensional_hierarchical, s, t);
    if (linear_plan.inter_node().bytes != two_dim_plan.inter_node().bytes ||
        two_dim_plan.inter_node().messages != nodes - 1 ||
        linear_plan.inter_node().messages != t.size() - 8)
      fail(std::to_string(nodes) + " nodes: the plans' network traffic is not as expected");

    // With these constants the linear algorithm's network latency, (P − N)·alpha, grows
    // eight times faster with the node count than 2DH's, while 2DH's extra cost per byte
    // barely changes: the switch moves to larger sizes on more nodes.
    if (crossover < previous_crossover)
      fail(std::to_string(nodes) + " nodes: the crossover is smaller than on fewer nodes");
    previous_crossover = crossover;
    crossover_lines.push_back(crossover == 0 ? "linear at every size"
                                             : "2dh below " + readable_size(crossover) +
                                                   ", linear from there");
  }

  std::printf("\ncrossover per node count (8 ranks per node):\n");
  for (std::size_t i = 0; i < crossover_lines.size(); ++i)
    std::printf("%5d nodes: %s\n", 2 << i, crossover_lines[i].c_str());

  if (failures != 0) {
    std::fprintf(stderr, "%d checks failed\n", failures);
    return 1;
  }
  std::printf(
      "\nchecks passed: one switch per row at crossover_bytes, equal network bytes, "
      "crossover growing with nodes\n");
  return 0;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (moe::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
