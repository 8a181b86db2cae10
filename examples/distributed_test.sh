#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# examples/05_distributed under mpiexec with 1, 2 and 4 processes, for each layout and
# all-to-all algorithm on the host backend: every run must print the same checksum.
#   distributed_test.sh <05_distributed> <mpiexec> <numproc flag>
set -euo pipefail
program=$1 mpiexec=$2 numproc_flag=${3:--n}

reference=
for layout in capacity ragged; do
  for algorithm in linear 2dh; do
    for ranks in 1 2 4; do
      output=$("$mpiexec" "$numproc_flag" "$ranks" "$program" --backend host --layout "$layout" \
        --algorithm "$algorithm" --ranks-per-node "$(( ranks >= 2 ? 2 : 1 ))" --steps 1)
      checksum=$(sed -n 's/^checksum \([0-9a-f]*\)$/\1/p' <<<"$output")
      echo "$layout $algorithm N=$ranks: checksum ${checksum:-missing}"
      if [[ -z $checksum ]]; then
        echo "$output" >&2
        exit 1
      fi
      if [[ $layout/$algorithm == capacity/linear && $ranks == 1 ]]; then
        reference=$checksum
      elif [[ $checksum != "$reference" ]]; then
        echo "the checksum differs from capacity/linear with 1 process ($reference)" >&2
        exit 1
      fi
    done
  done
done
echo "the same checksum for N = 1, 2, 4, both layouts, linear and 2DH"
