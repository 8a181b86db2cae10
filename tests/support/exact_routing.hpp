// SPDX-License-Identifier: Apache-2.0
#pragma once
// Inputs on which the host and CUDA backends route alike. Routing is discontinuous, so x and
// W_gate lie on dyadic grids (x = ±i/8, i = 1..8; W_gate = ±m/2^(6+s), m = 1..64, s growing
// with H): every logit is then exact in float, from float and bfloat16 operands alike, and
// both backends select, slot and drop the same assignments.

#include <moe/core/dtype.hpp>
#include <moe/core/view.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace moe::test {

/// ±i/8, i = 1..8: exact in every element type.
template <class T>
void fill_x(std::vector<T>& x, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> i(1, 8), sign(0, 1);
  for (auto& v : x) v = from_accumulate<T>(static_cast<float>(sign(rng) ? i(rng) : -i(rng)) / 8);
}

/// ±m/2^(6+s), m = 1..64, s = max(0, ⌊log2(H)/2⌋ − 1): the logits stay O(1), and every
/// product x·w and every partial sum of H of them is exact in float.
template <class T>
void fill_gate(span<T> w, index_t hidden, std::mt19937_64& rng) {
  int const s =
      std::max(0, static_cast<int>(std::bit_width(static_cast<std::uint64_t>(hidden)) - 1) / 2 - 1);
  float const unit = std::ldexp(1.0f, -(6 + s));
  std::uniform_int_distribution<int> m(1, 64), sign(0, 1);
  for (auto& v : w) v = from_accumulate<T>(static_cast<float>(sign(rng) ? m(rng) : -m(rng)) * unit);
}

}  // namespace moe::test
