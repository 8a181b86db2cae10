#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Installs the tools of the packaging tests, at pinned versions, from PyPI into a virtual
# environment: Conan 2 (consumer.conan_create, consumer.conan) and a CMake newer than the
# minimum 3.25 (the consumer.*.cmake-<version> tests; the vcpkg replay and Conan use it too).
# Nothing is downloaded once the pinned versions are there, so it is safe to run every time.
#
#   bash scripts/packaging_tools.sh <dir>     # then configure with
#   cmake ... -DMOE_CONAN=<dir>/bin/conan -DMOE_CONSUMER_CMAKE=<dir>/bin/cmake
set -euo pipefail

conan_version=2.34.0
cmake_version=4.4.5

venv=${1:?usage: packaging_tools.sh <virtual environment directory>}

if [[ ! -x "$venv/bin/python" ]]; then
  # Debian: python3-venv (scripts/bootstrap.sh installs it).
  python3 -m venv "$venv"
fi
installed() { "$venv/bin/python" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
if [[ $(installed conan) != "$conan_version" || $(installed cmake) != "$cmake_version" ]]; then
  echo "packaging tools: installing conan $conan_version and cmake $cmake_version into $venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check --quiet \
    "conan==$conan_version" "cmake==$cmake_version"
fi
