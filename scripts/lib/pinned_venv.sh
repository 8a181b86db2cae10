# SPDX-License-Identifier: Apache-2.0
#
# Sourced by the scripts that install pinned tools from PyPI into a virtual environment
# (packaging_tools.sh, conformance_tools.sh, plot_load.sh): one way to create the
# environment and to install only what is missing or at another version.
#
#   source scripts/lib/pinned_venv.sh
#   pinned_venv <venv> <label> [pip options --] name==version...

# Creates <venv> if it has no python, then installs the pinned packages unless every one is
# there at its version already (so nothing is downloaded on later runs). Arguments before a
# `--` go to pip install (e.g. --no-build-isolation).
pinned_venv() {
  local venv=$1 label=$2
  shift 2
  local options=() packages=()
  if [[ " $* " == *" -- "* ]]; then
    while [[ $1 != -- ]]; do options+=("$1"); shift; done
    shift
  fi
  packages=("$@")
  if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"  # Debian: python3-venv (scripts/bootstrap.sh installs it)
  fi
  local package missing=()
  for package in "${packages[@]}"; do
    local name=${package%%==*} version=${package#*==}
    if [[ $("$venv/bin/python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p') != \
      "$version" ]]; then
      missing+=("$package")
    fi
  done
  ((${#missing[@]} == 0)) && return 0
  echo "$label: installing ${missing[*]} into $venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check --quiet "${options[@]}" \
    "${packages[@]}"
}
