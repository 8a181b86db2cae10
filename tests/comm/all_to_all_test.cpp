// SPDX-License-Identifier: Apache-2.0
// The all-to-all collectives on the simulated world: the linear and the 2DH algorithms
// give the direct result bit for bit over many (ranks per node, nodes) shapes, their
// traces have the message structure of DESIGN §5, and all_to_allv moves variable chunks
// (counts exchanged first, or known to every rank already).

#include <moe/comm/all_to_all.hpp>
#include <moe/comm/simulated_world.hpp>
#include <moe/tune/cost_model.hpp>

#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace {

using moe::comm::simulated_world;
using moe::comm::topology;
using bytes = std::vector<std::byte>;

// Rank r's send buffer: P chunks of `chunk` random bytes.
std::vector<bytes> random_sends(int ranks, std::size_t chunk, std::mt19937_64& rng) {
  std::vector<bytes> sends(static_cast<std::size_t>(ranks), bytes(chunk * ranks));
  for (auto& s : sends)
    for (auto& b : s) b = static_cast<std::byte>(rng() & 0xff);
  return sends;
}

// recv[r] chunk p = send[p] chunk r.
std::vector<bytes> direct_all_to_all(std::vector<bytes> const& sends, std::size_t chunk) {
  std::vector<bytes> out(sends.size(), bytes(sends.front().size()));
  for (std::size_t r = 0; r < sends.size(); ++r)
    for (std::size_t p = 0; p < sends.size(); ++p)
      std::memcpy(out[r].data() + p * chunk, sends[p].data() + r * chunk, chunk);
  return out;
}

template <class Collective>
std::vector<bytes> run_on_world(simulated_world& world, std::vector<bytes> const& sends) {
  std::vector<bytes> recvs(sends.size(), bytes(sends.front().size(), std::byte{0xee}));
  world.run([&](simulated_world::rank_communicator& comm) {
    auto const r = static_cast<std::size_t>(comm.rank());
    bytes scratch(Collective::scratch_bytes(sends[r].size(), comm.topology()));
    Collective::run(moe::host, comm, moe::span<std::byte const>(sends[r]),
                    moe::span<std::byte>(recvs[r]), moe::span<std::byte>(scratch));
  });
  return recvs;
}

// Per rank and per phase: (intra-node messages, intra bytes, inter-node messages, inter bytes).
using phase_counts = std::tuple<int, std::size_t, int, std::size_t>;
std::map<std::pair<int, int>, phase_counts> count_by_rank_and_phase(simulated_world const& w) {
  std::map<std::pair<int, int>, phase_counts> out;
  for (auto const& m : w.trace()) {
    auto& [intra, intra_bytes, inter, inter_bytes] = out[{m.src, m.phase}];
    if (m.inter_node) {
      ++inter;
      inter_bytes += m.bytes;
    } else {
      ++intra;
      intra_bytes += m.bytes;
    }
  }
  return out;
}

// At least 50 shapes: 1×1, 1×N, N×1, non-powers of two, and up to 1024 ranks.
std::vector<topology> shapes() {
  std::vector<topology> out;
  for (int n : {1, 2, 3, 4, 5, 7, 8})
    for (int m : {1, 2, 3, 5, 6, 8, 9}) out.push_back({.ranks_per_node = n, .nodes = m});
  out.push_back({.ranks_per_node = 1, .nodes = 17});
  out.push_back({.ranks_per_node = 16, .nodes = 1});
  out.push_back({.ranks_per_node = 8, .nodes = 16});
  out.push_back({.ranks_per_node = 6, .nodes = 11});
  out.push_back({.ranks_per_node = 8, .nodes = 128});  // 1024 ranks
  out.push_back({.ranks_per_node = 32, .nodes = 32});  // 1024 ranks
  return out;
}

}  // namespace

