// SPDX-License-Identifier: Apache-2.0
// Hand-worked cases of each policy axis of the host router: score functions (softmax_topk,
// sigmoid with a selection bias), group-limited selection, top_any with k changing between
// calls, capacity rounding rules, training and evaluation factors, priorities, scaling,
// local groups, noise and random routing.

#include "hand_router.hpp"

#include <doctest/doctest.h>

#include <moe/gating.hpp>

#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

using namespace moe;
using doctest::Approx;
using moe::test::hand_router, moe::test::ints, moe::test::slots;

namespace {

/// The logit whose sigmoid is s.
double logit(double s) {
  return std::log(s / (1 - s));
}

}  // namespace

TEST_CASE("softmax_topk: top-k of the logits, a softmax over the k selected") {
  // Logits (0, ln 2, ln 3): the top two are e2, e1, and softmax(ln 3, ln 2) = (3/5, 2/5).
  hand_router h({{0, std::log(2.0), std::log(3.0)}}, 2);
  using gate_t = gating::top_k<2, gating::softmax_topk>;
  auto const s = h.route(gate_t{}, {.capacity_factor = 1.0f});  // C = 2·⌊1·⌈1/3⌉⌋ = 2
  CHECK(h.experts_of(0) == ints{2, 1});
  CHECK(h.r.weight(0, 0) == Approx(0.6));
  CHECK(h.r.weight(0, 1) == Approx(0.4));
  // Its scores, for the aux loss, are the full softmax (1/6, 2/6, 3/6); ce = (0, 0, 1).
  CHECK(h.r.scores(0, 2) == Approx(0.5));
  CHECK(s.aux_loss == Approx(3 * 0.5));
  // A scaling factor multiplies after the softmax: 2.5 · (3/5, 2/5).
  (void)h.route(gate_t{}, {.capacity_factor = 1.0f, .scaling_factor = 2.5f});
  CHECK(h.r.weight(0, 0) == Approx(1.5));
  CHECK(h.r.weight(0, 1) == Approx(1.0));
}

TEST_CASE("the scaling factor and the loss coefficients are the doubles the user wrote") {
  // Frameworks take them as Python floats: 1.1 times the weight, not float(1.1) = 1.10000002.
  hand_router h({{0, std::log(2.0), std::log(3.0)}}, 2);
  using gate_t = gating::top_k<2, gating::softmax_topk>;
  (void)h.route(gate_t{}, {.capacity_factor = 1.0});
  double const w0 = h.r.weight(0, 0), w1 = h.r.weight(0, 1);
  gating::gate_args const args{
      .capacity_factor = 1.0, .aux_loss_coef = 0.1, .z_loss_coef = 1e-3, .scaling_factor = 1.1};
  static_assert(std::is_same_v<decltype(args.scaling_factor), double> &&
                std::is_same_v<decltype(args.aux_loss_coef), double> &&
                std::is_same_v<decltype(args.z_loss_coef), double>);
  (void)h.route(gate_t{}, args);
  CHECK(h.r.weight(0, 0) == 1.1 * w0);
  CHECK(h.r.weight(0, 1) == 1.1 * w1);
  CHECK(h.r.weight(0, 0) != static_cast<double>(1.1f) * w0);
  CHECK(args.aux_loss_coef == 0.1);
}

