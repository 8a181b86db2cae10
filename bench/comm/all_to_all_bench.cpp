// SPDX-License-Identifier: Apache-2.0
// The all-to-all collectives on the simulated world, and the reorders of the 2DH algorithm
// on the device.
//
// - simulated/<algorithm>/...: one all-to-all of every rank of a host simulated world
//   (threads over host memory). The counters carry the structure the cost model predicts:
//   messages and network bytes per rank. Time here is the simulation's, not a network's:
//   it shows the cost of running multi-rank tests, nothing about NVLink or InfiniBand.
// - device/reorder/...: the 2DH reorder (a transpose of chunks, cudaMemcpy2DAsync) on the
//   device against a plain device-to-device copy of the same bytes measured in the same run
//   (the copy ceiling). Skipped without a GPU.
//
//   all_to_all_bench --benchmark_min_time=0.05

#include "../support/fixture.hpp"

#include <moe/comm.hpp>
#include <moe/core/device.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using moe::comm::simulated_world;
using moe::comm::topology;

struct world_config {
  int ranks_per_node, nodes;
  long long bytes_per_rank;

  [[nodiscard]] std::string name() const {
    return moe::bench::grid_name(
        {{"N", ranks_per_node}, {"M", nodes}, {"bytes_per_rank", bytes_per_rank}});
  }
};

template <class Collective>
void simulated(benchmark::State& state, world_config const& c) {
  topology const t{.ranks_per_node = c.ranks_per_node, .nodes = c.nodes};
  auto const p = static_cast<std::size_t>(t.size());
  auto const bytes = static_cast<std::size_t>(c.bytes_per_rank) / p * p;
  std::vector<std::vector<std::byte>> send(p), recv(p), scratch(p);
  for (std::size_t r = 0; r < p; ++r) {
    std::vector<std::uint8_t> random(bytes);
    moe::bench::fill_random(std::span<std::uint8_t>(random), r + 1, 100.0);
    send[r].assign(reinterpret_cast<std::byte*>(random.data()),
                   reinterpret_cast<std::byte*>(random.data()) + bytes);
    recv[r].resize(bytes);
    scratch[r].resize(Collective::scratch_bytes(bytes, t));
  }
  simulated_world world(t);
  moe::bench::host_timer timer;
  for (auto _ : state) {
    world.clear_trace();
    timer.start();
    world.run([&](simulated_world::rank_communicator& comm) {
      auto const r = static_cast<std::size_t>(comm.rank());
      Collective::run(moe::host, comm, moe::span<std::byte const>(send[r]),
                      moe::span<std::byte>(recv[r]), moe::span<std::byte>(scratch[r]));
    });
    timer.stop(state);
    benchmark::DoNotOptimize(recv.front().data());
  }
  double messages = 0, network = 0;
  for (auto const& m : world.trace()) {
    messages += 1;
    network += m.inter_node ? static_cast<double>(m.bytes) : 0;
  }
  state.counters["messages_per_rank"] = messages / static_cast<double>(p);
  state.counters["network_bytes_per_rank"] = network / static_cast<double>(p);
  moe::bench::set_bytes_and_flops(state, static_cast<double>(bytes * p), 0);
}

struct reorder_config {
  int ranks_per_node, nodes;
  long long bytes_per_rank;

  [[nodiscard]] std::string name() const {
    return moe::bench::grid_name(
        {{"N", ranks_per_node}, {"M", nodes}, {"bytes_per_rank", bytes_per_rank}});
  }
};

// The reorder moves S bytes (read and write): bytes = 2·S, as for the copy.
void device_reorder(benchmark::State& state, reorder_config const& c, bool plain_copy) {
  if (moe::cuda_device_count() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  auto const p = static_cast<std::size_t>(c.ranks_per_node * c.nodes);
  auto const bytes = static_cast<std::size_t>(c.bytes_per_rank) / p * p;
  cudaStream_t stream = nullptr;
  MOE_CUDA_TRY(cudaStreamCreate(&stream));
  void *src_memory = nullptr, *dst_memory = nullptr;
  MOE_CUDA_TRY(cudaMallocAsync(&src_memory, bytes, stream));
  MOE_CUDA_TRY(cudaMallocAsync(&dst_memory, bytes, stream));
  auto* const src = static_cast<std::byte*>(src_memory);
  auto* const dst = static_cast<std::byte*>(dst_memory);
  std::vector<std::uint8_t> random(bytes);
  moe::bench::fill_random(std::span<std::uint8_t>(random), 7, 100.0);
  MOE_CUDA_TRY(cudaMemcpyAsync(src, random.data(), bytes, cudaMemcpyHostToDevice, stream));
  {
    moe::bench::l2_flush flush;
    moe::bench::cuda_event_timer timer(stream);
    moe::cuda_backend const b{stream};
    moe::bench::timed_loop(
        state, timer, [&] { flush.flush(stream); },
        [&] {
          if (plain_copy)
            moe::comm::detail::copy_bytes(b, dst, src, bytes);
          else
            moe::comm::detail::transpose_chunks(b, dst, src, c.nodes, c.ranks_per_node, bytes / p);
        });
  }
  MOE_CUDA_TRY(cudaFreeAsync(src, stream));
  MOE_CUDA_TRY(cudaFreeAsync(dst, stream));
  MOE_CUDA_TRY(cudaStreamSynchronize(stream));
  MOE_CUDA_TRY(cudaStreamDestroy(stream));
  moe::bench::set_bytes_and_flops(state, 2.0 * static_cast<double>(bytes), 0);
}

}  // namespace

int main(int argc, char** argv) {
  using moe::bench::product;
  auto const worlds = product<world_config>(std::vector{2, 8}, std::vector{1, 4, 16},
                                            std::vector<long long>{1 << 10, 1 << 20});
  moe::bench::register_grid("simulated/linear", worlds, simulated<moe::comm::linear_all_to_all>);
  moe::bench::register_grid("simulated/2dh", worlds, simulated<moe::comm::all_to_all_2dh>);

  auto const reorders = product<reorder_config>(std::vector{8}, std::vector{2, 16, 64},
                                                std::vector<long long>{1 << 20, 64 << 20, 1 << 30});
  moe::bench::register_grid(
      "device/reorder", reorders,
      [](benchmark::State& s, reorder_config const& c) { device_reorder(s, c, false); });
  moe::bench::register_grid(
      "device/copy", reorders,
      [](benchmark::State& s, reorder_config const& c) { device_reorder(s, c, true); });
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
