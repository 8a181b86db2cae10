// SPDX-License-Identifier: Apache-2.0
// 04_moe_inference: one MoE layer serving a model, at decode and at prefill sizes.
//
// Inference runs the same layer on two very different batches. A decode step routes a few
// tokens (one per sequence being generated, T = 1…64); each reaches k experts, so a step
// costs about the time to read those experts' weights, and a few more tokens are nearly
// free. Prefill routes a whole prompt (T in the thousands): every expert receives many rows
// and the expert GEMMs are compute-bound. This program runs a Mixtral-like layer forward only
// (top-2 of 8 SwiGLU experts, bfloat16, Mixtral-8x7B's hidden and expert widths divided by
// four) at both ends on the CUDA backend and prints tokens per second. Before timing, it
// checks a decode call against the host backend on the same inputs.
//
// The default layout is dropless (layout::ragged): a decode step computes only the experts
// its tokens chose, and the forward reads the batch's shape back once (one stream
// synchronisation). `--layout capacity` uses the capacity layout (factor 1.25) instead:
// nothing synchronises and a CUDA graph can capture it, but every expert computes its C rows.
//
// Without a CUDA device it says so, runs a smaller layer on the host backend (its rates are
// the host's, not a GPU's) and checks decode calls against the layer's formula.
//
//   04_moe_inference [--layout ragged|capacity]

#include <moe/moe.hpp>
#if defined(__CUDACC__)  // the CUDA backend needs nvcc; without it, the host backend runs
#include <moe/expert/kernels/glu.cuh>
#include <moe/layer/kernels/layer.cuh>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string_view>
#include <utility>
#include <vector>

namespace {

using moe::index_t;
using element_t = __nv_bfloat16;
using gate_t = moe::gating::top_k<2>;               // softmax over the experts, the best two
using expert_t = moe::expert::glu<moe::act::silu>;  // SwiGLU, as Mixtral's experts
template <class Layout>
using layer_t = moe::layer<gate_t, Layout, moe::comm::single_rank, expert_t>;

constexpr index_t experts = 8;

/// Mixtral's routing: the two weights renormalised over the pair (a softmax over the two
/// largest logits). Inference: no noise, the evaluation capacity factor.
moe::layer_args args_for(index_t tokens, index_t hidden, index_t ffn) {
  return {.gate = {.tokens = tokens,
                   .experts = experts,
                   .capacity_factor = 1.25f,
                   .normalize = moe::gating::renormalize::before_drops,
                   .training = false,
                   .eval_capacity_factor = 1.25f},
          .hidden = hidden,
          .ffn = ffn};
}

/// `count` values uniform in [-scale, scale), reproducible from `seed`.
std::vector<element_t> random_values(std::size_t count, double scale, std::uint64_t seed) {
  std::mt19937_64 engine(seed);
  std::vector<element_t> values(count);
  for (auto& v : values) {
    double const u = static_cast<double>(engine() >> 11) * 0x1.0p-52 - 1.0;  // [-1, 1)
    v = moe::from_accumulate<element_t>(static_cast<float>(scale * u));
  }
  return values;
}

/// The layer's parameters as a server holds them in host memory (Mixtral's experts have no
/// biases): the gate weight, W13 and W2, PyTorch's nn.Linear initialisation.
template <class Layer>
moe::host_parameters<Layer, element_t> weights_for(Layer const& layer) {
  moe::host_parameters<Layer, element_t> w(layer, {.gradients = false});  // inference
  w.initialize(moe::initializer::torch_linear(), 1);
  return w;
}

/// ‖a − b‖ / ‖b‖ over all elements.
double relative_error(std::vector<element_t> const& a, std::vector<element_t> const& b) {
  double difference = 0, norm = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    double const x = moe::to_accumulate(a[i]), y = moe::to_accumulate(b[i]);
    difference += (x - y) * (x - y);
    norm += y * y;
  }
  return std::sqrt(difference / norm);
}

