// SPDX-License-Identifier: Apache-2.0
// Expert parallelism on the CUDA backend: a layer whose E experts are split over the W
// virtual ranks of a device_simulated_world (one stream and cuBLAS handle per rank, one GPU)
// against the host backend's expert-parallel layer on a simulated_world, on the same inputs:
// every rank's y, dx, gate and expert gradients and routing statistics. Capacity layout with
// a fixed factor (drops included) and dynamic capacity (factor 0: C the largest load of all
// ranks), ragged layout with and without row padding and with a different number of tokens
// on each rank, over linear_all_to_all and
// all_to_all_2dh, at W = 2 and 4 in several topologies; the same ranks against the one-rank
// CUDA layer on the global batch, where nothing is dropped; and a composition that cannot
// split its experts, rejected on every rank. Skipped (exit 77) without a CUDA device.
//
// x and W_gate lie on dyadic grids (support/exact_routing.hpp), so both backends route alike;
// the host computes in double on the same float values. Tolerance: float 1e-5 relative to
// |reference| + the tensor's RMS (expect_close); routing statistics exactly. Outputs, the
// gradients and the workspace are poisoned (0xff: NaN) first.

#include "../support/device.hpp"
#include "../support/exact_routing.hpp"
#include "../support/expect.hpp"
#include "../support/parameters.hpp"

#include <doctest/doctest.h>

#include <moe/core/blas.hpp>
#include <moe/expert/kernels/ffn.cuh>
#include <moe/layer/kernels/layer.cuh>
#include <moe/moe.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace moe;
using comm::device_simulated_world;
using comm::simulated_world;
using comm::topology;
using test::device_array;
using expert_type = expert::ffn<act::gelu>;

template <class Layout, class Collective>
using parallel_layer = layer<gating::top_k<2>, Layout, Collective, expert_type>;
template <class Layout>
using whole_layer = layer<gating::top_k<2>, Layout, comm::single_rank, expert_type>;

parameter_options const with_biases{.biases = true};

/// Every rank's inputs: the whole layer's parameters (all E experts; rank r holds experts
/// [r·E_local, (r+1)·E_local) of them) and each rank's x and dy, in float. With the capacity
/// layout every rank routes the layer's tokens; the ragged layout lets rank r route 5·r fewer.
template <class Layout>
struct world_inputs {
  whole_layer<Layout> whole;
  host_parameters<whole_layer<Layout>, float> params;
  std::vector<index_t> tokens;            // per rank
  std::vector<std::vector<float>> x, dy;  // per rank: (tokens, hidden)

  world_inputs(layer_args const& a, int ranks, std::mt19937_64& rng)
      : whole(a), params(whole, with_biases) {
    for (std::size_t n = 1; n < params.shapes().size(); ++n)
      test::randomize(params.values(n), rng, 0.5);
    test::fill_gate(params.values(0), a.hidden, rng);
    for (int r = 0; r < ranks; ++r) {
      tokens.push_back(Layout::drops_tokens ? a.gate.tokens : a.gate.tokens - 5 * r);
      x.emplace_back(static_cast<std::size_t>(tokens.back() * a.hidden));
      dy.emplace_back(x.back().size());
      test::fill_x(x.back(), rng);
      test::randomize(span<float>(dy.back().data(), dy.back().size()), rng, 1.0);
    }
  }

  /// Rank r's part of the parameters, in `part`'s element type: the gate weight whole, its
  /// experts' run of each expert-major tensor. Gradients poisoned.
  template <class Layer, class U>
  void copy_part(int r, host_parameters<Layer, U>& part) const {
    for (std::size_t n = 0; n < part.shapes().size(); ++n) {
      std::size_t const count = part.values(n).size();
      std::size_t const first = n == 0 ? 0 : static_cast<std::size_t>(r) * count;
      for (std::size_t i = 0; i < count; ++i)
        part.values(n)[i] = static_cast<U>(params.values(n)[first + i]);
    }
    test::poison_gradients(part);
  }
};

/// What one rank's forward and backward gave, as doubles.
struct rank_results {
  std::vector<double> y, dx;
  std::vector<std::vector<double>> grads;  // in the order of parameter_shapes
  layer_stats stats;
};

