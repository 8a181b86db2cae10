// SPDX-License-Identifier: Apache-2.0
// The whole moe::layer on the CUDA backend at the DESIGN §7 configurations, in bfloat16 with
// glu<silu> (SwiGLU) experts: forward, and forward plus backward, of Mixtral-8x7B,
// DeepSeek-V3, Qwen3-30B-A3B and gpt-oss-120b with the ragged layout (dropless), and of
// Mixtral's shape with the capacity layout at f = 1.25 (Tutel's rounding), at decode and
// prefill token counts. Inputs and parameters are random, never zero.
//
//   layer_bench --benchmark_out=layer_bench.json --benchmark_out_format=json
//   python3 bench/peers/torch_peers.py --moe-json layer_bench.json
//
// Names are layer/<config>/<forward|forward_backward>/T:<tokens>, config one of mixtral,
// deepseek_v3, qwen3, gpt_oss: bench/peers/torch_peers.py finds our times by them. The
// capacity-layout runs, which no peer runs, add /capacity; they are registered (and so
// reported) before the dropless ones.
//
// Routing is the same for every configuration, the one the peers use: a softmax over all
// experts, the top k, the k weights renormalised over the selected. DeepSeek-V3 runs with
// that gate too, as the peers run it (the expert work, which dominates, is the model's); its
// own router (sigmoid scores, selection bias, expert groups) is timed in
// bench/gating/router_bench.cu.
//
// Counters: flops (useful: 6·H·F per routed row forward, three times that forward plus
// backward; padding, dropped assignments and the router excluded), flops_per_second
// (TFLOP/s shows as e.g. "520T/s"), fraction_of_gemm (that rate over a large cuBLAS bf16
// GEMM measured at the start of the same run), and at decode sizes (T ≤ 64)
// fraction_of_weight_read: the time to read the active experts' weights once at the copy
// bandwidth measured at the start of the run, over the measured time (1 would be as fast as
// memory allows). bytes: x, y, the gate weight and the active experts' weights (forward);
// also dy, dx, those weights again and every gradient (forward plus backward: experts that
// received no token get zero gradients, written). Also rows (of the expert batch, padding
// included), active_experts and dropped. The L2 is flushed before every iteration.
// Configurations that would need more than 100 GB of device memory, or more than is free,
// are skipped with a message. Exits 0 with a message when there is no CUDA device.

#include "../support/device.hpp"
#include "../support/fixture.hpp"

#include <moe/core/backend.hpp>
#include <moe/core/blas.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/expert/kernels/glu.cuh>
#include <moe/layer/kernels/layer.cuh>
#include <moe/moe.hpp>

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>
#include <vector>