/// What the layer computes for one token, written out in float64 (no capacity reached):
/// y = Σ over the two best experts e of w_e · (silu(x·Wg_e) ⊙ (x·Wu_e)) · W2_e, with w the
/// softmax scores of the two renormalised over the pair.
template <class Parameters>
std::vector<double> formula(Parameters const& parameters, element_t const* x) {
  auto const w = parameters.params();
  index_t const h = w.gate_weight.extent(0), f = w.expert.w2.extent(1);
  auto at = [](auto const* data, index_t i) { return double(moe::to_accumulate(data[i])); };
  struct {
    element_t const *gate, *w13, *w2;
  } const flat{w.gate_weight.data_handle(), w.expert.w13.data_handle(), w.expert.w2.data_handle()};
  std::vector<double> logits(experts, 0.0), y(h, 0.0), inner(f);
  for (index_t e = 0; e < experts; ++e)
    for (index_t i = 0; i < h; ++i)
      logits[e] += moe::to_accumulate(x[i]) * at(flat.gate, i * experts + e);
  index_t first = 0;  // ties go to the lower expert index
  for (index_t e = 1; e < experts; ++e)
    if (logits[e] > logits[first]) first = e;
  index_t second = first == 0 ? 1 : 0;
  for (index_t e = 0; e < experts; ++e)
    if (e != first && logits[e] > logits[second]) second = e;
  // softmax(l)_a / (softmax(l)_a + softmax(l)_b) = 1 / (1 + exp(l_b − l_a))
  double const w_first = 1.0 / (1.0 + std::exp(logits[second] - logits[first]));
  for (auto const& [e, weight] : {std::pair{first, w_first}, std::pair{second, 1.0 - w_first}}) {
    for (index_t j = 0; j < f; ++j) {
      double g = 0, u = 0;
      for (index_t i = 0; i < h; ++i) {
        double const xi = moe::to_accumulate(x[i]);
        g += xi * at(flat.w13, (e * h + i) * 2 * f + j);
        u += xi * at(flat.w13, (e * h + i) * 2 * f + f + j);
      }
      inner[j] = g / (1.0 + std::exp(-g)) * u;
    }
    for (index_t i = 0; i < h; ++i) {
      double sum = 0;
      for (index_t j = 0; j < f; ++j) sum += inner[j] * at(flat.w2, (e * f + j) * h + i);
      y[i] += weight * sum;
    }
  }
  return y;
}

void print_rate(char const* label, index_t tokens, double seconds_per_call) {
  std::printf("%-8s T=%6lld  %10.1f us per call  %12.0f tokens/s\n", label,
              static_cast<long long>(tokens), seconds_per_call * 1e6,
              static_cast<double>(tokens) / seconds_per_call);
}

/// Whether a layer can be built with `args`; if not, says which argument is wrong.
template <class Layout>
bool can_build(moe::layer_args const& args) {
  auto const s = layer_t<Layout>::can_implement(args);
  if (!s) std::fprintf(stderr, "cannot build the layer: %s\n", s.to_string().c_str());
  return s.ok();
}

/// Without a GPU: a layer of Mixtral's proportions at 1/32 of its widths on the host backend.
template <class Layout>
int run_on_host() {
  constexpr index_t hidden = 128, ffn = 448, most_tokens = 256;
  moe::layer_args const args = args_for(most_tokens, hidden, ffn);
  if (!can_build<Layout>(args)) return EXIT_FAILURE;
  layer_t<Layout> const layer(args);
  moe::host_buffer ws(layer.workspace_bytes(moe::host));  // once, for the largest call
  auto const w = weights_for(layer);
  auto const p = w.params();
  std::vector<element_t> const x =
      random_values(static_cast<std::size_t>(most_tokens * hidden), 1.0, 4);
  std::vector<element_t> y(x.size());
  auto rows = [&](auto* data, index_t tokens) { return moe::make_view(data, tokens, hidden); };
  if (auto const s = layer.can_implement(moe::host, rows(x.data(), most_tokens), p,
                                         rows(y.data(), most_tokens), ws.view());
      !s) {
    std::fprintf(stderr, "cannot run the layer: %s\n", s.to_string().c_str());
    return EXIT_FAILURE;
  }

  // Decode calls of one token each against the formula.
  double worst = 0;
  for (index_t t = 0; t < 8; ++t) {
    element_t const* token = x.data() + t * hidden;
    layer.forward(moe::host, rows(token, 1), p, rows(y.data(), 1), ws.view());
    std::vector<double> const expected = formula(w, token);
    double difference = 0, norm = 0;
    for (index_t i = 0; i < hidden; ++i) {
      double const d = moe::to_accumulate(y[i]) - expected[i];
      difference += d * d;
      norm += expected[i] * expected[i];
    }
    worst = std::max(worst, std::sqrt(difference / norm));
  }
  std::printf("decode check against the formula (8 calls of T=1): relative error %.2e\n", worst);
  if (!(worst < 1e-2)) {
    std::fprintf(stderr, "FAILED: the layer's output differs from the formula\n");
    return EXIT_FAILURE;
  }

  std::printf("host backend, H=%lld F=%lld E=%lld k=2 (rates of this CPU, not of a GPU):\n",
              static_cast<long long>(hidden), static_cast<long long>(ffn),
              static_cast<long long>(experts));
  using clock = std::chrono::steady_clock;
  for (index_t const tokens : {1, 8, 64, 256}) {
    int calls = 0;
    auto const start = clock::now();
    double seconds = 0;
    do {  // at least 50 ms of calls
      layer.forward(moe::host, rows(x.data(), tokens), p, rows(y.data(), tokens), ws.view());
      seconds = std::chrono::duration<double>(clock::now() - start).count();
      ++calls;
    } while (seconds < 0.05);
    print_rate("host", tokens, seconds / calls);
  }
  return EXIT_SUCCESS;
}

