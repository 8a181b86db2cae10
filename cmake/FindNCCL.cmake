# SPDX-License-Identifier: Apache-2.0
#[=======================================================================[.rst:
FindNCCL
--------

Finds the NVIDIA Collective Communications Library. NCCL ships no CMake package of its
own, so this module is installed beside moe's package configuration.

Hints: ``NCCL_ROOT`` (CMake variable or environment variable, the NCCL prefix),
``NCCL_HOME`` (environment, the spelling NCCL's own build uses), and the CUDA toolkit's
directories when ``find_package(CUDAToolkit)`` ran first (pip/conda and the NVIDIA
containers put NCCL beside the toolkit).

Result variables: ``NCCL_FOUND``, ``NCCL_VERSION`` (from ``nccl.h``), ``NCCL_INCLUDE_DIRS``,
``NCCL_LIBRARIES``. Cache variables: ``NCCL_INCLUDE_DIR``, ``NCCL_LIBRARY``.

Imported target: ``NCCL::nccl``.
#]=======================================================================]

# NCCL_ROOT is honoured by find_path/find_library on its own (policy CMP0074); the
# explicit hints cover the environment spellings and toolkit-relative layouts.
find_path(NCCL_INCLUDE_DIR
  NAMES nccl.h
  HINTS ENV NCCL_ROOT ENV NCCL_HOME ${CUDAToolkit_INCLUDE_DIRS} ${CUDAToolkit_LIBRARY_ROOT}
  PATH_SUFFIXES include
)
find_library(NCCL_LIBRARY
  NAMES nccl
  HINTS ENV NCCL_ROOT ENV NCCL_HOME ${CUDAToolkit_LIBRARY_DIR} ${CUDAToolkit_LIBRARY_ROOT}
  PATH_SUFFIXES lib lib64
)
mark_as_advanced(NCCL_INCLUDE_DIR NCCL_LIBRARY)

# The header is the only place the version is written down; the library's SONAME carries
# only the major version.
if(NCCL_INCLUDE_DIR AND EXISTS "${NCCL_INCLUDE_DIR}/nccl.h")
  file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _nccl_version_lines
    REGEX "^#define[ \t]+NCCL_(MAJOR|MINOR|PATCH)[ \t]+[0-9]+")
  foreach(_nccl_part IN ITEMS MAJOR MINOR PATCH)
    set(NCCL_VERSION_${_nccl_part} "")
    foreach(_nccl_line IN LISTS _nccl_version_lines)
      if(_nccl_line MATCHES "^#define[ \t]+NCCL_${_nccl_part}[ \t]+([0-9]+)")
        set(NCCL_VERSION_${_nccl_part} "${CMAKE_MATCH_1}")
      endif()
    endforeach()
  endforeach()
  if(NOT NCCL_VERSION_MAJOR STREQUAL "")
    set(NCCL_VERSION "${NCCL_VERSION_MAJOR}.${NCCL_VERSION_MINOR}.${NCCL_VERSION_PATCH}")
  endif()
  unset(_nccl_version_lines)
  unset(_nccl_part)
  unset(_nccl_line)
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(NCCL
  REQUIRED_VARS NCCL_LIBRARY NCCL_INCLUDE_DIR
  VERSION_VAR NCCL_VERSION
)

if(NCCL_FOUND)
  set(NCCL_INCLUDE_DIRS "${NCCL_INCLUDE_DIR}")
  set(NCCL_LIBRARIES "${NCCL_LIBRARY}")
  if(NOT TARGET NCCL::nccl)
    add_library(NCCL::nccl UNKNOWN IMPORTED)
    set_target_properties(NCCL::nccl PROPERTIES
      IMPORTED_LOCATION "${NCCL_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}"
    )
  endif()
endif()
