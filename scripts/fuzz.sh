#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Builds the libFuzzer targets of tests/fuzz/ with clang++ (in build-fuzz/) and runs each for
# a bounded time, as scripts/test.sh does after the main ctest. Each run starts from a copy
# of its seed corpus (tests/fuzz/corpus/<target>/), so that nothing is written into the
# tree; what it finds (crash-*, timeout-*, leak-*, oom-* files) lands in
# build-fuzz/findings/<target>/ and fails the script. libFuzzer's last status line gives
# the coverage (cov:, ft:) and the speed (exec/s).
#
#   MOE_FUZZ_SECONDS=60 bash scripts/fuzz.sh [target]...   # default: every target, 60 s
#
# To reproduce a finding: build-fuzz/<target> <file>. To keep an input as a regression
# case, copy it into tests/fuzz/corpus/<target>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${MOE_FUZZ_SECONDS:-60}
targets=("$@")
((${#targets[@]} > 0)) || targets=(layer_args_fuzz all_to_all_fuzz)
jobs=$(nproc)
((jobs > 2)) && jobs=2

cxx=${MOE_FUZZ_CXX:-$(command -v clang++ || command -v clang++-14 || true)}
if [[ -z $cxx ]]; then
  echo "fuzz: clang++ not found (Debian: clang; scripts/bootstrap.sh installs it)" >&2
  exit 1
fi

start=$SECONDS
cmake -S tests/fuzz -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER="$cxx" >/dev/null
cmake --build build-fuzz --parallel "$jobs" --target "${targets[@]}"
echo "fuzz: built in $((SECONDS - start)) s"

for target in "${targets[@]}"; do
  corpus=build-fuzz/corpus/$target
  findings=build-fuzz/findings/$target
  rm -rf "$corpus" "$findings"
  mkdir -p "$corpus" "$findings"
  cp tests/fuzz/corpus/"$target"/* "$corpus"/
  echo "fuzz: ${target}: ${seconds} s from $(ls "$corpus" | wc -l) seed inputs"
  status=0
  # -timeout: an input that runs 10 s is a hang. The regression inputs in the seed corpus
  # run first, as every seed does.
  build-fuzz/"$target" "$corpus" -max_total_time="$seconds" -timeout=10 -max_len=512 \
    -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$findings/" \
    >"build-fuzz/$target.log" 2>&1 || status=$?
  # The status lines: the last few show where coverage and speed ended.
  grep -E '^#[0-9]+' "build-fuzz/$target.log" | tail -n 3 || true
  grep -E '^stat::' "build-fuzz/$target.log" || true
  if ((status != 0)) || compgen -G "$findings/*" >/dev/null; then
    echo "fuzz: ${target} found a problem (exit ${status}); its log:" >&2
    tail -n 60 "build-fuzz/$target.log" >&2
    ls -l "$findings" >&2
    exit 1
  fi
done
echo "fuzz: passed in $((SECONDS - start)) s"
