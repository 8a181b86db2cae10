// SPDX-License-Identifier: Apache-2.0
#pragma once
// What the benchmarks over N GPUs under mpirun share: their main() and the run of the
// registered benchmarks. Every rank runs every iteration, so that the ranks meet in their
// communication: a benchmark registers a fixed iteration count (Google Benchmark's own
// choice could differ between ranks) and reports the slowest rank's time. Rank 0 reports;
// only it writes --benchmark_out.

#include "device.hpp"

#include <moe/comm/mpi_communicator.hpp>
#include <moe/core/error.hpp>

#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace moe::bench {

/// This process's place in the job.
struct mpi_rank {
  int rank = 0, size = 1;
  int ranks_per_node = 1;  // --ranks-per-node, or the ranks sharing this node
  comm::mpi_node node;
};

/// The slowest rank's seconds: every rank calls it once per iteration.
inline double slowest_over_ranks(double seconds) {
  MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return seconds;
}

/// Runs the registered benchmarks: rank 0 reports, the others run them silently.
inline void run_benchmarks(mpi_rank const& me) {
  struct silent_reporter : benchmark::BenchmarkReporter {
    bool ReportContext(Context const&) override { return true; }
    void ReportRuns(std::vector<Run> const&) override {}
  };
  if (me.rank == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    silent_reporter silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
}

/// The main() of a benchmark over N GPUs, one MPI process each: initialises MPI and Google
/// Benchmark (`--ranks-per-node n` is ours: nodes of n ranks, so that 2DH runs both levels
/// on one machine), exits 0 with a message when some rank has no GPU, gives each rank the
/// GPU of its node-local rank, then runs `body(mpi_rank)`, which registers the benchmarks
/// and calls run_benchmarks while what they borrow is alive. Any rank's moe::error fails
/// the job.
template <class Body>
int mpi_cuda_benchmark_main(int argc, char** argv, char const* program, Body&& body) {
  MPI_Init(&argc, &argv);
  mpi_rank me;
  MPI_Comm_rank(MPI_COMM_WORLD, &me.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &me.size);
  int ranks_per_node = 0;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    std::string_view const arg = argv[i];
    if (arg == "--ranks-per-node" && i + 1 < argc) {
      ranks_per_node = std::atoi(argv[++i]);
      continue;
    }
    if (me.rank != 0 && arg.starts_with("--benchmark_out")) continue;
    args.push_back(argv[i]);
  }
  int count = static_cast<int>(args.size());
  benchmark::Initialize(&count, args.data());

  int devices = 0;
  int every_rank_has_a_gpu = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
  (void)cudaGetLastError();
  MPI_Allreduce(MPI_IN_PLACE, &every_rank_has_a_gpu, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  int status = 0;
  if (!every_rank_has_a_gpu) {
    if (me.rank == 0) std::printf("%s: skipped, a rank has no CUDA device\n", program);
  } else {
    try {
      me.node = comm::mpi_node_of(MPI_COMM_WORLD);
      me.ranks_per_node = ranks_per_node > 0 ? ranks_per_node : me.node.ranks;
      MOE_CUDA_TRY(cudaSetDevice(me.node.local_rank % devices));
      benchmark::AddCustomContext("ranks", std::to_string(me.size));
      benchmark::AddCustomContext("ranks_per_node", std::to_string(me.ranks_per_node));
      body(me);
    } catch (moe::error const& e) {
      std::fprintf(stderr, "%s (rank %d): %s\n", program, me.rank, e.what());
      status = 1;
    }
  }
  benchmark::Shutdown();
  MPI_Allreduce(MPI_IN_PLACE, &status, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return status;
}

}  // namespace moe::bench
