// SPDX-License-Identifier: Apache-2.0
// The rules of gating: every policy and preset models its concept (namespace-scope
// static_asserts with near-misses), and every illegal run-time value is rejected by
// can_implement, naming the argument, before the router touches any memory. The static
// rules have compile-fail tests in tests/compile_fail/gating_*.cu and layer_dropless_*.cu.

#include "../support/expect.hpp"
#include "hand_router.hpp"

#include <doctest/doctest.h>

#include <moe/gating.hpp>
#include <moe/layer/concepts.hpp>
#include <moe/layout/capacity.hpp>
#include <moe/layout/ragged.hpp>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

using namespace moe;

// --- every gate policy is a gate; near-misses are not ------------------------------------
static_assert(gating::gate<gating::top_k<2, gating::softmax_topk, gating::token_major>>);
static_assert(gating::gate<gating::top_any<gating::sigmoid, gating::by_score>>);
static_assert(gating::gate<gating::top_k<1, gating::softmax, gating::random_order>>);
static_assert(gating::gate<gating::top_k<2, gating::softmax, gating::batch_prioritized>>);
static_assert(gating::gate<gating::with<gating::top_k<2>, gating::gshard_capacity,
                                        gating::random_routing, gating::switch_aux>>);
static_assert(gating::gate<gating::with<gating::top_any<>, gating::group_limited<4, 2>,
                                        gating::dropless, gating::sequence_aux>>);
static_assert(gating::gate<gating::preset::gshard> && gating::gate<gating::preset::tutel> &&
              gating::gate<gating::preset::deepspeed> &&
              gating::gate<gating::preset::deepspeed_top2> &&
              gating::gate<gating::preset::megatron> &&
              gating::gate<gating::preset::switch_transformer> &&
              gating::gate<gating::preset::mixtral> && gating::gate<gating::preset::deepseek_v3> &&
              gating::gate<gating::preset::qwen3>);

namespace {
// A gate naming a policy that does not model its concept.
struct bad_capacity : gating::top_k<2> {
  using capacity = int;
};
struct bad_selection : gating::top_k<2> {
  using selection = gating::softmax;  // a score function where a selection goes
};
struct bad_aux_loss : gating::top_k<2> {
  using aux_loss = gating::tutel_capacity;
};
struct bad_renormalization : gating::top_k<2> {
  using renormalization = gating::renormalize;
};
struct bad_second_expert : gating::top_k<2> {
  using second_expert = gating::choice_major;
};
// A gate naming a valid one.
struct good_member : gating::top_k<2> {
  using capacity = gating::megatron_capacity;
};
}  // namespace
static_assert(!gating::gate<bad_capacity> && !gating::gate<bad_selection> &&
              !gating::gate<bad_aux_loss> && !gating::gate<bad_renormalization> &&
              !gating::gate<bad_second_expert>);
static_assert(gating::gate<good_member> &&
              std::is_same_v<gating::capacity_of<good_member>, gating::megatron_capacity>);

// Defaults reproduce the plain gate.
static_assert(std::is_same_v<gating::capacity_of<gating::top_k<2>>, gating::tutel_capacity>);
static_assert(std::is_same_v<gating::selection_of<gating::top_k<2>>, gating::all_experts>);
static_assert(
    std::is_same_v<gating::second_expert_of<gating::top_k<2>>, gating::keep_second_expert>);
static_assert(std::is_same_v<gating::aux_loss_of<gating::top_k<2>>, gating::gshard_aux>);
static_assert(
    std::is_same_v<gating::renormalization_of<gating::top_k<2>>, gating::args_renormalization>);
// with<> replaces what it is given, in any order, and keeps the rest.
using composed = gating::with<gating::top_k<2>, gating::switch_aux, gating::token_major,
                              gating::deepspeed_capacity>;
static_assert(std::is_same_v<composed::priority, gating::token_major>);
static_assert(std::is_same_v<composed::capacity, gating::deepspeed_capacity>);
static_assert(std::is_same_v<composed::aux_loss, gating::switch_aux>);
static_assert(std::is_same_v<composed::score_function, gating::softmax>);
static_assert(composed::static_k == 2);

