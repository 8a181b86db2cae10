// SPDX-License-Identifier: Apache-2.0
#pragma once
// Owned parameters (or gradients) of a layer with two-GEMM experts, for tests: the gate
// weight and W1, b1, W2, b2 of every expert, W1 and b1 of width F1 (F for expert::ffn, 2·F
// for expert::glu, whose W13 and b13 they then hold).

#include "random.hpp"

#include <moe/moe.hpp>

#include <vector>

namespace moe::test {

template <class T>
struct layer_storage {
  index_t hidden, ffn, experts;
  bool biases;
  index_t first_width;  // F1
  host_tensor<T> gate_weight{hidden * experts};
  host_tensor<T> w1{experts * hidden * first_width};
  host_tensor<T> b1{biases ? experts * first_width : 0};
  host_tensor<T> w2{experts * ffn * hidden};
  host_tensor<T> b2{biases ? experts * hidden : 0};

  /// Storage for `Expert`'s parameters (F1 = Expert::first_width); expert::ffn by default.
  template <class Expert = expert::ffn<act::relu>>
  layer_storage(layer_args const& a, bool with_biases, Expert = {})
      : hidden(a.hidden),
        ffn(a.ffn),
        experts(a.gate.experts),
        biases(with_biases),
        first_width(Expert::first_width({a.gate.experts, a.hidden, a.ffn})) {}

  template <class Expert, class U>
  layer_params<U, Expert> views_as() {
    auto bias = [&](host_tensor<T>& b, index_t width) {
      return biases ? make_view(static_cast<U*>(b.data.data()), experts, width) : matrix_view<U>{};
    };
    return {make_view(static_cast<U*>(gate_weight.data.data()), hidden, experts),
            {make_view(static_cast<U*>(w1.data.data()), experts, hidden, first_width),
             bias(b1, first_width),
             make_view(static_cast<U*>(w2.data.data()), experts, ffn, hidden), bias(b2, hidden)}};
  }
  template <class Expert>
  auto params() {
    return views_as<Expert, T const>();
  }
  template <class Expert>
  auto gradients() {
    return views_as<Expert, T>();
  }

  /// Every tensor, for loops over all parameters.
  std::vector<host_tensor<T>*> all() { return {&gate_weight, &w1, &b1, &w2, &b2}; }

  void randomize(std::mt19937_64& rng, double scale) {
    for (auto* t : all()) t->randomize(rng, scale);
  }
};

}  // namespace moe::test
