# SPDX-License-Identifier: Apache-2.0
#
# include() from a script run with -P:
#
#   moe_source_files(<out> <source dir> <git>)
#
# sets <out> to the files, relative to <source dir>, that git tracks or would track, so that
# generated and ignored files stay out. Outside a git checkout (a source archive), or where
# git lists nothing, it is every file but build trees and .git. Names come as git prints them,
# one a list element; the list may hold an empty last element.

function(moe_source_files out source_dir git)
  set(files "")
  if(git AND EXISTS "${source_dir}/.git")
    execute_process(
      COMMAND "${git}" -C "${source_dir}" ls-files --cached --others --exclude-standard
      RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_QUIET)
    if(result EQUAL 0)
      string(REPLACE "\n" ";" files "${output}")
    endif()
  endif()
  if(NOT files)
    file(GLOB_RECURSE files RELATIVE "${source_dir}" "${source_dir}/*")
    list(FILTER files EXCLUDE REGEX "^(build[^/]*|\\.git)/")
  endif()
  set(${out} "${files}" PARENT_SCOPE)
endfunction()
