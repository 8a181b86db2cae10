// SPDX-License-Identifier: Apache-2.0
//
// libFuzzer target: the all-to-all collectives (linear, 2DH, all_to_allv) on a simulated
// world of random topology, with random sizes per rank, short or null buffers, short scratch
// and random (also huge) byte counts. A run must either succeed with the data a direct
// computation gives, or throw moe::error; anything else (a crash, a sanitizer report, a
// hang, another exception, success on inconsistent arguments) aborts.

#include <moe/comm.hpp>

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace moe;
using comm::simulated_world;

[[noreturn]] void fail(char const* what, std::string const& detail = {}) {
  std::fprintf(stderr, "all_to_all_fuzz: %s%s%s\n", what, detail.empty() ? "" : ": ",
               detail.c_str());
  std::abort();
}

/// The byte rank `src` sends rank `dst` at offset `i` of their chunk.
std::byte payload(int src, int dst, std::size_t i) {
  return static_cast<std::byte>(src * 37 + dst * 11 + static_cast<int>(i) * 3 + 1);
}

constexpr std::byte poison{0xa5};

/// A buffer of `size` bytes, or null data for it when `null` (a caller's error).
struct buffer {
  std::vector<std::byte> bytes;
  bool null = false;
  span<std::byte> view() { return {null ? nullptr : bytes.data(), bytes.size()}; }
};

/// Runs `body` on the world; returns whether every rank succeeded. Any exception other
/// than moe::error is a finding.
template <class Body>
bool run_world(simulated_world& world, Body&& body) {
  try {
    world.run(body);
    return true;
  } catch (moe::error const&) {
    return false;
  } catch (std::exception const& e) {
    fail("an exception that is not a moe::error", e.what());
  } catch (...) {
    fail("an exception that is not a std::exception");
  }
}

// --- linear and 2DH all-to-all ------------------------------------------------------------

struct equal_chunks_rank {
  std::size_t send_size = 0, recv_size = 0, scratch_size = 0;
  bool null_send = false, null_recv = false;
};

template <class Collective>
void fuzz_equal_chunks(FuzzedDataProvider& in, comm::topology t) {
  int const p = t.size();
  auto const up = static_cast<std::size_t>(p);
  std::size_t const bytes = in.ConsumeIntegralInRange<std::size_t>(0, 24) * up;
  std::vector<equal_chunks_rank> ranks(static_cast<std::size_t>(p));
  for (auto& r : ranks) {
    r.send_size = bytes;
    r.recv_size = bytes;
    r.scratch_size = Collective::scratch_bytes(bytes, t);
    switch (in.ConsumeIntegralInRange(0, 15)) {  // mostly right
      case 0:
        r.send_size = in.ConsumeIntegralInRange<std::size_t>(0, 100);
        break;
      case 1:
        r.recv_size = in.ConsumeIntegralInRange<std::size_t>(0, 100);
        break;
      case 2:
        r.scratch_size = in.ConsumeIntegralInRange<std::size_t>(0, r.scratch_size);
        break;
      case 3:
        r.null_send = true;
        break;
      case 4:
        r.null_recv = true;
        break;
      case 5:
        r.send_size = r.recv_size = in.ConsumeIntegralInRange<std::size_t>(0, 30) * up;
        r.scratch_size = Collective::scratch_bytes(r.send_size, t);
        break;
      default:
        break;
    }
  }
  // Consistent: every rank sends and receives the same multiple of P bytes, from buffers
  // that are there, with enough scratch.
  std::size_t const agreed = ranks[0].send_size;
  bool consistent = agreed % up == 0;
  for (auto const& r : ranks)
    consistent = consistent && r.send_size == agreed && r.recv_size == agreed &&
                 r.scratch_size >= Collective::scratch_bytes(agreed, t) &&
                 ((!r.null_send && !r.null_recv) || agreed == 0);

  std::vector<buffer> send(static_cast<std::size_t>(p)), recv(send.size()), scratch(send.size());
  for (int rank = 0; rank < p; ++rank) {
    auto const& r = ranks[static_cast<std::size_t>(rank)];
    auto& s = send[static_cast<std::size_t>(rank)];
    s.bytes.resize(r.send_size);
    s.null = r.null_send;
    std::size_t const own_chunk = r.send_size / static_cast<std::size_t>(p);
    for (std::size_t i = 0; i < r.send_size; ++i)
      s.bytes[i] =
          own_chunk ? payload(rank, static_cast<int>(i / own_chunk), i % own_chunk) : std::byte{0};
    recv[static_cast<std::size_t>(rank)].bytes.assign(r.recv_size, poison);
    recv[static_cast<std::size_t>(rank)].null = r.null_recv;
    scratch[static_cast<std::size_t>(rank)].bytes.assign(r.scratch_size, poison);
  }

  simulated_world world(t);
  bool const ok = run_world(world, [&](simulated_world::rank_communicator& c) {
    auto const r = static_cast<std::size_t>(c.rank());
    auto const s = send[r].view();
    Collective::run(host, c, span<std::byte const>(s.data(), s.size()), recv[r].view(),
                    scratch[r].view());
  });
  if (!ok) {
    if (consistent) fail("a consistent all-to-all threw");
    return;
  }
  if (!consistent) fail("an inconsistent all-to-all succeeded");
  std::size_t const own_chunk = agreed / up;
  for (int dst = 0; dst < p; ++dst)
    for (std::size_t i = 0; i < recv[static_cast<std::size_t>(dst)].bytes.size(); ++i) {
      int const src = static_cast<int>(i / own_chunk);
      if (recv[static_cast<std::size_t>(dst)].bytes[i] != payload(src, dst, i % own_chunk))
        fail("wrong data", "rank " + std::to_string(dst) + " byte " + std::to_string(i) +
                               " of the chunk from " + std::to_string(src));
    }
}

