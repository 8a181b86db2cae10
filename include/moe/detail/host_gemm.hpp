// SPDX-License-Identifier: Apache-2.0
#pragma once
// The host backend's one matrix product. Operands are callables, so that transposes,
// element conversions and strided expert slices need no copies; every sum is taken in
// float64 in a fixed order, which makes the host backend deterministic and a tight oracle.

#include <moe/core/config.hpp>
#include <moe/core/view.hpp>

namespace moe::detail {

/// For every (m, n) in [0, M) × [0, N): store(m, n, Σ_k a(m, k) · b(k, n)), the sum in double.
template <class A, class B, class Store>
void host_gemm(index_t rows, index_t cols, index_t depth, A&& a, B&& b, Store&& store) {
  for (index_t m = 0; m < rows; ++m)
    for (index_t n = 0; n < cols; ++n) {
      double sum = 0;
      for (index_t k = 0; k < depth; ++k)
        sum += static_cast<double>(a(m, k)) * static_cast<double>(b(k, n));
      store(m, n, sum);
    }
}

}  // namespace moe::detail
