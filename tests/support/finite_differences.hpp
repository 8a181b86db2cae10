// SPDX-License-Identifier: Apache-2.0
#pragma once
// The central-difference check of the host backend's gradients, shared by the expert, layer
// and gating tests.

#include "random.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace moe::test {

/// Checks every element of `values[n]` against `gradients[n]` by central differences of
/// `objective` (a double() callable that reads the values), to 1e-6 relative to the larger
/// of 1, |analytic| and |numeric|; `names[n]` names tensor n in the failure message.
template <class Objective>
void check_gradients(Objective&& objective, std::vector<host_tensor<double>*> const& values,
                     std::vector<host_tensor<double>*> const& gradients,
                     std::vector<char const*> const& names) {
  double const eps = 1e-6;
  auto numeric = [&](double& v) {
    double const saved = v;
    v = saved + eps;
    double const up = objective();
    v = saved - eps;
    double const down = objective();
    v = saved;
    return (up - down) / (2 * eps);
  };
  for (std::size_t n = 0; n < values.size(); ++n)
    for (std::size_t i = 0; i < values[n]->data.size(); ++i) {
      double const analytic = gradients[n]->data[i];
      double const numeric_value = numeric(values[n]->data[i]);
      double const scale = std::max({1.0, std::abs(analytic), std::abs(numeric_value)});
      INFO(names[n] << "[" << i << "]: analytic " << analytic << ", numeric " << numeric_value);
      CHECK(std::abs(analytic - numeric_value) <= 1e-6 * scale);
    }
}

}  // namespace moe::test
