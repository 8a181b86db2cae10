// SPDX-License-Identifier: Apache-2.0
// The experts' CUDA backend against the host backend (STYLE §19's testbed): forward and every
// gradient of ffn<relu, gelu, silu> and glu<silu, gelu>, with and without biases, in float,
// half and bfloat16, over a uniform (capacity) batch with and without device counts and a
// ragged batch with padding rows and an expert with no rows. Inputs are fresh random values
// (MOE_TEST_SEED fixes them), every output and the workspace are poisoned first, and the
// host runs in double on the same rounded parameters and inputs.
//
// Tolerances: float 1e-5, half 1e-2, bfloat16 5e-2, relative to |reference| + the reference's
// RMS. The float bound needs cuBLAS without TF32: CUBLAS_COMPUTE_32F in the handle's default
// math mode does not use it (NVIDIA_TF32_OVERRIDE=1 in the environment would). Rows of no
// expert and gradients of experts with no rows are compared exactly (zero). Skipped (exit 77)
// without a CUDA device.

#include "../support/device.hpp"
#include "../support/expect.hpp"
#include "../support/graph.hpp"
#include "../support/random.hpp"
#include "two_layer_support.hpp"

#include <doctest/doctest.h>

#include <moe/core.hpp>
#include <moe/core/blas.hpp>
#include <moe/expert.hpp>
#include <moe/expert/kernels/ffn.cuh>
#include <moe/expert/kernels/glu.cuh>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace moe;

using test::device_array;
using test::expect_close;
using test::same_bits;
using test::widen;

/// How the batch is described to the CUDA backend.
enum class batch_kind { uniform_counted, uniform_all_rows, ragged };

char const* name_of(batch_kind k) {
  constexpr char const* names[] = {"uniform with device counts", "uniform, all rows", "ragged"};
  return names[static_cast<int>(k)];
}

/// A batch: its rows and each expert's segment as the host reference sees it.
struct batch {
  batch_kind kind;
  index_t rows = 0, capacity = 0;
  std::vector<std::int64_t> begin{}, counts{};  // host reference's segments
  std::vector<std::int64_t> claimed{};          // uniform_counted: the device counts (may exceed C)

  /// Rows that belong to no expert.
  [[nodiscard]] std::vector<bool> idle_rows() const {
    std::vector<bool> idle(static_cast<std::size_t>(rows), true);
    for (std::size_t e = 0; e < begin.size(); ++e)
      for (std::int64_t r = begin[e]; r < begin[e] + counts[e]; ++r)
        idle[static_cast<std::size_t>(r)] = false;
    return idle;
  }
};

/// E = 4 experts: the uniform ones with C = 6, the ragged one with leading, inner and trailing
/// padding; expert 1 receives nothing in each.
batch make_batch(batch_kind kind, index_t experts) {
  batch b{.kind = kind};
  if (kind == batch_kind::ragged) {
    if (experts == 4) {
      b.begin = {1, 6, 6, 14};
      b.counts = {4, 0, 7, 3};
      b.rows = 20;
    } else {  // many experts: segments of 0..3 rows with a padding row after every third
      std::int64_t next = 0;
      for (index_t e = 0; e < experts; ++e) {
        std::int64_t const count = (e * 7 + 3) % 4;
        b.begin.push_back(next);
        b.counts.push_back(count);
        next += count + (e % 3 == 2 ? 1 : 0);
      }
      b.rows = next + 2;
    }
    return b;
  }
  b.capacity = 6;
  b.rows = experts * b.capacity;
  for (index_t e = 0; e < experts; ++e) {
    std::int64_t const claimed = e == 1 ? 0 : (e == 0 ? 6 : (e % 2 == 0 ? 3 : 9));  // 9 > C
    b.begin.push_back(e * b.capacity);
    if (kind == batch_kind::uniform_counted) {
      b.claimed.push_back(claimed);
      b.counts.push_back(std::min<std::int64_t>(claimed, b.capacity));
    } else {
      b.counts.push_back(b.capacity);
    }
  }
  return b;
}

