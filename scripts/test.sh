#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# The whole check, from a fresh clone: dependencies, configure (preset `ci`, build-ci/),
# build everything, run every test. gpu tests are skipped without a GPU (ctest says so).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/bootstrap.sh
cmake --preset ci
cmake --build --preset ci --parallel "$(nproc)"
ctest --preset ci
