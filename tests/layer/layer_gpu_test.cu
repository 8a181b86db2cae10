// SPDX-License-Identifier: Apache-2.0
// The layer's CUDA backend (layer/kernels/layer.cuh) against its host backend (layer.hpp),
// forward and backward, on fresh random inputs with every output, gradient and the
// workspace poisoned first; a CUDA graph of forward and backward against eager runs; and
// rejected calls. Skipped (exit 77) without a CUDA device.
//
// Routing is discontinuous, so x and W_gate lie on dyadic grids (x = ±i/8, i = 1..8;
// W_gate = ±m/2^(6+s), m = 1..64, s growing with H: support/exact_routing.hpp): every
// logit is then exact in float, from float and bfloat16 operands alike, and both backends
// select, slot and drop the same assignments. Expert weights and dy are continuous. The
// host layer runs in double on the same (rounded) values. Tolerances: float 1e-5, bfloat16
// 5e-2 (the device rounds intermediates to bfloat16), relative to |reference| + the tensor's RMS;
// routing statistics exactly, losses to 1e-5. The float bound needs cuBLAS without TF32 (the
// default math mode; NVIDIA_TF32_OVERRIDE=1 would break it).

#include "../support/device.hpp"
#include "../support/exact_routing.hpp"
#include "../support/expect.hpp"
#include "../support/graph.hpp"
#include "../support/parameters.hpp"

#include <doctest/doctest.h>

#include <moe/core/blas.hpp>
#include <moe/expert/kernels/ffn.cuh>
#include <moe/expert/kernels/glu.cuh>
#include <moe/layer/kernels/layer.cuh>
#include <moe/moe.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using namespace moe;

using test::all_poisoned;
using test::device_array;
using test::expect_close;
using test::fill_gate;
using test::fill_x;
using test::same_bits;
using test::widen;

template <class T>
bool all_finite(std::vector<T> const& v) {
  return std::all_of(v.begin(), v.end(), [](T e) { return std::isfinite(to_accumulate(e)); });
}

/// A scalar within `tolerance` relative (and 1e-12 absolute).
void expect_close(double reference, double got, double tolerance, char const* what) {
  INFO(what << ": got " << got << ", expected " << reference);
  CHECK(std::abs(got - reference) <= tolerance * std::abs(reference) + 1e-12);
}

// --- parameters --------------------------------------------------------------------------

/// Each tensor's gradients, in the order of parameter_shapes (an absent bias's empty).
template <class Layer, class T>
std::vector<std::vector<T>> gradients_of(host_parameters<Layer, T> const& w) {
  std::vector<std::vector<T>> out;
  for (std::size_t n = 0; n < w.shapes().size(); ++n)
    out.emplace_back(w.gradients(n).begin(), w.gradients(n).end());
  return out;
}

/// The same of device parameters, once the stream's work so far is done.
template <class Layer, class T>
std::vector<std::vector<T>> download_gradients(Layer const& layer,
                                               device_parameters<Layer, T> const& d,
                                               parameter_options options) {
  host_parameters<Layer, T> w(layer, options);
  d.copy_to(w);
  return gradients_of(w);
}

/// Tensor n's gradient in messages: "d expert.w1".
std::string gradient_name(std::vector<parameter_shape> const& shapes, std::size_t n) {
  return "d " + shapes[n].name;
}

// --- inputs ------------------------------------------------------------------------------

/// Makes the last expert lose every selection (with k < E): feature 0 of every token is 1,
/// its gate weight +1/4 to every other expert and −1/4 to the last, and the other features'
/// gate weights (m/2^14, m ≤ 64) move a logit by less than 63/256 < 1/4. Still exact.
template <class T>
void starve_last_expert(std::vector<T>& x, span<T> w, index_t tokens, index_t hidden,
                        index_t experts, std::mt19937_64& rng) {
  for (index_t t = 0; t < tokens; ++t)
    x[static_cast<std::size_t>(t * hidden)] = from_accumulate<T>(1);
  std::uniform_int_distribution<int> m(1, 64), sign(0, 1);
  for (index_t h = 0; h < hidden; ++h)
    for (index_t e = 0; e < experts; ++e) {
      float v = static_cast<float>(sign(rng) ? m(rng) : -m(rng)) * std::ldexp(1.0f, -14);
      if (h == 0) v = e + 1 < experts ? 0.25f : -0.25f;
      w[static_cast<std::size_t>(h * experts + e)] = from_accumulate<T>(v);
    }
}

