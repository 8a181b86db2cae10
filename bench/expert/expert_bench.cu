// SPDX-License-Identifier: Apache-2.0
// The experts' CUDA backend on the DESIGN §7 shapes, in bfloat16: forward, and forward plus
// backward, of glu<silu> (Mixtral-8x7B, DeepSeek-V3, Qwen3-30B-A3B, gpt-oss-120b) and
// ffn<gelu> (GShard top-2 on Mixtral's shapes), over a capacity batch (uniform segments,
// f = 1.25, Tutel's rounding) and a ragged one (dropless, no padding), at decode and
// prefill token counts. Loads come from uniformly random routing, seeded.
//
//   expert_bench --benchmark_out=expert_bench.json --benchmark_out_format=json
//
// Counters: flops (useful: the GEMMs' 2·m·n·k over the rows assignments kept, padding and
// dropped slots excluded; backward is twice forward), flops_per_second (TFLOP/s shows as
// e.g. "520T/s"), fraction_of_gemm (that rate over a large cuBLAS bf16 GEMM measured at the
// start of the same run: the ceiling an expert GEMM can reach), bytes (parameters, their
// gradients and the batch, read or written once), rows and useful_rows. The L2 is flushed
// before every iteration. Exits 0 with a message when there is no CUDA device.

#include "../support/device.hpp"
#include "../support/fixture.hpp"

#include <moe/core/backend.hpp>
#include <moe/core/blas.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/expert.hpp>
#include <moe/expert/kernels/ffn.cuh>
#include <moe/expert/kernels/glu.cuh>

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

using moe::index_t;
using element_t = __nv_bfloat16;

/// A model's expert shapes (DESIGN §7).
struct model {
  char const* name;
  index_t hidden, ffn, experts, k;
  bool gated;  // glu<silu> (SwiGLU); otherwise ffn<gelu>
};

constexpr model models[] = {{"mixtral_8x7b", 4096, 14336, 8, 2, true},
                            {"deepseek_v3", 7168, 2048, 256, 8, true},
                            {"qwen3_30b_a3b", 2048, 768, 128, 8, true},
                            {"gpt_oss_120b", 2880, 2880, 128, 4, true},
                            {"gshard_mixtral", 4096, 14336, 8, 2, false}};

struct expert_config {
  long long model;     // index into `models`
  long long tokens;    // T on this rank
  long long ragged;    // 0: capacity batch (uniform segments), 1: ragged (dropless)
  long long backward;  // 0: forward, 1: forward and backward
  [[nodiscard]] std::string name() const {
    return std::string(models[model].name) + "/" +
           moe::bench::grid_name({{"T", tokens}, {"ragged", ragged}, {"backward", backward}});
  }
};

using moe::bench::device_array;
using bench_context = moe::bench::blas_context;

/// Per-expert loads of T·k assignments routed uniformly at random (k distinct experts per
/// token), seeded.
std::vector<std::int64_t> random_loads(index_t tokens, model const& m, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::int64_t> load(static_cast<std::size_t>(m.experts), 0);
  std::vector<index_t> experts(static_cast<std::size_t>(m.experts));
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t e = 0; e < m.experts; ++e) experts[e] = e;
    for (index_t j = 0; j < m.k; ++j) {  // a partial Fisher–Yates shuffle
      auto const pick = j + static_cast<index_t>(rng() % static_cast<std::uint64_t>(m.experts - j));
      std::swap(experts[j], experts[pick]);
      ++load[experts[j]];
    }
  }
  return load;
}

/// The ceiling itself, as a benchmark, so that the report holds it beside the experts.
void ceiling_benchmark(benchmark::State& state, bench_context const& ctx) {
  using moe::bench::ceiling_gemm;
  ceiling_gemm g(ctx.stream);
  moe::bench::cuda_event_timer timer(ctx.stream);
  moe::bench::l2_flush l2;
  moe::bench::timed_loop(
      state, timer, [&] { l2.flush(ctx.stream); }, [&] { g.run(ctx.blas, ctx.stream); });
  moe::bench::set_bytes_and_flops(state, ceiling_gemm::bytes(), ceiling_gemm::flops());
}

/// Tutel's capacity at f = 1.25: C = k · ⌊1.25 · ⌈T/E⌉⌋, at least 1.
index_t capacity_of(index_t tokens, model const& m) {
  index_t const per_expert = (tokens + m.experts - 1) / m.experts;
  return std::max<index_t>(1, m.k * static_cast<index_t>(std::floor(1.25 * per_expert)));
}