template <class Layer, class T>
std::vector<std::vector<double>> gradients_of(host_parameters<Layer, T> const& p) {
  std::vector<std::vector<double>> out;
  for (std::size_t n = 0; n < p.shapes().size(); ++n) {
    out.emplace_back();
    for (T v : p.gradients(n)) out.back().push_back(static_cast<double>(v));
  }
  return out;
}

/// Runs `body(comm, rank, tokens, results)` on every rank of a `World` of topology `t`,
/// rank r routing `tokens[r]` tokens; returns every rank's results.
template <class World, class Body>
std::vector<rank_results> on_every_rank(topology t, std::vector<index_t> const& tokens, Body body) {
  std::vector<rank_results> results(static_cast<std::size_t>(t.size()));
  World world(t);
  world.run([&](typename World::rank_communicator& c) {
    auto const r = static_cast<std::size_t>(c.rank());
    body(c, c.rank(), tokens[r], results[r]);
  });
  return results;
}

/// The reference: the host backend's expert-parallel layer, in double.
template <class Layout, class Collective>
std::vector<rank_results> run_on_host(topology t, layer_args const& a,
                                      world_inputs<Layout> const& in) {
  using Layer = parallel_layer<Layout, Collective>;
  index_t const h = a.hidden;
  return on_every_rank<simulated_world>(
      t, in.tokens,
      [&](simulated_world::rank_communicator& c, int r, index_t tokens, rank_results& out) {
        Layer const layer(a, c);
        host_parameters<Layer, double> part(layer, with_biases);
        in.copy_part(r, part);
        std::vector<double> const x = test::widen(in.x[static_cast<std::size_t>(r)]);
        std::vector<double> const dy = test::widen(in.dy[static_cast<std::size_t>(r)]);
        out.y.assign(x.size(), std::nan(""));
        out.dx.assign(x.size(), std::nan(""));
        host_buffer ws(layer.workspace_bytes(host));
        layer.forward(host, make_view(x.data(), tokens, h), part.params(),
                      make_view(out.y.data(), tokens, h), ws.view());
        layer.backward(host, make_view(dy.data(), tokens, h), part.params(),
                       make_view(out.dx.data(), tokens, h), part.gradients(), ws.view());
        out.grads = gradients_of(part);
        out.stats = layer.stats(host, ws.view());
      });
}

/// The CUDA backend's expert-parallel layer, one stream and cuBLAS handle per virtual rank;
/// outputs, gradients and the workspace poisoned first.
template <class Layout, class Collective>
std::vector<rank_results> run_on_device(topology t, layer_args const& a,
                                        world_inputs<Layout> const& in) {
  using Layer = parallel_layer<Layout, Collective>;
  index_t const h = a.hidden;
  return on_every_rank<device_simulated_world>(
      t, in.tokens,
      [&](device_simulated_world::rank_communicator& c, int r, index_t tokens, rank_results& out) {
        test::owned_stream s;
        blas_handle blas;
        cuda_backend const cuda{s.stream, blas.get()};
        Layer const layer(a, c);
        host_parameters<Layer, float> part(layer, with_biases);
        in.copy_part(r, part);
        device_parameters<Layer, float> params(layer, s.stream, with_biases);
        params.copy_from(part);
        std::size_t const n = in.x[static_cast<std::size_t>(r)].size();
        device_array<float> x(n), dy(n), y(n), dx(n);
        x.upload(in.x[static_cast<std::size_t>(r)], s.stream);
        dy.upload(in.dy[static_cast<std::size_t>(r)], s.stream);
        device_array<std::byte> ws(layer.template workspace_bytes<float>(cuda));
        y.poison(s.stream);
        dx.poison(s.stream);
        ws.poison(s.stream);
        workspace const w{ws.data(), ws.size()};
        layer.forward(cuda, make_view(static_cast<float const*>(x.data()), tokens, h),
                      params.params(), make_view(y.data(), tokens, h), w);
        layer.backward(cuda, make_view(static_cast<float const*>(dy.data()), tokens, h),
                       params.params(), make_view(dx.data(), tokens, h), params.gradients(), w);
        out.stats = layer.stats(cuda, w, tokens);
        out.y = test::widen(y.download(s.stream));
        out.dx = test::widen(dx.download(s.stream));
        params.copy_to(part);
        out.grads = gradients_of(part);
      });
}

