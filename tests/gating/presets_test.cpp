// SPDX-License-Identifier: Apache-2.0
// Each preset on a small hand-worked example: the expected experts, slots, drops, weights
// and aux loss are written out below with the reasoning. The softmax presets share one input
// of T = 8 tokens over E = 4 experts; the top-8 presets need more experts than 4.

#include "hand_router.hpp"

#include <doctest/doctest.h>

#include <moe/gating.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

using namespace moe;
using doctest::Approx;
using moe::test::hand_router, moe::test::ints, moe::test::slots;

namespace {

// Token t's logits are ln p_t, so its softmax scores are p_t / 10:
//   t0 (.5 .3 .1 .1)  top-2 e0 e1, renormalised (.625 .375)
//   t1 (.5 .1 .3 .1)        e0 e2               (.625 .375)
//   t2 (.6 .2 .1 .1)        e0 e1               (.75  .25 )
//   t3 (.4 .4 .1 .1)        e0 e1 (tie: lower)  (.5   .5  )
//   t4 (.1 .6 .2 .1)        e1 e2               (.75  .25 )
//   t5 (.5 .2 .2 .1)        e0 e1 (tie)         (5/7  2/7 )
//   t6 (.7 .1 .1 .1)        e0 e1 (tie)         (.875 .125)
//   t7 (.6 .1 .1 .2)        e0 e3               (.75  .25 )
// 1st choices: e0 seven times (all but t4), e1 once. The mean scores me = (.4875, .25, .15,
// .1125); 1st-choice fractions ce = (7/8, 1/8, 0, 0):
//   gshard_aux = 4 · (.4875 · .875 + .25 · .125) = 1.83125
// All choices: counts (7, 6, 2, 1):
//   switch_aux = 4/(2·8) · (7·.4875 + 6·.25 + 2·.15 + 1·.1125) = .25 · 5.325 = 1.33125
std::vector<std::vector<double>> const shared_logits = hand_router::log_of({{5, 3, 1, 1},
                                                                            {5, 1, 3, 1},
                                                                            {6, 2, 1, 1},
                                                                            {4, 4, 1, 1},
                                                                            {1, 6, 2, 1},
                                                                            {5, 2, 2, 1},
                                                                            {7, 1, 1, 1},
                                                                            {6, 1, 1, 2}});
double const gshard_aux_of_shared = 1.83125, switch_aux_of_shared = 1.33125;

void expect_routing(hand_router const& h, std::vector<ints> const& experts,
                    std::vector<slots> const& slot,
                    std::vector<std::vector<double>> const& weight) {
  for (index_t t = 0; t < h.tokens; ++t) {
    CAPTURE(t);
    auto const i = static_cast<std::size_t>(t);
    if (!experts.empty()) CHECK(h.experts_of(t) == experts[i]);
    if (!slot.empty()) CHECK(h.slots_of(t) == slot[i]);
    for (int j = 0; j < h.r.k(); ++j) {
      CAPTURE(j);
      CHECK(h.r.weight(t, j) == Approx(weight[i][static_cast<std::size_t>(j)]));
    }
  }
}

std::vector<ints> const shared_top2{{0, 1}, {0, 2}, {0, 1}, {0, 1}, {1, 2}, {0, 1}, {0, 1}, {0, 3}};

}  // namespace

