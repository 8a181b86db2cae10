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
                     .capacity_factor = 1.25,
                     .aux_loss_coef = 0.01f},
            .hidden = shape.hidden,
            .ffn = shape.ffn};
  }
};

enum class pass { forward, forward_backward };

template <pass Pass>
void host_layer(benchmark::State& state, layer_config const& config) {
  moe::layer_args const args = config.args();
  layer_t::can_implement(args).throw_if_failed();
  layer_t const layer(args);
  moe::host_buffer ws(layer.workspace_bytes(moe::host));

  moe::host_parameters<layer_t, float> w(layer, {.biases = true});
  w.initialize(moe::initializer::torch_linear(), 42);
  double parameter_bytes = 0;  // the tensors themselves, not the buffer's alignment padding
  for (std::size_t i = 0; i < w.shapes().size(); ++i)
    parameter_bytes += double(w.values(i).size_bytes());
  std::size_t const n = std::size_t(args.gate.tokens * args.hidden);
  std::vector<float> x(n), dy(n), y(n), dx(n);
  moe::bench::fill_random(std::span(x), 7);
  moe::bench::fill_random(std::span(dy), 8, 1e-3);
  auto matrix = [&](auto* data) { return moe::make_view(data, args.gate.tokens, args.hidden); };
  float const* const x_data = x.data();
  float const* const dy_data = dy.data();
  auto const p = w.params();
  auto const g = w.gradients();
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
    moe::bench::set_bytes_and_flops(state, 2 * activation_bytes + parameter_bytes, forward_flops);
  else
    moe::bench::set_bytes_and_flops(state, 4 * activation_bytes + 2 * parameter_bytes,
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
