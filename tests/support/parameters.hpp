// SPDX-License-Identifier: Apache-2.0
#pragma once
// A layer's owned parameters (moe::host_parameters) filled the tests' way: values from the
// test's own generator and scale (random.hpp's, never near zero), and gradients poisoned so
// that one never written shows.

#include "random.hpp"

#include <moe/layer/parameters.hpp>

#include <cstddef>
#include <random>

namespace moe::test {

/// Every present tensor's values uniform in [-scale, scale], drawn in the order of
/// `parameter_shapes`.
template <class Layer, class T, class G>
void randomize(host_parameters<Layer, T, G>& w, std::mt19937_64& rng, double scale) {
  for (std::size_t i = 0; i < w.shapes().size(); ++i) randomize(w.values(i), rng, scale);
}

/// Fills every gradient, padding included, with the poison pattern.
template <class Layer, class T, class G>
void poison_gradients(host_parameters<Layer, T, G>& w) {
  poison(w.gradients_bytes());
}

/// True when no gradient has been written since poison_gradients.
template <class Layer, class T, class G>
[[nodiscard]] bool gradients_poisoned(host_parameters<Layer, T, G> const& w) {
  return is_poisoned(w.gradients_bytes());
}

}  // namespace moe::test
