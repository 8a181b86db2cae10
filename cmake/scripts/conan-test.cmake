# SPDX-License-Identifier: Apache-2.0
#
# The Conan half of the consumer tests (moe_add_consumer_test in MoeTesting.cmake):
#
#   cmake -DCONAN=<conan> -DCONAN_HOME=<dir> -DSOURCE_DIR=<moe> -DWORK_DIR=<dir>
#         -DCMAKE_PROGRAM=<cmake for Conan> -DGENERATOR=<generator>
#         [-DCUDA_COMPILER=<nvcc>] [-DCUDA_ARCHITECTURES=<archs>] -P conan-test.cmake
#
# In a fresh CONAN_HOME (never the user's): `conan profile detect`, every remote disabled
# (CUDA and NCCL come from the system, so nothing may be downloaded), then
# `conan create <moe> -s compiler.cppstd=20`, which packages moe and builds and runs
# test_package/ (copied to WORK_DIR so that nothing is written into the source tree), and
# `conan install tests/consumer`, whose toolchain file the consumer.conan test then builds
# tests/consumer/ with.

cmake_minimum_required(VERSION 3.25)

foreach(input IN ITEMS CONAN CONAN_HOME SOURCE_DIR WORK_DIR CMAKE_PROGRAM GENERATOR)
  if(NOT ${input})
    message(FATAL_ERROR "conan test: -D${input}=... is required")
  endif()
endforeach()

function(conan)
  string(REPLACE ";" " " command "conan ${ARGN}")
  message(STATUS "conan test: ${command}")
  execute_process(COMMAND "${CONAN}" ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "conan test: failed (${result}): ${command}")
  endif()
endfunction()

file(REMOVE_RECURSE "${CONAN_HOME}" "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(ENV{CONAN_HOME} "${CONAN_HOME}")
# The CUDA compiler and architectures of the moe build, for test_package's CMake.
if(CUDA_COMPILER)
  set(ENV{CUDACXX} "${CUDA_COMPILER}")
endif()
if(CUDA_ARCHITECTURES)
  set(ENV{CUDAARCHS} "${CUDA_ARCHITECTURES}")
endif()

conan(profile detect)
conan(remote disable "*")

set(settings -s compiler.cppstd=20
  -c "tools.cmake.cmaketoolchain:generator=${GENERATOR}"
  -c "tools.cmake:cmake_program=${CMAKE_PROGRAM}"
  # No CMakeUserPresets.json beside the conanfiles: the source tree stays untouched.
  -c "tools.cmake.cmaketoolchain:user_presets=")

file(COPY "${SOURCE_DIR}/test_package" DESTINATION "${WORK_DIR}")
conan(create "${SOURCE_DIR}" ${settings} --test-folder "${WORK_DIR}/test_package")
conan(install "${SOURCE_DIR}/tests/consumer" ${settings} --output-folder "${WORK_DIR}/consumer")
