// SPDX-License-Identifier: Apache-2.0
// The CUDA dispatch/combine layouts against the host backend. Each case routes tokens on the
// host (gating::route), copies the routing into a device_routing, and runs the device offsets,
// encode, decode and their backward on fresh random inputs with every output poisoned first:
//   offsets and the ragged total     equal, exactly
//   dispatched                       bit for bit (a copy), unclaimed and padding rows +0
//   y, dx, d_weight                  relative error below 1e-5 (float) or 1e-2 (half, bf16),
//                                    relative to Σ |terms| of each sum (the sums cancel)
//   d_expert_out                     relative error per element, unclaimed rows exactly 0
// Rows no assignment claims hold NaN in the inputs of decode and the backward: a kernel that
// reads them shows. Then the empty cases and the rejection of bad arguments, which must write
// nothing. Skipped (exit 77) without a CUDA device.

#include "../support/device.hpp"
#include "../support/expect.hpp"
#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <moe/core.hpp>
#include <moe/gating.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/layout.hpp>
#include <moe/layout/kernels/capacity.cuh>
#include <moe/layout/kernels/ragged.cuh>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using namespace moe;
using test::host_tensor;

// --- device memory -------------------------------------------------------------------------

/// `count` elements of U in device memory, freed on destruction. `misaligned` starts the
/// data one element past the allocation's 256-byte alignment, for the scalar path.
template <class U>
class device_array {
 public:
  explicit device_array(index_t count, bool misaligned = false) : count_(count) {
    MOE_CUDA_TRY(cudaMalloc(&base_, static_cast<std::size_t>(count + 1) * sizeof(U) + 16));
    data_ = reinterpret_cast<U*>(static_cast<std::byte*>(base_) + (misaligned ? sizeof(U) : 0));
  }
  device_array(device_array const&) = delete;
  device_array& operator=(device_array const&) = delete;
  ~device_array() { MOE_CUDA_TRY_LOG(cudaFree(base_)); }

  [[nodiscard]] U* data() const noexcept { return data_; }
  [[nodiscard]] index_t size() const noexcept { return count_; }
  [[nodiscard]] std::size_t bytes() const noexcept {
    return static_cast<std::size_t>(count_) * sizeof(U);
  }
  [[nodiscard]] span<U> all() const noexcept { return {data_, static_cast<std::size_t>(count_)}; }
  [[nodiscard]] span<U const> call() const noexcept {
    return {data_, static_cast<std::size_t>(count_)};
  }
  template <class... Extents>
  [[nodiscard]] auto view(Extents... extents) const noexcept {
    return make_view(data_, extents...);
  }
  template <class... Extents>
  [[nodiscard]] auto cview(Extents... extents) const noexcept {
    return make_view(static_cast<U const*>(data_), extents...);
  }