/// The one-rank CUDA layer on the global batch (every rank's tokens, rank after rank): its y
/// and dx, poisoned first.
template <class Layout>
rank_results run_whole_on_device(layer_args const& a, world_inputs<Layout> const& in) {
  layer_args global = a;
  global.gate.tokens = std::accumulate(in.tokens.begin(), in.tokens.end(), index_t{0});
  index_t const tokens = global.gate.tokens, h = a.hidden;
  test::owned_stream s;
  blas_handle blas;
  cuda_backend const cuda{s.stream, blas.get()};
  whole_layer<Layout> const layer(global);
  device_parameters<whole_layer<Layout>, float> params(layer, s.stream, with_biases);
  params.copy_from(in.params);
  std::vector<float> all_x, all_dy;
  for (std::size_t r = 0; r < in.x.size(); ++r) {
    all_x.insert(all_x.end(), in.x[r].begin(), in.x[r].end());
    all_dy.insert(all_dy.end(), in.dy[r].begin(), in.dy[r].end());
  }
  device_array<float> x(all_x.size()), dy(all_x.size()), y(all_x.size()), dx(all_x.size());
  x.upload(all_x, s.stream);
  dy.upload(all_dy, s.stream);
  device_array<std::byte> ws(layer.template workspace_bytes<float>(cuda));
  y.poison(s.stream);
  dx.poison(s.stream);
  ws.poison(s.stream);
  workspace const w{ws.data(), ws.size()};
  layer.forward(cuda, make_view(static_cast<float const*>(x.data()), tokens, h), params.params(),
                make_view(y.data(), tokens, h), w);
  layer.backward(cuda, make_view(static_cast<float const*>(dy.data()), tokens, h), params.params(),
                 make_view(dx.data(), tokens, h), params.gradients(), w);
  rank_results out;
  out.stats = layer.stats(cuda, w, tokens);
  out.y = test::widen(y.download(s.stream));
  out.dx = test::widen(dx.download(s.stream));
  return out;
}

/// Every rank's y and dx against the one-rank CUDA layer's rows of its tokens, where neither
/// drops (dynamic capacity, ragged). Each row meets the same expert weights and combine sums
/// a token's choices in the same order; only the GEMMs' row counts differ. The emulated
/// cuBLAS computes a row alike at any row count, so there the bits agree; a GPU's cuBLAS may
/// pick another kernel for another count, so there they agree to 1e-5.
template <class Layout, class Collective>
void compare_with_one_rank(topology t, layer_args const& a) {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed << ", " << t.ranks_per_node << " ranks per node, " << t.nodes << " nodes");
  std::mt19937_64 rng(seed);
  world_inputs<Layout> const in(a, t.size(), rng);
  std::vector<rank_results> const got = run_on_device<Layout, Collective>(t, a, in);
  rank_results const whole = run_whole_on_device(a, in);
  CHECK(whole.stats.dropped == 0);
  std::size_t first = 0;  // rank r's first element in the global batch
  for (std::size_t r = 0; r < got.size(); ++r) {
    INFO("rank " << r);
    CHECK(got[r].stats.dropped == 0);
    std::size_t const n = in.x[r].size();
    auto rows_of = [&](std::vector<double> const& v) {
      return std::vector<double>(v.begin() + static_cast<std::ptrdiff_t>(first),
                                 v.begin() + static_cast<std::ptrdiff_t>(first + n));
    };
#if defined(MOE_CUDA_EMULATION)
    CHECK(got[r].y == rows_of(whole.y));  // NaN (poison) equals nothing
    CHECK(got[r].dx == rows_of(whole.dx));
#else
    test::expect_close(rows_of(whole.y), got[r].y, 1e-5, "y");
    test::expect_close(rows_of(whole.dx), got[r].dx, 1e-5, "dx");
#endif
    first += n;
  }
}

