// SPDX-License-Identifier: Apache-2.0
// What routing costs on the CUDA backend, bfloat16 activations, for the shapes of
// Mixtral-8x7B (H 4096, E 8, k 2), DeepSeek-V3 (H 7168, E 256, k 8) and Qwen3-30B-A3B
// (H 2048, E 128, k 8), from decode (T 32) to training (T 16384) token counts:
//
//   router_topk     logits = x · W_gate (cuBLAS) and the fused scores + top-k kernel
//   assign_slots    slot assignment alone (sort, segments, capacity, scatter)
//   router/softmax  the whole forward of the default gate (top_any: softmax, choice-major,
//                   Tutel's capacity at f = 1.25, gshard_aux): the two above, weights, losses
//   router/<policy> the same forward with one option changed, so that the difference to
//                   router/softmax is that option's cost:
//     softmax_topk, sigmoid, sigmoid_bias      score functions, the selection bias
//     group_limited                            sigmoid in 8 groups, the best 4 (DeepSeek-V3's
//                                              shape; compare with sigmoid)
//     random_routing                           GShard's 2nd expert (the k = 2 shape)
//     gate_noise, jitter_input, jitter_logits  training noise
//     local_groups                             G = 4 local groups
//     by_score, batch_prioritized, random_order  priorities (keys sorted first)
//     switch_aux, sequence_aux                 aux losses
//   router/preset:<name>  each preset of gating/presets.hpp at the shapes of its k (the k = 1
//                   presets at Mixtral's and Qwen3's widths and expert counts)
//
//   gating_bench --benchmark_out=gating_bench.json --benchmark_out_format=json
//   gating_bench --benchmark_filter='router/(softmax|sigmoid)/'
//
// Counters: bytes, the useful traffic of one iteration (each input read once and each
// output written once; the logits, and with the input's jitter the float copies of x and
// W_gate, are counted written and read back; scratch such as the sort's buffers is not
// counted), and flops (2·T·H·E of the router GEMM). Exits 0 with a message when there is no
// CUDA device.

#include "../support/device.hpp"
#include "../support/fixture.hpp"

#include <moe/core.hpp>
#include <moe/core/blas.hpp>
#include <moe/gating.hpp>
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

namespace gating = moe::gating;
using element = __nv_bfloat16;

struct shape {
  long long hidden, experts;
  int k;
};

inline constexpr shape mixtral{4096, 8, 2}, deepseek_v3{7168, 256, 8}, qwen3{2048, 128, 8};

struct router_config {
  long long tokens;
  shape s;
  [[nodiscard]] std::string name() const {
    return moe::bench::grid_name(
        {{"T", tokens}, {"H", s.hidden}, {"E", s.experts}, {"k", static_cast<long long>(s.k)}});
  }
};

/// Every token count at each of `shapes`.
std::vector<router_config> configs(std::vector<shape> const& shapes) {
  return moe::bench::product<router_config>(std::vector<long long>{32, 256, 4096, 16384}, shapes);
}

/// The stream and cuBLAS handle every benchmark borrows.
struct cuda_context {
  moe::bench::owned_stream owned;  // outlives the handle, which is bound to it
  cudaStream_t stream = owned.stream;
  moe::blas_handle blas;

  [[nodiscard]] moe::cuda_backend backend() const { return {stream, blas.get()}; }
};

/// The run-time options of a family: what it changes in the default call.
struct call_options {
  float capacity_factor = 1.25f;
  moe::index_t groups = 1;
  bool bias = false;  ///< a selection bias, in device memory
  float scaling_factor = 1.0f;
  float gate_noise = 0.0f;
  float jitter = 0.0f;
  gating::jitter_target jitter_on = gating::jitter_target::input;
};

/// One problem in device memory for gate G: random x, W_gate and selection bias, the routing
/// state and the scratch of `route`.
template <class G>
struct problem {
  moe::index_t tokens, hidden, experts;
  int k;
  moe::device_buffer<> x, w_gate, bias, routing;
  gating::gate_args args;
  moe::device_buffer<> scratch;
  gating::device_routing r;

  static std::size_t routing_bytes(router_config const& c, moe::index_t groups) {
    moe::workspace_carver counter;
    (void)gating::carve_device_routing(counter, c.tokens, c.tokens, c.s.experts, c.s.k, groups);
    return counter.bytes();
  }

  template <class T>
  static void fill_random(moe::device_buffer<>& d, std::uint64_t seed, double scale,
                          cudaStream_t stream) {
    moe::bench::fill_random(reinterpret_cast<T*>(d.view().data()), d.size() / sizeof(T), seed,
                            scale, stream);
  }