/// A two-GEMM expert's parameters on the device: W1 is (E, H, F1).
template <class T>
struct device_tensors {
  expert::expert_shape shape;
  index_t width;
  bool biases;
  device_array<T> w1{static_cast<std::size_t>(shape.experts * shape.hidden * width)};
  device_array<T> b1{static_cast<std::size_t>(biases ? shape.experts * width : 0)};
  device_array<T> w2{static_cast<std::size_t>(shape.experts * shape.ffn * shape.hidden)};
  device_array<T> b2{static_cast<std::size_t>(biases ? shape.experts * shape.hidden : 0)};

  std::vector<device_array<T>*> all() { return {&w1, &b1, &w2, &b2}; }

  template <class X, class U>
  typename X::template params<U> views() {
    index_t const e = shape.experts;
    auto bias = [&](device_array<T>& b, index_t n) {
      return biases ? make_view(static_cast<U*>(b.data()), e, n) : matrix_view<U>{};
    };
    return {make_view(static_cast<U*>(w1.data()), e, shape.hidden, width), bias(b1, width),
            make_view(static_cast<U*>(w2.data()), e, shape.ffn, shape.hidden),
            bias(b2, shape.hidden)};
  }
};

/// What one device run gives back.
template <class T, class G>
struct device_results {
  std::vector<T> out, d_in;
  std::vector<G> w1, b1, w2, b2;
};

/// One CUDA forward and backward of X; every output and the workspace poisoned first.
template <class X, class T, class G>
struct device_run {
  expert::expert_shape shape;
  batch const& b;
  cudaStream_t stream;
  cublasHandle_t blas;
  device_tensors<T>& params;
  device_array<T>& in;
  device_array<T>& d_out;
  device_array<std::int64_t>& claimed;

  device_results<T, G> operator()() {
    index_t const rows = b.rows, h = shape.hidden;
    device_array<T> out(static_cast<std::size_t>(rows * h)), d_in(out.size());
    device_tensors<G> grads{shape, params.width, params.biases};
    device_array<std::byte> ws(X::template device_workspace_bytes<T>(shape, rows));
    for (auto* g : grads.all()) g->poison(stream);
    out.poison(stream);
    d_in.poison(stream);
    ws.poison(stream);
    workspace_carver carver(workspace{ws.data(), ws.size()});
    auto const state = X::template carve_device_state<T>(carver, shape, rows, rows);
    cuda_backend const cuda{stream, blas};
    auto const p = params.template views<X, T const>();
    auto const g = grads.template views<X, G>();
    auto const in_v = make_view(static_cast<T const*>(in.data()), rows, h);
    auto const d_out_v = make_view(static_cast<T const*>(d_out.data()), rows, h);
    auto run = [&](auto const& segments) {
      X::forward(cuda, shape, p, segments, in_v, make_view(out.data(), rows, h), state);
      X::backward(cuda, shape, p, segments, in_v, d_out_v, make_view(d_in.data(), rows, h), g,
                  state);
    };
    if (b.kind == batch_kind::ragged) {
      run(expert::row_segments{b.begin, b.counts});
    } else {
      span<std::int64_t const> counts;
      if (b.kind == batch_kind::uniform_counted)
        counts = {claimed.data(), static_cast<std::size_t>(shape.experts)};
      run(expert::uniform_segments{shape.experts, b.capacity, counts});
    }
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    return {out.download(stream),      d_in.download(stream),     grads.w1.download(stream),
            grads.b1.download(stream), grads.w2.download(stream), grads.b2.download(stream)};
  }
};

