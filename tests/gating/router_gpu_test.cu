// SPDX-License-Identifier: Apache-2.0
// The CUDA router (gating/kernels/router.cuh, slots.cuh) against the host backend
// (gating/router.hpp) over shapes, element types, capacity rules, renormalisations and
// evaluation, with the testbed of router_gpu_support.hpp (dyadic inputs, every output
// compared); then determinism, slot assignment on skewed loads, and rejected arguments.
// router_policies_gpu_test.cu covers the other policies and the presets. Skipped (exit 77)
// without a CUDA device.

#include "../support/expect.hpp"
#include "../support/random.hpp"
#include "router_gpu_support.hpp"

#include <doctest/doctest.h>

#include <moe/core.hpp>
#include <moe/core/blas.hpp>
#include <moe/gating.hpp>
#include <moe/gating/kernels/router.cuh>
#include <moe/gating/kernels/slots.cuh>
#include <moe/gating/kernels/sort.cuh>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using namespace moe;
using namespace moe::test::router_testbed;
using test::host_tensor;

/// Routes with the gate that `k` and `use_static` ask for: top_k<2>/top_k<8> when static,
/// top_any otherwise.
template <class T>
void compare_any_gate(cuda_context& cuda, case_config const& c, bool use_static) {
  if (use_static && c.k == 2)
    compare_with_host<gating::top_k<2>, T>(cuda, gating::top_k<2>{}, c);
  else if (use_static && c.k == 8)
    compare_with_host<gating::top_k<8>, T>(cuda, gating::top_k<8>{}, c);
  else
    compare_with_host<gating::top_any<>, T>(cuda, gating::top_any<>{}, c);
}

}  // namespace

TEST_CASE("CUDA route and route_backward match the host over (T, E, k) at H = 8") {
  cuda_context cuda;
  // The options cycle from case to case, so that every capacity rule and renormalisation
  // meets several shapes: f = 0.5 overflows (drops), 0 is dynamic, −1.5 dynamic capped.
  float const factors[] = {1.25f, 0.5f, 0.0f, -1.5f, 2.0f};
  gating::renormalize const modes[] = {gating::renormalize::none, gating::renormalize::before_drops,
                                       gating::renormalize::after_drops};
  index_t const alignments[] = {1, 4};
  int index = 0;
  for (index_t tokens : {1, 7, 128, 4096})
    for (index_t experts : {1, 8, 64, 256})
      for (int k : {1, 2, 8}) {
        if (k > experts) continue;
        for_each_dtype([&](auto element) {
          using T = decltype(element);
          case_config const c{.tokens = tokens,
                              .experts = experts,
                              .hidden = 8,
                              .k = k,
                              .factor = factors[index % 5],
                              .alignment = alignments[index / 5 % 2],
                              .normalize = modes[index / 2 % 3]};
          compare_any_gate<T>(cuda, c, index % 2 == 0);
          ++index;
        });
      }
}

TEST_CASE("CUDA route and route_backward match the host at H = 1000 and 4096") {
  cuda_context cuda;
  struct shape {
    index_t tokens, experts, hidden;
    int k;
    float factor;
    gating::renormalize normalize;
  };
  shape const shapes[] = {
      {128, 64, 1000, 8, 0.5f, gating::renormalize::after_drops},
      {4096, 8, 1000, 2, 1.25f, gating::renormalize::before_drops},
      {7, 256, 4096, 8, 0.0f, gating::renormalize::none},
      {4096, 8, 4096, 2, 0.5f, gating::renormalize::after_drops},
  };
  for (shape const& s : shapes)
    for_each_dtype([&](auto element) {
      using T = decltype(element);
      compare_any_gate<T>(cuda,
                          {.tokens = s.tokens,
                           .experts = s.experts,
                           .hidden = s.hidden,
                           .k = s.k,
                           .factor = s.factor,
                           .normalize = s.normalize},
                          true);
    });
}

