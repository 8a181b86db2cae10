# SPDX-License-Identifier: Apache-2.0
#
# cmake -DSOURCE_DIR=<repo> [-DCLANG_FORMAT=<exe>] [-DGIT=<exe>] -P format-check.cmake
#
# Fails when a C++ file under include/, tests/, examples/ or bench/ differs from what
# clang-format (with the repository's .clang-format) would write. Prints
# "moe-format: skipped" (the test's SKIP_REGULAR_EXPRESSION) when clang-format is absent.
# Fix a failure with:  clang-format -i <files>

if(NOT CLANG_FORMAT OR NOT EXISTS "${CLANG_FORMAT}")
  message(STATUS "moe-format: skipped: clang-format not found")
  return()
endif()

set(pattern "^(include|tests|examples|bench)/.*\\.(hpp|cuh|h|cpp|cu)$")

# Files git tracks or would track: generated and ignored files stay out of the check.
include("${CMAKE_CURRENT_LIST_DIR}/source-files.cmake")
moe_source_files(candidates "${SOURCE_DIR}" "${GIT}")
set(files "")
foreach(file IN LISTS candidates)
  if(file MATCHES "${pattern}" AND EXISTS "${SOURCE_DIR}/${file}")
    list(APPEND files "${file}")
  endif()
endforeach()

list(LENGTH files count)
if(count EQUAL 0)
  message(STATUS "moe-format: no files to check")
  return()
endif()

execute_process(
  COMMAND "${CLANG_FORMAT}" --dry-run --Werror ${files}
  WORKING_DIRECTORY "${SOURCE_DIR}"
  RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "moe-format: the files above need `clang-format -i`")
endif()
message(STATUS "moe-format: ${count} files formatted")