/// The testbed: X on the CUDA backend against the host backend on the same inputs.
template <class X, class T, class G = T>
void compare_with_host(batch_kind kind, bool biases, expert::expert_shape const& shape,
                       cudaStream_t stream, cublasHandle_t blas) {
  auto const seed = test::fresh_seed();
  // bfloat16 keeps 3 fewer mantissa bits than half, and the device rounds its
  // intermediates (activations, d_pre) to T where the host reference keeps double.
  double const tolerance = std::is_same_v<T, float>    ? 1e-5
                           : std::is_same_v<T, __half> ? 1e-2
                                                       : 5e-2;
  INFO("seed " << seed << ", " << std::string(dtype_traits<T>::name) << " (gradients "
               << std::string(dtype_traits<G>::name) << "), " << name_of(kind) << ", "
               << (biases ? "biases" : "no biases") << ", E " << shape.experts);
  std::mt19937_64 rng(seed);
  batch const b = make_batch(kind, shape.experts);
  index_t const rows = b.rows, h = shape.hidden, width = X::first_width(shape);

  test::two_layer_tensors<T> host_params{shape, width, biases};
  for (auto* t : host_params.all()) t->randomize(rng, 0.5);
  test::host_tensor<T> in(rows * h), d_out(rows * h);
  in.randomize(rng);  // rows of no expert hold values too: they must not leak
  d_out.randomize(rng);

  // Host reference, in double on the rounded values.
  test::host_tensor<double> in_d(rows * h), d_out_d(rows * h), out_ref(rows * h),
      d_in_ref(rows * h);
  for (std::size_t i = 0; i < in.data.size(); ++i) {
    in_d.data[i] = to_accumulate(in.data[i]);
    d_out_d.data[i] = to_accumulate(d_out.data[i]);
  }
  test::two_layer_tensors<double> grads_ref{shape, width, biases};
  {
    test::owned_host_state<X> const host_state(shape, rows);
    auto const& state = host_state.state;
    expert::row_segments const segments{b.begin, b.counts};
    auto const p = host_params.template views<X, T const>();
    X::forward(host, shape, p, segments, in_d.cview(rows, h), out_ref.view(rows, h), state);
    X::backward(host, shape, p, segments, in_d.cview(rows, h), d_out_d.cview(rows, h),
                d_in_ref.view(rows, h), grads_ref.template views<X, double>(), state);
  }

  // Device, twice: the second backward must agree bit for bit (determinism).
  device_tensors<T> params{shape, width, biases};
  auto const host_all = host_params.all();
  auto const device_all = params.all();
  for (std::size_t n = 0; n < host_all.size(); ++n)
    device_all[n]->upload(host_all[n]->data, stream);
  device_array<T> in_dev(in.data.size()), d_out_dev(d_out.data.size());
  in_dev.upload(in.data, stream);
  d_out_dev.upload(d_out.data, stream);
  device_array<std::int64_t> claimed(b.claimed.size());
  claimed.upload(b.claimed, stream);
  device_run<X, T, G> run{shape, b, stream, blas, params, in_dev, d_out_dev, claimed};
  auto const first = run();
  auto const second = run();

  expect_close(out_ref.data, widen(first.out), tolerance, "out");
  expect_close(d_in_ref.data, widen(first.d_in), tolerance, "d_in");
  expect_close(grads_ref.w1.data, widen(first.w1), tolerance, "d_w1");
  expect_close(grads_ref.w2.data, widen(first.w2), tolerance, "d_w2");
  if (biases) {
    expect_close(grads_ref.b1.data, widen(first.b1), tolerance, "d_b1");
    expect_close(grads_ref.b2.data, widen(first.b2), tolerance, "d_b2");
  }
  // Exact zeros: rows of no expert, and the gradients of experts with no rows.
  auto const idle = b.idle_rows();
  for (index_t r = 0; r < rows; ++r)
    if (idle[static_cast<std::size_t>(r)])
      for (index_t c = 0; c < h; ++c) {
        INFO("row " << r << " of no expert, column " << c);
        CHECK(to_accumulate(first.out[r * h + c]) == 0.0f);
        CHECK(to_accumulate(first.d_in[r * h + c]) == 0.0f);
      }
  for (index_t e = 0; e < shape.experts; ++e) {
    if (b.counts[static_cast<std::size_t>(e)] != 0) continue;
    INFO("expert " << e << " received no row");
    auto const all_zero = [](std::vector<G> const& v, index_t from, index_t n) {
      for (index_t i = from; i < from + n; ++i)
        if (to_accumulate(v[i]) != 0.0f) return false;
      return true;
    };
    CHECK(all_zero(first.w1, e * h * width, h * width));
    CHECK(all_zero(first.w2, e * shape.ffn * h, shape.ffn * h));
    if (biases) {
      CHECK(all_zero(first.b1, e * width, width));
      CHECK(all_zero(first.b2, e * h, h));
    }
  }
  CHECK(same_bits(first.out, second.out));
  CHECK(same_bits(first.d_in, second.d_in));
  CHECK(same_bits(first.w1, second.w1));
  CHECK(same_bits(first.b1, second.b1));
  CHECK(same_bits(first.w2, second.w2));
  CHECK(same_bits(first.b2, second.b2));
}