TEST_CASE("CUDA route handles many experts, E not a multiple of 32, and k = 32") {
  cuda_context cuda;
  // E = 33: one lane owns two experts; E = 3000 and 4099: lanes loop ~100 times.
  compare_with_host<gating::top_any<>, float>(cuda, gating::top_any<>{},
                                              {.tokens = 100, .experts = 33, .hidden = 8, .k = 32});
  compare_with_host<gating::top_any<>, __nv_bfloat16>(
      cuda, gating::top_any<>{},
      {.tokens = 64,
       .experts = 3000,
       .hidden = 8,
       .k = 32,
       .factor = 0.0f,
       .normalize = gating::renormalize::before_drops});
  compare_with_host<gating::top_k<8>, __half>(
      cuda, gating::top_k<8>{},
      {.tokens = 300, .experts = 4099, .hidden = 8, .k = 8, .factor = 0.5f});
  compare_with_host<gating::top_any<>, float>(cuda, gating::top_any<>{},
                                              {.tokens = 5, .experts = 40, .hidden = 8, .k = 31});
}

TEST_CASE("CUDA route matches the host under token-major priority") {
  cuda_context cuda;
  using gate_t = gating::top_any<gating::softmax, gating::token_major>;
  for (float factor : {0.5f, 0.0f})
    compare_with_host<gate_t, float>(cuda, gate_t{},
                                     {.tokens = 1000,
                                      .experts = 16,
                                      .hidden = 8,
                                      .k = 4,
                                      .factor = factor,
                                      .normalize = gating::renormalize::after_drops});
}

TEST_CASE("CUDA route matches the host under other capacity rules, scaling and evaluation") {
  cuda_context cuda;
  case_config const c{.tokens = 500,
                      .experts = 16,
                      .hidden = 8,
                      .k = 2,
                      .factor = 1.0f,
                      .normalize = gating::renormalize::before_drops,
                      .scaling = 2.5f};
  for (gating::renormalize mode : {gating::renormalize::before_drops,
                                   gating::renormalize::after_drops, gating::renormalize::none}) {
    case_config scaled = c;
    scaled.normalize = mode;
    compare_with_host<gating::top_k<2>, float>(cuda, gating::top_k<2>{}, scaled);
  }
  using gshard_t = gating::with<gating::top_k<2>, gating::gshard_capacity>;
  compare_with_host<gshard_t, __nv_bfloat16>(cuda, gshard_t{}, c);
  using megatron_t = gating::with<gating::top_any<>, gating::megatron_capacity>;
  compare_with_host<megatron_t, float>(
      cuda, megatron_t{}, {.tokens = 300, .experts = 8, .hidden = 8, .k = 8, .factor = 0.5f});
  using fixed_t = gating::with<gating::top_k<8>, gating::deepspeed_capacity,
                               gating::fixed_renormalization<gating::renormalize::after_drops>>;
  compare_with_host<fixed_t, __half>(
      cuda, fixed_t{}, {.tokens = 128, .experts = 64, .hidden = 8, .k = 8, .factor = 0.25f});
  using dropless_t = gating::with<gating::top_k<2>, gating::dropless>;
  compare_with_host<dropless_t, float>(cuda, dropless_t{}, c);
  // Sized for more tokens than the call's (expert parallelism with a different T per rank):
  // the capacity of 800 tokens, 100 slots where the call's 500 would give 64.
  case_config sized = c;
  sized.capacity_tokens = 800;
  compare_with_host<gating::top_k<2>, float>(cuda, gating::top_k<2>{}, sized);
  // Evaluation: the evaluation factor, which overflows here.
  case_config eval = c;
  eval.training = false;
  eval.eval_factor = 0.5f;
  compare_with_host<gating::top_k<2>, float>(cuda, gating::top_k<2>{}, eval);
}

