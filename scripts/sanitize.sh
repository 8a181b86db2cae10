#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# The host test programs under sanitizers, as scripts/test.sh runs them after the main ctest:
#   asan  core, gating, layout, expert, layer, layer_uneven_tokens, tune and comm tests with
#         AddressSanitizer and UBSan (-fno-sanitize-recover=undefined), Debug,
#         CCCL_ENABLE_ASSERTIONS (mdspan's extent and index checks), in build-asan/;
#   tsan  comm, layer and layer_uneven_tokens tests (the simulated world's threads) with
#         ThreadSanitizer, in build-tsan/.
# Both are host-only builds (no .cu file, no CUDA compiler) without the emulated CUDA
# runtime, whose fibers the sanitizers cannot follow. Only those test programs are built.
#
#   bash scripts/sanitize.sh [asan|tsan]...   # default: both
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs=$(nproc)
((jobs > 2)) && jobs=2  # the sanitizer builds are memory-hungry; CI machines have 2 cores
presets=("$@")
((${#presets[@]} > 0)) || presets=(asan tsan)

for preset in "${presets[@]}"; do
  start=$SECONDS
  echo "sanitize: ${preset}: configure and build"
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset" --parallel "$jobs"
  echo "sanitize: ${preset}: run"
  ctest --preset "$preset"
  echo "sanitize: ${preset}: passed in $((SECONDS - start)) s"
done