TEST_CASE("sigmoid scores; the selection bias picks experts but leaves the weights") {
  // Scores σ(l) = (0.5, 0.75, 0.25, 0.8).
  hand_router h({{0, logit(0.75), logit(0.25), logit(0.8)}}, 2);
  using gate_t = gating::top_k<2, gating::sigmoid>;
  auto s = h.route(gate_t{}, {.capacity_factor = 1.0f});  // C = 2, nothing dropped
  CHECK(h.r.scores(0, 1) == Approx(0.75));
  CHECK(h.experts_of(0) == ints{3, 1});  // 0.8, 0.75
  CHECK(h.r.weight(0, 0) == Approx(0.8));
  CHECK(h.r.weight(0, 1) == Approx(0.75));
  // The aux loss uses p = s / Σ s = s / 2.3; ce = (0, 0, 0, 1): 4 · 0.8 / 2.3.
  CHECK(s.aux_loss == Approx(4 * 0.8 / 2.3));

  // Bias (0.4, 0, 0.6, 0): selection scores (0.9, 0.75, 0.85, 0.8) pick e0 and e2, whose
  // unbiased scores (0.5, 0.25) renormalise to (2/3, 1/3), times the scaling factor 2.
  std::array<float, 4> const bias{0.4f, 0.0f, 0.6f, 0.0f};
  s = h.route(gate_t{}, {.capacity_factor = 1.0f,
                         .normalize = gating::renormalize::before_drops,
                         .scaling_factor = 2.0f,
                         .expert_bias = bias});
  CHECK(h.experts_of(0) == ints{0, 2});
  CHECK(h.r.weight(0, 0) == Approx(4.0 / 3));
  CHECK(h.r.weight(0, 1) == Approx(2.0 / 3));
  CHECK(s.aux_loss == Approx(4 * 0.5 / 2.3));  // ce now (1, 0, 0, 0)
}

TEST_CASE("without a bias, experts rank by logit where rounding merges their scores") {
  // σ(40) and σ(50) are both 1.0 in double, and softmax's exp(−800) and exp(−900) both
  // underflow to 0: the logits still rank them, as the CUDA router does in float.
  hand_router sig({{40, 50, 0, 0}}, 1);
  (void)sig.route(gating::top_k<1, gating::sigmoid>{}, {.capacity_factor = 1.0f});
  CHECK(sig.r.scores(0, 0) == sig.r.scores(0, 1));
  CHECK(sig.experts_of(0) == ints{1});
  hand_router soft({{0, -900, -800}}, 2);
  (void)soft.route(gating::top_k<2>{}, {.capacity_factor = 1.0f});
  CHECK(soft.r.scores(0, 1) == soft.r.scores(0, 2));
  CHECK(soft.experts_of(0) == ints{0, 2});
  // With a bias the selection scores s + b compete, so equal scores tie: the lower index.
  std::array<float, 4> const no_shift{0, 0, 0, 0};
  (void)sig.route(gating::top_k<1, gating::sigmoid>{},
                  {.capacity_factor = 1.0f, .expert_bias = no_shift});
  CHECK(sig.experts_of(0) == ints{0});
}

TEST_CASE("group-limited selection keeps the best groups, then the top k inside them") {
  // Sigmoid scores (0.9, 0.1 | 0.7, 0.75 | 0.8, 0.05) in 3 groups of 2.
  std::vector<std::vector<double>> const logits{
      {logit(0.9), logit(0.1), logit(0.7), logit(0.75), logit(0.8), logit(0.05)}};
  hand_router h(logits, 2);
  // Plain top-2: e0 (0.9), e4 (0.8).
  (void)h.route(gating::top_k<2, gating::sigmoid>{}, {});
  CHECK(h.experts_of(0) == ints{0, 4});
  // group_limited<3, 1>, k = 2: a group's score is the sum of its top-2 (c = k/M = 2):
  // 1.0, 1.45, 0.85. Only group 1 is kept: e3 (0.75), e2 (0.7).
  using one_group = gating::with<gating::top_k<2, gating::sigmoid>, gating::group_limited<3, 1>>;
  (void)h.route(one_group{}, {});
  CHECK(h.experts_of(0) == ints{3, 2});
  // group_limited<3, 2>, k = 2: c = max(1, 2/2) = 1, a group's score is its best: 0.9, 0.75,
  // 0.8. Groups 0 and 2 are kept: e0 (0.9), e4 (0.8).
  using two_groups = gating::with<gating::top_k<2, gating::sigmoid>, gating::group_limited<3, 2>>;
  (void)h.route(two_groups{}, {});
  CHECK(h.experts_of(0) == ints{0, 4});
  static_assert(gating::group_limited<8, 4>::per_group(8) == 2);
  static_assert(gating::group_limited<8, 4>::per_group(2) == 1);
}