  void fill_bytes(int value, cudaStream_t stream) {
    MOE_CUDA_TRY(cudaMemsetAsync(data_, value, bytes(), stream));
  }
  void upload(U const* host, cudaStream_t stream) {
    MOE_CUDA_TRY(cudaMemcpyAsync(data_, host, bytes(), cudaMemcpyHostToDevice, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));  // `host` may go away after the call
  }
  [[nodiscard]] std::vector<U> download(cudaStream_t stream) const {
    std::vector<U> out(static_cast<std::size_t>(count_));
    MOE_CUDA_TRY(cudaMemcpyAsync(out.data(), data_, bytes(), cudaMemcpyDeviceToHost, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    return out;
  }

 private:
  void* base_ = nullptr;
  U* data_ = nullptr;
  index_t count_;
};

template <class U>
bool all_bytes_are(std::vector<U> const& v, unsigned char value) {
  auto const* bytes = reinterpret_cast<unsigned char const*>(v.data());
  return std::all_of(bytes, bytes + v.size() * sizeof(U),
                     [&](unsigned char b) { return b == value; });
}

// --- comparisons ---------------------------------------------------------------------------

template <class T>
constexpr double tolerance = std::is_same_v<T, float> ? 1e-5 : 1e-2;

/// Absolute slack of a result rounded to T: half's subnormal spacing (products of small
/// weights underflow there); float and bfloat16 reach far smaller values.
template <class T>
constexpr double underflow = std::is_same_v<T, __half> ? 0x1p-24 : 0.0;

template <class T>
double as_double(T v) {
  return static_cast<double>(to_accumulate(v));
}

/// Counts the failures of one output and keeps the first, for one CHECK per output.
struct mismatches {
  std::string what;
  index_t count = 0;
  std::string first{};

  template <class Describe>
  void expect(bool ok, Describe&& describe) {
    if (ok) return;
    if (count++ == 0) {
      std::ostringstream s;
      describe(s);
      first = s.str();
    }
  }
  void report() const {
    INFO(what << ": " << count << " mismatches; first: " << first);
    CHECK(count == 0);
  }
};

// --- one case ------------------------------------------------------------------------------

struct shape {
  index_t tokens, experts;
  int k;
  index_t hidden;
  float factor = 1.0f;         ///< capacity layout's capacity factor (ragged routes with 0)
  index_t alignment = 1;       ///< ragged row alignment
  index_t extra_capacity = 0;  ///< capacity layout: buffer slots past C (a looser bound)
  bool skew = false;           ///< every token chooses experts 0, 1, …, k − 1
  bool misaligned = false;     ///< every device view starts one element off 16 bytes

  friend std::ostream& operator<<(std::ostream& os, shape const& s) {
    return os << "T " << s.tokens << ", E " << s.experts << ", k " << s.k << ", H " << s.hidden
              << ", factor " << s.factor << ", alignment " << s.alignment << ", extra capacity "
              << s.extra_capacity << (s.skew ? ", skewed" : "")
              << (s.misaligned ? ", misaligned" : "");
  }
};

/// The host routing of a case: gating::route over a gate of width 16, so that routing costs
/// little at any H. With `skew`, every logit of expert 0 is large and the others zero: every
/// token's choices are experts 0, 1, …, k − 1 (ties by the lower index).
struct host_routed {
  host_buffer buffer;
  gating::host_routing r;

  host_routed(shape const& s, float factor, std::mt19937_64& rng) {
    constexpr index_t width = 16;
    host_tensor<double> x(s.tokens * width), w(width * s.experts);
    x.randomize(rng);
    w.randomize(rng, 2.0);
    if (s.skew) {
      for (auto& v : x.data) v = 0.5 + std::abs(v);
      for (index_t h = 0; h < width; ++h)
        for (index_t e = 0; e < s.experts; ++e) w.data[h * s.experts + e] = e == 0 ? 1.0 : 0.0;
    }
    workspace_carver counter;
    (void)gating::carve_host_routing(counter, s.tokens, s.tokens, s.experts, s.k);
    buffer = host_buffer(counter.bytes());
    workspace_carver carver(buffer.view());
    r = gating::carve_host_routing(carver, s.tokens, s.tokens, s.experts, s.k);
    gating::gate_args const args{
        .tokens = s.tokens, .experts = s.experts, .k = s.k, .capacity_factor = factor};
    (void)gating::route(host, gating::top_any<>{}, args, x.cview(s.tokens, width),
                        w.cview(width, s.experts), r);
    // The device holds the weights in float: give the reference the same ones.
    for (index_t t = 0; t < s.tokens; ++t)
      for (int j = 0; j < s.k; ++j)
        r.weight(t, j) = static_cast<double>(static_cast<float>(r.weight(t, j)));
  }
};

/// A host routing copied into device memory.
struct device_routed {
  device_array<std::byte> memory;
  gating::device_routing r;

  static std::size_t bytes(index_t tokens, index_t experts, int k) {
    workspace_carver counter;
    (void)gating::carve_device_routing(counter, tokens, tokens, experts, k);
    return counter.bytes();
  }

  device_routed(gating::host_routing const& h, cudaStream_t stream)
      : memory(static_cast<index_t>(bytes(h.tokens(), h.experts(), h.k()))) {
    workspace_carver carver(memory.all());
    r = gating::carve_device_routing(carver, h.tokens(), h.tokens(), h.experts(), h.k());
    index_t const assignments = h.tokens() * h.k();
    std::vector<float> weight(static_cast<std::size_t>(assignments));
    for (index_t i = 0; i < assignments; ++i)
      weight[i] = static_cast<float>(h.weight.data_handle()[i]);
    gating::device_routing_scalars const scalars{.capacity = h.capacity,
                                                 .max_load = 0,
                                                 .dropped = 0,
                                                 .unrouted = 0,
                                                 .aux_loss = 0,
                                                 .z_loss = 0};
    auto copy = [&](void* to, void const* from, std::size_t n) {
      if (n > 0) MOE_CUDA_TRY(cudaMemcpyAsync(to, from, n, cudaMemcpyHostToDevice, stream));
    };
    copy(r.expert.data_handle(), h.expert.data_handle(), assignments * sizeof(std::int32_t));
    copy(r.slot.data_handle(), h.slot.data_handle(), assignments * sizeof(std::int64_t));
    copy(r.weight.data_handle(), weight.data(), assignments * sizeof(float));
    copy(r.load.data_handle(), h.load.data_handle(), h.experts() * sizeof(std::int64_t));
    copy(r.scalars, &scalars, sizeof(scalars));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
  }
};

/// Runs layout L's device path on one shape in element type T and compares every output with
/// the host backend.
template <class T, class L>
void check_layout(shape const& s, std::uint64_t seed) {
  constexpr bool is_capacity = std::is_same_v<L, layout::capacity>;
  INFO((is_capacity ? "capacity" : "ragged")
       << " layout, " << dtype_traits<T>::name << ", " << s << ", seed " << seed);
  std::mt19937_64 rng(seed);
  test::owned_stream owner;
  cudaStream_t const stream = owner.stream;
  cuda_backend const cuda{stream};
  double const tol = tolerance<T>, tiny = underflow<T>;
  float const nan = std::numeric_limits<float>::quiet_NaN();

  index_t const tokens = s.tokens, experts = s.experts, hidden = s.hidden, k = s.k;
  host_routed routed(s, is_capacity ? s.factor : 0.0f, rng);
  gating::host_routing const& r = routed.r;
  index_t const capacity = r.capacity;

  // Offsets on the host (the reference) and the buffer's rows R: E·C' for the capacity layout,
  // the ragged bound for the ragged one.
  layout::layout_args const a{.tokens = tokens,
                              .experts = experts,
                              .k = s.k,
                              .capacity = capacity + s.extra_capacity,
                              .row_alignment = s.alignment};
  layout::layout_args reference_args = a;
  reference_args.capacity = capacity;
  std::vector<std::int64_t> begin(experts), rows(experts);
  span<std::int64_t const> const load{r.load.data_handle(), static_cast<std::size_t>(experts)};
  index_t const batch_rows = layout::offsets(host, L{}, reference_args, load, begin, rows);
  index_t const buffer_rows = layout::rows_bound(L{}, a);
  REQUIRE(batch_rows <= buffer_rows);
  auto const row_map = [&] {
    if constexpr (is_capacity)
      return layout::row_map_of(layout::capacity{}, r);
    else
      return layout::row_map_of(layout::ragged{}, r, begin);
  }();
  std::vector<bool> claimed(static_cast<std::size_t>(buffer_rows), false);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < k; ++j)
      if (index_t const row = row_map(t, j); row != layout::no_row) claimed[row] = true;

  device_routed const device(r, stream);
  gating::device_routing const& rd = device.r;

  // --- offsets
  device_array<std::int64_t> begin_d(experts), rows_d(experts), total_d(1);
  begin_d.fill_bytes(0xff, stream);
  rows_d.fill_bytes(0xff, stream);
  total_d.fill_bytes(0xff, stream);
  if constexpr (is_capacity)
    layout::offsets(cuda, L{}, a, rd, begin_d.all(), rows_d.all());
  else
    layout::offsets(cuda, L{}, a, rd, begin_d.all(), rows_d.all(), total_d.data());
  CHECK(begin_d.download(stream) == begin);
  CHECK(rows_d.download(stream) == rows);
  if constexpr (!is_capacity)
    CHECK(total_d.download(stream) == std::vector<std::int64_t>{batch_rows});
  span<std::int64_t const> const begin_s = begin_d.call(), rows_s = rows_d.call();

  // The buffer as the layout takes it: [E, C', H] or (R, H).
  auto batch = [&](auto const& array) {
    if constexpr (is_capacity)
      return array.view(experts, capacity + s.extra_capacity, hidden);
    else
      return array.view(buffer_rows, hidden);
  };
  auto cbatch = [&](auto const& array) {
    if constexpr (is_capacity)
      return array.cview(experts, capacity + s.extra_capacity, hidden);
    else
      return array.cview(buffer_rows, hidden);
  };
  auto host_batch = [&](auto* data) {
    if constexpr (is_capacity)
      return make_view(data, experts, capacity + s.extra_capacity, hidden);
    else
      return make_view(data, buffer_rows, hidden);
  };
  device_array<std::byte> scratch(static_cast<index_t>(layout::encode_workspace_bytes(L{}, a)));
  REQUIRE(layout::decode_backward_workspace_bytes(L{}, a) <= scratch.bytes());

  // Random rows in the buffer's claimed rows, NaN in the others: what decode and the backward
  // read, so that reading an unclaimed row shows.
  auto claimed_rows_input = [&](host_tensor<T>& in, std::vector<double>& as_double_rows) {
    in.randomize(rng);
    as_double_rows.resize(in.data.size());
    for (index_t row = 0; row < buffer_rows; ++row)
      for (index_t h = 0; h < hidden; ++h) {
        T& v = in.data[row * hidden + h];
        if (!claimed[row]) v = from_accumulate<T>(nan);
        as_double_rows[row * hidden + h] = as_double(v);
      }
  };

  // --- encode
  {
    host_tensor<T> x(tokens * hidden);
    x.randomize(rng);
    device_array<T> x_d(tokens * hidden, s.misaligned), out_d(buffer_rows * hidden, s.misaligned);
    INFO("vector path: " << layout::kernels::vector_access<T>(hidden, {x_d.data(), out_d.data()}));
    x_d.upload(x.data.data(), stream);
    out_d.fill_bytes(0xff, stream);
    scratch.fill_bytes(0, stream);  // a missing reset of row_source would claim rows for t0
    layout::encode(cuda, L{}, rd, begin_s, rows_s, x_d.cview(tokens, hidden), batch(out_d),
                   scratch.all());
    std::vector<double> expected(static_cast<std::size_t>(buffer_rows * hidden));
    if constexpr (is_capacity)
      layout::encode(host, L{}, r, x.cview(tokens, hidden), host_batch(expected.data()));
    else
      layout::encode(host, L{}, r, begin, x.cview(tokens, hidden), host_batch(expected.data()));
    std::vector<T> const got = out_d.download(stream);
    mismatches m{"dispatched"};
    for (std::size_t i = 0; i < got.size(); ++i) {
      T const want = from_accumulate<T>(static_cast<accumulate_t<T>>(expected[i]));
      m.expect(std::memcmp(&got[i], &want, sizeof(T)) == 0, [&](std::ostream& o) {
        o << "row " << i / hidden << " column " << i % hidden << ": " << as_double(got[i])
          << " for " << expected[i];
      });
    }
    m.report();
  }

  // --- decode
  host_tensor<T> expert_out(buffer_rows * hidden);
  std::vector<double> expert_out_double;
  claimed_rows_input(expert_out, expert_out_double);
  device_array<T> expert_out_d(buffer_rows * hidden, s.misaligned);
  expert_out_d.upload(expert_out.data.data(), stream);
  {
    device_array<T> y_d(tokens * hidden, s.misaligned), again_d(tokens * hidden, s.misaligned);
    y_d.fill_bytes(0xff, stream);
    again_d.fill_bytes(0xff, stream);
    layout::decode(cuda, L{}, rd, begin_s, rows_s, cbatch(expert_out_d), y_d.view(tokens, hidden));
    layout::decode(cuda, L{}, rd, begin_s, rows_s, cbatch(expert_out_d),
                   again_d.view(tokens, hidden));
    std::vector<double> expected(static_cast<std::size_t>(tokens * hidden));
    if constexpr (is_capacity)
      layout::decode(host, L{}, r, host_batch(std::as_const(expert_out_double).data()),
                     make_view(expected.data(), tokens, hidden));
    else
      layout::decode(host, L{}, r, begin, host_batch(std::as_const(expert_out_double).data()),
                     make_view(expected.data(), tokens, hidden));
    std::vector<T> const got = y_d.download(stream);
    mismatches m{"y"};
    for (index_t t = 0; t < tokens; ++t)
      for (index_t h = 0; h < hidden; ++h) {
        double scale = 0;  // Σ_j |w · out|: the size of the terms, which may cancel
        for (index_t j = 0; j < k; ++j)
          if (index_t const row = row_map(t, j); row != layout::no_row)
            scale += std::abs(r.weight(t, j) * expert_out_double[row * hidden + h]);
        double const d = as_double(got[t * hidden + h]), e = expected[t * hidden + h];
        bool const ok = scale == 0 ? d == 0 : std::abs(d - e) <= tol * scale + tiny;
        m.expect(ok, [&](std::ostream& o) {
          o << "token " << t << " column " << h << ": " << d << " for " << e;
        });
      }
    m.report();
    std::vector<T> const again = again_d.download(stream);
    CHECK(std::memcmp(got.data(), again.data(), got.size() * sizeof(T)) == 0);  // deterministic
  }

  // --- decode_backward
  {
    host_tensor<T> dy(tokens * hidden);
    dy.randomize(rng);
    device_array<T> dy_d(tokens * hidden, s.misaligned),
        d_out_d(buffer_rows * hidden, s.misaligned);
    device_array<float> d_weight_d(tokens * k), again_d(tokens * k);
    dy_d.upload(dy.data.data(), stream);
    d_out_d.fill_bytes(0xff, stream);
    d_weight_d.fill_bytes(0xff, stream);
    again_d.fill_bytes(0xff, stream);
    scratch.fill_bytes(0, stream);
    layout::decode_backward(cuda, L{}, rd, begin_s, rows_s, dy_d.cview(tokens, hidden),
                            cbatch(expert_out_d), batch(d_out_d), d_weight_d.view(tokens, k),
                            scratch.all());
    layout::decode_backward(cuda, L{}, rd, begin_s, rows_s, dy_d.cview(tokens, hidden),
                            cbatch(expert_out_d), batch(d_out_d), again_d.view(tokens, k),
                            scratch.all());
    std::vector<double> expected(static_cast<std::size_t>(buffer_rows * hidden));
    std::vector<double> expected_weight(static_cast<std::size_t>(tokens * k));
    if constexpr (is_capacity)
      layout::decode_backward(host, L{}, r, dy.cview(tokens, hidden),
                              host_batch(std::as_const(expert_out_double).data()),
                              host_batch(expected.data()),
                              make_view(expected_weight.data(), tokens, k));
    else
      layout::decode_backward(host, L{}, r, begin, dy.cview(tokens, hidden),
                              host_batch(std::as_const(expert_out_double).data()),
                              host_batch(expected.data()),
                              make_view(expected_weight.data(), tokens, k));

    std::vector<T> const got = d_out_d.download(stream);
    mismatches m{"d_expert_out"};
    for (index_t row = 0; row < buffer_rows; ++row)
      for (index_t h = 0; h < hidden; ++h) {
        double const d = as_double(got[row * hidden + h]), e = expected[row * hidden + h];
        bool const ok = claimed[row] ? std::abs(d - e) <= tol * std::abs(e) + tiny : d == 0;
        m.expect(ok, [&](std::ostream& o) {
          o << "row " << row << (claimed[row] ? "" : " (unclaimed)") << " column " << h << ": " << d
            << " for " << e;
        });
      }
    m.report();

    std::vector<float> const got_weight = d_weight_d.download(stream);
    mismatches w{"d_weight"};
    for (index_t t = 0; t < tokens; ++t)
      for (index_t j = 0; j < k; ++j) {
        index_t const row = row_map(t, j);
        double scale = 0;  // Σ_h |dy · out|
        if (row != layout::no_row)
          for (index_t h = 0; h < hidden; ++h)
            scale +=
                std::abs(as_double(dy.data[t * hidden + h]) * expert_out_double[row * hidden + h]);
        double const d = got_weight[t * k + j], e = expected_weight[t * k + j];
        bool const ok = row == layout::no_row ? d == 0 : std::abs(d - e) <= tol * scale;
        w.expect(ok, [&](std::ostream& o) {
          o << "token " << t << " choice " << j << (row == layout::no_row ? " (dropped)" : "")
            << ": " << d << " for " << e;
        });
      }
    w.report();
    std::vector<float> const again = again_d.download(stream);
    CHECK(std::memcmp(got_weight.data(), again.data(), again.size() * sizeof(float)) == 0);
  }

  // --- encode_backward
  {
    host_tensor<T> d_dispatched(buffer_rows * hidden);
    std::vector<double> d_dispatched_double;
    claimed_rows_input(d_dispatched, d_dispatched_double);
    device_array<T> in_d(buffer_rows * hidden, s.misaligned), dx_d(tokens * hidden, s.misaligned);
    in_d.upload(d_dispatched.data.data(), stream);
    dx_d.fill_bytes(0xff, stream);
    layout::encode_backward(cuda, L{}, rd, begin_s, rows_s, cbatch(in_d),
                            dx_d.view(tokens, hidden));
    std::vector<double> expected(static_cast<std::size_t>(tokens * hidden));
    if constexpr (is_capacity)
      layout::encode_backward(host, L{}, r, host_batch(std::as_const(d_dispatched_double).data()),
                              make_view(expected.data(), tokens, hidden));
    else
      layout::encode_backward(host, L{}, r, begin,
                              host_batch(std::as_const(d_dispatched_double).data()),
                              make_view(expected.data(), tokens, hidden));
    std::vector<T> const got = dx_d.download(stream);
    mismatches m{"dx"};
    for (index_t t = 0; t < tokens; ++t)
      for (index_t h = 0; h < hidden; ++h) {
        double scale = 0;
        for (index_t j = 0; j < k; ++j)
          if (index_t const row = row_map(t, j); row != layout::no_row)
            scale += std::abs(d_dispatched_double[row * hidden + h]);
        double const d = as_double(got[t * hidden + h]), e = expected[t * hidden + h];
        bool const ok = scale == 0 ? d == 0 : std::abs(d - e) <= tol * scale + tiny;
        m.expect(ok, [&](std::ostream& o) {
          o << "token " << t << " column " << h << ": " << d << " for " << e;
        });
      }
    m.report();
  }
}

template <class T>
void check_both_layouts(shape const& s, std::uint64_t seed) {
  check_layout<T, layout::capacity>(s, seed);
  check_layout<T, layout::ragged>(s, seed + 1);
}

/// The skewed routing's capacity factor that gives C = k: ⌊f · ⌈T/E⌉⌋ = 1.
float one_slot_per_choice(index_t tokens, index_t experts) {
  return 1.5f / static_cast<float>(ceil_div(tokens, experts));
}

}  // namespace

