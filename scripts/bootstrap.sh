#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Installs the Debian packages moe's build needs, and only those that are missing, so that
# it is safe (and offline-safe) to run every time. The CUDA toolkit (nvcc 12+, CCCL, NCCL)
# is not a Debian package here: it is checked, not installed.
set -euo pipefail

# python3-venv: scripts/packaging_tools.sh puts Conan and a newer CMake in a virtual environment.
# libboost-context-dev: the fibers of the emulated CUDA runtime (tests/emulation/).
# clang: libFuzzer and its sanitizer runtimes, for the fuzz targets (scripts/fuzz.sh).
# nlohmann-json3-dev: the conformance suite's driver reads and writes JSON (tests/conformance/).
# libopenmpi-dev, openmpi-bin: MPI (moe::mpi, comm::mpi_communicator) and mpiexec for the mpi
# tests and examples/05_distributed.
packages=(cmake ninja-build g++ doctest-dev libbenchmark-dev clang-format python3-venv
          libboost-context-dev clang nlohmann-json3-dev libopenmpi-dev openmpi-bin)

if ! command -v dpkg >/dev/null 2>&1; then
  echo "bootstrap: not a Debian system; make sure these are installed: ${packages[*]}" >&2
  exit 0
fi

missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done

if ((${#missing[@]} > 0)); then
  echo "bootstrap: installing ${missing[*]}"
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  ${sudo[@]+"${sudo[@]}"} apt-get update
  ${sudo[@]+"${sudo[@]}"} apt-get install -y --no-install-recommends "${missing[@]}"
fi

if ! command -v nvcc >/dev/null 2>&1 && [[ ! -x /usr/local/cuda/bin/nvcc ]]; then
  echo "bootstrap: nvcc not found; only host code will be built (CUDA toolkit 12+ needed" \
       "for the rest)" >&2
fi