TEST_CASE("top_any: k may change between calls in a workspace carved for the largest k") {
  auto const logits = hand_router::log_of({{1, 2, 3, 4}, {4, 3, 2, 1}, {2, 4, 1, 3}, {1, 1, 2, 2}});
  hand_router shared(logits, 3);  // carved once for k ≤ 3
  for (int k : {3, 1, 2, 3, 1}) {
    CAPTURE(k);
    gating::gate_args const args{.k = k, .capacity_factor = 0.5f};
    auto const s = shared.route(gating::top_any<>{}, args);
    hand_router fresh(logits, k);  // carved for exactly this k
    auto const expected = fresh.route(gating::top_any<>{}, args);
    CHECK(s.capacity == expected.capacity);
    CHECK(s.dropped == expected.dropped);
    CHECK(shared.r.k() == k);
    for (index_t t = 0; t < 4; ++t) {
      CHECK(shared.experts_of(t) == fresh.experts_of(t));
      CHECK(shared.slots_of(t) == fresh.slots_of(t));
      for (int j = 0; j < k; ++j) CHECK(shared.r.weight(t, j) == fresh.r.weight(t, j));
    }
  }
  // The routing state must be carved for the call's k.
  workspace_carver carver(shared.buffer.view());
  shared.r = gating::carve_host_routing(carver, 4, 3, 4, 4, 2);
  CHECK_THROWS_AS(
      (void)gating::route(host, gating::top_any<>{}, {.tokens = 4, .experts = 4, .k = 3},
                          make_view(std::as_const(shared.x).data(), 4, 4),
                          make_view(std::as_const(shared.w_gate).data(), 4, 4), shared.r),
      invalid_argument);
}

TEST_CASE("capacity rounding rules, worked by hand") {
  using gating::capacity_rounding;
  gating::capacity_args a{.tokens = 10, .experts = 4, .k = 2, .factor = 1.25f, .alignment = 1};
  auto c = [&](capacity_rounding rounding, double f, index_t max_load = 0) {
    a.rounding = rounding;
    a.factor = f;
    return gating::resolve_capacity(a, max_load);
  };
  // tutel: 2·⌊1.25·⌈10/4⌉⌋ = 2·⌊3.75⌋ = 6.
  CHECK(c(capacity_rounding::tutel, 1.25f) == 6);
  // gshard: ⌊10·1.25/4⌋ = ⌊3.125⌋ = 3 → 4; f = 2: ⌊5⌋ → 8; f = 0.2: ⌊0.5⌋ = 0 → 4.
  CHECK(c(capacity_rounding::gshard, 1.25f) == 4);
  CHECK(c(capacity_rounding::gshard, 2.0f) == 8);
  CHECK(c(capacity_rounding::gshard, 0.2f) == 4);
  // deepspeed: ⌈10/4·1.25·2⌉ = ⌈6.25⌉ = 7; f = 0.125: ⌈0.625⌉ = 1 → min_capacity 4; with 0
  // → 1. f = 0.2: 2.5 · 0.4 in float32, as DeepSpeed computes it, is 1.0000000149 rounded to
  // 1 (⌈⌉ = 1); the double product 2.5 · 0.4000000059604645 of a float 0.2f gave 2.
  CHECK(c(capacity_rounding::deepspeed, 1.25f) == 7);
  CHECK(c(capacity_rounding::deepspeed, 0.125f) == 4);
  a.min_capacity = 0;
  CHECK(c(capacity_rounding::deepspeed, 0.125f) == 1);
  CHECK(c(capacity_rounding::deepspeed, 0.2) == 1);
  CHECK(c(capacity_rounding::deepspeed, 0.2f) == 1);
  // megatron: ⌈10·2/4·1.25⌉ = ⌈6.25⌉ = 7; f = 3: ⌈15⌉ capped at T = 10 (no dropping).
  CHECK(c(capacity_rounding::megatron, 1.25f) == 7);
  CHECK(c(capacity_rounding::megatron, 3.0f) == 10);
  // switch: max(4, min(10, ⌊10·1.25/4⌋ = 3)) = 4; f = 2: ⌊5⌋ = 5.
  CHECK(c(capacity_rounding::switch_tf, 1.25f) == 4);
  CHECK(c(capacity_rounding::switch_tf, 2.0f) == 5);
  // dropless: the largest load, whatever f.
  CHECK(c(capacity_rounding::dropless, 1.25f, 7) == 7);
  // Dynamic for every rule: f = 0 the largest load, f < 0 capped by the rule at |f|.
  CHECK(c(capacity_rounding::gshard, 0.0f, 7) == 7);
  CHECK(c(capacity_rounding::gshard, -1.25f, 7) == 4);
  CHECK(c(capacity_rounding::megatron, -1.25f, 5) == 5);
  // The alignment applies last: deepspeed 7 → 8.
  a.alignment = 4;
  CHECK(c(capacity_rounding::deepspeed, 1.25f) == 8);
  // Bounds: fixed, the rule; dynamic, S (no expert receives a token twice).
  a.alignment = 1;
  a.rounding = capacity_rounding::dropless;
  CHECK(gating::capacity_bound(a) == 10);
  a.rounding = capacity_rounding::gshard;
  a.factor = 2.0f;
  CHECK(gating::capacity_bound(a) == 8);
  static_assert(gating::resolve_capacity({.tokens = 32,
                                          .experts = 4,
                                          .k = 2,
                                          .factor = 2.0f,
                                          .rounding = gating::capacity_rounding::gshard},
                                         0) == 16);
}

