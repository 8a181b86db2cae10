// SPDX-License-Identifier: Apache-2.0
// 05_distributed: one MoE layer split over the processes of an MPI job.
//
// 01_expert_parallel splits a layer over threads of one process. Real jobs run one process
// per GPU, started by mpirun (or srun, torchrun's cousins): this program is that job. Each
// process is one rank; it holds E/W of the experts and its share of a fixed global batch of
// tokens, and the layer moves tokens to their experts' ranks and back with an all-to-all.
// Forward and backward run once; rank 0 gathers every rank's outputs and input gradients
// and prints one checksum of them, which is the same for every number of processes: the
// split changes where the experts run, not what they compute. (On GPUs, cuBLAS may choose
// other kernels for other batch shapes, and the last bits with them.)
//
//   mpirun -np N build/examples/05_distributed [--layout capacity|ragged]
//          [--algorithm linear|2dh] [--backend host|cuda] [--ranks-per-node n] [--steps s]
//
// --backend cuda (the default where every rank sees a GPU): each rank takes the GPU of its
// node-local rank, builds its NCCL communicator through MPI (comm::make_nccl_comm), and also
// prints the layer's time per step and the all-to-all's bandwidth. --backend host (the
// default without GPUs): the host backend over MPI itself (comm::mpi_communicator).
// --ranks-per-node pretends the ranks sit on nodes of n ranks, so that 2DH runs both of its
// levels on one machine. N must divide the 8 experts (N = 1, 2, 4, 8).

#include <moe/comm/mpi_communicator.hpp>
#include <moe/moe.hpp>
#if defined(__CUDACC__) && defined(MOE_EXAMPLE_NCCL)
#include <moe/comm/nccl_bootstrap_mpi.hpp>
#include <moe/comm/nccl_communicator.hpp>
#include <moe/expert/kernels/ffn.cuh>
#include <moe/layer/kernels/layer.cuh>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace {

using gate_t = moe::gating::top_k<2>;
using expert_t = moe::expert::ffn<moe::act::gelu>;

constexpr moe::index_t global_tokens = 96, hidden = 32, ffn = 64, experts = 8;

struct options {
  std::string_view layout = "capacity", algorithm = "linear", backend;
  int ranks_per_node = 0;  // 0: as MPI finds the nodes
  int steps = 3;
};

/// The job: this process's rank, the world's size, and this rank's tokens of the global batch.
struct job {
  int rank = 0, size = 1;
  moe::index_t first = 0, tokens = 0;

  job() {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    first = global_tokens * rank / size;
    tokens = global_tokens * (rank + 1) / size - first;
  }
};

/// Element i of the global x (or, with `salt`, dy): a fixed function of i, the same on
/// every rank and for every N.
float global_value(moe::index_t i, std::uint64_t salt) {
  std::uint64_t v = (static_cast<std::uint64_t>(i) + 1) * 0x9e3779b97f4a7c15ull ^ salt;
  v ^= v >> 29;
  v *= 0xbf58476d1ce4e5b9ull;
  v ^= v >> 32;
  return static_cast<float>(static_cast<double>(v >> 11) * 0x1.0p-53 * 2 - 1);
}

/// This rank's rows of the global batch: x and the output gradient dy.
struct rank_batch {
  std::vector<float> x, dy, y, dx;

  explicit rank_batch(job const& j)
      : x(static_cast<std::size_t>(j.tokens * hidden)), dy(x.size()), y(x.size()), dx(x.size()) {
    for (std::size_t i = 0; i < x.size(); ++i) {
      x[i] = global_value(j.first * hidden + static_cast<moe::index_t>(i), 1);
      dy[i] = global_value(j.first * hidden + static_cast<moe::index_t>(i), 2);
    }
  }
};

moe::layer_args args_of(job const& j) {
  return {.gate = {.tokens = j.tokens,  // this rank's
                   .experts = experts,
                   .capacity_factor = 0.0,  // dynamic: the largest load of all ranks, no drops
                   .normalize = moe::gating::renormalize::before_drops},
          .hidden = hidden,
          .ffn = ffn};
}

