// SPDX-License-Identifier: Apache-2.0
#pragma once
// Test data: fresh random values (never zeros), poison for outputs, and owned host tensors
// that hand out moe views.

#include <moe/core/dtype.hpp>
#include <moe/core/view.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace moe::test {

/// A seed that differs from run to run unless MOE_TEST_SEED fixes it; printed on failure
/// by the tests that use it.
inline std::uint64_t fresh_seed() {
  if (char const* s = std::getenv("MOE_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  return std::random_device{}();
}

/// Uniform values in [-scale, scale], redrawn while too close to zero, rounded to T.
template <class T>
void randomize(span<T> values, std::mt19937_64& rng, double scale = 1.0) {
  std::uniform_real_distribution<double> dist(-scale, scale);
  for (auto& v : values) {
    double x = 0;
    while (std::abs(x) < 1e-3 * scale) x = dist(rng);
    v = from_accumulate<T>(static_cast<accumulate_t<T>>(x));
  }
}

/// Fills every element with a NaN bit pattern, so that an unwritten output shows.
template <class T>
void poison(span<T> values) {
  if (!values.empty())  // an empty vector's data() may be null, which memset must not get
    std::memset(static_cast<void*>(values.data()), 0xff, values.size_bytes());
}

/// True when every byte is still the poison pattern.
template <class T>
[[nodiscard]] bool is_poisoned(span<T> values) {
  auto const* bytes = reinterpret_cast<unsigned char const*>(values.data());
  for (std::size_t i = 0; i < values.size_bytes(); ++i)
    if (bytes[i] != 0xff) return false;
  return true;
}

/// Owned host storage of `count` elements of T.
template <class T>
struct host_tensor {
  std::vector<T> data;

  explicit host_tensor(index_t count = 0) : data(static_cast<std::size_t>(count)) {}

  template <class... Extents>
  auto view(Extents... extents) {
    return make_view(data.data(), extents...);
  }
  template <class... Extents>
  auto cview(Extents... extents) const {
    return make_view(static_cast<T const*>(data.data()), extents...);
  }
  [[nodiscard]] span<T> flat() noexcept { return {data.data(), data.size()}; }
  [[nodiscard]] span<T const> flat() const noexcept { return {data.data(), data.size()}; }

  void randomize(std::mt19937_64& rng, double scale = 1.0) { test::randomize(flat(), rng, scale); }
  void poison() { test::poison(flat()); }
  [[nodiscard]] bool is_poisoned() const { return test::is_poisoned(flat()); }
};

}  // namespace moe::test
