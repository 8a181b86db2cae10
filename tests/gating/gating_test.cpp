// SPDX-License-Identifier: Apache-2.0
// Hand-computed cases of the host backend of gating: scores, top-k and its ties, capacity,
// choice-major priority and dropping, renormalisation, and the losses.

#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <moe/gating.hpp>

#include <array>
#include <cmath>
#include <string>
#include <vector>

using namespace moe;
using doctest::Approx;

TEST_CASE("softmax over all experts, and its backward") {
  std::array<double, 3> const logits{0, std::log(2.0), std::log(3.0)};
  std::array<double, 3> scores{};
  gating::softmax::apply(logits, scores);
  CHECK(scores[0] == Approx(1.0 / 6));
  CHECK(scores[1] == Approx(2.0 / 6));
  CHECK(scores[2] == Approx(3.0 / 6));
  // A large common offset changes nothing (the max is subtracted first).
  std::array<double, 3> const shifted{1000, 1000 + std::log(2.0), 1000 + std::log(3.0)};
  std::array<double, 3> same{};
  gating::softmax::apply(shifted, same);
  CHECK(same[2] == Approx(0.5));
  // d_l = s ⊙ (d_s − ⟨s, d_s⟩): with d_s = e_2, d_l = (−s0 s2, −s1 s2, s2 (1 − s2)).
  std::array<double, 3> const d_scores{0, 0, 1};
  std::array<double, 3> d_logits{};
  gating::softmax::backward(scores, d_scores, d_logits);
  CHECK(d_logits[0] == Approx(-1.0 / 12));
  CHECK(d_logits[1] == Approx(-1.0 / 6));
  CHECK(d_logits[2] == Approx(0.25));
  CHECK(gating::logsumexp(logits) == Approx(std::log(6.0)));
}

TEST_CASE("top-k selects by descending score; ties go to the lower expert index") {
  auto select = [](std::vector<double> const& scores, int k) {
    std::vector<std::int32_t> experts(static_cast<std::size_t>(k));
    gating::select_top_k(scores, experts);
    return experts;
  };
  CHECK(select({0.1, 0.5, 0.3, 0.1}, 2) == std::vector<std::int32_t>{1, 2});
  CHECK(select({0.25, 0.25, 0.25, 0.25}, 2) == std::vector<std::int32_t>{0, 1});
  CHECK(select({0.1, 0.4, 0.1, 0.4}, 3) == std::vector<std::int32_t>{1, 3, 0});
  CHECK(select({0.2, 0.3}, 2) == std::vector<std::int32_t>{1, 0});
  CHECK(select({NAN, 0.2, 0.5}, 2) == std::vector<std::int32_t>{2, 1});
  CHECK(select({0.7}, 1) == std::vector<std::int32_t>{0});
}

TEST_CASE("capacity follows Tutel: k·⌊f·⌈T/E⌉⌋, dynamic when f ≤ 0, then aligned") {
  gating::capacity_args a{.tokens = 10, .experts = 4, .k = 2, .factor = 1.25f, .alignment = 1};
  CHECK(gating::resolve_capacity(a, 99) == 6);  // ⌈10/4⌉ = 3, ⌊1.25·3⌋ = 3, times k
  a.alignment = 4;
  CHECK(gating::resolve_capacity(a, 99) == 8);
  a.factor = 0;  // the largest load
  CHECK(gating::resolve_capacity(a, 7) == 8);
  a.alignment = 1;
  CHECK(gating::resolve_capacity(a, 7) == 7);
  a.factor = -1;  // capped by k·⌊1·3⌋ = 6
  CHECK(gating::resolve_capacity(a, 7) == 6);
  a.factor = -2;  // cap 12 does not bind
  CHECK(gating::resolve_capacity(a, 7) == 7);
  CHECK(gating::capacity_bound(a) == 10);  // no load exceeds T
  a.factor = 0.2f;                         // ⌊0.2·3⌋ = 0
  CHECK(gating::resolve_capacity(a, 7) == 0);
  a = {.tokens = 1, .experts = 8, .k = 1, .factor = 1.0f, .alignment = 1};
  CHECK(gating::resolve_capacity(a, 1) == 1);
  static_assert(gating::resolve_capacity(
                    {.tokens = 8, .experts = 2, .k = 1, .factor = 1.0f, .alignment = 1}, 0) == 4);
}