  problem(router_config const& c, call_options const& o, cudaStream_t stream)
      : tokens(c.tokens),
        hidden(c.s.hidden),
        experts(c.s.experts),
        k(c.s.k),
        x(static_cast<std::size_t>(tokens * hidden) * sizeof(element), stream),
        w_gate(static_cast<std::size_t>(hidden * experts) * sizeof(element), stream),
        bias(static_cast<std::size_t>(experts) * sizeof(float), stream),
        routing(routing_bytes(c, o.groups), stream),
        args(gating::gate_args{
            .tokens = tokens,
            .experts = experts,
            .k = gating::static_k_gate<G> ? 0 : k,
            .capacity_factor = o.capacity_factor,
            .aux_loss_coef = 1e-2f,
            .z_loss_coef = 1e-3f,
            .groups = o.groups,
            .scaling_factor = o.scaling_factor,
            .jitter = o.jitter,
            .jitter_on = o.jitter_on,
            .gate_noise = o.gate_noise,
            .seed = 0x5eed,
            .expert_bias =
                o.bias ? moe::span<float const>(reinterpret_cast<float const*>(bias.view().data()),
                                                static_cast<std::size_t>(experts))
                       : moe::span<float const>()}),
        scratch(gating::route_workspace_bytes<element>(G{}, args, hidden), stream) {
    fill_random<element>(x, 0x78, 1.0, stream);
    fill_random<element>(w_gate, 0x77, 1.0, stream);
    fill_random<float>(bias, 0x76, 1e-2, stream);
    moe::workspace_carver carver(routing.view());
    r = gating::carve_device_routing(carver, tokens, tokens, experts, k, o.groups);
  }

  [[nodiscard]] moe::matrix_view<element const> x_view() const {
    return moe::make_view(reinterpret_cast<element const*>(x.view().data()), tokens, hidden);
  }
  [[nodiscard]] moe::matrix_view<element const> w_view() const {
    return moe::make_view(reinterpret_cast<element const*>(w_gate.view().data()), hidden, experts);
  }

  void route(cuda_context const& cuda) {
    gating::route(cuda.backend(), G{}, args, x_view(), w_view(), r, scratch.view());
  }

