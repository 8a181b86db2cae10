# SPDX-License-Identifier: Apache-2.0
#
# Helpers for moe's own tests, examples and benchmarks. Not installed: consumers never see
# them. Every helper builds against the in-tree `moe` target.
#
#   moe_add_cpu_test(<name> <source>... [LIBRARIES <lib>...] [LABELS <label>...])
#   moe_add_gpu_test(<name> <source>... [LIBRARIES <lib>...] [LABELS <label>...])
#   moe_add_mpi_test(<name> <source>... RANKS <count>... [LIBRARIES <lib>...])
#   moe_add_emulated_test(<name> <source>...)  # the gpu test on the emulated runtime
#   moe_add_compile_fail_test(<file>)
#   moe_add_header_check()        # "every public header compiles on its own"
#   moe_add_format_test()         # clang-format --dry-run --Werror over our sources
#   moe_add_consumer_test()       # find_package, FetchContent, vcpkg and Conan consumers
#   moe_add_readme_test()         # README.md shows the marked regions the consumers build
#   moe_target_defaults(<target>) # warnings, shared CUDA runtime (examples and bench use it)
#
# ctest labels: `cpu` runs anywhere, `gpu` is skipped (not passed) without a CUDA device,
# `compile_fail` checks that misuse is rejected with our message.

include_guard(GLOBAL)

set(MOE_CMAKE_SCRIPTS_DIR "${CMAKE_CURRENT_LIST_DIR}/scripts")

# Tests that run `cmake --build` on this build tree hold this lock: two build tools working
# on one tree at once (ctest -j) corrupt each other's state (.ninja_log, Makefile stamps).
set(_moe_build_tree_lock moe_build_tree)

# Flags for our own binaries only; moe::moe itself imposes no warnings on its consumers.
# MOE_WARNINGS_AS_ERRORS is declared in the root CMakeLists.txt.
if(NOT TARGET moe_dev_options)
  add_library(moe_dev_options INTERFACE)
  # Helper objects that do not link moe (the doctest mains) still build as C++20.
  target_compile_features(moe_dev_options INTERFACE cxx_std_20)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    set(host_warnings -Wall -Wextra)
    if(MOE_WARNINGS_AS_ERRORS)
      list(APPEND host_warnings -Werror)
    endif()
    target_compile_options(moe_dev_options INTERFACE
      "$<$<COMPILE_LANGUAGE:CXX>:${host_warnings}>")
  endif()
  if(CMAKE_CUDA_COMPILER_ID STREQUAL "NVIDIA")
    # -Xcompiler reaches the host compiler for host code; --Werror covers nvcc's own
    # diagnostics (front end and device code).
    set(cuda_warnings -Xcompiler=-Wall,-Wextra)
    if(MOE_WARNINGS_AS_ERRORS)
      list(APPEND cuda_warnings -Xcompiler=-Werror --Werror=all-warnings)
    endif()
    target_compile_options(moe_dev_options INTERFACE
      "$<$<COMPILE_LANGUAGE:CUDA>:${cuda_warnings}>")
  endif()
endif()

# Properties every moe test, example and benchmark shares.
function(moe_target_defaults target)
  set_target_properties(${target} PROPERTIES
    CXX_EXTENSIONS OFF
    CUDA_EXTENSIONS OFF
    # A target with .cu files links the static runtime by default; our binaries also link
    # CUDA::cudart (shared) for their host files, and one process must not carry both.
    CUDA_RUNTIME_LIBRARY Shared)
  target_link_libraries(${target} PRIVATE moe_dev_options)
endfunction()

# Rewriting an unchanged generated file would make every reconfigure rebuild its users.
function(_moe_write_if_changed path content)
  if(EXISTS "${path}")
    file(READ "${path}" old)
    if(old STREQUAL content)
      return()
    endif()
  endif()
  file(WRITE "${path}" "${content}")
endfunction()

