// SPDX-License-Identifier: Apache-2.0
// The CUDA router against the host backend for every policy of the gating family and every
// preset, forward (every output of device_routing and the summary) and backward (d_logits,
// dx, dW_gate, with nonzero aux- and z-loss coefficients), with the testbed of
// router_gpu_support.hpp: dyadic inputs, and fresh ones wherever float could flip a decision
// that the host takes in double. Float elements, bfloat16 in a few cases. Skipped (exit 77)
// without a CUDA device.

#include "router_gpu_support.hpp"

#include <doctest/doctest.h>

#include <moe/core.hpp>
#include <moe/gating.hpp>
#include <moe/gating/kernels/router.cuh>

namespace {

using namespace moe;
using namespace moe::test::router_testbed;
using gating::renormalize;

renormalize const every_renormalization[] = {renormalize::none, renormalize::before_drops,
                                             renormalize::after_drops};

}  // namespace

TEST_CASE("CUDA route matches the host with sigmoid scores, without and with an expert bias") {
  cuda_context cuda;
  using any_t = gating::top_any<gating::sigmoid>;
  using top2_t = gating::top_k<2, gating::sigmoid>;
  float const factors[] = {1.25f, 0.5f, 0.0f};
  int index = 0;
  for (index_t experts : {8, 64, 256})
    for (int k : {1, 2, 8})
      for (float bias : {0.0f, 0.1f}) {
        case_config const c{.tokens = 128,
                            .experts = experts,
                            .hidden = 8,
                            .k = k,
                            .factor = factors[index % 3],
                            .normalize = every_renormalization[index / 2 % 3],
                            .bias = bias};
        if (k == 2 && index % 2 == 0)
          compare_with_host<top2_t, float>(cuda, top2_t{}, c);
        else
          compare_with_host<any_t, float>(cuda, any_t{}, c);
        ++index;
      }
  // bfloat16, and a scaling factor.
  compare_with_host<any_t, __nv_bfloat16>(cuda, any_t{},
                                          {.tokens = 300,
                                           .experts = 64,
                                           .hidden = 64,
                                           .k = 8,
                                           .factor = 0.5f,
                                           .normalize = renormalize::before_drops,
                                           .scaling = 2.5f,
                                           .bias = 0.05f});
}

TEST_CASE("CUDA route matches the host with softmax over the selected logits (softmax_topk)") {
  cuda_context cuda;
  using any_t = gating::top_any<gating::softmax_topk>;
  using top2_t = gating::top_k<2, gating::softmax_topk>;
  // normalize none becomes before_drops; after_drops stays.
  for (renormalize mode : {renormalize::none, renormalize::after_drops})
    for (auto [experts, k] : {std::pair{index_t{8}, 1}, std::pair{index_t{8}, 2},
                              std::pair{index_t{64}, 4}, std::pair{index_t{64}, 8}})
      compare_with_host<any_t, float>(cuda, any_t{},
                                      {.tokens = 200,
                                       .experts = experts,
                                       .hidden = 8,
                                       .k = k,
                                       .factor = 0.5f,
                                       .normalize = mode});
  compare_with_host<top2_t, float>(
      cuda, top2_t{}, {.tokens = 300, .experts = 16, .hidden = 8, .k = 2, .factor = 0.0f});
}

