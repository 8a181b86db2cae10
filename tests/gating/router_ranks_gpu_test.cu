// SPDX-License-Identifier: Apache-2.0
// Routing state that crosses ranks or steps, on the CUDA backend, against the host:
//
// - comm::max_over_ranks (comm/kernels/max_over_ranks.cuh) on the device simulated world:
//   every rank ends with the largest value of all, messages as the exchange says;
// - the device update_expert_bias (gating/kernels/bias.cuh) equals the host's bit for bit;
// - dynamic capacity over ranks: W virtual ranks each route their own shard through the CUDA
//   route with max_over_ranks as reduce_max_load, and must give what host route gives with a
//   reduction that returns the largest of the ranks' local loads (capacity, max_load, slots,
//   loads and drops exactly). The inputs lie on dyadic grids (as in router_gpu_test.cu), so
//   that the logits, and with them the selection, are exact on both backends.
//
// Skipped (exit 77) without a CUDA device.

#include "../support/device.hpp"
#include "../support/expect.hpp"
#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <moe/comm.hpp>
#include <moe/comm/kernels/max_over_ranks.cuh>
#include <moe/core.hpp>
#include <moe/core/blas.hpp>
#include <moe/gating.hpp>
#include <moe/gating/kernels/bias.cuh>
#include <moe/gating/kernels/router.cuh>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace moe;
using comm::device_simulated_world;
using test::device_array;

/// The bytes of a device array, as the workspace an algorithm takes.
template <class T>
workspace bytes_of(device_array<T> const& a) {
  return {reinterpret_cast<std::byte*>(a.data()), a.size() * sizeof(T)};
}

/// The elements of a device array as a device view of T const.
template <class T>
vector_view<T const> const_view(device_array<T> const& a) {
  return make_view(static_cast<T const*>(a.data()), static_cast<index_t>(a.size()));
}

}  // namespace

// --- the maximum over the ranks ------------------------------------------------------------

TEST_CASE("max_over_ranks gives every rank the largest value, call after call") {
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // Negative values too: the maximum starts from the rank's own value, not from 0.
  std::uniform_int_distribution<std::int64_t> value(-(std::int64_t{1} << 40),
                                                    std::int64_t{1} << 40);
  for (comm::topology const t : {comm::topology{1, 1}, comm::topology{2, 1}, comm::topology{1, 3},
                                 comm::topology{2, 2}, comm::topology{4, 2}}) {
    auto const p = static_cast<std::size_t>(t.size());
    CAPTURE(p);
    // Two calls per rank on one stream and one scratch: the second must not see the first's.
    std::vector<std::int64_t> first(p), second(p);
    for (auto& v : first) v = value(rng);
    for (auto& v : second) v = value(rng);
    struct rank_buffers {
      test::owned_stream stream;
      device_array<std::int64_t> values{2};
      device_array<std::int64_t> scratch;
      explicit rank_buffers(std::size_t ranks)
          : scratch(
                comm::max_over_ranks<device_simulated_world::rank_communicator>::workspace_bytes(
                    static_cast<int>(ranks)) /
                sizeof(std::int64_t)) {}
    };
    std::vector<std::unique_ptr<rank_buffers>> ranks;
    for (std::size_t r = 0; r < p; ++r) {
      ranks.push_back(std::make_unique<rank_buffers>(p));
      ranks.back()->values.upload({first[r], second[r]}, ranks.back()->stream.stream);
      ranks.back()->scratch.poison(ranks.back()->stream.stream);
    }
    device_simulated_world world(t);
    world.run([&](device_simulated_world::rank_communicator& c) {
      rank_buffers& b = *ranks[static_cast<std::size_t>(c.rank())];
      comm::max_over_ranks const reduce(c, bytes_of(b.scratch));
      cuda_backend const cuda{b.stream.stream};
      reduce(cuda, b.values.data());
      reduce(cuda, b.values.data() + 1);
    });
    std::int64_t const max_first = *std::max_element(first.begin(), first.end());
    std::int64_t const max_second = *std::max_element(second.begin(), second.end());
    for (std::size_t r = 0; r < p; ++r) {
      CAPTURE(r);
      auto const got = ranks[r]->values.download(ranks[r]->stream.stream);
      CHECK(got[0] == max_first);
      CHECK(got[1] == max_second);
    }
    // Each call: every rank sends its 8 bytes to every other rank, in one group.
    auto const trace = world.trace();
    CHECK(trace.size() == 2 * p * (p - 1));
    for (auto const& m : trace) {
      CHECK(m.bytes == sizeof(std::int64_t));
      CHECK(m.src != m.dst);
      CHECK(m.phase < 2);
    }
  }
}