# Sets <out_var> to TRUE when <sources> hold CUDA files that cannot be compiled here.
function(_moe_needs_missing_cuda out_var)
  set(${out_var} FALSE PARENT_SCOPE)
  if(NOT CMAKE_CUDA_COMPILER_LOADED)
    foreach(source IN LISTS ARGN)
      if(source MATCHES "\\.cu$")
        set(${out_var} TRUE PARENT_SCOPE)
      endif()
    endforeach()
  endif()
endfunction()

# One object file with doctest's main, shared by every cpu test.
function(_moe_doctest_main_target out_var)
  if(NOT TARGET moe_doctest_main)
    add_library(moe_doctest_main OBJECT "${PROJECT_SOURCE_DIR}/tests/doctest_main.cpp")
    target_link_libraries(moe_doctest_main PUBLIC doctest::doctest)
    moe_target_defaults(moe_doctest_main)
  endif()
  set(${out_var} moe_doctest_main PARENT_SCOPE)
endfunction()

# The gpu tests' main: exit code 77 (ctest "skipped") when there is no usable device.
function(_moe_gpu_main_target out_var)
  if(NOT TARGET moe_gpu_main)
    add_library(moe_gpu_main OBJECT "${PROJECT_SOURCE_DIR}/tests/gpu_main.cpp")
    target_link_libraries(moe_gpu_main PUBLIC doctest::doctest CUDA::cudart)
    moe_target_defaults(moe_gpu_main)
  endif()
  set(${out_var} moe_gpu_main PARENT_SCOPE)
endfunction()

# Shared body of moe_add_cpu_test and moe_add_gpu_test.
function(_moe_add_doctest_executable kind name)
  cmake_parse_arguments(PARSE_ARGV 2 arg "" "" "LIBRARIES;LABELS")
  set(sources ${arg_UNPARSED_ARGUMENTS})
  if(NOT sources)
    message(FATAL_ERROR "moe_add_${kind}_test(${name}): no sources given")
  endif()
  _moe_needs_missing_cuda(skip ${sources})
  if(skip)
    message(STATUS "moe: skipping test ${name}: it has CUDA sources and CUDA is not enabled")
    return()
  endif()

  if(kind STREQUAL "gpu")
    _moe_gpu_main_target(main_target)
  else()
    _moe_doctest_main_target(main_target)
  endif()
  add_executable(${name} ${sources})
  target_link_libraries(${name} PRIVATE ${main_target} moe doctest::doctest CUDA::cudart
    ${arg_LIBRARIES})
  moe_target_defaults(${name})
  add_test(NAME ${name} COMMAND ${name})
  set(labels ${kind} ${arg_LABELS})
  set_tests_properties(${name} PROPERTIES LABELS "${labels}")
endfunction()

#[[ moe_add_cpu_test(<name> <source>... [LIBRARIES <lib>...] [LABELS <label>...])

An executable <name> of doctest cases that needs no GPU, run as ctest test <name> with
label `cpu`. It links moe, doctest and the shared CUDA runtime (host code may ask
cudaGetDeviceCount and fall back to the host backend). Sources are relative to the calling
directory; LIBRARIES adds e.g. moe::nccl.]]
function(moe_add_cpu_test name)
  _moe_add_doctest_executable(cpu ${name} ${ARGN})
endfunction()

#[[ moe_add_gpu_test(<name> <source>... [LIBRARIES <lib>...] [LABELS <label>...])

Like moe_add_cpu_test, label `gpu`, and .cu sources are allowed. Without a usable CUDA
device the test exits 77 and ctest reports it skipped; with MOE_REQUIRE_GPU=1 in the
environment a missing device is a failure instead (use that on the GPU machine).]]
function(moe_add_gpu_test name)
  _moe_add_doctest_executable(gpu ${name} ${ARGN})
  if(TARGET ${name})
    set_tests_properties(${name} PROPERTIES SKIP_RETURN_CODE 77)
  endif()
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "" "LIBRARIES;LABELS")
  if(arg_LIBRARIES)
    message(STATUS "moe: ${name} is not emulated: it links ${arg_LIBRARIES}, which the "
      "emulated runtime does not provide")
  else()
    moe_add_emulated_test(${name} ${arg_UNPARSED_ARGUMENTS})
  endif()
endfunction()

