// SPDX-License-Identifier: Apache-2.0
// One training step of the expert-parallel layer (forward plus backward) over N GPUs, one
// MPI process each, NCCL built through MPI: Mixtral-8x7B's and DeepSeek-V3's layers (DESIGN
// §7) in bfloat16 with SwiGLU experts, 4096 tokens per rank, the capacity layout at f = 1.25
// and the ragged layout (dropless), over the linear and the 2DH all-to-all.
//
//   mpirun -np N build/bench/layer_mpi_bench [--ranks-per-node n]
//          [--benchmark_out=layer_mpi.json --benchmark_out_format=json]
//
// Names: layer_step/<model>/<capacity|ragged>/<linear|2dh>. Each iteration's time is the
// slowest rank's (bench/support/mpi.hpp). Counters: tokens_per_second (all ranks' tokens),
// flops and flops_per_second (rank 0's useful FLOPs: 6·H·F per routed row forward, three
// times that forward plus backward), dropped (rank 0's). Configurations whose experts do not
// split over N ranks, or that would not fit a rank's free device memory, are skipped with a
// message. Exits 0 with a message when some rank has no GPU.

#include "../support/device.hpp"
#include "../support/fixture.hpp"
#include "../support/mpi.hpp"

#include <moe/comm/nccl_bootstrap_mpi.hpp>
#include <moe/comm/nccl_communicator.hpp>
#include <moe/core/blas.hpp>
#include <moe/expert/kernels/glu.cuh>
#include <moe/layer/kernels/layer.cuh>
#include <moe/moe.hpp>

#include <benchmark/benchmark.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

namespace {

using moe::index_t;
using element_t = __nv_bfloat16;
using expert_t = moe::expert::glu<moe::act::silu>;

constexpr index_t tokens_per_rank = 4096;

struct model {
  char const* name;
  index_t hidden, ffn, experts;
};
constexpr model models[] = {{"mixtral", 4096, 14336, 8}, {"deepseek_v3", 7168, 2048, 256}};

struct step_config {
  long long model;     // index into `models`
  long long capacity;  // 1: layout::capacity at f = 1.25, 0: layout::ragged
  long long two_dh;    // 1: all_to_all_2dh, 0: linear_all_to_all
  [[nodiscard]] std::string name() const {
    return std::string(models[model].name) + (capacity ? "/capacity" : "/ragged") +
           (two_dh ? "/2dh" : "/linear");
  }
};

/// This rank's NCCL communicator, stream and cuBLAS handle.
struct rank_world {
  moe::comm::nccl_comm owned;
  moe::comm::nccl_communicator comm;
  moe::bench::owned_stream stream_owner;
  cudaStream_t stream = stream_owner.stream;
  moe::blas_handle blas;

