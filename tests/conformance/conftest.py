# SPDX-License-Identifier: Apache-2.0
"""What every conformance test shares: the C++ driver (driver.cpp, the library's host
backend in double precision), seeded random inputs, and the comparisons.

The driver's path comes from MOE_CONFORMANCE_DRIVER (ctest sets it). Each test sends its
cases in one batch and compares the frameworks' results with the library's.
"""

import json
import os
import subprocess

import pytest
import torch

# The tolerances: weights and losses, outputs and gradients, relative, float64.
WEIGHT_RTOL = 1e-12
OUTPUT_RTOL = 1e-10


def _driver_path():
    path = os.environ.get("MOE_CONFORMANCE_DRIVER")
    if not path:
        pytest.fail("MOE_CONFORMANCE_DRIVER is not set: run the suite through ctest "
                    "(ctest -L conformance) or point it at the built moe_conformance_driver")
    return path


def as_rows(t):
    """A 2-D tensor as a list of rows of Python floats (JSON carries doubles exactly)."""
    return [[float(v) for v in row] for row in t.detach().to(torch.float64).tolist()]


def run_library(cases):
    """Runs `cases` (dicts as driver.cpp reads them) through the library; returns one result
    dict per case, with the matrices as float64/int64 tensors."""
    request = json.dumps({"cases": cases})
    done = subprocess.run([_driver_path()], input=request, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        pytest.fail(f"moe_conformance_driver failed: {done.stderr}")
    results = json.loads(done.stdout)["results"]
    out = []
    for r in results:
        if "error" in r:
            pytest.fail(f"the library rejected a case: {r['error']}")
        for key in ("weight", "scores", "dx", "d_w_gate", "y"):
            if key in r:
                r[key] = torch.tensor(r[key], dtype=torch.float64)
        for key in ("expert", "slot", "load"):
            if key in r:
                r[key] = torch.tensor(r[key], dtype=torch.int64)
        if "kept" in r:
            r["kept"] = torch.tensor(r["kept"], dtype=torch.bool)
        out.append(r)
    return out


def random_logits(seed, tokens, experts, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, experts, generator=g, dtype=torch.float64) * scale


def rel_err(a, b):
    """Largest |a − b| relative to the larger magnitude of the two (1 where both are tiny)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    if a.numel() == 0:
        return 0.0
    scale = torch.maximum(a.abs().max(), b.abs().max())
    if scale == 0:
        return 0.0
    return float((a - b).abs().max() / scale)


def assert_close(a, b, rtol, what):
    err = rel_err(a, b)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"
    return err


def dense(expert, values, experts):
    """(T, k) values at (T, k) experts as a (T, E) tensor, 0 elsewhere."""
    out = torch.zeros(expert.shape[0], experts, dtype=values.dtype)
    return out.scatter(1, expert, values)


class Report:
    """Largest errors per comparison, written to MOE_CONFORMANCE_RESULTS/<name>.json for the
    README's conformance table."""

    def __init__(self):
        self.rows = {}

    def add(self, key, framework, compared, cases, err, preset=""):
        """`preset`: the library's gate or layer compared (a preset, or the composition that
        matches the framework's flags)."""
        row = self.rows.setdefault(key, {"framework": framework, "compared": compared,
                                         "preset": preset, "cases": 0, "largest_error": 0.0})
        row["cases"] += cases
        row["largest_error"] = max(row["largest_error"], float(err))

    def write(self, name):
        directory = os.environ.get("MOE_CONFORMANCE_RESULTS")
        if not directory:
            return
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(self.rows, f, indent=1, sort_keys=True)


@pytest.fixture(scope="module")
def report(request):
    r = Report()
    yield r
    r.write(request.module.__name__)