#if defined(__CUDACC__)

/// A stream of our own, destroyed at scope exit.
struct owned_stream {
  cudaStream_t stream = nullptr;
  owned_stream() { MOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)); }
  owned_stream(owned_stream const&) = delete;
  owned_stream& operator=(owned_stream const&) = delete;
  ~owned_stream() { MOE_CUDA_TRY_LOG(cudaStreamDestroy(stream)); }
};

/// A pair of CUDA events that time the work enqueued on a stream between them.
struct event_timer {
  cudaEvent_t start = nullptr, stop = nullptr;
  event_timer() {
    MOE_CUDA_TRY(cudaEventCreate(&start));
    MOE_CUDA_TRY(cudaEventCreate(&stop));
  }
  event_timer(event_timer const&) = delete;
  event_timer& operator=(event_timer const&) = delete;
  ~event_timer() {
    MOE_CUDA_TRY_LOG(cudaEventDestroy(start));
    MOE_CUDA_TRY_LOG(cudaEventDestroy(stop));
  }
  /// Seconds between the two events, once `stop` has completed.
  double seconds() const {
    MOE_CUDA_TRY(cudaEventSynchronize(stop));
    float milliseconds = 0;
    MOE_CUDA_TRY(cudaEventElapsedTime(&milliseconds, start, stop));
    return static_cast<double>(milliseconds) * 1e-3;
  }
};

template <class T>
T* data_of(moe::device_buffer<> const& buffer) {
  return reinterpret_cast<T*>(buffer.view().data());
}

template <class T>
void upload(std::vector<T> const& from, moe::device_buffer<> const& to, cudaStream_t stream) {
  MOE_CUDA_TRY(cudaMemcpyAsync(data_of<T>(to), from.data(), from.size() * sizeof(T),
                               cudaMemcpyHostToDevice, stream));
}

