// SPDX-License-Identifier: Apache-2.0
#pragma once
// Sharing an ncclUniqueId through MPI, for programs whose ranks are MPI processes:
//
//   share_unique_id_through_mpi(mpi_comm, root)   root creates the id, MPI_Bcast shares it
//   make_nccl_comm(mpi_comm)                      one NCCL rank per MPI rank, same numbering
//
// This header needs NCCL and MPI: link both moe::nccl and moe::mpi, e.g.
//   find_package(moe CONFIG REQUIRED COMPONENTS nccl mpi)
//   target_link_libraries(app PRIVATE moe::nccl moe::mpi)

#include <moe/comm/detail/mpi.hpp>
#include <moe/comm/nccl_bootstrap.hpp>
#include <moe/core/config.hpp>
#include <moe/core/error.hpp>

#include <nccl.h>

#include <string>

namespace moe::comm {

/// Shares one ncclUniqueId among the ranks of `mpi_comm`: rank `root` creates it
/// (ncclGetUniqueId) and broadcasts it (MPI_Bcast). Collective over `mpi_comm`: every rank
/// calls it with the same root. MPI errors become `moe::mpi_error` (where the communicator's
/// error handler returns them rather than aborting, which is not MPI's default).
/// @param mpi_comm an MPI communicator whose ranks will form the NCCL world
/// @param root the rank that creates the id, 0 ≤ root < size of mpi_comm
inline ncclUniqueId share_unique_id_through_mpi(MPI_Comm mpi_comm, int root = 0) {
  int size = 0, rank = 0;
  detail::check_mpi(MPI_Comm_size(mpi_comm, &size), "MPI_Comm_size");
  detail::check_mpi(MPI_Comm_rank(mpi_comm, &rank), "MPI_Comm_rank");
  MOE_EXPECTS(root >= 0 && root < size, "root",
              "must lie in [0, " + std::to_string(size) + "), got " + std::to_string(root));
  // The root's result travels with the id, so that a failure there makes every rank throw
  // instead of leaving the others to join a world that does not exist.
  struct message {
    ncclUniqueId id;
    int result;
  } m{};
  if (rank == root) m.result = static_cast<int>(ncclGetUniqueId(&m.id));
  detail::check_mpi(MPI_Bcast(&m, static_cast<int>(sizeof m), MPI_BYTE, root, mpi_comm),
                    "MPI_Bcast");
  if (m.result != static_cast<int>(ncclSuccess)) {
    auto const result = static_cast<ncclResult_t>(m.result);
    throw nccl_error(m.result, "ncclGetUniqueId(&id) on the root rank", ncclGetErrorString(result));
  }
  return m.id;
}

/// This MPI rank's NCCL communicator over the ranks of `mpi_comm`, with the same rank
/// numbering, on the current CUDA device (set it first, e.g. from the node-local rank).
/// Collective over `mpi_comm`.
inline nccl_comm make_nccl_comm(MPI_Comm mpi_comm) {
  int size = 0, rank = 0;
  detail::check_mpi(MPI_Comm_size(mpi_comm, &size), "MPI_Comm_size");
  detail::check_mpi(MPI_Comm_rank(mpi_comm, &rank), "MPI_Comm_rank");
  return make_nccl_comm(share_unique_id_through_mpi(mpi_comm), size, rank);
}

}  // namespace moe::comm
