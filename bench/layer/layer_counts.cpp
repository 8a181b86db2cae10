// SPDX-License-Identifier: Apache-2.0
// What one layer call costs in things that can be counted without a GPU: kernel launches,
// library calls (cuBLAS, CUB), host synchronisations and allocations, forward and backward,
// for both layouts at the DESIGN §7 configurations, in bfloat16 with glu<silu> experts.
// Built against the emulated CUDA runtime (tests/emulation/) and run by scripts/test.sh, so
// CI prints it on every change; on a GPU, bench/layer/layer_bench.cu measures time.
//
// The emulated device runs every kernel on the CPU, so H and F are divided by `scale`
// (printed); E, k and T are the models'. The counts do not depend on H or F. Workspace bytes
// are those of the full shape (a host query, nothing allocated).
//
//   layer_counts [tokens (256)] [scale (32)]

#include <moe/core/blas.hpp>
#include <moe/expert/kernels/glu.cuh>
#include <moe/layer/kernels/layer.cuh>
#include <moe/moe.hpp>

#include <moe_emulation/runtime.hpp>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace moe;
using element_type = __nv_bfloat16;
using expert_type = expert::glu<act::silu>;

struct model {
  char const* name;
  index_t hidden, ffn, experts;
};

/// Device memory owned for the program's lifetime of one measurement.
struct device_memory {
  std::vector<void*> blocks;
  device_memory() = default;
  device_memory(device_memory const&) = delete;
  device_memory& operator=(device_memory const&) = delete;
  ~device_memory() {
    for (void* p : blocks) (void)cudaFree(p);
  }
  template <class T>
  T* allocate(index_t count) {
    void* p = nullptr;
    MOE_CUDA_TRY(cudaMalloc(&p, static_cast<std::size_t>(count) * sizeof(T) + 1));
    blocks.push_back(p);
    return static_cast<T*>(p);
  }
  template <class T>
  T* random(index_t count, std::mt19937_64& rng) {
    T* p = allocate<T>(count);
    std::uniform_real_distribution<float> u(-0.5f, 0.5f);
    std::vector<T> host(static_cast<std::size_t>(count));
    for (auto& v : host) v = from_accumulate<T>(u(rng));
    MOE_CUDA_TRY(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    return p;
  }
};

template <class Gate, class Layout>
void measure(model const& m, char const* gate_name, float factor, index_t tokens, index_t scale,
             cudaStream_t stream, cublasHandle_t blas) {
  using layer_type = layer<Gate, Layout, comm::single_rank, expert_type>;
  cuda_backend const cuda{stream, blas};
  layer_args full{.gate = {.tokens = tokens, .experts = m.experts, .capacity_factor = factor},
                  .hidden = m.hidden,
                  .ffn = m.ffn};
  if constexpr (std::is_same_v<Gate, gating::preset::deepseek_v3>) full.gate.scaling_factor = 2.5f;
  std::size_t const full_workspace = layer_type(full).template workspace_bytes<element_type>(cuda);

  layer_args a = full;
  a.hidden = m.hidden / scale;
  a.ffn = m.ffn / scale;
  layer_type const layer(a);
  index_t const e = a.gate.experts, h = a.hidden, f = a.ffn;
  std::mt19937_64 rng(5);
  device_memory memory;
  auto* gate = memory.random<element_type>(h * e, rng);
  auto* w13 = memory.random<element_type>(e * h * 2 * f, rng);
  auto* w2 = memory.random<element_type>(e * f * h, rng);
  auto* x = memory.random<element_type>(tokens * h, rng);
  auto* dy = memory.random<element_type>(tokens * h, rng);
  auto* y = memory.random<element_type>(tokens * h, rng);
  auto* dx = memory.random<element_type>(tokens * h, rng);
  auto* d_gate = memory.random<element_type>(h * e, rng);
  auto* d_w13 = memory.random<element_type>(e * h * 2 * f, rng);
  auto* d_w2 = memory.random<element_type>(e * f * h, rng);
  std::size_t const ws_bytes = layer.template workspace_bytes<element_type>(cuda);
  auto* ws = memory.allocate<std::byte>(static_cast<index_t>(ws_bytes));

  layer_params<element_type const, expert_type> const p{
      make_view(static_cast<element_type const*>(gate), h, e),
      {make_view(static_cast<element_type const*>(w13), e, h, 2 * f),
       {},
       make_view(static_cast<element_type const*>(w2), e, f, h),
       {}}};
  layer_params<element_type, expert_type> const g{
      make_view(d_gate, h, e), {make_view(d_w13, e, h, 2 * f), {}, make_view(d_w2, e, f, h), {}}};
  auto forward = [&] {
    layer.forward(cuda, make_view(static_cast<element_type const*>(x), tokens, h), p,
                  make_view(y, tokens, h), workspace{ws, ws_bytes});
  };
  auto backward = [&] {
    layer.backward(cuda, make_view(static_cast<element_type const*>(dy), tokens, h), p,
                   make_view(dx, tokens, h), g, workspace{ws, ws_bytes});
  };
  auto counted = [&](auto&& step) {
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    emulation::counters const before = emulation::read_counters();
    step();
    emulation::counters const c = emulation::read_counters() - before;
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    return c;
  };
  forward();  // set-up outside the counted calls
  backward();
  emulation::counters const fwd = counted(forward), bwd = counted(backward);
  std::printf("| %-11s | %-8s | %-22s |", m.name,
              std::is_same_v<Layout, layout::ragged> ? "ragged" : "capacity", gate_name);
  for (emulation::counters const& c : {fwd, bwd})
    std::printf(" %8lld | %9lld | %9lld | %10lld |", static_cast<long long>(c.kernel_launches),
                static_cast<long long>(c.library_calls),
                static_cast<long long>(c.host_synchronizations),
                static_cast<long long>(c.device_allocations));
  std::printf(" %10.1f |\n", static_cast<double>(full_workspace) / (1 << 20));
}

}  // namespace

