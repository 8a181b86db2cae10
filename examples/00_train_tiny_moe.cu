// SPDX-License-Identifier: Apache-2.0
// 00_train_tiny_moe: why a mixture of experts, in one small training run.
//
// Tokens come from four clusters, and each cluster wants its own map from input to target.
// A mixture of experts can give each cluster an expert of its own, with a router that
// learns which tokens go where. This program trains one MoE layer (top-2 of 4 GELU FFN
// experts, capacity factor 1, so tokens are dropped while the router is still unbalanced)
// with plain SGD and checks that the loss falls at least tenfold. On the way it shows the
// whole life of a layer: compose it from policies, size its workspace, check the arguments,
// run forward, run backward into gradients the trainer owns, read what the router decided.
//
// It trains on the CUDA backend when a GPU is present and on the host backend otherwise:
// the training loop is written once, over where the tensors live. Built without nvcc (as
// C++), it has only the host backend.   Usage: 00_train_tiny_moe [--steps N]

#include <moe/moe.hpp>
#if defined(__CUDACC__)  // the CUDA backend needs nvcc; without it, the host backend runs
#include <moe/core/blas.hpp>
#include <moe/expert/kernels/ffn.cuh>
#include <moe/layer/kernels/layer.cuh>
#endif

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numbers>
#include <random>
#include <string_view>
#include <utility>
#include <vector>

namespace {

using gate_t = moe::gating::top_k<2>;  // softmax scores, two experts per token
using expert_t = moe::expert::ffn<moe::act::gelu>;
using layer_t = moe::layer<gate_t, moe::layout::capacity, moe::comm::single_rank, expert_t>;

/// Random numbers that are the same on every platform: mt19937_64 is specified bit for bit,
/// and the conversions are ours rather than the standard library's distributions.
struct random_source {
  std::mt19937_64 engine;
  double uniform() { return static_cast<double>(engine() >> 11) * 0x1.0p-53; }  // [0, 1)
  double normal() {                                                             // Box–Muller
    double const u = 1.0 - uniform(), v = uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(2.0 * std::numbers::pi * v);
  }
};

/// The synthetic task: token = centre_c + noise, target = A_c · token, for a random cluster c.
struct cluster_task {
  int hidden, clusters;
  double noise;
  std::vector<double> centres;  // (clusters, hidden)
  std::vector<double> maps;     // (clusters, hidden, hidden)

  cluster_task(int h, int c, double noise_std, random_source& rng)
      : hidden(h), clusters(c), noise(noise_std), centres(c * h), maps(c * h * h) {
    for (auto& v : centres) v = rng.normal();
    for (auto& v : maps) v = rng.normal() / std::sqrt(double(h));
  }

  /// Fills x and target, both (tokens, hidden), from `cluster`, or from random clusters if -1.
  void sample(random_source& rng, std::vector<float>& x, std::vector<float>& target,
              int cluster = -1) const {
    std::vector<double> token(hidden);
    for (std::size_t t = 0; t < x.size() / hidden; ++t) {
      int const c = cluster >= 0 ? cluster : int(rng.engine() % clusters);
      for (int h = 0; h < hidden; ++h) token[h] = centres[c * hidden + h] + noise * rng.normal();
      for (int i = 0; i < hidden; ++i) {
        double sum = 0;
        for (int h = 0; h < hidden; ++h) sum += maps[(c * hidden + i) * hidden + h] * token[h];
        x[t * hidden + i] = float(token[i]);
        target[t * hidden + i] = float(sum);
      }
    }
  }
};

/// The layer's parameters, or their gradients: the trainer owns them, the layer sees views.
/// Array is where they live: std::vector<float> on the host, cuda_place::array on the GPU.
template <class Array>
struct ffn_layer_tensors {
  moe::layer_args args;
  Array gate_weight, w1, b1, w2, b2;

  /// `make(n)` gives an Array of n floats.
  template <class Make>
  ffn_layer_tensors(moe::layer_args const& a, Make make)
      : args(a),
        gate_weight(make(a.hidden * a.gate.experts)),
        w1(make(a.gate.experts * a.hidden * a.ffn)),
        b1(make(a.gate.experts * a.ffn)),
        w2(make(a.gate.experts * a.ffn * a.hidden)),
        b2(make(a.gate.experts * a.hidden)) {}

