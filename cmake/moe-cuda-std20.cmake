# SPDX-License-Identifier: Apache-2.0
#
# Teach CMake 3.25.0/3.25.1 that nvcc speaks C++20.
#
# Those releases know nvcc's flags only up to C++17: `cuda_std_20` is rejected as "not known
# to CUDA compiler" and `CUDA_STANDARD 20` silently decays to C++17, which breaks every .cu
# file that uses concepts. CMake 3.25.2 added the missing entries; this file adds the same
# ones, only where they are missing, so it is a no-op on newer CMake or other compilers.
#
# The variables are directory-scoped and CMake reads them in the directory of the target
# being compiled, so include this after the CUDA language is enabled and before the
# directories that define CUDA targets. moe's root CMakeLists.txt and moe-config.cmake
# (find_package) include it for you. It is idempotent (no include_guard on purpose: a
# project that enables CUDA after find_package(moe) can include it again).

if(CMAKE_VERSION VERSION_LESS 3.25.2
   AND CMAKE_CUDA_COMPILER_ID STREQUAL "NVIDIA"
   AND CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.0)
  # nvcc has no GNU dialect switch: extensions on or off, the flag is the same.
  if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
  endif()
  if(NOT DEFINED CMAKE_CUDA20_EXTENSION_COMPILE_OPTION)
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
  # The feature lists are what target_compile_features() and the generator check.
  if(NOT "cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
    list(APPEND CMAKE_CUDA_COMPILE_FEATURES cuda_std_20)
  endif()
  if(NOT "cuda_std_20" IN_LIST CMAKE_CUDA20_COMPILE_FEATURES)
    list(APPEND CMAKE_CUDA20_COMPILE_FEATURES cuda_std_20)
  endif()
endif()
