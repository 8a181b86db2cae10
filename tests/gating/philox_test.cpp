// SPDX-License-Identifier: Apache-2.0
// The counter-based RNG of gating: Philox-4x32-10 against Random123's known answers, the
// exact uniforms, the normal and jitter draws pinned to the bits a CUDA kernel must
// reproduce, their statistics, and the expert-bias update.

#include <doctest/doctest.h>

#include <moe/gating.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

using namespace moe;
using namespace moe::gating;
using doctest::Approx;

// Random123's kat_vectors for philox4x32_10, at compile time.
static_assert(philox4x32_10({{0, 0, 0, 0}}, {{0, 0}}).w[0] == 0x6627e8d5u);
static_assert(philox4x32_10({{0, 0, 0, 0}}, {{0, 0}}).w[3] == 0x9b00dbd8u);

TEST_CASE("Philox-4x32-10 reproduces Random123's known-answer vectors") {
  auto const check = [](philox_block counter, philox_key key, std::array<std::uint32_t, 4> want) {
    philox_block const got = philox4x32_10(counter, key);
    for (int i = 0; i < 4; ++i) CHECK(got.w[i] == want[static_cast<std::size_t>(i)]);
  };
  check({{0, 0, 0, 0}}, {{0, 0}}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8});
  check({{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}}, {{0xffffffff, 0xffffffff}},
        {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd});
  check({{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}}, {{0xa4093822, 0x299f31d0}},
        {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1});
}

TEST_CASE("the counter layout: (token lo, token hi, column, stream | attempt << 8), key = seed") {
  std::uint64_t const seed = 0x0123456789abcdefULL;
  std::int64_t const token = 0x0000000500000007LL;
  philox_block const direct = philox4x32_10({{7, 5, 9, 4 | (2u << 8)}}, {{0x89abcdef, 0x01234567}});
  philox_block const b = rng_block(seed, token, 9, rng_stream::random_routing, 2);
  for (int i = 0; i < 4; ++i) CHECK(b.w[i] == direct.w[i]);
}

TEST_CASE("uniforms are exact 53-bit fractions in [0, 1)") {
  static_assert(uniform_of(0, 0) == 0.0);
  // All ones: (2^27 − 1) · 2^26 + (2^26 − 1) = 2^53 − 1, times 2^−53.
  static_assert(uniform_of(0xffffffffu, 0xffffffffu) == 1.0 - 0x1.0p-53);
  static_assert(uniform_of(1u << 5, 0) == 0x1.0p-27);
  // Pinned values (a kernel must produce these bits): (seed 42, token 3, column 1, stream 4).
  CHECK(rng_uniform(42, 3, 1, rng_stream::random_routing) == 0x1.33d4bfc6a28fp-1);
  double sum = 0;
  for (int t = 0; t < 10000; ++t) {
    double const u = rng_uniform(11, t, 0, rng_stream::random_priority);
    CHECK((u >= 0 && u < 1));
    sum += u;
  }
  CHECK(sum / 10000 == Approx(0.5).epsilon(0.02));
}

TEST_CASE("normal draws: pinned bits, and mean 0, variance 1") {
  // These bits are the definition a CUDA kernel reproduces (Marsaglia's polar method with
  // the log of philox.hpp, every operation IEEE-rounded): any difference is a bug, whatever
  // the compiler's contraction flags.
  CHECK(rng_normal(42, 0, 5, rng_stream::logit_noise) == 0x1.42f796a33e8bp+0);
  CHECK(rng_normal(42, 1, 5, rng_stream::logit_noise) == 0x1.bf4d26588cfd8p-2);
  CHECK(rng_normal(42, 2, 5, rng_stream::logit_noise) == 0x1.c2f4d38ccf10bp-2);
  CHECK(rng_normal(42, 3, 5, rng_stream::logit_noise) == -0x1.9bdd2eb5a8c76p-3);
  int const n = 100000;
  double mean = 0, square = 0;
  for (int i = 0; i < n; ++i) {
    double const z = rng_normal(1, i, 0, rng_stream::logit_noise);
    mean += z;
    square += z * z;
  }
  mean /= n;
  CHECK(std::abs(mean) < 0.02);  // 5 standard errors
  CHECK(square / n == Approx(1.0).epsilon(0.03));
  // Different streams, columns and seeds give different numbers.
  CHECK(rng_normal(42, 0, 5, rng_stream::logit_noise) !=
        rng_normal(42, 0, 6, rng_stream::logit_noise));
  CHECK(rng_normal(42, 0, 5, rng_stream::logit_noise) !=
        rng_normal(43, 0, 5, rng_stream::logit_noise));
}

TEST_CASE("the log behind the normal is accurate to a few ulps") {
  for (double s : {1e-30, 1e-5, 0.1, 0.3, 0.5, 0.7071, 0.75, 0.999999, 1.0})
    CHECK(gating::detail::log_of(s) == Approx(std::log(s)).epsilon(1e-15));
  CHECK(gating::detail::log_of(1.0) == 0.0);
}

TEST_CASE("jitter factors lie in [1 − ε, 1 + ε] and are pinned") {
  CHECK(jitter_factor(0.1f, 42, 2, 7, rng_stream::jitter_input) == 0x1.1852f7d3cf35dp+0);
  double lo = 2, hi = 0;
  for (int t = 0; t < 5000; ++t) {
    double const f = jitter_factor(0.25f, 3, t, 1, rng_stream::jitter_logits);
    lo = std::min(lo, f);
    hi = std::max(hi, f);
  }
  CHECK(lo >= 0.75);
  CHECK(hi <= 1.25);
  CHECK(lo < 0.76);  // the range is used
  CHECK(hi > 1.24);
  CHECK(jitter_factor(0.0f, 3, 1, 1, rng_stream::jitter_logits) == 1.0);
}

TEST_CASE("random routing keeps the 2nd expert iff 2·g2 > u") {
  double const u = rng_uniform(42, 3, 1, rng_stream::random_routing);  // 0.6012…
  CHECK(keeps_second_expert(0.31, 42, 3));                             // 0.62 > 0.6012
  CHECK(!keeps_second_expert(0.30, 42, 3));                            // 0.60 < 0.6012
  CHECK(keeps_second_expert(u / 2 + 1e-9, 42, 3));
  CHECK(!keeps_second_expert(u / 2, 42, 3));      // equal is not greater
  static_assert(keeps_second_expert(0.5, 1, 1));  // 2·0.5 = 1 > any u < 1
  static_assert(!keeps_second_expert(0.0, 1, 1));
}

TEST_CASE("expert-bias update: b_e += rate · sign(mean load − load_e)") {
  // Loads (6, 2, 4, 4): mean 4; expert 0 is overloaded, 1 underloaded, 2 and 3 even.
  std::array<std::int64_t, 4> const load{6, 2, 4, 4};
  std::array<float, 4> bias{0.5f, 0.5f, 0.5f, -1.0f};
  update_expert_bias(bias, load, 0.125f);
  CHECK(bias[0] == 0.375f);
  CHECK(bias[1] == 0.625f);
  CHECK(bias[2] == 0.5f);
  CHECK(bias[3] == -1.0f);
  static_assert(expert_bias_step(3, 2.5, 1.0f) == -1.0f);
  static_assert(expert_bias_step(2, 2.5, 1.0f) == 1.0f);
  static_assert(expert_bias_step(2, 2.0, 1.0f) == 0.0f);
}
