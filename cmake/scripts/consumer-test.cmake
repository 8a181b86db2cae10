# SPDX-License-Identifier: Apache-2.0
#
# The two steps of the consumer test (see moe_add_consumer_test in MoeTesting.cmake):
#
#   -DSTEP=install        -DBUILD_DIR=<moe build> -DPREFIX=<prefix> [-DCONFIG=<cfg>]
#   -DSTEP=build_and_run  -DPREFIX -DSOURCE_DIR=<tests/consumer> -DCONSUMER_BUILD=<dir>
#                         -DCACHE=<initial cache> -DGENERATOR=<generator> [-DCONFIG=<cfg>]
#
# Both start from empty directories, so stale headers or a cached find result from an
# earlier run cannot make the test pass.

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

elseif(STEP STREQUAL "build_and_run")
  file(REMOVE_RECURSE "${CONSUMER_BUILD}")
  run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${CONSUMER_BUILD}" -G "${GENERATOR}"
    -C "${CACHE}" "-DCMAKE_PREFIX_PATH=${PREFIX}" "-DCMAKE_BUILD_TYPE=${CONFIG}"
    # Only the installed package may be found, never a build tree registered elsewhere.
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
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

else()
  message(FATAL_ERROR "consumer-test.cmake: unknown -DSTEP=${STEP}")
endif()
