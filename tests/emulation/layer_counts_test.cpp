// SPDX-License-Identifier: Apache-2.0
// What the layer's documentation promises about synchronisation and allocation, counted by
// the emulated runtime: with the capacity layout and a fixed factor, forward and backward
// make no host synchronisation, no allocation and no copy to the host, and can be captured
// in a CUDA graph in global mode; with dynamic capacity, and with the ragged layout, each
// makes exactly its one documented read-back. Nothing goes to the legacy default stream.
// The same with expert parallelism over the virtual ranks of a device_simulated_world:
// every rank makes the one-rank layer's synchronisations, and no more; with a fixed factor
// its forward and backward capture in a graph (over one rank: see the test).

#include "../support/device.hpp"
#include "../support/graph.hpp"

#include <doctest/doctest.h>

#include <moe/core/blas.hpp>
#include <moe/expert/kernels/ffn.cuh>
#include <moe/layer/kernels/layer.cuh>
#include <moe/moe.hpp>

#include <moe_emulation/runtime.hpp>

#include <cuda_runtime.h>

#include <array>
#include <barrier>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace moe;
using emulation::counters;
using test::device_array;

using expert_type = expert::ffn<act::gelu>;
template <class Layout>
using layer_of = layer<gating::top_k<2>, Layout, comm::single_rank, expert_type>;

layer_args args_with_factor(float factor) {
  return {.gate = {.tokens = 64, .experts = 8, .capacity_factor = factor}, .hidden = 32, .ffn = 48};
}

/// One layer with its parameters, gradients, input and workspace in device memory, on its
/// own stream and cuBLAS handle. `Layer` is built from the arguments and, with expert
/// parallelism, the rank's communicator; the inputs are drawn from `seed`.
template <class Layer>
struct layer_call {
  test::owned_stream s;
  blas_handle blas;
  cuda_backend cuda{s.stream, blas.get()};
  Layer layer;
  index_t tokens, hidden;
  device_parameters<Layer, float> w{layer, s.stream};
  device_array<float> x, y, dy, dx;
  device_array<std::byte> ws;

  template <class... Communicator>
  layer_call(std::uint64_t seed, layer_args const& a, Communicator&... comm)
      : layer(a, comm...),
        tokens(a.gate.tokens),
        hidden(a.hidden),
        x(static_cast<std::size_t>(a.gate.tokens * a.hidden)),
        y(x.size()),
        dy(x.size()),
        dx(x.size()),
        ws(layer.template workspace_bytes<float>(cuda)) {
    w.initialize(initializer::uniform(0.5), 11);
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(-0.5f, 0.5f);
    for (auto* array : {&x, &dy}) {
      std::vector<float> values(array->size());
      for (auto& v : values) v = u(rng);
      array->upload(values, s.stream);
    }
  }

  void forward() {
    layer.forward(cuda, make_view(static_cast<float const*>(x.data()), tokens, hidden), w.params(),
                  make_view(y.data(), tokens, hidden), workspace{ws.data(), ws.size()});
  }
  void backward() {
    layer.backward(cuda, make_view(static_cast<float const*>(dy.data()), tokens, hidden),
                   w.params(), make_view(dx.data(), tokens, hidden), w.gradients(),
                   workspace{ws.data(), ws.size()});
  }
  /// The counters of `step` alone, after the stream has drained.
  template <class Step>
  counters count_of(Step&& step) {
    MOE_CUDA_TRY(cudaStreamSynchronize(s.stream));
    counters const before = emulation::read_counters();
    step();
    counters const during = emulation::read_counters() - before;
    MOE_CUDA_TRY(cudaStreamSynchronize(s.stream));
    return during;
  }
};

void report(char const* what, counters const& c) {
  MESSAGE(std::string(what) << ": " << c.kernel_launches << " launches, " << c.library_calls
                            << " library calls, " << c.host_synchronizations << " host syncs, "
                            << c.device_allocations << " allocations, " << c.device_to_host_copies
                            << " copies to the host");
}

/// Every call does work on the device, and none of it on the legacy stream.
void check_common(counters const& c) {
  CHECK(c.kernel_launches > 0);
  CHECK(c.library_calls > 0);
  CHECK(c.device_allocations == 0);
  CHECK(c.device_frees == 0);
  CHECK(c.legacy_stream_operations == 0);
}

/// The counters of one forward and one backward of `call`, reported as `what` and held to
/// check_common.
template <class Layout>
std::array<counters, 2> count_pass(layer_call<layer_of<Layout>>& call, std::string const& what) {
  std::array<counters, 2> const c{call.count_of([&] { call.forward(); }),
                                  call.count_of([&] { call.backward(); })};
  report((what + ", forward").c_str(), c[0]);
  report((what + ", backward").c_str(), c[1]);
  for (counters const& pass : c) check_common(pass);
  return c;
}

}  // namespace