TEST_CASE("capacity per local group, and training versus evaluation factors") {
  // T = 16, G = 2: S = 8; tutel, k = 2, f = 1: C_g = 2·⌊1·⌈8/4⌉⌋ = 4, C = 8.
  gating::capacity_args a{.tokens = 16, .experts = 4, .k = 2, .factor = 1.0f, .groups = 2};
  CHECK(gating::group_tokens(a) == 8);
  CHECK(gating::group_capacity(a, 0) == 4);
  CHECK(gating::resolve_capacity(a, 0) == 8);
  a.alignment = 3;  // C_g 4 → 6, C = 12
  CHECK(gating::resolve_capacity(a, 0) == 12);
  a = {.tokens = 16, .experts = 4, .k = 2, .factor = 0.0f, .groups = 2};
  CHECK(gating::resolve_capacity(a, 5) == 10);  // 2 · the largest per-group load
  CHECK(gating::capacity_bound(a) == 16);       // 2 · S
  // The evaluation factor replaces the training one when !training.
  gating::gate_args const g{.tokens = 12,
                            .experts = 4,
                            .capacity_factor = 1.0f,
                            .training = false,
                            .eval_capacity_factor = 2.0f};
  auto const eval = gating::capacity_args_of(g, 2, gating::capacity_rounding::tutel, 12);
  CHECK(eval.factor == 2.0f);
  CHECK(gating::resolve_capacity(eval, 0) == 12);  // 2·⌊2·3⌋
  auto train = g;
  train.training = true;
  CHECK(gating::resolve_capacity(
            gating::capacity_args_of(train, 2, gating::capacity_rounding::tutel, 12), 0) == 6);
}

TEST_CASE("evaluation routes with the evaluation factor and without noise") {
  auto const logits = hand_router::log_of({{1, 2, 3}, {3, 2, 1}, {1, 1, 2}, {2, 1, 1}});
  hand_router h(logits, 2);
  // Training at f = 0.5: C = 2 and 2 drops (gating_test.cpp); evaluation at 1: C = 4.
  gating::gate_args args{.capacity_factor = 0.5f, .gate_noise = 5.0f, .seed = 3};
  auto s = h.route(gating::top_k<2>{}, args);
  CHECK(s.capacity == 2);
  CHECK(h.r.logits(0, 0) != Approx(0.0));  // noisy
  args.training = false;
  args.eval_capacity_factor = 1.0f;
  s = h.route(gating::top_k<2>{}, args);
  CHECK(s.capacity == 4);
  CHECK(s.dropped == 0);
  CHECK(h.r.logits(0, 0) == 0.0);  // ln 1, no noise
}

namespace {

// T = 4 tokens that all pick e0 (k = 1) with scores 0.6, 0.9, 0.7, 0.8; tutel at f = 0.5:
// C = ⌊0.5·⌈4/2⌉⌋ = 1, so only one of them keeps its slot.
std::vector<std::vector<double>> const one_slot_logits =
    hand_router::log_of({{0.6, 0.4}, {0.9, 0.1}, {0.7, 0.3}, {0.8, 0.2}});

template <class Priority>
slots first_slots(hand_router& h, std::uint64_t seed = 0) {
  auto const s = h.route(gating::top_k<1, gating::softmax, Priority>{},
                         {.capacity_factor = 0.5f, .seed = seed});
  CHECK(s.capacity == 1);
  CHECK(s.dropped == 3);
  slots v;
  for (index_t t = 0; t < 4; ++t) v.push_back(h.r.slot(t, 0));
  return v;
}

}  // namespace

