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

source "$(dirname "${BASH_SOURCE[0]}")/lib/pinned_venv.sh"
pinned_venv "$venv" "packaging tools" "conan==$conan_version" "cmake==$cmake_version"