// The dropless rule of a layer.
static_assert(gate_capacity_fits_layout<gating::preset::mixtral, layout::ragged>);
static_assert(!gate_capacity_fits_layout<gating::preset::mixtral, layout::capacity>);
static_assert(gate_capacity_fits_layout<gating::top_k<2>, layout::capacity>);

// Score functions, priorities and policies: near-misses.
static_assert(gating::score_function<gating::softmax_topk> &&
              gating::score_function<gating::sigmoid>);
static_assert(gating::score_sums_to_one<gating::softmax_topk> &&
              !gating::score_sums_to_one<gating::sigmoid>);
static_assert(gating::score_normalizes_selected<gating::softmax_topk> &&
              !gating::score_normalizes_selected<gating::softmax>);
static_assert(gating::keyed_priority<gating::by_score> && !gating::priority<gating::softmax>);
static_assert(!gating::capacity_policy<gating::gshard_aux> &&
              !gating::aux_loss_policy<gating::gshard_capacity>);

namespace {

template <class G>
std::string argument_of(G const& gate, gating::gate_args args) {
  return gate.can_implement(args).argument();
}

}  // namespace

TEST_CASE("can_implement rejects illegal run-time values, naming the argument") {
  gating::gate_args const ok{.tokens = 8, .experts = 4};
  gating::top_k<2> const plain;
  CHECK(plain.can_implement(ok).ok());
  auto with = [&](auto change) {
    auto a = ok;
    change(a);
    return argument_of(plain, a);
  };
  float const nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(with([&](auto& a) { a.capacity_factor = nan; }) == "capacity_factor");
  CHECK(with([&](auto& a) { a.eval_capacity_factor = INFINITY; }) == "eval_capacity_factor");
  CHECK(with([](auto& a) { a.capacity_alignment = 0; }) == "capacity_alignment");
  CHECK(with([](auto& a) { a.min_capacity = -1; }) == "min_capacity");
  CHECK(with([](auto& a) { a.groups = 0; }) == "groups");
  CHECK(with([](auto& a) { a.groups = 3; }) == "groups");  // 8 tokens in 3 groups
  CHECK(with([](auto& a) { a.groups = 4; }).empty());
  CHECK(with([](auto& a) { a.scaling_factor = 0; }) == "scaling_factor");
  CHECK(with([&](auto& a) { a.scaling_factor = nan; }) == "scaling_factor");
  CHECK(with([](auto& a) { a.jitter = 1.0f; }) == "jitter");
  CHECK(with([](auto& a) { a.jitter = -0.1f; }) == "jitter");
  CHECK(with([](auto& a) { a.gate_noise = -1.0f; }) == "gate_noise");
  CHECK(with([&](auto& a) { a.aux_loss_coef = nan; }) == "aux_loss_coef");
  CHECK(with([](auto& a) { a.normalize = static_cast<gating::renormalize>(7); }) == "normalize");
  CHECK(with([](auto& a) { a.jitter_on = static_cast<gating::jitter_target>(7); }) == "jitter_on");
  std::array<float, 3> const short_bias{};
  CHECK(with([&](auto& a) { a.expert_bias = short_bias; }) == "expert_bias");
  std::array<float, 4> const nan_bias{0, nan, 0, 0};  // values are the router's to check
  CHECK(with([&](auto& a) { a.expert_bias = nan_bias; }).empty());

  // Policies check their own rules.
  using limited = gating::with<gating::top_k<2>, gating::group_limited<2, 1>>;
  CHECK(argument_of(limited{}, {.tokens = 8, .experts = 5}) == "experts");  // 2 ∤ 5
  CHECK(argument_of(limited{}, {.tokens = 8, .experts = 4}).empty());
  using limited3 = gating::with<gating::top_any<>, gating::group_limited<2, 1>>;
  CHECK(argument_of(limited3{}, {.tokens = 8, .experts = 4, .k = 3}) == "k");  // 1 group of 2
  using fixed_e = gating::with<gating::top_k<2>, gating::group_limited<2, 1, 8>>;
  CHECK(argument_of(fixed_e{}, {.tokens = 8, .experts = 6}) == "experts");
  using any_random = gating::with<gating::top_any<>, gating::random_routing>;
  CHECK(argument_of(any_random{}, {.tokens = 8, .experts = 4, .k = 3}) == "k");
  CHECK(argument_of(any_random{}, {.tokens = 8, .experts = 4, .k = 2}).empty());
  CHECK(argument_of(gating::preset::gshard{},
                    {.tokens = 8, .experts = 4, .normalize = gating::renormalize::after_drops}) ==
        "normalize");  // the preset fixes it
  CHECK(argument_of(gating::preset::gshard{},
                    {.tokens = 8, .experts = 4, .normalize = gating::renormalize::before_drops})
            .empty());
  // A policy replaced by with<> is not checked; the one in its place is.
  using gshard_after =
      gating::with<gating::preset::gshard,
                   gating::fixed_renormalization<gating::renormalize::after_drops>>;
  gating::gate_args const after{
      .tokens = 8, .experts = 4, .normalize = gating::renormalize::after_drops};
  CHECK(argument_of(gshard_after{}, after).empty());
  CHECK(gating::check_gate(gshard_after{}, after).ok());
  CHECK(argument_of(gshard_after{},
                    {.tokens = 8, .experts = 4, .normalize = gating::renormalize::before_drops}) ==
        "normalize");
  CHECK(argument_of(gshard_after{},
                    {.tokens = 8, .experts = 5, .normalize = after.normalize, .groups = 3}) ==
        "groups");  // the shared knobs still hold
  CHECK(argument_of(gating::preset::deepseek_v3{}, {.tokens = 8, .experts = 12}) ==
        "experts");  // 8 groups do not divide 12
  CHECK(argument_of(gating::preset::deepseek_v3{}, {.tokens = 8, .experts = 16}).empty());
  CHECK(argument_of(gating::preset::deepseek_v3{}, {.tokens = 8, .experts = 8}) ==
        "k");  // 4 groups of 1 hold 4 < 8 experts
  // check_gate adds the shared knobs to a user gate's own checks.
  struct lenient : gating::top_k<2> {
    status can_implement(gating::gate_args const&) const { return {}; }
  };
  static_assert(gating::gate<lenient>);
  CHECK(gating::check_gate(lenient{}, {.tokens = 8, .experts = 4, .groups = 3}).argument() ==
        "groups");
  // A gate composed from one that adds its own check keeps that check.
  struct strict : gating::with<gating::top_k<2>, gating::gshard_capacity> {
    status can_implement(gating::gate_args const& args) const {
      if (args.experts == 6) return status::failure("experts", "is not 6 for this gate");
      return with::can_implement(args);
    }
  };
  using strict_switch = gating::with<strict, gating::switch_capacity>;
  CHECK(argument_of(strict_switch{}, {.tokens = 8, .experts = 6}) == "experts");
  CHECK(argument_of(strict_switch{}, {.tokens = 8, .experts = 4}).empty());
}

