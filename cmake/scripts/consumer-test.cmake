# SPDX-License-Identifier: Apache-2.0
#
# The steps of the consumer tests (see moe_add_consumer_test in MoeTesting.cmake):
#
#   -DSTEP=install        -DBUILD_DIR=<moe build> -DPREFIX=<prefix> [-DCONFIG=<cfg>]
#   -DSTEP=archive        -DSOURCE_DIR=<moe source> -DARCHIVE=<file.tar.gz> -DVERSION=<x.y.z>
#   -DSTEP=build_and_run  -DSOURCE_DIR=<consumer project> -DCONSUMER_BUILD=<dir>
#                         -DCACHE=<initial cache> -DGENERATOR=<generator> [-DCONFIG=<cfg>]
#                         [-DPREFIX=<prefix>] [-DTOOLCHAIN=<toolchain file>]
#                         [-DARCHIVE=<moe source archive, for FetchContent>]
#                         [-DHIDE_NCCL=ON] [-DEXPECT_NOTHING_INSTALLED=ON]
#
# `archive` packs the source tree as a release archive would hold it (the files git tracks
# or would track, under moe-<version>/). `build_and_run` configures, builds and runs the
# programs the consumer lists; HIDE_NCCL makes NCCL unfindable, as on a machine without it;
# EXPECT_NOTHING_INSTALLED installs the consumer and fails if that installed anything (moe
# pulled in as a subproject must add no install rules).
#
# Every step starts from empty directories, so stale headers or a cached find result from an
# earlier run cannot make a test pass. The CMake that runs this script is the one that
# configures and builds the consumer.

cmake_minimum_required(VERSION 3.25)
include("${CMAKE_CURRENT_LIST_DIR}/source-files.cmake")

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    string(REPLACE ";" " " command "${ARGN}")
    message(FATAL_ERROR "consumer test: command failed (${result}): ${command}")
  endif()
endfunction()

if(NOT CONFIG)
  set(CONFIG Release)
endif()

if(STEP STREQUAL "install")
  file(REMOVE_RECURSE "${PREFIX}")
  run("${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" --config "${CONFIG}")

elseif(STEP STREQUAL "archive")
  # Only what a release archive holds: no build trees, no editor or tool state.
  find_program(GIT git)
  moe_source_files(files "${SOURCE_DIR}" "${GIT}")

  cmake_path(GET ARCHIVE PARENT_PATH work)
  set(top "moe-${VERSION}")
  file(REMOVE_RECURSE "${work}/${top}" "${ARCHIVE}")
  foreach(file IN LISTS files)
    if(file AND EXISTS "${SOURCE_DIR}/${file}" AND NOT IS_DIRECTORY "${SOURCE_DIR}/${file}")
      cmake_path(GET file PARENT_PATH dir)
      file(COPY "${SOURCE_DIR}/${file}" DESTINATION "${work}/${top}/${dir}")
    endif()
  endforeach()
  run("${CMAKE_COMMAND}" -E chdir "${work}" "${CMAKE_COMMAND}" -E tar czf "${ARCHIVE}" "${top}")
  file(REMOVE_RECURSE "${work}/${top}")

elseif(STEP STREQUAL "build_and_run")
  file(REMOVE_RECURSE "${CONSUMER_BUILD}")
  set(args -S "${SOURCE_DIR}" -B "${CONSUMER_BUILD}" -G "${GENERATOR}" -C "${CACHE}"
    "-DCMAKE_BUILD_TYPE=${CONFIG}"
    # Only the package under test may be found, never a build tree registered elsewhere.
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
  if(PREFIX)
    list(APPEND args "-DCMAKE_PREFIX_PATH=${PREFIX}")
  endif()
  if(TOOLCHAIN)
    list(APPEND args "-DCMAKE_TOOLCHAIN_FILE=${TOOLCHAIN}")
  endif()
  if(ARCHIVE)
    list(APPEND args "-DMOE_ARCHIVE=${ARCHIVE}")
  endif()
  if(HIDE_NCCL)
    list(APPEND args -DCMAKE_DISABLE_FIND_PACKAGE_NCCL=ON -DMOE_CONSUMER_NCCL=OFF)
  endif()
  run("${CMAKE_COMMAND}" ${args})
  run("${CMAKE_COMMAND}" --build "${CONSUMER_BUILD}" --config "${CONFIG}")

  # The project lists the programs it built (per configuration); each must run without a
  # GPU.
  file(STRINGS "${CONSUMER_BUILD}/programs-${CONFIG}.txt" programs)
  if(NOT programs)
    message(FATAL_ERROR "consumer test: the consumer project built no programs")
  endif()
  foreach(program IN LISTS programs)
    run("${program}")
  endforeach()

  if(EXPECT_NOTHING_INSTALLED)
    set(prefix "${CONSUMER_BUILD}/install-check")
    run("${CMAKE_COMMAND}" --install "${CONSUMER_BUILD}" --prefix "${prefix}"
      --config "${CONFIG}")
    file(GLOB_RECURSE installed "${prefix}/*")
    if(installed)
      list(JOIN installed "\n  " installed)
      message(FATAL_ERROR "consumer test: moe as a subproject installed files:\n  ${installed}")
    endif()
  endif()

else()
  message(FATAL_ERROR "consumer-test.cmake: unknown -DSTEP=${STEP}")
endif()