TEST_CASE("device layouts equal the host backend") {
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::vector<shape> const shapes{
      // T, E, k, H, capacity factor, ragged alignment, extra capacity
      {1, 1, 1, 8, 1.0f, 1},                         // one token, one expert
      {1, 8, 2, 1000, 1.0f, 16},                     // one token, most experts empty
      {7, 8, 2, 1001, 1.0f, 1},                      // odd H: the scalar path
      {7, 1, 1, 4096, 1.0f, 128, 3},                 // one expert; a buffer wider than C
      {7, 8, 8, 1000, 1.0f, 16},                     // k = E
      {128, 8, 2, 1000, 1.0f, 16},                   // overflow: some tokens dropped
      {128, 64, 8, 1001, 1.25f, 128},                // many experts, odd H
      {128, 256, 8, 8, 1.0f, 16, 2},                 // E > T: experts that receive nothing
      {128, 8, 1, 4096, 0.5f, 1},                    // heavy drops
      {4096, 8, 2, 8, 1.0f, 128},                    // many tokens
      {4096, 256, 8, 8, 1.0f, 16},                   //
      {4096, 64, 1, 1000, 1.0f, 1},                  //
      {128, 64, 2, 1000, 1.0f, 16, 0, false, true},  // misaligned pointers: the scalar path
      {7, 8, 8, 1001, 1.0f, 128, 1, false, true},    //
  };
  for (shape const& s : shapes) {
    check_both_layouts<float>(s, seed);
    check_both_layouts<__half>(s, seed);
    check_both_layouts<__nv_bfloat16>(s, seed);
  }
}

