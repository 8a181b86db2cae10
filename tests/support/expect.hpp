// SPDX-License-Identifier: Apache-2.0
#pragma once
// The shared checks of the tests: a bad-input call must throw moe::invalid_argument naming
// the argument that is wrong; results compared with a reference within a tolerance relative
// to its scale, or bit for bit.

#include <moe/core/dtype.hpp>
#include <moe/core/error.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

namespace moe::test {

/// Expects `call` to throw invalid_argument naming `argument`; returns its message ("" when
/// nothing was thrown), for further checks.
template <class Call>
std::string expect_rejected(Call&& call, std::string const& argument) {
  try {
    call();
    FAIL("no exception; expected one naming '" << argument << "'");
  } catch (moe::invalid_argument const& e) {
    INFO(e.what());
    CHECK(e.argument() == argument);
    return e.what();
  }
  return {};
}

/// The argument that `call`'s moe::invalid_argument names, or "(no exception)".
template <class Call>
std::string rejected_argument(Call&& call) {
  try {
    call();
  } catch (moe::invalid_argument const& e) {
    return e.argument();
  }
  return "(no exception)";
}

/// The elements of `v` in double, through their accumulate type.
template <class T>
std::vector<double> widen(std::vector<T> const& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(to_accumulate(v[i]));
  return out;
}

template <class T>
bool same_bits(std::vector<T> const& a, std::vector<T> const& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

/// Every element within tolerance · (|reference| + RMS(reference)); NaN (poison) never is.
inline void expect_close(std::vector<double> const& reference, std::vector<double> const& got,
                         double tolerance, std::string const& what) {
  REQUIRE(reference.size() == got.size());
  double squares = 0;
  for (double v : reference) squares += v * v;
  double const rms =
      reference.empty() ? 0 : std::sqrt(squares / static_cast<double>(reference.size()));
  std::size_t bad = 0, first_bad = 0;
  for (std::size_t i = 0; i < reference.size(); ++i)
    if (!(std::abs(got[i] - reference[i]) <= tolerance * (std::abs(reference[i]) + rms))) {
      if (bad++ == 0) first_bad = i;
    }
  INFO(what << ": " << bad << " of " << reference.size() << " elements off (tolerance " << tolerance
            << ", rms " << rms << "); first at " << first_bad << ": got "
            << (bad ? got[first_bad] : 0.0) << ", expected " << (bad ? reference[first_bad] : 0.0));
  CHECK(bad == 0);
}

}  // namespace moe::test
