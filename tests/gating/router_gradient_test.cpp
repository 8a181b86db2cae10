// SPDX-License-Identifier: Apache-2.0
// Finite-difference checks, in double precision, of the host router's backward on every
// differentiable axis: score functions, renormalisation before and after drops, the scaling
// factor, the aux losses (gshard, switch, sequence; per local group), the z-loss, the jitter
// of the input or the logits, the Gaussian logit noise, and the presets. The objective is
// ⟨d_weight, weight⟩ + aux_loss_coef · aux + z_loss_coef · z, its gradient taken into x and
// W_gate. A coordinate whose perturbation changes the routing (a selection or a slot) is
// skipped; the cases check that few are.

#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <moe/gating.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <random>
#include <vector>

using namespace moe;

namespace {

struct router_case {
  index_t tokens = 8, hidden = 5, experts = 4;
  std::uint64_t seed = 1;
};

template <class G>
void check_router_gradient(G const& gate, gating::gate_args args, router_case const& c) {
  index_t const T = c.tokens, H = c.hidden, E = c.experts;
  args.tokens = T;
  args.experts = E;
  int const k = gate.k(args);
  INFO("seed " << c.seed);
  std::mt19937_64 rng(c.seed);
  test::host_tensor<double> x(T * H), w(H * E), d_weight(T * k), dx(T * H), dw(H * E),
      d_logits(T * E);
  x.randomize(rng, 1.0);
  w.randomize(rng, 1.0);
  d_weight.randomize(rng, 1.0);

  workspace_carver counter;
  (void)gating::carve_host_routing(counter, T, T, E, k);
  host_buffer buffer(counter.bytes());
  workspace_carver carver(buffer.view());
  gating::host_routing r = gating::carve_host_routing(carver, T, T, E, k);

  auto const objective = [&] {
    auto const s = gating::route(host, gate, args, x.cview(T, H), w.cview(H, E), r);
    double sum = 0;
    for (index_t t = 0; t < T; ++t)
      for (int j = 0; j < k; ++j)
        sum += d_weight.data[static_cast<std::size_t>(t * k + j)] * r.weight(t, j);
    return sum + static_cast<double>(args.aux_loss_coef) * s.aux_loss +
           static_cast<double>(args.z_loss_coef) * s.z_loss;
  };
  auto const routing = [&] {
    std::vector<std::int64_t> v;
    for (index_t t = 0; t < T; ++t)
      for (int j = 0; j < k; ++j) {
        v.push_back(r.expert(t, j));
        v.push_back(r.slot(t, j));
      }
    return v;
  };

  (void)objective();
  auto const reference = routing();
  std::fill(dx.data.begin(), dx.data.end(), 0.0);
  gating::route_backward(host, gate, args, r, d_weight.cview(T, k), x.cview(T, H), w.cview(H, E),
                         d_logits.view(T, E), dx.view(T, H), dw.view(H, E));

  double const eps = 1e-6;
  int checked = 0, skipped = 0;
  auto const numeric = [&](double& v, double analytic, char const* what, std::size_t i) {
    double const saved = v;
    v = saved + eps;
    double const up = objective();
    bool same = routing() == reference;
    v = saved - eps;
    double const down = objective();
    same = same && routing() == reference;
    v = saved;
    if (!same) {
      ++skipped;
      return;
    }
    ++checked;
    double const n = (up - down) / (2 * eps);
    double const scale = std::max({1.0, std::abs(analytic), std::abs(n)});
    INFO(what << "[" << i << "]: analytic " << analytic << ", numeric " << n);
    CHECK(std::abs(analytic - n) <= 1e-6 * scale);
  };
  for (std::size_t i = 0; i < w.data.size(); ++i) numeric(w.data[i], dw.data[i], "d_w_gate", i);
  for (std::size_t i = 0; i < x.data.size(); ++i) numeric(x.data[i], dx.data[i], "dx", i);
  CHECK(checked > 0);
  CHECK(skipped * 10 <= checked);
}

}  // namespace