TEST_CASE("capacity: each rule does its framework's arithmetic on the double factor") {
  // f = 1.1 at T = 40, E = 4: T/E · f is 11.000000000000000888 in double (Megatron-Core's
  // get_capacity: ⌈11⌉ = 11) and 11.00000024 in float32 operands, which the float32 product
  // rounds back to 11 (DeepSpeed's _capacity: 11). The float 1.1f widened to double gave 12.
  gating::capacity_args a{.tokens = 40, .experts = 4, .k = 1, .factor = 1.1, .min_capacity = 0};
  a.rounding = gating::capacity_rounding::megatron;
  CHECK(gating::resolve_capacity(a, 0) == 11);
  a.rounding = gating::capacity_rounding::deepspeed;
  CHECK(gating::resolve_capacity(a, 0) == 11);
  a.factor = static_cast<double>(1.1f);         // what a float field used to hold
  CHECK(gating::resolve_capacity(a, 0) == 11);  // DeepSpeed rounds f to float32 anyway
  a.rounding = gating::capacity_rounding::megatron;
  CHECK(gating::resolve_capacity(a, 0) == 12);
  // Where the two differ: T = 25, E = 2, f = 1.2: 12.5 · 1.2 is 15 in double (Megatron: 15)
  // and 12.5 · 1.2000000477 = 15.0000006 in float32 (DeepSpeed: 16).
  a = {.tokens = 25, .experts = 2, .k = 1, .factor = 1.2, .min_capacity = 0};
  a.rounding = gating::capacity_rounding::deepspeed;
  CHECK(gating::resolve_capacity(a, 0) == 16);
  a.rounding = gating::capacity_rounding::megatron;
  CHECK(gating::resolve_capacity(a, 0) == 15);
  // k multiplies f before the float32 rounding: torch.tensor(f · k).
  a = {.tokens = 40, .experts = 4, .k = 2, .factor = 1.1, .min_capacity = 0};
  a.rounding = gating::capacity_rounding::deepspeed;
  CHECK(gating::resolve_capacity(a, 0) == 22);
  a.min_capacity = 30;
  CHECK(gating::resolve_capacity(a, 0) == 30);
}

TEST_CASE("choice-major priority: all 1st choices claim slots before any 2nd choice") {
  // t0 → (0, 1), t1 → (0, 2), t2 → (1, 0), t3 → (0, 1).
  std::array<std::int32_t, 8> const expert{0, 1, 0, 2, 1, 0, 0, 1};
  std::array<std::int64_t, 8> slot{};
  std::array<std::int64_t, 3> load{};
  gating::assign_slots(gating::choice_major{}, make_view(expert.data(), 4, 2),
                       make_view(slot.data(), 4, 2), make_view(load.data(), 3));
  // 1st choices in token order: e0 gets t0, t1, t3 (slots 0, 1, 2), e1 gets t2 (slot 0).
  // 2nd choices: t0 → e1 slot 1, t1 → e2 slot 0, t2 → e0 slot 3, t3 → e1 slot 2.
  CHECK(slot == std::array<std::int64_t, 8>{0, 1, 1, 0, 0, 3, 2, 2});
  CHECK(load == std::array<std::int64_t, 3>{4, 3, 1});
  // With C = 2, t3's 1st choice loses to the earlier tokens' 1st choices, and t2's and
  // t3's 2nd choices lose too: 3 drops, and t3 loses both of its experts.
}

namespace {

/// Routes T = 4 one-hot tokens (H = 4), so that token t's logits are row t of W_gate, set to
/// the logarithms of the wanted score proportions. E = 3, k = 2.
struct hand_routing {
  static constexpr index_t tokens = 4, hidden = 4, experts = 3;
  std::array<double, tokens * hidden> x{};
  std::array<double, hidden * experts> w_gate{};
  host_buffer buffer;
  gating::host_routing r;

  explicit hand_routing(std::array<std::array<double, 3>, 4> const& proportions) {
    for (index_t t = 0; t < tokens; ++t) {
      x[t * hidden + t] = 1;
      for (index_t e = 0; e < experts; ++e) w_gate[t * experts + e] = std::log(proportions[t][e]);
    }
    workspace_carver counter;
    (void)gating::carve_host_routing(counter, tokens, tokens, experts, 2);
    buffer = host_buffer(counter.bytes());
    workspace_carver carver(buffer.view());
    r = gating::carve_host_routing(carver, tokens, tokens, experts, 2);
  }

