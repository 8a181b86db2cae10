// SPDX-License-Identifier: Apache-2.0
// What routing costs on the CUDA backend, bfloat16 activations, for the shapes of
// Mixtral-8x7B (H 4096, E 8, k 2), DeepSeek-V3 (H 7168, E 256, k 8) and Qwen3-30B-A3B
// (H 2048, E 128, k 8), from decode (T 32) to training (T 16384) token counts:
//
//   router_topk   logits = x · W_gate (cuBLAS) and the fused scores + top-k kernel
//   assign_slots  slot assignment alone (sort, segments, capacity, scatter)
//   route         the whole forward: the two above, weights and losses
//
//   gating_bench --benchmark_out=gating_bench.json --benchmark_out_format=json
//
// Counters: bytes, the useful traffic of one iteration (each input read once and each
// output written once; the logits are counted written and read back; scratch such as the
// sort's buffers is not counted), and flops (2·T·H·E of the router GEMM). Exits 0 with a
// message when there is no CUDA device.

#include "../support/device.hpp"
#include "../support/fixture.hpp"

#include <moe/core.hpp>
#include <moe/core/blas.hpp>
#include <moe/gating/kernels/router.cuh>
#include <moe/gating/kernels/select.cuh>
#include <moe/gating/kernels/slots.cuh>

#include <benchmark/benchmark.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace {

using element = __nv_bfloat16;

struct shape {
  long long hidden, experts;
  int k;
};

struct router_config {
  long long tokens;
  shape s;
  [[nodiscard]] std::string name() const {
    return moe::bench::grid_name(
        {{"T", tokens}, {"H", s.hidden}, {"E", s.experts}, {"k", static_cast<long long>(s.k)}});
  }
};

std::vector<router_config> configs() {
  return moe::bench::product<router_config>(
      std::vector<long long>{32, 256, 4096, 16384},
      std::vector<shape>{{4096, 8, 2}, {7168, 256, 8}, {2048, 128, 8}});
}

/// The stream and cuBLAS handle every benchmark borrows.
struct cuda_context {
  moe::bench::owned_stream owned;  // outlives the handle, which is bound to it
  cudaStream_t stream = owned.stream;
  moe::blas_handle blas;

  [[nodiscard]] moe::cuda_backend backend() const { return {stream, blas.get()}; }
};

/// One problem in device memory: random x and W_gate, the routing state and the scratch.
struct problem {
  moe::index_t tokens, hidden, experts;
  int k;
  moe::gating::gate_args args;
  moe::device_buffer<> x, w_gate, routing, scratch, slots_scratch;
  moe::gating::device_routing r;

  /// Fills `d` with random bfloat16 values, never zeros.
  static void fill_random(moe::device_buffer<>& d, std::uint64_t seed, cudaStream_t stream) {
    moe::bench::fill_random(reinterpret_cast<element*>(d.view().data()), d.size() / sizeof(element),
                            seed, 1.0, stream);
  }

  static std::size_t routing_bytes(router_config const& c) {
    moe::workspace_carver counter;
    (void)moe::gating::carve_device_routing(counter, c.tokens, c.tokens, c.s.experts, c.s.k);
    return counter.bytes();
  }

  problem(router_config const& c, cudaStream_t stream)
      : tokens(c.tokens),
        hidden(c.s.hidden),
        experts(c.s.experts),
        k(c.s.k),
        args{.tokens = tokens, .experts = experts, .k = k, .capacity_factor = 1.25f},
        x(static_cast<std::size_t>(tokens * hidden) * sizeof(element), stream),
        w_gate(static_cast<std::size_t>(hidden * experts) * sizeof(element), stream),
        routing(routing_bytes(c), stream),
        scratch(moe::gating::route_workspace_bytes(moe::gating::top_any<>{}, args), stream),
        slots_scratch(moe::gating::slots_workspace_bytes(tokens, k, experts), stream) {
    fill_random(x, 0x78, stream);
    fill_random(w_gate, 0x77, stream);
    moe::workspace_carver carver(routing.view());
    r = moe::gating::carve_device_routing(carver, tokens, tokens, experts, k);
  }

  [[nodiscard]] moe::matrix_view<element const> x_view() const {
    return moe::make_view(reinterpret_cast<element const*>(x.view().data()), tokens, hidden);
  }
  [[nodiscard]] moe::matrix_view<element const> w_view() const {
    return moe::make_view(reinterpret_cast<element const*>(w_gate.view().data()), hidden, experts);
  }

