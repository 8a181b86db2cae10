// SPDX-License-Identifier: Apache-2.0
//
// The consumer test's MPI program: moe::mpi brings mpi.h and the MPI library, enough for
// moe's MPI communicator. Run alone, it is an MPI job of one process.
#include <moe/comm/mpi_communicator.hpp>
#include <moe/version.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int size = 0;
  {
    moe::comm::mpi_communicator comm(MPI_COMM_WORLD);
    size = comm.size();
  }
  MPI_Finalize();
  std::printf("moe %s over MPI, %d rank\n", moe::version_string, size);
  return size == 1 ? 0 : 1;
}
