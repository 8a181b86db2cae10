# SPDX-License-Identifier: Apache-2.0
#
# Runs ports/moe/portfile.cmake the way `vcpkg install moe[<features>]` would, with plain
# CMake, because vcpkg itself is not available where moe's tests run:
#
#   cmake -DSOURCE_DIR=<moe> -DWORK_DIR=<dir> -DTRIPLET=<x64-linux> -DPROJECT_VERSION=<x.y.z>
#         -DGENERATOR=<generator> [-DCACHE=<initial cache>] [-DFEATURES=nccl[,...]]
#         -P vcpkg-replay.cmake
#
# WORK_DIR is laid out as vcpkg's own tree: buildtrees/moe/ (the build), packages/moe_<triplet>/
# (where the portfile installs) and installed/<triplet>/ (where vcpkg copies the package and
# what its toolchain file puts on CMAKE_PREFIX_PATH; ctest then builds a consumer against it).
#
# The portfile itself is included, unchanged. The vcpkg functions it calls are defined here
# with the behaviour vcpkg documents, reduced to what a release-only, header-only port needs;
# a step they do not cover stops the replay (an unknown command, or a message saying which
# case is missing). Some of vcpkg's post-build checks follow, and two stricter ones: an
# option the portfile passes that moe's CMakeLists.txt ignores is an error (vcpkg warns),
# and so is a vcpkg.json version other than project(moe VERSION). Not replayed: vcpkg's
# toolchain and triplet files (compiler flags), binary caching, and the system checks of
# vcpkg's cuda and nccl ports.

cmake_minimum_required(VERSION 3.25)

foreach(input IN ITEMS SOURCE_DIR WORK_DIR TRIPLET PROJECT_VERSION GENERATOR)
  if(NOT ${input})
    message(FATAL_ERROR "vcpkg replay: -D${input}=... is required")
  endif()
endforeach()

function(replay_fail)
  string(JOIN "" text ${ARGN})
  message(FATAL_ERROR "vcpkg replay: ${text}")
endfunction()

# --- vcpkg.json and the variables vcpkg gives a portfile ---------------------------------

set(PORT moe)
set(CURRENT_PORT_DIR "${SOURCE_DIR}/ports/${PORT}")
file(READ "${CURRENT_PORT_DIR}/vcpkg.json" manifest)
string(JSON manifest_name GET "${manifest}" name)
string(JSON VERSION GET "${manifest}" version)
if(NOT manifest_name STREQUAL PORT)
  replay_fail("vcpkg.json names the port '${manifest_name}', not '${PORT}'")
endif()
if(NOT VERSION STREQUAL PROJECT_VERSION)
  replay_fail("vcpkg.json has version ${VERSION} but CMakeLists.txt has project(moe VERSION "
    "${PROJECT_VERSION}), the one to copy")
endif()

# The portfile calls vcpkg_cmake_* functions: the helper ports must be host dependencies.
string(JSON dependency_count LENGTH "${manifest}" dependencies)
set(host_dependencies "")
math(EXPR last "${dependency_count} - 1")
foreach(i RANGE ${last})
  string(JSON type TYPE "${manifest}" dependencies ${i})
  if(type STREQUAL "OBJECT")
    string(JSON name GET "${manifest}" dependencies ${i} name)
    string(JSON host ERROR_VARIABLE no_host GET "${manifest}" dependencies ${i} host)
    if(NOT no_host AND host)
      list(APPEND host_dependencies "${name}")
    endif()
  endif()
endforeach()
foreach(helper IN ITEMS vcpkg-cmake vcpkg-cmake-config)
  if(NOT helper IN_LIST host_dependencies)
    replay_fail("vcpkg.json must list {\"name\": \"${helper}\", \"host\": true}")
  endif()
endforeach()

string(REPLACE "," ";" requested "${FEATURES}")
set(FEATURES core)
foreach(feature IN LISTS requested)
  string(JSON description ERROR_VARIABLE missing GET "${manifest}" features ${feature} description)
  if(missing)
    replay_fail("vcpkg.json declares no feature '${feature}'")
  endif()
  list(APPEND FEATURES ${feature})
endforeach()

set(TARGET_TRIPLET "${TRIPLET}")
string(REGEX REPLACE "-.*" "" VCPKG_TARGET_ARCHITECTURE "${TRIPLET}")
set(VCPKG_TARGET_IS_LINUX ON)
set(VCPKG_CMAKE_SYSTEM_NAME Linux)
set(VCPKG_LIBRARY_LINKAGE static)
set(VCPKG_CRT_LINKAGE dynamic)
set(CURRENT_BUILDTREES_DIR "${WORK_DIR}/buildtrees/${PORT}")
set(CURRENT_PACKAGES_DIR "${WORK_DIR}/packages/${PORT}_${TARGET_TRIPLET}")
set(CURRENT_INSTALLED_DIR "${WORK_DIR}/installed/${TARGET_TRIPLET}")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${CURRENT_BUILDTREES_DIR}" "${CURRENT_PACKAGES_DIR}"
  "${CURRENT_INSTALLED_DIR}")

