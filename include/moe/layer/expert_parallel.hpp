// SPDX-License-Identifier: Apache-2.0
#pragma once
// Expert parallelism (DESIGN §5): E experts split over the W ranks of a communicator, rank w
// owning experts [w·E_local, (w+1)·E_local). These are the exchanges that move a layer's rows
// between the two batches it then holds, on the host backend (host memory) and the CUDA one
// (device memory, the caller's stream) alike: one description of the chunk layout for both.
//
// - the local batch: rows of this rank's tokens for all E experts, laid out by the layout
//   (gather and combine work on it);
// - the expert batch: rows of all ranks' tokens for this rank's E_local experts (the expert
//   computes on it). Expert e's segment holds rank 0's rows, then rank 1's, and so on.
//
// Capacity layout: the local batch is [E, C, H]; the all-to-all (any collective) delivers
// [W, E_local, C, H], which a reorder makes [E_local, W·C, H]: Tutel's flexible layout, so
// the expert's shapes do not depend on W. C is the same on every rank (on the host backend
// sized for the largest T over them, host_layer.hpp), so the blocks agree whatever each
// rank's T: a rank with fewer tokens, or none, sends its unused slots as zero rows, and with
// C = 0 the empty blocks are still exchanged. Ragged layout: per-expert row counts are
// exchanged first (on the backend's memory), the expert batch is laid out from them on the
// host, then the rows move by all_to_allv with byte counts every rank already knows; the
// expert batch's segments are padded to the row alignment, padding rows zero. The way back
// is the same steps reversed.

#include <moe/comm/all_to_all.hpp>
#include <moe/comm/concepts.hpp>
#include <moe/comm/detail/copy.hpp>
#include <moe/core/backend.hpp>
#include <moe/core/checked.hpp>
#include <moe/core/error.hpp>
#include <moe/core/view.hpp>
#include <moe/gating/capacity.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

namespace moe::detail {

/// Every rank's `value`, in rank order, into `out` (P values). `scratch` holds P values.
template <comm::communicator C>
void all_gather(C& comm, std::int64_t value, span<std::int64_t> out, span<std::int64_t> scratch) {
  std::fill(scratch.begin(), scratch.end(), value);
  comm::detail::exchange_blocks(host, comm, reinterpret_cast<std::byte*>(out.data()),
                                reinterpret_cast<std::byte const*>(scratch.data()),
                                sizeof(std::int64_t), comm.size(), comm.rank(),
                                [](int r) { return r; });
}

template <class T>
span<std::byte const> bytes_of(matrix_view<T const> m) {
  return {reinterpret_cast<std::byte const*>(m.data_handle()),
          static_cast<std::size_t>(element_count(m)) * sizeof(T)};
}
template <class T>
span<std::byte> bytes_of(matrix_view<T> m) {
  return {reinterpret_cast<std::byte*>(m.data_handle()),
          static_cast<std::size_t>(element_count(m)) * sizeof(T)};
}

/// Bytes of scratch the exchanges of a layer need, for batches of at most `local_rows` and
/// `expert_rows` rows of `row_bytes`: one copy of the larger batch (what arrives before it is
/// reordered or placed, what leaves once it is packed), then the collective's own scratch.
template <class Collective>
std::size_t exchange_scratch_bytes(index_t local_rows, index_t expert_rows, std::size_t row_bytes,
                                   comm::topology t) {
  std::size_t const largest =
      static_cast<std::size_t>(std::max(local_rows, expert_rows)) * row_bytes;
  return largest + Collective::scratch_bytes(static_cast<std::size_t>(local_rows) * row_bytes, t);
}

/// The exchanges of the capacity layout; `Collective` moves the bytes.
template <class Collective>
struct capacity_exchange {
  /// local (E·C, H) → expert (E_local·W·C, H).
  template <backend B, comm::communicator C, class T>
  static void to_experts(B b, C& comm, index_t capacity, matrix_view<T const> local,
                         matrix_view<T> expert, span<std::byte> scratch) {
    auto const [received, collective] = split(comm, bytes_of(local).size(), scratch);
    Collective::run(b, comm, bytes_of(local), received, collective);
    comm::detail::transpose_chunks(b, bytes_of(expert).data(), received.data(), comm.size(),
                                   local_experts(comm, local.extent(0), capacity),
                                   chunk_bytes<T>(capacity, local.extent(1)));
  }

  /// expert (E_local·W·C, H) → local (E·C, H): the way back.
  template <backend B, comm::communicator C, class T>
  static void to_ranks(B b, C& comm, index_t capacity, matrix_view<T const> expert,
                       matrix_view<T> local, span<std::byte> scratch) {
    auto const [reordered, collective] = split(comm, bytes_of(local).size(), scratch);
    comm::detail::transpose_chunks(b, reordered.data(), bytes_of(expert).data(),
                                   local_experts(comm, local.extent(0), capacity), comm.size(),
                                   chunk_bytes<T>(capacity, local.extent(1)));
    Collective::run(b, comm, span<std::byte const>(reordered), bytes_of(local), collective);
  }

