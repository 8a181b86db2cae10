// SPDX-License-Identifier: Apache-2.0
#pragma once
// Size arithmetic that cannot overflow: products and sums of sizes (tokens, widths, rows,
// capacities) and the float-to-integer step of the capacity rules. A result that does not fit
// index_t saturates at `size_overflow`, and every later step keeps it there, so that a chain
// of size math ends either in the exact value or in `size_overflow`, which the checks of the
// entry points reject. constexpr and host/device: the kernels share the capacity math.

#include <moe/core/config.hpp>
#include <moe/core/view.hpp>

namespace moe {

/// What size arithmetic returns for a value that does not fit index_t (or is not a size).
inline constexpr index_t size_overflow = 0x7fffffffffffffff;

/// a · b of two sizes (≥ 0), or `size_overflow` when it does not fit or an operand is
/// negative or already `size_overflow`.
MOE_HOST_DEVICE constexpr index_t checked_mul(index_t a, index_t b) noexcept {
  if (a < 0 || b < 0 || a == size_overflow || b == size_overflow) return size_overflow;
  if (a == 0 || b == 0) return 0;
  return a > size_overflow / b ? size_overflow : a * b;
}

/// a + b of two sizes (≥ 0), or `size_overflow` as `checked_mul`.
MOE_HOST_DEVICE constexpr index_t checked_add(index_t a, index_t b) noexcept {
  if (a < 0 || b < 0 || a == size_overflow || b == size_overflow) return size_overflow;
  return a > size_overflow - b ? size_overflow : a + b;
}

/// ⌈a / b⌉ for a ≥ 0 and b > 0, without the overflow of a + b − 1.
MOE_HOST_DEVICE constexpr index_t ceil_div(index_t a, index_t b) noexcept {
  return a / b + (a % b > 0 ? 1 : 0);
}

/// `value` rounded up to a multiple of `multiple`, or `size_overflow` when that does not fit.
MOE_HOST_DEVICE constexpr index_t round_up(index_t value, index_t multiple) noexcept {
  return multiple > 1 ? checked_mul(ceil_div(value, multiple), multiple) : value;
}

/// ⌊x⌋ of a non-negative double, or `size_overflow` when x is negative, NaN or at least 2^63
/// (where the conversion to index_t would be undefined).
MOE_HOST_DEVICE constexpr index_t checked_floor(double x) noexcept {
  constexpr double two_to_63 = 9223372036854775808.0;
  return x >= 0 && x < two_to_63 ? static_cast<index_t>(x) : size_overflow;
}

/// ⌈x⌉ of a non-negative double, or `size_overflow` as `checked_floor`.
MOE_HOST_DEVICE constexpr index_t checked_ceil(double x) noexcept {
  index_t const i = checked_floor(x);
  return i != size_overflow && static_cast<double>(i) < x ? checked_add(i, 1) : i;
}

static_assert(checked_mul(3, index_t{1} << 62) == size_overflow);
static_assert(checked_mul(size_overflow, 0) == size_overflow && checked_mul(0, 7) == 0);
static_assert(checked_add(size_overflow - 1, 1) == size_overflow && checked_add(2, 3) == 5);
static_assert(checked_floor(1e30) == size_overflow && checked_floor(2.5) == 2);
static_assert(checked_ceil(2.5) == 3 && checked_ceil(-1.0) == size_overflow);

}  // namespace moe