/// Everything one layer call reads: parameters, x and dy, in T. The parameters' gradients
/// are poisoned, so that a device copy of them starts poisoned too.
template <class Layer, class T>
struct layer_inputs {
  index_t tokens;
  parameter_options options;
  host_parameters<Layer, T> params;
  std::vector<T> x, dy;

  layer_inputs(Layer const& layer, index_t call_tokens, bool biases, bool starve,
               std::mt19937_64& rng)
      : tokens(call_tokens), options{.biases = biases}, params(layer, options) {
    index_t const hidden = layer.args().hidden, experts = layer.args().gate.experts;
    // Continuous expert tensors (continuous values in [−0.5, 0.5], never near zero), the
    // gate weight on its grid.
    for (std::size_t n = 1; n < params.shapes().size(); ++n)
      test::randomize(params.values(n), rng, 0.5);
    fill_gate(params.values(0), hidden, rng);
    x.resize(static_cast<std::size_t>(tokens * hidden));
    dy.resize(x.size());
    fill_x(x, rng);
    test::randomize(span<T>(dy.data(), dy.size()), rng, 1.0);
    if (starve) starve_last_expert(x, params.values(0), tokens, hidden, experts, rng);
    test::poison_gradients(params);
  }
};

// --- one pass on each backend ------------------------------------------------------------

/// What one forward and backward gave, as doubles, with the routing statistics.
struct pass_results {
  std::vector<double> y, dx;
  std::vector<std::vector<double>> grads;
  layer_stats stats;
  std::vector<std::int64_t> load;
};

/// The reference: the host layer in double on the inputs' values.
template <class Layer, class T>
pass_results run_on_host(Layer const& layer, layer_inputs<Layer, T> const& in) {
  index_t const tokens = in.tokens, h = layer.args().hidden;
  host_parameters<Layer, double> params(layer, in.options);
  for (std::size_t n = 0; n < params.shapes().size(); ++n)
    std::ranges::transform(in.params.values(n), params.values(n).begin(),
                           [](T v) { return static_cast<double>(to_accumulate(v)); });
  test::poison_gradients(params);
  std::vector<double> const x = widen(in.x), dy = widen(in.dy);

  pass_results r;
  r.y.assign(x.size(), std::nan(""));
  r.dx.assign(x.size(), std::nan(""));
  host_buffer ws(layer.workspace_bytes(host));
  layer.forward(host, make_view(x.data(), tokens, h), params.params(),
                make_view(r.y.data(), tokens, h), ws.view());
  layer.backward(host, make_view(dy.data(), tokens, h), params.params(),
                 make_view(r.dx.data(), tokens, h), params.gradients(), ws.view());
  r.grads = gradients_of(params);
  r.stats = layer.stats(host, ws.view());
  r.load = r.stats.load;
  return r;
}

/// What the device gave, in T.
template <class T>
struct device_results {
  std::vector<T> y, dx;
  std::vector<std::vector<T>> grads;
  layer_stats stats;
  std::vector<std::int64_t> load;
};

/// One CUDA forward and backward; outputs, gradients and the workspace poisoned first.
template <class Layer, class T>
device_results<T> run_on_device(Layer const& layer, cuda_backend cuda,
                                layer_inputs<Layer, T> const& in,
                                device_parameters<Layer, T>& params) {
  index_t const tokens = in.tokens, h = layer.args().hidden;
  cudaStream_t const stream = cuda.stream;
  device_array<T> x(in.x.size()), dy(in.dy.size()), y(in.x.size()), dx(in.x.size());
  x.upload(in.x, stream);
  dy.upload(in.dy, stream);
  params.copy_from(in.params);  // the values, and poisoned gradients
  device_array<std::byte> ws(layer.template workspace_bytes<T>(cuda));
  y.poison(stream);
  dx.poison(stream);
  ws.poison(stream);

  auto const p = params.params();
  layer.forward(cuda, make_view(static_cast<T const*>(x.data()), tokens, h), p,
                make_view(y.data(), tokens, h), workspace{ws.data(), ws.size()});
  layer.backward(cuda, make_view(static_cast<T const*>(dy.data()), tokens, h), p,
                 make_view(dx.data(), tokens, h), params.gradients(),
                 workspace{ws.data(), ws.size()});
  device_results<T> r;
  r.stats = layer.stats(cuda, workspace{ws.data(), ws.size()}, tokens);  // synchronises
  REQUIRE(r.stats.load.size() == static_cast<std::size_t>(layer.args().gate.experts));
  r.load = r.stats.load;  // host memory on both backends
  r.y = y.download(stream);
  r.dx = dx.download(stream);
  r.grads = download_gradients(layer, params, in.options);
  return r;
}