# Open MPI's settings for every mpiexec of the tests (other MPIs ignore them): more ranks than
# cores, root allowed (CI containers run as root), and no single-copy mechanism between
# processes, which containers without ptrace rights refuse.
set(MOE_MPIEXEC_ENVIRONMENT
  "OMPI_MCA_rmaps_base_oversubscribe=1;OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_btl_vader_single_copy_mechanism=none")

#[[ moe_add_mpi_test(<name> <source>... RANKS <count>... [LIBRARIES <lib>...])

An executable <name> of doctest cases with an MPI main (tests/mpi_main.cpp: every rank runs
every case; the exit code is the worst rank's), run under mpiexec once per count as ctest
tests <name>.ranks_<count>, labels `mpi` and `cpu`. More ranks than cores are allowed
(Open MPI: oversubscribe), and so is running as root, as CI containers do. Does nothing
without MPI (moe::mpi).]]
function(moe_add_mpi_test name)
  if(NOT TARGET moe::mpi)
    message(STATUS "moe: skipping mpi test ${name}: no MPI (moe::mpi)")
    return()
  endif()
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "" "RANKS;LIBRARIES")
  if(NOT TARGET moe_mpi_main)
    add_library(moe_mpi_main OBJECT "${PROJECT_SOURCE_DIR}/tests/mpi_main.cpp")
    target_link_libraries(moe_mpi_main PUBLIC doctest::doctest moe::mpi)
    moe_target_defaults(moe_mpi_main)
  endif()
  add_executable(${name} ${arg_UNPARSED_ARGUMENTS})
  target_link_libraries(${name} PRIVATE moe_mpi_main moe::mpi doctest::doctest CUDA::cudart
    ${arg_LIBRARIES})
  moe_target_defaults(${name})
  foreach(ranks IN LISTS arg_RANKS)
    add_test(NAME ${name}.ranks_${ranks}
      COMMAND "${MPIEXEC_EXECUTABLE}" ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${MPIEXEC_PREFLAGS}
        "$<TARGET_FILE:${name}>" ${MPIEXEC_POSTFLAGS})
    set_tests_properties(${name}.ranks_${ranks} PROPERTIES
      LABELS "mpi;cpu"
      PROCESSORS ${ranks}
      TIMEOUT 600
      ENVIRONMENT "${MOE_MPIEXEC_ENVIRONMENT}")
  endforeach()
endfunction()

#[[ moe_add_emulated_test(<name> <source>...)

The gpu test <name> built with the host compiler against the emulated CUDA runtime
(tests/emulation/) as <name>_emulated, and run once per schedule as ctest tests
<name>.emulated.<schedule>, labels `emulated` and `cpu`. The .cu sources are compiled
unchanged, through a generated .cpp that includes each. Does nothing when the emulated
runtime is not built (no Boost.Context).]]
function(moe_add_emulated_test name)
  if(NOT TARGET moe_emulation)
    return()
  endif()
  set(wrappers)
  foreach(source IN LISTS ARGN)
    get_filename_component(path "${source}" ABSOLUTE)
    get_filename_component(stem "${source}" NAME_WE)
    set(wrapper "${CMAKE_CURRENT_BINARY_DIR}/emulated/${name}/${stem}.cpp")
    _moe_write_if_changed("${wrapper}" "#include \"${path}\"\n")
    list(APPEND wrappers "${wrapper}")
  endforeach()
  add_executable(${name}_emulated ${wrappers})
  target_include_directories(${name}_emulated PRIVATE
    "${PROJECT_SOURCE_DIR}/include" "${PROJECT_BINARY_DIR}/include")
  target_link_libraries(${name}_emulated PRIVATE moe_emulated_gpu_main moe_emulation
    doctest::doctest)
  set_target_properties(${name}_emulated PROPERTIES CXX_EXTENSIONS OFF)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${name}_emulated PRIVATE -Wall -Wextra)
  endif()
  foreach(schedule IN LISTS MOE_EMULATION_SCHEDULES)
    string(REPLACE ":" ";" parts "${schedule}")
    list(GET parts 0 schedule_name)
    list(GET parts 1 environment)
    string(REPLACE "," ";" environment "${environment}")
    add_test(NAME ${name}.emulated.${schedule_name} COMMAND ${name}_emulated)
    set_tests_properties(${name}.emulated.${schedule_name} PROPERTIES
      LABELS "emulated;cpu" ENVIRONMENT "${environment}")
  endforeach()