 private:
  // E_local of a local batch of E·C rows; none to reorder when C = 0.
  template <comm::communicator C>
  static int local_experts(C& comm, index_t local_rows, index_t capacity) {
    return capacity > 0 ? static_cast<int>(local_rows / capacity / comm.size()) : 0;
  }
  // One (rank, expert) chunk: C rows.
  template <class T>
  static std::size_t chunk_bytes(index_t capacity, index_t hidden) {
    return static_cast<std::size_t>(capacity * hidden) * sizeof(T);
  }
  template <comm::communicator C>
  static auto split(C& comm, std::size_t bytes, span<std::byte> scratch) {
    MOE_EXPECTS(scratch.size() >= bytes + Collective::scratch_bytes(bytes, comm.topology()), "ws",
                "is too small for the exchange");
    struct parts {
      span<std::byte> buffer, collective;
    };
    return parts{scratch.first(bytes), scratch.subspan(bytes)};
  }
};

/// The exchanges of the ragged layout: counts first, then rows by all_to_allv.
struct ragged_exchange {
  /// What one forward call's count exchange decided, in host memory; backward reuses it.
  struct plan {
    span<std::int64_t const> sent;      // (W, E_local) rows this rank sends rank w for its e
    span<std::int64_t const> received;  // (W, E_local) rows rank w sends this rank for expert e
  };

  /// Sends every rank w the rows this rank holds for w's experts (`local_rows`, E, unpadded, in
  /// expert order) and receives into `received` (W, E_local) the rows each rank holds for this
  /// rank's experts. Both in the memory of `b`; on the CUDA backend stream-ordered.
  template <backend B, comm::communicator C>
  static void exchange_counts(B b, C& comm, std::int64_t const* local_rows, std::int64_t* received,
                              index_t experts_per_rank) {
    comm::detail::exchange_blocks(b, comm, reinterpret_cast<std::byte*>(received),
                                  reinterpret_cast<std::byte const*>(local_rows),
                                  static_cast<std::size_t>(experts_per_rank) * sizeof(std::int64_t),
                                  comm.size(), comm.rank(), [](int r) { return r; });
  }

  /// Lays out the expert batch from the received counts (W, E_local), host memory: `begin` and
  /// `rows` (E_local) with each segment padded to `row_alignment`. Returns the batch's rows.
  static index_t lay_out_expert_batch(span<std::int64_t const> received, index_t row_alignment,
                                      span<std::int64_t> begin, span<std::int64_t> rows) {
    std::size_t const experts_per_rank = rows.size();
    std::size_t const ranks = experts_per_rank > 0 ? received.size() / experts_per_rank : 0;
    index_t next = 0;
    for (std::size_t e = 0; e < experts_per_rank; ++e) {
      index_t n = 0;
      for (std::size_t w = 0; w < ranks; ++w) n += received[w * experts_per_rank + e];
      begin[e] = next;
      rows[e] = n;
      next += round_up(n, row_alignment);
    }
    return next;
  }

  /// local (rows in expert order, H) → expert batch; padding rows zero. `counts` (2W) host.
  template <backend B, comm::communicator C, class T>
  static void to_experts(B b, C& comm, plan const& p, span<std::int64_t const> begin,
                         matrix_view<T const> local, matrix_view<T> expert, span<std::byte> scratch,
                         span<std::uint64_t> counts) {
    std::size_t const row_bytes = static_cast<std::size_t>(local.extent(1)) * sizeof(T);
    span<std::byte> const to = bytes_of(expert);
    comm::detail::zero_bytes(b, to.data(), to.size());
    move_rows(b, comm, p.sent, p.received, bytes_of(local), scratch, counts, row_bytes);
    // [w][e] pieces → segment e, rank w after rank w − 1.
    for_each_piece(p.received, begin, row_bytes, [&](std::size_t from, index_t row, index_t n) {
      comm::detail::copy_bytes(b, to.data() + static_cast<std::size_t>(row) * row_bytes,
                               scratch.data() + from, static_cast<std::size_t>(n) * row_bytes);
    });
  }