TEST_CASE("max_over_ranks rejects a short scratch and a null value") {
  test::owned_stream stream;
  device_array<std::int64_t> scratch(3);  // one more than two ranks need: room to misalign
  device_simulated_world world({.ranks_per_node = 2, .nodes = 1});
  test::expect_rejected(
      [&] {
        world.run([&](device_simulated_world::rank_communicator& c) {
          comm::max_over_ranks const reduce(
              c, bytes_of(scratch).first(sizeof(std::int64_t)));  // short
        });
      },
      "scratch");
  std::string const misaligned = test::expect_rejected(
      [&] {
        world.run([&](device_simulated_world::rank_communicator& c) {
          comm::max_over_ranks const reduce(c, bytes_of(scratch).subspan(1));
        });
      },
      "scratch");
  CHECK(misaligned.find("aligned") != std::string::npos);
  test::expect_rejected(
      [&] {
        world.run([&](device_simulated_world::rank_communicator& c) {
          comm::max_over_ranks const reduce(c, bytes_of(scratch));
          reduce(cuda_backend{stream.stream}, nullptr);
        });
      },
      "max_load");
  CHECK(world.trace().empty());  // rejected before any message
}

// --- the expert bias -----------------------------------------------------------------------

namespace {

/// Updates `bias` by `load` on both backends and expects the same bits.
void compare_bias_update(cudaStream_t stream, std::vector<float> const& bias,
                         std::vector<std::int64_t> const& load, float rate) {
  std::vector<float> expected = bias;
  gating::update_expert_bias(span<float>(expected.data(), expected.size()),
                             span<std::int64_t const>(load.data(), load.size()), rate);
  device_array<float> bias_dev(bias.size());
  device_array<std::int64_t> load_dev(load.size());
  bias_dev.upload(bias, stream);
  load_dev.upload(load, stream);
  gating::update_expert_bias(cuda_backend{stream}, span<float>(bias_dev.data(), bias_dev.size()),
                             const_view(load_dev), rate);
  CHECK(test::same_bits(bias_dev.download(stream), expected));
}

}  // namespace

TEST_CASE("CUDA update_expert_bias equals the host's bit for bit") {
  test::owned_stream owned;
  cudaStream_t const stream = owned.stream;
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> bias_value(-1.0f, 1.0f);
  // 1024 and beyond: threads loop over several experts; spread 3: many loads equal the mean.
  for (index_t experts : {1, 2, 7, 64, 256, 1000, 1024, 3000})
    for (std::int64_t spread : {std::int64_t{3}, std::int64_t{1} << 20}) {
      CAPTURE(experts);
      CAPTURE(spread);
      std::uniform_int_distribution<std::int64_t> load_value(0, spread);
      std::vector<float> bias(static_cast<std::size_t>(experts));
      std::vector<std::int64_t> load(static_cast<std::size_t>(experts));
      for (auto& b : bias) b = bias_value(rng);
      for (auto& l : load) l = load_value(rng);
      compare_bias_update(stream, bias, load, 1e-3f);
    }
  // A mean that equals a load leaves that bias alone; equal loads leave every bias alone.
  compare_bias_update(stream, {0.5f, 0.5f, 0.5f}, {1, 2, 3}, 0.25f);
  compare_bias_update(stream, {0.1f, -0.2f, 0.3f, 0.4f, 0.5f}, {7, 7, 7, 7, 7}, 1e-3f);
  // Mean 2^24 + 2/3: in float it would round onto the first load and leave its bias alone.
  std::int64_t const big = std::int64_t{1} << 24;
  compare_bias_update(stream, {0.0f, 0.0f, 0.0f}, {big, big + 1, big + 1}, 0.25f);
  std::vector<float> const bias = {0.0f, 0.0f, 0.0f};
  device_array<float> bias_dev(3);
  device_array<std::int64_t> load_dev(3);
  bias_dev.upload(bias, stream);
  load_dev.upload({1, 2, 3}, stream);
  gating::update_expert_bias(cuda_backend{stream}, span<float>(bias_dev.data(), 3),
                             const_view(load_dev), 0.25f);
  CHECK(bias_dev.download(stream) == std::vector<float>{0.25f, 0.0f, -0.25f});
}