  void route(cuda_context const& cuda) {
    moe::gating::route(cuda.backend(), moe::gating::top_any<>{}, args, x_view(), w_view(), r,
                       scratch.view());
  }

  /// The router GEMM and the fused kernel, with k as a template constant where the
  /// library's static gates have it.
  void router_topk(cuda_context const& cuda) {
    moe::gemm(
        cuda.blas.get(), cuda.stream,
        {.m = tokens, .n = experts, .depth = hidden, .lda = hidden, .ldb = experts, .ldc = experts},
        1.0f, x_view().data_handle(), w_view().data_handle(), 0.0f, r.logits.data_handle());
    moe::workspace_carver carver(scratch.view());
    float* const lse =
        moe::gating::detail::carve_route_scratch(carver, tokens, experts, k).logsumexp_squared;
    if (k == 2)
      launch_select<2>(lse, cuda.stream);
    else if (k == 8)
      launch_select<8>(lse, cuda.stream);
    else
      launch_select<0>(lse, cuda.stream);
  }

  template <int K>
  void launch_select(float* lse, cudaStream_t stream) {
    using select = moe::gating::router_select<moe::gating::softmax, K>;
    moe::launch<select>(select::to_params(r, lse), stream);
  }

  void assign_slots(cuda_context const& cuda) {
    moe::gating::capacity_args const cap{
        .tokens = tokens, .experts = experts, .k = k, .factor = args.capacity_factor};
    moe::gating::assign_slots(cuda.backend(), moe::gating::choice_major{}, cap, r,
                              slots_scratch.view());
  }

  [[nodiscard]] double router_topk_bytes() const {
    auto const t = static_cast<double>(tokens), h = static_cast<double>(hidden),
               e = static_cast<double>(experts), kk = static_cast<double>(k);
    return (t * h + h * e) * sizeof(element)  // x, W_gate
           + 2 * t * e * sizeof(float)        // logits written, read back
           + t * e * sizeof(float)            // scores
           + t * kk * (sizeof(std::int32_t) + sizeof(float)) + t * sizeof(float);
  }
  [[nodiscard]] double slots_bytes() const {
    auto const t = static_cast<double>(tokens), kk = static_cast<double>(k);
    return t * kk * (sizeof(std::int32_t) + sizeof(std::int64_t)) +
           static_cast<double>(experts) * sizeof(std::int64_t);
  }
  [[nodiscard]] double gemm_flops() const {
    return 2.0 * static_cast<double>(tokens) * static_cast<double>(hidden) *
           static_cast<double>(experts);
  }
};

template <class Work>
void time_on_stream(benchmark::State& state, cuda_context const& cuda, Work&& work) {
  moe::bench::cuda_event_timer timer(cuda.stream);
  moe::bench::l2_flush l2;
  moe::bench::timed_loop(
      state, timer, [&] { l2.flush(cuda.stream); }, work);
}

void router_topk(benchmark::State& state, router_config const& c, cuda_context const& cuda) {
  problem p(c, cuda.stream);
  time_on_stream(state, cuda, [&] { p.router_topk(cuda); });
  moe::bench::set_bytes_and_flops(state, p.router_topk_bytes(), p.gemm_flops());
}

void assign_slots(benchmark::State& state, router_config const& c, cuda_context const& cuda) {
  problem p(c, cuda.stream);
  p.route(cuda);  // experts to assign
  time_on_stream(state, cuda, [&] { p.assign_slots(cuda); });
  moe::bench::set_bytes_and_flops(state, p.slots_bytes(), 0);
}

void route(benchmark::State& state, router_config const& c, cuda_context const& cuda) {
  problem p(c, cuda.stream);
  time_on_stream(state, cuda, [&] { p.route(cuda); });
  moe::bench::set_bytes_and_flops(state, p.router_topk_bytes() + p.slots_bytes(), p.gemm_flops());
}

}  // namespace

int main(int argc, char** argv) {
  return moe::bench::cuda_benchmark_main(argc, argv, "gating_bench", [] {
    auto const cuda = std::make_unique<cuda_context>();
    auto with_context = [&cuda](auto family) {
      return [&cuda, family](benchmark::State& state, router_config const& config) {
        family(state, config, *cuda);
      };
    };
    auto const all = configs();
    moe::bench::register_grid("router_topk", all, with_context(router_topk));
    moe::bench::register_grid("assign_slots", all, with_context(assign_slots));
    moe::bench::register_grid("route", all, with_context(route));
    benchmark::RunSpecifiedBenchmarks();
  });
}