TEST_CASE("the capacity layer with a fixed factor never synchronises or allocates") {
  layer_call<layer_of<layout::capacity>> call(11, args_with_factor(1.25f));
  call.forward();  // set-up outside the counted calls, as a trainer's first step
  call.backward();
  for (counters const& c : count_pass(call, "capacity, f = 1.25")) {
    CHECK(c.host_synchronizations == 0);
    CHECK(c.device_to_host_copies == 0);
  }

  SUBCASE("and forward + backward can be captured in global mode") {
    test::captured_graph const graph(call.s.stream, cudaStreamCaptureModeGlobal, [&] {
      call.forward();
      call.backward();
    });
    CHECK(graph.still_capturing());
    REQUIRE(graph.ok());
    CHECK(!graph.nodes().empty());
  }
}

TEST_CASE("dynamic capacity reads the capacity back once per forward and once per backward") {
  for (float factor : {0.0f, -1.5f}) {
    INFO("capacity factor " << factor);
    layer_call<layer_of<layout::capacity>> call(11, args_with_factor(factor));
    for (counters const& c : count_pass(call, "capacity, dynamic"))
      CHECK(c.host_synchronizations == 1);

    // A capture would have to synchronise, and fails instead of hiding it.
    cudaGraph_t graph = nullptr;
    MOE_CUDA_TRY(cudaStreamBeginCapture(call.s.stream, cudaStreamCaptureModeGlobal));
    CHECK_THROWS_AS(call.forward(), moe::cuda_error);
    CHECK(cudaStreamEndCapture(call.s.stream, &graph) != cudaSuccess);
    CHECK(graph == nullptr);
    (void)cudaGetLastError();
  }
}

TEST_CASE("the ragged layout reads the expert batch back once per forward and per backward") {
  layer_call<layer_of<layout::ragged>> call(11, args_with_factor(1.0f));
  for (counters const& c : count_pass(call, "ragged")) {
    CHECK(c.host_synchronizations == 1);
    CHECK(c.device_to_host_copies >= 1);
  }
}

namespace {

/// One rank's expert-parallel layer, its inputs drawn from the rank's own seed.
template <class Layout>
using expert_parallel_layer =
    moe::layer<gating::top_k<2>, Layout, comm::linear_all_to_all, expert_type>;

/// Forward and backward of an expert-parallel layer on every rank of a two-rank world; the
/// counters of all ranks together during forward and during backward (after a first call,
/// and with every stream drained outside the counted steps).
template <class Layout>
std::array<counters, 2> count_expert_parallel(layer_args const& a, std::string const& what) {
  comm::device_simulated_world world({.ranks_per_node = 2, .nodes = 1});
  std::barrier<> together(world.size());
  std::array<counters, 3> snapshots;
  world.run([&](comm::device_simulated_world::rank_communicator& c) {
    layer_call<expert_parallel_layer<Layout>> rank(11 + static_cast<std::uint64_t>(c.rank()), a, c);
    // The snapshot between steps, taken by rank 0 while every rank waits.
    auto snapshot = [&](std::size_t i) {
      together.arrive_and_wait();
      if (c.rank() == 0) snapshots[i] = emulation::read_counters();
      together.arrive_and_wait();
    };
    rank.forward();
    rank.backward();
    MOE_CUDA_TRY(cudaStreamSynchronize(rank.s.stream));
    snapshot(0);
    rank.forward();
    snapshot(1);
    rank.backward();
    snapshot(2);
    MOE_CUDA_TRY(cudaStreamSynchronize(rank.s.stream));
  });
  std::array<counters, 2> const c{snapshots[1] - snapshots[0], snapshots[2] - snapshots[1]};
  report((what + ", 2 ranks, forward").c_str(), c[0]);
  report((what + ", 2 ranks, backward").c_str(), c[1]);
  for (counters const& pass : c) check_common(pass);
  return c;
}

}  // namespace

TEST_CASE(
    "expert parallelism: a fixed factor never synchronises; dynamic capacity and the "
    "ragged layout read back once per call on each rank") {
  for (counters const& c :
       count_expert_parallel<layout::capacity>(args_with_factor(1.25f), "capacity, f = 1.25")) {
    CHECK(c.host_synchronizations == 0);
    CHECK(c.device_to_host_copies == 0);
  }
  for (counters const& c :
       count_expert_parallel<layout::capacity>(args_with_factor(0.0f), "capacity, dynamic"))
    CHECK(c.host_synchronizations == 2);  // one per rank
  for (counters const& c : count_expert_parallel<layout::ragged>(args_with_factor(1.0f), "ragged"))
    CHECK(c.host_synchronizations == 2);
}

TEST_CASE("expert parallelism with a fixed factor captures in a CUDA graph in global mode") {
  // A world of one rank: the exchanges are the same local copies and reorders, and no message
  // crosses between captures (the simulated world's transport joins two ranks' streams, which
  // two separate captures cannot; NCCL's calls are capturable).
  comm::device_simulated_world world({.ranks_per_node = 1, .nodes = 1});
  world.run([&](comm::device_simulated_world::rank_communicator& c) {
    layer_call<expert_parallel_layer<layout::capacity>> rank(
        11 + static_cast<std::uint64_t>(c.rank()), args_with_factor(1.25f), c);
    rank.forward();  // set-up outside the capture
    rank.backward();
    test::captured_graph const graph(rank.s.stream, cudaStreamCaptureModeGlobal, [&] {
      rank.forward();
      rank.backward();
    });
    CHECK(graph.still_capturing());
    REQUIRE(graph.ok());
    CHECK(!graph.nodes().empty());
  });
}