  std::array<Array*, 5> all() { return {&gate_weight, &w1, &b1, &w2, &b2}; }

  template <class T>  // float const for parameters, float for gradients
  moe::layer_params<T, expert_t> views() {
    auto const [h, f, e] = std::array{args.hidden, args.ffn, args.gate.experts};
    return {moe::make_view<T>(gate_weight.data(), h, e),
            {moe::make_view<T>(w1.data(), e, h, f), moe::make_view<T>(b1.data(), e, f),
             moe::make_view<T>(w2.data(), e, f, h), moe::make_view<T>(b2.data(), e, h)}};
  }
};

/// What the router decided in the last forward call, in host memory.
struct routing_report {
  moe::layer_stats stats;
  std::vector<std::int64_t> load;  // (experts) assignments per expert, before drops
};

// --- where the layer runs ------------------------------------------------------------------
// A place holds the backend, makes arrays and the workspace where that backend reads them,
// moves the trainer's host vectors in and out, and applies an SGD step where the parameters
// live. The trainer's side (the task, the loss, the printout) stays on the host either way.

/// Host memory and the host backend: runs anywhere, no GPU needed.
struct host_place {
  using array = std::vector<float>;

  [[nodiscard]] moe::host_backend backend() const { return moe::host; }
  [[nodiscard]] array make(moe::index_t count) const { return array(std::size_t(count)); }
  [[nodiscard]] moe::host_buffer workspace(layer_t const& layer) const {
    return moe::host_buffer(layer.workspace_bytes(moe::host));
  }
  void upload(std::vector<float> const& from, array& to) const { to = from; }
  void download(array const& from, std::vector<float>& to) const { to = from; }
  void sgd(array& parameter, array const& gradient, double lr) const {
    for (std::size_t j = 0; j < parameter.size(); ++j) parameter[j] -= float(lr * gradient[j]);
  }
  [[nodiscard]] routing_report report(layer_t const& layer, moe::workspace ws, moe::index_t) const {
    moe::layer_stats const stats = layer.stats(moe::host, ws);
    return {stats, {stats.load.begin(), stats.load.end()}};
  }
};

#if defined(__CUDACC__)

/// Device memory and the CUDA backend, on a stream of its own with a cuBLAS handle.
class cuda_place {
 public:
  /// Floats in device memory, released (stream-ordered) at scope exit.
  struct array {
    moe::device_buffer<> buffer;
    [[nodiscard]] float* data() const { return reinterpret_cast<float*>(buffer.view().data()); }
    [[nodiscard]] std::size_t size() const { return buffer.size() / sizeof(float); }
  };

  cuda_place() {
    MOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream_.get, cudaStreamNonBlocking));
    MOE_CUBLAS_TRY(cublasSetStream(blas_.get(), stream_.get));  // for the SGD steps
  }

  [[nodiscard]] moe::cuda_backend backend() const { return {stream_.get, blas_.get()}; }
  [[nodiscard]] array make(moe::index_t count) const {
    return {moe::device_buffer<>(std::size_t(count) * sizeof(float), stream_.get)};
  }
  [[nodiscard]] moe::device_buffer<> workspace(layer_t const& layer) const {
    return moe::device_buffer<>(layer.workspace_bytes<float>(backend()), stream_.get);
  }
  void upload(std::vector<float> const& from, array& to) const {
    MOE_CUDA_TRY(cudaMemcpyAsync(to.data(), from.data(), from.size() * sizeof(float),
                                 cudaMemcpyHostToDevice, stream_.get));
  }
  void download(array const& from, std::vector<float>& to) const {
    MOE_CUDA_TRY(cudaMemcpyAsync(to.data(), from.data(), to.size() * sizeof(float),
                                 cudaMemcpyDeviceToHost, stream_.get));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream_.get));
  }
  void sgd(array& parameter, array const& gradient, double lr) const {  // p += −lr · g
    float const step = float(-lr);
    MOE_CUBLAS_TRY(cublasSaxpy(blas_.get(), int(parameter.size()), &step, gradient.data(), 1,
                               parameter.data(), 1));
  }
  [[nodiscard]] routing_report report(layer_t const& layer, moe::workspace ws,
                                      moe::index_t tokens) const {
    moe::layer_stats const stats = layer.stats(backend(), ws, tokens);  // synchronises
    std::vector<std::int64_t> load(stats.load.size());
    MOE_CUDA_TRY(cudaMemcpyAsync(load.data(), stats.load.data(), load.size() * sizeof(std::int64_t),
                                 cudaMemcpyDeviceToHost, stream_.get));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream_.get));
    return {stats, std::move(load)};
  }

 private:
  struct owned_stream {
    cudaStream_t get = nullptr;
    owned_stream() = default;
    owned_stream(owned_stream const&) = delete;
    owned_stream& operator=(owned_stream const&) = delete;
    ~owned_stream() {
      if (get != nullptr) MOE_CUDA_TRY_LOG(cudaStreamDestroy(get));
    }
  };
  owned_stream stream_;    // declared first: it outlives the handle bound to it
  moe::blas_handle blas_;  // creating it initialises cuBLAS on the current device
};

