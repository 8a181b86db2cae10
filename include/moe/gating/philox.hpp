// SPDX-License-Identifier: Apache-2.0
#pragma once
// The counter-based RNG of gating: Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11; the
// generator of Random123 and cuRAND's Philox4_32_10), keyed by the call's seed and counted
// by (token, column, stream, attempt). Every random number of routing is a pure function of
// those, so the host backend and a CUDA kernel draw the same numbers bit for bit, in any
// order, with no state. The definition, which a kernel must reproduce exactly:
//
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(token), hi32(token), column, stream | attempt << 8)
//   words   = philox4x32_10(counter, key)                        (four uint32)
//   uniform = ((w0 >> 5) · 2^26 + (w1 >> 6)) · 2^−53             in [0, 1), 53 bits, exact
//             (the second uniform of a block uses w2, w3)
//   normal  = Marsaglia's polar method on attempt a = 0, 1, …: v1 = 2·u1 − 1, v2 = 2·u2 − 1
//             from block a, s = fma(v1, v1, v2·v2); accept 0 < s < 1 and return
//             v1 · sqrt(−2·ln(s) / s), with ln as `detail::log_of` below.
//
// Streams and columns: `rng_stream` names them. The uniforms and Philox are constexpr; the
// normal and the jitter factor use fma, sqrt and division, each one IEEE-rounded operation
// written out (no a·b + c left for a compiler to contract), so the host (std::fma) and the
// device (__fma_rn, __dsqrt_rn, __ddiv_rn) agree bit for bit whatever the contraction flags.

#include <moe/core/config.hpp>

#include <cmath>
#include <cstdint>

namespace moe::gating {

/// Four 32-bit words: a Philox counter or one block of output.
struct philox_block {
  std::uint32_t w[4] = {};
};

/// Philox's key: two 32-bit words.
struct philox_key {
  std::uint32_t w[2] = {};
};

/// Philox-4x32 with 10 rounds (Random123's philox4x32_R(10, ...)).
MOE_HOST_DEVICE constexpr philox_block philox4x32_10(philox_block counter,
                                                     philox_key key) noexcept {
  constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
  constexpr std::uint32_t bump0 = 0x9E3779B9u, bump1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key.w[0] += bump0;
      key.w[1] += bump1;
    }
    std::uint64_t const p0 = static_cast<std::uint64_t>(m0) * counter.w[0];
    std::uint64_t const p1 = static_cast<std::uint64_t>(m1) * counter.w[2];
    auto const hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
    auto const hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
    counter = {{hi1 ^ counter.w[1] ^ key.w[0], lo1, hi0 ^ counter.w[3] ^ key.w[1], lo0}};
  }
  return counter;
}

/// What a random number of routing is for: the fourth counter word's low byte, so that the
/// uses never share a number.
enum class rng_stream : std::uint32_t {
  logit_noise = 1,      ///< Gaussian logit noise; column = expert
  jitter_input = 2,     ///< jitter of x; column = hidden index
  jitter_logits = 3,    ///< jitter of the logits; column = expert
  random_routing = 4,   ///< GShard's 2nd-expert draw; column = 1 (the choice)
  random_priority = 5,  ///< the random slot priority; column = choice j
  parameter_init = 6,   ///< moe::initializer's draws; token = element, column = tensor
};

/// The Philox block of (seed, token, column, stream, attempt).
MOE_HOST_DEVICE constexpr philox_block rng_block(std::uint64_t seed, std::int64_t token,
                                                 std::uint32_t column, rng_stream stream,
                                                 std::uint32_t attempt = 0) noexcept {
  auto const t = static_cast<std::uint64_t>(token);
  philox_block const counter{{static_cast<std::uint32_t>(t), static_cast<std::uint32_t>(t >> 32),
                              column, static_cast<std::uint32_t>(stream) | (attempt << 8)}};
  return philox4x32_10(
      counter, {{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)}});
}

/// A uniform double in [0, 1) from two words: 53 random bits, exactly representable.
MOE_HOST_DEVICE constexpr double uniform_of(std::uint32_t a, std::uint32_t b) noexcept {
  std::uint64_t const bits = (static_cast<std::uint64_t>(a >> 5) << 26) | (b >> 6);
  return static_cast<double>(bits) * 0x1.0p-53;
}

