// SPDX-License-Identifier: Apache-2.0
#pragma once
// What the two-GEMM experts' tests share: owned parameters of either policy (W1 of width F1:
// F for ffn, 2·F for glu), an owned host state, and one run of a hand-computed case.

#include "../support/finite_differences.hpp"
#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <moe/expert.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace moe::test {

/// Owned parameters (or gradients) of a bank of two-GEMM experts of first-GEMM width `width`.
template <class T>
struct two_layer_tensors {
  expert::expert_shape shape;
  index_t width;
  bool biases;
  host_tensor<T> w1{shape.experts * shape.hidden * width};
  host_tensor<T> b1{biases ? shape.experts * width : 0};
  host_tensor<T> w2{shape.experts * shape.ffn * shape.hidden};
  host_tensor<T> b2{biases ? shape.experts * shape.hidden : 0};

  /// X's parameter views of these tensors, as elements of U (T, or T const).
  template <class X, class U>
  typename X::template params<U> views() {
    index_t const e = shape.experts;
    auto bias = [&](host_tensor<T>& b, index_t n) {
      return biases ? make_view(static_cast<U*>(b.data.data()), e, n) : matrix_view<U>{};
    };
    return {make_view(static_cast<U*>(w1.data.data()), e, shape.hidden, width), bias(b1, width),
            make_view(static_cast<U*>(w2.data.data()), e, shape.ffn, shape.hidden),
            bias(b2, shape.hidden)};
  }
  std::vector<host_tensor<T>*> all() { return {&w1, &b1, &w2, &b2}; }
};

/// Expert X's host state for `rows` rows, with the memory it lives in.
template <class X>
struct owned_host_state {
  host_buffer buffer;
  typename X::host_state state;

  owned_host_state(expert::expert_shape const& shape, index_t rows)
      : buffer(bytes(shape, rows)), state(carve(buffer, shape, rows)) {}

 private:
  static std::size_t bytes(expert::expert_shape const& shape, index_t rows) {
    workspace_carver counter;
    (void)X::carve_host_state(counter, shape, rows, rows);
    return counter.bytes();
  }
  static typename X::host_state carve(host_buffer& buffer, expert::expert_shape const& shape,
                                      index_t rows) {
    workspace_carver carver(buffer.view());
    return X::carve_host_state(carver, shape, rows, rows);
  }
};

/// A hand-computed case: one expert, hidden = 1, two rows of which only row 0 is the
/// expert's; W1 and b1 of width F1 (glu: [gate | up]).
struct by_hand_case {
  index_t ffn;
  std::vector<double> w1, b1, w2, b2;  // (1, 1, F1), (1, F1), (1, F, 1), (1, 1)
  std::vector<double> in, d_out;       // (2, 1)
};

/// What X computes for a by_hand_case, each output flat; every output starts at −1, so that
/// each element is seen written (row 1 of out and d_in must come out zero).
struct by_hand_result {
  std::vector<double> out, d_in, w1, b1, w2, b2;
};

template <class X>
by_hand_result run_by_hand(by_hand_case const& c) {
  expert::expert_shape const shape{.experts = 1, .hidden = 1, .ffn = c.ffn};
  index_t const f1 = X::first_width(shape);
  two_layer_tensors<double> params{shape, f1, true}, grads{shape, f1, true};
  auto const given = std::vector<std::vector<double> const*>{&c.w1, &c.b1, &c.w2, &c.b2};
  for (std::size_t n = 0; n < given.size(); ++n) {
    REQUIRE(given[n]->size() == params.all()[n]->data.size());
    params.all()[n]->data = *given[n];
    std::fill(grads.all()[n]->data.begin(), grads.all()[n]->data.end(), -1.0);
  }
  REQUIRE(c.in.size() == 2);
  REQUIRE(c.d_out.size() == 2);
  auto const p = params.views<X, double const>();
  CHECK(X::check(p, shape, "p").ok());

  owned_host_state<X> const host_state(shape, 2);
  std::array<std::int64_t, 1> const begin{0}, rows{1};
  expert::row_segments const segments{begin, rows};
  by_hand_result r{.out = {-1, -1}, .d_in = {-1, -1}, .w1 = {}, .b1 = {}, .w2 = {}, .b2 = {}};
  auto const in = make_view(c.in.data(), 2, 1);
  X::forward(host, shape, p, segments, in, make_view(r.out.data(), 2, 1), host_state.state);
  X::backward(host, shape, p, segments, in, make_view(c.d_out.data(), 2, 1),
              make_view(r.d_in.data(), 2, 1), grads.views<X, double>(), host_state.state);
  r.w1 = grads.w1.data;
  r.b1 = grads.b1.data;
  r.w2 = grads.w2.data;
  r.b2 = grads.b2.data;
  return r;
}

}  // namespace moe::test
