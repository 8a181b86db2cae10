// SPDX-License-Identifier: Apache-2.0
#pragma once
// A world of P virtual ranks inside one process, so that multi-rank algorithms run and are
// tested without a network (DESIGN §5). Each rank is a thread that drives its own
// `simulated_world::rank_communicator`, a model of `comm::communicator` with NCCL's
// matching rules. Where NCCL would hang (a receive nobody sends, a group that never ends)
// or corrupt memory (mismatched byte counts), the world throws `moe::invalid_argument`
// naming the pending operations. Every message is recorded in a trace.
//
//   simulated_world world({.ranks_per_node = 4, .nodes = 2});
//   world.run([&](simulated_world::rank_communicator& comm) { ... });  // one thread per rank
//
// Two transports: `simulated_world` moves host memory with memcpy as soon as a message is
// matched; `device_simulated_world` moves device memory on one GPU, stream-ordered: each
// virtual rank passes its own stream, and a matched message becomes a device-to-device copy
// on the receiver's stream, ordered after the sender's earlier work and before the sender's
// later work by events.

#include <moe/comm/concepts.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>

#include <cuda_runtime_api.h>

#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace moe::comm {

/// One message the world delivered.
struct message_record {
  int src = 0;
  int dst = 0;
  std::size_t bytes = 0;
  bool inter_node = false;  ///< src and dst sit on different nodes
  int phase = 0;            ///< ordinal of the sender's group (a lone operation is a group)
  friend bool operator==(message_record const&, message_record const&) = default;
};

/// Moves a matched message's bytes in host memory, at once.
struct host_transport {
  void copy(void* dst, void const* src, std::size_t bytes, cudaStream_t /*sender*/,
            cudaStream_t /*receiver*/) const noexcept {
    if (bytes) std::memcpy(dst, src, bytes);
  }
};

/// Moves a matched message's bytes in device memory on the receiver's stream, after the
/// sender's stream has reached the send and before it goes past it.
struct device_transport {
  void copy(void* dst, void const* src, std::size_t bytes, cudaStream_t sender,
            cudaStream_t receiver) const {
    cudaEvent_t sent = nullptr, received = nullptr;
    MOE_CUDA_TRY(cudaEventCreateWithFlags(&sent, cudaEventDisableTiming));
    try {
      MOE_CUDA_TRY(cudaEventCreateWithFlags(&received, cudaEventDisableTiming));
      MOE_CUDA_TRY(cudaEventRecord(sent, sender));
      MOE_CUDA_TRY(cudaStreamWaitEvent(receiver, sent, 0));
      if (bytes) MOE_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, receiver));
      MOE_CUDA_TRY(cudaEventRecord(received, receiver));
      MOE_CUDA_TRY(cudaStreamWaitEvent(sender, received, 0));
    } catch (...) {
      MOE_CUDA_TRY_LOG(cudaEventDestroy(sent));
      if (received) MOE_CUDA_TRY_LOG(cudaEventDestroy(received));
      throw;
    }
    // Destroying a recorded event is safe: its resources are released once it completes.
    MOE_CUDA_TRY_LOG(cudaEventDestroy(sent));
    MOE_CUDA_TRY_LOG(cudaEventDestroy(received));
  }
};

/// P virtual ranks with `Transport` moving the bytes. See the file comment.
template <class Transport>
class basic_simulated_world {
 public:
  class rank_communicator;

  /// @param topo ranks per node and nodes; both at least 1
  explicit basic_simulated_world(comm::topology topo, Transport transport = {})
      : topology_(topo), transport_(std::move(transport)) {
    MOE_EXPECTS(topo.ranks_per_node >= 1, "topology.ranks_per_node",
                "must be at least 1, got " + std::to_string(topo.ranks_per_node));
    MOE_EXPECTS(topo.nodes >= 1, "topology.nodes",
                "must be at least 1, got " + std::to_string(topo.nodes));
  }

  basic_simulated_world(basic_simulated_world const&) = delete;
  basic_simulated_world& operator=(basic_simulated_world const&) = delete;

  [[nodiscard]] comm::topology topology() const noexcept { return topology_; }
  [[nodiscard]] int size() const noexcept { return topology_.size(); }

