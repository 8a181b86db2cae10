// SPDX-License-Identifier: Apache-2.0
#pragma once
// Expert parallelism on the host backend (DESIGN §5): E experts split over the W ranks of a
// communicator, rank w owning experts [w·E_local, (w+1)·E_local). These are the exchanges
// that move a layer's rows between the two batches it then holds:
//
// - the local batch: rows of this rank's tokens for all E experts, laid out by the layout
//   (gather and combine work on it);
// - the expert batch: rows of all ranks' tokens for this rank's E_local experts (the expert
//   computes on it). Expert e's segment holds rank 0's rows, then rank 1's, and so on.
//
// Capacity layout: the local batch is [E, C, H]; the all-to-all (any collective) delivers
// [W, E_local, C, H], which a reorder makes [E_local, W·C, H]: Tutel's flexible layout, so
// the expert's shapes do not depend on W. Ragged layout: per-expert row counts are
// exchanged first, then the rows by all_to_allv; the expert batch's segments are padded to
// the row alignment. The way back is the same steps reversed.

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
#include <cstring>
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

/// The exchanges of the capacity layout; `Collective` moves the bytes.
template <class Collective>
struct capacity_exchange {
  /// Bytes of scratch the exchanges need for a local batch of `rows` rows of `hidden`.
  static std::size_t scratch_bytes(index_t rows, index_t hidden, comm::topology t) {
    std::size_t const bytes = static_cast<std::size_t>(rows * hidden) * sizeof(double);
    return bytes + Collective::scratch_bytes(bytes, t);
  }

  /// local (E·C, H) → expert (E_local·W·C, H).
  template <comm::communicator C>
  static void to_experts(C& comm, index_t capacity, matrix_view<double const> local,
                         matrix_view<double> expert, span<std::byte> scratch) {
    auto const [received, collective] = split(comm, local, scratch);
    Collective::run(host, comm, bytes_of(local), received, collective);
    comm::detail::transpose_chunks(host, bytes_of(expert).data(), received.data(), comm.size(),
                                   local_experts(comm, local, capacity),
                                   chunk_bytes(capacity, local));
  }

  /// expert (E_local·W·C, H) → local (E·C, H): the way back.
  template <comm::communicator C>
  static void to_ranks(C& comm, index_t capacity, matrix_view<double const> expert,
                       matrix_view<double> local, span<std::byte> scratch) {
    auto const [reordered, collective] = split(comm, as_const(local), scratch);
    comm::detail::transpose_chunks(host, reordered.data(), bytes_of(expert).data(),
                                   local_experts(comm, as_const(local), capacity), comm.size(),
                                   chunk_bytes(capacity, as_const(local)));
    Collective::run(host, comm, span<std::byte const>(reordered), bytes_of(local), collective);
  }