TEST_CASE("preset::gshard: gshard capacity, renormalised before drops, random routing") {
  hand_router h(shared_logits, 2);
  gating::gate_args args{.capacity_factor = 2.0f, .eval_capacity_factor = 2.0f, .seed = 1};
  // C = ⌊8 · 2 / 4⌋ = 4 (already a multiple of 4).
  SUBCASE("evaluation: no random routing") {
    args.training = false;
    auto const s = h.route(gating::preset::gshard{}, args);
    CHECK(s.capacity == 4);
    // 1st choices claim first: e0 t0 0, t1 1, t2 2, t3 3, then t5 4, t6 5, t7 6 (dropped);
    // e1 t4 0. 2nd choices: e1 t0 1, t2 2, t3 3, t5 4 and t6 5 (dropped); e2 t1 0, t4 1;
    // e3 t7 0. t5 and t6 lose both experts; t7 keeps only its 2nd.
    expect_routing(h, shared_top2, {{0, 1}, {1, 0}, {2, 2}, {3, 3}, {0, 1}, {4, 4}, {5, 5}, {6, 0}},
                   {{.625, .375},
                    {.625, .375},
                    {.75, .25},
                    {.5, .5},
                    {.75, .25},
                    {0, 0},
                    {0, 0},
                    {0, .25}});  // weights renormalised before drops stay so
    CHECK(s.dropped == 5);
    CHECK(s.unrouted == 0);
    CHECK(s.aux_loss == Approx(gshard_aux_of_shared));
  }
  SUBCASE("training, seed 1: the 2nd choice kept iff 2·g2 > u") {
    // u(seed 1, t) = .462 .551 .774 .783 .259 .440 .318 .950 against 2·g2 = .75 .75 .5 1
    // .5 .571 .25 .5: t2, t6 and t7 leave out their 2nd choice.
    auto const s = h.route(gating::preset::gshard{}, args);
    CHECK(s.unrouted == 3);
    // e0 as before (t5, t6, t7 dropped); e1 t4 0, t0 1, t3 2, t5 3: all kept now; e2 t1 0,
    // t4 1. Left-out choices have no slot and weight 0.
    auto const none = gating::no_slot;
    expect_routing(
        h, shared_top2, {{0, 1}, {1, 0}, {2, none}, {3, 2}, {0, 1}, {4, 3}, {5, none}, {6, none}},
        {{.625, .375}, {.625, .375}, {.75, 0}, {.5, .5}, {.75, .25}, {0, 2.0 / 7}, {0, 0}, {0, 0}});
    CHECK(s.dropped == 3);
    CHECK(h.r.load(0) == 7);
    CHECK(h.r.load(1) == 4);
    CHECK(h.r.load(3) == 0);
    CHECK(s.aux_loss == Approx(gshard_aux_of_shared));  // counted before random routing
  }
}

TEST_CASE("preset::tutel: top-ANY, Tutel capacity, renormalised before drops for k > 1") {
  hand_router h(shared_logits, 2);
  // k = 2, f = 1: C = 2 · ⌊1 · ⌈8/4⌉⌋ = 4: the same routing as GShard's evaluation above.
  auto s = h.route(gating::preset::tutel{}, {.k = 2, .capacity_factor = 1.0f});
  CHECK(s.capacity == 4);
  CHECK(s.dropped == 5);
  expect_routing(
      h, shared_top2, {{0, 1}, {1, 0}, {2, 2}, {3, 3}, {0, 1}, {4, 4}, {5, 5}, {6, 0}},
      {{.625, .375}, {.625, .375}, {.75, .25}, {.5, .5}, {.75, .25}, {0, 0}, {0, 0}, {0, .25}});
  CHECK(s.aux_loss == Approx(gshard_aux_of_shared));
  // k = 1 in the same workspace: C = 1 · ⌊1 · 2⌋ = 2; e0 keeps t0 and t1, e1 t4; 5 dropped.
  // One weight is not renormalised (Tutel normalises only for k > 1): the score.
  s = h.route(gating::preset::tutel{}, {.k = 1, .capacity_factor = 1.0f});
  CHECK(s.capacity == 2);
  CHECK(s.dropped == 5);
  expect_routing(h, {{0}, {0}, {0}, {0}, {1}, {0}, {0}, {0}},
                 {{0}, {1}, {2}, {3}, {0}, {4}, {5}, {6}},
                 {{.5}, {.5}, {0}, {0}, {.6}, {0}, {0}, {0}});
  // Dynamic capacity (f = 0): the largest load, e0's 7: nothing dropped.
  s = h.route(gating::preset::tutel{}, {.k = 2, .capacity_factor = 0.0f});
  CHECK(s.capacity == 7);
  CHECK(s.dropped == 0);
}

TEST_CASE("preset::deepspeed: top-1, random token selection, min_capacity") {
  hand_router h(shared_logits, 1);
  // C = max(⌈8/4 · 1 · 1⌉, 4) = 4. e0 is chosen by 7 tokens; RTS keeps the 4 of largest
  // u(seed 2, t, 0): t0 .965, t7 .862, t3 .620, t2 .588 (then t1 .451, t5 .359, t6 .118).
  auto s = h.route(gating::preset::deepspeed{}, {.capacity_factor = 1.0f, .seed = 2});
  CHECK(s.capacity == 4);
  CHECK(s.dropped == 3);
  expect_routing(h, {{0}, {0}, {0}, {0}, {1}, {0}, {0}, {0}},
                 {{0}, {4}, {3}, {2}, {0}, {5}, {6}, {1}},
                 {{.5}, {0}, {.6}, {.4}, {.6}, {0}, {0}, {.6}});  // the softmax scores
  CHECK(s.aux_loss == Approx(gshard_aux_of_shared));
  // min_capacity 1: C = 2; e0 keeps t0 and t7 only.
  s = h.route(gating::preset::deepspeed{}, {.capacity_factor = 1.0f, .min_capacity = 1, .seed = 2});
  CHECK(s.capacity == 2);
  CHECK(s.dropped == 5);
  CHECK(h.r.weight(7, 0) == Approx(.6));
  CHECK(h.r.weight(3, 0) == 0);
}

