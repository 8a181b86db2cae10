#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# ctest example.train_tiny_moe.load_plot: the 300 training steps write one CSV row each, and
# plot_load.py turns them into a PNG.
#   load_plot_test.sh <00_train_tiny_moe> <python with matplotlib> <plot_load.py> <out dir>
set -euo pipefail
train=$1 python=$2 plot=$3 out=$4
mkdir -p "$out"
rm -f "$out/load.csv" "$out/load.png"
"$train" --load-csv "$out/load.csv"
rows=$(wc -l <"$out/load.csv")
[[ $rows -eq 301 ]] || { echo "expected a header and 300 rows, got $rows lines" >&2; exit 1; }
"$python" "$plot" "$out/load.csv" "$out/load.png"
signature=$(head -c 8 "$out/load.png" | od -An -tx1 | tr -d ' \n')
[[ $signature == 89504e470d0a1a0a ]] || { echo "load.png is not a PNG" >&2; exit 1; }
