// SPDX-License-Identifier: Apache-2.0
#pragma once
// The concepts of the comm room (DESIGN §5):
//
// - `communicator`: a borrowed, byte-typed, stream-ordered point-to-point channel between
//   the ranks of a world, with NCCL's semantics. `nccl_communicator` and the ranks of a
//   `simulated_world` model it.
// - `collective`: a stateless policy saying how a layer's dispatched buffer reaches the
//   ranks that own its experts and comes back (`single_rank`, `linear_all_to_all`,
//   `all_to_all_2dh`), built only from a communicator's calls.

#include <moe/core/concepts.hpp>
#include <moe/core/config.hpp>
#include <moe/gating/concepts.hpp>

#include <cuda_runtime_api.h>

#include <concepts>
#include <cstddef>

namespace moe::comm {

/// Where the ranks of a world sit: `nodes` nodes of `ranks_per_node` ranks each, rank r on
/// node r / ranks_per_node with local index r % ranks_per_node (NCCL's usual numbering).
struct topology {
  int ranks_per_node = 1;
  int nodes = 1;

  [[nodiscard]] constexpr int size() const noexcept { return ranks_per_node * nodes; }
  [[nodiscard]] constexpr int node_of(int rank) const noexcept { return rank / ranks_per_node; }
  [[nodiscard]] constexpr int local_of(int rank) const noexcept { return rank % ranks_per_node; }
  [[nodiscard]] constexpr int rank_of(int node, int local) const noexcept {
    return node * ranks_per_node + local;
  }
  [[nodiscard]] constexpr bool same_node(int a, int b) const noexcept {
    return node_of(a) == node_of(b);
  }
  friend constexpr bool operator==(topology, topology) = default;
};

/// C models communicator if, for `c` a C and `cc` a C const:
/// 1. `cc.rank()` and `cc.size()` give this rank and the world size (0 ≤ rank < size);
/// 2. `cc.topology()` gives a `comm::topology` whose size() is size();
/// 3. `c.group_start()` / `c.group_end()` bracket operations that must not block each other;
/// 4. `c.send(src, bytes, peer, stream)` and `c.recv(dst, bytes, peer, stream)` enqueue a
///    transfer of `bytes` bytes on `stream`.
/// Semantics are NCCL's: asynchronous (stream-ordered); inside a group no operation blocks
/// another; messages between a pair match in issue order and must carry equal byte counts;
/// a rank may send to itself; every rank issues its operations in the same order.
template <class C>
concept communicator = requires(C& c, C const& cc, void const* src, void* dst, std::size_t bytes,
                                int peer, cudaStream_t stream) {
  { cc.rank() } -> std::convertible_to<int>;
  { cc.size() } -> std::convertible_to<int>;
  { cc.topology() } -> std::same_as<comm::topology>;
  c.group_start();
  c.group_end();
  c.send(src, bytes, peer, stream);
  c.recv(dst, bytes, peer, stream);
};

struct collective_tag {};

/// C models collective if it is a stateless policy (std::semiregular) tagged
/// `collective_tag` that says whether it moves data at all (`C::is_identity`).
template <class C>
concept collective = std::semiregular<C> && tagged_as<C, collective_tag> && requires {
  { C::is_identity } -> std::convertible_to<bool>;
};

/// The collective of a layer on one rank: every expert is local, nothing moves.
struct single_rank {
  using moe_concept = collective_tag;
  static constexpr bool is_identity = true;
};
static_assert(collective<single_rank>);

}  // namespace moe::comm