/// One configuration of a comparison.
struct case_config {
  layer_args args;
  index_t call_tokens;  // ≤ args.gate.tokens
  bool starve = false;  // the last expert receives no token
  bool expect_drops = false;
  bool biases = true;
};

/// The testbed: Layer on the CUDA backend in T against the host layer in double.
template <class Layer, class T>
void compare_with_host(case_config const& c, cudaStream_t stream, cublasHandle_t blas) {
  auto const seed = test::fresh_seed();
  // bfloat16 keeps 3 fewer mantissa bits than half, and the device rounds its
  // intermediates (activations, d_pre) to T where the host reference keeps double.
  double const tolerance = std::is_same_v<T, float>    ? 1e-5
                           : std::is_same_v<T, __half> ? 1e-2
                                                       : 5e-2;
  layer_args const& a = c.args;
  INFO("seed " << seed << ", " << std::string(dtype_traits<T>::name) << ", T " << c.call_tokens
               << " of " << a.gate.tokens << ", H " << a.hidden << ", F " << a.ffn << ", E "
               << a.gate.experts << ", k " << a.gate.k << ", f " << a.gate.capacity_factor
               << ", capacity alignment " << a.gate.capacity_alignment << ", row alignment "
               << a.expert_row_alignment << (c.starve ? ", last expert starved" : "")
               << (c.biases ? ", biases" : ", no biases"));
  std::mt19937_64 rng(seed);
  Layer const layer(a);
  layer_inputs<Layer, T> const in(layer, c.call_tokens, c.biases, c.starve, rng);
  auto const& shapes = in.params.shapes();

  pass_results const ref = run_on_host(layer, in);
  if (c.expect_drops) CHECK(ref.stats.dropped > 0);
  if (c.starve) CHECK(ref.load.back() == 0);

  cuda_backend const cuda{stream, blas};
  device_parameters<Layer, T> params(layer, stream, in.options);
  device_results<T> const got = run_on_device(layer, cuda, in, params);

  expect_close(ref.y, widen(got.y), tolerance, "y");
  expect_close(ref.dx, widen(got.dx), tolerance, "dx");
  for (std::size_t n = 0; n < shapes.size(); ++n)
    expect_close(ref.grads[n], widen(got.grads[n]), tolerance, gradient_name(shapes, n));
  if (c.starve) {  // zero, not garbage, for the expert that received nothing
    index_t const e = a.gate.experts - 1, w = shapes[1].axes[2].extent;  // W1: (E, H, F1)
    auto zero = [](std::vector<T> const& v, index_t from, index_t n) {
      return std::all_of(v.begin() + from, v.begin() + from + n,
                         [](T value) { return to_accumulate(value) == 0.0f; });
    };
    CHECK(zero(got.grads[1], e * a.hidden * w, a.hidden * w));
    CHECK(zero(got.grads[3], e * a.ffn * a.hidden, a.ffn * a.hidden));
    if (c.biases) {
      CHECK(zero(got.grads[2], e * w, w));
      CHECK(zero(got.grads[4], e * a.hidden, a.hidden));
    }
  }

  CHECK(got.stats.tokens == ref.stats.tokens);
  CHECK(got.stats.capacity == ref.stats.capacity);
  CHECK(got.stats.expert_rows == ref.stats.expert_rows);
  CHECK(got.stats.dropped == ref.stats.dropped);
  CHECK(got.load == ref.load);
  expect_close(ref.stats.aux_loss, got.stats.aux_loss, 1e-5, "aux_loss");
  expect_close(ref.stats.z_loss, got.stats.z_loss, 1e-5, "z_loss");
  expect_close(ref.stats.loss, got.stats.loss, 1e-5, "loss");

  // The same call again gives the same bits (DESIGN §3: deterministic by default).
  device_results<T> const again = run_on_device(layer, cuda, in, params);
  CHECK(same_bits(got.y, again.y));
  CHECK(same_bits(got.dx, again.dx));
  for (std::size_t n = 0; n < shapes.size(); ++n) CHECK(same_bits(got.grads[n], again.grads[n]));
}

template <class Layer>
void compare_in_float_and_bfloat16(case_config const& c, cudaStream_t stream, cublasHandle_t blas) {
  compare_with_host<Layer, float>(c, stream, blas);
  compare_with_host<Layer, __nv_bfloat16>(c, stream, blas);
}