int main(int argc, char** argv) try {
  index_t const tokens = argc > 1 ? std::atoll(argv[1]) : 256;
  index_t const scale = argc > 2 ? std::atoll(argv[2]) : 32;
  if (tokens < 1 || scale < 1) {
    std::fprintf(stderr, "usage: layer_counts [tokens >= 1] [scale >= 1]\n");
    return 2;
  }
  model const mixtral{"mixtral", 4096, 14336, 8}, deepseek{"deepseek_v3", 7168, 2048, 256},
      qwen3{"qwen3", 2048, 768, 128}, gpt_oss{"gpt_oss", 2880, 2880, 128};

  cudaStream_t stream = nullptr;
  MOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  blas_handle blas;
  std::printf(
      "moe layer, one call, bfloat16, glu<silu>, T = %lld; counted on the emulated CUDA "
      "runtime with H and F divided by %lld (counts do not depend on them); workspace "
      "of the full shape\n\n",
      static_cast<long long>(tokens), static_cast<long long>(scale));
  std::printf(
      "(kern: kernel launches; calls: cuBLAS and CUB calls; syncs: host "
      "synchronisations; allocs: device allocations)\n\n");
  std::printf("| %-11s | %-8s | %-22s |", "config", "layout", "gate");
  for (char const* pass : {"fwd", "bwd"})
    std::printf(" %s kern | %s calls | %s syncs | %s allocs |", pass, pass, pass, pass);
  std::printf(" %-10s |\n", "ws MiB");
  std::printf("|-------------|----------|------------------------|");
  for (int pass = 0; pass < 2; ++pass)
    std::printf("----------|-----------|-----------|------------|");
  std::printf("------------|\n");
  using namespace gating;
  measure<preset::mixtral, layout::ragged>(mixtral, "preset::mixtral", 1.0f, tokens, scale, stream,
                                           blas.get());
  measure<top_k<2, softmax_topk>, layout::capacity>(mixtral, "top_k<2, softmax_topk>", 1.25f,
                                                    tokens, scale, stream, blas.get());
  measure<preset::gshard, layout::capacity>(mixtral, "preset::gshard", 1.25f, tokens, scale, stream,
                                            blas.get());
  measure<preset::deepseek_v3, layout::ragged>(deepseek, "preset::deepseek_v3", 1.0f, tokens, scale,
                                               stream, blas.get());
  measure<top_k<8, sigmoid>, layout::capacity>(deepseek, "top_k<8, sigmoid>", 1.25f, tokens, scale,
                                               stream, blas.get());
  measure<preset::qwen3, layout::ragged>(qwen3, "preset::qwen3", 1.0f, tokens, scale, stream,
                                         blas.get());
  measure<top_k<8, softmax>, layout::capacity>(qwen3, "top_k<8, softmax>", 1.25f, tokens, scale,
                                               stream, blas.get());
  measure<top_k<4, softmax_topk>, layout::ragged>(gpt_oss, "top_k<4, softmax_topk>", 1.0f, tokens,
                                                  scale, stream, blas.get());
  measure<top_k<4, softmax_topk>, layout::capacity>(gpt_oss, "top_k<4, softmax_topk>", 1.25f,
                                                    tokens, scale, stream, blas.get());
  MOE_CUDA_TRY(cudaStreamDestroy(stream));
  return 0;
} catch (std::exception const& e) {
  std::fprintf(stderr, "layer_counts: %s\n", e.what());
  return 1;
}
