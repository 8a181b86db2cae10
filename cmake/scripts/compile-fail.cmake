# SPDX-License-Identifier: Apache-2.0
#
# cmake -DBUILD_DIR=<dir> -DTARGET=<target> -DSOURCE=<file.cu> [-DCONFIG=<cfg>]
#       -P compile-fail.cmake
#
# Passes only when building TARGET fails AND an error line of the output matches the regex in
# SOURCE's `// expected-error: "<regex>"` line. A plain WILL_FAIL would also pass on an unrelated
# error (a typo, a missing include), and PASS_REGULAR_EXPRESSION alone would ignore the
# exit status; the test needs both.

foreach(var IN ITEMS BUILD_DIR TARGET SOURCE)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "compile-fail.cmake: -D${var}=... is required")
  endif()
endforeach()

file(STRINGS "${SOURCE}" expectation REGEX "^[ \t]*//[ \t]*expected-error:" LIMIT_COUNT 1)
if(NOT expectation MATCHES "expected-error:[ \t]*\"(.+)\"")
  message(FATAL_ERROR "${SOURCE}: no line  // expected-error: \"<regex>\"")
endif()
set(expected "${CMAKE_MATCH_1}")

set(config_args "")
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(
  COMMAND "${CMAKE_COMMAND}" --build "${BUILD_DIR}" --target "${TARGET}" ${config_args}
  RESULT_VARIABLE result
  OUTPUT_VARIABLE output
  ERROR_VARIABLE output)

if(result EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but it must be rejected with: ${expected}")
endif()
# Match only the compilers' diagnostic lines ("...: error: static assertion failed ..."):
# nvcc and g++ also echo the offending source line, and the static_assert's own text on
# that echo would let an unrelated error on the same line pass. The build tool's echo of
# the command line is excluded the same way.
string(REPLACE ";" "<semicolon>" escaped "${output}")
string(REGEX MATCHALL "[^\n]*error[^\n]*" diagnostics "${escaped}")
list(JOIN diagnostics "\n" diagnostics)
string(REPLACE "<semicolon>" ";" diagnostics "${diagnostics}")
if(NOT diagnostics MATCHES "${expected}")
  message(FATAL_ERROR "${SOURCE} failed to compile, but not with the expected error.\n"
    "expected (regex): ${expected}\n"
    "compiler output:\n${output}")
endif()
message(STATUS "${SOURCE} rejected as expected: ${expected}")
