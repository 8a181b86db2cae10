#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Renders the per-expert load that `00_train_tiny_moe --load-csv FILE` wrote as a heat map
# PNG (experts × steps, with the drops per expert below it). Installs a pinned matplotlib
# from PyPI into a virtual environment on first use.
#
#   build/examples/00_train_tiny_moe --load-csv load.csv
#   bash scripts/plot_load.sh load.csv load.png
set -euo pipefail

matplotlib_version=3.11.2

#   bash scripts/plot_load.sh --install <venv>   # only install (scripts/test.sh, for ctest)
usage="usage: plot_load.sh <load.csv> <out.png> [venv directory] | --install <venv directory>"
if [[ ${1:-} == --install ]]; then
  csv= png= venv=${2:?$usage}
else
  csv=${1:?$usage} png=${2:?$usage}
  venv=${3:-"$(dirname "${BASH_SOURCE[0]}")/../build/tools-plot"}
fi

source "$(dirname "${BASH_SOURCE[0]}")/lib/pinned_venv.sh"
pinned_venv "$venv" "plot_load" "matplotlib==$matplotlib_version"
[[ -z $csv ]] || "$venv/bin/python" "$(dirname "${BASH_SOURCE[0]}")/plot_load.py" "$csv" "$png"