TEST_CASE("device layouts: one expert takes every token, nearly all dropped") {
  std::uint64_t const seed = test::fresh_seed();
  INFO("seed " << seed);
  // C = k: expert j keeps the first k tokens' choice j; every other token loses every choice
  // and gets zero; experts k.. receive nothing. The ragged layout keeps all (loads T, 0, …).
  for (int k : {1, 2}) {
    shape const s{128, 8, k, 1000, one_slot_per_choice(128, 8), 128, 0, true};
    check_both_layouts<float>(s, seed);
    check_both_layouts<__nv_bfloat16>(s, seed);
  }
  shape const one{7, 4, 1, 1001, one_slot_per_choice(7, 4), 16, 0, true};
  check_both_layouts<__half>(one, seed);
}

TEST_CASE("the vector path is taken exactly when rows and pointers are 16-byte aligned") {
  alignas(16) static std::byte buffer[64];
  void const* aligned = buffer;
  void const* odd = buffer + 2;
  using layout::kernels::vector_access;
  CHECK(vector_access<__nv_bfloat16>(1000, {aligned, aligned}));   // 2000 bytes
  CHECK(!vector_access<__nv_bfloat16>(1001, {aligned, aligned}));  // 2002 bytes
  CHECK(!vector_access<__nv_bfloat16>(1000, {aligned, odd}));
  CHECK(vector_access<float>(8, {aligned, nullptr}));  // an empty view does not prevent it
  CHECK(!vector_access<float>(6, {aligned}));
  CHECK(vector_access<__half>(4096, {aligned}));
}

