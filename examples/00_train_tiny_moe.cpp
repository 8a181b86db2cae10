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
// It runs on the host backend and needs no GPU.   Usage: 00_train_tiny_moe [--steps N]

#include <moe/moe.hpp>

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
struct ffn_layer_tensors {
  moe::layer_args args;
  std::vector<float> gate_weight, w1, b1, w2, b2;

  explicit ffn_layer_tensors(moe::layer_args const& a)
      : args(a),
        gate_weight(a.hidden * a.experts),
        w1(a.experts * a.hidden * a.ffn),
        b1(a.experts * a.ffn),
        w2(a.experts * a.ffn * a.hidden),
        b2(a.experts * a.hidden) {}

  std::array<std::vector<float>*, 5> all() { return {&gate_weight, &w1, &b1, &w2, &b2}; }

  template <class T>  // float const for parameters, float for gradients
  moe::layer_params<T, expert_t> views() {
    auto const [h, f, e] = std::array{args.hidden, args.ffn, args.experts};
    return {moe::make_view<T>(gate_weight.data(), h, e),
            {moe::make_view<T>(w1.data(), e, h, f), moe::make_view<T>(b1.data(), e, f),
             moe::make_view<T>(w2.data(), e, f, h), moe::make_view<T>(b2.data(), e, h)}};
  }
};

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

int run(int steps) {
  if (int const gpus = moe::cuda_device_count(); gpus > 0)
    std::printf(
        "found %d CUDA device(s), but this version of moe has no CUDA backend yet: "
        "training on the host backend\n",
        gpus);

  // Capacity factor 1: 2·⌊128/4⌋ = 64 slots per expert, so an unbalanced router drops
  // tokens. There is no residual path in this toy model, so a token that lost one of its two
  // experts gives full weight to the other (renormalised after drops), and a small aux loss
  // pushes the router towards balance.
  moe::layer_args const args{.tokens = 128,
                             .hidden = 32,
                             .ffn = 64,
                             .experts = 4,
                             .capacity_factor = 1.0f,
                             .normalize = moe::gating::renormalize::after_drops,
                             .aux_loss_coef = 0.01f};
  if (auto const s = layer_t::can_implement(args); !s) {
    std::fprintf(stderr, "cannot build the layer: '%s' %s\n", s.argument().c_str(),
                 s.message().c_str());
    return EXIT_FAILURE;
  }
  layer_t const layer(args);
  moe::host_buffer ws(layer.workspace_bytes(moe::host));

  random_source rng{std::mt19937_64(2024)};
  cluster_task const task(int(args.hidden), int(args.experts), 0.5, rng);
  ffn_layer_tensors params(args), grads(args);
  double const init[] = {1.0, 1.0, 0.0, 0.5, 0.0};  // gate, w1, b1, w2, b2: × 1/√fan-in
  double const fan_in[] = {double(args.hidden), double(args.hidden), 1, double(args.ffn), 1};
  for (std::size_t i = 0; i < 5; ++i)
    for (auto& v : *params.all()[i]) v = float(init[i] * rng.normal() / std::sqrt(fan_in[i]));

  std::size_t const n = std::size_t(args.tokens * args.hidden);
  std::vector<float> x(n), target(n), y(n), dy(n), dx(n), eval_x(n), eval_target(n);
  auto matrix = [&](auto* data) { return moe::make_view(data, args.tokens, args.hidden); };
  auto const p = params.views<float const>();  // (the vectors never reallocate)
  auto const g = grads.views<float>();
  float const* const x_data = x.data();
  if (auto const s = layer.can_implement(matrix(x_data), p, matrix(y.data()), ws.view()); !s) {
    std::fprintf(stderr, "cannot run the layer: '%s' %s\n", s.argument().c_str(),
                 s.message().c_str());
    return EXIT_FAILURE;
  }

  // A held-out batch, the same before and after training, measures progress.
  task.sample(rng, eval_x, eval_target);
  auto evaluate = [&] {
    layer.forward(moe::host, matrix(std::as_const(eval_x).data()), p, matrix(y.data()), ws.view());
    return mse(y, eval_target, dy);
  };
  double const initial_loss = evaluate();
  std::printf("training: T=%d H=%d F=%d E=%d k=%d, capacity %d per expert, %d steps\n",
              int(args.tokens), int(args.hidden), int(args.ffn), int(args.experts), layer.k(),
              int(layer.stats(moe::host, ws.view()).capacity), steps);

  double const lr = 2.0;
  auto const p_all = params.all(), g_all = grads.all();
  for (int step = 1; step <= steps; ++step) {
    task.sample(rng, x, target);
    layer.forward(moe::host, matrix(x_data), p, matrix(y.data()), ws.view());
    double const loss = mse(y, target, dy);
    if (step == 1 || step % 25 == 0 || step == steps) {
      moe::layer_stats const stats = layer.stats(moe::host, ws.view());
      std::printf("step %4d  mse %.4f  aux %.3f  dropped %3d  assignments per expert", step, loss,
                  stats.aux_loss, int(stats.dropped));
      for (auto load : stats.load) std::printf(" %4d", int(load));
      std::printf("\n");
    }
    // Gradients of mse + aux_loss_coef · aux: backward adds the aux term itself.
    layer.backward(moe::host, matrix(std::as_const(dy).data()), p, matrix(dx.data()), g, ws.view());
    for (std::size_t i = 0; i < p_all.size(); ++i)  // plain SGD
      for (std::size_t j = 0; j < p_all[i]->size(); ++j)
        (*p_all[i])[j] -= float(lr * (*g_all[i])[j]);
  }
  double const final_loss = evaluate();

  // Specialisation: where the router sends each cluster's tokens now.
  for (int c = 0; c < task.clusters; ++c) {
    task.sample(rng, x, target, c);
    layer.forward(moe::host, matrix(x_data), p, matrix(y.data()), ws.view());
    std::printf("cluster %d goes to experts", c);
    for (auto load : layer.stats(moe::host, ws.view()).load) std::printf(" %4d", int(load));
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

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_steps(argc, argv));
  } catch (moe::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return EXIT_FAILURE;
  }
}