TEST_CASE("preset::deepspeed_top2: capacity ⌈T/E·2f⌉, renormalised after drops") {
  hand_router h(shared_logits, 2);
  // C = ⌈8/4 · 1 · 2⌉ = 4: GShard's slots; but t7, whose 1st choice is dropped, gets its
  // whole weight on the 2nd: .1/.1 = 1.
  auto const s = h.route(gating::preset::deepspeed_top2{}, {.capacity_factor = 1.0f});
  CHECK(s.capacity == 4);
  CHECK(s.dropped == 5);
  expect_routing(
      h, shared_top2, {{0, 1}, {1, 0}, {2, 2}, {3, 3}, {0, 1}, {4, 4}, {5, 5}, {6, 0}},
      {{.625, .375}, {.625, .375}, {.75, .25}, {.5, .5}, {.75, .25}, {0, 0}, {0, 0}, {0, 1}});
  CHECK(s.aux_loss == Approx(gshard_aux_of_shared));
}

TEST_CASE("preset::megatron: softmax over the top 2, drop by probability, switch_aux") {
  hand_router h(shared_logits, 2);
  // C = min(⌈8 · 2 / 4 · 1⌉, 8) = 4. The weights before drops are the softmax over the two:
  // the renormalised column above. By descending weight (ties: token, then choice):
  //   .875 t6j0 | .75 t2j0 t4j0 t7j0 | 5/7 t5j0 | .625 t0j0 t1j0 | .5 t3j0 t3j1 |
  //   .375 t0j1 t1j1 | 2/7 t5j1 | .25 t2j1 t4j1 t7j1 | .125 t6j1
  // e0: t6 0, t2 1, t7 2, t5 3, then t0 4, t1 5, t3 6 dropped; e1: t4 0, t3 1, t0 2, t5 3,
  // then t2 4, t6 5 dropped; e2: t1 0, t4 1; e3: t7 0.
  // t2 and t7 tie at .75 on e0, and t0 and t1 at .625, up to the last bit of their softmax
  // sums: which of each pair comes first is left to those bits, so only the pair is checked.
  auto const s = h.route(gating::preset::megatron{}, {.capacity_factor = 1.0f});
  CHECK(s.capacity == 4);
  CHECK(s.dropped == 5);
  expect_routing(h, shared_top2, {},
                 {{0, .375},
                  {0, .375},
                  {.75, 0},
                  {0, .5},
                  {.75, .25},
                  {5.0 / 7, 2.0 / 7},
                  {.875, 0},
                  {.75, .25}});
  auto const pair = [&](index_t a, index_t b) {
    return std::vector<std::int64_t>{std::min(h.r.slot(a, 0), h.r.slot(b, 0)),
                                     std::max(h.r.slot(a, 0), h.r.slot(b, 0))};
  };
  CHECK(pair(2, 7) == slots{1, 2});
  CHECK(pair(0, 1) == slots{4, 5});
  CHECK(h.r.slot(6, 0) == 0);
  CHECK(h.r.slot(5, 0) == 3);
  CHECK(h.r.slot(3, 0) == 6);
  CHECK(h.slots_of(4) == slots{0, 1});
  CHECK(h.r.slot(3, 1) == 1);
  CHECK(h.r.slot(0, 1) == 2);
  CHECK(h.r.slot(5, 1) == 3);
  CHECK(h.r.slot(2, 1) == 4);
  CHECK(h.r.slot(6, 1) == 5);
  CHECK(h.r.slot(1, 1) == 0);
  CHECK(h.r.slot(7, 1) == 0);
  CHECK(s.aux_loss == Approx(switch_aux_of_shared));
}