TEST_CASE("CUDA route matches the host under group-limited selection") {
  cuda_context cuda;
  using deepseek_t = gating::with<gating::top_k<8, gating::sigmoid>, gating::group_limited<8, 4>>;
  using quarter_t = gating::with<gating::top_k<4, gating::softmax>, gating::group_limited<4, 2>>;
  using fixed_t = gating::with<gating::top_any<gating::sigmoid>, gating::group_limited<2, 1, 4>>;
  using top_two_t = gating::with<gating::top_any<gating::sigmoid>,
                                 gating::group_limited<8, 2, 0, gating::top_two_group_score>>;
  for (float bias : {0.0f, 0.1f}) {
    for (index_t experts : {64, 256})
      compare_with_host<deepseek_t, float>(cuda, deepseek_t{},
                                           {.tokens = 128,
                                            .experts = experts,
                                            .hidden = 8,
                                            .k = 8,
                                            .factor = experts == 64 ? 0.5f : 0.0f,
                                            .normalize = renormalize::before_drops,
                                            .scaling = 2.5f,
                                            .bias = bias});
    // Softmax scores are about 1/E: a bias of the same order changes selections.
    compare_with_host<quarter_t, float>(cuda, quarter_t{},
                                        {.tokens = 200,
                                         .experts = 16,
                                         .hidden = 8,
                                         .k = 4,
                                         .factor = 1.0f,
                                         .normalize = renormalize::after_drops,
                                         .bias = bias / 16});
    for (int k : {1, 2})
      compare_with_host<fixed_t, float>(
          cuda, fixed_t{},
          {.tokens = 100, .experts = 4, .hidden = 8, .k = k, .factor = -1.5f, .bias = bias});
    // DeepSeek-V3's own group score (the top 2 of a group whatever k), at k where it differs
    // from Megatron's ⌊k/M⌋, and renormalised at k = 1 as deepseek_native does.
    for (int k : {1, 2, 6})
      compare_with_host<top_two_t, float>(cuda, top_two_t{},
                                          {.tokens = 150,
                                           .experts = 32,
                                           .hidden = 8,
                                           .k = k,
                                           .factor = 1.0f,
                                           .normalize = renormalize::before_drops,
                                           .scaling = 2.5f,
                                           .bias = bias});
  }
  compare_with_host<deepseek_t, __nv_bfloat16>(cuda, deepseek_t{},
                                               {.tokens = 64,
                                                .experts = 256,
                                                .hidden = 64,
                                                .k = 8,
                                                .factor = 1.0f,
                                                .normalize = renormalize::before_drops,
                                                .bias = 0.1f});
}

TEST_CASE("CUDA route matches the host under GShard's random routing") {
  cuda_context cuda;
  using top2_t = gating::with<gating::top_k<2>, gating::random_routing>;
  using any_t = gating::with<gating::top_any<>, gating::random_routing>;
  for (renormalize mode : every_renormalization) {
    // Training: some 2nd choices are left out, and they claim no slot.
    gating::routing_summary const trained = compare_with_host<top2_t, float>(
        cuda, top2_t{},
        {.tokens = 300, .experts = 8, .hidden = 8, .k = 2, .factor = 1.0f, .normalize = mode});
    CHECK(trained.unrouted > 0);
    // Evaluation: every 2nd choice is routed.
    gating::routing_summary const evaluated =
        compare_with_host<top2_t, float>(cuda, top2_t{},
                                         {.tokens = 300,
                                          .experts = 8,
                                          .hidden = 8,
                                          .k = 2,
                                          .normalize = mode,
                                          .training = false,
                                          .eval_factor = 0.5f});
    CHECK(evaluated.unrouted == 0);
  }
  gating::routing_summary const any = compare_with_host<any_t, float>(
      cuda, any_t{}, {.tokens = 200, .experts = 16, .hidden = 8, .k = 2, .factor = 0.0f});
  CHECK(any.unrouted > 0);
}

TEST_CASE("CUDA route and route_backward match the host with gate noise and jitter") {
  cuda_context cuda;
  using any_t = gating::top_any<>;
  using top2_t = gating::top_k<2>;
  for (index_t experts : {8, 64}) {
    case_config const base{.tokens = 200,
                           .experts = experts,
                           .hidden = 8,
                           .k = 2,
                           .factor = 1.0f,
                           .normalize = renormalize::before_drops};
    case_config noise = base;
    noise.gate_noise = 1.0f;
    compare_with_host<any_t, float>(cuda, any_t{}, noise);
    case_config logits = base;
    logits.jitter = 0.1f;
    logits.jitter_on = gating::jitter_target::logits;
    compare_with_host<top2_t, float>(cuda, top2_t{}, logits);
    case_config input = base;
    input.jitter = 0.1f;
    input.jitter_on = gating::jitter_target::input;
    compare_with_host<any_t, float>(cuda, any_t{}, input);
    compare_with_host<any_t, __nv_bfloat16>(cuda, any_t{}, input);
    // All together, and in evaluation none of it.
    case_config both = logits;
    both.gate_noise = 0.5f;
    both.k = 1;
    compare_with_host<any_t, float>(cuda, any_t{}, both);
    both.training = false;
    compare_with_host<any_t, float>(cuda, any_t{}, both);
    input.training = false;
    compare_with_host<any_t, __nv_bfloat16>(cuda, any_t{}, input);
  }
  // Noise on sigmoid scores with an expert bias.
  using sigmoid_t = gating::top_any<gating::sigmoid>;
  compare_with_host<sigmoid_t, float>(cuda, sigmoid_t{},
                                      {.tokens = 200,
                                       .experts = 64,
                                       .hidden = 8,
                                       .k = 8,
                                       .factor = 0.0f,
                                       .normalize = renormalize::before_drops,
                                       .jitter = 0.05f,
                                       .jitter_on = gating::jitter_target::logits,
                                       .gate_noise = 2.0f,
                                       .bias = 0.1f});
}