// H ≤ 64, F ≤ 128, T ≤ 96, E ≤ 8: the host reference stays cheap.
layer_args const capacity_args{.gate = {.tokens = 96,
                                        .experts = 8,
                                        .capacity_factor = 1.0f,
                                        .aux_loss_coef = 0.01f,
                                        .z_loss_coef = 0.001f},
                               .hidden = 64,
                               .ffn = 128};

layer_args const ragged_args{.gate = {.tokens = 96,
                                      .experts = 8,
                                      .capacity_factor = 1.0f,  // ignored by a dropless layout
                                      .aux_loss_coef = 0.01f,
                                      .z_loss_coef = 0.001f},
                             .hidden = 64,
                             .ffn = 64};

template <class Change>
layer_args with(layer_args a, Change change) {
  change(a);
  return a;
}

using capacity_layer =
    layer<gating::top_k<2>, layout::capacity, comm::single_rank, expert::ffn<act::gelu>>;
using ragged_layer =
    layer<gating::top_k<2>, layout::ragged, comm::single_rank, expert::glu<act::silu>>;
using ragged_any_layer =
    layer<gating::top_any<>, layout::ragged, comm::single_rank, expert::glu<act::silu>>;

}  // namespace

TEST_CASE("the capacity layer (top-2, ffn<gelu>) on the CUDA backend matches the host layer") {
  test::owned_stream s;
  blas_handle blas;
  SUBCASE("fixed factor 1 with k = 2: C = 2·⌈T/E⌉ drops assignments") {
    compare_in_float_and_bfloat16<capacity_layer>(
        {.args = capacity_args, .call_tokens = 96, .expect_drops = true}, s.stream, blas.get());
  }
  SUBCASE("fewer tokens than the layer was sized for: C of the call's T") {
    compare_in_float_and_bfloat16<capacity_layer>({.args = capacity_args, .call_tokens = 61},
                                                  s.stream, blas.get());
  }
  SUBCASE("dynamic capacity (factor 0): C is the largest load, nothing dropped") {
    compare_in_float_and_bfloat16<capacity_layer>(
        {.args = with(capacity_args, [](auto& a) { a.gate.capacity_factor = 0; }),
         .call_tokens = 80},
        s.stream, blas.get());
  }
  SUBCASE("capped dynamic capacity (factor −1) and a capacity alignment") {
    compare_in_float_and_bfloat16<capacity_layer>({.args = with(capacity_args,
                                                                [](auto& a) {
                                                                  a.gate.capacity_factor = -1.0f;
                                                                  a.gate.capacity_alignment = 8;
                                                                }),
                                                   .call_tokens = 96},
                                                  s.stream, blas.get());
  }
  SUBCASE("renormalised weights after drops, no biases, an expert with no token") {
    compare_in_float_and_bfloat16<capacity_layer>(
        {.args = with(capacity_args,
                      [](auto& a) {
                        a.gate.capacity_factor = 1.25f;
                        a.gate.normalize = gating::renormalize::after_drops;
                      }),
         .call_tokens = 96,
         .starve = true,
         .biases = false},
        s.stream, blas.get());
  }
}

TEST_CASE("the ragged layer (glu<silu>) on the CUDA backend matches the host layer") {
  test::owned_stream s;
  blas_handle blas;
  SUBCASE("top-2, no padding") {
    compare_in_float_and_bfloat16<ragged_layer>({.args = ragged_args, .call_tokens = 96}, s.stream,
                                                blas.get());
  }
  SUBCASE("top-2, rows padded to 16, fewer tokens, an expert with no token") {
    compare_in_float_and_bfloat16<ragged_layer>(
        {.args = with(ragged_args, [](auto& a) { a.expert_row_alignment = 16; }),
         .call_tokens = 50,
         .starve = true},
        s.stream, blas.get());
  }
  SUBCASE("top-any, k = 3, rows padded to 16") {
    compare_in_float_and_bfloat16<ragged_any_layer>({.args = with(ragged_args,
                                                                  [](auto& a) {
                                                                    a.gate.k = 3;
                                                                    a.expert_row_alignment = 16;
                                                                  }),
                                                     .call_tokens = 96},
                                                    s.stream, blas.get());
  }
  SUBCASE("top-any, k = 1, no padding, no biases") {
    compare_in_float_and_bfloat16<ragged_any_layer>(
        {.args = with(ragged_args, [](auto& a) { a.gate.k = 1; }),
         .call_tokens = 77,
         .biases = false},
        s.stream, blas.get());
  }
}