/// The testbed: every rank's CUDA results against the host's.
template <class Layout, class Collective>
void compare_with_host(topology t, layer_args const& a) {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed << ", " << t.ranks_per_node << " ranks per node, " << t.nodes << " nodes, f "
               << a.gate.capacity_factor << ", row alignment " << a.expert_row_alignment);
  std::mt19937_64 rng(seed);
  world_inputs<Layout> const in(a, t.size(), rng);
  std::vector<rank_results> const want = run_on_host<Layout, Collective>(t, a, in);
  std::vector<rank_results> const got = run_on_device<Layout, Collective>(t, a, in);
  std::vector<parameter_shape> const shapes = in.whole.parameter_shapes();
  std::int64_t dropped = 0;
  for (std::size_t r = 0; r < want.size(); ++r) {
    INFO("rank " << r);
    test::expect_close(want[r].y, got[r].y, 1e-5, "y");
    test::expect_close(want[r].dx, got[r].dx, 1e-5, "dx");
    REQUIRE(got[r].grads.size() == want[r].grads.size());
    for (std::size_t n = 0; n < want[r].grads.size(); ++n)
      test::expect_close(want[r].grads[n], got[r].grads[n], 1e-5, "d " + shapes[n].name);
    CHECK(got[r].stats.capacity == want[r].stats.capacity);
    CHECK(got[r].stats.expert_rows == want[r].stats.expert_rows);
    CHECK(got[r].stats.dropped == want[r].stats.dropped);
    CHECK(got[r].stats.load == want[r].stats.load);
    CHECK(got[r].stats.dropped_per_expert == want[r].stats.dropped_per_expert);
    // Dynamic capacity is one C for every rank: the largest load of any.
    CHECK(got[r].stats.capacity == got.front().stats.capacity);
    dropped += got[r].stats.dropped;
  }
  if constexpr (Layout::drops_tokens)
    if (a.gate.capacity_factor > 0) CHECK(dropped > 0);  // the drop paths ran
  if (a.gate.capacity_factor <= 0 || !Layout::drops_tokens) CHECK(dropped == 0);
}

// E = 8 splits over 2 and 4 ranks; T, H, F small so that the emulated runtime stays quick.
layer_args const base_args{
    .gate = {.tokens = 24, .experts = 8, .capacity_factor = 1.0f}, .hidden = 32, .ffn = 24};

layer_args with_factor(float factor) {
  layer_args a = base_args;
  a.gate.capacity_factor = factor;
  return a;
}

topology const topologies[] = {{.ranks_per_node = 2, .nodes = 1},
                               {.ranks_per_node = 2, .nodes = 2},
                               {.ranks_per_node = 4, .nodes = 1}};

}  // namespace

TEST_CASE("expert parallelism on the CUDA backend: the capacity layout matches the host") {
  for (topology const t : topologies) {
    // f = 1 with k = 2: C = 2·⌈T/E⌉ drops assignments; f = 0: C = the largest load anywhere.
    for (float const factor : {1.0f, 0.0f}) {
      compare_with_host<layout::capacity, comm::linear_all_to_all>(t, with_factor(factor));
      compare_with_host<layout::capacity, comm::all_to_all_2dh>(t, with_factor(factor));
    }
  }
}

TEST_CASE("expert parallelism on the CUDA backend: the ragged layout matches the host") {
  for (topology const t : topologies) {
    compare_with_host<layout::ragged, comm::linear_all_to_all>(t, base_args);
    layer_args padded = base_args;
    padded.expert_row_alignment = 8;
    compare_with_host<layout::ragged, comm::all_to_all_2dh>(t, padded);
  }
}

TEST_CASE(
    "expert parallelism on the CUDA backend: W ranks give the one-rank CUDA layer's y and "
    "dx") {
  for (topology const t : topologies) {
    compare_with_one_rank<layout::capacity, comm::linear_all_to_all>(t, with_factor(0.0f));
    compare_with_one_rank<layout::capacity, comm::all_to_all_2dh>(t, with_factor(0.0f));
    compare_with_one_rank<layout::ragged, comm::linear_all_to_all>(t, base_args);
  }
}

TEST_CASE(
    "expert parallelism on the CUDA backend: experts that cannot split are rejected on "
    "every rank") {
  using Layer = parallel_layer<layout::capacity, comm::linear_all_to_all>;
  device_simulated_world world({.ranks_per_node = 3, .nodes = 1});
  std::vector<int> rejected(3, 0);
  CHECK_THROWS_WITH_AS(world.run([&](device_simulated_world::rank_communicator& c) {
    try {
      Layer const layer(base_args, c);  // 8 experts over 3 ranks
    } catch (moe::invalid_argument const& e) {
      rejected[static_cast<std::size_t>(c.rank())] =
          std::string(e.what()).find("do not split evenly over 3 ranks") != std::string::npos;
      throw;
    }
  }),
                       doctest::Contains("do not split evenly over 3 ranks"),
                       moe::invalid_argument);
  CHECK(rejected == std::vector<int>{1, 1, 1});
}