TEST_CASE("preset::switch_transformer: top-1, Switch capacity, per-group aux loss") {
  hand_router h(shared_logits, 1);
  // C = max(4, min(8, ⌊8 · 1 / 4⌋ = 2)) = 4; e0 keeps t0..t3 in token order, drops t5, t6,
  // t7; e1 keeps t4.
  auto s = h.route(gating::preset::switch_transformer{}, {.capacity_factor = 1.0f});
  CHECK(s.capacity == 4);
  CHECK(s.dropped == 3);
  expect_routing(h, {}, {{0}, {1}, {2}, {3}, {0}, {4}, {5}, {6}},
                 {{.5}, {.5}, {.6}, {.4}, {.6}, {0}, {0}, {0}});
  CHECK(s.aux_loss == Approx(gshard_aux_of_shared));
  // Two local groups of 4: C_g = max(4, min(4, ⌊4 · 1 / 4⌋)) = 4, C = 8: nothing dropped.
  // Group 0 (t0..t3): me = (.5, .25, .15, .1), ce = (1, 0, 0, 0): 4 · .5 = 2.
  // Group 1 (t4..t7): me = (.475, .25, .15, .125), ce = (3/4, 1/4, 0, 0):
  //   4 · (.35625 + .0625) = 1.675. The aux loss is their mean, 1.8375.
  // Slots packed group after group: e0 t0..t3 0..3, t5 4, t6 5, t7 6; e1 t4 0.
  s = h.route(gating::preset::switch_transformer{}, {.capacity_factor = 1.0f, .groups = 2});
  CHECK(s.capacity == 8);
  CHECK(s.dropped == 0);
  expect_routing(h, {}, {{0}, {1}, {2}, {3}, {0}, {4}, {5}, {6}},
                 {{.5}, {.5}, {.6}, {.4}, {.6}, {.5}, {.7}, {.6}});
  CHECK(s.aux_loss == Approx(1.8375));
}

TEST_CASE("preset::mixtral: softmax over the top 2, dropless, token-major, switch_aux") {
  hand_router h(shared_logits, 2);
  // Dropless: C = the largest load, e0's 7, whatever f. Token-major slots: e0 t0 0, t1 1,
  // t2 2, t3 3, t5 4, t6 5, t7 6; e1 t0 0, t2 1, t3 2, t4 3, t5 4, t6 5; e2 t1 0, t4 1; e3 t7 0.
  auto const s = h.route(gating::preset::mixtral{}, {.capacity_factor = 0.5f});
  CHECK(s.capacity == 7);
  CHECK(s.dropped == 0);
  expect_routing(h, shared_top2, {{0, 0}, {1, 0}, {2, 1}, {3, 2}, {3, 1}, {4, 4}, {5, 5}, {6, 0}},
                 {{.625, .375},
                  {.625, .375},
                  {.75, .25},
                  {.5, .5},
                  {.75, .25},
                  {5.0 / 7, 2.0 / 7},
                  {.875, .125},
                  {.75, .25}});
  CHECK(s.aux_loss == Approx(switch_aux_of_shared));
}

namespace {

double logit(double s) {
  return std::log(s / (1 - s));
}

std::vector<double> logits_of(std::vector<double> const& scores) {
  std::vector<double> l;
  for (double s : scores) l.push_back(logit(s));
  return l;
}

}  // namespace

TEST_CASE("preset::deepseek<2, 2, 1>: sigmoid, the best of two expert groups") {
  // E = 4 in groups (e0 e1) (e2 e3); k = 2, M = 1, so a group scores the sum of its top 2.
  //   t0 (.9 .2 .6 .6): groups 1.1, 1.2 → group 1: e2, e3 (tie: lower)  weights (.5, .5)
  //   t1 (.5 .5 .9 .05): 1.0, .95 → group 0: e0, e1                     (.5, .5)
  //   t2 (.3 .4 .1 .2): .7, .3 → group 0: e1 .4, e0 .3                   (4/7, 3/7)
  //   t3 (.8 .1 .7 .3): .9, 1.0 → group 1: e2 .7, e3 .3                  (.7, .3)
  // Plain top-2 would take e0 for t0 (.9) and e2 for t1 (.9). Every expert gets 2: dropless
  // C = 2, and with equal counts sequence_aux = Σ_e me_e = 1 (p sums to one per token).
  hand_router h({logits_of({.9, .2, .6, .6}), logits_of({.5, .5, .9, .05}),
                 logits_of({.3, .4, .1, .2}), logits_of({.8, .1, .7, .3})},
                2);
  auto const s = h.route(gating::preset::deepseek<2, 2, 1>{}, {});
  CHECK(s.capacity == 2);
  CHECK(s.dropped == 0);
  expect_routing(h, {{2, 3}, {0, 1}, {1, 0}, {2, 3}}, {{0, 0}, {0, 0}, {1, 1}, {1, 1}},
                 {{.5, .5}, {.5, .5}, {4.0 / 7, 3.0 / 7}, {.7, .3}});
  CHECK(s.aux_loss == Approx(1.0));
}