TEST_CASE("CUDA route is deterministic: two calls give the same bytes") {
  cuda_context cuda;
  cudaStream_t const stream = cuda.stream;
  index_t const T_ = 4096, E = 64, H = 64;
  int const k = 2;
  gating::top_k<2> const gate;
  gating::gate_args const args{.tokens = T_,
                               .experts = E,
                               .capacity_factor = 0.5f,
                               .normalize = gating::renormalize::after_drops,
                               .aux_loss_coef = 0.5f,
                               .z_loss_coef = 0.25f};
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  host_tensor<__nv_bfloat16> x(T_ * H), w(H * E);
  x.randomize(rng);  // not dyadic: determinism must not depend on exact sums
  w.randomize(rng);
  device_array const x_dev(x.data, stream);
  device_array const w_dev(w.data, stream);
  workspace_carver counter;
  (void)gating::carve_device_routing(counter, T_, T_, E, k);
  device_buffer<> scratch(gating::route_workspace_bytes(gate, args), stream);
  std::vector<std::byte> first;
  for (int run = 0; run < 2; ++run) {
    device_buffer<> memory(counter.bytes(), stream);
    poison(memory.view().data(), memory.size(), stream);
    workspace_carver carver(memory.view());
    gating::device_routing r = gating::carve_device_routing(carver, T_, T_, E, k);
    gating::route(cuda.backend(), gate, args, x_dev.cview(T_, H), w_dev.cview(H, E), r,
                  scratch.view());
    auto bytes = download(memory.view().data(), static_cast<index_t>(memory.size()), stream);
    if (run == 0)
      first = std::move(bytes);
    else
      CHECK(bytes == first);
  }
}

TEST_CASE("CUDA assign_slots matches the host on skewed loads") {
  cuda_context cuda;
  cudaStream_t const stream = cuda.stream;
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (auto [tokens, experts, k, factor] : {std::tuple{index_t{1000}, index_t{5}, 3, 0.5f},
                                            std::tuple{index_t{70000}, index_t{300}, 4, 0.0f},
                                            std::tuple{index_t{1}, index_t{1}, 1, -1.5f},
                                            std::tuple{index_t{3}, index_t{2}, 2, 1.0f}}) {
    INFO("T " << tokens << ", E " << experts << ", k " << k << ", f " << factor);
    // Half of the assignments go to expert 0: one long segment, many short ones.
    std::uniform_int_distribution<std::int32_t> any(0, static_cast<std::int32_t>(experts - 1));
    std::bernoulli_distribution skew(0.5);
    std::vector<std::int32_t> expert(static_cast<std::size_t>(tokens * k));
    for (auto& e : expert) e = skew(rng) ? 0 : any(rng);
    std::vector<std::int64_t> slot(expert.size()), load(static_cast<std::size_t>(experts));
    gating::assign_slots(gating::choice_major{}, make_view(expert.data(), tokens, k),
                         make_view(slot.data(), tokens, k), make_view(load.data(), experts));
    gating::capacity_args const cap{
        .tokens = tokens, .experts = experts, .k = k, .factor = factor, .alignment = 2};
    std::int64_t const max_load = *std::max_element(load.begin(), load.end());
    std::int64_t const capacity = gating::resolve_capacity(cap, max_load);
    std::int64_t const dropped =
        std::count_if(slot.begin(), slot.end(), [&](std::int64_t s) { return s >= capacity; });

    workspace_carver counter;
    (void)gating::carve_device_routing(counter, tokens, tokens, experts, k);
    device_buffer<> memory(counter.bytes(), stream);
    poison(memory.view().data(), memory.size(), stream);
    workspace_carver carver(memory.view());
    gating::device_routing r = gating::carve_device_routing(carver, tokens, tokens, experts, k);
    MOE_CUDA_TRY(cudaMemcpyAsync(r.expert.data_handle(), expert.data(),
                                 expert.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice,
                                 stream));
    device_buffer<> scratch(gating::slots_workspace_bytes<gating::choice_major>(tokens, k, experts),
                            stream);
    gating::assign_slots(cuda.backend(), gating::choice_major{}, cap, r, scratch.view());
    check_equal("slot", download(r.slot, stream), slot);
    check_equal("load", download(r.load, stream), load);
    auto const scalars = download(r.scalars, 1, stream).front();
    CHECK(scalars.capacity == capacity);
    CHECK(scalars.max_load == max_load);
    CHECK(scalars.dropped == dropped);
  }
}

