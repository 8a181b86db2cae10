# SPDX-License-Identifier: Apache-2.0
"""The README's conformance table, from the suite's results.

    python table.py <results dir> <table.md>            # check: fail unless they agree
    python table.py <results dir> <table.md> --write    # regenerate table.md

Each pytest file of the suite writes <results dir>/test_<framework>.json (conftest.Report):
per comparison the framework, the library's preset or composition, what was compared, the
number of cases and the largest relative error. This script turns them into a markdown table,
with the frameworks' installed versions and each error rounded up to a power of ten (so that
the last bits of another CPU's BLAS do not change it), between the marker lines of
tests/conformance/table.md; the readme.snippets test checks that README.md shows that region.
The ctest `conformance.table` runs the check after the suite.
"""

import json
import math
import os
import sys
from importlib import metadata

PACKAGES = {"deepspeed": "deepspeed", "megatron-core": "megatron-core",
            "transformers": "transformers"}
BEGIN = "# example-begin conformance-table"  # readme-snippets.cmake's markers
END = "# example-end"


def bound(err):
    """The power of ten at or above err, as the table shows it."""
    if err == 0:
        return "0"
    return f"≤ 1e{math.ceil(math.log10(err) - 1e-9):d}"


def table(results_dir):
    rows = []
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(results_dir, name), encoding="utf-8") as f:
            for key, row in sorted(json.load(f).items()):
                framework = row["framework"]
                version = metadata.version(PACKAGES.get(framework, framework))
                rows.append((f"{framework} {version}", row.get("preset") or "—",
                             row["compared"], row["cases"], bound(row["largest_error"])))
    lines = ["| framework | library gate | compared | cases | largest relative error |",
             "|---|---|---|---:|---|"]
    for framework, preset, compared, cases, err in rows:
        cell = compared.replace("|", "\\|")
        lines.append(f"| {framework} | `{preset}` | {cell} | {cases} | {err} |")
    return "\n".join(lines) + "\n"


def region(path):
    """The text between the marker lines of `path`, and the text around it."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(BEGIN + "\n", 1)
    body, tail = rest.split(END, 1)
    return head, body, tail


def main(argv):
    results_dir, path = argv[1], argv[2]
    expected = table(results_dir)
    head, body, tail = region(path)
    if "--write" in argv[3:]:
        with open(path, "w", encoding="utf-8") as f:
            f.write(head + BEGIN + "\n" + expected + END + tail)
        return 0
    if body != expected:
        sys.stderr.write(
            f"{path} differs from the suite's results; regenerate it with\n"
            f"  python {argv[0]} {results_dir} {path} --write\n"
            f"and copy its table into README.md. Expected:\n{expected}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