TEST_CASE("CUDA update_expert_bias rejects mismatched extents and writes nothing") {
  test::owned_stream owned;
  cudaStream_t const stream = owned.stream;
  std::vector<float> const bias = {0.5f, -0.5f, 1.5f, 2.5f};
  device_array<float> bias_dev(4);
  device_array<std::int64_t> load_dev(5);
  bias_dev.upload(bias, stream);
  load_dev.upload({9, 0, 0, 0, 0}, stream);
  cuda_backend const cuda{stream};
  test::expect_rejected(
      [&] {
        gating::update_expert_bias(cuda, span<float>(bias_dev.data(), 4), const_view(load_dev),
                                   1.0f);
      },
      "load");
  test::expect_rejected(
      [&] {
        gating::update_expert_bias(cuda, span<float>(bias_dev.data(), 4),
                                   make_view(static_cast<std::int64_t const*>(nullptr), 4), 1.0f);
      },
      "load");
  test::expect_rejected(
      [&] {
        gating::update_expert_bias(cuda, span<float>(static_cast<float*>(nullptr), 4),
                                   make_view(static_cast<std::int64_t const*>(load_dev.data()), 4),
                                   1.0f);
      },
      "bias");
  CHECK(bias_dev.download(stream) == bias);
  // No expert: nothing to do, and nothing is launched.
  gating::update_expert_bias(cuda, span<float>(), make_view(load_dev.data(), 0), 1.0f);
}

// --- dynamic capacity over ranks -----------------------------------------------------------

namespace {

/// ±j/8, j = 1..8.
void fill_x(std::vector<float>& x, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> j(1, 8), sign(0, 1);
  for (auto& v : x) v = static_cast<float>(sign(rng) ? j(rng) : -j(rng)) / 8.0f;
}

/// ±m/2^(6+s), m = 1..64, s = max(0, ⌊log2(H)/2⌋ − 1): every product and partial sum of the
/// logits is a float (router_gpu_test.cu), so both backends select the same experts.
void fill_w(std::vector<float>& w, index_t hidden, std::mt19937_64& rng) {
  int const s =
      std::max(0, static_cast<int>(std::bit_width(static_cast<std::uint64_t>(hidden)) - 1) / 2 - 1);
  float const unit = std::ldexp(1.0f, -(6 + s));
  std::uniform_int_distribution<int> m(1, 64), sign(0, 1);
  for (auto& v : w) v = static_cast<float>(sign(rng) ? m(rng) : -m(rng)) * unit;
}

/// One rank's shard and its host routing, once with its own largest load and once with the
/// largest of all ranks.
struct host_shard {
  std::vector<float> x;
  host_buffer memory;
  gating::host_routing r;
  index_t local_max_load = 0;
  gating::routing_summary expected;
};

/// One virtual rank's device state: its stream and cuBLAS handle, its shard, routing state
/// and scratch, and the scratch of the reduction over the ranks.
struct device_shard {
  test::owned_stream stream;  // outlives the handle, which is bound to it
  blas_handle blas;
  device_array<float> x;
  device_array<std::byte> routing, scratch, reduce_scratch;
  gating::device_routing r;