/// Every batch kind and bias choice, in float, half and bfloat16.
template <class X>
void compare_everywhere(expert::expert_shape const& shape) {
  test::owned_stream s;
  blas_handle blas;
  for (batch_kind kind :
       {batch_kind::uniform_counted, batch_kind::uniform_all_rows, batch_kind::ragged})
    for (bool biases : {true, false}) {
      compare_with_host<X, float>(kind, biases, shape, s.stream, blas.get());
      compare_with_host<X, __half>(kind, biases, shape, s.stream, blas.get());
      compare_with_host<X, __nv_bfloat16>(kind, biases, shape, s.stream, blas.get());
    }
}

// H = 40 and F1 = 40 span two 32-column tiles of the bias-gradient kernel, one partial.
expert::expert_shape const small{.experts = 4, .hidden = 40, .ffn = 20};

}  // namespace

TEST_CASE("ffn<relu> on the CUDA backend matches the host backend") {
  compare_everywhere<expert::ffn<act::relu>>(small);
}

TEST_CASE("ffn<gelu> on the CUDA backend matches the host backend") {
  compare_everywhere<expert::ffn<act::gelu>>(small);
}

TEST_CASE("ffn<silu> on the CUDA backend matches the host backend") {
  compare_everywhere<expert::ffn<act::silu>>(small);
}

TEST_CASE("glu<silu> on the CUDA backend matches the host backend") {
  compare_everywhere<expert::glu<act::silu>>(small);
}

TEST_CASE("glu<gelu> on the CUDA backend matches the host backend") {
  compare_everywhere<expert::glu<act::gelu>>(small);
}

TEST_CASE("float gradients of bfloat16 experts, and more experts than one copy of segments") {
  test::owned_stream s;
  blas_handle blas;
  compare_with_host<expert::glu<act::silu>, __nv_bfloat16, float>(batch_kind::ragged, true, small,
                                                                  s.stream, blas.get());
  compare_with_host<expert::ffn<act::gelu>, __half, float>(batch_kind::uniform_counted, true, small,
                                                           s.stream, blas.get());
  // 70 experts: the ragged segments travel in two launches of store_segments (64 + 6).
  expert::expert_shape const many{.experts = 70, .hidden = 8, .ffn = 4};
  for (batch_kind kind : {batch_kind::ragged, batch_kind::uniform_counted}) {
    compare_with_host<expert::glu<act::gelu>, float>(kind, true, many, s.stream, blas.get());
    compare_with_host<expert::ffn<act::silu>, __nv_bfloat16>(kind, false, many, s.stream,
                                                             blas.get());
  }
}

