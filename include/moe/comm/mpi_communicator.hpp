// SPDX-License-Identifier: Apache-2.0
#pragma once
// A communicator over MPI point-to-point, so that the same layer runs across real processes
// on any machine (DESIGN §5). Link moe::mpi (find_package(moe COMPONENTS mpi)).
//
//   MPI_Init(&argc, &argv);
//   {
//     moe::comm::mpi_communicator comm(MPI_COMM_WORLD);           // host memory
//     layer_t layer(args, comm);                                 // borrows it
//     layer.forward(moe::host, x, params, y, ws);
//   }
//   MPI_Finalize();
//
// NCCL's rules on MPI. The operations between group_start and group_end are posted together
// at group_end as MPI_Isend / MPI_Irecv, and group_end waits for all of them, so none blocks
// another; messages between two ranks match in issue order (one tag, on a duplicate of the
// caller's communicator that nothing else uses, and MPI's non-overtaking rule); a lone send
// or receive is a group of one. Unlike NCCL's, group_end returns when the transfers are done.
//
// Where NCCL would hang (a receive no rank sends, ranks issuing different exchanges),
// group_end gives up after `mpi_options::timeout` with `moe::timeout_error` naming what was
// pending; a message whose size differs from the receive's is a `moe::mpi_error`. Either
// leaves the communicator unusable (MPI cannot take back half an exchange): later calls throw.
//
// Memory: `mpi_communicator` moves host memory (the host backend's). `device_mpi_communicator`
// moves device memory where the MPI is CUDA-aware, as the MPI library says at run time (its
// constructor throws otherwise: use nccl_communicator); MPI is not stream-ordered, so it
// synchronises the operations' streams before it posts a group.
//
// Topology: ranks per node from MPI_Comm_split_type(MPI_COMM_TYPE_SHARED), when every node
// holds as many ranks numbered node after node (NCCL's numbering); otherwise one rank per
// node, where 2DH is the linear exchange. `mpi_options::ranks_per_node` overrides it, e.g.
// for tests that pretend to be several nodes.

#include <moe/comm/concepts.hpp>
#include <moe/comm/detail/mpi.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstddef>
#include <string>
#include <thread>
#include <vector>

