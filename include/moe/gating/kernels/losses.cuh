// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA path of the load-balancing losses (gating/losses.hpp), for every aux-loss policy:
// the call's me_e (mean probability) and ce_e (1st-choice fraction), the aux loss
// (1/G') Σ_g E · Σ_e me_{g,e} · f_{g,e} over G' loss groups, its gradient ∂/∂p_{t,e} per loss
// group, and z_loss = mean_t lse_t². p_{t,e} is the score, or s_{t,e} / Σ_e s_{t,e} when the
// scores do not sum to one. Choices are counted as selected: before drops and random routing.
//
// Deterministic: float sums run in a fixed order over fixed partitions — per chunk of at most
// 256 tokens of one loss group, then over a group's chunks, then over the groups, then one
// block over the experts — and choices are counted in integers. No atomics.

#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/kernels/shapes.cuh>
#include <moe/core/kernels/warp.cuh>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/concepts.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/scores.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moe::gating::detail {

/// Tokens summed by one block of `loss_partials`: the first level of the fixed tree.
inline constexpr index_t loss_chunk_tokens = 256;

/// How the loss reductions partition T tokens: G' contiguous loss groups of S' tokens, each
/// cut into chunks of at most `loss_chunk_tokens` that start at the group's start, so that no
/// chunk straddles two groups.
struct loss_partition {
  index_t groups;            // G'
  index_t size;              // S' = T / G'
  index_t chunks_per_group;  // ⌈S' / 256⌉

  MOE_HOST_DEVICE constexpr loss_partition(index_t tokens, index_t group_count) noexcept
      : groups(group_count),
        size(group_count > 0 ? tokens / group_count : 0),
        chunks_per_group(ceil_div(size, loss_chunk_tokens)) {}

  /// Rows of the chunk partial sums.
  [[nodiscard]] MOE_HOST_DEVICE constexpr index_t chunks() const noexcept {
    return groups * chunks_per_group;
  }
  /// The first token of chunk c.
  [[nodiscard]] MOE_HOST_DEVICE constexpr index_t chunk_begin(index_t c) const noexcept {
    return c / chunks_per_group * size + c % chunks_per_group * loss_chunk_tokens;
  }
  /// One past the last token of chunk c.
  [[nodiscard]] MOE_HOST_DEVICE constexpr index_t chunk_end(index_t c) const noexcept {
    index_t const group_end = (c / chunks_per_group + 1) * size;
    index_t const end = chunk_begin(c) + loss_chunk_tokens;
    return end < group_end ? end : group_end;
  }
};

/// G': the groups aux loss `Aux` averages over, out of `groups` local groups.
template <aux_loss_policy Aux>
MOE_HOST_DEVICE constexpr index_t loss_groups(index_t groups) noexcept {
  return Aux::per_group ? groups : 1;
}

/// The choices of each token that aux loss `Aux` counts.
template <aux_loss_policy Aux>
MOE_HOST_DEVICE constexpr int counted_choices(int k) noexcept {
  return Aux::first_choice_only ? 1 : k;
}

/// Partial sums of one expert over some tokens: Σ p, the 1st choices and the other counted
/// choices, counted in Count.
template <class Count>
struct choice_sums {
  float score = 0;
  Count first = 0;
  Count other = 0;
  __device__ choice_sums& operator+=(choice_sums const& o) {
    score += o.score;
    first += o.first;
    other += o.other;
    return *this;
  }
};

/// Partial sums of one expert over some loss groups: Σ p, the loss terms and the 1st choices.
struct expert_sums {
  float score = 0;
  float term = 0;
  std::int64_t first = 0;
  __device__ expert_sums& operator+=(expert_sums const& o) {
    score += o.score;
    term += o.term;
    first += o.first;
    return *this;
  }
};