TEST_CASE("a uniform batch's forward and backward replay from a CUDA graph, bit for bit") {
  using X = expert::glu<act::silu>;
  using T = __nv_bfloat16;
  test::owned_stream s;
  // cuBLAS must not allocate while captured: point the handle at the stream, then give it a
  // workspace (in that order: cublasSetStream drops the workspace; moe::gemm leaves a handle
  // that is already on the stream alone). The workspace outlives the handle.
  device_array<std::byte> blas_workspace(std::size_t{32} << 20);
  blas_handle blas;
  MOE_CUBLAS_TRY(cublasSetStream(blas.get(), s.stream));
  MOE_CUBLAS_TRY(cublasSetWorkspace(blas.get(), blas_workspace.data(), blas_workspace.size()));
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  expert::expert_shape const shape = small;
  index_t const width = 2 * shape.ffn, h = shape.hidden;
  batch const b = make_batch(batch_kind::uniform_counted, shape.experts);
  index_t const rows = b.rows;

  test::two_layer_tensors<T> host_params{shape, width, true};
  for (auto* t : host_params.all()) t->randomize(rng, 0.5);
  device_tensors<T> params{shape, width, true};
  device_tensors<T> grads{shape, width, true};
  auto const host_all = host_params.all();
  auto const device_all = params.all();
  for (std::size_t n = 0; n < host_all.size(); ++n)
    device_all[n]->upload(host_all[n]->data, s.stream);
  test::host_tensor<T> in(rows * h), d_out(rows * h);
  in.randomize(rng);
  d_out.randomize(rng);
  device_array<T> in_dev(in.data.size()), d_out_dev(d_out.data.size()), out(in.data.size()),
      d_in(in.data.size());
  in_dev.upload(in.data, s.stream);
  d_out_dev.upload(d_out.data, s.stream);
  device_array<std::int64_t> claimed(b.claimed.size());
  claimed.upload(b.claimed, s.stream);
  device_array<std::byte> ws(X::device_workspace_bytes<T>(shape, rows));
  workspace_carver carver(workspace{ws.data(), ws.size()});
  auto const state = X::carve_device_state<T>(carver, shape, rows, rows);
  cuda_backend const cuda{s.stream, blas.get()};
  expert::uniform_segments const segments{
      shape.experts, b.capacity, {claimed.data(), static_cast<std::size_t>(shape.experts)}};
  auto step = [&] {
    X::forward(cuda, shape, params.views<X, T const>(), segments,
               make_view(static_cast<T const*>(in_dev.data()), rows, h),
               make_view(out.data(), rows, h), state);
    X::backward(cuda, shape, params.views<X, T const>(), segments,
                make_view(static_cast<T const*>(in_dev.data()), rows, h),
                make_view(static_cast<T const*>(d_out_dev.data()), rows, h),
                make_view(d_in.data(), rows, h), grads.views<X, T>(), state);
  };
  auto snapshot = [&] {
    std::vector<std::vector<T>> all{out.download(s.stream), d_in.download(s.stream)};
    for (auto* g : grads.all()) all.push_back(g->download(s.stream));
    return all;
  };
  auto poison = [&] {
    out.poison(s.stream);
    d_in.poison(s.stream);
    for (auto* g : grads.all()) g->poison(s.stream);
  };

  poison();
  step();
  auto const direct = snapshot();

  poison();
  test::captured_graph graph(s.stream, cudaStreamCaptureModeThreadLocal, step);
  REQUIRE(graph.ok());
  graph.replay(s.stream);
  auto const replayed = snapshot();
  REQUIRE(direct.size() == replayed.size());
  for (std::size_t i = 0; i < direct.size(); ++i) {
    INFO("output " << i);
    CHECK(same_bits(direct[i], replayed[i]));
  }
}

TEST_CASE("a rejected CUDA call throws before any device work and writes nothing") {
  using X = expert::ffn<act::gelu>;
  using T = float;
  test::owned_stream s;
  blas_handle blas;
  expert::expert_shape const shape = small;
  index_t const rows = 24, h = shape.hidden;
  device_tensors<T> params{shape, shape.ffn, true};
  device_array<T> in(static_cast<std::size_t>(rows * h)), out(in.size());
  out.poison(s.stream);
  device_array<std::byte> ws(X::device_workspace_bytes<T>(shape, rows));
  workspace_carver carver(workspace{ws.data(), ws.size()});
  auto const state = X::carve_device_state<T>(carver, shape, rows, rows);
  auto const p = params.views<X, T const>();
  auto const in_v = make_view(static_cast<T const*>(in.data()), rows, h);
  expert::uniform_segments const segments{shape.experts, 6, {}};

  CHECK_THROWS_AS(X::forward(cuda_backend{s.stream, nullptr}, shape, p, segments, in_v,
                             make_view(out.data(), rows, h), state),
                  invalid_argument);
  CHECK_THROWS_AS(X::forward(cuda_backend{s.stream, blas.get()}, shape, p,
                             expert::uniform_segments{shape.experts, 5, {}}, in_v,
                             make_view(out.data(), rows, h), state),
                  invalid_argument);
  std::array<std::int64_t, 4> const begin{0, 4, 2, 10}, counts{4, 2, 2, 2};  // out of order
  CHECK_THROWS_AS(
      X::forward(cuda_backend{s.stream, blas.get()}, shape, p, expert::row_segments{begin, counts},
                 in_v, make_view(out.data(), rows, h), state),
      invalid_argument);
  auto const after = out.download(s.stream);
  std::vector<unsigned char> bytes(after.size() * sizeof(T));
  std::memcpy(bytes.data(), after.data(), bytes.size());
  CHECK(std::all_of(bytes.begin(), bytes.end(), [](unsigned char c) { return c == 0xff; }));
}