#endif  // __CUDACC__

/// Mean squared error of y against target; writes its gradient dL/dy into dy.
double mse(std::vector<float> const& y, std::vector<float> const& target, std::vector<float>& dy) {
  double sum = 0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    double const diff = double(y[i]) - double(target[i]);
    sum += diff * diff;
    dy[i] = float(2.0 * diff / double(y.size()));
  }
  return sum / double(y.size());
}

int parse_steps(int argc, char** argv) {
  if (argc == 1) return 300;
  char* end = nullptr;
  long const steps = argc == 3 ? std::strtol(argv[2], &end, 10) : 0;
  if (argc != 3 || std::string_view(argv[1]) != "--steps" || *end != '\0' || steps < 1) {
    std::fprintf(stderr, "usage: %s [--steps N]   (N ≥ 1, default 300)\n", argv[0]);
    std::exit(EXIT_FAILURE);
  }
  return int(steps);
}

template <class Place>
int train(Place const& place, int steps) {
  // Capacity factor 1: 2·⌊128/4⌋ = 64 slots per expert, so an unbalanced router drops
  // tokens. There is no residual path in this toy model, so a token that lost one of its two
  // experts gives full weight to the other (renormalised after drops), and a small aux loss
  // pushes the router towards balance.
  moe::layer_args const args{.gate = {.tokens = 128,
                                      .experts = 4,
                                      .capacity_factor = 1.0f,
                                      .normalize = moe::gating::renormalize::after_drops,
                                      .aux_loss_coef = 0.01f},
                             .hidden = 32,
                             .ffn = 64};
  if (auto const s = layer_t::can_implement(args); !s) {
    std::fprintf(stderr, "cannot build the layer: '%s' %s\n", s.argument().c_str(),
                 s.message().c_str());
    return EXIT_FAILURE;
  }
  layer_t const layer(args);
  auto const ws = place.workspace(layer);  // once; every call below runs in it

  random_source rng{std::mt19937_64(2024)};
  cluster_task const task(int(args.hidden), int(args.gate.experts), 0.5, rng);
  auto make = [&](moe::index_t count) { return place.make(count); };
  ffn_layer_tensors<typename Place::array> params(args, make), grads(args, make);
  {
    ffn_layer_tensors<std::vector<float>> initial(
        args, [](moe::index_t count) { return std::vector<float>(std::size_t(count)); });
    double const init[] = {1.0, 1.0, 0.0, 0.5, 0.0};  // gate, w1, b1, w2, b2: × 1/√fan-in
    double const fan_in[] = {double(args.hidden), double(args.hidden), 1, double(args.ffn), 1};
    for (std::size_t i = 0; i < 5; ++i) {
      for (auto& v : *initial.all()[i]) v = float(init[i] * rng.normal() / std::sqrt(fan_in[i]));
      place.upload(*initial.all()[i], *params.all()[i]);
    }
  }

  // The trainer's side in host memory; x, y, dy and dx also where the backend reads them.
  std::size_t const n = std::size_t(args.gate.tokens * args.hidden);
  std::vector<float> x(n), target(n), y(n), dy(n), eval_x(n), eval_target(n);
  auto x_at = place.make(n), y_at = place.make(n), dy_at = place.make(n), dx_at = place.make(n);
  auto in = [&](auto const& a) {
    return moe::make_view(static_cast<float const*>(a.data()), args.gate.tokens, args.hidden);
  };
  auto out = [&](auto& a) { return moe::make_view(a.data(), args.gate.tokens, args.hidden); };
  auto const p = params.template views<float const>();  // (the arrays never reallocate)
  auto const g = grads.template views<float>();
  if (auto const s = layer.can_implement(place.backend(), in(x_at), p, out(y_at), ws.view()); !s) {
    std::fprintf(stderr, "cannot run the layer: '%s' %s\n", s.argument().c_str(),
                 s.message().c_str());
    return EXIT_FAILURE;
  }
  auto forward = [&](std::vector<float> const& input) {  // y = layer(input)
    place.upload(input, x_at);
    layer.forward(place.backend(), in(x_at), p, out(y_at), ws.view());
    place.download(y_at, y);
  };

  // A held-out batch, the same before and after training, measures progress.
  task.sample(rng, eval_x, eval_target);
  auto evaluate = [&] {
    forward(eval_x);
    return mse(y, eval_target, dy);
  };
  double const initial_loss = evaluate();
  std::printf("training: T=%d H=%d F=%d E=%d k=%d, capacity %d per expert, %d steps\n",
              int(args.gate.tokens), int(args.hidden), int(args.ffn), int(args.gate.experts),
              layer.k(), int(place.report(layer, ws.view(), args.gate.tokens).stats.capacity),
              steps);

  double const lr = 2.0;
  auto const p_all = params.all(), g_all = grads.all();
  for (int step = 1; step <= steps; ++step) {
    task.sample(rng, x, target);
    forward(x);
    double const loss = mse(y, target, dy);
    if (step == 1 || step % 25 == 0 || step == steps) {
      routing_report const r = place.report(layer, ws.view(), args.gate.tokens);
      std::printf("step %4d  mse %.4f  aux %.3f  dropped %3d  assignments per expert", step, loss,
                  r.stats.aux_loss, int(r.stats.dropped));
      for (auto load : r.load) std::printf(" %4d", int(load));
      std::printf("\n");
    }
    // Gradients of mse + aux_loss_coef · aux: backward adds the aux term itself.
    place.upload(dy, dy_at);
    layer.backward(place.backend(), in(dy_at), p, out(dx_at), g, ws.view());
    for (std::size_t i = 0; i < p_all.size(); ++i) place.sgd(*p_all[i], *g_all[i], lr);
  }
  double const final_loss = evaluate();

  // Specialisation: where the router sends each cluster's tokens now.
  for (int c = 0; c < task.clusters; ++c) {
    task.sample(rng, x, target, c);
    forward(x);
    std::printf("cluster %d goes to experts", c);
    for (auto load : place.report(layer, ws.view(), args.gate.tokens).load)
      std::printf(" %4d", int(load));
    std::printf("\n");
  }
  std::printf("held-out mse: initial %.4f, final %.4f (%.1fx lower)\n", initial_loss, final_loss,
              initial_loss / final_loss);
  if (!(final_loss <= initial_loss / 10)) {
    std::fprintf(stderr, "FAILED: the loss did not fall tenfold in %d steps\n", steps);
    return EXIT_FAILURE;
  }
  return EXIT_SUCCESS;
}

int run(int steps) {
  int const gpus = moe::cuda_device_count();
#if defined(__CUDACC__)
  if (gpus > 0) {
    cudaDeviceProp device{};
    MOE_CUDA_TRY(cudaGetDeviceProperties(&device, 0));
    std::printf("training on the CUDA backend (%s)\n", device.name);
    return train(cuda_place{}, steps);
  }
  std::printf("no CUDA device: training on the host backend\n");
#else
  if (gpus > 0)
    std::printf(
        "found %d CUDA device(s), but this build has no CUDA backend (compiled "
        "without nvcc): training on the host backend\n",
        gpus);
  else
    std::printf("no CUDA device: training on the host backend\n");
#endif
  return train(host_place{}, steps);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_steps(argc, argv));
  } catch (moe::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return EXIT_FAILURE;
  }
}