endfunction()

#[[ moe_add_compile_fail_test(<file>)

<file> is tests/compile_fail/<concept>_<case>.cu. Its first line of the form
    // expected-error: "<regex>"
holds a CMake regular expression that one of the compiler's error lines must match (our
static_assert text, not the compiler's wording; the echoed source line does not count).
Compiled with -DMOE_PASSING_TWIN, the same file must build: the `#ifdef MOE_PASSING_TWIN`
one line away proves the error comes from the misuse and not from a typo.

Two targets outside ALL, moe_compile_fail_<stem> and moe_compile_fail_<stem>_twin, and two
ctest tests with label `compile_fail`: compile_fail.<stem> (build fails AND output matches)
and compile_fail.<stem>_twin (build succeeds). Without nvcc the file is compiled as C++.]]
function(moe_add_compile_fail_test file)
  cmake_path(ABSOLUTE_PATH file BASE_DIRECTORY "${CMAKE_CURRENT_SOURCE_DIR}"
    OUTPUT_VARIABLE source)
  cmake_path(GET source STEM stem)
  file(STRINGS "${source}" expectation REGEX "^[ \t]*//[ \t]*expected-error:" LIMIT_COUNT 1)
  if(NOT expectation MATCHES "expected-error:[ \t]*\"(.+)\"")
    message(FATAL_ERROR "${source}: needs a line  // expected-error: \"<regex>\"")
  endif()

  if(NOT CMAKE_CUDA_COMPILER_LOADED AND source MATCHES "\\.cu$")
    # The concept checks are host code; g++ can reject the misuse just as well.
    set_source_files_properties("${source}" PROPERTIES LANGUAGE CXX)
  endif()

  set(target moe_compile_fail_${stem})
  add_library(${target} OBJECT EXCLUDE_FROM_ALL "${source}")
  add_library(${target}_twin OBJECT EXCLUDE_FROM_ALL "${source}")
  target_compile_definitions(${target}_twin PRIVATE MOE_PASSING_TWIN)
  foreach(t IN ITEMS ${target} ${target}_twin)
    target_link_libraries(${t} PRIVATE moe)
    set_target_properties(${t} PROPERTIES CXX_EXTENSIONS OFF CUDA_EXTENSIONS OFF)
  endforeach()

  # The script re-reads the regex from the source, so no quoting of it passes through here.
  add_test(NAME compile_fail.${stem}
    COMMAND "${CMAKE_COMMAND}"
      "-DBUILD_DIR=${PROJECT_BINARY_DIR}" "-DTARGET=${target}" "-DCONFIG=$<CONFIG>"
      "-DSOURCE=${source}"
      -P "${MOE_CMAKE_SCRIPTS_DIR}/compile-fail.cmake")
  add_test(NAME compile_fail.${stem}_twin
    COMMAND "${CMAKE_COMMAND}" --build "${PROJECT_BINARY_DIR}" --target ${target}_twin
      --config "$<CONFIG>")
  set_tests_properties(compile_fail.${stem} compile_fail.${stem}_twin PROPERTIES
    LABELS compile_fail
    RESOURCE_LOCK ${_moe_build_tree_lock})
endfunction()

#[[ moe_add_header_check()

