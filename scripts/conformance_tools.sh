#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Installs the frameworks of the conformance suite (tests/conformance/), at pinned versions,
# from PyPI into a virtual environment: torch, Hugging Face transformers, Megatron-Core and
# DeepSpeed, with pytest and numpy. They run on the CPU only, but PyPI's Linux torch wheel
# depends on the CUDA libraries (nvidia-* wheels, about 5.6 GB installed in all, some
# 90 seconds from a warm pip cache): its libtorch links them, so a torch without them does
# not import. Install once per build tree; nothing is downloaded once the pinned versions are
# there, so it is safe to run every time.
#
#   bash scripts/conformance_tools.sh <dir>     # then configure with
#   cmake ... -DMOE_CONFORMANCE_PYTHON=<dir>/bin/python
set -euo pipefail

torch_version=2.15.0
transformers_version=5.23.0
megatron_version=0.16.1  # the newest that supports Python 3.11
deepspeed_version=0.19.8
numpy_version=2.4.6
pytest_version=9.2.0

venv=${1:?usage: conformance_tools.sh <virtual environment directory>}

source "$(dirname "${BASH_SOURCE[0]}")/lib/pinned_venv.sh"
pinned_venv "$venv" "conformance tools" \
  "torch==$torch_version" "numpy==$numpy_version" "pytest==$pytest_version"
# DeepSpeed is a source distribution whose setup imports torch: build it against the torch
# above instead of a second one in an isolated build environment. DS_BUILD_OPS=0: no compiled
# ops (the suite runs the pure-Python gates).
DS_BUILD_OPS=0 pinned_venv "$venv" "conformance tools" --no-build-isolation -- \
  "transformers==$transformers_version" "megatron-core==$megatron_version" \
  "deepspeed==$deepspeed_version"