namespace {

using moe::index_t;
using element_t = __nv_bfloat16;
using expert_t = moe::expert::glu<moe::act::silu>;

/// A model's MoE layer (DESIGN §7); `name` is the peers' name for it.
struct model {
  char const* name;
  index_t hidden, ffn, experts;
  int k;
};

constexpr model models[] = {{"mixtral", 4096, 14336, 8, 2},
                            {"deepseek_v3", 7168, 2048, 256, 8},
                            {"qwen3", 2048, 768, 128, 8},
                            {"gpt_oss", 2880, 2880, 128, 4}};

constexpr long long token_counts[] = {1, 16, 256, 4096, 8192, 16384};
constexpr index_t decode_tokens = 64;  // T ≤ this: decode, bound by reading the weights
constexpr double memory_budget = 100e9;

struct layer_config {
  long long model;     // index into `models`
  long long tokens;    // T
  long long backward;  // 0: forward, 1: forward and backward
  long long capacity;  // 0: layout::ragged (dropless), 1: layout::capacity, f = 1.25
  [[nodiscard]] std::string name() const {
    return std::string(models[model].name) + (backward ? "/forward_backward/" : "/forward/") +
           moe::bench::grid_name({{"T", tokens}}) + (capacity ? "/capacity" : "");
  }
};

using moe::bench::device_array;
using bench_context = moe::bench::blas_context;

template <int K, class Layout>
void layer_benchmark(benchmark::State& state, layer_config const& c, bench_context const& ctx) {
  using T = element_t;
  using layer_type = moe::layer<moe::gating::top_k<K>, Layout, moe::comm::single_rank, expert_t>;
  model const& m = models[c.model];
  index_t const tokens = c.tokens, h = m.hidden, f = m.ffn, e = m.experts;
  bool const backward = c.backward != 0;

  moe::layer_args const args{.gate = {.tokens = tokens,
                                      .experts = e,
                                      .capacity_factor = 1.25f,
                                      .normalize = moe::gating::renormalize::before_drops,
                                      .aux_loss_coef = backward ? 0.01f : 0.0f,
                                      .training = backward,
                                      .eval_capacity_factor = 1.25f},
                             .hidden = h,
                             .ffn = f};
  if (auto const s = layer_type::can_implement(args); !s) {
    state.SkipWithError(("layer rejected: '" + s.argument() + "' " + s.message()).c_str());
    return;
  }
  layer_type const layer(args);
  moe::cuda_backend const cuda{ctx.stream, ctx.blas};

  // Device memory: parameters (and gradients), activations, the workspace.
  double parameters = 0;  // elements: the gate weight, W13 and W2 (no biases)
  for (moe::parameter_shape const& s : layer.parameter_shapes())
    if (!s.bias) parameters += static_cast<double>(s.elements());
  std::size_t const io_size = static_cast<std::size_t>(tokens * h);
  std::size_t const ws_bytes = layer.template workspace_bytes<T>(cuda);
  double const needed =
      (parameters * (backward ? 2 : 1) + static_cast<double>(io_size * (backward ? 4 : 2))) *
          sizeof(T) +
      static_cast<double>(ws_bytes);
  std::size_t free_bytes = 0, total_bytes = 0;
  MOE_CUDA_TRY(cudaMemGetInfo(&free_bytes, &total_bytes));
  double const limit = std::min(memory_budget, static_cast<double>(free_bytes) - (1 << 30));
  if (needed > limit) {
    state.SkipWithError(("skipped: needs " + std::to_string(needed * 1e-9) +
                         " GB of device memory, more than the " + std::to_string(limit * 1e-9) +
                         " GB allowed")
                            .c_str());
    return;
  }

  // Parameters and (for backward) gradients, laid out from the layer; random values filled
  // on the device (a host initialiser would dominate the setup at these sizes).
  moe::device_parameters<layer_type, T> w(layer, ctx.stream, {.gradients = backward});
  device_array<T> x(io_size), y(io_size), dy(backward ? io_size : 0), dx(dy.size());
  device_array<std::byte> ws(ws_bytes);
  moe::bench::fill_random(reinterpret_cast<T*>(w.values_bytes().data()),
                          w.values_bytes().size() / sizeof(T), 11, 0.05, ctx.stream);
  moe::bench::fill_random(x, 14, 1.0, ctx.stream);
  if (backward) moe::bench::fill_random(dy, 15, 0.05, ctx.stream);

  auto const p = w.params();
  typename layer_type::template gradients<T> g{};
  if (backward) g = w.gradients();
  auto const x_v = moe::make_view(static_cast<T const*>(x.data()), tokens, h);
  auto const y_v = moe::make_view(y.data(), tokens, h);
  auto const dy_v = moe::make_view(static_cast<T const*>(dy.data()), tokens, h);
  auto const dx_v = moe::make_view(dx.data(), tokens, h);
  moe::workspace const ws_v{ws.data(), ws.size()};

  // One untimed call: cuBLAS picks its kernels, and the routing is read for the counters.
  layer.forward(cuda, x_v, p, y_v, ws_v);
  moe::layer_stats const stats = layer.stats(cuda, ws_v, tokens);  // synchronises; host memory
  std::vector<std::int64_t> const& load = stats.load;
  if (backward) layer.backward(cuda, dy_v, p, dx_v, g, ws_v);
  MOE_CUDA_TRY(cudaStreamSynchronize(ctx.stream));

  moe::bench::cuda_event_timer timer(ctx.stream);
  moe::bench::l2_flush l2;
  moe::bench::timed_loop(
      state, timer, [&] { l2.flush(ctx.stream); },
      [&] {
        layer.forward(cuda, x_v, p, y_v, ws_v);
        if (backward) layer.backward(cuda, dy_v, p, dx_v, g, ws_v);
      });

  // The same call every iteration: the routing, and so every counter, is the untimed one's.
  double const routed_rows = static_cast<double>(tokens * K - stats.dropped);
  double const forward_flops = 6.0 * static_cast<double>(h) * static_cast<double>(f) * routed_rows;
  double const flops = backward ? 3 * forward_flops : forward_flops;
  auto const active = std::count_if(load.begin(), load.end(), [](std::int64_t n) { return n > 0; });
  double const element_bytes = sizeof(T);
  double const expert_bytes = static_cast<double>(3 * h * f) * element_bytes;
  double const active_bytes = static_cast<double>(active) * expert_bytes;
  double const gate_bytes =
      static_cast<double>(layer.gate_weight_shape().elements()) * element_bytes;
  double const io_bytes = static_cast<double>(io_size) * element_bytes;
  double const forward_bytes = 2 * io_bytes + gate_bytes + active_bytes;
  double const bytes = backward
                           ? 2 * forward_bytes + gate_bytes + static_cast<double>(e) * expert_bytes
                           : forward_bytes;
  moe::bench::set_bytes_and_flops(state, bytes, flops);
  using counter = benchmark::Counter;
  state.counters["fraction_of_gemm"] =
      counter(flops / ctx.ceiling.gemm_flops_per_second, counter::kIsIterationInvariantRate);
  if (tokens <= decode_tokens)
    state.counters["fraction_of_weight_read"] = counter(
        active_bytes / ctx.ceiling.copy_bytes_per_second, counter::kIsIterationInvariantRate);
  state.counters["rows"] = static_cast<double>(stats.expert_rows);
  state.counters["active_experts"] = static_cast<double>(active);
  state.counters["dropped"] = static_cast<double>(stats.dropped);
}

template <int K>
void dispatch_layout(benchmark::State& state, layer_config const& c, bench_context const& ctx) {
  if (c.capacity != 0)
    layer_benchmark<K, moe::layout::capacity>(state, c, ctx);
  else
    layer_benchmark<K, moe::layout::ragged>(state, c, ctx);
}

void run_layer(benchmark::State& state, layer_config const& c, bench_context const& ctx) {
  switch (models[c.model].k) {
    case 2:
      return dispatch_layout<2>(state, c, ctx);
    case 4:
      return dispatch_layout<4>(state, c, ctx);
    case 8:
      return dispatch_layout<8>(state, c, ctx);
    default:
      state.SkipWithError("no layer instantiated for this k");
  }
}

/// Enough iterations for about a third of a second, from the useful FLOPs at ~400 TFLOP/s
/// or the weights read at ~3 TB/s, whichever is slower, plus launch and read-back overhead.
benchmark::IterationCount iterations_for(layer_config const& c) {
  model const& m = models[c.model];
  double const rows = static_cast<double>(c.tokens * m.k);
  double const flops = 6.0 * rows * m.hidden * m.ffn * (c.backward ? 3 : 1);
  double const experts = std::min(static_cast<double>(m.experts), rows);
  double const weight_bytes = experts * 3.0 * m.hidden * m.ffn * 2 * (c.backward ? 3 : 1);
  double const seconds = std::max(flops / 4e14, weight_bytes / 3e12) + 200e-6;
  return moe::bench::iterations_lasting(seconds, 1000.0);
}

}  // namespace

int main(int argc, char** argv) {
  return moe::bench::cuda_blas_benchmark_main(
      argc, argv, "layer_bench", true, [](bench_context const& ctx) {
        // The capacity-layout runs first: a reader of the JSON that keys on the first four parts
        // of a name then finds the dropless run, reported later, under the peers' name.
        std::vector<layer_config> configs;
        for (long long const capacity : {1, 0})
          for (long long model = 0; model < static_cast<long long>(std::size(models)); ++model) {
            if (capacity != 0 && model != 0) continue;  // the capacity layout: Mixtral's shape
            for (long long const backward : {0, 1})
              for (long long const tokens : token_counts)
                configs.push_back({model, tokens, backward, capacity});
          }
        for (layer_config const& c : configs) {
          auto body = [&ctx](benchmark::State& state, layer_config const& config) {
            run_layer(state, config, ctx);
          };
          for (auto* b : moe::bench::register_grid("layer", std::vector<layer_config>{c}, body))
            b->Iterations(iterations_for(c));
        }
        benchmark::RunSpecifiedBenchmarks();
      });
}