Generates one translation unit per public header that includes it twice (so it must be
self-contained and guarded by #pragma once): .hpp files as .cpp for the host compiler, .cuh
files as .cu for nvcc. They form the OBJECT library moe_headers_self_contained, part of
ALL, so a plain build is the check; ctest's headers.self_contained reports it. The header
list is globbed at configure time with CONFIGURE_DEPENDS, so new headers join by
themselves. Headers with "nccl" in their path are checked only when NCCL was found, and
headers with "mpi" in their name only when MPI was found (moe::mpi).]]
function(moe_add_header_check)
  set(include_dir "${PROJECT_SOURCE_DIR}/include")
  file(GLOB_RECURSE host_headers CONFIGURE_DEPENDS RELATIVE "${include_dir}"
    "${include_dir}/moe/*.hpp")
  file(GLOB_RECURSE cuda_headers CONFIGURE_DEPENDS RELATIVE "${include_dir}"
    "${include_dir}/moe/*.cuh")
  list(APPEND host_headers moe/version.hpp)  # generated, lives in the build tree
  if(NOT CMAKE_CUDA_COMPILER_LOADED)
    set(cuda_headers "")
  endif()
  if(NOT TARGET moe::nccl)
    list(FILTER host_headers EXCLUDE REGEX "nccl")
    list(FILTER cuda_headers EXCLUDE REGEX "nccl")
  endif()
  if(NOT TARGET moe::mpi)
    list(FILTER host_headers EXCLUDE REGEX "(^|/|_)mpi[_.][^/]*$")
  endif()

  set(generated_dir "${CMAKE_CURRENT_BINARY_DIR}/self_contained")
  set(sources "")
  foreach(header IN LISTS host_headers cuda_headers)
    if(header MATCHES "\\.cuh$")
      set(source "${generated_dir}/${header}.cu")
    else()
      set(source "${generated_dir}/${header}.cpp")
    endif()
    _moe_write_if_changed("${source}"
"// Generated by MoeTesting.cmake: ${header} must compile on its own.
#include <${header}>
#include <${header}>  // twice: #pragma once must hold
")
    list(APPEND sources "${source}")
  endforeach()

  add_library(moe_headers_self_contained OBJECT ${sources})
  target_link_libraries(moe_headers_self_contained PRIVATE moe)
  foreach(optional IN ITEMS moe::nccl moe::mpi)
    if(TARGET ${optional})
      target_link_libraries(moe_headers_self_contained PRIVATE ${optional})
    endif()
  endforeach()
  moe_target_defaults(moe_headers_self_contained)

  add_test(NAME headers.self_contained
    COMMAND "${CMAKE_COMMAND}" --build "${PROJECT_BINARY_DIR}"
      --target moe_headers_self_contained --config "$<CONFIG>")
  set_tests_properties(headers.self_contained PROPERTIES
    LABELS cpu
    RESOURCE_LOCK ${_moe_build_tree_lock})
endfunction()

#[[ moe_add_format_test()

ctest `format` (label cpu): clang-format --dry-run --Werror over the C++ files under
include/, tests/, examples/ and bench/ that git tracks or would track (untracked but not
ignored), or all of them outside a git checkout. Skipped when clang-format is missing.
The skip is signalled by output (SKIP_REGULAR_EXPRESSION) because `cmake -P` cannot choose
its exit code before CMake 3.29.]]
function(moe_add_format_test)
  find_program(MOE_CLANG_FORMAT NAMES clang-format clang-format-14
    DOC "clang-format used by the `format` test")
  find_program(MOE_GIT NAMES git DOC "git used by the `format` test to list tracked files")
  mark_as_advanced(MOE_CLANG_FORMAT MOE_GIT)
  add_test(NAME format
    COMMAND "${CMAKE_COMMAND}"
      "-DCLANG_FORMAT=${MOE_CLANG_FORMAT}" "-DGIT=${MOE_GIT}"
      "-DSOURCE_DIR=${PROJECT_SOURCE_DIR}"
      -P "${MOE_CMAKE_SCRIPTS_DIR}/format-check.cmake")
  set_tests_properties(format PROPERTIES
    LABELS cpu
    SKIP_REGULAR_EXPRESSION "moe-format: skipped")
endfunction()