namespace moe::comm {

/// How an MPI communicator is built.
struct mpi_options {
  /// Ranks per node; 0 asks MPI (MPI_COMM_TYPE_SHARED). Must divide the world size.
  int ranks_per_node = 0;
  /// How long group_end waits for its transfers before it throws `moe::timeout_error`.
  std::chrono::milliseconds timeout = std::chrono::minutes(5);
};

/// This process's node as MPI sees it: the ranks of a communicator that share its memory.
struct mpi_node {
  int local_rank = 0;        ///< this rank's index among them: e.g. its GPU, modulo the GPUs
  int ranks = 1;             ///< how many they are
  std::vector<int> members;  ///< their ranks in the communicator, ascending
};

/// The ranks of `comm` on this process's node (MPI_Comm_split_type, MPI_COMM_TYPE_SHARED).
/// Collective over `comm`.
inline mpi_node mpi_node_of(MPI_Comm comm) {
  int rank = 0;
  detail::check_mpi(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
  MPI_Comm shared = MPI_COMM_NULL;
  detail::check_mpi(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &shared),
                    "MPI_Comm_split_type");
  mpi_node node;
  MPI_Comm_rank(shared, &node.local_rank);
  MPI_Comm_size(shared, &node.ranks);
  node.members.resize(static_cast<std::size_t>(node.ranks));
  int const gathered = MPI_Allgather(&rank, 1, MPI_INT, node.members.data(), 1, MPI_INT, shared);
  MPI_Comm_free(&shared);
  detail::check_mpi(gathered, "MPI_Allgather");
  return node;
}

/// The memory an MPI communicator moves: host memory, as MPI always can.
struct mpi_host_memory {
  static void check_support() noexcept {}
  static void before_posting(std::vector<cudaStream_t> const&) noexcept {}
};

/// Device memory, which only a CUDA-aware MPI can move. MPI does not order its transfers
/// after the work on a stream, so the streams are synchronised first.
struct mpi_device_memory {
  static void check_support() {
    if (!detail::mpi_moves_device_memory())
      throw error(
          "device_mpi_communicator: this MPI is not CUDA-aware (it says so at run time), so it "
          "cannot move device memory; use comm::nccl_communicator for device memory (built "
          "through MPI with make_nccl_comm), or an MPI built with CUDA support");
  }
  static void before_posting(std::vector<cudaStream_t> const& streams) {
    for (cudaStream_t s : streams) MOE_CUDA_TRY(cudaStreamSynchronize(s));
  }
};

/// A communicator over MPI moving `Memory`; see the file comment. One thread uses it.
template <class Memory>
class basic_mpi_communicator {
 public:
  /// Collective over `comm`: every rank builds its communicator with the same options.
  /// @param comm an intracommunicator of the processes that form the world; it is duplicated
  ///             (MPI_Comm_dup), so the caller keeps and frees its own
  /// @throws invalid_argument when MPI is not initialised or ranks_per_node does not divide
  ///         the world; mpi_error when an MPI call fails; error when `Memory` cannot be moved
  explicit basic_mpi_communicator(MPI_Comm comm, mpi_options options = {}) : options_(options) {
    int initialised = 0;
    detail::check_mpi(MPI_Initialized(&initialised), "MPI_Initialized");
    MOE_EXPECTS(initialised, "comm", "MPI is not initialised: call MPI_Init first");
    detail::check_mpi(MPI_Comm_rank(comm, &rank_), "MPI_Comm_rank");
    detail::check_mpi(MPI_Comm_size(comm, &size_), "MPI_Comm_size");
    MOE_EXPECTS(options.timeout.count() > 0, "options.timeout",
                "must be positive, got " + std::to_string(options.timeout.count()) + " ms");
    MOE_EXPECTS(options.ranks_per_node >= 0 &&
                    (options.ranks_per_node == 0 || size_ % options.ranks_per_node == 0),
                "options.ranks_per_node",
                std::to_string(options.ranks_per_node) + " does not divide the " +
                    std::to_string(size_) + " ranks; pass a divisor, or 0 to ask MPI");
    Memory::check_support();
    detail::check_mpi(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    try {
      // Failures come back as codes, thrown with MPI's description, instead of aborting.
      detail::check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN),
                        "MPI_Comm_set_errhandler");
      topology_ = options.ranks_per_node > 0
                      ? comm::topology{options.ranks_per_node, size_ / options.ranks_per_node}
                      : node_topology();
    } catch (...) {
      MPI_Comm_free(&comm_);
      throw;
    }
  }

  basic_mpi_communicator(basic_mpi_communicator const&) = delete;
  basic_mpi_communicator& operator=(basic_mpi_communicator const&) = delete;

  ~basic_mpi_communicator() {
    int finalised = 0;
    if (MPI_Finalized(&finalised) == MPI_SUCCESS && !finalised) MPI_Comm_free(&comm_);
  }

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept { return size_; }
  [[nodiscard]] comm::topology topology() const noexcept { return topology_; }
  /// The duplicate of the caller's communicator this one sends on.
  [[nodiscard]] MPI_Comm native_handle() const noexcept { return comm_; }

  void group_start() { ++depth_; }

  /// Posts the group's operations and returns when all of them are done.
  void group_end() {
    MOE_EXPECTS(depth_ > 0, "group_end", "called without a matching group_start");
    if (--depth_ == 0) flush();
  }

  /// Sends `bytes` bytes at `src` to rank `peer` (`stream`: the device variant's ordering).
  void send(void const* src, std::size_t bytes, int peer, cudaStream_t stream) {
    issue(true, const_cast<void*>(src), bytes, peer, stream);
  }
  /// Receives `bytes` bytes from rank `peer` into `dst`; the sender sends as many.
  void recv(void* dst, std::size_t bytes, int peer, cudaStream_t stream) {
    issue(false, dst, bytes, peer, stream);
  }