TEST_CASE("device layouts: empty calls launch nothing and zero what they must") {
  test::owned_stream owner;
  cudaStream_t const stream = owner.stream;
  cuda_backend const cuda{stream};
  index_t const experts = 8, hidden = 16;
  int const k = 2;
  // T = 0: no assignment, every load 0, capacity 0.
  std::size_t const routing_bytes = device_routed::bytes(0, experts, k);
  device_array<std::byte> memory(static_cast<index_t>(routing_bytes));
  workspace_carver carver(memory.all());
  gating::device_routing const r = gating::carve_device_routing(carver, 0, 0, experts, k);
  memory.fill_bytes(0, stream);  // loads 0, capacity 0
  device_array<std::int64_t> begin(experts), rows(experts), total(1);
  device_array<float> x(0), y(0), d_weight(0);

  SUBCASE("ragged: the whole buffer is padding, zeroed") {
    layout::layout_args const a{.tokens = 0, .experts = experts, .k = k, .row_alignment = 16};
    index_t const buffer_rows = layout::rows_bound(layout::ragged{}, a);  // E · 15
    layout::offsets(cuda, layout::ragged{}, a, r, begin.all(), rows.all(), total.data());
    CHECK(total.download(stream) == std::vector<std::int64_t>{0});
    CHECK(begin.download(stream) == std::vector<std::int64_t>(experts, 0));
    device_array<float> dispatched(buffer_rows * hidden), d_out(buffer_rows * hidden);
    device_array<std::byte> scratch(
        static_cast<index_t>(layout::encode_workspace_bytes(layout::ragged{}, a)));
    dispatched.fill_bytes(0xff, stream);
    d_out.fill_bytes(0xff, stream);
    layout::encode(cuda, layout::ragged{}, r, begin.call(), rows.call(), x.cview(0, hidden),
                   dispatched.view(buffer_rows, hidden), scratch.all());
    layout::decode(cuda, layout::ragged{}, r, begin.call(), rows.call(),
                   dispatched.cview(buffer_rows, hidden), y.view(0, hidden));
    layout::decode_backward(cuda, layout::ragged{}, r, begin.call(), rows.call(),
                            y.cview(0, hidden), dispatched.cview(buffer_rows, hidden),
                            d_out.view(buffer_rows, hidden), d_weight.view(0, k), scratch.all());
    layout::encode_backward(cuda, layout::ragged{}, r, begin.call(), rows.call(),
                            d_out.cview(buffer_rows, hidden), x.view(0, hidden));
    CHECK(all_bytes_are(dispatched.download(stream), 0));
    CHECK(all_bytes_are(d_out.download(stream), 0));
  }
  SUBCASE("capacity: C = 0 leaves nothing to do; a wider buffer is zeroed") {
    layout::layout_args const a{.tokens = 0, .experts = experts, .k = k, .capacity = 2};
    layout::offsets(cuda, layout::capacity{}, a, r, begin.all(), rows.all());
    CHECK(begin.download(stream) == std::vector<std::int64_t>(experts, 0));
    CHECK(rows.download(stream) == std::vector<std::int64_t>(experts, 0));
    device_array<std::byte> scratch(
        static_cast<index_t>(layout::encode_workspace_bytes(layout::capacity{}, a)));
    device_array<float> empty(0), wide(experts * 2 * hidden);
    wide.fill_bytes(0xff, stream);
    layout::encode(cuda, layout::capacity{}, r, begin.call(), rows.call(), x.cview(0, hidden),
                   empty.view(experts, 0, hidden), scratch.all());
    layout::encode(cuda, layout::capacity{}, r, begin.call(), rows.call(), x.cview(0, hidden),
                   wide.view(experts, 2, hidden), scratch.all());
    layout::decode(cuda, layout::capacity{}, r, begin.call(), rows.call(),
                   empty.cview(experts, 0, hidden), y.view(0, hidden));
    CHECK(all_bytes_are(wide.download(stream), 0));
  }
  MOE_CUDA_TRY(cudaStreamSynchronize(stream));
}