# One consumer test: <cmake> runs consumer-test.cmake's build_and_run step on <project>, in
# <build_root>/<name>, after the fixture <fixture>; ARGN adds -D arguments for the script.
function(_moe_add_consumer_build name cmake project fixture cache build_root)
  add_test(NAME ${name}
    COMMAND "${cmake}" -DSTEP=build_and_run "-DCONFIG=$<CONFIG>"
      "-DSOURCE_DIR=${project}" "-DCONSUMER_BUILD=${build_root}/${name}" "-DCACHE=${cache}"
      "-DGENERATOR=${CMAKE_GENERATOR}" ${ARGN}
      -P "${MOE_CMAKE_SCRIPTS_DIR}/consumer-test.cmake")
  set_tests_properties(${name} PROPERTIES LABELS cpu FIXTURES_REQUIRED ${fixture})
endfunction()

# The fixture <fixture> of consumer builds: test <name> runs consumer-test.cmake's step
# <step>; ARGN adds -D arguments for the script.
function(_moe_add_consumer_fixture name step fixture)
  add_test(NAME ${name}
    COMMAND "${CMAKE_COMMAND}" -DSTEP=${step} ${ARGN}
      -P "${MOE_CMAKE_SCRIPTS_DIR}/consumer-test.cmake")
  set_tests_properties(${name} PROPERTIES LABELS cpu FIXTURES_SETUP ${fixture})
endfunction()

#[[ moe_add_consumer_test()

Proves, by building, each way a stranger consumes moe. Every consumer test configures a
project under tests/consumer/ from scratch, with this build's generator and compilers, builds
it and runs its programs, which need no GPU. Label cpu.

  consumer.install                    `cmake --install` of this build (a fixture)
  consumer.find_package               tests/consumer/: find_package(moe CONFIG REQUIRED)
  consumer.find_package.without_nccl  the same with NCCL unfindable: moe::moe needs none, and
                                      the nccl component fails cleanly
  consumer.source_archive             this source tree packed as a release archive (fixture)
  consumer.fetch_content              tests/consumer/fetch_content/: FetchContent of the
                                      archive; moe adds no tests and no install rules
  consumer.vcpkg_port                 ports/moe/portfile.cmake replayed with plain CMake
                                      (cmake/scripts/vcpkg-replay.cmake), with the nccl
                                      feature when this build found NCCL (fixture)
  consumer.vcpkg                      tests/consumer/ against the tree vcpkg would install
  consumer.conan_create               conan create (conanfile.py, test_package/) and conan
                                      install tests/consumer, offline, in a fresh CONAN_HOME
  consumer.conan                      tests/consumer/ with the toolchain file Conan wrote
  consumer.<name>.cmake-<version>     find_package and fetch_content with MOE_CONSUMER_CMAKE