TEST_CASE("CUDA route matches the host with local groups under each aux loss") {
  cuda_context cuda;
  using gshard_aux_t = gating::top_any<>;
  using switch_aux_t = gating::with<gating::top_any<>, gating::switch_aux>;
  using sequence_aux_t = gating::with<gating::top_any<>, gating::sequence_aux>;
  // Dropping factors, dynamic (0) and dynamic capped (< 0).
  float const factors[] = {0.5f, 1.0f, 0.0f, -1.5f};
  int index = 0;
  for (index_t groups : {2, 4})
    for (float factor : factors) {
      case_config const c{.tokens = 256,
                          .experts = 16,
                          .hidden = 8,
                          .k = index % 3 == 2 ? 1 : 2,
                          .factor = factor,
                          .alignment = index % 2 == 0 ? 1 : 4,
                          .normalize = every_renormalization[index % 3],
                          .groups = groups};
      compare_with_host<gshard_aux_t, float>(cuda, gshard_aux_t{}, c);
      compare_with_host<switch_aux_t, float>(cuda, switch_aux_t{}, c);
      compare_with_host<sequence_aux_t, float>(cuda, sequence_aux_t{}, c);
      ++index;
    }
  // Another capacity rule per group, and local groups of a single token.
  using gshard_t = gating::with<gating::top_k<2>, gating::gshard_capacity>;
  compare_with_host<gshard_t, float>(
      cuda, gshard_t{},
      {.tokens = 300, .experts = 8, .hidden = 8, .k = 2, .factor = 2.0f, .groups = 3});
  compare_with_host<sequence_aux_t, float>(
      cuda, sequence_aux_t{},
      {.tokens = 8, .experts = 8, .hidden = 8, .k = 2, .factor = 0.0f, .groups = 8});
}

TEST_CASE("CUDA route matches the host under by_score, batch_prioritized and random_order") {
  cuda_context cuda;
  using by_score_t = gating::top_any<gating::softmax, gating::by_score>;
  using batch_t = gating::top_any<gating::softmax, gating::batch_prioritized>;
  using random_t = gating::top_any<gating::softmax, gating::random_order>;
  int index = 0;
  for (int k : {1, 2, 4})
    for (float factor : {0.5f, 0.75f}) {
      case_config const c{.tokens = 128,
                          .experts = 8,
                          .hidden = 8,
                          .k = k,
                          .factor = factor,
                          .normalize = every_renormalization[index % 3],
                          .scaling = index % 2 == 0 ? 1.0f : 2.5f,
                          .groups = index % 4 == 3 ? 2 : 1};
      compare_with_host<by_score_t, float>(cuda, by_score_t{}, c);
      compare_with_host<batch_t, float>(cuda, batch_t{}, c);
      compare_with_host<random_t, float>(cuda, random_t{}, c);
      ++index;
    }
  // by_score on sigmoid weights.
  using sigmoid_t = gating::top_any<gating::sigmoid, gating::by_score>;
  compare_with_host<sigmoid_t, float>(
      cuda, sigmoid_t{}, {.tokens = 128, .experts = 16, .hidden = 8, .k = 2, .factor = 0.5f});
}