  [[nodiscard]] double router_topk_bytes() const {
    auto const t = static_cast<double>(tokens), h = static_cast<double>(hidden),
               e = static_cast<double>(experts), kk = static_cast<double>(k);
    double bytes = (t * h + h * e) * sizeof(element)  // x, W_gate
                   + 2 * t * e * sizeof(float)        // logits written, read back
                   + t * e * sizeof(float)            // scores
                   + t * kk * (sizeof(std::int32_t) + sizeof(float)) + t * sizeof(float);
    if (!args.expert_bias.empty()) bytes += e * sizeof(float);
    if (gating::detail::jitters_input(args))  // x' and W_gate in float, written and read back
      bytes += 2 * (t * h + h * e) * sizeof(float);
    return bytes;
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

/// The default gate, the baseline of the policy families.
using default_gate = gating::top_any<>;

template <class Work>
void time_on_stream(benchmark::State& state, cuda_context const& cuda, Work&& work) {
  moe::bench::cuda_event_timer timer(cuda.stream);
  moe::bench::l2_flush l2;
  moe::bench::timed_loop(
      state, timer, [&] { l2.flush(cuda.stream); }, work);
}

/// The router GEMM and the fused kernel, with k as a template constant where the library's
/// static gates have it.
template <int K>
void launch_select(problem<default_gate>& p, float* lse, cudaStream_t stream) {
  using select = gating::router_select<gating::softmax, K>;
  moe::launch<select>(select::to_params(p.r, lse), stream);
}

void router_topk(benchmark::State& state, router_config const& c, cuda_context const& cuda) {
  problem<default_gate> p(c, {}, cuda.stream);
  moe::workspace_carver carver(p.scratch.view());
  float* const lse = gating::detail::carve_route_scratch<default_gate, element>(
                         carver, p.args, p.tokens, p.hidden, p.k)
                         .logsumexp_squared;
  time_on_stream(state, cuda, [&] {
    moe::gemm(cuda.blas.get(), cuda.stream,
              {.m = p.tokens,
               .n = p.experts,
               .depth = p.hidden,
               .lda = p.hidden,
               .ldb = p.experts,
               .ldc = p.experts},
              1.0f, p.x_view().data_handle(), p.w_view().data_handle(), 0.0f,
              p.r.logits.data_handle());
    if (p.k == 2)
      launch_select<2>(p, lse, cuda.stream);
    else if (p.k == 8)
      launch_select<8>(p, lse, cuda.stream);
    else
      launch_select<0>(p, lse, cuda.stream);
  });
  moe::bench::set_bytes_and_flops(state, p.router_topk_bytes(), p.gemm_flops());
}

void assign_slots(benchmark::State& state, router_config const& c, cuda_context const& cuda) {
  problem<default_gate> p(c, {}, cuda.stream);
  p.route(cuda);  // experts to assign
  moe::device_buffer<> scratch(
      gating::slots_workspace_bytes<gating::choice_major>(p.tokens, p.k, p.experts), cuda.stream);
  gating::capacity_args const cap{
      .tokens = p.tokens, .experts = p.experts, .k = p.k, .factor = p.args.capacity_factor};
  time_on_stream(state, cuda, [&] {
    gating::assign_slots(cuda.backend(), gating::choice_major{}, cap, p.r, scratch.view());
  });
  moe::bench::set_bytes_and_flops(state, p.slots_bytes(), 0);
}

/// Registers "router/<policy>/<config>": the whole forward of gate G with options `o`, at
/// every token count of `shapes`.
template <class G>
void register_policy(std::string const& policy, call_options const& o,
                     std::vector<shape> const& shapes, cuda_context const& cuda) {
  moe::bench::register_grid("router/" + policy, configs(shapes),
                            [&cuda, o](benchmark::State& state, router_config const& c) {
                              problem<G> p(c, o, cuda.stream);
                              time_on_stream(state, cuda, [&] { p.route(cuda); });
                              moe::bench::set_bytes_and_flops(
                                  state, p.router_topk_bytes() + p.slots_bytes(), p.gemm_flops());
                            });
}

void register_policies(cuda_context const& cuda) {
  std::vector<shape> const all = {mixtral, deepseek_v3, qwen3};
  using gating::top_any;
  using gating::with;
  register_policy<default_gate>("softmax", {}, all, cuda);
  register_policy<top_any<gating::softmax_topk>>("softmax_topk", {}, all, cuda);
  register_policy<top_any<gating::sigmoid>>("sigmoid", {}, all, cuda);
  register_policy<top_any<gating::sigmoid>>("sigmoid_bias", {.bias = true}, all, cuda);
  register_policy<with<top_any<gating::sigmoid>, gating::group_limited<8, 4>>>("group_limited", {},
                                                                               {deepseek_v3}, cuda);
  register_policy<with<default_gate, gating::random_routing>>("random_routing", {}, {mixtral},
                                                              cuda);
  register_policy<default_gate>("gate_noise", {.gate_noise = 1.0f}, all, cuda);
  register_policy<default_gate>(
      "jitter_input", {.jitter = 1e-2f, .jitter_on = gating::jitter_target::input}, all, cuda);
  register_policy<default_gate>(
      "jitter_logits", {.jitter = 1e-2f, .jitter_on = gating::jitter_target::logits}, all, cuda);
  register_policy<default_gate>("local_groups", {.groups = 4}, all, cuda);
  register_policy<top_any<gating::softmax, gating::by_score>>("by_score", {}, all, cuda);
  register_policy<top_any<gating::softmax, gating::batch_prioritized>>("batch_prioritized", {}, all,
                                                                       cuda);
  register_policy<top_any<gating::softmax, gating::random_order>>("random_order", {}, all, cuda);
  register_policy<with<default_gate, gating::switch_aux>>("switch_aux", {}, all, cuda);
  register_policy<with<default_gate, gating::sequence_aux>>("sequence_aux", {}, all, cuda);
}

void register_presets(cuda_context const& cuda) {
  namespace preset = gating::preset;
  std::vector<shape> const k1 = {{mixtral.hidden, mixtral.experts, 1},
                                 {qwen3.hidden, qwen3.experts, 1}};
  std::vector<shape> const k2 = {mixtral}, k8 = {deepseek_v3, qwen3};
  register_policy<preset::gshard>("preset:gshard", {}, k2, cuda);
  register_policy<preset::tutel>("preset:tutel", {}, {mixtral, deepseek_v3, qwen3}, cuda);
  register_policy<preset::deepspeed>("preset:deepspeed", {}, k1, cuda);
  register_policy<preset::deepspeed_top2>("preset:deepspeed_top2", {}, k2, cuda);
  register_policy<preset::megatron>("preset:megatron", {}, k2, cuda);
  register_policy<preset::switch_transformer>("preset:switch_transformer", {}, k1, cuda);
  register_policy<preset::mixtral>("preset:mixtral", {}, k2, cuda);
  register_policy<preset::deepseek_v3>("preset:deepseek_v3", {.bias = true, .scaling_factor = 2.5f},
                                       k8, cuda);
  register_policy<preset::qwen3>("preset:qwen3", {}, k8, cuda);
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
    auto const all = configs({mixtral, deepseek_v3, qwen3});
    moe::bench::register_grid("router_topk", all, with_context(router_topk));
    moe::bench::register_grid("assign_slots", all, with_context(assign_slots));
    register_policies(*cuda);
    register_presets(*cuda);
    benchmark::RunSpecifiedBenchmarks();
  });
}