TEST_CASE("the radix sorts' scratch bound covers what CUB asks on this device") {
  auto covers = [](auto key, moe::index_t count, int end_bit) {
    using Key = decltype(key);
    cub::DoubleBuffer<Key> keys(nullptr, nullptr);
    cub::DoubleBuffer<std::int32_t> values(nullptr, nullptr);
    std::size_t needed = 0;
    MOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, needed, keys, values,
                                                 static_cast<int>(count), 0, end_bit));
    INFO(sizeof(Key) * 8 << "-bit keys, " << count << " pairs, " << end_bit << " bits");
    CHECK(needed <= gating::detail::sort_storage_bound<Key>(count, end_bit));
  };
  for (moe::index_t count : {1, 127, 4096, 100000, 1 << 20, 3 << 20}) {
    for (int end_bit : {1, 7, 8, 9, 17, 32}) covers(std::uint32_t{}, count, end_bit);
    for (int end_bit : {33, 48, 64}) covers(std::uint64_t{}, count, end_bit);
  }
}

TEST_CASE("CUDA route and route_backward reject bad arguments and write nothing") {
  cuda_context cuda;
  cudaStream_t const stream = cuda.stream;
  index_t const T_ = 16, E = 8, H = 32;
  int const k = 2;
  gating::top_any<> const gate;
  gating::gate_args const args{.tokens = T_, .experts = E, .k = k};
  std::mt19937_64 rng(1);
  host_tensor<float> x(T_ * H), w(H * (E + 1)), d_weight(T_ * k);
  x.randomize(rng);
  w.randomize(rng);
  d_weight.randomize(rng);
  device_array const x_dev(x.data, stream);
  device_array const w_dev(w.data, stream);
  device_array const d_weight_dev(d_weight.data, stream);

  workspace_carver counter;
  (void)gating::carve_device_routing(counter, T_, T_, E, k);
  device_buffer<> memory(counter.bytes(), stream);
  poison(memory.view().data(), memory.size(), stream);
  workspace_carver carver(memory.view());
  gating::device_routing r = gating::carve_device_routing(carver, T_, T_, E, k);
  std::size_t const scratch_bytes = gating::route_workspace_bytes(gate, args);
  device_buffer<> scratch(scratch_bytes, stream);
  poison(scratch.view().data(), scratch.size(), stream);
  auto const x_view = x_dev.cview(T_, H);
  auto const w_view = w_dev.cview(H, E);

  // can_implement names what route throws for, and a good call passes both.
  auto rejects = [&](cuda_backend backend, gating::gate_args const& a, auto w_gate,
                     gating::device_routing routing, workspace s, std::string const& argument) {
    CHECK(gating::can_implement(backend, gate, a, x_view, w_gate, routing, s).argument() ==
          argument);
    test::expect_rejected(
        [=]() mutable { gating::route(backend, gate, a, x_view, w_gate, routing, s); }, argument);
  };
  CHECK(gating::can_implement(cuda.backend(), gate, args, x_view, w_view, r, scratch.view()).ok());
  CHECK(gating::can_implement(cuda.backend(), gate, args, x_dev.cview(T_ - 1, H), w_view, r,
                              scratch.view())
            .argument() == "r.logits");
  // An empty call: the host router takes it, the CUDA one not yet, and says so.
  status const empty = gating::can_implement(cuda.backend(), gate, args, x_dev.cview(0, H), w_view,
                                             r, scratch.view());
  CHECK(empty.argument() == "x");
  CHECK(empty.message().find("CUDA router") != std::string::npos);
  gating::gate_args too_many = args;
  too_many.k = 9;  // k > E
  rejects(cuda.backend(), too_many, w_view, r, scratch.view(), "k");
  rejects(cuda.backend(), args, w_dev.cview(H, E + 1), r, scratch.view(), "w_gate");
  gating::device_routing short_r = r;
  short_r.logits = make_view(r.logits.data_handle(), T_ - 1, E);
  rejects(cuda.backend(), args, w_view, short_r, scratch.view(), "r.logits");
  rejects(cuda.backend(), args, w_view, r, scratch.view().first(scratch_bytes - 1), "scratch");
  rejects({stream, nullptr}, args, w_view, r, scratch.view(), "blas");
  gating::gate_args grouped = args;
  grouped.groups = 3;  // 16 tokens do not split into 3 local groups
  rejects(cuda.backend(), grouped, w_view, r, scratch.view(), "groups");
  gating::gate_args biased = args;
  biased.expert_bias = {w_dev.data(), static_cast<std::size_t>(E - 1)};  // one value short
  rejects(cuda.backend(), biased, w_view, r, scratch.view(), "expert_bias");
  CHECK(all_poisoned(download(memory.view().data(), static_cast<index_t>(memory.size()), stream)));
  CHECK(
      all_poisoned(download(scratch.view().data(), static_cast<index_t>(scratch.size()), stream)));

  // Backward: the outputs stay poisoned too.
  device_array<float> d_logits(T_ * E, stream);
  device_array<float> dx(T_ * H, stream), d_w_gate(H * E, stream);
  for (auto const* a : {&d_logits, &dx, &d_w_gate})
    poison(a->data(), static_cast<std::size_t>(a->count) * sizeof(float), stream);
  CHECK(gating::can_implement(cuda.backend(), gate, args, std::as_const(r),
                              d_weight_dev.cview(T_, k + 1), x_view, w_view, d_logits.view(T_, E),
                              dx.view(T_, H), d_w_gate.view(H, E), workspace{})
            .argument() == "d_weight");
  CHECK(gating::can_implement(cuda.backend(), gate, args, std::as_const(r),
                              d_weight_dev.cview(T_, k), x_view, w_view, d_logits.view(T_, E),
                              dx.view(T_, H), d_w_gate.view(H, E), workspace{})
            .ok());
  auto backward_with = [&](gating::gate_args const& a, matrix_view<float const> dw,
                           cuda_backend backend) {
    return [=, &r, &d_logits, &dx, &d_w_gate] {
      gating::route_backward(backend, gate, a, std::as_const(r), dw, x_view, w_view,
                             d_logits.view(T_, E), dx.view(T_, H), d_w_gate.view(H, E),
                             workspace{});
    };
  };
  test::expect_rejected(backward_with(args, d_weight_dev.cview(T_, k + 1), cuda.backend()),
                        "d_weight");
  test::expect_rejected(backward_with(too_many, d_weight_dev.cview(T_, k), cuda.backend()), "k");
  test::expect_rejected(backward_with(args, d_weight_dev.cview(T_, k), {stream, nullptr}), "blas");
  CHECK(all_poisoned(download(reinterpret_cast<std::byte const*>(d_logits.data()),
                              T_ * E * static_cast<index_t>(sizeof(float)), stream)));
  CHECK(all_poisoned(download(reinterpret_cast<std::byte const*>(dx.data()),
                              T_ * H * static_cast<index_t>(sizeof(float)), stream)));
  CHECK(all_poisoned(download(reinterpret_cast<std::byte const*>(d_w_gate.data()),
                              H * E * static_cast<index_t>(sizeof(float)), stream)));

  // half needs scratch for d_logits in half: none given is rejected.
  host_tensor<__half> xh(T_ * H), wh(H * E);
  xh.randomize(rng);
  wh.randomize(rng);
  device_array const xh_dev(xh.data, stream);
  device_array const wh_dev(wh.data, stream);
  device_array<__half> dxh(T_ * H, stream), dwh(H * E, stream);
  test::expect_rejected(
      [&] {
        gating::route_backward(cuda.backend(), gate, args, std::as_const(r),
                               d_weight_dev.cview(T_, k), xh_dev.cview(T_, H), wh_dev.cview(H, E),
                               d_logits.view(T_, E), dxh.view(T_, H), dwh.view(H, E), workspace{});
      },
      "scratch");
}
