#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# The whole check on a machine with an NVIDIA GPU, in one command (about 9 minutes on one
# H100 or H200 with 16 cores): build the gpu tests and benchmarks for the GPU present, run
# the gpu tests (MOE_REQUIRE_GPU=1: a missing device fails), run compute-sanitizer's
# memcheck, racecheck and synccheck over every gpu test program, run the benchmarks with
# JSON output, and print a summary table last. Without a GPU it builds, says so and exits 0.
#
#   scripts/gpu_check.sh [output folder (default: $OUT, else build-gpu/gpu_check)]
#
# doctest and Google Benchmark come from the system, or from .devdeps/ where a machine has
# no package manager (see ../shared/DEVICE.md). Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

out=${1:-${OUT:-build-gpu/gpu_check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
build="build-gpu"
jobs=$(nproc)
started=$(date +%s)
declare -a rows=()
failed=0

row() {  # step, result, seconds, detail
  rows+=("$(printf '| %-34s | %-7s | %5s | %s' "$1" "$2" "$3" "$4")")
  [[ $2 == pass || $2 == skip ]] || failed=1
}

# Every step stops at its own limit and at the run's deadline (about 9 minutes in all); a
# step with no time left is reported as skipped.
deadline=$((started + ${MOE_GPU_CHECK_SECONDS:-530}))
left() { echo $((deadline - $(date +%s))); }
limit_of() { local l; l=$(left); ((l < $1)) && echo "$l" || echo "$1"; }

timed() {  # seconds-limit log command... ; sets $rc and $took
  local limit log=$2
  limit=$(limit_of "$1")
  shift 2
  if ((limit < 5)); then
    rc=125 took=0
    echo "no time left" >"$log"
    return
  fi
  local t0
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  took=$(($(date +%s) - t0))
}

prefix=()
if [[ -d .devdeps/usr ]]; then
  prefix=(-DCMAKE_PREFIX_PATH="$PWD/.devdeps/usr")
  export LD_LIBRARY_PATH="$PWD/.devdeps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
arch=90
[[ $gpu == 1 ]] && arch=native

# --- build -------------------------------------------------------------------------------
timed 420 "$out/configure.log" cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" -DMOE_BUILD_TESTS=ON -DMOE_BUILD_BENCHMARKS=ON \
  -DMOE_BUILD_EXAMPLES=OFF -DMOE_INSTALL=OFF -DMOE_CONAN= -DMOE_CONSUMER_CMAKE= "${prefix[@]}"
if [[ $rc != 0 ]]; then
  row configure fail "$took" "$out/configure.log"
else
  programs=$(cd "$build" && ctest -N -L '^gpu$' | sed -n 's/^ *Test *#[0-9]*: //p')
  benches=$(cd "$build" && ninja -t targets all 2>/dev/null | sed -n 's/^\([a-z_]*_bench\): .*/\1/p' | sort -u)
  # shellcheck disable=SC2086
  timed 480 "$out/build.log" cmake --build "$build" --parallel "$jobs" --target $programs $benches
  if [[ $rc == 0 ]]; then row "build (sm $arch)" pass "$took" "$(echo $programs $benches | wc -w) targets"
  else row "build (sm $arch)" fail "$took" "$out/build.log"; fi
fi

if [[ $gpu == 0 ]]; then
  printf '\n%s\n' "${rows[@]}"
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none): built only; run it on a GPU machine."
  exit 0
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/gpu.txt" 2>&1

# --- gpu tests ---------------------------------------------------------------------------
timed 240 "$out/ctest.log" env MOE_REQUIRE_GPU=1 ctest --test-dir "$build" -L '^gpu$' \
  --output-on-failure --parallel 2
summary=$(grep -E 'tests passed|tests failed' "$out/ctest.log" | tail -1)
row "ctest -L gpu (MOE_REQUIRE_GPU=1)" "$([[ $rc == 0 ]] && echo pass || echo fail)" "$took" "$summary"

# --- compute-sanitizer: each tool over each program, 8 at a time --------------------------
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
sanitizer_limit=$(limit_of 110)
if ((sanitizer_limit < 5)); then
  row compute-sanitizer skip 0 "no time left"
elif [[ -x $sanitizer ]]; then
  t0=$(date +%s)
  rm -f "$out/sanitizer.results"
  for tool in memcheck racecheck synccheck; do
    for program in $programs; do
      echo "$tool $program"
    done
  done | xargs -P 8 -L 1 bash -c '
    tool=$0 program=$1
    MOE_REQUIRE_GPU=1 timeout --kill-after=10 '"$sanitizer_limit"' "'"$sanitizer"'" --tool "$tool" --error-exitcode 3 \
      "'"$build"'/tests/$program" >"'"$out"'/sanitizer.$tool.$program.log" 2>&1
    echo "$tool $program $?" >>"'"$out"'/sanitizer.results"'
  took=$(($(date +%s) - t0))
  while read -r tool program code; do
    case $code in
      0) result=pass ;; 124 | 137) result=timeout ;; 3) result=fail ;; *) result=error ;;
    esac
    errors=$(grep -m1 -E 'ERROR SUMMARY' "$out/sanitizer.$tool.$program.log" || true)
    row "$tool $program" "$result" "-" "$errors"
  done < <(sort "$out/sanitizer.results" 2>/dev/null)
  row "compute-sanitizer (all)" pass "$took" "logs: $out/sanitizer.*.log"
else
  row compute-sanitizer fail 0 "not found"
fi

# --- benchmarks, JSON ----------------------------------------------------------------------
for bench in $benches; do
  timed 60 "$out/$bench.log" "$build/bench/$bench" --benchmark_min_time=0.02 \
    --benchmark_out="$out/$bench.json" --benchmark_out_format=json
  result=$([[ $rc == 0 ]] && echo pass || echo fail)
  [[ $rc == 124 || $rc == 137 ]] && result=timeout
  [[ $rc == 125 ]] && result=skip
  row "bench $bench" "$result" "$took" "$out/$bench.json"
done

# --- summary -------------------------------------------------------------------------------
echo
echo "gpu_check on $(cat "$out/gpu.txt"), $(($(date +%s) - started)) s in all"
printf '| %-34s | %-7s | %5s | %s\n' step result s detail
printf '|%s|%s|%s|%s\n' "------------------------------------" "---------" "-------" "------"
printf '%s\n' "${rows[@]}"
exit "$failed"