namespace {

template <class Gate>
using preset_capacity_layer =
    layer<Gate, layout::capacity, comm::single_rank, expert::ffn<act::gelu>>;
template <class Gate>
using preset_ragged_layer = layer<Gate, layout::ragged, comm::single_rank, expert::glu<act::silu>>;

}  // namespace

TEST_CASE(
    "layers of the framework presets and the training noise on the CUDA backend match the "
    "host layer") {
  test::owned_stream s;
  blas_handle blas;
  SUBCASE("gshard: random routing of the 2nd expert, 2 local groups, GShard capacity") {
    compare_in_float_and_bfloat16<preset_capacity_layer<gating::preset::gshard>>(
        {.args = with(capacity_args,
                      [](auto& a) {
                        a.gate.capacity_factor = 2.0f;
                        a.gate.groups = 2;
                        a.gate.seed = 5;
                      }),
         .call_tokens = 96},
        s.stream, blas.get());
  }
  SUBCASE("deepspeed: top-1, random slot priority, min_capacity") {
    compare_with_host<preset_capacity_layer<gating::preset::deepspeed>, float>(
        {.args = with(capacity_args,
                      [](auto& a) {
                        a.gate.capacity_factor = 0.75f;
                        a.gate.seed = 11;
                      }),
         .call_tokens = 96,
         .expect_drops = true},
        s.stream, blas.get());
  }
  SUBCASE("mixtral: softmax over the top 2, dropless, Switch aux loss") {
    compare_with_host<preset_ragged_layer<gating::preset::mixtral>, float>(
        {.args = ragged_args, .call_tokens = 96}, s.stream, blas.get());
  }
  SUBCASE("deepseek_v3: sigmoid, 4 of 8 expert groups, k = 8, sequence aux over 2 groups") {
    compare_with_host<preset_ragged_layer<gating::preset::deepseek_v3>, float>(
        {.args = with(ragged_args,
                      [](auto& a) {
                        a.gate.experts = 16;
                        a.gate.groups = 2;
                        a.gate.scaling_factor = 2.5f;
                      }),
         .call_tokens = 96},
        s.stream, blas.get());
  }
  SUBCASE("qwen3: top-8 of 16, renormalised, dropless") {
    compare_with_host<preset_ragged_layer<gating::preset::qwen3>, float>(
        {.args = with(ragged_args, [](auto& a) { a.gate.experts = 16; }), .call_tokens = 64},
        s.stream, blas.get());
  }
  SUBCASE("top-2 with jitter on x and Gaussian logit noise, in training") {
    compare_in_float_and_bfloat16<capacity_layer>({.args = with(capacity_args,
                                                                [](auto& a) {
                                                                  a.gate.jitter = 0.1f;
                                                                  a.gate.gate_noise = 1.0f;
                                                                  a.gate.seed = 3;
                                                                }),
                                                   .call_tokens = 96},
                                                  s.stream, blas.get());
  }
}