/// A block's (columns, rows) partials summed per column in row order, a fixed tree: every
/// thread stores `mine` and the block synchronises (so every thread must call it); row 0
/// then adds rows 1, 2, … into `mine`. Returns whether this thread holds a column's total.
template <class Sums, int Rows, int Columns>
__device__ bool sum_over_rows(Sums (&shared)[Rows][Columns], Sums& mine) {
  shared[threadIdx.y][threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.y != 0) return false;
  for (int y = 1; y < Rows; ++y) mine += shared[y][threadIdx.x];
  return true;
}

/// Per chunk and expert: Σ_t p_{t,e}, the count of tokens whose 1st choice is e, and the count
/// of their other counted choices (j in [1, counted)) that are e. Block (32 experts, 8 token
/// rows); grid (chunks, ⌈E/32⌉).
struct loss_partials : moe::detail::expert_columns<loss_partials> {
  struct params {
    float const* scores;         // (tokens, experts) device memory
    float const* score_sum;      // (tokens) Σ_e s_{t,e}, or null when the scores sum to one
    std::int32_t const* expert;  // (tokens, k)
    index_t tokens;
    index_t experts;
    int k;
    int counted;  // choices per token the aux loss counts: 1 or k
    loss_partition partition;
    float* partial_score;         // (chunks, experts)
    std::int32_t* partial_first;  // (chunks, experts)
    std::int32_t* partial_other;  // (chunks, experts); unused when counted == 1
  };
  struct shared_storage {
    choice_sums<std::int32_t> sums[rows][columns];
  };
  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(p.partition.chunks()),
                static_cast<unsigned>(ceil_div(p.experts, columns)));
  }

  __device__ void operator()(params const& p, char* smem) const {
    auto& shared = *reinterpret_cast<shared_storage*>(smem);
    index_t const e = expert(blockIdx.y);
    index_t const c = blockIdx.x;
    index_t const end = p.partition.chunk_end(c);
    // A warp reads 32 neighbouring experts of one token (coalesced) and the same choices.
    choice_sums<std::int32_t> sums;
    if (e < p.experts)
      for (index_t t = p.partition.chunk_begin(c) + threadIdx.y; t < end; t += rows) {
        float s = p.scores[t * p.experts + e];
        if (p.score_sum != nullptr) {
          s = aux_probability(s, p.score_sum[t]);
        }
        sums.score += s;
        std::int32_t const* choices = p.expert + t * p.k;
        sums.first += choices[0] == e ? 1 : 0;
        for (int j = 1; j < p.counted; ++j) sums.other += choices[j] == e ? 1 : 0;
      }
    // Reached by every thread: only the loop above depends on e.
    if (sum_over_rows(shared.sums, sums) && e < p.experts) {
      index_t const at = c * p.experts + e;
      p.partial_score[at] = sums.score;
      p.partial_first[at] = sums.first;
      if (p.counted > 1) p.partial_other[at] = sums.other;
    }
  }
};