 private:
  struct operation {
    bool is_send;
    std::byte* data;
    std::size_t bytes;
    int peer;
  };
  /// MPI counts are ints: a larger message travels as pieces of at most this many bytes,
  /// which both ends cut alike when their byte counts agree.
  static constexpr std::size_t piece_bytes = std::size_t{1} << 30;
  static constexpr int tag = 0;

  void issue(bool is_send, void* data, std::size_t bytes, int peer, cudaStream_t stream) {
    MOE_EXPECTS(peer >= 0 && peer < size_, "peer",
                "must be in [0, " + std::to_string(size_) + "), got " + std::to_string(peer));
    MOE_EXPECTS(data != nullptr || bytes == 0, is_send ? "src" : "dst", "is null");
    group_.push_back({is_send, static_cast<std::byte*>(data), bytes, peer});
    if (std::find(streams_.begin(), streams_.end(), stream) == streams_.end())
      streams_.push_back(stream);
    if (depth_ == 0) flush();
  }

  /// A posted piece of an operation: its request, and for a receive the bytes it expects.
  struct posted {
    MPI_Request request = MPI_REQUEST_NULL;
    std::size_t operation = 0;
    int bytes = 0;
  };

  void flush() {
    std::vector<operation> group = std::move(group_);
    std::vector<cudaStream_t> streams = std::move(streams_);
    group_.clear();
    streams_.clear();
    if (group.empty()) return;
    if (failed_)
      throw error("mpi_communicator: an earlier exchange failed on rank " + std::to_string(rank_) +
                  "; this communicator cannot be used again");
    failed_ = true;  // until the group completes
    Memory::before_posting(streams);
    std::vector<posted> pieces;
    try {
      for (std::size_t i = 0; i < group.size(); ++i) post(group, i, pieces);
    } catch (...) {
      abandon(pieces);
      throw;
    }
    wait(group, pieces);
    failed_ = false;
  }

  void post(std::vector<operation> const& group, std::size_t i, std::vector<posted>& pieces) {
    operation const& op = group[i];
    std::size_t offset = 0;
    do {  // a message of 0 bytes is still one message, as the receiver expects one
      int const n = static_cast<int>(std::min(op.bytes - offset, piece_bytes));
      posted p{.operation = i, .bytes = n};
      if (op.is_send)
        detail::check_mpi(MPI_Isend(op.data + offset, n, MPI_BYTE, op.peer, tag, comm_, &p.request),
                          "MPI_Isend");
      else
        detail::check_mpi(MPI_Irecv(op.data + offset, n, MPI_BYTE, op.peer, tag, comm_, &p.request),
                          "MPI_Irecv");
      pieces.push_back(p);
      offset += static_cast<std::size_t>(n);
    } while (offset < op.bytes);
  }

