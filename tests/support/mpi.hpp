// SPDX-License-Identifier: Apache-2.0
#pragma once
// What the mpi tests (label mpi, tests/mpi_main.cpp) share.

#include "random.hpp"

#include <moe/comm/detail/mpi.hpp>

#include <cstdint>

namespace moe::test {

/// One seed for every rank of MPI_COMM_WORLD: rank 0's fresh one.
inline std::uint64_t shared_seed() {
  std::uint64_t seed = fresh_seed();
  MPI_Bcast(&seed, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  return seed;
}

}  // namespace moe::test
