// SPDX-License-Identifier: Apache-2.0
// comm::mpi_communicator across real processes (run by mpiexec with 2 and 4 ranks, label
// mpi): its world and topology, the all-to-all collectives over it against the direct
// exchange bit for bit, and the failures that must not hang: a receive nobody sends (a
// timeout naming it), byte counts that differ from the sender's, a device communicator on an
// MPI that cannot move device memory.

#include <moe/comm/all_to_all.hpp>
#include <moe/comm/mpi_communicator.hpp>

#include "../support/mpi.hpp"
#include "../support/random.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace std::chrono_literals;
using moe::comm::mpi_communicator;
using bytes = std::vector<std::byte>;

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}
int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

/// Byte i of the chunk rank `src` sends rank `dst`: a function of all three, so that a chunk
/// that arrives in the wrong place or from the wrong rank shows.
std::byte pattern(int src, int dst, std::size_t i, std::uint64_t seed) {
  std::uint64_t v =
      seed ^ (static_cast<std::uint64_t>(src) << 40) ^ (static_cast<std::uint64_t>(dst) << 20) ^ i;
  v *= 0x9e3779b97f4a7c15ull;
  return static_cast<std::byte>(v >> 56);
}

template <class Collective>
void check_all_to_all(mpi_communicator& comm, std::size_t chunk, std::uint64_t seed) {
  int const p = comm.size(), me = comm.rank();
  bytes send(chunk * p), recv(chunk * p),
      scratch(Collective::scratch_bytes(send.size(), comm.topology()));
  for (int dst = 0; dst < p; ++dst)
    for (std::size_t i = 0; i < chunk; ++i) send[dst * chunk + i] = pattern(me, dst, i, seed);
  moe::test::poison(moe::span<std::byte>(recv));
  Collective::run(moe::host, comm, moe::span<std::byte const>(send), moe::span<std::byte>(recv),
                  moe::span<std::byte>(scratch));
  int wrong = 0;
  for (int src = 0; src < p; ++src)
    for (std::size_t i = 0; i < chunk; ++i)
      wrong += recv[src * chunk + i] != pattern(src, me, i, seed);
  CHECK(wrong == 0);
}

}  // namespace

TEST_CASE("mpi_communicator: the world of the processes, and its nodes") {
  mpi_communicator comm(MPI_COMM_WORLD);
  CHECK(comm.rank() == world_rank());
  CHECK(comm.size() == world_size());
  // mpiexec started every rank on this machine: one node.
  CHECK(comm.topology() == moe::comm::topology{world_size(), 1});
  moe::comm::mpi_node const node = moe::comm::mpi_node_of(MPI_COMM_WORLD);
  CHECK(node.local_rank == world_rank());
  CHECK(node.ranks == world_size());
  std::vector<int> everyone(static_cast<std::size_t>(world_size()));
  for (int r = 0; r < world_size(); ++r) everyone[static_cast<std::size_t>(r)] = r;
  CHECK(node.members == everyone);

  if (world_size() % 2 == 0) {
    mpi_communicator pretend(MPI_COMM_WORLD, {.ranks_per_node = 2});
    CHECK(pretend.topology() == moe::comm::topology{2, world_size() / 2});
  }
  // Rejected on every rank alike, before any communication.
  CHECK_THROWS_WITH_AS(mpi_communicator(MPI_COMM_WORLD, {.ranks_per_node = 3}),
                       doctest::Contains("does not divide the"), moe::invalid_argument);
  CHECK_THROWS_WITH_AS(mpi_communicator(MPI_COMM_WORLD, {.timeout = 0ms}),
                       doctest::Contains("options.timeout"), moe::invalid_argument);
}

TEST_CASE("mpi_communicator: linear, 2DH and all_to_allv equal the direct exchange") {
  std::uint64_t const seed = moe::test::shared_seed();
  INFO("seed " << seed);
  for (int per_node : {0, 1, 2}) {
    if (per_node > 0 && world_size() % per_node != 0) continue;
    CAPTURE(per_node);
    mpi_communicator comm(MPI_COMM_WORLD, {.ranks_per_node = per_node});
    for (std::size_t chunk : {std::size_t{0}, std::size_t{1}, std::size_t{13}, std::size_t{4096}}) {
      CAPTURE(chunk);
      check_all_to_all<moe::comm::linear_all_to_all>(comm, chunk, seed);
      check_all_to_all<moe::comm::all_to_all_2dh>(comm, chunk, seed);
    }
  }

  // all_to_allv: rank s sends rank d (s + 2d) mod 5 chunks of 3 bytes, zero among them.
  mpi_communicator comm(MPI_COMM_WORLD);
  int const p = comm.size(), me = comm.rank();
  auto count = [](int s, int d) { return static_cast<std::uint64_t>((s + 2 * d) % 5) * 3; };
  std::vector<std::uint64_t> send_bytes(p), recv_bytes(p, 7);
  bytes send, recv(64 * p);
  for (int d = 0; d < p; ++d) {
    send_bytes[d] = count(me, d);
    for (std::uint64_t i = 0; i < send_bytes[d]; ++i) send.push_back(pattern(me, d, i, seed));
  }
  moe::comm::all_to_allv::run(moe::host, comm, moe::span<std::byte const>(send),
                              moe::span<std::uint64_t const>(send_bytes),
                              moe::span<std::byte>(recv), moe::span<std::uint64_t>(recv_bytes));
  std::size_t at = 0;
  int wrong = 0;
  for (int s = 0; s < p; ++s) {
    CHECK(recv_bytes[s] == count(s, me));
    for (std::uint64_t i = 0; i < count(s, me); ++i) wrong += recv[at++] != pattern(s, me, i, seed);
  }
  CHECK(wrong == 0);
}

TEST_CASE("mpi_communicator: a receive that no rank sends times out, naming it") {
  {
    mpi_communicator comm(MPI_COMM_WORLD, {.timeout = 300ms});
    if (comm.rank() == 0) {
      std::uint64_t value = 0;
      std::string const expected =
          "receive of 8 bytes from rank " + std::to_string(comm.size() - 1);
      CHECK_THROWS_WITH_AS(comm.recv(&value, sizeof value, comm.size() - 1, nullptr),
                           doctest::Contains(expected.c_str()), moe::timeout_error);
      // The communicator cannot be trusted after that, and says so.
      CHECK_THROWS_WITH_AS(comm.send(&value, sizeof value, 0, nullptr),
                           doctest::Contains("cannot be used again"), moe::error);
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST_CASE("mpi_communicator: a byte count that differs from the sender's is an mpi_error") {
  int const last = world_size() - 1;
  for (std::size_t const sent : {std::size_t{16}, std::size_t{4}}) {
    CAPTURE(sent);
    mpi_communicator comm(MPI_COMM_WORLD, {.timeout = 10s});
    bytes buffer(16);
    if (comm.rank() == last) comm.send(buffer.data(), sent, 0, nullptr);
    if (comm.rank() == 0) {
      // More bytes than received: MPI's truncation; fewer: our count check.
      CHECK_THROWS_AS(comm.recv(buffer.data(), 8, last, nullptr), moe::mpi_error);
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
}

TEST_CASE("device_mpi_communicator: an MPI that cannot move device memory is refused") {
  if (moe::comm::detail::mpi_moves_device_memory()) {
    moe::comm::device_mpi_communicator comm(MPI_COMM_WORLD);
    CHECK(comm.size() == world_size());
  } else {
    CHECK_THROWS_WITH_AS(moe::comm::device_mpi_communicator(MPI_COMM_WORLD),
                         doctest::Contains("not CUDA-aware"), moe::error);
  }
}