TEST_CASE("priorities decide who keeps the one slot") {
  hand_router h(one_slot_logits, 1);
  // Token order: t0 keeps slot 0; the others queue behind it (slots 1, 2, 3: dropped).
  CHECK(first_slots<gating::choice_major>(h) == slots{0, 1, 2, 3});
  CHECK(first_slots<gating::token_major>(h) == slots{0, 1, 2, 3});
  // By score: 0.9 (t1), 0.8 (t3), 0.7 (t2), 0.6 (t0).
  CHECK(first_slots<gating::by_score>(h) == slots{3, 0, 2, 1});
  CHECK(h.r.weight(1, 0) == Approx(0.9));
  CHECK(h.r.weight(0, 0) == 0);
  // Tutel's batch-prioritized routing is by score for k = 1.
  CHECK(first_slots<gating::batch_prioritized>(h) == slots{3, 0, 2, 1});
  // Random: descending u(seed, t, 0); the order follows from the RNG's definition.
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    std::array<double, 4> u{};
    for (index_t t = 0; t < 4; ++t)
      u[static_cast<std::size_t>(t)] =
          gating::rng_uniform(seed, t, 0, gating::rng_stream::random_priority);
    slots expected(4);
    for (index_t t = 0; t < 4; ++t)
      for (index_t o = 0; o < 4; ++o)
        expected[static_cast<std::size_t>(t)] +=
            u[static_cast<std::size_t>(o)] > u[static_cast<std::size_t>(t)];
    CHECK(first_slots<gating::random_order>(h, seed) == expected);
    CHECK(first_slots<gating::random_order>(h, seed) == expected);  // seeded: the same again
  }
}

TEST_CASE("token-major and by-score priorities with k = 2") {
  // Scores: t0 (1/6, 2/6, 3/6), t1 (3/6, 2/6, 1/6), t2 (1/4, 1/4, 2/4), t3 (2/4, 1/4, 1/4);
  // selections t0 (e2, e1), t1 (e0, e1), t2 (e2, e0), t3 (e0, e1); f = 0.5 gives C = 2.
  auto const logits = hand_router::log_of({{1, 2, 3}, {3, 2, 1}, {1, 1, 2}, {2, 1, 1}});
  hand_router h(logits, 2);
  // Token-major: t0 e2 0, e1 0; t1 e0 0, e1 1; t2 e2 1, e0 1; t3 e0 2, e1 2 (both dropped).
  // Choice-major dropped t2's and t3's 2nd choices instead (gating_test.cpp).
  auto s =
      h.route(gating::top_k<2, gating::softmax, gating::token_major>{}, {.capacity_factor = 0.5f});
  CHECK(s.dropped == 2);
  CHECK(h.slots_of(0) == slots{0, 0});
  CHECK(h.slots_of(1) == slots{0, 1});
  CHECK(h.slots_of(2) == slots{1, 1});
  CHECK(h.slots_of(3) == slots{2, 2});
  CHECK(h.r.weight(3, 0) == 0);
  // By score, weights renormalised before drops: t0 (0.6, 0.4), t1 (0.6, 0.4),
  // t2 (2/3, 1/3), t3 (2/3, 1/3). Order: t2 j0, t3 j0 (2/3), t0 j0, t1 j0 (0.6), t0 j1, t1 j1
  // (0.4), t2 j1, t3 j1 (1/3). e2: t2 0, t0 1; e0: t3 0, t1 1, t2 2 (dropped); e1: t0 0,
  // t1 1, t3 2 (dropped).
  s = h.route(gating::top_k<2, gating::softmax, gating::by_score>{},
              {.capacity_factor = 0.5f, .normalize = gating::renormalize::before_drops});
  // (t0's and t1's 2nd choices tie at .4 up to the last bit of their softmax sums: their
  // order on e1 is left to those bits, so only the pair is checked.)
  CHECK(s.dropped == 2);
  CHECK(h.r.slot(0, 0) == 1);
  CHECK(h.r.slot(1, 0) == 1);
  CHECK(h.r.slot(0, 1) + h.r.slot(1, 1) == 1);
  CHECK(h.slots_of(2) == slots{0, 2});
  CHECK(h.slots_of(3) == slots{0, 2});
  CHECK(h.r.weight(2, 0) == Approx(2.0 / 3));
  CHECK(h.r.weight(2, 1) == 0);
}

