#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Builds the libFuzzer targets of tests/fuzz/ with clang++ (in build-fuzz/) and runs each for
# a bounded number of executions, two side by side, as scripts/test.sh does after the
# sanitizer stage. Each run
# starts from a copy of its seed corpus (tests/fuzz/corpus/<target>/), so that nothing is
# written into the tree; what it finds (crash-*, timeout-*, leak-*, oom-* files) lands in
# build-fuzz/findings/<target>/ and fails the script. libFuzzer's last status line gives
# the coverage (cov:, ft:) and the speed (exec/s).
#
#   bash scripts/fuzz.sh [target]...   # default: every target
#
#   MOE_FUZZ_RUNS     executions per target (default: 100000 for layer_args_fuzz, 30000 for
#                     all_to_all_fuzz, about a minute each on one core); with a fixed seed a
#                     bounded count, not a bounded time, makes a run mutate the same inputs
#                     on a slow machine as on a fast one
#   MOE_FUZZ_SECONDS  a time limit per target on top of that (default 180)
#   MOE_FUZZ_SEED     libFuzzer's seed (default 1)
#
# To reproduce a finding: build-fuzz/<target> <file>. To keep an input as a regression
# case, copy it into tests/fuzz/corpus/<target>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${MOE_FUZZ_SECONDS:-180}
declare -A default_runs=([layer_args_fuzz]=100000 [all_to_all_fuzz]=30000)
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

# The targets run side by side, one per core (at most two), each for $seconds.
pids=()
for target in "${targets[@]}"; do
  corpus=build-fuzz/corpus/$target
  findings=build-fuzz/findings/$target
  rm -rf "$corpus" "$findings"
  mkdir -p "$corpus" "$findings"
  cp tests/fuzz/corpus/"$target"/* "$corpus"/
  runs=${MOE_FUZZ_RUNS:-${default_runs[$target]:-20000}}
  echo "fuzz: ${target}: ${runs} executions (at most ${seconds} s) from $(ls "$corpus" | wc -l) seed inputs"
  # -timeout: an input that runs 30 s is a hang (the targets cap each input's work far below
  # that). -seed and -runs: the same mutations on every run, so that CI does not find
  # something new by chance on one run and not the next (the simulated world's threads can
  # still vary the coverage a little). The regression inputs in the seed corpus run first,
  # as every seed does.
  build-fuzz/"$target" "$corpus" -runs="$runs" -max_total_time="$seconds" -timeout=30 \
    -max_len=512 -seed="${MOE_FUZZ_SEED:-1}" \
    -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$findings/" \
    >"build-fuzz/$target.log" 2>&1 &
  pids+=($!)
  if ((${#pids[@]} >= jobs)); then
    wait "${pids[0]}" || true  # the status is read from the log and the findings below
    pids=("${pids[@]:1}")
  fi
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || true; done
for target in "${targets[@]}"; do
  log=build-fuzz/$target.log
  findings=build-fuzz/findings/$target
  echo "fuzz: ${target}:"
  # libFuzzer's last status line (DONE) gives where coverage and speed ended.
  grep -E '^#[0-9]+' "$log" | tail -n 2 || true
  grep -E '^stat::' "$log" || true
  if ! grep -qE '^#[0-9]+[[:space:]]+DONE' "$log" || compgen -G "$findings/*" >/dev/null; then
    echo "fuzz: ${target} found a problem; its log:" >&2
    tail -n 60 "$log" >&2
    ls -l "$findings" >&2
    failed=1
  fi
done
((failed == 0)) || exit 1
echo "fuzz: passed in $((SECONDS - start)) s"
