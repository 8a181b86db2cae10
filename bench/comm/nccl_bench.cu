// SPDX-License-Identifier: Apache-2.0
// What NCCL costs on one rank: a self send/recv through nccl_communicator and the linear
// all-to-all over it, against a cudaMemcpyAsync device-to-device of the same bytes, from
// 1 KiB to 1 GiB. A one-rank layer never calls NCCL (single_rank); this measures the floor
// of a real world's exchange, where every rank also sends a chunk to itself.
//
//   comm_nccl_bench --benchmark_out=comm_nccl_bench.json --benchmark_out_format=json
//
// Counters: bytes (moved per iteration) and bytes_per_second (GB/s of payload, not of
// memory traffic, which is twice that for a copy); for the NCCL families, copy_us (the
// cudaMemcpyAsync of the same bytes, timed in the same iteration) and overhead_us (the
// family's time minus that copy's), both means per iteration. Exits 0 with a message when
// there is no CUDA device.

#include "../support/device.hpp"
#include "../support/fixture.hpp"

#include <moe/comm/all_to_all.hpp>
#include <moe/comm/nccl_bootstrap.hpp>
#include <moe/comm/nccl_communicator.hpp>
#include <moe/core/backend.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>

#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr std::size_t kib = std::size_t{1} << 10;
constexpr std::size_t largest = std::size_t{1} << 30;  // 1 GiB

struct size_config {
  long long bytes;
  [[nodiscard]] std::string name() const { return moe::bench::grid_name({{"bytes", bytes}}); }
};

/// 1 KiB, 4 KiB, …, 1 GiB.
std::vector<size_config> sizes() {
  std::vector<size_config> out;
  for (std::size_t b = kib; b <= largest; b *= 4) out.push_back({static_cast<long long>(b)});
  return out;
}

/// Everything the benchmarks share: a one-rank world on the current device, its stream,
/// and send/receive buffers of the largest size holding random bytes.
struct one_rank_world {
  moe::bench::owned_stream stream_owner;
  cudaStream_t stream = stream_owner.stream;
  moe::comm::nccl_comm owned;
  moe::comm::nccl_communicator comm;
  moe::bench::device_array<std::byte> send{largest}, recv{largest};

  explicit one_rank_world(int device)
      : owned(std::move(moe::comm::make_nccl_comms(std::vector{device}).front())),
        comm(owned.get()) {
    // Random bytes, never all zeros: a 16 MiB random block repeated over the buffer.
    std::vector<std::uint64_t> block((std::size_t{16} << 20) / sizeof(std::uint64_t));
    moe::bench::fill_random(std::span(block), 0x6e63636c);
    std::size_t const block_bytes = block.size() * sizeof(std::uint64_t);
    for (std::size_t at = 0; at < largest; at += block_bytes)
      MOE_CUDA_TRY(cudaMemcpy(send.data() + at, block.data(), std::min(block_bytes, largest - at),
                              cudaMemcpyHostToDevice));
    MOE_CUDA_TRY(cudaMemset(recv.data(), 0xff, largest));
  }
  one_rank_world(one_rank_world const&) = delete;
  one_rank_world& operator=(one_rank_world const&) = delete;

  void copy(std::size_t bytes) const {
    MOE_CUDA_TRY(
        cudaMemcpyAsync(recv.data(), send.data(), bytes, cudaMemcpyDeviceToDevice, stream));
  }
};

/// The cudaMemcpyAsync baseline.
void device_copy(benchmark::State& state, size_config const& config, one_rank_world& world) {
  auto const bytes = static_cast<std::size_t>(config.bytes);
  moe::bench::cuda_event_timer timer(world.stream);
  moe::bench::l2_flush l2;
  moe::bench::timed_loop(
      state, timer, [&] { l2.flush(world.stream); }, [&] { world.copy(bytes); });
  moe::bench::set_bytes_and_flops(state, static_cast<double>(bytes), 0);
}

/// `work(bytes)` timed per iteration, with the baseline copy of the same bytes timed before
/// it in the same iteration (both from a flushed L2), for the overhead counter.
template <class Work>
void against_copy(benchmark::State& state, size_config const& config, one_rank_world& world,
                  Work work) {
  auto const bytes = static_cast<std::size_t>(config.bytes);
  auto const [copy_seconds, measured_seconds] = moe::bench::timed_loop_against(
      state, world.stream, [&] { world.copy(bytes); }, [&] { work(bytes); });
  double const overhead_seconds = measured_seconds - copy_seconds;
  world.comm.check_async_error();
  moe::bench::set_bytes_and_flops(state, static_cast<double>(bytes), 0);
  using counter = benchmark::Counter;
  state.counters["copy_us"] = counter(copy_seconds * 1e6, counter::kAvgIterations);
  state.counters["overhead_us"] = counter(overhead_seconds * 1e6, counter::kAvgIterations);
}

void nccl_self_sendrecv(benchmark::State& state, size_config const& config, one_rank_world& world) {
  against_copy(state, config, world, [&](std::size_t bytes) {
    world.comm.group_start();
    world.comm.send(world.send.data(), bytes, 0, world.stream);
    world.comm.recv(world.recv.data(), bytes, 0, world.stream);
    world.comm.group_end();
  });
}

void linear_all_to_all(benchmark::State& state, size_config const& config, one_rank_world& world) {
  against_copy(state, config, world, [&](std::size_t bytes) {
    moe::comm::linear_all_to_all::run(moe::cuda_backend{world.stream}, world.comm,
                                      moe::span<std::byte const>(world.send.data(), bytes),
                                      moe::span<std::byte>(world.recv.data(), bytes));
  });
}

}  // namespace

int main(int argc, char** argv) {
  return moe::bench::cuda_benchmark_main(argc, argv, "comm_nccl_bench", [] {
    int device = 0;
    MOE_CUDA_TRY(cudaGetDevice(&device));
    int version = 0;
    MOE_NCCL_TRY(ncclGetVersion(&version));
    benchmark::AddCustomContext("nccl_version", std::to_string(version));
    one_rank_world world(device);

    auto const configs = sizes();
    auto with_world = [&world](auto family) {
      return [&world, family](benchmark::State& state, size_config const& config) {
        family(state, config, world);
      };
    };
    moe::bench::register_grid("device_copy", configs, with_world(device_copy));
    moe::bench::register_grid("nccl_self_sendrecv", configs, with_world(nccl_self_sendrecv));
    moe::bench::register_grid("linear_all_to_all_1rank", configs, with_world(linear_all_to_all));
    benchmark::RunSpecifiedBenchmarks();
  });
}