TEST_CASE("all_to_all: linear and 2DH equal the direct computation and each other") {
  std::uint64_t const seed = moe::test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto const all = shapes();
  REQUIRE(all.size() >= 50);
  for (topology const t : all) {
    int const p = t.size();
    CAPTURE(t.ranks_per_node);
    CAPTURE(t.nodes);
    std::size_t const chunk = p > 256 ? 4 : 12;  // odd sizes too: chunks need no alignment
    auto const sends = random_sends(p, chunk, rng);
    auto const expected = direct_all_to_all(sends, chunk);
    simulated_world world(t);

    auto const linear = run_on_world<moe::comm::linear_all_to_all>(world, sends);
    CHECK(linear == expected);
    // linear: every rank sends P − 1 messages of S/P, in one phase.
    std::size_t const s = chunk * p;
    auto const counts = count_by_rank_and_phase(world);
    for (int r = 0; r < p; ++r) {
      if (p == 1) break;
      auto const& [intra, intra_bytes, inter, inter_bytes] = counts.at({r, 0});
      CHECK(intra == t.ranks_per_node - 1);
      CHECK(inter == p - t.ranks_per_node);
      CHECK(intra_bytes + inter_bytes == (p - 1) * (s / p));
    }
    CHECK(world.trace().size() == static_cast<std::size_t>(p) * (p - 1));
    std::size_t linear_network = 0;
    for (auto const& m : world.trace()) linear_network += m.inter_node ? m.bytes : 0;

    world.clear_trace();
    auto const hierarchical = run_on_world<moe::comm::all_to_all_2dh>(world, sends);
    CHECK(hierarchical == linear);  // bit for bit
    // 2DH: N − 1 intra-node messages of S/N, then M − 1 inter-node messages of S/M.
    int const n = t.ranks_per_node, m = t.nodes;
    std::size_t network = 0;
    std::size_t messages = 0;
    for (auto const& [key, c] : count_by_rank_and_phase(world)) {
      auto const& [intra, intra_bytes, inter, inter_bytes] = c;
      bool const intra_phase = key.second == 0 && n > 1;
      if (intra_phase) {
        CHECK(intra == n - 1);
        CHECK(inter == 0);
        CHECK(intra_bytes == (n - 1) * (s / n));
      } else {
        CHECK(intra == 0);
        CHECK(inter == m - 1);
        CHECK(inter_bytes == (m - 1) * (s / m));
      }
      network += inter_bytes;
      messages += intra + inter;
    }
    CHECK(messages == static_cast<std::size_t>(p) * ((n - 1) + (m - 1)));
    CHECK(network == linear_network);  // the same bytes cross the network
  }
}

TEST_CASE("all_to_all: bad buffers are rejected before any message") {
  simulated_world world({.ranks_per_node = 2, .nodes = 2});
  std::string what;
  try {
    world.run([](simulated_world::rank_communicator& comm) {
      bytes send(10), recv(10), scratch;  // 10 is not a multiple of 4 ranks
      moe::comm::linear_all_to_all::run(moe::host, comm, moe::span<std::byte const>(send),
                                        moe::span<std::byte>(recv), moe::span<std::byte>(scratch));
    });
  } catch (moe::invalid_argument const& e) {
    what = e.what();
  }
  CHECK(what.find("not a multiple of the 4 ranks") != std::string::npos);
  CHECK(world.trace().empty());

  CHECK_THROWS_AS(world.run([](simulated_world::rank_communicator& comm) {
    bytes send(16), recv(16), scratch(15);  // 2DH needs one copy of the send buffer
    moe::comm::all_to_all_2dh::run(moe::host, comm, moe::span<std::byte const>(send),
                                   moe::span<std::byte>(recv), moe::span<std::byte>(scratch));
  }),
                  moe::invalid_argument);
  CHECK(world.trace().empty());
}

namespace {

/// Runs all_to_allv on every rank of `world` and returns the argument its error names ("" if
/// none was thrown).
template <class Call>
std::string rejected_argument(simulated_world& world, Call call) {
  try {
    world.run(call);
  } catch (moe::invalid_argument const& e) {
    return e.argument();
  }
  return "";
}

}  // namespace

TEST_CASE("all_to_allv: null buffers and counts past 2^64 are rejected before any message") {
  using moe::span;
  simulated_world one({.ranks_per_node = 1, .nodes = 1});
  // A null receive buffer of 16 bytes: the local copy once wrote through it.
  CHECK(rejected_argument(one, [](simulated_world::rank_communicator& comm) {
          bytes send(16);
          std::vector<std::uint64_t> counts{16}, received(1);
          moe::comm::all_to_allv::run(
              moe::host, comm, span<std::byte const>(send), span<std::uint64_t const>(counts),
              span<std::byte>(static_cast<std::byte*>(nullptr), 16), span<std::uint64_t>(received));
        }) == "recv");
  CHECK(rejected_argument(one, [](simulated_world::rank_communicator& comm) {
          bytes recv(16);
          std::vector<std::uint64_t> counts{16}, received(1);
          moe::comm::all_to_allv::run(
              moe::host, comm, span<std::byte const>(static_cast<std::byte const*>(nullptr), 16),
              span<std::uint64_t const>(counts), span<std::byte>(recv),
              span<std::uint64_t>(received));
        }) == "send");
  CHECK(one.trace().empty());

  // {7, 1, 2^64 − 1} wrapped to a sum of 7 and passed; rank 2's copy was 2^64 − 1 bytes.
  simulated_world three({.ranks_per_node = 3, .nodes = 1});
  CHECK(rejected_argument(three, [](simulated_world::rank_communicator& comm) {
          bytes send(8), recv(64);
          std::vector<std::uint64_t> counts{7, 1, std::numeric_limits<std::uint64_t>::max()},
              received(3);
          moe::comm::all_to_allv::run(moe::host, comm, span<std::byte const>(send),
                                      span<std::uint64_t const>(counts), span<std::byte>(recv),
                                      span<std::uint64_t>(received));
        }) == "send_bytes");
  CHECK(three.trace().empty());
}