/// FNV-1a over the bytes of y then dx of every token, gathered on rank 0 in token order.
std::uint64_t checksum_on_rank_0(job const& j, rank_batch const& b) {
  std::vector<int> counts(static_cast<std::size_t>(j.size)), offsets(counts.size());
  for (int r = 0; r < j.size; ++r) {
    moe::index_t const first = global_tokens * r / j.size;
    counts[r] = static_cast<int>((global_tokens * (r + 1) / j.size - first) * hidden);
    offsets[r] = static_cast<int>(first * hidden);
  }
  std::uint64_t hash = 0xcbf29ce484222325ull;
  for (std::vector<float> const* part : {&b.y, &b.dx}) {
    std::vector<float> all(j.rank == 0 ? global_tokens * hidden : 0);
    moe::comm::detail::check_mpi(
        MPI_Gatherv(part->data(), static_cast<int>(part->size()), MPI_FLOAT, all.data(),
                    counts.data(), offsets.data(), MPI_FLOAT, 0, MPI_COMM_WORLD),
        "MPI_Gatherv");
    for (unsigned char byte :
         std::string_view(reinterpret_cast<char const*>(all.data()), all.size() * sizeof(float)))
      hash = (hash ^ byte) * 0x100000001b3ull;
  }
  return hash;
}

/// The host backend over MPI: comm::mpi_communicator moves host memory.
template <class Layout, class Collective>
void run_host(job const& j, options const& o, rank_batch& b) {
  using layer_t = moe::layer<gate_t, Layout, Collective, expert_t>;
  moe::comm::mpi_communicator comm(MPI_COMM_WORLD, {.ranks_per_node = o.ranks_per_node});
  layer_t layer(args_of(j), comm);  // borrows comm; experts [r·E/W, (r+1)·E/W) live here
  // The gate and this rank's experts. The initialiser draws each value from its global index:
  // the same model for every N.
  moe::host_parameters<layer_t, float> w(layer, {.biases = true});
  w.initialize(moe::initializer::torch_linear(), 2024);
  std::vector<std::byte> ws(layer.workspace_bytes(moe::host));
  auto const x = moe::make_view(static_cast<float const*>(b.x.data()), j.tokens, hidden);
  auto const dy = moe::make_view(static_cast<float const*>(b.dy.data()), j.tokens, hidden);
  double const start = MPI_Wtime();
  for (int step = 0; step < o.steps; ++step) {
    layer.forward(moe::host, x, w.params(), moe::make_view(b.y.data(), j.tokens, hidden), ws);
    layer.backward(moe::host, dy, w.params(), moe::make_view(b.dx.data(), j.tokens, hidden),
                   w.gradients(), ws);
  }
  double const per_step = (MPI_Wtime() - start) / o.steps;
  moe::layer_stats const s = layer.stats(moe::host, ws);
  std::printf("rank %d: experts %lld..%lld, %lld tokens, capacity %lld, %.3f ms per step\n", j.rank,
              static_cast<long long>(layer.first_expert()),
              static_cast<long long>(layer.first_expert() + layer.expert_shape().experts - 1),
              static_cast<long long>(j.tokens), static_cast<long long>(s.capacity), per_step * 1e3);
}

#if defined(__CUDACC__) && defined(MOE_EXAMPLE_NCCL)
/// A stream of this rank's own, destroyed at scope exit.
struct owned_stream {
  cudaStream_t get = nullptr;
  owned_stream() { MOE_CUDA_TRY(cudaStreamCreateWithFlags(&get, cudaStreamNonBlocking)); }
  owned_stream(owned_stream const&) = delete;
  owned_stream& operator=(owned_stream const&) = delete;
  ~owned_stream() { MOE_CUDA_TRY_LOG(cudaStreamDestroy(get)); }
};

/// Milliseconds of the work `work()` enqueues on `stream`, averaged over `repeats`.
template <class Work>
double milliseconds_of(cudaStream_t stream, int repeats, Work&& work) {
  cudaEvent_t start = nullptr, stop = nullptr;
  MOE_CUDA_TRY(cudaEventCreate(&start));
  MOE_CUDA_TRY(cudaEventCreate(&stop));
  MOE_CUDA_TRY(cudaEventRecord(start, stream));
  for (int i = 0; i < repeats; ++i) work();
  MOE_CUDA_TRY(cudaEventRecord(stop, stream));
  MOE_CUDA_TRY(cudaEventSynchronize(stop));
  float ms = 0;
  MOE_CUDA_TRY(cudaEventElapsedTime(&ms, start, stop));
  MOE_CUDA_TRY(cudaEventDestroy(start));
  MOE_CUDA_TRY(cudaEventDestroy(stop));
  return static_cast<double>(ms) / repeats;
}