TEST_CASE("CUDA route and route_backward match the host under switch_aux and sequence_aux") {
  cuda_context cuda;
  using switch_t = gating::with<gating::top_any<>, gating::switch_aux>;
  using sequence_t = gating::with<gating::top_any<>, gating::sequence_aux>;
  using sigmoid_switch_t = gating::with<gating::top_any<gating::sigmoid>, gating::switch_aux>;
  using sigmoid_sequence_t = gating::with<gating::top_any<gating::sigmoid>, gating::sequence_aux>;
  for (index_t groups : {1, 4}) {
    case_config const c{.tokens = 256,
                        .experts = 32,
                        .hidden = 8,
                        .k = 4,
                        .factor = 1.0f,
                        .normalize = renormalize::before_drops,
                        .aux_coef = 0.75f,
                        .groups = groups};
    compare_with_host<switch_t, float>(cuda, switch_t{}, c);
    compare_with_host<sequence_t, float>(cuda, sequence_t{}, c);
    compare_with_host<sigmoid_switch_t, float>(cuda, sigmoid_switch_t{}, c);
    compare_with_host<sigmoid_sequence_t, float>(cuda, sigmoid_sequence_t{}, c);
  }
}

TEST_CASE("CUDA route and route_backward match the host for every preset") {
  cuda_context cuda;
  // T = 7: one local group; T = 300: several where the preset averages per group.
  for (index_t tokens : {7, 300}) {
    bool const mid = tokens > 7;
    index_t const groups = mid ? 2 : 1;
    compare_with_host<gating::preset::gshard, float>(
        cuda, {},
        {.tokens = tokens, .experts = 8, .hidden = 8, .k = 2, .factor = 2.0f, .groups = groups});
    for (int k : {1, 2})
      compare_with_host<gating::preset::tutel, float>(
          cuda, {}, {.tokens = tokens, .experts = 16, .hidden = 8, .k = k, .factor = 1.0f});
    compare_with_host<gating::preset::deepspeed, float>(
        cuda, {},
        {.tokens = tokens, .experts = 8, .hidden = 8, .k = 1, .factor = 1.0f, .min_capacity = 2});
    compare_with_host<gating::preset::deepspeed_top2, float>(
        cuda, {}, {.tokens = tokens, .experts = 8, .hidden = 8, .k = 2, .factor = 1.0f});
    compare_with_host<gating::preset::megatron, float>(
        cuda, {},
        {.tokens = tokens, .experts = 8, .hidden = 8, .k = 2, .factor = 1.0f, .scaling = 2.0f});
    compare_with_host<gating::preset::switch_transformer, float>(cuda, {},
                                                                 {.tokens = tokens,
                                                                  .experts = 8,
                                                                  .hidden = 8,
                                                                  .k = 1,
                                                                  .factor = 1.25f,
                                                                  .groups = groups,
                                                                  .jitter = 0.01f});
    compare_with_host<gating::preset::mixtral, float>(
        cuda, {}, {.tokens = tokens, .experts = 8, .hidden = 8, .k = 2});
    compare_with_host<gating::preset::deepseek_v3, float>(cuda, {},
                                                          {.tokens = tokens,
                                                           .experts = mid ? 256 : 64,
                                                           .hidden = 8,
                                                           .k = 8,
                                                           .scaling = 2.5f,
                                                           .groups = groups,
                                                           .bias = 0.1f});
    compare_with_host<gating::preset::qwen3, float>(
        cuda, {}, {.tokens = tokens, .experts = 64, .hidden = 8, .k = 8});
  }
  // bfloat16 x and W_gate.
  compare_with_host<gating::preset::mixtral, __nv_bfloat16>(
      cuda, {}, {.tokens = 300, .experts = 8, .hidden = 64, .k = 2});
  compare_with_host<gating::preset::deepseek_v3, __nv_bfloat16>(
      cuda, {},
      {.tokens = 300, .experts = 64, .hidden = 64, .k = 8, .scaling = 2.5f, .bias = 0.1f});
}