TEST_CASE("router backward: softmax, renormalisation, scaling, drops, aux and z-loss") {
  gating::gate_args args{.capacity_factor = 0.5f, .aux_loss_coef = 0.3f, .z_loss_coef = 0.2f};
  for (auto normalize : {gating::renormalize::none, gating::renormalize::before_drops,
                         gating::renormalize::after_drops}) {
    CAPTURE(static_cast<int>(normalize));
    args.normalize = normalize;
    args.scaling_factor = 1.0f;
    check_router_gradient(gating::top_k<2>{}, args, {});
    args.scaling_factor = 2.5f;
    check_router_gradient(gating::top_k<2, gating::softmax_topk>{}, args, {.seed = 2});
    check_router_gradient(gating::top_k<2, gating::sigmoid>{}, args, {.seed = 3});
  }
}

TEST_CASE("router backward: sigmoid with a selection bias, and every aux loss per group") {
  std::array<float, 4> const bias{0.3f, -0.2f, 0.1f, 0.0f};
  gating::gate_args args{.capacity_factor = 0.75f,
                         .normalize = gating::renormalize::before_drops,
                         .aux_loss_coef = 0.5f,
                         .z_loss_coef = 0.1f,
                         .groups = 2,
                         .scaling_factor = 1.5f,
                         .expert_bias = bias};
  using sig = gating::top_k<2, gating::sigmoid>;
  check_router_gradient(gating::with<sig, gating::gshard_aux>{}, args, {.seed = 4});
  check_router_gradient(gating::with<sig, gating::switch_aux>{}, args, {.seed = 5});
  check_router_gradient(gating::with<sig, gating::sequence_aux>{}, args, {.seed = 6});
  check_router_gradient(gating::with<gating::top_k<2>, gating::sequence_aux>{}, args, {.seed = 7});
  args.groups = 4;
  check_router_gradient(gating::with<gating::top_any<>, gating::switch_aux>{},
                        [&] {
                          auto a = args;
                          a.k = 3;
                          return a;
                        }(),
                        {.seed = 8});
}

TEST_CASE("router backward: jitter of the input or the logits, and Gaussian logit noise") {
  gating::gate_args args{.capacity_factor = 0.75f,
                         .normalize = gating::renormalize::after_drops,
                         .aux_loss_coef = 0.2f,
                         .z_loss_coef = 0.3f,
                         .jitter = 0.3f,
                         .seed = 99};
  check_router_gradient(gating::top_k<2>{}, args, {.seed = 10});
  args.jitter_on = gating::jitter_target::logits;
  check_router_gradient(gating::top_k<2>{}, args, {.seed = 11});
  args.jitter = 0;
  args.gate_noise = 2.0f;
  check_router_gradient(gating::top_k<2, gating::sigmoid>{}, args, {.seed = 12});
}

TEST_CASE("router backward: the presets") {
  gating::gate_args args{.capacity_factor = 1.5f, .aux_loss_coef = 0.25f, .z_loss_coef = 0.1f};
  check_router_gradient(gating::preset::tutel{},
                        [&] {
                          auto a = args;
                          a.k = 2;
                          return a;
                        }(),
                        {.seed = 20});
  check_router_gradient(gating::preset::deepspeed{}, args, {.seed = 21});
  check_router_gradient(gating::preset::deepspeed_top2{}, args, {.seed = 22});
  check_router_gradient(gating::preset::megatron{}, args, {.seed = 23});
  check_router_gradient(gating::preset::switch_transformer{}, args, {.seed = 24});
  check_router_gradient(gating::preset::mixtral{}, args, {.seed = 25});
  auto grouped = args;
  grouped.capacity_factor = 2.0f;
  grouped.groups = 2;
  grouped.seed = 5;  // random routing of the 2nd expert in training
  check_router_gradient(gating::preset::gshard{}, grouped, {.seed = 26});
  std::array<float, 4> const bias{0.0f, 0.2f, -0.1f, 0.05f};
  auto biased = args;
  biased.scaling_factor = 2.5f;
  biased.expert_bias = bias;
  check_router_gradient(gating::preset::deepseek<2, 2, 1>{}, biased, {.seed = 27});
  std::array<float, 16> const wide_bias{0.1f, 0.0f, 0.0f, 0.2f};
  biased.expert_bias = wide_bias;
  check_router_gradient(gating::preset::deepseek_v3{}, biased,
                        {.tokens = 4, .hidden = 3, .experts = 16, .seed = 28});
  check_router_gradient(gating::preset::qwen3{}, args,
                        {.tokens = 4, .hidden = 3, .experts = 10, .seed = 29});
}
