# SPDX-License-Identifier: Apache-2.0
#
# cmake -DSOURCE_DIR=<repo> [-DGIT=<exe>] -P readme-snippets.cmake
#
# Fails unless every marked region of the source tree appears, verbatim, in README.md. A
# region is the lines between a marker line `// example-begin NAME` (or `#` for CMake,
# Python and Conan files) and the next `// example-end`; both markers stand alone on their
# lines, and the region is compared without the begin marker's indentation. So the README's
# snippets are the code ctest builds, and cannot drift from it (STYLE §22).

cmake_minimum_required(VERSION 3.25)
include("${CMAKE_CURRENT_LIST_DIR}/source-files.cmake")

if(NOT EXISTS "${SOURCE_DIR}/README.md")
  message(FATAL_ERROR "readme snippets: no README.md in ${SOURCE_DIR}")
endif()
file(READ "${SOURCE_DIR}/README.md" readme)

moe_source_files(files "${SOURCE_DIR}" "${GIT}")
list(REMOVE_ITEM files README.md)

set(marker "^([ \t]*)(//|#)[ \t]*example-")
set(checked 0)
set(missing "")
foreach(file IN LISTS files)
  if(NOT file OR NOT EXISTS "${SOURCE_DIR}/${file}" OR IS_DIRECTORY "${SOURCE_DIR}/${file}")
    continue()
  endif()
  file(STRINGS "${SOURCE_DIR}/${file}" hits REGEX "${marker}begin" LIMIT_COUNT 1)
  if(NOT hits)
    continue()
  endif()

  # Walked with string(FIND) on the whole text: list commands would break lines that hold
  # semicolons or brackets.
  file(READ "${SOURCE_DIR}/${file}" rest)
  while(TRUE)
    string(FIND "${rest}" "example-begin" at)
    if(at EQUAL -1)
      break()
    endif()
    # The marker's whole line.
    string(SUBSTRING "${rest}" 0 ${at} before)
    string(FIND "${before}" "\n" line_start REVERSE)
    math(EXPR line_start "${line_start} + 1")
    string(SUBSTRING "${rest}" ${line_start} -1 rest)
    string(FIND "${rest}" "\n" line_end)
    if(line_end EQUAL -1)
      break()
    endif()
    string(SUBSTRING "${rest}" 0 ${line_end} line)
    math(EXPR body_start "${line_end} + 1")
    string(SUBSTRING "${rest}" ${body_start} -1 rest)
    if(NOT line MATCHES "${marker}begin[ \t]+([A-Za-z0-9_.-]+)[ \t]*$")
      continue()  # prose that mentions the marker
    endif()
    set(indent "${CMAKE_MATCH_1}")
    set(name "${CMAKE_MATCH_3}")

    # The region runs to the line of the next end marker.
    string(FIND "${rest}" "example-end" end)
    if(end EQUAL -1)
      message(FATAL_ERROR "readme snippets: ${file}: region '${name}' has no example-end")
    endif()
    string(SUBSTRING "${rest}" 0 ${end} region)
    string(FIND "${region}" "\n" last_newline REVERSE)
    math(EXPR region_length "${last_newline} + 1")
    string(SUBSTRING "${region}" 0 ${region_length} region)

    # Without the marker's indentation, whole lines of the README.
    if(NOT indent STREQUAL "")
      string(REPLACE "\n${indent}" "\n" region "\n${region}")
      string(SUBSTRING "${region}" 1 -1 region)
    endif()
    math(EXPR checked "${checked} + 1")
    string(FIND "\n${readme}" "\n${region}" found)
    if(found EQUAL -1)
      string(APPEND missing "\n--- ${file}: ${name}\n${region}")
    else()
      message(STATUS "readme snippets: ${name} (${file}) is in README.md")
    endif()
  endwhile()
endforeach()

if(missing)
  message(FATAL_ERROR "readme snippets: README.md lacks these regions, as the code has them "
    "(copy each into README.md):${missing}")
endif()
if(checked EQUAL 0)
  message(FATAL_ERROR "readme snippets: no marked region found under ${SOURCE_DIR}")
endif()
message(STATUS "readme snippets: ${checked} regions match")