 private:
  template <comm::communicator C>
  static int local_experts(C& comm, matrix_view<double const> local, index_t capacity) {
    return static_cast<int>(local.extent(0) / capacity / comm.size());
  }
  static std::size_t chunk_bytes(index_t capacity, matrix_view<double const> local) {
    return static_cast<std::size_t>(capacity * local.extent(1)) * sizeof(double);
  }
  template <comm::communicator C>
  static auto split(C& comm, matrix_view<double const> local, span<std::byte> scratch) {
    std::size_t const bytes = bytes_of(local).size();
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
  /// What one forward call's exchange decided, kept for the way back and for backward.
  struct plan {
    span<std::int64_t> sent;      // (W, E_local) rows this rank sent to rank w for its e
    span<std::int64_t> received;  // (W, E_local) rows rank w sent this rank for expert e
  };

  /// Counts: `local_rows` (E) rows per expert in the local batch, unpadded, in expert order.
  /// Fills `p` and lays out the expert batch: `begin`/`rows` (E_local) with each segment
  /// padded to `row_alignment`. Returns the expert batch's rows.
  template <comm::communicator C>
  static index_t exchange_counts(C& comm, span<std::int64_t const> local_rows,
                                 index_t row_alignment, plan const& p, span<std::int64_t> begin,
                                 span<std::int64_t> rows) {
    auto const experts_per_rank = static_cast<std::size_t>(rows.size());
    std::copy(local_rows.begin(), local_rows.end(), p.sent.begin());
    comm::detail::exchange_blocks(host, comm, reinterpret_cast<std::byte*>(p.received.data()),
                                  reinterpret_cast<std::byte const*>(p.sent.data()),
                                  experts_per_rank * sizeof(std::int64_t), comm.size(), comm.rank(),
                                  [](int r) { return r; });
    index_t next = 0;
    for (std::size_t e = 0; e < experts_per_rank; ++e) {
      index_t n = 0;
      for (int w = 0; w < comm.size(); ++w) n += p.received[w * experts_per_rank + e];
      begin[e] = next;
      rows[e] = n;
      next += round_up(n, row_alignment);
    }
    return next;
  }

  /// local (rows in expert order, H) → expert batch; padding rows zero.
  template <comm::communicator C>
  static void to_experts(C& comm, plan const& p, span<std::int64_t const> begin,
                         matrix_view<double const> local, matrix_view<double> expert,
                         span<std::byte> scratch, span<std::uint64_t> counts) {
    index_t const hidden = local.extent(1);
    std::fill_n(expert.data_handle(), element_count(expert), 0.0);
    auto received = move_rows(comm, p.sent, p.received, bytes_of(local), scratch, counts, hidden);
    // [w][e] pieces → segment e, rank w after rank w − 1.
    for_each_piece(comm, p.received, begin, hidden, [&](std::size_t from, index_t row, index_t n) {
      std::memcpy(expert.data_handle() + row * hidden, received.data() + from,
                  static_cast<std::size_t>(n * hidden) * sizeof(double));
    });
  }

  /// expert batch → local (rows in expert order, H): the way back.
  template <comm::communicator C>
  static void to_ranks(C& comm, plan const& p, span<std::int64_t const> begin,
                       matrix_view<double const> expert, matrix_view<double> local,
                       span<std::byte> scratch, span<std::uint64_t> counts) {
    index_t const hidden = local.extent(1);
    for_each_piece(comm, p.received, begin, hidden, [&](std::size_t to, index_t row, index_t n) {
      std::memcpy(scratch.data() + to, expert.data_handle() + row * hidden,
                  static_cast<std::size_t>(n * hidden) * sizeof(double));
    });
    std::size_t const packed = total_rows(p.received) * hidden * sizeof(double);
    (void)move_rows(comm, p.received, p.sent, span<std::byte const>(scratch.first(packed)),
                    bytes_of(local), counts, hidden);
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
  template <comm::communicator C, class F>
  static void for_each_piece(C& comm, span<std::int64_t const> received,
                             span<std::int64_t const> begin, index_t hidden, F f) {
    std::size_t const experts_per_rank = begin.size();
    std::size_t offset = 0;
    for (int w = 0; w < comm.size(); ++w)
      for (std::size_t e = 0; e < experts_per_rank; ++e) {
        index_t before = 0;  // rows of ranks before w in segment e
        for (int v = 0; v < w; ++v) before += received[v * experts_per_rank + e];
        index_t const n = received[w * experts_per_rank + e];
        if (n > 0) f(offset, begin[e] + before, n);
        offset += static_cast<std::size_t>(n * hidden) * sizeof(double);
      }
  }

  // all_to_allv of rows: `out_rows` (W, E_local) go out, `in_rows` come in.
  template <comm::communicator C>
  static span<std::byte> move_rows(C& comm, span<std::int64_t const> out_rows,
                                   span<std::int64_t const> in_rows, span<std::byte const> send,
                                   span<std::byte> recv, span<std::uint64_t> counts,
                                   index_t hidden) {
    auto const p = static_cast<std::size_t>(comm.size());
    std::size_t const per_rank = out_rows.size() / p;
    span<std::uint64_t> const send_bytes = counts.first(p), recv_bytes = counts.subspan(p, p);
    for (std::size_t w = 0; w < p; ++w) {
      std::uint64_t n = 0;
      for (std::size_t e = 0; e < per_rank; ++e)
        n += static_cast<std::uint64_t>(out_rows[w * per_rank + e]);
      send_bytes[w] = n * static_cast<std::uint64_t>(hidden) * sizeof(double);
    }
    comm::all_to_allv::run(host, comm, send, span<std::uint64_t const>(send_bytes), recv,
                           recv_bytes);
    (void)in_rows;
    return recv;
  }
};

}  // namespace moe::detail