TEST_CASE("local groups: capacity and priority per group, slots packed group after group") {
  // T = 8, E = 2, k = 1, G = 2 groups of 4. Group 0 picks e0, e0, e0, e1; group 1 picks
  // e0, e1, e1, e1 (scores 0.75 for the pick). Tutel at f = 1: C_g = ⌊1·⌈4/2⌉⌋ = 2, C = 4.
  std::vector<double> const to_e0{0.75, 0.25}, to_e1{0.25, 0.75};
  auto const logits = hand_router::log_of({to_e0, to_e0, to_e0, to_e1, to_e0, to_e1, to_e1, to_e1});
  hand_router h(logits, 1);
  auto s = h.route(gating::top_k<1>{}, {.capacity_factor = 1.0f, .groups = 2});
  CHECK(s.capacity == 4);
  CHECK(s.max_load == 3);  // e0 in group 0, e1 in group 1
  // Group 0: t0 e0 p0, t1 e0 p1, t2 e0 p2 (dropped), t3 e1 p0; group 1: t4 e0 p0, t5 e1 p0,
  // t6 e1 p1, t7 e1 p2 (dropped). Kept slots packed: e0 t0 0, t1 1, t4 2; e1 t3 0, t5 1,
  // t6 2; dropped ones C + 0 = 4.
  slots const expected{0, 1, 4, 0, 2, 1, 2, 4};
  for (index_t t = 0; t < 8; ++t) CHECK(h.r.slot(t, 0) == expected[static_cast<std::size_t>(t)]);
  CHECK(s.dropped == 2);
  CHECK(h.r.load(0) == 4);
  CHECK(h.r.load(1) == 4);
  CHECK(h.r.weight(2, 0) == 0);
  CHECK(h.r.weight(4, 0) == Approx(0.75));
  // gshard_aux per group: group 0 me = (0.625, 0.375), ce = (3/4, 1/4): 2·(0.46875 +
  // 0.09375) = 1.125; group 1 mirrors it; the mean is 1.125.
  CHECK(s.aux_loss == Approx(1.125));
  // One group: C = ⌊1·⌈8/2⌉⌋ = 4 holds every load of 4, and the aux loss over all 8 tokens is
  // 2·(0.5·0.5 + 0.5·0.5) = 1.
  s = h.route(gating::top_k<1>{}, {.capacity_factor = 1.0f});
  CHECK(s.capacity == 4);
  CHECK(s.dropped == 0);
  CHECK(s.aux_loss == Approx(1.0));
  // Dynamic capacity per group, through the ranks' reduction (another rank's largest group
  // load is 5): C_g = 5, C = 10, nothing dropped.
  s = h.route(gating::top_k<1>{}, {.capacity_factor = 0.0f, .groups = 2},
              [](index_t load) { return load < 5 ? index_t{5} : load; });
  CHECK(s.max_load == 5);
  CHECK(s.capacity == 10);
  CHECK(s.dropped == 0);
  // A call whose T is no multiple of G is rejected before any work.
  hand_router odd(hand_router::log_of({to_e0, to_e0, to_e1}), 1);
  CHECK_THROWS_AS((void)odd.route(gating::top_k<1>{}, {.groups = 2}), invalid_argument);
}