TEST_CASE("device layouts reject bad arguments and write nothing") {
  test::owned_stream owner;
  cudaStream_t const stream = owner.stream;
  cuda_backend const cuda{stream};
  std::mt19937_64 rng(test::fresh_seed());
  shape const s{7, 8, 2, 16, 1.0f, 4};
  host_routed routed(s, 1.0f, rng);
  device_routed const device(routed.r, stream);
  gating::device_routing const& r = device.r;
  index_t const tokens = s.tokens, experts = s.experts, hidden = s.hidden,
                slots = routed.r.capacity, k = s.k;
  layout::layout_args const a{.tokens = tokens,
                              .experts = experts,
                              .k = s.k,
                              .capacity = slots,
                              .row_alignment = s.alignment};
  index_t const rows_total = experts * slots;

  device_array<std::int64_t> begin(experts), rows(experts), total(1);
  device_array<float> x(tokens * hidden), dispatched(rows_total * hidden), y(tokens * hidden),
      d_weight(tokens * k);
  device_array<std::byte> scratch(
      static_cast<index_t>(layout::encode_workspace_bytes(layout::capacity{}, a)));
  for (auto* d : {&begin, &rows, &total}) d->fill_bytes(0xff, stream);
  for (auto* d : {&x, &dispatched, &y, &d_weight}) d->fill_bytes(0xff, stream);
  auto const b = begin.call(), n = rows.call();

  // offsets
  layout::layout_args wrong_experts = a;
  wrong_experts.experts = experts + 1;
  test::expect_rejected(
      [&] { layout::offsets(cuda, layout::capacity{}, wrong_experts, r, begin.all(), rows.all()); },
      "a");
  gating::device_routing no_scalars = r;
  no_scalars.scalars = nullptr;
  test::expect_rejected(
      [&] { layout::offsets(cuda, layout::capacity{}, a, no_scalars, begin.all(), rows.all()); },
      "r");
  test::expect_rejected(
      [&] {
        layout::offsets(cuda, layout::capacity{}, a, r, begin.all().first(experts - 1), rows.all());
      },
      "begin");
  layout::layout_args unaligned = a;
  unaligned.row_alignment = 0;
  test::expect_rejected(
      [&] {
        layout::offsets(cuda, layout::ragged{}, unaligned, r, begin.all(), rows.all(),
                        total.data());
      },
      "a");
  test::expect_rejected(
      [&] {
        layout::offsets(cuda, layout::ragged{}, a, r, begin.all(), rows.all().first(1),
                        total.data());
      },
      "rows");

  // encode
  test::expect_rejected(
      [&] {
        layout::encode(cuda, layout::capacity{}, r, b, n, x.cview(tokens - 1, hidden),
                       dispatched.view(experts, slots, hidden), scratch.all());
      },
      "x");
  test::expect_rejected(
      [&] {
        layout::encode(cuda, layout::capacity{}, r, b, n, x.cview(tokens, hidden),
                       dispatched.view(experts - 1, slots, hidden), scratch.all());
      },
      "dispatched");
  test::expect_rejected(
      [&] {
        layout::encode(cuda, layout::capacity{}, r, b, n, x.cview(tokens, hidden - 1),
                       dispatched.view(experts, slots, hidden), scratch.all());
      },
      "dispatched");
  test::expect_rejected(
      [&] {
        layout::encode(cuda, layout::capacity{}, r, b, n, x.cview(tokens, hidden),
                       dispatched.view(experts, slots, hidden), scratch.all().first(8));
      },
      "scratch");
  test::expect_rejected(
      [&] {
        layout::encode(cuda, layout::capacity{}, r, b.first(2), n, x.cview(tokens, hidden),
                       dispatched.view(experts, slots, hidden), scratch.all());
      },
      "begin");
  test::expect_rejected(
      [&] {
        layout::encode(cuda, layout::ragged{}, r, b, n, x.cview(tokens, hidden),
                       make_view(static_cast<float*>(nullptr), rows_total, hidden), scratch.all());
      },
      "dispatched");

  // decode and the backward
  test::expect_rejected(
      [&] {
        layout::decode(cuda, layout::capacity{}, r, b, n, dispatched.cview(experts, slots, hidden),
                       y.view(tokens + 1, hidden));
      },
      "y");
  test::expect_rejected(
      [&] {
        layout::decode(cuda, layout::ragged{}, r, b, n, dispatched.cview(rows_total, hidden + 1),
                       y.view(tokens, hidden));
      },
      "expert_out");
  test::expect_rejected(
      [&] {
        layout::decode_backward(cuda, layout::capacity{}, r, b, n, x.cview(tokens, hidden),
                                dispatched.cview(experts, slots, hidden),
                                dispatched.view(experts, slots, hidden),
                                d_weight.view(tokens, k + 1), scratch.all());
      },
      "d_weight");
  test::expect_rejected(
      [&] {
        layout::decode_backward(cuda, layout::ragged{}, r, b, n, x.cview(tokens, hidden),
                                dispatched.cview(rows_total, hidden),
                                dispatched.view(rows_total - 1, hidden), d_weight.view(tokens, k),
                                scratch.all());
      },
      "d_expert_out");
  test::expect_rejected(
      [&] {
        layout::encode_backward(cuda, layout::ragged{}, r, b, n,
                                dispatched.cview(rows_total, hidden), y.view(tokens - 1, hidden));
      },
      "dx");

  for (auto* d : {&begin, &rows, &total}) CHECK(all_bytes_are(d->download(stream), 0xff));
  for (auto* d : {&x, &dispatched, &y, &d_weight}) CHECK(all_bytes_are(d->download(stream), 0xff));
}