// --- all_to_allv --------------------------------------------------------------------------

struct varying_rank {
  std::vector<std::uint64_t> send_bytes;  // what it says it sends each rank
  std::size_t send_size = 0, recv_size = 0;
  std::size_t send_counts = 0, recv_counts = 0;  // sizes of the count spans
  bool null_send = false, null_recv = false, null_send_counts = false, null_recv_counts = false;
};

void fuzz_all_to_allv(FuzzedDataProvider& in, comm::topology t) {
  int const p = t.size();
  auto const up = static_cast<std::size_t>(p);
  std::vector<varying_rank> ranks(up);
  for (auto& r : ranks) {
    r.send_bytes.resize(up);
    for (auto& n : r.send_bytes) n = in.ConsumeIntegralInRange<std::uint64_t>(0, 20);
  }
  bool consistent = true;
  for (std::size_t rank = 0; rank < up; ++rank) {
    auto& r = ranks[rank];
    std::uint64_t sent = 0, received = 0;
    for (std::size_t q = 0; q < up; ++q) {
      sent += r.send_bytes[q];
      received += ranks[q].send_bytes[rank];
    }
    // An earlier rank's huge count (case 8) may be among `received`: allocate little then.
    sent = std::min<std::uint64_t>(sent, 4096);
    received = std::min<std::uint64_t>(received, 4096);
    r.send_size = static_cast<std::size_t>(sent) + in.ConsumeIntegralInRange<std::size_t>(0, 2);
    r.recv_size = static_cast<std::size_t>(received) + in.ConsumeIntegralInRange<std::size_t>(0, 2);
    r.send_counts = r.recv_counts = up;
    switch (in.ConsumeIntegralInRange(0, 19)) {  // mostly right
      case 0:
        r.send_size = in.ConsumeIntegralInRange<std::size_t>(0, sent);
        break;
      case 1:
        r.recv_size = in.ConsumeIntegralInRange<std::size_t>(0, received);
        break;
      case 2:
        r.null_send = true;
        break;
      case 3:
        r.null_recv = true;
        break;
      case 4:
        r.null_send_counts = true;
        break;
      case 5:
        r.null_recv_counts = true;
        break;
      case 6:
        r.send_counts = in.ConsumeIntegralInRange<std::size_t>(0, up + 1);
        break;
      case 7:
        r.recv_counts = in.ConsumeIntegralInRange<std::size_t>(0, up + 1);
        break;
      case 8:  // a count near 2^64: overflows any sum
        r.send_bytes[in.ConsumeIntegralInRange<std::size_t>(0, up - 1)] =
            std::numeric_limits<std::uint64_t>::max() -
            in.ConsumeIntegralInRange<std::uint64_t>(0, 3);
        break;
      default:
        break;
    }
  }
  // Consistency needs every rank's counts final; a huge count breaks the sums.
  for (std::size_t rank = 0; rank < up; ++rank) {
    auto const& r = ranks[rank];
    unsigned __int128 sent = 0, received = 0;
    for (std::size_t q = 0; q < up; ++q) {
      sent += r.send_bytes[q];
      received += ranks[q].send_bytes[rank];
    }
    bool const rank_ok = r.send_counts == up && r.recv_counts == up && !r.null_send_counts &&
                         !r.null_recv_counts && sent <= r.send_size && received <= r.recv_size &&
                         (!r.null_send || r.send_size == 0) && (!r.null_recv || r.recv_size == 0);
    consistent = consistent && rank_ok;
  }

  std::vector<buffer> send(up), recv(up);
  std::vector<std::vector<std::uint64_t>> recv_counts(up);
  for (std::size_t rank = 0; rank < up; ++rank) {
    auto const& r = ranks[rank];
    send[rank].bytes.assign(r.send_size, std::byte{0});
    std::uint64_t offset = 0;
    for (std::size_t q = 0; q < up && r.send_bytes[q] <= 64; ++q) {
      for (std::uint64_t i = 0; i < r.send_bytes[q] && offset + i < r.send_size; ++i)
        send[rank].bytes[offset + i] =
            payload(static_cast<int>(rank), static_cast<int>(q), static_cast<std::size_t>(i));
      offset += r.send_bytes[q];
    }
    send[rank].null = r.null_send;
    recv[rank].bytes.assign(r.recv_size, poison);
    recv[rank].null = r.null_recv;
    recv_counts[rank].assign(r.recv_counts, 0xdeadbeef);
  }

  simulated_world world(t);
  bool const ok = run_world(world, [&](simulated_world::rank_communicator& c) {
    auto const rank = static_cast<std::size_t>(c.rank());
    auto const& r = ranks[rank];
    auto const s = send[rank].view();
    std::vector<std::uint64_t> counts = r.send_bytes;
    counts.resize(r.send_counts);
    comm::all_to_allv::run(
        host, c, span<std::byte const>(s.data(), s.size()),
        span<std::uint64_t const>(r.null_send_counts ? nullptr : counts.data(), counts.size()),
        recv[rank].view(),
        span<std::uint64_t>(r.null_recv_counts ? nullptr : recv_counts[rank].data(),
                            recv_counts[rank].size()));
  });
  if (!ok) {
    if (consistent) fail("a consistent all_to_allv threw");
    return;
  }
  if (!consistent) fail("an inconsistent all_to_allv succeeded");
  for (std::size_t dst = 0; dst < up; ++dst) {
    std::size_t offset = 0;
    for (std::size_t src = 0; src < up; ++src) {
      std::uint64_t const n = ranks[src].send_bytes[dst];
      if (recv_counts[dst][src] != n)
        fail("wrong count", "rank " + std::to_string(dst) + " from " + std::to_string(src));
      for (std::size_t i = 0; i < n; ++i)
        if (recv[dst].bytes[offset + i] != payload(static_cast<int>(src), static_cast<int>(dst), i))
          fail("wrong data", "rank " + std::to_string(dst) + " from " + std::to_string(src));
      offset += static_cast<std::size_t>(n);
    }
    for (std::size_t i = offset; i < recv[dst].bytes.size(); ++i)
      if (recv[dst].bytes[i] != poison) fail("wrote past the received bytes");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  comm::topology const t{.ranks_per_node = in.ConsumeIntegralInRange(1, 4),
                         .nodes = in.ConsumeIntegralInRange(1, 3)};
  switch (in.ConsumeIntegralInRange(0, 2)) {
    case 0:
      fuzz_equal_chunks<comm::linear_all_to_all>(in, t);
      break;
    case 1:
      fuzz_equal_chunks<comm::all_to_all_2dh>(in, t);
      break;
    default:
      fuzz_all_to_allv(in, t);
      break;
  }
  return 0;
}