TEST_CASE("preset::deepseek and deepseek_native: the two generalisations of V3's groups") {
  // k = 2 of 8 experts in 4 groups of 2, the best 2 groups. Scores by group:
  //   (.95 .05) (.7 .7) (.6 .6) (.9 .1)
  // deepseek (Megatron's): a group scores its top ⌊2/2⌋ = 1: .95, .7, .6, .9 → groups 0, 3:
  //   e0 .95, e6 .9, weights (.95, .9) / 1.85.
  // deepseek_native (DeepSeek-V3's code, Hugging Face): its top 2: 1.0, 1.4, 1.2, 1.0 →
  //   groups 1, 2: e2 .7, e3 .7 (tie: lower first), weights (.5, .5).
  hand_router h({logits_of({.95, .05, .7, .7, .6, .6, .9, .1})}, 2);
  (void)h.route(gating::preset::deepseek<2, 4, 2>{}, {});
  expect_routing(h, {{0, 6}}, {{0, 0}}, {{.95 / 1.85, .9 / 1.85}});
  (void)h.route(gating::preset::deepseek_native<2, 4, 2>{}, {});
  expect_routing(h, {{2, 3}}, {{0, 0}}, {{.5, .5}});
  static_assert(gating::group_limited<4, 2>::per_group(2) == 1 &&
                gating::group_limited<4, 2, 0, gating::top_two_group_score>::per_group(2) == 2);

  // k = 1 of 4 experts in 2 groups, the best 1, scaling 2.5. t0 (.9 .1) (.6 .6):
  //   deepseek: group maxima .9, .6 → e0, weight .9 · 2.5 (no renormalisation at k = 1);
  //   deepseek_native: sums 1.0, 1.2 → e2 (tie: lower), weight renormalised, 1 · 2.5.
  hand_router one({logits_of({.9, .1, .6, .6})}, 1);
  (void)one.route(gating::preset::deepseek<1, 2, 1>{}, {.scaling_factor = 2.5});
  expect_routing(one, {{0}}, {{0}}, {{.9 * 2.5}});
  (void)one.route(gating::preset::deepseek_native<1, 2, 1>{}, {.scaling_factor = 2.5});
  expect_routing(one, {{2}}, {{0}}, {{2.5}});

  // Groups of one expert cannot be scored by their top 2.
  hand_router singles({logits_of({.9, .1, .6, .6})}, 1);
  CHECK(singles.can_route(gating::preset::deepseek_native<1, 4, 2>{}, {}).argument() == "experts");
  CHECK(singles.can_route(gating::preset::deepseek<1, 4, 2>{}, {}));
}

