// SPDX-License-Identifier: Apache-2.0
// The host backend of moe::layer, forward and forward + backward, at small sizes. The host
// backend is the oracle every CUDA path is tested against and what the examples run without
// a GPU: this keeps its cost in view (tests and examples must stay fast) and gives the CUDA
// benchmarks a baseline. Needs no GPU.
//
//   host_layer_bench --benchmark_min_time=0.05
//
// FLOPs count useful work only: the router 2·T·H·E and, per kept assignment, the two expert
// GEMMs 2·2·H·F (dropped assignments cost nothing); backward costs twice the forward.
// Bytes count what must be read or written once: x, parameters and y (forward), and also
// dy, dx and the gradients (forward + backward).

#include "../support/fixture.hpp"

#include <moe/moe.hpp>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using expert_t = moe::expert::ffn<moe::act::gelu>;
using layer_t =
    moe::layer<moe::gating::top_k<2>, moe::layout::capacity, moe::comm::single_rank, expert_t>;
constexpr int top_k = 2;

/// The sizes of an expert bank: hidden, ffn, experts.
struct layer_shape {
  moe::index_t hidden, ffn, experts;
};

struct layer_config {
  moe::index_t tokens;
  layer_shape shape;

  [[nodiscard]] std::string name() const {
    return moe::bench::grid_name(
        {{"T", tokens}, {"H", shape.hidden}, {"F", shape.ffn}, {"E", shape.experts}, {"k", top_k}});
  }
  [[nodiscard]] moe::layer_args args() const {
    return {.gate = {.tokens = tokens,
                     .experts = shape.experts,
                     .capacity_factor = 1.25f,
                     .aux_loss_coef = 0.01f},
            .hidden = shape.hidden,
            .ffn = shape.ffn};
  }
};

/// Parameters (or gradients) of the layer in host memory, with biases.
struct ffn_tensors {
  moe::layer_args args;
  std::vector<float> gate_weight, w1, b1, w2, b2;

  explicit ffn_tensors(moe::layer_args const& a)
      : args(a),
        gate_weight(a.hidden * a.gate.experts),
        w1(a.gate.experts * a.hidden * a.ffn),
        b1(a.gate.experts * a.ffn),
        w2(a.gate.experts * a.ffn * a.hidden),
        b2(a.gate.experts * a.hidden) {}

  [[nodiscard]] double bytes() const {
    return double(sizeof(float)) *
           double(gate_weight.size() + w1.size() + b1.size() + w2.size() + b2.size());
  }

  void randomize(std::uint64_t seed) {
    auto const scale = [](moe::index_t fan_in) { return 1.0 / std::sqrt(double(fan_in)); };
    moe::bench::fill_random(std::span(gate_weight), seed, scale(args.hidden));
    moe::bench::fill_random(std::span(w1), seed + 1, scale(args.hidden));
    moe::bench::fill_random(std::span(b1), seed + 2, 0.1);
    moe::bench::fill_random(std::span(w2), seed + 3, scale(args.ffn));
    moe::bench::fill_random(std::span(b2), seed + 4, 0.1);
  }

  template <class T>  // float const for parameters, float for gradients
  moe::layer_params<T, expert_t> views() {
    auto const [h, f, e] = std::array{args.hidden, args.ffn, args.gate.experts};
    return {moe::make_view<T>(gate_weight.data(), h, e),
            {moe::make_view<T>(w1.data(), e, h, f), moe::make_view<T>(b1.data(), e, f),
             moe::make_view<T>(w2.data(), e, f, h), moe::make_view<T>(b2.data(), e, h)}};
  }
};

enum class pass { forward, forward_backward };

template <pass Pass>
void host_layer(benchmark::State& state, layer_config const& config) {
  moe::layer_args const args = config.args();
  layer_t::can_implement(args).throw_if_failed();
  layer_t const layer(args);
  moe::host_buffer ws(layer.workspace_bytes(moe::host));

  ffn_tensors params(args), grads(args);
  params.randomize(42);
  std::size_t const n = std::size_t(args.gate.tokens * args.hidden);
  std::vector<float> x(n), dy(n), y(n), dx(n);
  moe::bench::fill_random(std::span(x), 7);
  moe::bench::fill_random(std::span(dy), 8, 1e-3);
  auto matrix = [&](auto* data) { return moe::make_view(data, args.gate.tokens, args.hidden); };
  float const* const x_data = x.data();
  float const* const dy_data = dy.data();
  auto const p = params.views<float const>();
  auto const g = grads.views<float>();
  layer.can_implement(moe::host, matrix(x_data), p, matrix(y.data()), ws.view()).throw_if_failed();

  // One untimed call: it finds how many assignments the router keeps, for the FLOP count.
  layer.forward(moe::host, matrix(x_data), p, matrix(y.data()), ws.view());
  double const kept = double(args.gate.tokens * top_k - layer.stats(moe::host, ws.view()).dropped);

  moe::bench::host_timer timer;
  moe::bench::timed_loop(state, timer, moe::bench::host_cache_flush::shared(), [&] {
    layer.forward(moe::host, matrix(x_data), p, matrix(y.data()), ws.view());
    if constexpr (Pass == pass::forward_backward)
      layer.backward(moe::host, matrix(dy_data), p, matrix(dx.data()), g, ws.view());
    benchmark::ClobberMemory();
  });

  auto const [t, h, f, e] = std::array{double(args.gate.tokens), double(args.hidden),
                                       double(args.ffn), double(args.gate.experts)};
  double const forward_flops = 2 * t * h * e + 2 * 2 * kept * h * f;
  double const activation_bytes = double(sizeof(float)) * t * h;
  if constexpr (Pass == pass::forward)
    moe::bench::set_bytes_and_flops(state, 2 * activation_bytes + params.bytes(), forward_flops);
  else
    moe::bench::set_bytes_and_flops(state, 4 * activation_bytes + 2 * params.bytes(),
                                    3 * forward_flops);
  state.counters["kept"] = kept;
}

}  // namespace

int main(int argc, char** argv) {
  // Token counts × expert shapes: four configurations per pass.
  auto const configs = moe::bench::product<layer_config>(
      std::vector<moe::index_t>{64, 256}, std::vector<layer_shape>{{32, 64, 4}, {64, 128, 8}});
  moe::bench::register_grid("host_layer_forward", configs, host_layer<pass::forward>);
  moe::bench::register_grid("host_layer_forward_backward", configs,
                            host_layer<pass::forward_backward>);

  benchmark::AddCustomContext("moe_backend", "host");
  benchmark::AddCustomContext("cuda_devices", std::to_string(moe::cuda_device_count()));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