  /// Runs `body(rank_communicator&)` on every rank, one thread each, and joins them. The
  /// error of the lowest rank that failed on its own is rethrown here, on every schedule; a
  /// rank left waiting because of it, or posting after it, gets an error too, so `run`
  /// always returns. The trace of earlier runs is kept.
  template <class Body>
  void run(Body&& body) {
    reset();
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(size()));
    std::vector<std::thread> threads;
    threads.reserve(static_cast<std::size_t>(size()));
    for (int r = 0; r < size(); ++r)
      threads.emplace_back([this, r, &body, &errors] {
        rank_communicator comm(*this, r);
        try {
          body(comm);
          comm.finish();
        } catch (...) {
          errors[static_cast<std::size_t>(r)] = std::current_exception();
          fail(r);
        }
        leave();
      });
    for (auto& t : threads) t.join();
    // The root cause first: a rank's own error before the errors of ranks it left waiting.
    for (std::size_t r = 0; r < errors.size(); ++r)
      if (errors[r] && !ranks_[r].stalled) std::rethrow_exception(errors[r]);
    for (auto const& e : errors)
      if (e) std::rethrow_exception(e);
  }

  /// Every message delivered so far, in delivery order.
  [[nodiscard]] std::vector<message_record> trace() const {
    std::lock_guard lock(mutex_);
    return trace_;
  }
  void clear_trace() {
    std::lock_guard lock(mutex_);
    trace_.clear();
  }

 private:
  struct operation {
    bool is_send = false;
    int rank = 0;  // the rank that issued it
    int peer = 0;
    void* data = nullptr;
    std::size_t bytes = 0;
    cudaStream_t stream = nullptr;
    int phase = 0;
  };
  using pair_key = std::pair<int, int>;  // (src, dst)
  struct pending_pair {
    std::deque<operation*> sends, recvs;  // posted, not yet matched, in issue order
  };
  struct rank_state {
    std::condition_variable delivered;  // signalled when this rank's group completes
    int undelivered = 0;                // operations of its posted group not delivered yet
    bool waiting = false;
    bool stalled = false;  // it threw another rank's failure, waiting on it or posting after it
  };

  void reset() {
    std::lock_guard lock(mutex_);
    pending_.clear();
    ranks_ = std::make_unique<rank_state[]>(static_cast<std::size_t>(size()));
    blocked_ = 0;
    left_ = 0;
    failure_.clear();
  }

  // Posts a rank's group and returns when every operation of it has been delivered. Only
  // the ranks a delivery concerns are woken, so that a world of a thousand ranks does not
  // wake a thousand threads per message.
  void post_and_wait(std::vector<operation>& group) {
    std::unique_lock lock(mutex_);
    rank_state& me = ranks_[static_cast<std::size_t>(group.front().rank)];
    if (!failure_.empty()) {
      me.stalled = true;  // another rank failed before this one posted: not this rank's error
      throw_if_failed();
    }
    me.undelivered = static_cast<int>(group.size());
    try {
      for (auto& op : group) {
        pair_key const key = key_of(op);
        pending_pair& pair = pending_[key];
        (op.is_send ? pair.sends : pair.recvs).push_back(&op);
        match(key, pair);
      }
    } catch (...) {
      withdraw(group);  // a mismatch or a failed copy: `group` dies with the exception
      throw;
    }
    if (me.undelivered == 0) return;
    me.waiting = true;
    ++blocked_;
    if (blocked_ + left_ == size()) stall();  // no rank is left that could post a peer side
    while (me.undelivered > 0 && failure_.empty()) me.delivered.wait(lock);
    if (me.undelivered > 0) {
      me.waiting = false;
      --blocked_;
      me.stalled = true;
      withdraw(group);
      throw_if_failed();
    }
  }

  static pair_key key_of(operation const& op) noexcept {
    return op.is_send ? pair_key{op.rank, op.peer} : pair_key{op.peer, op.rank};
  }

  // Takes the operations of a group that leaves by an exception off the pending list, so
  // that no later match or `stall` reads them after the group is destroyed.
  void withdraw(std::vector<operation>& group) {
    for (auto& op : group) {
      auto const it = pending_.find(key_of(op));
      if (it == pending_.end()) continue;
      std::erase(op.is_send ? it->second.sends : it->second.recvs, &op);
      if (it->second.sends.empty() && it->second.recvs.empty()) pending_.erase(it);
    }
  }

  // Delivers the messages of one pair whose both sides are posted, in issue order.
  void match(pair_key key, pending_pair& pair) {
    while (!pair.sends.empty() && !pair.recvs.empty()) {
      operation& s = *pair.sends.front();
      operation& r = *pair.recvs.front();
      if (s.bytes != r.bytes) {
        raise("rank " + std::to_string(key.first) + " sends " + std::to_string(s.bytes) +
              " bytes to rank " + std::to_string(key.second) + ", which receives " +
              std::to_string(r.bytes) + " bytes: matched messages must have equal sizes");
        throw_if_failed();
      }
      transport_.copy(r.data, s.data, s.bytes, s.stream, r.stream);
      trace_.push_back(
          {key.first, key.second, s.bytes, !topology_.same_node(key.first, key.second), s.phase});
      pair.sends.pop_front();
      pair.recvs.pop_front();
      delivered(s.rank);
      delivered(r.rank);
    }
    if (pair.sends.empty() && pair.recvs.empty()) pending_.erase(key);
  }

  void delivered(int rank) {
    rank_state& state = ranks_[static_cast<std::size_t>(rank)];
    if (--state.undelivered > 0 || !state.waiting) return;
    state.waiting = false;
    --blocked_;
    state.delivered.notify_one();
  }

  // Every rank still in the world waits on an operation that no rank can match any more.
  void stall() {
    std::string pending;
    for (auto const& [key, pair] : pending_)
      for (auto const* ops : {&pair.sends, &pair.recvs})
        for (operation const* op : *ops)
          pending += std::string(pending.empty() ? "" : "; ") + "rank " + std::to_string(op->rank) +
                     (op->is_send ? " send of " : " recv of ") + std::to_string(op->bytes) +
                     " bytes " + (op->is_send ? "to" : "from") + " rank " +
                     std::to_string(op->peer);
    raise("operations that no rank will match: " + pending);
  }

  void raise(std::string why) {
    if (failure_.empty()) failure_ = std::move(why);
    for (int r = 0; r < size(); ++r) ranks_[static_cast<std::size_t>(r)].delivered.notify_all();
  }

  void throw_if_failed() const {
    if (!failure_.empty()) throw invalid_argument("simulated_world", failure_);
  }

  // A rank threw: the ranks waiting on it cannot complete.
  void fail(int rank) {
    std::lock_guard lock(mutex_);
    raise("rank " + std::to_string(rank) + " failed");
  }

  void leave() {
    std::lock_guard lock(mutex_);
    ++left_;
    if (blocked_ > 0 && blocked_ + left_ == size()) stall();
  }

  comm::topology topology_;
  Transport transport_;
  mutable std::mutex mutex_;
  std::map<pair_key, pending_pair> pending_;  // only of ranks inside post_and_wait
  std::unique_ptr<rank_state[]> ranks_;
  std::vector<message_record> trace_;
  int blocked_ = 0;  // ranks waiting on an undelivered operation
  int left_ = 0;     // ranks whose body has returned
  std::string failure_;
};

