// SPDX-License-Identifier: Apache-2.0
#pragma once
// `nccl_communicator`: the `communicator` of a real world, a borrowed `ncclComm_t` with the
// caller's `comm::topology`. Sends and receives are NCCL's, byte-typed and stream-ordered;
// every NCCL result is checked and becomes `moe::nccl_error`. `wait`, the only member that
// blocks, polls the stream and the communicator's asynchronous error, so that a failed peer
// surfaces as an error after a timeout instead of a hang. Creating and destroying the
// `ncclComm_t` is the caller's business (nccl_bootstrap.hpp has functions for both).
//
// Host code only: compiles with the host compiler given the CUDA and NCCL include
// directories (link moe::nccl).

#include <moe/comm/concepts.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <cstddef>
#include <source_location>
#include <string>
#include <thread>

namespace moe::comm {

namespace detail {

/// The topology of `size` ranks, `ranks_per_node` on each node; throws `invalid_argument`
/// (naming "ranks_per_node") unless 0 < ranks_per_node and size % ranks_per_node == 0.
inline topology make_topology(int size, int ranks_per_node) {
  MOE_EXPECTS(size > 0, "size", "a world has at least one rank, got " + std::to_string(size));
  MOE_EXPECTS(ranks_per_node > 0, "ranks_per_node",
              "must be positive, got " + std::to_string(ranks_per_node));
  MOE_EXPECTS(size % ranks_per_node == 0, "ranks_per_node",
              "must divide the world size " + std::to_string(size) + ", got " +
                  std::to_string(ranks_per_node));
  return {.ranks_per_node = ranks_per_node, .nodes = size / ranks_per_node};
}

/// Checks the result of a call that enqueues work: ncclInProgress is not a failure, it is
/// how a non-blocking communicator answers (the work completes later; `wait` polls it).
inline void check_enqueue(ncclResult_t result, char const* call,
                          std::source_location where = std::source_location::current()) {
  if (result != ncclSuccess && result != ncclInProgress)
    throw nccl_error(static_cast<int>(result), call, ncclGetErrorString(result), where);
}

}  // namespace detail

/// A `communicator` over a borrowed `ncclComm_t` (DESIGN §5).
///
/// The communicator is borrowed: this class never initialises, finalises, destroys or
/// aborts it, and the owner keeps it alive while this object (or a copy) is in use. Copies
/// share the handle. Rank and size are read once, at construction.
///
/// Blocking and non-blocking NCCL communicators both work: an enqueuing call that answers
/// ncclInProgress is not an error, and `wait` keeps polling until the communicator is no
/// longer in progress and the stream is idle.
///
/// Several ranks driven from one host thread must be bracketed by one ncclGroupStart/End
/// pair spanning all of them (NCCL's rule for several devices per thread); an algorithm
/// that launches kernels between its communication phases therefore needs one thread per
/// rank.
class nccl_communicator {
 public:
  /// Borrows `comm`; all ranks on one node.
  /// @param comm [in] an initialised NCCL communicator (a non-blocking one whose
  ///             initialisation has completed), not null
  explicit nccl_communicator(ncclComm_t comm) : nccl_communicator(comm, world_size(comm)) {}

  /// Borrows `comm`; `ranks_per_node` consecutive ranks share a node (NCCL's numbering).
  /// @param comm [in] an initialised NCCL communicator, not null
  /// @param ranks_per_node positive and dividing the world size, else `invalid_argument`
  nccl_communicator(ncclComm_t comm, int ranks_per_node)
      : comm_(comm),
        rank_(user_rank(comm)),
        topology_(detail::make_topology(world_size(comm), ranks_per_node)) {}

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept { return topology_.size(); }
  [[nodiscard]] comm::topology topology() const noexcept { return topology_; }

  /// The borrowed handle, for calls this class does not wrap (e.g. ncclCommAbort by its
  /// owner after `wait` threw).
  [[nodiscard]] ncclComm_t native_handle() const noexcept { return comm_; }

  /// Opens an NCCL group: the sends and receives up to `group_end` do not block each other.
  /// Groups nest (NCCL's rule); only the outermost `group_end` issues the operations.
  void group_start() { MOE_NCCL_TRY(ncclGroupStart()); }

  /// Closes the group opened by `group_start`.
  void group_end() { detail::check_enqueue(ncclGroupEnd(), "ncclGroupEnd()"); }

  /// Enqueues on `stream` the sending of `bytes` bytes to rank `peer`.
  /// @param src [in] device memory (or memory registered for NCCL), `bytes` long
  /// @param peer 0 ≤ peer < size(); a rank may send to itself
  /// @param stream the caller's stream, on the communicator's device
  void send(void const* src, std::size_t bytes, int peer, cudaStream_t stream) {
    check_transfer(src, bytes, peer, "src");
    detail::check_enqueue(ncclSend(src, bytes, ncclUint8, peer, comm_, stream),
                          "ncclSend(src, bytes, ncclUint8, peer, comm, stream)");
  }