/// The uniform in [0, 1) of (seed, token, column, stream): words 0 and 1 of its block.
MOE_HOST_DEVICE constexpr double rng_uniform(std::uint64_t seed, std::int64_t token,
                                             std::uint32_t column, rng_stream stream) noexcept {
  philox_block const b = rng_block(seed, token, column, stream);
  return uniform_of(b.w[0], b.w[1]);
}

namespace detail {

// One IEEE-rounded operation each, never fused with a neighbour: the device intrinsics say
// so explicitly; on the host a call to std::fma cannot be contracted further.
MOE_HOST_DEVICE inline double fma_rn(double a, double b, double c) noexcept {
#if MOE_DEVICE_COMPILATION
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

MOE_HOST_DEVICE inline double mul_rn(double a, double b) noexcept {
#if MOE_DEVICE_COMPILATION
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

MOE_HOST_DEVICE inline double div_rn(double a, double b) noexcept {
#if MOE_DEVICE_COMPILATION
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

MOE_HOST_DEVICE inline double sqrt_rn(double a) noexcept {
#if MOE_DEVICE_COMPILATION
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

/// ln(s) for 0 < s < 2^1023, to about one ulp, from exact scalings, IEEE-rounded basic
/// operations and fma only: s = m · 2^e with m in [√½, √2) (exact doublings), then
/// ln m = 2·atanh(f), f = (m − 1)/(m + 1), by its series Σ f^(2i+1)/(2i+1), i ≤ 11 (|f| ≤
/// 0.1716: the next term is below 2^−60), in Horner form; ln s = fma(e, ln 2, ln m).
MOE_HOST_DEVICE inline double log_of(double s) noexcept {
  constexpr double sqrt_half = 0.70710678118654752440, sqrt_two = 1.41421356237309504880;
  constexpr double ln2 = 0.69314718055994530942;
  int e = 0;
  while (s < sqrt_half) {
    s *= 2;
    --e;
  }
  while (s >= sqrt_two) {
    s *= 0.5;
    ++e;
  }
  double const f = div_rn(s - 1, s + 1);
  double const f2 = mul_rn(f, f);
  constexpr double c[12] = {1.0,      1.0 / 3,  1.0 / 5,  1.0 / 7,  1.0 / 9,  1.0 / 11,
                            1.0 / 13, 1.0 / 15, 1.0 / 17, 1.0 / 19, 1.0 / 21, 1.0 / 23};
  double p = c[11];
  for (int i = 10; i >= 0; --i) p = fma_rn(p, f2, c[i]);
  return fma_rn(static_cast<double>(e), ln2, mul_rn(2 * f, p));
}

}  // namespace detail

/// A standard normal variate of (seed, token, column, stream) by Marsaglia's polar method
/// (see the top of this file). The acceptance rate is π/4; after 64 rejected attempts
/// (probability below 10^−42) it returns 0.
MOE_HOST_DEVICE inline double rng_normal(std::uint64_t seed, std::int64_t token,
                                         std::uint32_t column, rng_stream stream) noexcept {
  for (std::uint32_t attempt = 0; attempt < 64; ++attempt) {
    philox_block const b = rng_block(seed, token, column, stream, attempt);
    double const v1 = 2 * uniform_of(b.w[0], b.w[1]) - 1;  // exact: u has 53 bits
    double const v2 = 2 * uniform_of(b.w[2], b.w[3]) - 1;
    double const s = detail::fma_rn(v1, v1, detail::mul_rn(v2, v2));
    if (s > 0 && s < 1)
      return detail::mul_rn(
          v1, detail::sqrt_rn(detail::div_rn(detail::mul_rn(-2, detail::log_of(s)), s)));
  }
  return 0;
}

/// The multiplicative jitter factor U[1 − ε, 1 + ε] of (seed, token, column, stream):
/// fma(2ε, u, 1 − ε), ε widened from float.
MOE_HOST_DEVICE inline double jitter_factor(float epsilon, std::uint64_t seed, std::int64_t token,
                                            std::uint32_t column, rng_stream stream) noexcept {
  double const eps = static_cast<double>(epsilon);
  return detail::fma_rn(2 * eps, rng_uniform(seed, token, column, stream), 1 - eps);
}

}  // namespace moe::gating