/// The CUDA backend over NCCL: each rank takes the GPU of its node-local rank, and MPI only
/// shares NCCL's id (comm::make_nccl_comm).
template <class Layout, class Collective>
void run_cuda(job const& j, options const& o, rank_batch& b) {
  using layer_t = moe::layer<gate_t, Layout, Collective, expert_t>;
  moe::comm::mpi_node const node = moe::comm::mpi_node_of(MPI_COMM_WORLD);
  int devices = 0;
  MOE_CUDA_TRY(cudaGetDeviceCount(&devices));
  MOE_CUDA_TRY(cudaSetDevice(node.local_rank % devices));
  moe::comm::nccl_comm const nccl = moe::comm::make_nccl_comm(MPI_COMM_WORLD);
  moe::comm::nccl_communicator comm(nccl.get(),
                                    o.ranks_per_node > 0 ? o.ranks_per_node : node.ranks);
  owned_stream stream;
  moe::blas_handle blas;
  moe::cuda_backend const cuda{stream.get, blas.get()};

  layer_t layer(args_of(j), comm);
  moe::device_parameters<layer_t, float> w(layer, stream.get, {.biases = true});
  w.initialize(moe::initializer::torch_linear(), 2024);
  std::size_t const bytes = b.x.size() * sizeof(float);
  moe::device_buffer<> x(bytes, stream.get), dy(bytes, stream.get), y(bytes, stream.get),
      dx(bytes, stream.get), ws(layer.template workspace_bytes<float>(cuda), stream.get);
  auto floats = [&](moe::device_buffer<> const& buffer) {
    return moe::make_view(reinterpret_cast<float*>(buffer.view().data()), j.tokens, hidden);
  };
  MOE_CUDA_TRY(cudaMemcpyAsync(floats(x).data_handle(), b.x.data(), bytes, cudaMemcpyHostToDevice,
                               stream.get));
  MOE_CUDA_TRY(cudaMemcpyAsync(floats(dy).data_handle(), b.dy.data(), bytes, cudaMemcpyHostToDevice,
                               stream.get));
  auto step = [&] {
    layer.forward(cuda, moe::as_const(floats(x)), w.params(), floats(y), ws.view());
    layer.backward(cuda, moe::as_const(floats(dy)), w.params(), floats(dx), w.gradients(),
                   ws.view());
  };
  step();  // warm-up: NCCL connects its peers, cuBLAS loads its kernels
  double const step_ms = milliseconds_of(stream.get, o.steps, step);
  MOE_CUDA_TRY(cudaMemcpyAsync(b.y.data(), floats(y).data_handle(), bytes, cudaMemcpyDeviceToHost,
                               stream.get));
  MOE_CUDA_TRY(cudaMemcpyAsync(b.dx.data(), floats(dx).data_handle(), bytes, cudaMemcpyDeviceToHost,
                               stream.get));

  // The all-to-all alone, over a batch of the layer's dispatched size: [E, C, H] floats.
  moe::layer_stats const s = layer.stats(cuda, ws.view(), j.tokens);
  std::size_t const exchanged =
      static_cast<std::size_t>(experts * std::max<moe::index_t>(s.capacity, 1) * hidden) *
      sizeof(float);
  moe::device_buffer<> send(exchanged, stream.get), received(exchanged, stream.get),
      scratch(std::max<std::size_t>(Collective::scratch_bytes(exchanged, comm.topology()), 1),
              stream.get);
  MOE_CUDA_TRY(cudaMemsetAsync(send.view().data(), 1, exchanged, stream.get));
  double const exchange_ms = milliseconds_of(stream.get, o.steps, [&] {
    Collective::run(cuda, comm, moe::span<std::byte const>(send.view().data(), exchanged),
                    moe::span<std::byte>(received.view().data(), exchanged),
                    moe::span<std::byte>(scratch.view().data(), scratch.size()));
  });
  comm.check_async_error();
  std::printf(
      "rank %d: GPU %d, experts %lld..%lld, %lld tokens, capacity %lld, %.3f ms per step, "
      "all-to-all of %zu bytes in %.3f ms (%.2f GB/s)\n",
      j.rank, node.local_rank % devices, static_cast<long long>(layer.first_expert()),
      static_cast<long long>(layer.first_expert() + layer.expert_shape().experts - 1),
      static_cast<long long>(j.tokens), static_cast<long long>(s.capacity), step_ms, exchanged,
      exchange_ms, static_cast<double>(exchanged) / (exchange_ms * 1e6));
}
#endif