  /// Enqueues on `stream` the receiving of `bytes` bytes from rank `peer`.
  /// @param dst [out] device memory, `bytes` long
  /// @param peer 0 ≤ peer < size(); must send exactly `bytes` bytes to this rank
  /// @param stream the caller's stream, on the communicator's device
  void recv(void* dst, std::size_t bytes, int peer, cudaStream_t stream) {
    check_transfer(dst, bytes, peer, "dst");
    detail::check_enqueue(ncclRecv(dst, bytes, ncclUint8, peer, comm_, stream),
                          "ncclRecv(dst, bytes, ncclUint8, peer, comm, stream)");
  }

  /// Throws `nccl_error` when the communicator has recorded an asynchronous error (a
  /// failed peer, a network error). ncclInProgress, pending work, is not an error.
  void check_async_error() const { (void)poll_async_error(); }

  /// Blocks the calling host thread until the work enqueued on `stream` so far has finished
  /// and the communicator has no operation in progress; this is the documented, explicit
  /// host synchronisation of this class (no other member blocks).
  ///
  /// It polls cudaStreamQuery and ncclCommGetAsyncError, yielding and then sleeping a little
  /// between polls, rather than calling cudaStreamSynchronize, which would hang forever on a
  /// receive whose peer has died.
  ///
  /// Throws `nccl_error` when the communicator reports an asynchronous error, and
  /// `nccl_error` with code() == ncclInProgress when `timeout` passes first (the message
  /// says that peers may have failed). In both cases the communicator is not aborted here,
  /// because it is borrowed: its owner should call ncclCommAbort on it (nccl_comm::abort),
  /// which also releases the work stuck on the stream, and build a new one.
  /// Throws `cuda_error` when the stream itself reports an error.
  /// @param stream the caller's stream on which the communication was enqueued
  /// @param timeout how long to wait at most; 0 polls once
  void wait(cudaStream_t stream, std::chrono::milliseconds timeout) const {
    MOE_EXPECTS(timeout.count() >= 0, "timeout",
                "must not be negative, got " + std::to_string(timeout.count()) + " ms");
    using clock = std::chrono::steady_clock;
    auto const deadline = clock::now() + timeout;
    for (int poll = 0;; ++poll) {
      if (poll_async_error() == ncclSuccess) {
        cudaError_t const state = cudaStreamQuery(stream);
        if (state == cudaSuccess) return;
        if (state != cudaErrorNotReady) {
          (void)cudaGetLastError();
          throw cuda_error(state, "cudaStreamQuery(stream)");
        }
      }
      if (clock::now() >= deadline) {
        throw nccl_error(static_cast<int>(ncclInProgress), "nccl_communicator::wait",
                         ("timed out after " + std::to_string(timeout.count()) +
                          " ms with communication still in progress on rank " +
                          std::to_string(rank_) + " of " + std::to_string(size()) +
                          ": peers may have failed or never issued the matching operations; "
                          "the owner should ncclCommAbort the communicator")
                             .c_str());
      }
      // Short waits are answered by yielding; long ones must not spin a core.
      if (poll < 64)
        std::this_thread::yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(poll < 1024 ? 50 : 500));
    }
  }

 private:
  static int world_size(ncclComm_t comm) {
    MOE_EXPECTS(comm != nullptr, "comm", "a null ncclComm_t");
    int count = 0;
    MOE_NCCL_TRY(ncclCommCount(comm, &count));
    return count;
  }

  static int user_rank(ncclComm_t comm) {
    MOE_EXPECTS(comm != nullptr, "comm", "a null ncclComm_t");
    int rank = 0;
    MOE_NCCL_TRY(ncclCommUserRank(comm, &rank));
    return rank;
  }

  /// The communicator's asynchronous state: ncclSuccess or ncclInProgress; throws on errors.
  ncclResult_t poll_async_error() const {
    ncclResult_t state = ncclSuccess;
    MOE_NCCL_TRY(ncclCommGetAsyncError(comm_, &state));
    if (state != ncclSuccess && state != ncclInProgress) {
      throw nccl_error(
          static_cast<int>(state), "ncclCommGetAsyncError(comm, &state)",
          (std::string(ncclGetErrorString(state)) + " on rank " + std::to_string(rank_) +
           "; the communicator is unusable: its owner should ncclCommAbort it")
              .c_str());
    }
    return state;
  }

  void check_transfer(void const* data, std::size_t bytes, int peer, char const* argument) const {
    MOE_EXPECTS(peer >= 0 && peer < size(), "peer",
                "must lie in [0, " + std::to_string(size()) + "), got " + std::to_string(peer));
    MOE_EXPECTS(data != nullptr || bytes == 0, argument,
                "null pointer for " + std::to_string(bytes) + " bytes");
  }

  ncclComm_t comm_;
  int rank_;
  comm::topology topology_;
};
static_assert(communicator<nccl_communicator>);

}  // namespace moe::comm
