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
// C++), it has only the host backend.
//
//   Usage: 00_train_tiny_moe [--steps N] [--load-csv FILE]
//
// --load-csv writes each step's assignments and drops per expert; scripts/plot_load.sh
// renders them as a heat map (load balance over training).

#include <moe/moe.hpp>
#if defined(__CUDACC__)  // the CUDA backend needs nvcc; without it, the host backend runs
#include <moe/core/blas.hpp>
#include <moe/expert/kernels/ffn.cuh>
#include <moe/layer/kernels/layer.cuh>
#endif

#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numbers>
#include <random>
#include <stdexcept>
#include <string>
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

// --- where the layer runs ------------------------------------------------------------------
// A place holds the backend, makes arrays, the parameters and the workspace where that
// backend reads them, moves the trainer's host vectors in and out, and applies an SGD step
// where the parameters live. The trainer's side (the task, the loss, the printout) stays on
// the host either way.

/// Host memory and the host backend: runs anywhere, no GPU needed.
struct host_place {
  using array = std::vector<float>;
  using parameters = moe::host_parameters<layer_t, float>;

  [[nodiscard]] moe::host_backend backend() const { return moe::host; }
  [[nodiscard]] array make(moe::index_t count) const { return array(std::size_t(count)); }
  [[nodiscard]] parameters make_parameters(layer_t const& layer) const {
    return parameters(layer, {.biases = true});
  }
  [[nodiscard]] moe::host_buffer workspace(layer_t const& layer) const {
    return moe::host_buffer(layer.workspace_bytes(moe::host));
  }
  void upload(std::vector<float> const& from, array& to) const { to = from; }
  void download(array const& from, std::vector<float>& to) const { to = from; }
  void sgd(parameters& w, double lr) const {  // every parameter at once: p −= lr · g
    auto const p = w.values_bytes(), g = w.gradients_bytes();
    auto* const value = reinterpret_cast<float*>(p.data());
    auto const* const gradient = reinterpret_cast<float const*>(g.data());
    for (std::size_t j = 0; j < p.size() / sizeof(float); ++j) value[j] -= float(lr * gradient[j]);
  }
  [[nodiscard]] moe::layer_stats stats(layer_t const& layer, moe::workspace ws,
                                       moe::index_t) const {
    return layer.stats(moe::host, ws);
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
  };

  cuda_place() {
    MOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream_.get, cudaStreamNonBlocking));
    MOE_CUBLAS_TRY(cublasSetStream(blas_.get(), stream_.get));  // for the SGD steps
  }

  using parameters = moe::device_parameters<layer_t, float>;

  [[nodiscard]] moe::cuda_backend backend() const { return {stream_.get, blas_.get()}; }
  [[nodiscard]] array make(moe::index_t count) const {
    return {moe::device_buffer<>(std::size_t(count) * sizeof(float), stream_.get)};
  }
  [[nodiscard]] parameters make_parameters(layer_t const& layer) const {
    return parameters(layer, stream_.get, {.biases = true});
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
  void sgd(parameters& w, double lr) const {  // every parameter at once: p += −lr · g
    auto const p = w.values_bytes(), g = w.gradients_bytes();
    float const step = float(-lr);
    MOE_CUBLAS_TRY(cublasSaxpy(blas_.get(), int(p.size() / sizeof(float)), &step,
                               reinterpret_cast<float const*>(g.data()), 1,
                               reinterpret_cast<float*>(p.data()), 1));
  }
  [[nodiscard]] moe::layer_stats stats(layer_t const& layer, moe::workspace ws,
                                       moe::index_t tokens) const {
    return layer.stats(backend(), ws, tokens);  // synchronises; in host memory
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

/// The command line: --steps N, --load-csv FILE.
struct options {
  int steps = 300;
  char const* load_csv = nullptr;  // each step's assignments per expert, for plot_load.py
};

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; i += 2) {
    std::string_view const flag = argv[i];
    char* end = nullptr;
    bool ok = i + 1 < argc;
    if (ok && flag == "--steps") {
      long const steps = std::strtol(argv[i + 1], &end, 10);
      ok = *end == '\0' && steps >= 1 && steps <= 1000000;
      o.steps = int(steps);
    } else if (ok && flag == "--load-csv") {
      o.load_csv = argv[i + 1];
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "usage: %s [--steps N] [--load-csv FILE]   (N ≥ 1, default 300)\n",
                   argv[0]);
      std::exit(EXIT_FAILURE);
    }
  }
  return o;
}

/// Writes one CSV row per step: step, then the assignments per expert (before drops), then
/// the drops per expert. scripts/plot_load.py renders it as a heat map.
class load_log {
 public:
  load_log(char const* path, moe::index_t experts) {
    if (path == nullptr) return;
    file_.reset(std::fopen(path, "w"));
    if (!file_) throw std::runtime_error(std::string("cannot write ") + path);
    std::fprintf(file_.get(), "step");
    for (moe::index_t e = 0; e < experts; ++e) std::fprintf(file_.get(), ",load_%d", int(e));
    for (moe::index_t e = 0; e < experts; ++e) std::fprintf(file_.get(), ",dropped_%d", int(e));
    std::fprintf(file_.get(), "\n");
  }
  [[nodiscard]] bool enabled() const { return file_ != nullptr; }
  void write(int step, moe::layer_stats const& s) {
    std::fprintf(file_.get(), "%d", step);
    for (auto v : s.load) std::fprintf(file_.get(), ",%lld", static_cast<long long>(v));
    for (auto v : s.dropped_per_expert)
      std::fprintf(file_.get(), ",%lld", static_cast<long long>(v));
    std::fprintf(file_.get(), "\n");
  }