template <class Layout, class Collective>
void run(job const& j, options const& o, rank_batch& b) {
  if (o.backend == "host") return run_host<Layout, Collective>(j, o, b);
#if defined(__CUDACC__) && defined(MOE_EXAMPLE_NCCL)
  run_cuda<Layout, Collective>(j, o, b);
#else
  throw moe::error(
      "--backend cuda: this build of the example has no CUDA backend (it needs "
      "nvcc and NCCL); use --backend host");
#endif
}

template <class Layout>
void run(job const& j, options const& o, rank_batch& b) {
  if (o.algorithm == "2dh") return run<Layout, moe::comm::all_to_all_2dh>(j, o, b);
  run<Layout, moe::comm::linear_all_to_all>(j, o, b);
}

bool every_rank_has_a_gpu() {
  int devices = 0;
  int const mine = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0 ? 1 : 0;
  (void)cudaGetLastError();
  int all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = EXIT_SUCCESS;
  try {
    options o;
    for (int i = 1; i < argc; ++i) {
      std::string_view const arg = argv[i];
      bool const has_value = i + 1 < argc;
      if (arg == "--layout" && has_value)
        o.layout = argv[++i];
      else if (arg == "--algorithm" && has_value)
        o.algorithm = argv[++i];
      else if (arg == "--backend" && has_value)
        o.backend = argv[++i];
      else if (arg == "--ranks-per-node" && has_value)
        o.ranks_per_node = std::atoi(argv[++i]);
      else if (arg == "--steps" && has_value)
        o.steps = std::atoi(argv[++i]);
      else
        throw moe::invalid_argument(
            std::string(arg),
            "is not an option; usage: mpirun -np N 05_distributed [--layout capacity|ragged] "
            "[--algorithm linear|2dh] [--backend host|cuda] [--ranks-per-node n] [--steps s]");
    }
    if (o.backend.empty()) o.backend = every_rank_has_a_gpu() ? "cuda" : "host";
    MOE_EXPECTS(o.layout == "capacity" || o.layout == "ragged", "--layout",
                "is capacity or ragged");
    MOE_EXPECTS(o.algorithm == "linear" || o.algorithm == "2dh", "--algorithm", "is linear or 2dh");
    MOE_EXPECTS(o.backend == "host" || o.backend == "cuda", "--backend", "is host or cuda");
    MOE_EXPECTS(o.steps >= 1, "--steps", "must be at least 1");

    job const j;
    if (j.rank == 0)
      std::printf("%d ranks, %.*s layout, %.*s all-to-all, %.*s backend\n", j.size,
                  static_cast<int>(o.layout.size()), o.layout.data(),
                  static_cast<int>(o.algorithm.size()), o.algorithm.data(),
                  static_cast<int>(o.backend.size()), o.backend.data());
    std::fflush(stdout);
    rank_batch b(j);
    if (o.layout == "ragged")
      run<moe::layout::ragged>(j, o, b);
    else
      run<moe::layout::capacity>(j, o, b);
    std::uint64_t const checksum = checksum_on_rank_0(j, b);
    if (j.rank == 0) std::printf("checksum %016llx\n", static_cast<unsigned long long>(checksum));
  } catch (moe::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    status = EXIT_FAILURE;
  }
  // The job's status is the worst rank's (bad options fail on every rank alike).
  int worst = status;
  MPI_Allreduce(&status, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
