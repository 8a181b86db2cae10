#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Builds and runs the first example, from a fresh clone: dependencies, configure (preset
# `default`, build/), build that one target, run it. Arguments go to the example.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

example=00_train_tiny_moe

bash scripts/bootstrap.sh
cmake --preset default
cmake --build --preset default --target "$example" --parallel "$(nproc)"
exec "build/examples/$example" "$@"
