// SPDX-License-Identifier: Apache-2.0
#pragma once
// The CUDA twin of `update_expert_bias` (gating/losses.hpp), the step of aux-loss-free
// balancing (DeepSeek-V3) between training steps: b_e += rate · sign(mean − load_e), with
// mean = Σ_e load_e / E, reading the loads where the CUDA router left them (device_routing::
// load, or their sum over the ranks) so that the bias never visits the host.
//
// One block. The loads are summed in integers, exactly and in any order, and the mean and
// the step are the host's expressions (expert_bias_step), so the result equals the host's
// bit for bit.

#include <moe/core/backend.hpp>
#include <moe/core/checked.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/kernels/warp.cuh>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/gating/capacity.hpp>
#include <moe/gating/losses.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

namespace moe::gating {

namespace detail {

/// Σ load over the block, then every expert's step. Each thread updates the experts it
/// summed; the block is as wide as E needs, up to 1024 threads.
struct expert_bias_update {
  static constexpr int max_threads = 1024;
  struct params {
    std::int64_t const* load;  // (experts) device memory
    float* bias;               // (experts) device memory, updated in place
    index_t experts;
    float rate;
  };
  struct shared_storage {
    std::int64_t reduce[moe::detail::warp_size];
  };
  static dim3 grid(params const&) { return dim3(1); }
  static dim3 block(params const& p) {
    index_t const threads = round_up(p.experts, moe::detail::warp_size);
    return dim3(static_cast<unsigned>(threads < max_threads ? threads : max_threads));
  }
  static std::size_t smem_bytes(params const&) { return sizeof(shared_storage); }

  __device__ void operator()(params const& p, char* smem) const {
    auto& shared = *reinterpret_cast<shared_storage*>(smem);
    index_t const stride = blockDim.x;
    std::int64_t sum = 0;
    for (index_t e = threadIdx.x; e < p.experts; e += stride) sum += p.load[e];
    std::int64_t const total =
        moe::detail::block_all_reduce(sum, moe::detail::plus{}, std::int64_t{0}, shared.reduce);
    double const mean = static_cast<double>(total) / static_cast<double>(p.experts);
    for (index_t e = threadIdx.x; e < p.experts; e += stride)
      p.bias[e] += expert_bias_step(p.load[e], mean, p.rate);
  }
};

}  // namespace detail

/// b_e += rate · sign(mean − load_e) for every expert, mean = Σ_e load_e / E, on the CUDA
/// backend: the device twin of host `update_expert_bias` (losses.hpp), with the same result.
/// Stream-ordered on `cuda.stream`; nothing synchronises. No expert: nothing to do.
/// @param cuda        the stream (no cuBLAS handle needed)
/// @param[inout] bias (experts) device memory, e.g. what gate_args::expert_bias views
/// @param[in]    load (experts) device memory, assignments per expert before drops, e.g.
///                    device_routing::load
/// @param rate        the step; the sign of (mean − load) says its direction
/// @throws invalid_argument before any device work when the extents disagree or a pointer is
///         null
inline void update_expert_bias(cuda_backend cuda, span<float> bias,
                               vector_view<std::int64_t const> load, float rate) {
  auto const experts = static_cast<index_t>(bias.size());
  MOE_EXPECTS(bias.data() != nullptr || experts == 0, "bias", "is null");
  check_extents(load, "load", {experts}).throw_if_failed();
  if (experts == 0) return;
  launch<detail::expert_bias_update>({load.data_handle(), bias.data(), experts, rate}, cuda.stream);
}

}  // namespace moe::gating