TEST_CASE("preset::deepseek_v3: k = 8 of 16 experts in 8 groups, best 4, bias, scaling") {
  // E = 16 (k = 8 needs more than 4 experts), groups of 2, so a group's score (the sum of its
  // top k/M = 2) is the sum of both. T = 2. Scores of t0, by group:
  //   (.9 .1) (.6 .6) (.5 .2) (.3 .3) (.8 .05) (.4 .4) (.7 .05) (.2 .2)
  //   sums 1.0  1.2    .7      .6     .85      .8     .75      .4
  // Bias +.6 on e13 raises group 6 to 1.35: the best four are groups 6, 1, 0, 4. Their
  // experts by selection score (s + b; ties: lower index): e0 .9, e8 .8, e12 .7, e13 .65
  // (.05 + .6), e2 .6, e3 .6, e1 .1, e9 .05. Weights: the unbiased scores over their sum
  // 3.8, times 2.5. Without the bias groups 1, 0, 4, 5 win: e10 and e11 instead.
  // t1 scores .5 everywhere; with the bias group 6 (1.6) and then groups 0, 1, 2 (ties):
  // e13, e0, e1, e2, e3, e4, e5, e12, each weight .5/4 · 2.5 = .3125.
  std::vector<double> const t0{.9, .1, .6, .6, .5, .2, .3, .3, .8, .05, .4, .4, .7, .05, .2, .2};
  hand_router h({logits_of(t0), std::vector<double>(16, 0.0)}, 8);
  std::array<float, 16> bias{};
  bias[13] = 0.6f;
  auto s = h.route(gating::preset::deepseek_v3{}, {.scaling_factor = 2.5f, .expert_bias = bias});
  double const w = 2.5 / 3.8;
  expect_routing(h, {{0, 8, 12, 13, 2, 3, 1, 9}, {13, 0, 1, 2, 3, 4, 5, 12}},
                 {{0, 0, 0, 0, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 0, 0, 1}},
                 {{.9 * w, .8 * w, .7 * w, .05 * w, .6 * w, .6 * w, .1 * w, .05 * w},
                  std::vector<double>(8, .3125)});
  CHECK(s.dropped == 0);
  CHECK(s.capacity == 2);  // e0, e1, e2, e3, e12, e13 are chosen twice
  // sequence_aux (one sequence of S = 2): p_t = s_t / Σ s_t (Σ = 6.3 for t0, 8 for t1);
  // counts 2 for e0 e1 e2 e3 e12 e13, 1 for e4 e5 e8 e9: L = E · Σ_e me_e · count_e / (k·S)
  // = Σ_e count_e · (s0_e / 6.3 + 1/16) / 2 = (Σ_e count_e · s0_e / 6.3 + 1) / 2, and
  // Σ_e count_e · s0_e = 1.8 + .2 + 1.2 + 1.2 + .5 + .2 + .8 + .05 + 1.4 + .1 = 7.45.
  CHECK(s.aux_loss == Approx((7.45 / 6.3 + 1) / 2));
  // Without the bias: t0 takes groups 1, 0, 4, 5.
  s = h.route(gating::preset::deepseek_v3{}, {.scaling_factor = 2.5f});
  CHECK(h.experts_of(0) == ints{0, 8, 2, 3, 10, 11, 1, 9});
  // At V3's shape deepseek_native is the same gate: c = ⌊8/4⌋ = 2 and k > 1.
  for (bool biased : {false, true}) {
    gating::gate_args const args{
        .scaling_factor = 2.5,
        .expert_bias = biased ? span<float const>(bias) : span<float const>{}};
    (void)h.route(gating::preset::deepseek_v3{}, args);
    auto const experts = h.r.expert;
    std::vector<double> weights;
    for (index_t t = 0; t < 2; ++t)
      for (int j = 0; j < 8; ++j) weights.push_back(h.r.weight(t, j));
    std::vector<int> chosen;
    for (index_t t = 0; t < 2; ++t)
      for (int j = 0; j < 8; ++j) chosen.push_back(experts(t, j));
    (void)h.route(gating::preset::deepseek_native<8, 8, 4>{}, args);
    for (index_t t = 0; t < 2; ++t)
      for (int j = 0; j < 8; ++j) {
        CHECK(h.r.expert(t, j) == chosen[static_cast<std::size_t>(t * 8 + j)]);
        CHECK(h.r.weight(t, j) == weights[static_cast<std::size_t>(t * 8 + j)]);
      }
  }
}

TEST_CASE("preset::qwen3: top-8 of a softmax, renormalised, dropless, switch_aux") {
  // E = 10, T = 2. t0 proportions 10, 9, …, 1 (Σ 55): the top 8 are e0..e7 (Σ 52), weights
  // (10, 9, …, 3) / 52. t1 uniform: ties take e0..e7, weights 1/8.
  // switch_aux = E/(k·T) · Σ count_e · me_e = 10/16 · Σ_{e<8} 2 · (p0_e/55 + 1/10) / 2
  //            = 10/16 · (52/55 + 0.8) = 12/11.
  hand_router h(hand_router::log_of({{10, 9, 8, 7, 6, 5, 4, 3, 2, 1}, std::vector<double>(10, 1)}),
                8);
  auto const s = h.route(gating::preset::qwen3{}, {});
  std::vector<double> w0;
  for (int p = 10; p >= 3; --p) w0.push_back(p / 52.0);
  expect_routing(h, {{0, 1, 2, 3, 4, 5, 6, 7}, {0, 1, 2, 3, 4, 5, 6, 7}},
                 {slots(8, 0), slots(8, 1)}, {w0, std::vector<double>(8, 0.125)});
  CHECK(s.capacity == 2);
  CHECK(s.dropped == 0);
  CHECK(s.aux_loss == Approx(12.0 / 11));
}
