// SPDX-License-Identifier: Apache-2.0
#pragma once
// The all-to-all collectives (DESIGN §5), built only from a communicator's calls, on the
// host backend (host memory) or the CUDA backend (device memory, the caller's stream).
//
// A rank's send buffer holds P equal chunks, chunk p for rank p; its receive buffer gets P
// chunks, chunk p from rank p. With S bytes per rank, N ranks per node and M nodes:
//
// - `linear_all_to_all`: P − 1 messages of S/P per rank (the own chunk is copied locally).
// - `all_to_all_2dh` (Tutel's two-dimensional hierarchical all-to-all):
//     0. reorder the chunks from [dst_node][dst_local] to [dst_local][dst_node];
//     1. all-to-all inside the node: N − 1 messages of S/N (all of one local index's chunks);
//     2. reorder from [src_local][dst_node] to [dst_node][src_local];
//     3. exchange with the same local index on the other nodes: M − 1 messages of S/M.
//   It sends as many bytes over the network as the linear algorithm but in M − 1 instead of
//   P − N messages, and its output equals the linear algorithm's bit for bit.
// - `all_to_allv`: variable chunks; the byte counts are exchanged first (`run`), or are
//   known to every rank already (`exchange`).

#include <moe/comm/concepts.hpp>
#include <moe/comm/detail/copy.hpp>
#include <moe/core/backend.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>

#include <cuda_runtime_api.h>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

namespace moe::comm {

namespace detail {

inline void check_all_to_all(span<std::byte const> send, span<std::byte> recv,
                             span<std::byte> scratch, std::size_t scratch_needed, int size) {
  auto const p = static_cast<std::size_t>(size);
  MOE_EXPECTS(send.size() % p == 0, "send",
              "holds " + std::to_string(send.size()) + " bytes, not a multiple of the " +
                  std::to_string(size) + " ranks");
  MOE_EXPECTS(
      recv.size() == send.size(), "recv",
      "holds " + std::to_string(recv.size()) + " bytes; send holds " + std::to_string(send.size()));
  MOE_EXPECTS(scratch.size() >= scratch_needed, "scratch",
              "holds " + std::to_string(scratch.size()) + " bytes; " +
                  std::to_string(scratch_needed) + " are needed");
  MOE_EXPECTS(send.empty() || (send.data() != nullptr && recv.data() != nullptr), "send",
              "or recv is null");
  auto const s = reinterpret_cast<std::uintptr_t>(send.data());
  auto const r = reinterpret_cast<std::uintptr_t>(recv.data());
  MOE_EXPECTS(send.empty() || s + send.size() <= r || r + recv.size() <= s, "recv",
              "overlaps send");
}

/// Sends block i of `src` (blocks of `block` bytes, indexed by member) to member i of a
/// group and receives member i's block into block i of `dst`; members are ranks
/// `rank_of(i)`, i in [0, members), and this rank is member `self`. Own block copied locally.
template <backend B, communicator C, class RankOf>
void exchange_blocks(B b, C& comm, std::byte* dst, std::byte const* src, std::size_t block,
                     int members, int self, RankOf rank_of) {
  detail::copy_bytes(b, dst + static_cast<std::size_t>(self) * block,
                     src + static_cast<std::size_t>(self) * block, block);
  if (members == 1) return;
  cudaStream_t const stream = stream_of(b);
  comm.group_start();
  for (int i = 1; i < members; ++i) {
    int const to = (self + i) % members, from = (self - i + members) % members;
    comm.send(src + static_cast<std::size_t>(to) * block, block, rank_of(to), stream);
    comm.recv(dst + static_cast<std::size_t>(from) * block, block, rank_of(from), stream);
  }
  comm.group_end();
}

}  // namespace detail

/// Every rank sends each other rank its chunk directly.
struct linear_all_to_all {
  using moe_concept = collective_tag;
  static constexpr bool is_identity = false;

  [[nodiscard]] static constexpr std::size_t scratch_bytes(std::size_t /*bytes_per_rank*/,
                                                           comm::topology) noexcept {
    return 0;
  }

  /// @param[in]  send    P chunks, chunk p for rank p (host or device memory, as `b` says)
  /// @param[out] recv    P chunks, chunk p from rank p; must not overlap send
  /// @param      scratch unused (0 bytes)
  template <backend B, communicator C>
  static void run(B b, C& comm, span<std::byte const> send, span<std::byte> recv,
                  span<std::byte> scratch = {}) {
    detail::check_all_to_all(send, recv, scratch, 0, comm.size());
    detail::exchange_blocks(b, comm, recv.data(), send.data(), send.size() / comm.size(),
                            comm.size(), comm.rank(), [](int r) { return r; });
  }
};
static_assert(collective<linear_all_to_all>);

/// Tutel's two-dimensional hierarchical all-to-all: see the file comment.
struct all_to_all_2dh {
  using moe_concept = collective_tag;
  static constexpr bool is_identity = false;