TEST_CASE("CUDA top_any: one carve for the largest k serves calls whose k and T vary") {
  // Routing state and scratch are sized once, for T = 96 and k = 8 (the issue's rule: no
  // reallocation beyond workspace_bytes); then calls with other k and T route into the same
  // memory and match the host call for call.
  cuda_context cuda;
  cudaStream_t const stream = cuda.stream;
  index_t const max_tokens = 96, E = 16, H = 8;
  int const max_k = 8;
  gating::top_any<> const gate;
  gating::gate_args sizing{
      .tokens = max_tokens, .experts = E, .k = max_k, .capacity_factor = 0.75f};
  workspace_carver counter;
  (void)gating::carve_device_routing(counter, max_tokens, max_k, max_tokens, E, max_k);
  device_buffer<> routing_memory(counter.bytes(), stream);
  device_buffer<> scratch(gating::route_workspace_bytes(gate, sizing), stream);

  std::mt19937_64 rng(test::fresh_seed());
  for (auto [tokens, k] : {std::pair<index_t, int>{96, 8}, {96, 1}, {40, 3}, {77, 5}, {96, 8}}) {
    INFO("T " << tokens << ", k " << k);
    gating::gate_args args = sizing;
    args.k = k;
    test::host_tensor<float> x(tokens * H), w(H * E);
    fill_x(x, rng);
    fill_w(w, H, rng);

    owned_host_routing host_state(tokens, E, k);
    gating::host_routing& hr = host_state.r;
    gating::routing_summary const expected =
        gating::route(host_backend{}, gate, args, x.cview(tokens, H), w.cview(H, E), hr);

    device_array const x_dev(x.data, stream);
    device_array const w_dev(w.data, stream);
    poison(routing_memory.view().data(), routing_memory.size(), stream);
    workspace_carver carver(routing_memory.view());
    gating::device_routing r =
        gating::carve_device_routing(carver, max_tokens, max_k, tokens, E, k);
    gating::route(cuda.backend(), gate, args, x_dev.cview(tokens, H), w_dev.cview(H, E), r,
                  scratch.view());
    gating::routing_summary const got = gating::read_summary(cuda.backend(), r);
    check_equal("expert", download(r.expert, stream), host_copy(hr.expert));
    check_equal("slot", download(r.slot, stream), host_copy(hr.slot));
    check_equal("load", download(r.load, stream), host_copy(hr.load));
    check_close("weight", to_doubles(download(r.weight, stream)), to_doubles(hr.weight), k, 1e-5);
    CHECK(got.capacity == expected.capacity);
    CHECK(got.dropped == expected.dropped);
  }
}

TEST_CASE("CUDA route ranks logits where rounding merges scores, as the host does") {
  // One token, H = 1, x = 1: the logits are W_gate's row. σ(40) = σ(50) = 1 in double (and
  // float), exp(−800) = exp(−900) = 0: both backends rank the logits.
  cuda_context cuda;
  cudaStream_t const stream = cuda.stream;
  auto selected = [&](auto gate, std::vector<float> const& logits, int k) {
    index_t const E = static_cast<index_t>(logits.size());
    gating::gate_args const args{.tokens = 1, .experts = E, .capacity_factor = 1.0f};
    std::vector<float> const x{1.0f};
    owned_host_routing host_state(1, E, k);
    gating::host_routing& hr = host_state.r;
    (void)gating::route(host_backend{}, gate, args, make_view(x.data(), 1, 1),
                        make_view(logits.data(), 1, E), hr);

    device_array const x_dev(x, stream), w_dev(logits, stream);
    workspace_carver counter;
    (void)gating::carve_device_routing(counter, 1, 1, E, k);
    device_buffer<> memory(counter.bytes(), stream);
    poison(memory.view().data(), memory.size(), stream);
    workspace_carver carver(memory.view());
    gating::device_routing r = gating::carve_device_routing(carver, 1, 1, E, k);
    device_buffer<> scratch(gating::route_workspace_bytes(gate, args), stream);
    gating::route(cuda.backend(), gate, args, x_dev.cview(1, 1), w_dev.cview(1, E), r,
                  scratch.view());
    std::vector<std::int32_t> const device = download(r.expert, stream);
    CHECK(device == host_copy(hr.expert));
    return device;
  };
  CHECK(selected(gating::top_k<1, gating::sigmoid>{}, {40, 50, 0, 0}, 1) ==
        std::vector<std::int32_t>{1});
  CHECK(selected(gating::top_k<2>{}, {0, -900, -800}, 2) == std::vector<std::int32_t>{0, 2});
}