/// One virtual rank's end of the world; models `comm::communicator`. Only the thread that
/// the world runs for this rank may use it.
template <class Transport>
class basic_simulated_world<Transport>::rank_communicator {
 public:
  rank_communicator(basic_simulated_world& world, int rank) : world_(&world), rank_(rank) {}
  rank_communicator(rank_communicator const&) = delete;
  rank_communicator& operator=(rank_communicator const&) = delete;

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept { return world_->size(); }
  [[nodiscard]] comm::topology topology() const noexcept { return world_->topology(); }

  void group_start() { ++depth_; }

  /// Issues the group's operations; returns once all are delivered (host transport) or
  /// enqueued on their streams (device transport).
  void group_end() {
    MOE_EXPECTS(depth_ > 0, "group_end", "called without a matching group_start");
    if (--depth_ > 0) return;
    flush();
  }

  void send(void const* src, std::size_t bytes, int peer, cudaStream_t stream) {
    issue(true, const_cast<void*>(src), bytes, peer, stream);
  }
  void recv(void* dst, std::size_t bytes, int peer, cudaStream_t stream) {
    issue(false, dst, bytes, peer, stream);
  }

  // Called by the world when the rank's body returns.
  void finish() {
    MOE_EXPECTS(depth_ == 0, "group_start",
                "rank " + std::to_string(rank_) + " returned inside a group holding " +
                    std::to_string(group_.size()) + " operations that were never issued");
  }

 private:
  void issue(bool is_send, void* data, std::size_t bytes, int peer, cudaStream_t stream) {
    MOE_EXPECTS(peer >= 0 && peer < size(), "peer",
                "must be in [0, " + std::to_string(size()) + "), got " + std::to_string(peer));
    MOE_EXPECTS(data != nullptr || bytes == 0, is_send ? "src" : "dst", "is null");
    group_.push_back({.is_send = is_send,
                      .rank = rank_,
                      .peer = peer,
                      .data = data,
                      .bytes = bytes,
                      .stream = stream,
                      .phase = phase_});
    if (depth_ == 0) flush();
  }

  void flush() {
    if (group_.empty()) return;
    std::vector<operation> group = std::move(group_);
    group_.clear();
    ++phase_;
    world_->post_and_wait(group);
  }

  basic_simulated_world* world_;
  int rank_;
  int depth_ = 0;
  int phase_ = 0;
  std::vector<operation> group_;
};

/// Virtual ranks over host memory (the host backend's world).
using simulated_world = basic_simulated_world<host_transport>;
/// Virtual ranks over the device memory of one GPU, one stream per rank.
using device_simulated_world = basic_simulated_world<device_transport>;

static_assert(communicator<simulated_world::rank_communicator>);
static_assert(communicator<device_simulated_world::rank_communicator>);

}  // namespace moe::comm
