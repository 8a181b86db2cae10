// SPDX-License-Identifier: Apache-2.0
//
// The main() of the mpi tests (label mpi), run by mpiexec: every rank runs every test case,
// in the same order, so that the ranks meet in their communication. Every rank reports its
// failures, rank 0 the summary; the exit code is the worst rank's.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <moe/comm/detail/mpi.hpp>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int result = 0;
  {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    doctest::Context context(argc, argv);
    context.setOption("no-colors", true);
    context.setOption("minimal", rank != 0);  // every rank's failures, one summary
    result = context.run();
  }
  int worst = result;
  MPI_Allreduce(&result, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