  gating::routing_summary route(gating::gate_args args) {
    args.tokens = tokens;
    args.experts = experts;
    return gating::route(host, gating::top_k<2>{}, args,
                         make_view(std::as_const(x).data(), tokens, hidden),
                         make_view(std::as_const(w_gate).data(), hidden, experts), r);
  }
};

// Scores: t0 (1/6, 2/6, 3/6), t1 (3/6, 2/6, 1/6), t2 (1/4, 1/4, 2/4), t3 (2/4, 1/4, 1/4).
std::array<std::array<double, 3>, 4> const proportions{
    {{1, 2, 3}, {3, 2, 1}, {1, 1, 2}, {2, 1, 1}}};

}  // namespace

TEST_CASE("route: selection, slots, drops and weights of a hand-worked case") {
  hand_routing h(proportions);
  // f = 0.5: C = 2·⌊0.5·⌈4/3⌉⌋ = 2.
  auto const summary = h.route({.capacity_factor = 0.5f});
  auto const& r = h.r;
  CHECK(summary.capacity == 2);
  // Selections (t2 ties e0 and e1 for 2nd place: e0 wins).
  std::array<std::array<int, 2>, 4> const expected_experts{{{2, 1}, {0, 1}, {2, 0}, {0, 1}}};
  // 1st choices: t0 → e2 s0, t1 → e0 s0, t2 → e2 s1, t3 → e0 s1;
  // 2nd choices: t0 → e1 s0, t1 → e1 s1, t2 → e0 s2 (dropped), t3 → e1 s2 (dropped).
  std::array<std::array<int, 2>, 4> const expected_slots{{{0, 0}, {0, 1}, {1, 2}, {1, 2}}};
  for (index_t t = 0; t < 4; ++t)
    for (int j = 0; j < 2; ++j) {
      CHECK(r.expert(t, j) == expected_experts[t][j]);
      CHECK(r.slot(t, j) == expected_slots[t][j]);
    }
  CHECK(summary.dropped == 2);
  CHECK(r.load(0) == 3);
  CHECK(r.load(1) == 3);
  CHECK(r.load(2) == 2);
  // Without renormalisation the weights are the scores; dropped ones are 0.
  CHECK(r.weight(0, 0) == Approx(0.5));
  CHECK(r.weight(0, 1) == Approx(1.0 / 3));
  CHECK(r.weight(2, 0) == Approx(0.5));
  CHECK(r.weight(2, 1) == 0);
  CHECK(r.weight(3, 1) == 0);
  // aux = E · Σ me·ce; me = (17/48, 14/48, 17/48), ce = (1/2, 0, 1/2): 3 · 17/48.
  CHECK(summary.aux_loss == Approx(51.0 / 48));
  // z = mean of lse²: lse = ln 6, ln 6, ln 4, ln 4.
  double const l6 = std::log(6.0), l4 = std::log(4.0);
  CHECK(summary.z_loss == Approx((l6 * l6 + l4 * l4) / 2));
}

TEST_CASE("route: renormalisation before and after drops") {
  hand_routing h(proportions);
  auto const& r = h.r;
  (void)h.route({.capacity_factor = 0.5f, .normalize = gating::renormalize::before_drops});
  CHECK(r.weight(0, 0) == Approx(0.6));  // 0.5 / (0.5 + 1/3)
  CHECK(r.weight(0, 1) == Approx(0.4));
  CHECK(r.weight(2, 0) == Approx(2.0 / 3));  // 0.5 / (0.5 + 0.25); 2nd choice dropped
  CHECK(r.weight(2, 1) == 0);
  (void)h.route({.capacity_factor = 0.5f, .normalize = gating::renormalize::after_drops});
  CHECK(r.weight(0, 0) == Approx(0.6));
  CHECK(r.weight(2, 0) == Approx(1.0));  // only the kept choice remains
  CHECK(r.weight(3, 0) == Approx(1.0));
  CHECK(r.weight(3, 1) == 0);
}

TEST_CASE("route: enough capacity drops nothing; dynamic capacity is the largest load") {
  hand_routing h(proportions);
  auto summary = h.route({.capacity_factor = 1.0f});  // C = 2·⌊1·2⌋ = 4
  CHECK(summary.capacity == 4);
  CHECK(summary.dropped == 0);
  summary = h.route({.capacity_factor = 0.0f, .capacity_alignment = 2});  // max load 3 → 4
  CHECK(summary.capacity == 4);
  CHECK(summary.dropped == 0);
  summary = h.route({.capacity_factor = -0.5f});  // min(3, 2·⌊0.5·2⌋ = 2)
  CHECK(summary.capacity == 2);
  CHECK(summary.dropped == 2);
}