# --- the vcpkg functions the portfile uses ------------------------------------------------

# -D<var>=ON/OFF for each (feature, var) pair, from whether the feature was requested.
function(vcpkg_check_features)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "OUT_FEATURE_OPTIONS;PREFIX"
    "FEATURES;INVERTED_FEATURES")
  set(options "")
  foreach(kind IN ITEMS FEATURES INVERTED_FEATURES)
    set(pairs ${arg_${kind}})
    list(LENGTH pairs count)
    math(EXPR odd "${count} % 2")
    if(odd)
      replay_fail("vcpkg_check_features: ${kind} needs <feature> <variable> pairs")
    endif()
    while(pairs)
      list(POP_FRONT pairs feature variable)
      string(JSON description ERROR_VARIABLE missing GET "${manifest}" features ${feature}
        description)
      if(missing)
        replay_fail("vcpkg_check_features: vcpkg.json declares no feature '${feature}'")
      endif()
      set(value OFF)
      if(feature IN_LIST FEATURES)
        set(value ON)
      endif()
      if(kind STREQUAL "INVERTED_FEATURES")
        if(value)
          set(value OFF)
        else()
          set(value ON)
        endif()
      endif()
      list(APPEND options "-D${variable}=${value}")
      if(arg_PREFIX)
        set(${arg_PREFIX}_${variable} ${value} PARENT_SCOPE)
      else()
        set(${variable} ${value} PARENT_SCOPE)
      endif()
    endwhile()
  endforeach()
  set(${arg_OUT_FEATURE_OPTIONS} "${options}" PARENT_SCOPE)
endfunction()

