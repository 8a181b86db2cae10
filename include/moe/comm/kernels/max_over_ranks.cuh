// SPDX-License-Identifier: Apache-2.0
#pragma once
// The largest of one int64 per rank, on the device and stream-ordered: the reduction that
// dynamic capacity (gating/capacity.hpp, capacity_factor ≤ 0) needs with several ranks, where
// every rank must size its experts' buffers for the largest per-(group, expert) load of all
// ranks (Tutel all-reduces it with MAX). The CUDA router calls it as its `reduce_max_load`
// once the local largest load lies in device memory and before it computes the capacity.
//
// Built only from a communicator's calls: one group in which every rank sends its value to
// every other rank, then one warp writes the maximum back over the rank's own value. It
// enqueues work on the caller's stream and never waits for the device, so the capacity stays
// on the device as on one rank.

#include <moe/comm/concepts.hpp>
#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/kernels/warp.cuh>
#include <moe/core/launch.cuh>
#include <moe/core/view.hpp>
#include <moe/core/workspace.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace moe::comm {

namespace detail {

/// *value = max(*value, received[r] for every rank r but `self`). One warp: a rank's own
/// entry of `received` is never written, so it is skipped rather than read.
struct max_of_received {
  static constexpr int threads = moe::detail::warp_size;
  struct params {
    std::int64_t const* received;  // (ranks) device memory, entry r from rank r
    int ranks;
    int self;
    std::int64_t* value;  // device memory; in: this rank's value, out: the maximum
  };
  static dim3 grid(params const&) { return dim3(1); }
  static dim3 block(params const&) { return dim3(threads); }
  static std::size_t smem_bytes(params const&) { return 0; }

  __device__ void operator()(params const& p, char*) const {
    int const lane = static_cast<int>(threadIdx.x);
    std::int64_t largest = *p.value;
    for (int r = lane; r < p.ranks; r += threads)
      if (r != p.self && p.received[r] > largest) largest = p.received[r];
    // The maximum is exact in any order: a butterfly gives every lane the same value.
    largest = moe::detail::warp_all_reduce(largest, moe::detail::maximum{});
    if (lane == 0) *p.value = largest;
  }
};

}  // namespace detail

/// The maximum of a device int64 over the ranks of a communicator, as a callable for the CUDA
/// router's `reduce_max_load`: `reduce(cuda, max_load)` replaces the value at `max_load` with
/// the largest value any rank passed to its own call. Every rank of the communicator must
/// call it, in the same order as its other communication (NCCL's rules).
///
///   comm::max_over_ranks reduce(comm, scratch);  // scratch: workspace_bytes(comm.size())
///   gating::route(cuda, gate, args, x, w_gate, r, ws, reduce);
///
/// It borrows the communicator and the scratch (copies share them). The scratch receives the
/// other ranks' values: calls on one stream may share it, calls on other streams need their
/// own.
/// @tparam Communicator a model of comm::communicator
template <communicator Communicator>
class max_over_ranks {
 public:
  /// Device scratch bytes for a world of `ranks` ranks: one value from each.
  [[nodiscard]] static constexpr std::size_t workspace_bytes(int ranks) noexcept {
    return ranks > 0 ? static_cast<std::size_t>(ranks) * sizeof(std::int64_t) : 0;
  }

  /// @param comm    borrowed; outlives every call
  /// @param scratch device memory, at least workspace_bytes(comm.size()) bytes, aligned to 8
  /// @throws invalid_argument when the scratch is too small or misaligned
  max_over_ranks(Communicator& comm, workspace scratch) : comm_(&comm) {
    std::size_t const needed = workspace_bytes(comm.size());
    MOE_EXPECTS(scratch.size() >= needed && (needed == 0 || scratch.data() != nullptr), "scratch",
                "holds " + std::to_string(scratch.size()) + " bytes; " +
                    std::to_string(comm.size()) + " ranks need " + std::to_string(needed));
    MOE_EXPECTS(reinterpret_cast<std::uintptr_t>(scratch.data()) % alignof(std::int64_t) == 0,
                "scratch", "is not aligned to 8 bytes");
    received_ = reinterpret_cast<std::int64_t*>(scratch.data());
  }

  /// Enqueues the exchange and the maximum on `cuda.stream`; returns without waiting.
  /// @param[inout] max_load device memory: this rank's value in, the maximum over the ranks out
  /// @throws invalid_argument when max_load is null (nothing enqueued); the communicator's
  ///         and the runtime's errors as they throw them
  void operator()(cuda_backend cuda, std::int64_t* max_load) const {
    MOE_EXPECTS(max_load != nullptr, "max_load", "is null");
    int const ranks = comm_->size(), self = comm_->rank();
    if (ranks == 1) return;
    // Sends read `max_load` before the kernel below overwrites it: both on this stream.
    comm_->group_start();
    for (int i = 1; i < ranks; ++i) {
      int const to = (self + i) % ranks, from = (self - i + ranks) % ranks;
      comm_->send(max_load, sizeof(std::int64_t), to, cuda.stream);
      comm_->recv(received_ + from, sizeof(std::int64_t), from, cuda.stream);
    }
    comm_->group_end();
    launch<detail::max_of_received>({received_, ranks, self, max_load}, cuda.stream);
  }

 private:
  Communicator* comm_;
  std::int64_t* received_ = nullptr;  // (ranks) device memory
};

}  // namespace moe::comm