  /// One copy of the rank's bytes for the reorders; none when one of the two levels is
  /// trivial (one node, or one rank per node), where 2DH is the linear exchange.
  [[nodiscard]] static constexpr std::size_t scratch_bytes(std::size_t bytes_per_rank,
                                                           comm::topology t) noexcept {
    return t.ranks_per_node > 1 && t.nodes > 1 ? bytes_per_rank : 0;
  }

  /// Same contract as `linear_all_to_all::run`; `scratch` holds `scratch_bytes` bytes in
  /// the memory space of the buffers.
  template <backend B, communicator C>
  static void run(B b, C& comm, span<std::byte const> send, span<std::byte> recv,
                  span<std::byte> scratch = {}) {
    comm::topology const t = comm.topology();
    MOE_EXPECTS(t.size() == comm.size(), "comm",
                "has " + std::to_string(comm.size()) + " ranks but its topology has " +
                    std::to_string(t.size()));
    detail::check_all_to_all(send, recv, scratch, scratch_bytes(send.size(), t), comm.size());
    int const n = t.ranks_per_node, m = t.nodes, me = comm.rank();
    int const node = t.node_of(me), local = t.local_of(me);
    std::size_t const chunk = send.size() / static_cast<std::size_t>(comm.size());
    if (n == 1 || m == 1) {  // one level: the linear exchange is already hierarchical
      linear_all_to_all::run(b, comm, send, recv);
      return;
    }
    std::byte* const reordered = scratch.data();
    // 0. [dst_node][dst_local] → [dst_local][dst_node]
    detail::transpose_chunks(b, reordered, send.data(), m, n, chunk);
    // 1. inside the node: local index l gets all chunks for local index l; recv then holds
    //    [src_local][dst_node]
    detail::exchange_blocks(b, comm, recv.data(), reordered, chunk * m, n, local,
                            [&](int l) { return t.rank_of(node, l); });
    // 2. [src_local][dst_node] → [dst_node][src_local]
    detail::transpose_chunks(b, reordered, recv.data(), n, m, chunk);
    // 3. across nodes, same local index: recv ends as [src_node][src_local] = source rank
    detail::exchange_blocks(b, comm, recv.data(), reordered, chunk * n, m, node,
                            [&](int other) { return t.rank_of(other, local); });
  }
};
static_assert(collective<all_to_all_2dh>);

/// All-to-all with chunks of different sizes: each rank first tells each other rank how
/// many bytes it will send, then sends them.
struct all_to_allv {
  /// Bytes of device scratch the CUDA backend needs for the counts exchange.
  [[nodiscard]] static constexpr std::size_t scratch_bytes(int ranks) noexcept {
    return 2 * static_cast<std::size_t>(ranks) * sizeof(std::uint64_t);
  }

  /// Host backend.
  /// @param[in]  send       the chunks for ranks 0..P−1, back to back (host memory)
  /// @param[in]  send_bytes (P) bytes for each rank
  /// @param[out] recv       receives the chunks from ranks 0..P−1, back to back; must be at
  ///                        least their sum, which the caller bounds in advance
  /// @param[out] recv_bytes (P) bytes received from each rank
  template <communicator C>
  static void run(host_backend b, C& comm, span<std::byte const> send,
                  span<std::uint64_t const> send_bytes, span<std::byte> recv,
                  span<std::uint64_t> recv_bytes) {
    check_counts(comm, send, send_bytes, recv, recv_bytes);
    detail::exchange_blocks(b, comm, reinterpret_cast<std::byte*>(recv_bytes.data()),
                            reinterpret_cast<std::byte const*>(send_bytes.data()),
                            sizeof(std::uint64_t), comm.size(), comm.rank(),
                            [](int r) { return r; });
    exchange_data(b, comm, send, send_bytes, recv, recv_bytes);
  }