template <class X>
void expert_benchmark(benchmark::State& state, expert_config const& c, bench_context const& ctx) {
  using T = element_t;
  model const& m = models[c.model];
  moe::expert::expert_shape const s{.experts = m.experts, .hidden = m.hidden, .ffn = m.ffn};
  index_t const width = (m.gated ? 2 : 1) * m.ffn, h = m.hidden;
  bool const ragged = c.ragged != 0, backward = c.backward != 0;

  auto const load = random_loads(c.tokens, m, 0x6d6f65 + static_cast<std::uint64_t>(c.tokens));
  index_t const capacity = capacity_of(c.tokens, m);
  std::vector<std::int64_t> begin(load.size()), counts(load.size());
  index_t rows = 0, useful_rows = 0;
  for (std::size_t e = 0; e < load.size(); ++e) {
    counts[e] = ragged ? load[e] : std::min<std::int64_t>(load[e], capacity);
    begin[e] = ragged ? rows : static_cast<index_t>(e) * capacity;
    rows += ragged ? load[e] : capacity;
    useful_rows += counts[e];
  }

  device_array<T> w1(static_cast<std::size_t>(m.experts * h * width));
  device_array<T> w2(static_cast<std::size_t>(m.experts * m.ffn * h));
  device_array<T> in(static_cast<std::size_t>(rows * h)), out(in.size());
  device_array<T> d_out(backward ? in.size() : 0), d_in(d_out.size());
  device_array<T> d_w1(backward ? w1.size() : 0), d_w2(backward ? w2.size() : 0);
  device_array<std::int64_t> claimed(ragged ? 0 : counts.size());
  auto const pass =
      backward ? moe::expert::expert_pass::training : moe::expert::expert_pass::forward_only;
  device_array<std::byte> ws(X::template device_workspace_bytes<T>(s, rows, pass));
  moe::bench::fill_random(w1, 11, 0.05, ctx.stream);
  moe::bench::fill_random(w2, 12, 0.05, ctx.stream);
  moe::bench::fill_random(in, 13, 0.05, ctx.stream);
  if (backward) moe::bench::fill_random(d_out, 14, 0.05, ctx.stream);
  if (!ragged)
    MOE_CUDA_TRY(cudaMemcpy(claimed.data(), counts.data(), counts.size() * sizeof(std::int64_t),
                            cudaMemcpyHostToDevice));

  moe::workspace_carver carver(moe::workspace{ws.data(), ws.size()});
  auto const state_views = X::template carve_device_state<T>(carver, s, rows, rows, pass);
  moe::cuda_backend const cuda{ctx.stream, ctx.blas};
  typename X::template params<T const> const p{
      moe::make_view(static_cast<T const*>(w1.data()), m.experts, h, width),
      {},
      moe::make_view(static_cast<T const*>(w2.data()), m.experts, m.ffn, h),
      {}};
  typename X::template params<T> const g{moe::make_view(d_w1.data(), m.experts, h, width),
                                         {},
                                         moe::make_view(d_w2.data(), m.experts, m.ffn, h),
                                         {}};
  auto const in_v = moe::make_view(static_cast<T const*>(in.data()), rows, h);
  auto const out_v = moe::make_view(out.data(), rows, h);
  auto const d_out_v = moe::make_view(static_cast<T const*>(d_out.data()), backward ? rows : 0, h);
  auto const d_in_v = moe::make_view(d_in.data(), backward ? rows : 0, h);

  auto step = [&](auto const& segments) {
    X::forward(cuda, s, p, segments, in_v, out_v, state_views);
    if (backward) X::backward(cuda, s, p, segments, in_v, d_out_v, d_in_v, g, state_views);
  };
  moe::bench::cuda_event_timer timer(ctx.stream);
  moe::bench::l2_flush l2;
  auto flush = [&] { l2.flush(ctx.stream); };
  if (ragged) {
    moe::expert::row_segments const segments{begin, counts};
    moe::bench::timed_loop(state, timer, flush, [&] { step(segments); });
  } else {
    moe::expert::uniform_segments const segments{
        m.experts, capacity, {claimed.data(), static_cast<std::size_t>(m.experts)}};
    moe::bench::timed_loop(state, timer, flush, [&] { step(segments); });
  }

  double const forward_flops = 2.0 * static_cast<double>(useful_rows) * h * (width + m.ffn);
  double const flops = backward ? 3 * forward_flops : forward_flops;
  double const weight_bytes = static_cast<double>(w1.size() + w2.size()) * sizeof(T);
  double const batch_bytes = static_cast<double>(in.size()) * sizeof(T);
  double const bytes =
      backward ? 2 * weight_bytes + 4 * batch_bytes : weight_bytes + 2 * batch_bytes;
  moe::bench::set_bytes_and_flops(state, bytes, flops);
  using counter = benchmark::Counter;
  state.counters["fraction_of_gemm"] =
      counter(flops / ctx.ceiling.gemm_flops_per_second, counter::kIsIterationInvariantRate);
  state.counters["rows"] = static_cast<double>(rows);
  state.counters["useful_rows"] = static_cast<double>(useful_rows);
}

/// Enough iterations for about a third of a second, from the useful FLOPs at ~400 TFLOP/s.
benchmark::IterationCount iterations_for(expert_config const& c) {
  model const& m = models[c.model];
  double const rows = static_cast<double>(c.tokens * m.k);
  double const flops = 2.0 * rows * m.hidden * ((m.gated ? 3 : 2) * m.ffn) * (c.backward ? 3 : 1);
  double const seconds = flops / 4e14 + 50e-6 * (c.ragged ? m.experts / 8.0 : 1.0);
  return moe::bench::iterations_lasting(seconds, 2000.0);
}

}  // namespace

int main(int argc, char** argv) {
  return moe::bench::cuda_blas_benchmark_main(
      argc, argv, "expert_bench", false, [](bench_context const& ctx) {
        for (auto* b : moe::bench::register_grid(
                 "ceiling_bf16_gemm", std::vector<expert_config>{{0, 0, 0, 0}},
                 [&ctx](benchmark::State&state, expert_config const&) {
                   ceiling_benchmark(state, ctx);
                 }))
          b->Iterations(50);
        auto const configs = moe::bench::product<expert_config>(
            std::vector<long long>{0, 1, 2, 3, 4}, std::vector<long long>{128, 4096, 16384},
            std::vector<long long>{0, 1}, std::vector<long long>{0, 1});
        for (expert_config const& c : configs) {
          auto body = [&ctx](benchmark::State& state, expert_config const& config) {
            if (models[config.model].gated)
              expert_benchmark<moe::expert::glu<moe::act::silu>>(state, config, ctx);
            else
              expert_benchmark<moe::expert::ffn<moe::act::gelu>>(state, config, ctx);
          };
          for (auto* b : moe::bench::register_grid("expert", std::vector<expert_config>{c}, body))
            b->Iterations(iterations_for(c));
        }
        benchmark::RunSpecifiedBenchmarks();
      });
}