Two cache variables, empty by default, add tests; scripts/test.sh installs pinned versions
from PyPI into a virtual environment and sets both. MOE_CONSUMER_CMAKE is a second CMake,
newer than the minimum: it repeats the find_package and FetchContent consumers and runs the
vcpkg replay (vcpkg brings a recent CMake of its own) and Conan. MOE_CONAN is the conan
program; its tests need CMake 3.25.2 or newer when CUDA is on, because on 3.25.0/3.25.1 the
C++20 standard that Conan's toolchain file sets breaks CUDA's compiler checks in project(),
before any package could help.]]
function(moe_add_consumer_test)
  set(MOE_CONSUMER_CMAKE "" CACHE FILEPATH
    "A second (newer) CMake that the consumer tests also run with; empty for none")
  set(MOE_CONAN "" CACHE FILEPATH "Conan 2, for the consumer.conan tests; empty for none")
  set(dir "${CMAKE_CURRENT_BINARY_DIR}/consumers")
  set(consumer_source "${PROJECT_SOURCE_DIR}/tests/consumer")

  # What the consumer's configure needs to know about this build (the same compilers, so
  # that the test checks the package and not a different toolchain), as an initial-cache
  # script for `cmake -C`: list values such as several CUDA architectures survive intact.
  set(cache "${CMAKE_CURRENT_BINARY_DIR}/consumer-cache.cmake")
  set(content "# Generated by MoeTesting.cmake: initial cache of the consumer test's project.\n")
  set(entries CMAKE_CXX_COMPILER CMAKE_MAKE_PROGRAM)
  if(CMAKE_CUDA_COMPILER_LOADED)
    list(APPEND entries CMAKE_CUDA_COMPILER CMAKE_CUDA_HOST_COMPILER CMAKE_CUDA_ARCHITECTURES)
  endif()
  if(TARGET moe::nccl)
    list(APPEND entries NCCL_INCLUDE_DIR NCCL_LIBRARY)  # the NCCL this build found
  endif()
  foreach(entry IN LISTS entries)
    if(NOT "${${entry}}" STREQUAL "")
      string(APPEND content "set(${entry} [==[${${entry}}]==] CACHE STRING \"\")\n")
    endif()
  endforeach()
  if(CMAKE_CUDA_COMPILER_LOADED)
    string(APPEND content "set(MOE_CONSUMER_CUDA ON CACHE BOOL \"\")\n")
  else()
    string(APPEND content "set(MOE_CONSUMER_CUDA OFF CACHE BOOL \"\")\n")
  endif()
  foreach(component IN ITEMS nccl mpi)
    string(TOUPPER "${component}" upper)
    if(TARGET moe::${component})
      string(APPEND content "set(MOE_CONSUMER_${upper} ON CACHE BOOL \"\")\n")
    else()
      string(APPEND content "set(MOE_CONSUMER_${upper} OFF CACHE BOOL \"\")\n")
    endif()
  endforeach()
  _moe_write_if_changed("${cache}" "${content}")

  # The CMakes to run the consumers with: this one, and MOE_CONSUMER_CMAKE as <suffix>.
  set(cmakes "${CMAKE_COMMAND}")
  set(suffixes "")
  set(newest_cmake "${CMAKE_COMMAND}")
  set(newest_version "${CMAKE_VERSION}")
  if(MOE_CONSUMER_CMAKE)
    execute_process(COMMAND "${MOE_CONSUMER_CMAKE}" --version
      RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_QUIET)
    if(NOT result EQUAL 0 OR NOT output MATCHES "cmake version ([0-9][0-9.]*)")
      message(FATAL_ERROR "MOE_CONSUMER_CMAKE=${MOE_CONSUMER_CMAKE} is not a working CMake")
    endif()
    list(APPEND cmakes "${MOE_CONSUMER_CMAKE}")
    list(APPEND suffixes ".cmake-${CMAKE_MATCH_1}")
    if(CMAKE_MATCH_1 VERSION_GREATER CMAKE_VERSION)
      set(newest_cmake "${MOE_CONSUMER_CMAKE}")
      set(newest_version "${CMAKE_MATCH_1}")
    endif()
  endif()
  set(suffixes "" ${suffixes})  # this CMake's tests have no suffix

  # --- cmake --install of this build, then find_package ---
  if(MOE_INSTALL)
    set(prefix "${dir}/install-prefix")
    _moe_add_consumer_fixture(consumer.install install moe_consumer_prefix "-DCONFIG=$<CONFIG>"
      "-DBUILD_DIR=${PROJECT_BINARY_DIR}" "-DPREFIX=${prefix}")
    foreach(cmake suffix IN ZIP_LISTS cmakes suffixes)
      _moe_add_consumer_build(consumer.find_package${suffix} "${cmake}" "${consumer_source}"
        moe_consumer_prefix "${cache}" "${dir}" "-DPREFIX=${prefix}")
    endforeach()
    _moe_add_consumer_build(consumer.find_package.without_nccl "${CMAKE_COMMAND}"
      "${consumer_source}" moe_consumer_prefix "${cache}" "${dir}" "-DPREFIX=${prefix}"
      -DHIDE_NCCL=ON)
  else()
    message(STATUS "moe: consumer.install and consumer.find_package* off: MOE_INSTALL is off")
  endif()

  # --- FetchContent of a source archive ---
  set(archive "${dir}/moe-${PROJECT_VERSION}.tar.gz")
  _moe_add_consumer_fixture(consumer.source_archive archive moe_source_archive
    "-DSOURCE_DIR=${PROJECT_SOURCE_DIR}" "-DARCHIVE=${archive}" "-DVERSION=${PROJECT_VERSION}")
  foreach(cmake suffix IN ZIP_LISTS cmakes suffixes)
    _moe_add_consumer_build(consumer.fetch_content${suffix} "${cmake}"
      "${consumer_source}/fetch_content" moe_source_archive "${cache}" "${dir}"
      "-DARCHIVE=${archive}" -DEXPECT_NOTHING_INSTALLED=ON)
  endforeach()

  # --- vcpkg: the port replayed, then find_package against vcpkg's installed tree ---
  if(CMAKE_HOST_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
    set(triplet x64-linux)
  else()
    set(triplet arm64-linux)
  endif()
  set(features "")
  if(TARGET moe::nccl)
    set(features nccl)
  endif()
  add_test(NAME consumer.vcpkg_port
    COMMAND "${newest_cmake}" "-DSOURCE_DIR=${PROJECT_SOURCE_DIR}" "-DWORK_DIR=${dir}/vcpkg"
      "-DTRIPLET=${triplet}" "-DPROJECT_VERSION=${PROJECT_VERSION}"
      "-DGENERATOR=${CMAKE_GENERATOR}" "-DCACHE=${cache}" "-DFEATURES=${features}"
      -P "${MOE_CMAKE_SCRIPTS_DIR}/vcpkg-replay.cmake")
  set_tests_properties(consumer.vcpkg_port PROPERTIES
    LABELS cpu FIXTURES_SETUP moe_vcpkg_installed)
  _moe_add_consumer_build(consumer.vcpkg "${CMAKE_COMMAND}" "${consumer_source}"
    moe_vcpkg_installed "${cache}" "${dir}" "-DPREFIX=${dir}/vcpkg/installed/${triplet}")

  # --- Conan: conan create, then the consumer through conanfile.txt ---
  if(MOE_CONAN AND NOT CMAKE_CUDA_COMPILER_LOADED)
    message(STATUS "moe: Conan tests off: test_package/ needs a CUDA compiler")
  elseif(MOE_CONAN AND newest_version VERSION_LESS 3.25.2)
    message(STATUS "moe: Conan tests off: they need CMake 3.25.2 or newer "
      "(set MOE_CONSUMER_CMAKE to one)")
  elseif(MOE_CONAN)
    add_test(NAME consumer.conan_create
      COMMAND "${CMAKE_COMMAND}" "-DCONAN=${MOE_CONAN}" "-DCONAN_HOME=${dir}/conan-home"
        "-DSOURCE_DIR=${PROJECT_SOURCE_DIR}" "-DWORK_DIR=${dir}/conan"
        "-DCMAKE_PROGRAM=${newest_cmake}" "-DGENERATOR=${CMAKE_GENERATOR}"
        "-DCUDA_COMPILER=${CMAKE_CUDA_COMPILER}" "-DCUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES}"
        -P "${MOE_CMAKE_SCRIPTS_DIR}/conan-test.cmake")
    set_tests_properties(consumer.conan_create PROPERTIES
      LABELS cpu FIXTURES_SETUP moe_conan_package)
    _moe_add_consumer_build(consumer.conan "${newest_cmake}" "${consumer_source}"
      moe_conan_package "${cache}" "${dir}"
      "-DTOOLCHAIN=${dir}/conan/consumer/conan_toolchain.cmake")
  endif()
endfunction()

#[[ moe_add_readme_test()

ctest `readme.snippets` (label cpu): every region of the source tree between a line
`// example-begin <name>` (`#` in CMake, Python and Conan files) and `// example-end` must
appear verbatim in README.md (cmake/scripts/readme-snippets.cmake). The consumer tests build
those regions, so the README shows code that CI builds.]]
function(moe_add_readme_test)
  find_program(MOE_GIT NAMES git DOC "git used by the `format` test to list tracked files")
  add_test(NAME readme.snippets
    COMMAND "${CMAKE_COMMAND}" "-DSOURCE_DIR=${PROJECT_SOURCE_DIR}" "-DGIT=${MOE_GIT}"
      -P "${MOE_CMAKE_SCRIPTS_DIR}/readme-snippets.cmake")
  set_tests_properties(readme.snippets PROPERTIES LABELS cpu)
endfunction()