  device_shard(std::vector<float> const& host_x, std::size_t routing_bytes,
               std::size_t scratch_bytes, int ranks)
      : x(host_x.size()),
        routing(routing_bytes),
        scratch(scratch_bytes),
        reduce_scratch(
            comm::max_over_ranks<device_simulated_world::rank_communicator>::workspace_bytes(
                ranks)) {
    x.upload(host_x, stream.stream);
    routing.poison(stream.stream);
    scratch.poison(stream.stream);
    reduce_scratch.poison(stream.stream);
  }
  [[nodiscard]] cuda_backend backend() const { return {stream.stream, blas.get()}; }
};

struct ranks_case {
  int ranks;
  float factor;
  index_t groups;
  index_t alignment;
};

/// Routes one shard per virtual rank through the CUDA route with max_over_ranks and compares
/// each rank with host route under the maximum of the ranks' host largest loads. Returns
/// whether some rank's own largest load was below the maximum (the reduction mattered).
template <class G>
bool compare_over_ranks(G const& gate, ranks_case const& c, std::mt19937_64& rng) {
  index_t const tokens = 256, experts = 16, hidden = 32;
  int const k = 2;
  INFO("W " << c.ranks << ", f " << c.factor << ", groups " << c.groups << ", alignment "
            << c.alignment);
  gating::gate_args const args{.tokens = tokens,
                               .experts = experts,
                               .k = gating::static_k_gate<G> ? 0 : k,
                               .capacity_factor = c.factor,
                               .capacity_alignment = c.alignment,
                               .normalize = gating::renormalize::before_drops,
                               .groups = c.groups};
  REQUIRE(gate.k(args) == k);
  auto const p = static_cast<std::size_t>(c.ranks);

  // --- host: the local largest loads first, then every rank with their maximum ---
  std::vector<float> w(static_cast<std::size_t>(hidden * experts));
  fill_w(w, hidden, rng);
  auto const w_host = make_view(static_cast<float const*>(w.data()), hidden, experts);
  workspace_carver host_counter;
  (void)gating::carve_host_routing(host_counter, tokens, tokens, experts, k);
  std::vector<std::unique_ptr<host_shard>> shards;
  for (std::size_t r = 0; r < p; ++r) {
    auto s = std::make_unique<host_shard>();
    s->x.resize(static_cast<std::size_t>(tokens * hidden));
    fill_x(s->x, rng);
    s->memory = host_buffer(host_counter.bytes());
    workspace_carver carver(s->memory.view());
    s->r = gating::carve_host_routing(carver, tokens, tokens, experts, k);
    s->local_max_load =
        gating::route(host, gate, args,
                      make_view(static_cast<float const*>(s->x.data()), tokens, hidden), w_host,
                      s->r)
            .max_load;
    shards.push_back(std::move(s));
  }
  index_t global = 0;
  for (auto const& s : shards) global = std::max(global, s->local_max_load);
  bool reduced = false;
  for (auto& s : shards) {
    reduced = reduced || s->local_max_load < global;
    index_t const own = s->local_max_load;
    s->expected = gating::route(host, gate, args,
                                make_view(static_cast<float const*>(s->x.data()), tokens, hidden),
                                w_host, s->r, [&](index_t load) {
                                  CHECK(load == own);
                                  return global;
                                });
  }

  // --- device: W virtual ranks on one GPU, one stream each ---
  test::owned_stream setup;
  device_array<float> w_dev(w.size());
  w_dev.upload(w, setup.stream);
  workspace_carver counter;
  (void)gating::carve_device_routing(counter, tokens, tokens, experts, k, c.groups);
  std::size_t const scratch_bytes = gating::route_workspace_bytes(gate, args);
  std::vector<std::unique_ptr<device_shard>> devices;
  for (auto const& s : shards)
    devices.push_back(
        std::make_unique<device_shard>(s->x, counter.bytes(), scratch_bytes, c.ranks));
  for (auto& d : devices) {
    workspace_carver carver(bytes_of(d->routing));
    d->r = gating::carve_device_routing(carver, tokens, tokens, experts, k, c.groups);
  }
  auto const w_view = make_view(static_cast<float const*>(w_dev.data()), hidden, experts);
  device_simulated_world world({.ranks_per_node = c.ranks, .nodes = 1});
  world.run([&](device_simulated_world::rank_communicator& rank) {
    device_shard& d = *devices[static_cast<std::size_t>(rank.rank())];
    gating::route(d.backend(), gate, args,
                  make_view(static_cast<float const*>(d.x.data()), tokens, hidden), w_view, d.r,
                  bytes_of(d.scratch), comm::max_over_ranks(rank, bytes_of(d.reduce_scratch)));
  });

  for (std::size_t r = 0; r < p; ++r) {
    CAPTURE(r);
    device_shard& d = *devices[r];
    host_shard const& h = *shards[r];
    gating::routing_summary const summary = gating::read_summary(d.backend(), d.r);
    CHECK(summary.max_load == h.expected.max_load);
    CHECK(summary.capacity == h.expected.capacity);
    CHECK(summary.dropped == h.expected.dropped);
    auto download = [&](auto const& view) {
      using T = std::remove_cv_t<typename std::remove_cvref_t<decltype(view)>::element_type>;
      std::vector<T> out(static_cast<std::size_t>(element_count(view)));
      MOE_CUDA_TRY(cudaMemcpyAsync(out.data(), view.data_handle(), out.size() * sizeof(T),
                                   cudaMemcpyDeviceToHost, d.stream.stream));
      MOE_CUDA_TRY(cudaStreamSynchronize(d.stream.stream));
      return out;
    };
    auto host_values = [](auto const& view) {
      return std::vector(view.data_handle(), view.data_handle() + element_count(view));
    };
    CHECK(download(d.r.expert) == host_values(h.r.expert));
    CHECK(download(d.r.slot) == host_values(h.r.slot));
    CHECK(download(d.r.load) == host_values(h.r.load));
  }
  // Each rank exchanged its largest load with every other: W · (W − 1) messages of 8 bytes.
  CHECK(world.trace().size() == p * (p - 1));
  return reduced;
}

}  // namespace

TEST_CASE("CUDA route with max_over_ranks matches the host's dynamic capacity over ranks") {
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  bool reduced = false;
  // f = 0: C_g is the largest load of all ranks; f = −1.5: capped by the factor's capacity.
  for (int ranks : {2, 4})
    for (float factor : {0.0f, -1.5f})
      for (index_t groups : {1, 2})
        reduced = compare_over_ranks(gating::top_k<2>{},
                                     {.ranks = ranks,
                                      .factor = factor,
                                      .groups = groups,
                                      .alignment = groups == 2 ? 4 : 1},
                                     rng) ||
                  reduced;
  CHECK_MESSAGE(reduced, "no rank's own largest load was below the maximum: the test is blind");
}