/// The GPU: Mixtral-8x7B's widths divided by four, decode and prefill sizes.
template <class Layout>
int run_on_gpu() {
  constexpr index_t hidden = 1024, ffn = 3584, most_tokens = 16384;
  constexpr index_t decode[] = {1, 2, 4, 8, 16, 32, 64}, prefill[] = {4096, 16384};
  cudaDeviceProp device{};
  MOE_CUDA_TRY(cudaGetDeviceProperties(&device, 0));
  std::printf("CUDA backend on %s, H=%lld F=%lld E=%lld k=2, bfloat16\n", device.name,
              static_cast<long long>(hidden), static_cast<long long>(ffn),
              static_cast<long long>(experts));

  moe::layer_args const args = args_for(most_tokens, hidden, ffn);
  if (!can_build<Layout>(args)) return EXIT_FAILURE;
  layer_t<Layout> const layer(args);

  owned_stream const stream;  // outlives the handle and the buffers, which use it
  moe::blas_handle const blas;
  moe::cuda_backend const cuda{stream.stream, blas.get()};
  // Once, for the largest call: every forward below runs in this workspace.
  moe::device_buffer<> const ws(layer.template workspace_bytes<element_t>(cuda), stream.stream);

  auto const w = weights_for(layer);
  moe::device_parameters<layer_t<Layout>, element_t> device_w(layer, stream.stream,
                                                              {.gradients = false});
  device_w.copy_from(w);
  std::vector<element_t> const x =
      random_values(static_cast<std::size_t>(most_tokens * hidden), 1.0, 4);
  std::size_t const bytes = sizeof(element_t);
  moe::device_buffer<> const x_device(x.size() * bytes, stream.stream),
      y_device(x.size() * bytes, stream.stream);
  upload(x, x_device, stream.stream);
  auto const p = device_w.params();
  auto forward = [&](index_t tokens) {  // the first `tokens` rows of x
    layer.forward(cuda, moe::make_view(data_of<element_t const>(x_device), tokens, hidden), p,
                  moe::make_view(data_of<element_t>(y_device), tokens, hidden), ws.view());
  };

  // One decode call against the host backend on the same inputs.
  constexpr index_t checked = 8;
  forward(checked);
  std::vector<element_t> y(std::size_t{checked} * hidden), expected(y.size());
  MOE_CUDA_TRY(cudaMemcpyAsync(y.data(), data_of<element_t>(y_device), y.size() * bytes,
                               cudaMemcpyDeviceToHost, stream.stream));
  MOE_CUDA_TRY(cudaStreamSynchronize(stream.stream));
  layer_t<Layout> const host_layer(args_for(checked, hidden, ffn));
  moe::host_buffer host_ws(host_layer.workspace_bytes(moe::host));
  host_layer.forward(moe::host, moe::make_view(x.data(), checked, hidden), w.params(),
                     moe::make_view(expected.data(), checked, hidden), host_ws.view());
  double const error = relative_error(y, expected);
  std::printf("decode check against the host backend (T=%lld): relative error %.2e\n",
              static_cast<long long>(checked), error);
  if (!(error < 1e-2)) {
    std::fprintf(stderr, "FAILED: the CUDA backend's output differs from the host backend's\n");
    return EXIT_FAILURE;
  }

  event_timer timer;
  auto measure = [&](char const* label, index_t tokens, int calls) {
    for (int i = 0; i < 3; ++i) forward(tokens);  // warm-up: cuBLAS picks its kernels
    MOE_CUDA_TRY(cudaEventRecord(timer.start, stream.stream));
    for (int i = 0; i < calls; ++i) forward(tokens);
    MOE_CUDA_TRY(cudaEventRecord(timer.stop, stream.stream));
    print_rate(label, tokens, timer.seconds() / calls);
  };
  for (index_t const tokens : decode) measure("decode", tokens, 200);
  for (index_t const tokens : prefill) measure("prefill", tokens, 10);
  return EXIT_SUCCESS;
}

#endif  // __CUDACC__

template <class Layout>
int run(int gpus) {
#if defined(__CUDACC__)
  if (gpus > 0) return run_on_gpu<Layout>();
  std::printf("no CUDA device: running a smaller layer on the host backend instead\n");
#else
  std::printf("%s: running a smaller layer on the host backend instead\n",
              gpus > 0 ? "built without nvcc (no CUDA backend)" : "no CUDA device");
#endif
  return run_on_host<Layout>();
}

}  // namespace

int main(int argc, char** argv) {
  std::string_view layout = "ragged";
  if (argc == 3 && std::string_view(argv[1]) == "--layout") layout = argv[2];
  if ((argc != 1 && argc != 3) || (layout != "ragged" && layout != "capacity")) {
    std::fprintf(stderr, "usage: %s [--layout ragged|capacity]\n", argv[0]);
    return EXIT_FAILURE;
  }
  try {
    int const gpus = moe::cuda_device_count();
    std::printf("layout: %s\n", layout == "ragged" ? "ragged (dropless)" : "capacity, f = 1.25");
    return layout == "ragged" ? run<moe::layout::ragged>(gpus) : run<moe::layout::capacity>(gpus);
  } catch (moe::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return EXIT_FAILURE;
  }
}