/// Per loss group g and expert, over the group's chunks: me_{g,e} = Σ p / S',
/// f_{g,e} = counted choices / (c · S'), the loss term me · f, and the gradient
/// ∂aux/∂p_{t,e} = E · f_{g,e} / (G' · S') into row g of r.aux_gradient. Block (32 experts,
/// 8 chunk rows); grid (G', ⌈E/32⌉).
struct loss_group_totals : moe::detail::expert_columns<loss_group_totals> {
  struct params {
    float const* partial_score;         // (chunks, experts)
    std::int32_t const* partial_first;  // (chunks, experts)
    std::int32_t const* partial_other;  // (chunks, experts); unused when counted == 1
    index_t experts;
    int counted;
    loss_partition partition;
    float* group_score;         // (G', experts) Σ p over the group
    std::int64_t* group_first;  // (G', experts) 1st choices in the group
    float* group_term;          // (G', experts) me_{g,e} · f_{g,e}
    float* aux_gradient;        // (≥ G', experts) r.aux_gradient
  };
  struct shared_storage {
    choice_sums<std::int64_t> sums[rows][columns];
  };
  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(p.partition.groups),
                static_cast<unsigned>(ceil_div(p.experts, columns)));
  }

  __device__ void operator()(params const& p, char* smem) const {
    auto& shared = *reinterpret_cast<shared_storage*>(smem);
    index_t const e = expert(blockIdx.y);
    index_t const g = blockIdx.x;
    index_t const begin = g * p.partition.chunks_per_group;
    index_t const end = begin + p.partition.chunks_per_group;
    choice_sums<std::int64_t> sums;
    if (e < p.experts)
      for (index_t c = begin + threadIdx.y; c < end; c += rows) {
        sums.score += p.partial_score[c * p.experts + e];
        sums.first += p.partial_first[c * p.experts + e];
        if (p.counted > 1) sums.other += p.partial_other[c * p.experts + e];
      }
    if (sum_over_rows(shared.sums, sums) && e < p.experts) {
      auto const [sum, first, other] = sums;
      float const size = static_cast<float>(p.partition.size);
      float const mean = sum / size;
      float const fraction =
          static_cast<float>(first + other) / (static_cast<float>(p.counted) * size);
      index_t const at = g * p.experts + e;
      p.group_score[at] = sum;
      p.group_first[at] = first;
      p.group_term[at] = mean * fraction;
      p.aux_gradient[at] = static_cast<float>(p.experts) * fraction /
                           (static_cast<float>(p.partition.groups) * size);
    }
  }
};

/// Per expert, over the loss groups: me_e = Σ p / T and ce_e = 1st choices / T of the call,
/// and the expert's loss term Σ_g me_{g,e} · f_{g,e}. Block (32 experts, 8 group rows); grid
/// ⌈E/32⌉. (route rejects T = 0, where me and ce would be 0/0.)
struct loss_expert_totals : moe::detail::expert_columns<loss_expert_totals> {
  struct params {
    float const* group_score;         // (G', experts)
    std::int64_t const* group_first;  // (G', experts)
    float const* group_term;          // (G', experts)
    index_t tokens;
    index_t experts;
    index_t groups;       // G'
    float* mean_score;    // (experts) r.mean_score
    float* first_choice;  // (experts) r.first_choice
    float* expert_term;   // (experts)
  };
  struct shared_storage {
    expert_sums sums[rows][columns];
  };
  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(ceil_div(p.experts, columns)));
  }

  __device__ void operator()(params const& p, char* smem) const {
    auto& shared = *reinterpret_cast<shared_storage*>(smem);
    index_t const e = expert(blockIdx.x);
    expert_sums sums;
    if (e < p.experts)
      for (index_t g = threadIdx.y; g < p.groups; g += rows) {
        sums.score += p.group_score[g * p.experts + e];
        sums.term += p.group_term[g * p.experts + e];
        sums.first += p.group_first[g * p.experts + e];
      }
    if (sum_over_rows(shared.sums, sums) && e < p.experts) {
      float const tokens = static_cast<float>(p.tokens);
      p.mean_score[e] = sums.score / tokens;
      p.first_choice[e] = static_cast<float>(sums.first) / tokens;
      p.expert_term[e] = sums.term;
    }
  }
};

/// One block: aux_loss = E / G' · Σ_e (expert's term) and z_loss = Σ_t lse_t² / T (0 when
/// T = 0), into the call's scalars.
struct loss_totals : moe::detail::single_block<loss_totals> {
  struct params {
    float const* expert_term;        // (experts)
    float const* logsumexp_squared;  // (tokens)
    index_t tokens;
    index_t experts;
    index_t groups;                   // G'
    device_routing_scalars* scalars;  // aux_loss, z_loss
  };
  struct shared_storage {
    float reduce[moe::detail::warp_size];
  };

