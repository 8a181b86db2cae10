#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# The whole check, from a fresh clone: dependencies, configure (preset `ci`, build-ci/),
# build everything, run every test. gpu tests are skipped without a GPU (ctest says so).
# Then the sanitizer builds of the host tests (scripts/sanitize.sh) and the fuzzers
# (scripts/fuzz.sh).
#
# The packaging tests also need Conan and a second, newer CMake: pinned versions come from
# PyPI into build-ci/tools. MOE_SKIP_PACKAGING_TOOLS=1 (for a machine without PyPI) leaves
# them out, and with them the consumer.conan* and consumer.*.cmake-<version> tests.
#
# The conformance suite (tests/conformance/, labels conformance and cpu) needs torch,
# transformers, Megatron-Core and DeepSpeed: pinned versions come from PyPI into
# build-ci/conformance, installed once per build tree (about 5.6 GB: PyPI's torch brings the
# CUDA libraries). MOE_SKIP_CONFORMANCE=1 leaves the suite out. On 2 cores the suite adds
# about 5 minutes to a fresh run: the install (a few minutes for the first download, about 90
# seconds from a warm pip cache, nothing once installed), moe_conformance_driver (about a
# minute to compile on one core) and the tests (about 40 seconds, conformance.table last).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/bootstrap.sh

tools=$PWD/build-ci/tools
tool_settings=(-DMOE_CONAN= -DMOE_CONSUMER_CMAKE=)
if [[ ${MOE_SKIP_PACKAGING_TOOLS:-0} != 1 ]]; then
  bash scripts/packaging_tools.sh "$tools"
  tool_settings=(-DMOE_CONAN="$tools/bin/conan" -DMOE_CONSUMER_CMAKE="$tools/bin/cmake")
fi

conformance_python=
if [[ ${MOE_SKIP_CONFORMANCE:-0} != 1 ]]; then
  bash scripts/conformance_tools.sh "$PWD/build-ci/conformance"
  conformance_python=$PWD/build-ci/conformance/bin/python
fi
tool_settings+=(-DMOE_CONFORMANCE_PYTHON="$conformance_python")

# The load heat map's matplotlib (scripts/plot_load.sh), for its ctest.
if [[ ${MOE_SKIP_PACKAGING_TOOLS:-0} != 1 ]]; then
  bash scripts/plot_load.sh --install "$PWD/build-ci/tools-plot"
  tool_settings+=(-DMOE_PLOT_PYTHON="$PWD/build-ci/tools-plot/bin/python")
fi

cmake --preset ci "${tool_settings[@]}"
cmake --build --preset ci --parallel "$(nproc)"
# What one layer call costs in launches, library calls and synchronisations, counted on the
# emulated CUDA runtime (tests/emulation/); printed so that every run records it.
if [[ -x build-ci/bench/layer_counts ]]; then
  build-ci/bench/layer_counts
fi
ctest --preset ci

# Hardening: the host tests under AddressSanitizer + UBSan and ThreadSanitizer, then the
# libFuzzer targets from their seed corpora.
bash scripts/sanitize.sh
bash scripts/fuzz.sh