TEST_CASE("training noise: Gaussian logit noise of std gate_noise / E, and jitter") {
  std::vector<std::vector<double>> const logits{{0.1, 0.2, 0.3}, {0.5, -0.4, 0.2}};
  hand_router h(logits, 2);
  // Additive: l + (gate_noise / E) · normal(seed, t, e).
  (void)h.route(gating::top_k<2>{}, {.gate_noise = 0.3f, .seed = 5});
  double const std_dev = static_cast<double>(0.3f) / 3;
  for (index_t t = 0; t < 2; ++t)
    for (index_t e = 0; e < 3; ++e) {
      double const z =
          gating::rng_normal(5, t, static_cast<std::uint32_t>(e), gating::rng_stream::logit_noise);
      CHECK(h.r.logits(t, e) ==
            Approx(logits[static_cast<std::size_t>(t)][static_cast<std::size_t>(e)] + std_dev * z)
                .epsilon(1e-14));
    }
  // Jitter of the logits: l · U[1 − ε, 1 + ε] at (seed, t, e).
  (void)h.route(gating::top_k<2>{},
                {.jitter = 0.2f, .jitter_on = gating::jitter_target::logits, .seed = 9});
  for (index_t t = 0; t < 2; ++t)
    for (index_t e = 0; e < 3; ++e)
      CHECK(h.r.logits(t, e) ==
            Approx(logits[static_cast<std::size_t>(t)][static_cast<std::size_t>(e)] *
                   gating::jitter_factor(0.2f, 9, t, static_cast<std::uint32_t>(e),
                                         gating::rng_stream::jitter_logits))
                .epsilon(1e-14));
  // Jitter of the input: x is one-hot, so l(t, e) = x(t, t) · u(t, h = t) · W(t, e).
  (void)h.route(gating::top_k<2>{}, {.jitter = 0.2f, .seed = 9});
  for (index_t t = 0; t < 2; ++t)
    for (index_t e = 0; e < 3; ++e)
      CHECK(h.r.logits(t, e) ==
            Approx(logits[static_cast<std::size_t>(t)][static_cast<std::size_t>(e)] *
                   gating::jitter_factor(0.2f, 9, t, static_cast<std::uint32_t>(t),
                                         gating::rng_stream::jitter_input))
                .epsilon(1e-14));
  // Evaluation: no noise at all.
  (void)h.route(gating::top_k<2>{}, {.training = false, .jitter = 0.2f, .gate_noise = 3.0f});
  CHECK(h.r.logits(1, 1) == -0.4);
}

TEST_CASE("random routing leaves out 2nd choices with 2·g2 ≤ u; they claim no slot") {
  auto const logits = hand_router::log_of(
      {{1, 2, 3}, {3, 2, 1}, {1, 1, 2}, {2, 1, 1}, {5, 1, 4}, {1, 9, 1}, {2, 3, 3}, {7, 1, 2}});
  hand_router h(logits, 2);
  using gate_t = gating::with<gating::top_k<2>, gating::random_routing>;
  for (std::uint64_t seed = 0; seed < 4; ++seed) {
    auto const s = h.route(
        gate_t{},
        {.capacity_factor = 4.0f, .normalize = gating::renormalize::before_drops, .seed = seed});
    index_t left_out = 0;
    std::array<std::int64_t, 3> load{};
    for (index_t t = 0; t < 8; ++t) {
      double const s0 = h.r.scores(t, h.r.expert(t, 0)), s1 = h.r.scores(t, h.r.expert(t, 1));
      bool const keep = gating::keeps_second_expert(s1 / (s0 + s1), seed, t);
      CHECK(h.r.kept(t, 0));
      CHECK(h.r.kept(t, 1) == keep);
      if (!keep) {
        ++left_out;
        CHECK(h.r.slot(t, 1) == gating::no_slot);
        CHECK(h.r.weight(t, 1) == 0);
        CHECK(h.r.weight(t, 0) == Approx(s0 / (s0 + s1)));  // renormalised before drops
      }
      for (int j = 0; j < 2; ++j)
        if (h.r.kept(t, j)) ++load[static_cast<std::size_t>(h.r.expert(t, j))];
    }
    CHECK(s.unrouted == left_out);
    CHECK(s.dropped == 0);
    for (index_t e = 0; e < 3; ++e) CHECK(h.r.load(e) == load[static_cast<std::size_t>(e)]);
    // Evaluation keeps every 2nd choice.
    auto const eval = h.route(gate_t{}, {.training = false, .eval_capacity_factor = 4.0f});
    CHECK(eval.unrouted == 0);
  }
}