namespace {

/// Capture forward + backward of the capacity layer (fixed factor) into a graph, then for two
/// fresh inputs written into the same buffers, replay it and compare with an eager run on
/// the same stream and handle, bit for bit.
template <class T>
void check_graph_replay() {
  using Layer = capacity_layer;
  test::owned_stream s;
  // cuBLAS must not allocate while captured: point the handle at the stream, then give it a
  // workspace (in that order: cublasSetStream drops the workspace; moe::gemm leaves a
  // handle that is already on the stream alone). The workspace outlives the handle.
  device_array<std::byte> blas_workspace(std::size_t{32} << 20);
  blas_handle blas;
  MOE_CUBLAS_TRY(cublasSetStream(blas.get(), s.stream));
  MOE_CUBLAS_TRY(cublasSetWorkspace(blas.get(), blas_workspace.data(), blas_workspace.size()));
  cuda_backend const cuda{s.stream, blas.get()};

  auto const seed = test::fresh_seed();
  INFO("seed " << seed << ", " << std::string(dtype_traits<T>::name));
  std::mt19937_64 rng(seed);
  layer_args const args = capacity_args;
  Layer const layer(args);
  index_t const tokens = args.gate.tokens, h = args.hidden;
  layer_inputs<Layer, T> const first(layer, tokens, true, false, rng);
  device_parameters<Layer, T> params(layer, s.stream, first.options);
  device_array<T> x(first.x.size()), dy(first.x.size()), y(first.x.size()), dx(first.x.size());
  device_array<std::byte> ws(layer.workspace_bytes<T>(cuda));
  ws.poison(s.stream);

  auto const p = params.params();
  auto const g = params.gradients();
  auto step = [&] {
    layer.forward(cuda, make_view(static_cast<T const*>(x.data()), tokens, h), p,
                  make_view(y.data(), tokens, h), workspace{ws.data(), ws.size()});
    layer.backward(cuda, make_view(static_cast<T const*>(dy.data()), tokens, h), p,
                   make_view(dx.data(), tokens, h), g, workspace{ws.data(), ws.size()});
  };
  auto poison = [&] {
    y.poison(s.stream);
    dx.poison(s.stream);
    params.copy_from(first.params);  // the same values, and poisoned gradients
  };
  auto snapshot = [&] {
    std::vector<std::vector<T>> all{y.download(s.stream), dx.download(s.stream)};
    for (auto& t : download_gradients(layer, params, first.options)) all.push_back(std::move(t));
    return all;
  };

  // An eager run first: lazy module loading and library set-up happen outside the capture.
  params.copy_from(first.params);
  x.upload(first.x, s.stream);
  dy.upload(first.dy, s.stream);
  step();
  MOE_CUDA_TRY(cudaStreamSynchronize(s.stream));

  poison();
  // Global mode: any synchronising or otherwise unsafe call while capturing fails.
  test::captured_graph graph(s.stream, cudaStreamCaptureModeGlobal, step);
  CHECK(graph.still_capturing());  // invalidated by a synchronisation
  REQUIRE_MESSAGE(graph.ok(), "capture failed: " << cudaGetErrorString(graph.ended()));

  // Nothing in the graph reads back to the host: no host nodes, no copies into host memory.
  auto const nodes = graph.nodes();
  CHECK(!nodes.empty());
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type{};
    MOE_CUDA_TRY(cudaGraphNodeGetType(node, &type));
    CHECK(type != cudaGraphNodeTypeHost);
    if (type == cudaGraphNodeTypeMemcpy) {
      cudaMemcpy3DParms copy{};
      MOE_CUDA_TRY(cudaGraphMemcpyNodeGetParams(node, &copy));
      cudaPointerAttributes where{};
      MOE_CUDA_TRY(cudaPointerGetAttributes(&where, copy.dstPtr.ptr));
      CHECK(where.type == cudaMemoryTypeDevice);
    }
  }
  for (int round = 0; round < 2; ++round) {
    INFO("input " << round);
    layer_inputs<Layer, T> const fresh(layer, tokens, true, false, rng);
    x.upload(fresh.x, s.stream);
    dy.upload(fresh.dy, s.stream);
    poison();
    step();
    auto const eager = snapshot();
    poison();
    graph.replay(s.stream);
    auto const replayed = snapshot();
    REQUIRE(eager.size() == replayed.size());
    for (std::size_t i = 0; i < eager.size(); ++i) {
      INFO((i == 0 ? "y" : i == 1 ? "dx" : gradient_name(first.params.shapes(), i - 2)));
      CHECK(all_finite(eager[i]));  // written, so equal bits are no accident of the poison
      CHECK(same_bits(eager[i], replayed[i]));
    }
  }
}

}  // namespace

TEST_CASE("forward and backward of the capacity layer replay from a CUDA graph, bit for bit") {
  check_graph_replay<float>();
  check_graph_replay<__nv_bfloat16>();
}