 private:
  struct closer {
    void operator()(std::FILE* f) const { std::fclose(f); }
  };
  std::unique_ptr<std::FILE, closer> file_;
};

template <class Place>
int train(Place const& place, options const& o) {
  int const steps = o.steps;
  // Capacity factor 1: 2·⌊128/4⌋ = 64 slots per expert, so an unbalanced router drops
  // tokens. There is no residual path in this toy model, so a token that lost one of its two
  // experts gives full weight to the other (renormalised after drops), and a small aux loss
  // pushes the router towards balance.
  moe::layer_args const args{.gate = {.tokens = 128,
                                      .experts = 4,
                                      .capacity_factor = 1.0,
                                      .normalize = moe::gating::renormalize::after_drops,
                                      .aux_loss_coef = 0.01f},
                             .hidden = 32,
                             .ffn = 64};
  if (auto const s = layer_t::can_implement(args); !s) {
    std::fprintf(stderr, "cannot build the layer: %s\n", s.to_string().c_str());
    return EXIT_FAILURE;
  }
  layer_t const layer(args);
  auto const ws = place.workspace(layer);  // once; every call below runs in it

  random_source rng{std::mt19937_64(2024)};
  cluster_task const task(int(args.hidden), int(args.gate.experts), 0.5, rng);
  // Parameters and gradients, laid out from the layer: PyTorch's nn.Linear initialisation.
  auto w = place.make_parameters(layer);
  w.initialize(moe::initializer::torch_linear(), 2024);

  // The trainer's side in host memory; x, y, dy and dx also where the backend reads them.
  std::size_t const n = std::size_t(args.gate.tokens * args.hidden);
  std::vector<float> x(n), target(n), y(n), dy(n), eval_x(n), eval_target(n);
  auto x_at = place.make(n), y_at = place.make(n), dy_at = place.make(n), dx_at = place.make(n);
  auto in = [&](auto const& a) {
    return moe::make_view(static_cast<float const*>(a.data()), args.gate.tokens, args.hidden);
  };
  auto out = [&](auto& a) { return moe::make_view(a.data(), args.gate.tokens, args.hidden); };
  if (auto const s =
          layer.can_implement(place.backend(), in(x_at), w.params(), out(y_at), ws.view());
      !s) {
    std::fprintf(stderr, "cannot run the layer: %s\n", s.to_string().c_str());
    return EXIT_FAILURE;
  }
  auto forward = [&](std::vector<float> const& input) {  // y = layer(input)
    place.upload(input, x_at);
    layer.forward(place.backend(), in(x_at), w.params(), out(y_at), ws.view());
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
              layer.k(), int(place.stats(layer, ws.view(), args.gate.tokens).capacity), steps);
  if (!moe::optimized_build)
    std::printf("note: built without optimisation; the host backend runs many times slower\n");

  load_log log(o.load_csv, args.gate.experts);
  double const lr = 2.0;
  auto const started = std::chrono::steady_clock::now();
  for (int step = 1; step <= steps; ++step) {
    task.sample(rng, x, target);
    forward(x);
    double const loss = mse(y, target, dy);
    if (log.enabled()) log.write(step, place.stats(layer, ws.view(), args.gate.tokens));
    if (step == 1 || step % 25 == 0 || step == steps) {
      double const seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      std::printf("step %4d/%d  %5.1f s  mse %.4f  %s\n", step, steps, seconds, loss,
                  to_string(place.stats(layer, ws.view(), args.gate.tokens)).c_str());
    }
    // Gradients of mse + aux_loss_coef · aux: backward adds the aux term itself.
    place.upload(dy, dy_at);
    layer.backward(place.backend(), in(dy_at), w.params(), out(dx_at), w.gradients(), ws.view());
    place.sgd(w, lr);
  }
  double const final_loss = evaluate();

  // Specialisation: where the router sends each cluster's tokens now.
  for (int c = 0; c < task.clusters; ++c) {
    task.sample(rng, x, target, c);
    forward(x);
    std::printf("cluster %d goes to experts", c);
    for (auto load : place.stats(layer, ws.view(), args.gate.tokens).load)
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

int run(options const& o) {
  int const gpus = moe::cuda_device_count();
#if defined(__CUDACC__)
  if (gpus > 0) {
    cudaDeviceProp device{};
    MOE_CUDA_TRY(cudaGetDeviceProperties(&device, 0));
    std::printf("training on the CUDA backend (%s)\n", device.name);
    return train(cuda_place{}, o);
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
  return train(host_place{}, o);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (moe::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return EXIT_FAILURE;
  }
}