  /// expert batch → local (rows in expert order, H): the way back.
  template <backend B, comm::communicator C, class T>
  static void to_ranks(B b, C& comm, plan const& p, span<std::int64_t const> begin,
                       matrix_view<T const> expert, matrix_view<T> local, span<std::byte> scratch,
                       span<std::uint64_t> counts) {
    std::size_t const row_bytes = static_cast<std::size_t>(local.extent(1)) * sizeof(T);
    span<std::byte const> const from = bytes_of(expert);
    for_each_piece(p.received, begin, row_bytes, [&](std::size_t to, index_t row, index_t n) {
      comm::detail::copy_bytes(b, scratch.data() + to,
                               from.data() + static_cast<std::size_t>(row) * row_bytes,
                               static_cast<std::size_t>(n) * row_bytes);
    });
    std::size_t const packed = total_rows(p.received) * row_bytes;
    move_rows(b, comm, p.received, p.sent, span<std::byte const>(scratch.first(packed)),
              bytes_of(local), counts, row_bytes);
  }

 private:
  static std::size_t total_rows(span<std::int64_t const> counts) {
    std::size_t n = 0;
    for (auto c : counts) n += static_cast<std::size_t>(c);
    return n;
  }

  // Calls f(byte offset in the packed [w][e] buffer, row in the expert batch, rows) for
  // each non-empty piece that rank w exchanges with this rank for local expert e. An empty
  // piece may begin at the batch's end, a row no view may index; it is skipped.
  template <class F>
  static void for_each_piece(span<std::int64_t const> received, span<std::int64_t const> begin,
                             std::size_t row_bytes, F f) {
    std::size_t const experts_per_rank = begin.size();
    std::size_t const ranks = experts_per_rank > 0 ? received.size() / experts_per_rank : 0;
    std::size_t offset = 0;
    for (std::size_t w = 0; w < ranks; ++w)
      for (std::size_t e = 0; e < experts_per_rank; ++e) {
        index_t before = 0;  // rows of ranks before w in segment e
        for (std::size_t v = 0; v < w; ++v) before += received[v * experts_per_rank + e];
        index_t const n = received[w * experts_per_rank + e];
        if (n > 0) f(offset, begin[e] + before, n);
        offset += static_cast<std::size_t>(n) * row_bytes;
      }
  }

  // all_to_allv of rows: `out_rows` (W, E_local) go out, `in_rows` come in. Both are known on
  // the host, so no byte count travels again (and the CUDA backend does not synchronise).
  template <backend B, comm::communicator C>
  static void move_rows(B b, C& comm, span<std::int64_t const> out_rows,
                        span<std::int64_t const> in_rows, span<std::byte const> send,
                        span<std::byte> recv, span<std::uint64_t> counts, std::size_t row_bytes) {
    auto const p = static_cast<std::size_t>(comm.size());
    span<std::uint64_t> const send_bytes = counts.first(p), recv_bytes = counts.subspan(p, p);
    auto bytes_per_rank = [&](span<std::int64_t const> rows, span<std::uint64_t> bytes) {
      std::size_t const per_rank = rows.size() / p;
      for (std::size_t w = 0; w < p; ++w)
        bytes[w] = total_rows(rows.subspan(w * per_rank, per_rank)) * row_bytes;
    };
    bytes_per_rank(out_rows, send_bytes);
    bytes_per_rank(in_rows, recv_bytes);
    comm::all_to_allv::exchange(b, comm, send, span<std::uint64_t const>(send_bytes), recv,
                                span<std::uint64_t const>(recv_bytes));
  }
};

/// The exchanges of a layer with `Layout` over `Collective`, as both backends call them.
template <class Layout, class Collective>
struct layer_exchange {
  /// What one call's exchanges need, besides the rows.
  struct call {
    index_t capacity = 0;             // capacity layout: C of the call
    ragged_exchange::plan plan;       // ragged: rows per (rank, expert), host memory
    span<std::int64_t const> begin;   // ragged: the expert batch's segments, host memory
    span<std::byte> scratch;          // exchange_scratch_bytes, in the rows' memory
    span<std::uint64_t> byte_counts;  // ragged: (2W) host memory
  };

  /// Local-batch rows to the ranks that own their experts.
  template <backend B, comm::communicator C, class T>
  static void to_experts(B b, C& comm, call const& c, matrix_view<T const> local,
                         matrix_view<T> expert) {
    if constexpr (Layout::drops_tokens)
      capacity_exchange<Collective>::to_experts(b, comm, c.capacity, local, expert, c.scratch);
    else
      ragged_exchange::to_experts(b, comm, c.plan, c.begin, local, expert, c.scratch,
                                  c.byte_counts);
  }

  /// The way back: expert-batch rows to the ranks their tokens live on.
  template <backend B, comm::communicator C, class T>
  static void to_ranks(B b, C& comm, call const& c, matrix_view<T const> expert,
                       matrix_view<T> local) {
    if constexpr (Layout::drops_tokens)
      capacity_exchange<Collective>::to_ranks(b, comm, c.capacity, expert, local, c.scratch);
    else
      ragged_exchange::to_ranks(b, comm, c.plan, c.begin, expert, local, c.scratch, c.byte_counts);
  }
};

}  // namespace moe::detail
