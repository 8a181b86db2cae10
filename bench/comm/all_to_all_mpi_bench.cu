// SPDX-License-Identifier: Apache-2.0
// The all-to-all over N GPUs, one MPI process each: linear and 2DH through an NCCL
// communicator built over MPI, from 64 KiB to 1 GiB per rank, reported as nccl-tests reports
// its alltoall: algorithm bandwidth (bytes per rank / time) and bus bandwidth (algbw ·
// (N − 1)/N, the bytes that cross links per rank).
//
//   mpirun -np N build/bench/all_to_all_mpi_bench [--ranks-per-node n]
//          [--benchmark_out=a2a.json --benchmark_out_format=json]
//
// Each rank takes the GPU of its node-local rank. Every rank runs every iteration (a fixed
// count, so that the ranks meet); an iteration's time is the slowest rank's, and rank 0
// reports (bench/support/mpi.hpp). `--ranks-per-node n` pretends the nodes hold n ranks
// (2DH's two levels on one machine). Exits 0 with a message when some rank has no GPU.

#include "../support/device.hpp"
#include "../support/fixture.hpp"
#include "../support/mpi.hpp"

#include <moe/comm/all_to_all.hpp>
#include <moe/comm/nccl_bootstrap_mpi.hpp>
#include <moe/comm/nccl_communicator.hpp>
#include <moe/core/backend.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>

#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace {

constexpr std::size_t largest = std::size_t{1} << 30;  // bytes per rank

struct size_config {
  long long bytes;  // per rank
  [[nodiscard]] std::string name() const { return moe::bench::grid_name({{"bytes", bytes}}); }
};

/// 64 KiB, 256 KiB, …, 1 GiB per rank.
std::vector<size_config> sizes() {
  std::vector<size_config> out;
  for (std::size_t b = std::size_t{64} << 10; b <= largest; b *= 4)
    out.push_back({static_cast<long long>(b)});
  return out;
}

/// This rank's GPU, NCCL communicator, stream and buffers of the largest size.
struct rank_world {
  moe::comm::nccl_comm owned;
  moe::comm::nccl_communicator comm;
  moe::bench::owned_stream stream_owner;
  cudaStream_t stream = stream_owner.stream;
  moe::bench::device_array<std::byte> send{largest}, recv{largest}, scratch{largest};

  explicit rank_world(int ranks_per_node)
      : owned(moe::comm::make_nccl_comm(MPI_COMM_WORLD)), comm(owned.get(), ranks_per_node) {
    // Random floats, never zero, as the payload's bytes.
    moe::bench::fill_random(reinterpret_cast<float*>(send.data()), largest / sizeof(float),
                            0x61326121, 1.0, stream);
    MOE_CUDA_TRY(cudaMemsetAsync(recv.data(), 0xff, largest, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
  }
};

/// Times `Collective` on every rank; each iteration's time is the slowest rank's.
template <class Collective>
void all_to_all(benchmark::State& state, size_config const& config, rank_world& world) {
  auto const bytes = static_cast<std::size_t>(config.bytes);
  moe::cuda_backend const cuda{world.stream};
  moe::bench::cuda_event_timer timer(world.stream);
  auto run = [&] {
    Collective::run(cuda, world.comm, moe::span<std::byte const>(world.send.data(), bytes),
                    moe::span<std::byte>(world.recv.data(), bytes),
                    moe::span<std::byte>(world.scratch.data(),
                                         Collective::scratch_bytes(bytes, world.comm.topology())));
  };
  run();  // warm-up: NCCL connects its peers on first use
  MOE_CUDA_TRY(cudaStreamSynchronize(world.stream));
  for (auto _ : state) {
    MPI_Barrier(MPI_COMM_WORLD);
    timer.start();
    run();
    state.SetIterationTime(moe::bench::slowest_over_ranks(timer.stop()));
  }
  world.comm.check_async_error();
  int const n = world.comm.size();
  using counter = benchmark::Counter;
  moe::bench::set_bytes_and_flops(state, static_cast<double>(bytes), 0);
  state.counters["algbw"] =
      counter(static_cast<double>(bytes), counter::kIsIterationInvariantRate, counter::kIs1000);
  state.counters["busbw"] = counter(static_cast<double>(bytes) * (n - 1) / n,
                                    counter::kIsIterationInvariantRate, counter::kIs1000);
}

}  // namespace

int main(int argc, char** argv) {
  return moe::bench::mpi_cuda_benchmark_main(
      argc, argv, "all_to_all_mpi_bench", [](moe::bench::mpi_rank const& me) {
        rank_world world(me.ranks_per_node);
        auto family = [&world](auto collective) {
          return [&world](benchmark::State& state, size_config const& c) {
            all_to_all<decltype(collective)>(state, c, world);
          };
        };
        for (auto const& config : sizes()) {
          // A fixed count, the same on every rank: at least 5, about a second at 10 GB/s.
          auto const iterations =
              moe::bench::iterations_lasting(static_cast<double>(config.bytes) / 10e9 * 3, 100);
          for (auto* b : moe::bench::register_grid("linear_all_to_all", std::vector{config},
                                                   family(moe::comm::linear_all_to_all{})))
            b->Iterations(iterations);
          for (auto* b : moe::bench::register_grid("all_to_all_2dh", std::vector{config},
                                                   family(moe::comm::all_to_all_2dh{})))
            b->Iterations(iterations);
        }
        moe::bench::run_benchmarks(me);
      });
}
