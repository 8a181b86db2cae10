// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA path of the load-balancing losses (gating/losses.hpp): me_e (mean score), ce_e
// (fraction of first choices), gshard_aux = E · Σ_e me_e · ce_e and z_loss = mean_t lse_t².
//
// Deterministic: float sums run in a fixed order over fixed partitions — per chunk of 256
// tokens, then over the chunks, then one block over experts and tokens — and first choices
// are counted in integers. No atomics.

#include <moe/core/config.hpp>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/device_routing.hpp>
#include <moe/gating/kernels/reduce.cuh>

#include <cstddef>
#include <cstdint>

namespace moe::gating::detail {

/// Tokens summed by one block of `expert_partials`: the first level of the fixed tree.
inline constexpr index_t loss_chunk_tokens = 256;

/// Number of chunks, i.e. rows of the partial sums, for `tokens` tokens.
MOE_HOST_DEVICE constexpr index_t loss_chunks(index_t tokens) noexcept {
  return ceil_div(tokens, loss_chunk_tokens);
}

/// Per chunk of tokens and per expert: Σ_t s_{t,e} and the count of tokens whose first
/// choice is e. Block (32 experts, 8 token rows); grid (chunks, ⌈E/32⌉).
struct expert_partials {
  static constexpr int columns = warp_size, rows = 8;
  struct params {
    float const* scores;         // (tokens, experts) device memory
    std::int32_t const* expert;  // (tokens, k)
    index_t tokens;
    index_t experts;
    int k;
    float* partial_score;         // (chunks, experts)
    std::int32_t* partial_count;  // (chunks, experts)
  };
  struct shared_storage {
    float score[rows][columns];
    std::int32_t count[rows][columns];
  };
  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(loss_chunks(p.tokens)),
                static_cast<unsigned>(ceil_div(p.experts, columns)));
  }
  static dim3 block(params const&) { return dim3(columns, rows); }
  static std::size_t smem_bytes(params const&) { return sizeof(shared_storage); }

  __device__ void operator()(params const& p, char* smem) const {
    auto& shared = *reinterpret_cast<shared_storage*>(smem);
    index_t const e = static_cast<index_t>(blockIdx.y) * columns + threadIdx.x;
    index_t const begin = static_cast<index_t>(blockIdx.x) * loss_chunk_tokens;
    index_t const end = begin + loss_chunk_tokens < p.tokens ? begin + loss_chunk_tokens : p.tokens;
    // A warp reads 32 neighbouring experts of one token: coalesced.
    float sum = 0;
    std::int32_t count = 0;
    if (e < p.experts)
      for (index_t t = begin + threadIdx.y; t < end; t += rows) {
        sum += p.scores[t * p.experts + e];
        count += p.expert[t * p.k] == e ? 1 : 0;
      }
    shared.score[threadIdx.y][threadIdx.x] = sum;
    shared.count[threadIdx.y][threadIdx.x] = count;
    __syncthreads();  // reached by every thread: only the loop above depends on e
    if (threadIdx.y == 0 && e < p.experts) {
      for (int y = 1; y < rows; ++y) {
        sum += shared.score[y][threadIdx.x];
        count += shared.count[y][threadIdx.x];
      }
      p.partial_score[static_cast<index_t>(blockIdx.x) * p.experts + e] = sum;
      p.partial_count[static_cast<index_t>(blockIdx.x) * p.experts + e] = count;
    }
  }
};

/// Per expert, over the chunks: me_e = Σ / T and ce_e = count / T. Block (32 experts,
/// 8 chunk rows); grid ⌈E/32⌉. (route rejects T = 0, where both would be 0/0.)
struct expert_totals {
  static constexpr int columns = warp_size, rows = 8;
  struct params {
    float const* partial_score;         // (chunks, experts)
    std::int32_t const* partial_count;  // (chunks, experts)
    index_t tokens;
    index_t experts;
    float* mean_score;    // (experts) r.mean_score
    float* first_choice;  // (experts) r.first_choice
  };
  struct shared_storage {
    float score[rows][columns];
    std::int64_t count[rows][columns];
  };
  static dim3 grid(params const& p) {
    return dim3(static_cast<unsigned>(ceil_div(p.experts, columns)));
  }
  static dim3 block(params const&) { return dim3(columns, rows); }
  static std::size_t smem_bytes(params const&) { return sizeof(shared_storage); }

  __device__ void operator()(params const& p, char* smem) const {
    auto& shared = *reinterpret_cast<shared_storage*>(smem);
    index_t const e = static_cast<index_t>(blockIdx.x) * columns + threadIdx.x;
    index_t const chunks = loss_chunks(p.tokens);
    float sum = 0;
    std::int64_t count = 0;
    if (e < p.experts)
      for (index_t c = threadIdx.y; c < chunks; c += rows) {
        sum += p.partial_score[c * p.experts + e];
        count += p.partial_count[c * p.experts + e];
      }
    shared.score[threadIdx.y][threadIdx.x] = sum;
    shared.count[threadIdx.y][threadIdx.x] = count;
    __syncthreads();  // reached by every thread
    if (threadIdx.y == 0 && e < p.experts) {
      for (int y = 1; y < rows; ++y) {
        sum += shared.score[y][threadIdx.x];
        count += shared.count[y][threadIdx.x];
      }
      float const tokens = static_cast<float>(p.tokens);
      p.mean_score[e] = sum / tokens;
      p.first_choice[e] = static_cast<float>(count) / tokens;
    }
  }
};

/// One block: gshard_aux = E · Σ_e me_e · ce_e and z_loss = Σ_t lse_t² / T (0 when T = 0), into the
/// call's scalars.
struct loss_totals {
  static constexpr int threads = 1024;
  struct params {
    float const* mean_score;         // (experts)
    float const* first_choice;       // (experts)
    float const* logsumexp_squared;  // (tokens)
    index_t tokens;
    index_t experts;
    device_routing_scalars* scalars;  // aux_loss, z_loss
  };
  struct shared_storage {
    float reduce[warp_size];
  };
  static dim3 grid(params const&) { return dim3(1); }
  static dim3 block(params const&) { return dim3(threads); }
  static std::size_t smem_bytes(params const&) { return sizeof(shared_storage); }

  __device__ void operator()(params const& p, char* smem) const {
    auto& shared = *reinterpret_cast<shared_storage*>(smem);
    float aux = 0;
    for (index_t e = threadIdx.x; e < p.experts; e += threads)
      aux += p.mean_score[e] * p.first_choice[e];
    aux = block_all_reduce(aux, plus{}, 0.0f, shared.reduce);
    float z = 0;
    for (index_t t = threadIdx.x; t < p.tokens; t += threads) z += p.logsumexp_squared[t];
    z = block_all_reduce(z, plus{}, 0.0f, shared.reduce);
    if (threadIdx.x == 0) {
      p.scalars->aux_loss = static_cast<float>(p.experts) * aux;
      p.scalars->z_loss = p.tokens > 0 ? z / static_cast<float>(p.tokens) : 0.0f;
    }
  }
};

}  // namespace moe::gating::detail
