// SPDX-License-Identifier: Apache-2.0
#pragma once
// The central-difference check of the host backend's gradients, shared by the expert, layer
// and gating tests.

#include "random.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

namespace moe::test {

/// ∂objective/∂v by central differences with step 1e-6; v is restored.
template <class Objective>
double central_difference(Objective&& objective, double& v) {
  double const eps = 1e-6, saved = v;
  v = saved + eps;
  double const up = objective();
  v = saved - eps;
  double const down = objective();
  v = saved;
  return (up - down) / (2 * eps);
}

/// Checks an analytic derivative against a numeric one, to 1e-6 relative to the larger of
/// 1, |analytic| and |numeric|.
inline void expect_derivative(double analytic, double numeric) {
  double const scale = std::max({1.0, std::abs(analytic), std::abs(numeric)});
  INFO("analytic " << analytic << ", numeric " << numeric);
  CHECK(std::abs(analytic - numeric) <= 1e-6 * scale);
}

/// Checks every element of `values[n]` against `gradients[n]` by central differences of
/// `objective` (a double() callable that reads the values); `names[n]` names tensor n in
/// the failure message.
template <class Objective>
void check_gradients(Objective&& objective, std::vector<span<double>> const& values,
                     std::vector<span<double>> const& gradients,
                     std::vector<std::string> const& names) {
  for (std::size_t n = 0; n < values.size(); ++n)
    for (std::size_t i = 0; i < values[n].size(); ++i) {
      INFO(names[n] << "[" << i << "]");
      expect_derivative(gradients[n][i], central_difference(objective, values[n][i]));
    }
}

}  // namespace moe::test
