// SPDX-License-Identifier: Apache-2.0
#pragma once
// The elementwise steps between the two GEMMs of the ffn and glu experts, one kernel each
// way, in float on rows of the batch (segments.cuh says which rows are whose):
//
//   forward   pre += b1 (saved, float); activated = act(pre)              ffn
//             [g | u] += b13 (saved);   activated = act(g) ⊙ u            glu
//   backward  d_pre = dh ⊙ act'(pre)                                       ffn
//             dg = dh ⊙ u ⊙ act'(g), du = dh ⊙ act(g)                      glu
//
// where dh = d_out · W2ᵀ (the GEMM before, written into columns [0, F) of d_pre). Rows of
// no expert get zero activation and zero d_pre, so that the GEMMs after (which, for a
// uniform batch, run over them) add nothing from them.

#include <moe/core/config.hpp>
#include <moe/core/dtype.hpp>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/expert/activation.hpp>
#include <moe/expert/kernels/segments.cuh>

#include <cuda_runtime.h>

#include <cstddef>

namespace moe::expert::kernels {

/// Forward: adds the first bias to the first GEMM's float result in place (the state that
/// backward reads) and writes the activation, rounded to T, for the second GEMM.
/// @tparam Gated false: ffn (F1 = F); true: glu (F1 = 2·F, [gate | up])
template <act::activation Act, bool Gated, class T>
struct activation_forward : span_kernel {
  struct params {
    span_launch spans;
    index_t ffn;    // F
    float* pre;     // (rows, F1) device memory: x · W1 on entry, + b1 on exit
    T const* bias;  // (experts, F1) device memory, or null
    T* activated;   // (rows, F) device memory
  };

  __device__ void operator()(params const& p, char*) const {
    index_t const e = p.spans.block_expert();
    expert_rows const r = rows_of(p.spans.segments, e);
    index_t const width = Gated ? 2 * p.ffn : p.ffn;
    T const* bias = p.bias != nullptr ? p.bias + e * width : nullptr;
    for (index_t row = r.span_begin + blockIdx.x; row < r.span_end; row += gridDim.x) {
      T* activated = p.activated + row * p.ffn;
      if (!r.claims(row)) {
        for (index_t f = threadIdx.x; f < p.ffn; f += threads)
          activated[f] = from_accumulate<T>(0.0f);
        continue;
      }
      float* pre = p.pre + row * width;
      for (index_t f = threadIdx.x; f < p.ffn; f += threads) {
        float gate = pre[f];
        if (bias != nullptr) {
          gate += to_accumulate(bias[f]);
          pre[f] = gate;
        }
        float value = Act::forward(gate);
        if constexpr (Gated) {
          float up = pre[p.ffn + f];
          if (bias != nullptr) {
            up += to_accumulate(bias[p.ffn + f]);
            pre[p.ffn + f] = up;
          }
          value *= up;
        }
        activated[f] = from_accumulate<T>(value);
      }
    }
  }
};

/// Backward: from dh in columns [0, F) of `d_pre` and forward's saved pre-activation, the
/// gradient of the pre-activation in float (in place: each thread reads its dh before it
/// writes) and, unless T is float, rounded to T for the GEMMs.
template <act::activation Act, bool Gated, class T>
struct activation_backward : span_kernel {
  struct params {
    span_launch spans;
    index_t ffn;       // F
    float const* pre;  // (rows, F1) device memory, forward's
    float* d_pre;      // (rows, F1) device memory: dh in [0, F) on entry, d_pre on exit
    T* d_pre_t;        // (rows, F1) device memory, or null when T is float
  };

  __device__ void operator()(params const& p, char*) const {
    expert_rows const r = rows_of(p.spans.segments, p.spans.block_expert());
    index_t const width = Gated ? 2 * p.ffn : p.ffn;
    for (index_t row = r.span_begin + blockIdx.x; row < r.span_end; row += gridDim.x) {
      bool const claimed = r.claims(row);
      float const* pre = p.pre + row * width;
      float* d_pre = p.d_pre + row * width;
      T* d_pre_t = p.d_pre_t != nullptr ? p.d_pre_t + row * width : nullptr;
      auto const store = [&](index_t j, float v) {
        d_pre[j] = v;
        if (d_pre_t != nullptr) d_pre_t[j] = from_accumulate<T>(v);
      };
      for (index_t f = threadIdx.x; f < p.ffn; f += threads) {
        if (!claimed) {
          store(f, 0.0f);
          if constexpr (Gated) store(p.ffn + f, 0.0f);
          continue;
        }
        float const dh = d_pre[f];
        float const gate = pre[f];
        if constexpr (Gated) {
          float const up = pre[p.ffn + f];
          store(f, dh * up * Act::derivative(gate));
          store(p.ffn + f, dh * Act::forward(gate));
        } else {
          store(f, dh * Act::derivative(gate));
        }
      }
    }
  }
};

}  // namespace moe::expert::kernels
