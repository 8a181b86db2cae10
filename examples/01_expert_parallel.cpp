// SPDX-License-Identifier: Apache-2.0
// 01_expert_parallel: one MoE layer with its experts split over several ranks.
//
// A mixture of experts grows by adding experts, and the experts of a large model do not fit
// on one GPU: expert parallelism puts E/W of them on each of W ranks and moves every token
// to the ranks of its experts and back with an all-to-all. This program runs one layer
// (top-2 of 8 GELU FFN experts, dynamic capacity, so nothing is dropped) on a global batch
// of 64 tokens split over W ranks, forward and backward, and prints each rank's loads and a
// checksum of the outputs and input gradients. The checksum is the same for every W: the
// split changes where the experts run, not what they compute.
//
// `--simulate W` runs W virtual ranks (threads) of a simulated world in this process, on
// the host backend: no GPU or network is needed. With no argument it runs W = 1, 2, 4 and
// 8 and fails unless all four checksums agree. `--layout ragged` uses the dropless layout
// (rows sorted by expert, all_to_allv) instead of the capacity layout.
//
//   01_expert_parallel [--simulate W] [--layout capacity|ragged]

#include <moe/moe.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace {

using gate_t = moe::gating::top_k<2>;
using expert_t = moe::expert::ffn<moe::act::gelu>;
using collective_t = moe::comm::all_to_all_2dh;  // Tutel's hierarchical all-to-all

constexpr moe::index_t global_tokens = 64, hidden = 16, ffn = 32, experts = 8;

/// The global batch and its output gradient; each rank takes its tokens' rows.
struct batch {
  std::vector<float> x, dy;

  batch() {
    std::mt19937_64 engine(2024);  // the same numbers for every W
    auto fill = [&](std::vector<float>& v, std::size_t n) {
      v.resize(n);
      for (auto& value : v)
        value = static_cast<float>(static_cast<double>(engine() >> 11) * 0x1.0p-52 - 1);
    };
    fill(x, global_tokens * hidden);
    fill(dy, global_tokens * hidden);
  }
};

/// Runs the layer on W virtual ranks; returns the checksum of y and dx over all tokens.
template <class Layout>
double run(batch const& m, int ranks) {
  using layer_t = moe::layer<gate_t, Layout, collective_t, expert_t>;
  moe::index_t const tokens = global_tokens / ranks, local_experts = experts / ranks;
  moe::layer_args const args{
      .gate = {.tokens = tokens,  // per rank
               .experts = experts,
               .capacity_factor = 0.0,  // dynamic: the largest load, all ranks
               .normalize = moe::gating::renormalize::before_drops},
      .hidden = hidden,
      .ffn = ffn};
  std::vector<float> y(global_tokens * hidden), dx(global_tokens * hidden);
  std::vector<std::string> report(static_cast<std::size_t>(ranks));

  // Two ranks per node where there are at least two, so that 2DH has both levels.
  int const per_node = ranks >= 2 ? 2 : 1;
  moe::comm::simulated_world world({.ranks_per_node = per_node, .nodes = ranks / per_node});
  world.run([&](moe::comm::simulated_world::rank_communicator& comm) {
    int const r = comm.rank();
    layer_t layer(args, comm);  // borrows comm; experts [r·E/W, (r+1)·E/W) live here

    // This rank's parameters, the whole gate and its own experts, and their gradients. The
    // initialiser draws each expert's values from its global index: the same model for any W.
    moe::host_parameters<layer_t, float> w(layer, {.biases = true});
    w.initialize(moe::initializer::torch_linear(), 2024);

    // This rank's tokens: rows [r·T, (r+1)·T) of the global batch.
    moe::index_t const first = r * tokens * hidden;
    auto const x = moe::make_view(m.x.data() + first, tokens, hidden);
    auto const dy = moe::make_view(m.dy.data() + first, tokens, hidden);
    std::vector<std::byte> ws(layer.workspace_bytes(moe::host));
    layer.forward(moe::host, x, w.params(), moe::make_view(y.data() + first, tokens, hidden), ws);
    layer.backward(moe::host, dy, w.params(), moe::make_view(dx.data() + first, tokens, hidden),
                   w.gradients(), ws);

    moe::layer_stats const s = layer.stats(moe::host, ws);
    std::string line = "  rank " + std::to_string(r) + ": experts " +
                       std::to_string(layer.first_expert()) + ".." +
                       std::to_string(layer.first_expert() + local_experts - 1) + ", capacity " +
                       std::to_string(s.capacity) + ", its tokens' loads";
    for (auto load : s.load) line += " " + std::to_string(load);
    report[static_cast<std::size_t>(r)] = line;
  });
  for (auto const& line : report) std::printf("%s\n", line.c_str());

  double checksum = 0;  // a fixed order over the global batch
  for (std::size_t i = 0; i < y.size(); ++i)
    checksum += static_cast<double>(y[i]) + 0.5 * static_cast<double>(dx[i]);
  return checksum;
}

double run(batch const& m, int ranks, std::string_view layout) {
  std::printf("W = %d, %.*s layout\n", ranks, static_cast<int>(layout.size()), layout.data());
  double const checksum = layout == "ragged" ? run<moe::layout::ragged>(m, ranks)
                                             : run<moe::layout::capacity>(m, ranks);
  std::printf("checksum %.17g\n", checksum);
  return checksum;
}

}  // namespace

int main(int argc, char** argv) {
  int ranks = 0;  // 0: all of 1, 2, 4, 8
  std::string_view layout = "capacity";
  for (int i = 1; i < argc; ++i) {
    std::string_view const arg = argv[i];
    if (arg == "--simulate" && i + 1 < argc) {
      ranks = std::atoi(argv[++i]);
    } else if (arg == "--layout" && i + 1 < argc) {
      layout = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--simulate W] [--layout capacity|ragged]\n", argv[0]);
      return EXIT_FAILURE;
    }
  }
  if (layout != "capacity" && layout != "ragged") {
    std::fprintf(stderr, "--layout: capacity or ragged\n");
    return EXIT_FAILURE;
  }
  try {
    batch const m;
    if (ranks != 0) {
      if (ranks < 1 || experts % ranks != 0 || global_tokens % ranks != 0) {
        std::fprintf(stderr, "--simulate: W must divide %lld experts and %lld tokens\n",
                     static_cast<long long>(experts), static_cast<long long>(global_tokens));
        return EXIT_FAILURE;
      }
      (void)run(m, ranks, layout);
      return EXIT_SUCCESS;
    }
    double const reference = run(m, 1, layout);
    for (int w : {2, 4, 8})
      if (run(m, w, layout) != reference) {
        std::fprintf(stderr, "the checksum changed with W = %d\n", w);
        return EXIT_FAILURE;
      }
    std::printf("the same checksum for W = 1, 2, 4, 8\n");
    return EXIT_SUCCESS;
  } catch (moe::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return EXIT_FAILURE;
  }
}