  /// CUDA backend: as the host one, with send/recv in device memory and the counts in host
  /// memory. The counts travel through `scratch` (device, `scratch_bytes(P)` bytes) and come
  /// back to the host: this call synchronises `b.stream` once, after the counts exchange,
  /// because the receives must be posted with their sizes.
  template <communicator C>
  static void run(cuda_backend b, C& comm, span<std::byte const> send,
                  span<std::uint64_t const> send_bytes, span<std::byte> recv,
                  span<std::uint64_t> recv_bytes, span<std::byte> scratch) {
    check_counts(comm, send, send_bytes, recv, recv_bytes);
    std::size_t const counts = send_bytes.size_bytes();
    MOE_EXPECTS(scratch.size() >= 2 * counts && scratch.data() != nullptr, "scratch",
                "holds " + std::to_string(scratch.size()) + " bytes; " +
                    std::to_string(2 * counts) + " are needed");
    std::byte* const outgoing = scratch.data();
    std::byte* const incoming = scratch.data() + counts;
    MOE_CUDA_TRY(
        cudaMemcpyAsync(outgoing, send_bytes.data(), counts, cudaMemcpyHostToDevice, b.stream));
    detail::exchange_blocks(b, comm, incoming, outgoing, sizeof(std::uint64_t), comm.size(),
                            comm.rank(), [](int r) { return r; });
    MOE_CUDA_TRY(
        cudaMemcpyAsync(recv_bytes.data(), incoming, counts, cudaMemcpyDeviceToHost, b.stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(b.stream));  // the documented synchronisation
    exchange_data(b, comm, send, send_bytes, recv, recv_bytes);
  }

  /// Either backend, when every rank already knows the counts both ways (a caller that
  /// exchanged them itself, as expert parallelism does with its rows per expert): no count
  /// travels, and the CUDA backend never synchronises. `recv_bytes` must equal what the
  /// peers pass as their `send_bytes` for this rank; both spans are host memory.
  template <backend B, communicator C>
  static void exchange(B b, C& comm, span<std::byte const> send,
                       span<std::uint64_t const> send_bytes, span<std::byte> recv,
                       span<std::uint64_t const> recv_bytes) {
    check_counts(comm, send, send_bytes, recv, recv_bytes);
    exchange_data(b, comm, send, send_bytes, recv, recv_bytes);
  }

 private:
  template <communicator C>
  static void check_counts(C const& comm, span<std::byte const> send,
                           span<std::uint64_t const> send_bytes, span<std::byte> recv,
                           span<std::uint64_t const> recv_bytes) {
    auto const p = static_cast<std::size_t>(comm.size());
    MOE_EXPECTS(
        send_bytes.size() == p, "send_bytes",
        "has " + std::to_string(send_bytes.size()) + " counts for " + std::to_string(p) + " ranks");
    MOE_EXPECTS(
        recv_bytes.size() == p, "recv_bytes",
        "has " + std::to_string(recv_bytes.size()) + " counts for " + std::to_string(p) + " ranks");
    MOE_EXPECTS(send_bytes.data() != nullptr, "send_bytes", "null data for the counts");
    MOE_EXPECTS(recv_bytes.data() != nullptr, "recv_bytes", "null data for the counts");
    std::uint64_t const total = sum_of(send_bytes, "send_bytes");
    MOE_EXPECTS(
        total <= send.size(), "send_bytes",
        "add up to " + std::to_string(total) + " bytes; send holds " + std::to_string(send.size()));
    MOE_EXPECTS(send.data() != nullptr || send.empty(), "send",
                "null data for " + std::to_string(send.size()) + " bytes");
    MOE_EXPECTS(recv.data() != nullptr || recv.empty(), "recv",
                "null data for " + std::to_string(recv.size()) + " bytes");
  }

  /// The sum of byte counts; throws invalid_argument naming `argument` when it passes 2^64 − 1.
  static std::uint64_t sum_of(span<std::uint64_t const> bytes, char const* argument) {
    std::uint64_t total = 0;
    for (auto n : bytes) {
      MOE_EXPECTS(n <= std::numeric_limits<std::uint64_t>::max() - total, argument,
                  "add up to more than 2^64 − 1 bytes (a count of " + std::to_string(n) +
                      " after " + std::to_string(total) + ")");
      total += n;
    }
    return total;
  }

  template <backend B, communicator C>
  static void exchange_data(B b, C& comm, span<std::byte const> send,
                            span<std::uint64_t const> send_bytes, span<std::byte> recv,
                            span<std::uint64_t const> recv_bytes) {
    std::uint64_t const total = sum_of(recv_bytes, "recv");
    // The peers have posted their sends by now; a short buffer is still the caller's error.
    MOE_EXPECTS(
        total <= recv.size(), "recv",
        "holds " + std::to_string(recv.size()) + " bytes; the ranks send " + std::to_string(total));
    int const p = comm.size(), me = comm.rank();
    auto offsets = [p](span<std::uint64_t const> bytes, int rank) {
      std::uint64_t o = 0;
      for (int r = 0; r < rank && r < p; ++r) o += bytes[static_cast<std::size_t>(r)];
      return static_cast<std::size_t>(o);
    };
    detail::copy_bytes(b, recv.data() + offsets(recv_bytes, me),
                       send.data() + offsets(send_bytes, me),
                       send_bytes[static_cast<std::size_t>(me)]);
    if (p == 1) return;
    cudaStream_t const stream = detail::stream_of(b);
    comm.group_start();
    for (int i = 1; i < p; ++i) {
      int const to = (me + i) % p, from = (me - i + p) % p;
      comm.send(send.data() + offsets(send_bytes, to), send_bytes[static_cast<std::size_t>(to)], to,
                stream);
      comm.recv(recv.data() + offsets(recv_bytes, from), recv_bytes[static_cast<std::size_t>(from)],
                from, stream);
    }
    comm.group_end();
  }
};

}  // namespace moe::comm