  /// Waits for every piece; throws on a failed or mis-sized one, or at the timeout.
  void wait(std::vector<operation> const& group, std::vector<posted>& pieces) {
    auto const deadline = std::chrono::steady_clock::now() + options_.timeout;
    std::vector<MPI_Request> requests(pieces.size());
    std::vector<int> done(pieces.size());
    std::vector<MPI_Status> statuses(pieces.size());
    for (int polls = 0;; ++polls) {
      for (std::size_t i = 0; i < pieces.size(); ++i) requests[i] = pieces[i].request;
      int count = 0;
      int const code = MPI_Testsome(static_cast<int>(requests.size()), requests.data(), &count,
                                    done.data(), statuses.data());
      if (code != MPI_SUCCESS && code != MPI_ERR_IN_STATUS) {
        abandon(pieces);
        detail::check_mpi(code, "MPI_Testsome");
      }
      if (count == MPI_UNDEFINED) return;  // every request is done
      for (int j = 0; j < count; ++j) {
        auto const i = static_cast<std::size_t>(done[static_cast<std::size_t>(j)]);
        pieces[i].request = MPI_REQUEST_NULL;
        check_piece(group, pieces[i], statuses[static_cast<std::size_t>(j)], code, pieces);
      }
      if (std::chrono::steady_clock::now() > deadline) {
        std::string const pending = describe_pending(group, pieces);
        abandon(pieces);
        throw timeout_error(
            "mpi_communicator: rank " + std::to_string(rank_) + " waited " +
            std::to_string(options_.timeout.count()) + " ms for " + pending +
            "; every rank must issue matching sends and receives, with equal byte counts, in "
            "the same order");
      }
      // Spin briefly for latency, then yield the core (ranks may outnumber the cores).
      if (polls > 100) std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  void check_piece(std::vector<operation> const& group, posted const& p, MPI_Status const& status,
                   int code, std::vector<posted>& pieces) {
    operation const& op = group[p.operation];
    if (code == MPI_ERR_IN_STATUS && status.MPI_ERROR != MPI_SUCCESS) {
      abandon(pieces);
      throw mpi_error(status.MPI_ERROR,
                      "mpi_communicator: rank " + std::to_string(rank_) + "'s " + describe(op) +
                          " failed: " + detail::mpi_error_string(status.MPI_ERROR) +
                          (op.is_send ? "" : "; the sender sent more bytes than were received"));
    }
    if (op.is_send) return;
    int received = 0;
    detail::check_mpi(MPI_Get_count(&status, MPI_BYTE, &received), "MPI_Get_count");
    if (received == p.bytes) return;
    abandon(pieces);
    throw mpi_error(MPI_ERR_TRUNCATE, "mpi_communicator: rank " + std::to_string(rank_) + "'s " +
                                          describe(op) + " got a message of " +
                                          std::to_string(received) + " bytes where " +
                                          std::to_string(p.bytes) + " were expected");
  }

  /// Gives up on the pieces not yet done; the communicator is unusable afterwards.
  static void abandon(std::vector<posted>& pieces) noexcept {
    for (posted& p : pieces)
      if (p.request != MPI_REQUEST_NULL) {
        MPI_Cancel(&p.request);
        MPI_Request_free(&p.request);
      }
  }

  static std::string describe(operation const& op) {
    return std::string(op.is_send ? "send of " : "receive of ") + std::to_string(op.bytes) +
           " bytes " + (op.is_send ? "to" : "from") + " rank " + std::to_string(op.peer);
  }

  static std::string describe_pending(std::vector<operation> const& group,
                                      std::vector<posted> const& pieces) {
    std::string text;
    std::size_t last = group.size();
    for (posted const& p : pieces) {
      if (p.request == MPI_REQUEST_NULL || p.operation == last) continue;
      last = p.operation;
      text += (text.empty() ? "" : ", ") + describe(group[p.operation]);
    }
    return text;
  }

  /// The nodes as MPI sees them (see the file comment).
  comm::topology node_topology() const {
    mpi_node const node = mpi_node_of(comm_);
    // NCCL's numbering: node n holds ranks [n·N, (n+1)·N), N the same on every node.
    bool numbered = node.members.front() % node.ranks == 0;
    for (int i = 0; i < node.ranks; ++i)
      numbered = numbered && node.members[static_cast<std::size_t>(i)] == node.members.front() + i;
    int mine[3] = {node.ranks, -node.ranks, numbered ? 1 : 0}, all[3] = {};
    detail::check_mpi(MPI_Allreduce(mine, all, 3, MPI_INT, MPI_MIN, comm_), "MPI_Allreduce");
    bool const uniform = all[0] == -all[1] && all[2] == 1;
    return uniform ? comm::topology{node.ranks, size_ / node.ranks} : comm::topology{1, size_};
  }

  mpi_options options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  comm::topology topology_;
  int depth_ = 0;
  bool failed_ = false;
  std::vector<operation> group_;
  std::vector<cudaStream_t> streams_;
};

/// An MPI communicator over host memory (the host backend's).
using mpi_communicator = basic_mpi_communicator<mpi_host_memory>;
/// An MPI communicator over device memory, where the MPI is CUDA-aware.
using device_mpi_communicator = basic_mpi_communicator<mpi_device_memory>;

static_assert(communicator<mpi_communicator>);
static_assert(communicator<device_mpi_communicator>);

}  // namespace moe::comm