TEST_CASE("the router throws before touching memory") {
  test::hand_router h(test::hand_router::log_of({{1, 2, 3}, {3, 2, 1}, {1, 1, 2}, {2, 1, 1}}), 2);
  auto const route_poisoned = [&](auto const& gate, gating::gate_args args,
                                  std::string const& argument) {
    std::memset(h.buffer.view().data(), 0xab, h.buffer.size());
    std::vector<std::byte> const before(h.buffer.view().begin(), h.buffer.view().end());
    CHECK(h.can_route(gate, args).argument() == argument);  // the check route runs first
    test::expect_rejected([&] { (void)h.route(gate, args); }, argument);
    CHECK(std::equal(before.begin(), before.end(), h.buffer.view().begin()));
  };
  route_poisoned(gating::top_k<2>{}, {.groups = 3}, "groups");
  route_poisoned(gating::top_k<2>{}, {.jitter = 2.0f}, "jitter");
  route_poisoned(gating::with<gating::top_any<>, gating::random_routing>{}, {.k = 1}, "k");
  route_poisoned(gating::preset::deepseek<2, 2, 1>{}, {}, "experts");  // E = 3
  route_poisoned(gating::top_k<4>{}, {}, "k");                         // k > E
  std::array<float, 3> const nan_bias{0, std::numeric_limits<float>::quiet_NaN(), 0};
  route_poisoned(gating::top_k<2>{}, {.expert_bias = nan_bias}, "expert_bias");
  CHECK(h.can_route(gating::top_k<2>{}, {}).ok());
}