TEST_CASE("all_to_allv: variable chunks arrive in rank order with their sizes") {
  std::uint64_t const seed = moe::test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (topology const t : {topology{1, 1}, topology{3, 1}, topology{2, 3}, topology{4, 4}}) {
    int const p = t.size();
    // sizes[src][dst], some zero
    std::vector<std::vector<std::uint64_t>> sizes(p, std::vector<std::uint64_t>(p));
    for (auto& row : sizes)
      for (auto& v : row) v = rng() % 4 == 0 ? 0 : rng() % 9;
    std::vector<bytes> sends(p);
    for (int src = 0; src < p; ++src)
      for (int dst = 0; dst < p; ++dst)
        for (std::uint64_t i = 0; i < sizes[src][dst]; ++i)
          sends[src].push_back(static_cast<std::byte>(rng() & 0xff));
    std::vector<bytes> recvs(p, bytes(9 * p, std::byte{0xee}));
    std::vector<std::vector<std::uint64_t>> recv_sizes(p, std::vector<std::uint64_t>(p, 99));
    simulated_world world(t);
    world.run([&](simulated_world::rank_communicator& comm) {
      auto const r = static_cast<std::size_t>(comm.rank());
      moe::comm::all_to_allv::run(moe::host, comm, moe::span<std::byte const>(sends[r]),
                                  moe::span<std::uint64_t const>(sizes[r]),
                                  moe::span<std::byte>(recvs[r]),
                                  moe::span<std::uint64_t>(recv_sizes[r]));
    });
    for (int dst = 0; dst < p; ++dst) {
      bytes expected;
      for (int src = 0; src < p; ++src) {
        CHECK(recv_sizes[dst][src] == sizes[src][dst]);
        std::size_t offset = 0;
        for (int d = 0; d < dst; ++d) offset += sizes[src][d];
        expected.insert(expected.end(), sends[src].begin() + offset,
                        sends[src].begin() + offset + sizes[src][dst]);
      }
      CHECK(bytes(recvs[dst].begin(), recvs[dst].begin() + expected.size()) == expected);
      CHECK(recvs[dst][expected.size()] == std::byte{0xee});  // nothing written past the end
    }

    // With the counts known both ways, `exchange` moves the same bytes and no count: one
    // message per ordered pair of distinct ranks, of that pair's size.
    std::vector<bytes> again(p, bytes(9 * p, std::byte{0xee}));
    world.clear_trace();
    world.run([&](simulated_world::rank_communicator& comm) {
      auto const r = static_cast<std::size_t>(comm.rank());
      moe::comm::all_to_allv::exchange(moe::host, comm, moe::span<std::byte const>(sends[r]),
                                       moe::span<std::uint64_t const>(sizes[r]),
                                       moe::span<std::byte>(again[r]),
                                       moe::span<std::uint64_t const>(recv_sizes[r]));
    });
    CHECK(again == recvs);
    auto const trace = world.trace();
    CHECK(trace.size() == static_cast<std::size_t>(p * (p - 1)));
    for (auto const& m : trace) CHECK(m.bytes == sizes[m.src][m.dst]);
  }
}

TEST_CASE("all_to_all: the cost model's message plan is what the simulated world carries") {
  using moe::tune::all_to_all_algorithm;
  for (topology const t : {topology{1, 1}, topology{4, 1}, topology{1, 5}, topology{2, 3},
                           topology{8, 4}, topology{3, 7}}) {
    CAPTURE(t.ranks_per_node);
    CAPTURE(t.nodes);
    int const p = t.size();
    std::int64_t const bytes_per_rank = 24 * p;
    std::mt19937_64 rng(static_cast<std::uint64_t>(p));
    auto const sends = random_sends(p, 24, rng);
    for (auto const algorithm :
         {all_to_all_algorithm::linear, all_to_all_algorithm::two_dimensional_hierarchical}) {
      simulated_world world(t);
      if (algorithm == all_to_all_algorithm::linear)
        (void)run_on_world<moe::comm::linear_all_to_all>(world, sends);
      else
        (void)run_on_world<moe::comm::all_to_all_2dh>(world, sends);
      auto const plan = moe::tune::plan(algorithm, bytes_per_rank, t);
      auto const counts = count_by_rank_and_phase(world);
      for (int r = 0; r < p; ++r)
        for (int phase = 0; phase < plan.phase_count; ++phase) {
          auto const found = counts.find({r, phase});
          phase_counts const c = found == counts.end() ? phase_counts{} : found->second;
          auto const& expected = plan.phases[static_cast<std::size_t>(phase)];
          CHECK(std::get<0>(c) == expected.intra_node.messages);
          CHECK(static_cast<std::int64_t>(std::get<1>(c)) == expected.intra_node.bytes);
          CHECK(std::get<2>(c) == expected.inter_node.messages);
          CHECK(static_cast<std::int64_t>(std::get<3>(c)) == expected.inter_node.bytes);
        }
      CHECK(counts.size() <= static_cast<std::size_t>(p * plan.phase_count));  // no extra phase
    }
  }
}