  __device__ void operator()(params const& p, char* smem) const {
    auto& shared = *reinterpret_cast<shared_storage*>(smem);
    float aux = 0;
    for (index_t e = threadIdx.x; e < p.experts; e += threads) aux += p.expert_term[e];
    aux = moe::detail::block_all_reduce(aux, moe::detail::plus{}, 0.0f, shared.reduce);
    float z = 0;
    for (index_t t = threadIdx.x; t < p.tokens; t += threads) z += p.logsumexp_squared[t];
    z = moe::detail::block_all_reduce(z, moe::detail::plus{}, 0.0f, shared.reduce);
    if (threadIdx.x == 0) {
      p.scalars->aux_loss = static_cast<float>(p.experts) * aux / static_cast<float>(p.groups);
      p.scalars->z_loss = p.tokens > 0 ? z / static_cast<float>(p.tokens) : 0.0f;
    }
  }
};

/// What the loss kernels read, in device memory.
struct loss_inputs {
  float const* scores;             // (tokens, experts)
  std::int32_t const* expert;      // (tokens, k) as selected
  float const* score_sum;          // (tokens) Σ_e s_{t,e}, or null when the scores sum to one
  float const* logsumexp_squared;  // (tokens)
  index_t tokens;
  index_t experts;
  int k;
  index_t groups;  // G local groups; T is a multiple of G
};

/// The scratch of `launch_losses`, laid out by `carve_loss_scratch`.
struct loss_scratch {
  float* partial_score;         // (chunks, experts)
  std::int32_t* partial_first;  // (chunks, experts)
  std::int32_t* partial_other;  // (chunks, experts); null when the loss counts 1st choices only
  float* group_score;           // (G', experts)
  std::int64_t* group_first;    // (G', experts)
  float* group_term;            // (G', experts)
  float* expert_term;           // (experts)
};

/// Lays out the scratch of `launch_losses<Aux>` for `tokens` tokens in `groups` local groups;
/// a counting carver gives its size.
template <aux_loss_policy Aux>
loss_scratch carve_loss_scratch(workspace_carver& carver, index_t tokens, index_t experts, int k,
                                index_t groups) {
  loss_partition const partition(tokens, loss_groups<Aux>(groups));
  index_t const chunks = partition.chunks();
  loss_scratch s{};
  s.partial_score = carver.take<float>(chunks * experts);
  s.partial_first = carver.take<std::int32_t>(chunks * experts);
  if (counted_choices<Aux>(k) > 1) s.partial_other = carver.take<std::int32_t>(chunks * experts);
  s.group_score = carver.take<float>(partition.groups * experts);
  s.group_first = carver.take<std::int64_t>(partition.groups * experts);
  s.group_term = carver.take<float>(partition.groups * experts);
  s.expert_term = carver.take<float>(experts);
  return s;
}

/// The losses of one routing call under aux loss `Aux`, stream-ordered on `stream`: writes
/// r.mean_score, r.first_choice, rows [0, G') of r.aux_gradient, r.scalars->aux_loss and
/// r.scalars->z_loss. Preconditions (checked by route): T ≥ 1, G ≥ 1 divides T,
/// E ≤ 65535 · 32, `s` carved by carve_loss_scratch<Aux> with the same sizes.
template <aux_loss_policy Aux>
void launch_losses(cudaStream_t stream, loss_inputs const& in, loss_scratch const& s,
                   device_routing& r) {
  loss_partition const partition(in.tokens, loss_groups<Aux>(in.groups));
  int const counted = counted_choices<Aux>(in.k);
  launch<loss_partials>({in.scores, in.score_sum, in.expert, in.tokens, in.experts, in.k, counted,
                         partition, s.partial_score, s.partial_first, s.partial_other},
                        stream);
  launch<loss_group_totals>(
      {s.partial_score, s.partial_first, s.partial_other, in.experts, counted, partition,
       s.group_score, s.group_first, s.group_term, r.aux_gradient.data_handle()},
      stream);
  launch<loss_expert_totals>(
      {s.group_score, s.group_first, s.group_term, in.tokens, in.experts, partition.groups,
       r.mean_score.data_handle(), r.first_choice.data_handle(), s.expert_term},
      stream);
  launch<loss_totals>(
      {s.expert_term, in.logsumexp_squared, in.tokens, in.experts, partition.groups, r.scalars},
      stream);
}

}  // namespace moe::gating::detail