TEST_CASE("uniform routing gives an aux loss of exactly 1") {
  hand_routing h({{{1, 1, 1}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1}}});
  auto const summary = h.route({.capacity_factor = 2.0f});
  CHECK(summary.aux_loss == Approx(1.0));
  CHECK(summary.z_loss == Approx(std::log(3.0) * std::log(3.0)));
}

TEST_CASE("gates check k against the experts") {
  CHECK(gating::top_k<2>{}.can_implement({.experts = 4}).ok());
  CHECK(gating::top_k<2>{}.can_implement({.experts = 4, .k = 2}).ok());
  CHECK(gating::top_k<2>{}.can_implement({.experts = 4, .k = 3}).argument() == "k");
  CHECK(gating::top_k<8>{}.can_implement({.experts = 4}).argument() == "k");
  CHECK(gating::top_any<>{}.can_implement({.experts = 4, .k = 0}).argument() == "k");
  CHECK(gating::top_any<>{}.can_implement({.experts = 40, .k = 33}).argument() == "k");
  CHECK(gating::top_any<>{}.can_implement({.experts = 0, .k = 1}).argument() == "experts");
  CHECK(gating::top_any<>{}.k({.k = 3}) == 3);
  static_assert(gating::top_k<4>::static_k == 4);
}

TEST_CASE("a null expert bias behind a non-empty span is rejected before any read") {
  gating::gate_args const null_bias{
      .experts = 3, .expert_bias = span<float const>(static_cast<float const*>(nullptr), 3)};
  CHECK(gating::top_k<2>{}.can_implement(null_bias).argument() == "expert_bias");
  hand_routing h(proportions);
  try {
    (void)h.route(null_bias);  // once read the bias through the null pointer
    FAIL("no exception; expected one naming 'expert_bias'");
  } catch (moe::invalid_argument const& e) {
    CHECK(e.argument() == "expert_bias");
    // route is a public entry point: the error names the line that called it (in the tests),
    // and keeps the library's check in where().
    REQUIRE(e.called_from().has_value());
    CHECK(std::string(e.called_from()->file_name()).find("include/moe/") == std::string::npos);
    CHECK(std::string(e.where().file_name()).find("include/moe/") != std::string::npos);
  }
}

TEST_CASE("capacity saturates instead of overflowing") {
  gating::capacity_args const a{.tokens = 16, .experts = 4, .k = 2, .factor = 1e30f};
  CHECK(gating::capacity_bound(a) == size_overflow);  // the float-to-integer step was undefined
  gating::capacity_args aligned{.tokens = 16, .experts = 4, .k = 2, .factor = 1.0f};
  aligned.alignment = index_t{1} << 62;
  CHECK(gating::capacity_bound(aligned) == index_t{1} << 62);
  aligned.groups = 4;
  CHECK(gating::capacity_bound(aligned) == size_overflow);
  gating::capacity_args many{.tokens = size_overflow - 1, .experts = 3, .k = 2, .factor = 1.0f};
  CHECK(ceil_div(size_overflow - 1, 3) == 3074457345618258602);  // S + E − 1 overflowed
  CHECK(gating::capacity_bound(many) > size_overflow / 2);       // ≈ 2·⌈S/3⌉, in double
  CHECK(gating::capacity_bound(many) < size_overflow);
  many.rounding = gating::capacity_rounding::megatron;  // S·k overflowed: ⌈2S/3⌉ now
  CHECK(gating::capacity_bound(many) > size_overflow / 2);
  CHECK(gating::capacity_bound(many) < size_overflow - 1);
}

// Near-misses: each lacks one thing a gate needs.
namespace {
struct no_tag {
  using score_function = gating::softmax;
  using priority = gating::choice_major;
  int k(gating::gate_args const&) const { return 1; }
  status can_implement(gating::gate_args const&) const { return {}; }
};
struct no_priority {
  using moe_concept = gating::gate_tag;
  using score_function = gating::softmax;
  int k(gating::gate_args const&) const { return 1; }
  status can_implement(gating::gate_args const&) const { return {}; }
};
struct no_k : gating::top_k<1> {
  void k() const {}
};
}  // namespace
static_assert(!gating::gate<no_tag>);
static_assert(!gating::gate<no_priority>);
static_assert(!gating::gate<no_k>);
static_assert(!gating::gate<int>);
static_assert(gating::gate<gating::top_any<gating::softmax, gating::choice_major>>);