TEST_CASE("rejected CUDA calls throw invalid_argument and leave every output untouched") {
  using Layer = capacity_layer;
  using T = float;
  test::owned_stream s;
  blas_handle blas;
  cuda_backend const cuda{s.stream, blas.get()};
  cuda_backend const no_blas{s.stream, nullptr};
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  layer_args const args = capacity_args;
  Layer const layer(args);
  index_t const tokens = args.gate.tokens, h = args.hidden, e = args.gate.experts;
  layer_inputs<Layer, T> const in(layer, tokens, true, false, rng);
  device_parameters<Layer, T> params(layer, s.stream, in.options);
  params.copy_from(in.params);  // the gradients poisoned
  // Room for (T + 1, H + 1): the wrong shapes below view it.
  std::size_t const room = static_cast<std::size_t>((tokens + 1) * (h + 1));
  device_array<T> x(room), dy(room), y(room), dx(room);
  std::vector<T> padded_x(room), padded_dy(room);
  std::copy(in.x.begin(), in.x.end(), padded_x.begin());
  std::copy(in.dy.begin(), in.dy.end(), padded_dy.begin());
  x.upload(padded_x, s.stream);
  dy.upload(padded_dy, s.stream);
  std::size_t const bytes = layer.workspace_bytes<T>(cuda);
  device_array<std::byte> ws(bytes);
  workspace const good_ws{ws.data(), bytes};

  auto cx = [&](index_t t, index_t c) { return make_view(static_cast<T const*>(x.data()), t, c); };
  auto cdy = [&](index_t t, index_t c) {
    return make_view(static_cast<T const*>(dy.data()), t, c);
  };
  auto const p = params.params();
  auto const g = params.gradients();

  // A good forward first: its state must survive every rejected call below.
  layer.forward(cuda, cx(tokens, h), p, make_view(y.data(), tokens, h), good_ws);
  auto const before = layer.stats(cuda, good_ws, tokens);
  y.poison(s.stream);
  dx.poison(s.stream);
  params.copy_from(in.params);  // forward wrote no gradient; poisoned again all the same

  SUBCASE("forward") {
    auto forward = [&](cuda_backend c, auto xv, auto pv, index_t y_tokens, index_t y_cols,
                       workspace w) {
      return
          [=, &layer, &y] { layer.forward(c, xv, pv, make_view(y.data(), y_tokens, y_cols), w); };
    };
    test::expect_rejected(forward(cuda, cx(tokens, h + 1), p, tokens, h, good_ws), "x");
    test::expect_rejected(forward(cuda, cx(tokens + 1, h), p, tokens + 1, h, good_ws), "x");
    test::expect_rejected(forward(cuda, cx(0, h), p, 0, h, good_ws), "x");  // no tokens
    test::expect_rejected(forward(cuda, cx(tokens, h), p, tokens - 1, h, good_ws), "y");
    test::expect_rejected(forward(cuda, cx(tokens, h), p, tokens, h + 1, good_ws), "y");
    auto bad_gate = p;
    bad_gate.gate_weight = make_view(p.gate_weight.data_handle(), h, e - 1);
    test::expect_rejected(forward(cuda, cx(tokens, h), bad_gate, tokens, h, good_ws),
                          "params.gate_weight");
    auto bad_w1 = p;
    bad_w1.expert.w1 = make_view(p.expert.w1.data_handle(), e, args.ffn, h);
    test::expect_rejected(forward(cuda, cx(tokens, h), bad_w1, tokens, h, good_ws),
                          "params.expert.w1");
    test::expect_rejected(forward(cuda, cx(tokens, h), p, tokens, h, good_ws.first(bytes - 1)),
                          "ws");
    test::expect_rejected(forward(cuda, cx(tokens, h), p, tokens, h, workspace{}), "ws");
    test::expect_rejected(forward(no_blas, cx(tokens, h), p, tokens, h, good_ws), "cuda.blas");
    CHECK(all_poisoned(y.download(s.stream)));
  }

  SUBCASE("backward") {
    auto backward = [&](cuda_backend c, auto dyv, auto pv, auto gv, index_t dx_tokens,
                        index_t dx_cols, workspace w) {
      return [=, &layer, &dx] {
        layer.backward(c, dyv, pv, make_view(dx.data(), dx_tokens, dx_cols), gv, w);
      };
    };
    test::expect_rejected(backward(cuda, cdy(tokens, h + 1), p, g, tokens, h, good_ws), "dy");
    test::expect_rejected(backward(cuda, cdy(tokens + 1, h), p, g, tokens + 1, h, good_ws), "dy");
    test::expect_rejected(backward(cuda, cdy(tokens, h), p, g, tokens - 1, h, good_ws), "dx");
    test::expect_rejected(backward(cuda, cdy(tokens, h), p, g, tokens, h - 1, good_ws), "dx");
    auto bad_gate = p;
    bad_gate.gate_weight = make_view(p.gate_weight.data_handle(), h + 1, e);
    test::expect_rejected(backward(cuda, cdy(tokens, h), bad_gate, g, tokens, h, good_ws),
                          "params.gate_weight");
    auto bad_w2 = g;
    bad_w2.expert.w2 = make_view(g.expert.w2.data_handle(), e, h, args.ffn);
    test::expect_rejected(backward(cuda, cdy(tokens, h), p, bad_w2, tokens, h, good_ws),
                          "gradients.expert.w2");
    auto bad_b1 = g;
    bad_b1.expert.b1 = make_view(g.expert.b1.data_handle(), e, args.ffn - 1);
    test::expect_rejected(backward(cuda, cdy(tokens, h), p, bad_b1, tokens, h, good_ws),
                          "gradients.expert.b1");
    test::expect_rejected(backward(cuda, cdy(tokens, h), p, g, tokens, h, good_ws.first(bytes - 1)),
                          "ws");
    test::expect_rejected(backward(no_blas, cdy(tokens, h), p, g, tokens, h, good_ws), "cuda.blas");
    CHECK(all_poisoned(dx.download(s.stream)));
    for (auto const& t : download_gradients(layer, params, in.options)) CHECK(all_poisoned(t));
  }

  SUBCASE("can_implement says what forward and backward would throw, and writes nothing") {
    auto yv = [&](index_t t, index_t c) { return make_view(y.data(), t, c); };
    auto dxv = [&](index_t t, index_t c) { return make_view(dx.data(), t, c); };
    CHECK(layer.can_implement(cuda, cx(tokens, h), p, yv(tokens, h), good_ws).ok());
    CHECK(layer.can_implement(cuda, cx(tokens + 1, h), p, yv(tokens + 1, h), good_ws).argument() ==
          "x");
    CHECK(layer.can_implement(cuda, cx(tokens, h), p, yv(tokens - 1, h), good_ws).argument() ==
          "y");
    CHECK(layer.can_implement(cuda, cx(tokens, h), p, yv(tokens, h), good_ws.first(bytes - 1))
              .argument() == "ws");
    CHECK(layer.can_implement(no_blas, cx(tokens, h), p, yv(tokens, h), good_ws).argument() ==
          "cuda.blas");
    // An empty call: the host backend takes it, the CUDA one not yet, and says so.
    status const empty = layer.can_implement(cuda, cx(0, h), p, yv(0, h), good_ws);
    CHECK(empty.argument() == "x");
    CHECK(empty.message().find("CUDA backend") != std::string::npos);
    CHECK(layer.can_implement(cuda, cdy(0, h), p, dxv(0, h), g, good_ws).argument() == "dy");
    CHECK(layer.can_implement(cuda, cdy(tokens, h), p, dxv(tokens, h), g, good_ws).ok());
    CHECK(layer.can_implement(cuda, cdy(tokens, h), p, dxv(tokens, h - 1), g, good_ws).argument() ==
          "dx");
    CHECK(layer.can_implement(no_blas, cdy(tokens, h), p, dxv(tokens, h), g, good_ws).argument() ==
          "cuda.blas");
    // Local groups: x and dy alike must fill them (the CUDA backward did not check dy's).
    layer_args grouped = args;
    grouped.gate.groups = 2;
    Layer const grouped_layer(grouped);
    std::size_t const grouped_bytes = grouped_layer.workspace_bytes<T>(cuda);
    device_array<std::byte> grouped_ws(grouped_bytes);
    workspace const gws{grouped_ws.data(), grouped_bytes};
    CHECK(grouped_layer.can_implement(cuda, cx(tokens - 1, h), p, yv(tokens - 1, h), gws)
              .argument() == "x");
    CHECK(grouped_layer.can_implement(cuda, cdy(tokens - 1, h), p, dxv(tokens - 1, h), g, gws)
              .argument() == "dy");
    test::expect_rejected(
        [&] { grouped_layer.backward(cuda, cdy(tokens - 1, h), p, dxv(tokens - 1, h), g, gws); },
        "dy");
    CHECK(all_poisoned(y.download(s.stream)));
    CHECK(all_poisoned(dx.download(s.stream)));
    for (auto const& t : download_gradients(layer, params, in.options)) CHECK(all_poisoned(t));
  }

  SUBCASE("stats") {
    test::expect_rejected([&] { (void)layer.stats(cuda, good_ws, 0); }, "tokens");
    test::expect_rejected([&] { (void)layer.stats(cuda, good_ws, tokens + 1); }, "tokens");
    test::expect_rejected([&] { (void)layer.stats(cuda, workspace{}, tokens); }, "ws");
    test::expect_rejected([&] { (void)layer.stats(cuda, good_ws.first(64), tokens); }, "ws");
  }

  // Nothing was lost: the earlier forward's state still drives stats and backward.
  auto const after = layer.stats(cuda, good_ws, tokens);
  CHECK(after.capacity == before.capacity);
  CHECK(after.dropped == before.dropped);
  CHECK(after.aux_loss == before.aux_loss);
  CHECK(after.z_loss == before.z_loss);
  layer.backward(cuda, cdy(tokens, h), p, make_view(dx.data(), tokens, h), g, good_ws);
  auto written = dx.download(s.stream);
  written.resize(static_cast<std::size_t>(tokens * h));
  CHECK(all_finite(written));
}