  explicit rank_world(int ranks_per_node)
      : owned(moe::comm::make_nccl_comm(MPI_COMM_WORLD)), comm(owned.get(), ranks_per_node) {}
};

/// Skips on every rank alike when any rank says no.
bool every_rank_agrees(bool mine) {
  int agreed = mine ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &agreed, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return agreed == 1;
}

template <int K, class Layout, class Collective>
void layer_step(benchmark::State& state, step_config const& c, rank_world& world) {
  using T = element_t;
  using layer_type = moe::layer<moe::gating::top_k<K>, Layout, Collective, expert_t>;
  model const& m = models[c.model];
  index_t const h = m.hidden;
  moe::layer_args const args{.gate = {.tokens = tokens_per_rank,
                                      .experts = m.experts,
                                      .capacity_factor = 1.25f,
                                      .normalize = moe::gating::renormalize::before_drops,
                                      .aux_loss_coef = 0.01f},
                             .hidden = h,
                             .ffn = m.ffn};
  if (!every_rank_agrees(m.experts % world.comm.size() == 0)) {
    state.SkipWithError("skipped: the experts do not split evenly over the ranks");
    return;
  }
  layer_type const layer(args, world.comm);
  moe::cuda_backend const cuda{world.stream, world.blas.get()};

  // Parameters, gradients, activations and the workspace must fit this rank's free memory.
  double parameters = 0;
  for (moe::parameter_shape const& s : layer.parameter_shapes())
    if (!s.bias) parameters += static_cast<double>(s.elements());
  std::size_t const io_size = static_cast<std::size_t>(tokens_per_rank * h);
  std::size_t const ws_bytes = layer.template workspace_bytes<T>(cuda);
  double const needed = (2 * parameters + 4 * static_cast<double>(io_size)) * sizeof(T) +
                        static_cast<double>(ws_bytes);
  std::size_t free_bytes = 0, total_bytes = 0;
  MOE_CUDA_TRY(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (!every_rank_agrees(needed < static_cast<double>(free_bytes) - (1 << 30))) {
    state.SkipWithError("skipped: a rank has too little free device memory");
    return;
  }

  moe::device_parameters<layer_type, T> w(layer, world.stream);
  moe::bench::device_array<T> x(io_size), y(io_size), dy(io_size), dx(io_size);
  moe::bench::device_array<std::byte> ws(ws_bytes);
  moe::bench::fill_random(reinterpret_cast<T*>(w.values_bytes().data()),
                          w.values_bytes().size() / sizeof(T), 11, 0.05, world.stream);
  moe::bench::fill_random(x, 14 + static_cast<std::uint64_t>(world.comm.rank()), 1.0, world.stream);
  moe::bench::fill_random(dy, 15, 0.05, world.stream);
  auto const x_v = moe::make_view(static_cast<T const*>(x.data()), tokens_per_rank, h);
  auto const dy_v = moe::make_view(static_cast<T const*>(dy.data()), tokens_per_rank, h);
  moe::workspace const ws_v{ws.data(), ws.size()};
  auto step = [&] {
    layer.forward(cuda, x_v, w.params(), moe::make_view(y.data(), tokens_per_rank, h), ws_v);
    layer.backward(cuda, dy_v, w.params(), moe::make_view(dx.data(), tokens_per_rank, h),
                   w.gradients(), ws_v);
  };

  step();  // untimed: NCCL connects, cuBLAS picks its kernels, the routing is read
  moe::layer_stats const stats = layer.stats(cuda, ws_v, tokens_per_rank);
  moe::bench::cuda_event_timer timer(world.stream);
  for (auto _ : state) {
    MPI_Barrier(MPI_COMM_WORLD);
    timer.start();
    step();
    state.SetIterationTime(moe::bench::slowest_over_ranks(timer.stop()));
  }
  world.comm.check_async_error();

  double const routed_rows = static_cast<double>(tokens_per_rank * K - stats.dropped);
  double const flops = 3 * 6.0 * static_cast<double>(h) * static_cast<double>(m.ffn) * routed_rows;
  moe::bench::set_bytes_and_flops(state, 0, flops);
  using counter = benchmark::Counter;
  state.counters["tokens_per_second"] =
      counter(static_cast<double>(tokens_per_rank) * world.comm.size(),
              counter::kIsIterationInvariantRate, counter::kIs1000);
  state.counters["dropped"] = static_cast<double>(stats.dropped);
}

template <int K>
void layer_step(benchmark::State& state, step_config const& c, rank_world& world) {
  using linear = moe::comm::linear_all_to_all;
  using two_dh = moe::comm::all_to_all_2dh;
  if (c.capacity && c.two_dh) return layer_step<K, moe::layout::capacity, two_dh>(state, c, world);
  if (c.capacity) return layer_step<K, moe::layout::capacity, linear>(state, c, world);
  if (c.two_dh) return layer_step<K, moe::layout::ragged, two_dh>(state, c, world);
  layer_step<K, moe::layout::ragged, linear>(state, c, world);
}

}  // namespace

int main(int argc, char** argv) {
  return moe::bench::mpi_cuda_benchmark_main(
      argc, argv, "layer_mpi_bench", [](moe::bench::mpi_rank const& me) {
        rank_world world(me.ranks_per_node);
        auto const configs = moe::bench::product<step_config>(std::vector<long long>{0, 1},
                                                              std::vector<long long>{1, 0},
                                                              std::vector<long long>{0, 1});
        auto const registered = moe::bench::register_grid(
            "layer_step", configs, [&world](benchmark::State& state, step_config const& c) {
              if (c.model == 0)
                layer_step<2>(state, c, world);
              else
                layer_step<8>(state, c, world);
            });
        // A fixed count, the same on every rank (Google Benchmark's own could differ).
        for (auto* b : registered) b->Iterations(10);
        moe::bench::run_benchmarks(me);
      });
}
