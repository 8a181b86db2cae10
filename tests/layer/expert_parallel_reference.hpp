// SPDX-License-Identifier: Apache-2.0
#pragma once
// What every expert-parallel test of the host backend compares with, on any communicator
// (the simulated world's ranks, MPI processes): the one-rank layer run on the global batch,
// and one rank's part of the same computation.
//
// Rank r routes a run of the global batch's tokens and holds experts [r·E_l, (r+1)·E_l), its
// part of the reference's parameters. Its rows of y and dx must equal the reference's bit
// for bit (each row is computed by the same expert with the same weights, and combine sums
// a token's choices in the same order); its expert gradients are sums over rows whose order
// differs between the layouts when k > 1, and its gate gradient a partial sum over its
// tokens, so those agree to rounding (exactly when k = 1).

#include "../support/parameters.hpp"

#include <doctest/doctest.h>

#include <moe/moe.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <vector>

namespace moe::test {

/// The largest error relative to want's largest magnitude; NaN where got holds one (a
/// poisoned element never written), which std::max would pass over.
inline double max_relative_error(span<double const> got, span<double const> want) {
  double worst = 0, scale = 0;
  for (double v : want) scale = std::max(scale, std::abs(v));
  for (std::size_t i = 0; i < got.size(); ++i) {
    double const error = std::abs(got[i] - want[i]) / std::max(scale, 1e-300);
    if (std::isnan(error) || error > worst) worst = error;
  }
  return worst;
}

/// Writes each token's provenance into its row: rows(t, 0) = `rank`, rows(t, 1) = t, so that
/// a row delivered to the wrong token names the token it came from. Needs hidden ≥ 2.
inline void write_provenance(matrix_view<double> rows, int rank) {
  for (index_t t = 0; t < rows.extent(0); ++t) {
    rows(t, 0) = static_cast<double>(rank);
    rows(t, 1) = static_cast<double>(t);
  }
}

/// A small layer of `experts` experts, 6 tokens per rank, with dynamic capacity: nothing is
/// dropped, on one rank or many, so that every rank's rows can equal the one-rank layer's.
inline layer_args small_args(index_t experts) {
  return {.gate = {.tokens = 6,
                   .experts = experts,
                   .capacity_factor = 0.0f,
                   .normalize = gating::renormalize::before_drops},
          .hidden = 5,
          .ffn = 7};
}

/// The one-rank layer on `global_tokens` tokens (0 too): parameters, inputs and results.
template <class Gate, class Layout, class Expert>
struct one_rank_reference {
  using layer_type = moe::layer<Gate, Layout, comm::single_rank, Expert>;

  /// With `uniform_gate` every score ties, so that every token picks the lowest experts and
  /// the last experts receive no row. With `tokens_per_rank`, the global batch is the ranks'
  /// runs in rank order (summing to `global_tokens`), each token's row marked with its
  /// provenance (write_provenance).
  one_rank_reference(layer_args args, index_t global_tokens, std::mt19937_64& rng,
                     bool uniform_gate = false, std::vector<index_t> const& tokens_per_rank = {})
      : layer(with_tokens(args, std::max<index_t>(global_tokens, 1))),  // a call may be empty
        whole(layer, {.biases = true}),
        x(global_tokens * args.hidden),
        dy(global_tokens * args.hidden),
        y(global_tokens * args.hidden),
        dx(global_tokens * args.hidden) {
    index_t const h = args.hidden;
    randomize(whole, rng, 0.5);
    if (uniform_gate) std::fill(whole.values(0).begin(), whole.values(0).end(), 0.0);
    x.randomize(rng);
    index_t first = 0;
    for (std::size_t r = 0; r < tokens_per_rank.size(); ++r) {
      write_provenance(make_view(x.data.data() + first * h, tokens_per_rank[r], h),
                       static_cast<int>(r));
      first += tokens_per_rank[r];
    }
    dy.randomize(rng);
    std::vector<std::byte> ws(layer.workspace_bytes(host));
    layer.forward(host, x.cview(global_tokens, h), whole.params(), y.view(global_tokens, h), ws);
    layer.backward(host, dy.cview(global_tokens, h), whole.params(), dx.view(global_tokens, h),
                   whole.gradients(), ws);
    stats = layer.stats(host, ws);
  }

  /// Tensor i of rank r's parameters within the whole layer's: every rank holds the gate
  /// weight (0) whole; the expert tensors are expert-major, so a rank's experts are one run.
  template <class T>
  static span<T> part_of(span<T> whole_tensor, std::size_t i, int rank, std::size_t part_size) {
    return i == 0 ? whole_tensor
                  : whole_tensor.subspan(static_cast<std::size_t>(rank) * part_size, part_size);
  }

  static layer_args with_tokens(layer_args a, index_t tokens) {
    a.gate.tokens = tokens;
    return a;
  }

  layer_type layer;
  host_parameters<layer_type, double> whole;
  host_tensor<double> x, dy, y, dx;
  layer_stats stats;
};

/// What one rank computed, forward and backward, on its tokens.
template <class Parallel>
struct rank_results {
  host_parameters<Parallel, double> part;  // its parameters, and its gradients
  std::vector<double> y, dx;               // (tokens, hidden) its rows
  layer_stats stats;
};

/// Runs this rank's part of `ref` over `comm`: tokens [first, first + tokens) of the global
/// batch, and the rank's experts' part of the weights. Outputs are poisoned first.
template <class Parallel, comm::communicator C, class Reference>
rank_results<Parallel> run_rank(C& comm, layer_args const& args, Reference const& ref,
                                index_t first, index_t tokens) {
  int const r = comm.rank();
  index_t const h = args.hidden;
  Parallel layer(args, comm);
  REQUIRE(layer.expert_shape().experts == args.gate.experts / comm.size());
  REQUIRE(layer.first_expert() == r * layer.expert_shape().experts);
  rank_results<Parallel> out{host_parameters<Parallel, double>(layer, {.biases = true}),
                             std::vector<double>(static_cast<std::size_t>(tokens * h)),
                             std::vector<double>(static_cast<std::size_t>(tokens * h)),
                             {}};
  poison_gradients(out.part);
  poison(span<double>(out.y));
  poison(span<double>(out.dx));
  for (std::size_t i = 0; i < out.part.shapes().size(); ++i) {
    auto const whole = ref.whole.values(i);
    std::ranges::copy(Reference::part_of(whole, i, r, out.part.values(i).size()),
                      out.part.values(i).begin());
  }
  std::vector<std::byte> ws(layer.workspace_bytes(host));
  layer.forward(host, make_view(ref.x.data.data() + first * h, tokens, h), out.part.params(),
                make_view(out.y.data(), tokens, h), ws);
  layer.backward(host, make_view(ref.dy.data.data() + first * h, tokens, h), out.part.params(),
                 make_view(out.dx.data(), tokens, h), out.part.gradients(), ws);
  out.stats = layer.stats(host, ws);
  return out;
}

/// Whether a rank's rows equal the reference's rows from `first` on, bit for bit.
inline bool rows_equal(std::vector<double> const& rows, host_tensor<double> const& whole,
                       index_t first, index_t hidden) {
  return std::equal(rows.begin(), rows.end(), whole.data.begin() + first * hidden);
}

}  // namespace moe::test