# Configures the release build in buildtrees/<port>/<triplet>-rel with the options vcpkg
# adds that matter to an install (prefix, build type, library directories, no package
# registry, no downloads), then the portfile's.
function(vcpkg_cmake_configure)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "SOURCE_PATH;GENERATOR"
    "OPTIONS;OPTIONS_RELEASE;OPTIONS_DEBUG;MAYBE_UNUSED_VARIABLES")
  if(NOT VCPKG_BUILD_TYPE STREQUAL "release")
    replay_fail("only release-only ports are replayed; set(VCPKG_BUILD_TYPE release) first")
  endif()
  set(build "${CURRENT_BUILDTREES_DIR}/${TARGET_TRIPLET}-rel")
  set_property(GLOBAL PROPERTY replay_build_dir "${build}")
  set(generator "${GENERATOR}")
  if(arg_GENERATOR)
    set(generator "${arg_GENERATOR}")
  endif()
  set(cache_args "")
  if(CACHE)
    set(cache_args -C "${CACHE}")
  endif()
  execute_process(
    COMMAND "${CMAKE_COMMAND}" -S "${arg_SOURCE_PATH}" -B "${build}" -G "${generator}"
      ${cache_args}
      "-DCMAKE_INSTALL_PREFIX=${CURRENT_PACKAGES_DIR}" -DCMAKE_BUILD_TYPE=Release
      -DBUILD_SHARED_LIBS=OFF -DCMAKE_INSTALL_LIBDIR:STRING=lib
      -DCMAKE_INSTALL_BINDIR:STRING=bin -DFETCHCONTENT_FULLY_DISCONNECTED=ON
      -DCMAKE_EXPORT_NO_PACKAGE_REGISTRY=ON -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON
      "-DCMAKE_PREFIX_PATH=${CURRENT_INSTALLED_DIR}"
      ${arg_OPTIONS} ${arg_OPTIONS_RELEASE}
    RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message("${out}${err}")
  if(NOT result EQUAL 0)
    replay_fail("vcpkg_cmake_configure: configuring moe failed (${result})")
  endif()

  # CMake lists the -D variables nobody read; vcpkg reports the portfile's among them.
  if(err MATCHES "Manually-specified variables were not used by the project:\n\n(([ ]+[^\n]+\n)+)")
    string(REGEX REPLACE "[ \n]+" ";" unused "${CMAKE_MATCH_1}")
    foreach(option IN LISTS arg_OPTIONS arg_OPTIONS_RELEASE)
      if(option MATCHES "^-D([^:=]+)")
        set(name "${CMAKE_MATCH_1}")
        if(name IN_LIST unused AND NOT name IN_LIST arg_MAYBE_UNUSED_VARIABLES)
          replay_fail("the portfile passes -D${name}, which moe's CMakeLists.txt never reads")
        endif()
      endif()
    endforeach()
  endif()
endfunction()

function(vcpkg_cmake_install)
  get_property(build GLOBAL PROPERTY replay_build_dir)
  if(NOT build)
    replay_fail("vcpkg_cmake_install before vcpkg_cmake_configure")
  endif()
  execute_process(COMMAND "${CMAKE_COMMAND}" --build "${build}" --target install --config Release
    RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    replay_fail("vcpkg_cmake_install: building the install target failed (${result})")
  endif()
endfunction()

# vcpkg moves CONFIG_PATH to share/<package> and rewrites the paths in it; a port that
# installs there in the first place (as moe's does) needs neither, and is all this covers.
function(vcpkg_cmake_config_fixup)
  cmake_parse_arguments(PARSE_ARGV 0 arg "DO_NOT_DELETE_PARENT_CONFIG_PATH;NO_PREFIX_CORRECTION"
    "PACKAGE_NAME;CONFIG_PATH;TOOLS_PATH" "")
  if(NOT arg_PACKAGE_NAME)
    set(arg_PACKAGE_NAME "${PORT}")
  endif()
  if(NOT arg_CONFIG_PATH)
    set(arg_CONFIG_PATH "share/${arg_PACKAGE_NAME}")
  endif()
  if(NOT arg_CONFIG_PATH STREQUAL "share/${arg_PACKAGE_NAME}")
    replay_fail("vcpkg_cmake_config_fixup: moving ${arg_CONFIG_PATH} is not replayed; install "
      "the package files to share/${arg_PACKAGE_NAME}")
  endif()
  set(dir "${CURRENT_PACKAGES_DIR}/${arg_CONFIG_PATH}")
  file(GLOB configs "${dir}/*[Cc]onfig.cmake")
  if(NOT configs)
    replay_fail("vcpkg_cmake_config_fixup: no *config.cmake in ${arg_CONFIG_PATH}")
  endif()
  if(EXISTS "${CURRENT_PACKAGES_DIR}/debug")
    replay_fail("vcpkg_cmake_config_fixup: a debug tree to merge, in a release-only port")
  endif()
endfunction()

function(vcpkg_install_copyright)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "COMMENT" "FILE_LIST")
  set(text "")
  if(arg_COMMENT)
    string(APPEND text "${arg_COMMENT}\n\n")
  endif()
  foreach(file IN LISTS arg_FILE_LIST)
    file(READ "${file}" content)
    string(APPEND text "${content}")
  endforeach()
  file(WRITE "${CURRENT_PACKAGES_DIR}/share/${PORT}/copyright" "${text}")
endfunction()

# --- the port ----------------------------------------------------------------------------

string(REPLACE ";" "," feature_list "${FEATURES}")
message(STATUS "vcpkg replay: ${PORT}[${feature_list}]:${TARGET_TRIPLET} ${VERSION}")
include("${CURRENT_PORT_DIR}/portfile.cmake")

# --- post-build checks, then vcpkg's install step ----------------------------------------

set(share "${CURRENT_PACKAGES_DIR}/share/${PORT}")
foreach(file IN ITEMS copyright usage moe-config.cmake moe-config-version.cmake)
  if(NOT EXISTS "${share}/${file}")
    replay_fail("the package lacks share/${PORT}/${file}")
  endif()
endforeach()
file(GLOB_RECURSE headers "${CURRENT_PACKAGES_DIR}/include/moe/*.hpp")
if(NOT headers)
  replay_fail("the package has no headers in include/moe/")
endif()
foreach(dir IN ITEMS debug lib bin share/cmake)
  if(EXISTS "${CURRENT_PACKAGES_DIR}/${dir}")
    replay_fail("a header-only package has no ${dir}/ (vcpkg's post-build checks)")
  endif()
endforeach()

file(STRINGS "${share}/moe-config-version.cmake" version_line
  REGEX "set\\(PACKAGE_VERSION \"[^\"]*\"\\)")
if(NOT version_line MATCHES "\"${VERSION}\"")
  replay_fail("the package's moe-config-version.cmake says ${version_line}, vcpkg.json ${VERSION}")
endif()

# The package must be relocatable: vcpkg copies it, users move the whole tree.
string(REGEX REPLACE "([][+.*?()^$|\\])" "\\\\\\1" work_regex "${WORK_DIR}")
string(REGEX REPLACE "([][+.*?()^$|\\])" "\\\\\\1" source_regex "${SOURCE_DIR}/")
file(GLOB_RECURSE files "${CURRENT_PACKAGES_DIR}/*")
foreach(file IN LISTS files)
  file(STRINGS "${file}" absolute REGEX "${work_regex}|${source_regex}")
  if(absolute)
    replay_fail("${file} holds an absolute path of the build: ${absolute}")
  endif()
endforeach()

file(COPY "${CURRENT_PACKAGES_DIR}/" DESTINATION "${CURRENT_INSTALLED_DIR}")
message(STATUS "vcpkg replay: installed to ${CURRENT_INSTALLED_DIR}")
