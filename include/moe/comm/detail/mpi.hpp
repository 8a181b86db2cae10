// SPDX-License-Identifier: Apache-2.0
#pragma once
// What the MPI headers of the comm room share: mpi.h without the C++ bindings MPI-3 removed,
// the one check of an MPI call's result, and whether the MPI moves device memory.
// Only the MPI standard's C API is used, so any implementation (Open MPI, MPICH) serves.

#include <moe/core/error.hpp>

// Open MPI's and MPICH's mpi.h would otherwise also pull in the removed C++ bindings, which
// do not compile cleanly with -Wextra.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>
#if defined(OPEN_MPI) && __has_include(<mpi-ext.h>)
#include <mpi-ext.h>  // MPIX_Query_cuda_support
#endif

#include <cstddef>
#include <string>

namespace moe::comm::detail {

/// MPI's description of an error code.
inline std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
  return std::string(text, static_cast<std::size_t>(length));
}

/// Throws `moe::mpi_error` naming the MPI call and MPI's description of `code`.
inline void check_mpi(int code, char const* call) {
  if (code == MPI_SUCCESS) return;
  throw mpi_error(code, std::string(call) + " failed: " + mpi_error_string(code));
}

/// Whether this MPI moves device memory itself, as its library says at run time: Open MPI's
/// MPIX_Query_cuda_support, MPICH's MPIX_GPU_query_support. False where it cannot say.
inline bool mpi_moves_device_memory() noexcept {
#if defined(MPIX_CUDA_AWARE_SUPPORT)
  return MPIX_Query_cuda_support() == 1;
#elif defined(MPICH_NUMVERSION) && MPICH_NUMVERSION >= 40000000
  int supported = 0;
  return MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &supported) == MPI_SUCCESS && supported == 1;
#else
  return false;
#endif
}

}  // namespace moe::comm::detail
