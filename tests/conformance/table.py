# SPDX-License-Identifier: Apache-2.0
"""The README's conformance table, from the suite's results.

    python table.py <results dir> <table.md>            # check: fail unless they agree
    python table.py <results dir> <table.md> --write    # regenerate table.md

Each pytest file of the suite writes <results dir>/test_<framework>.json (conftest.Report):
per comparison the framework, the library's preset or composition, what was compared, the
number of cases and the largest relative error. This script turns them into a markdown table,
with the frameworks' installed versions and each error as a bound: the power of ten at or
above twice the error, so that the last bits of another CPU's BLAS stay under it. The table
sits between the marker lines of tests/conformance/table.md; the readme.snippets test checks
that README.md shows that region. The ctest `conformance.table` runs the check after the
suite: every column as written, and every error at most its row's bound (an error that
shrinks keeps the table true; one that passes its bound fails).
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
    """The power of ten at or above twice err, as the table shows it."""
    if err == 0:
        return "0"
    return f"≤ 1e{math.ceil(math.log10(2 * err) - 1e-9):d}"


def holds(stated, err):
    """Whether the table's bound `stated` (bound's text) holds for the error err."""
    if stated == "0":
        return err == 0
    return err <= float(stated.removeprefix("≤ ").strip())


def rows_of(results_dir):
    """(framework and version, preset, compared, cases, largest error) per comparison."""
    rows = []
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(results_dir, name), encoding="utf-8") as f:
            for key, row in sorted(json.load(f).items()):
                framework = row["framework"]
                version = metadata.version(PACKAGES.get(framework, framework))
                rows.append((f"{framework} {version}", row.get("preset") or "—",
                             row["compared"], row["cases"], row["largest_error"]))
    return rows


HEADER = ["| framework | library gate | compared | cases | largest relative error |",
          "|---|---|---|---:|---|"]


def line(framework, preset, compared, cases, stated):
    cell = compared.replace("|", "\\|")
    return f"| {framework} | `{preset}` | {cell} | {cases} | {stated} |"


def table(rows):
    return "\n".join(HEADER + [line(*r[:4], bound(r[4])) for r in rows]) + "\n"


def check(rows, body):
    """The problems of the written table `body` against the results, one per line."""
    written = body.strip("\n").split("\n")[len(HEADER):]
    if len(written) != len(rows):
        return [f"the table has {len(written)} rows, the results {len(rows)}"]
    problems = []
    for text, row in zip(written, rows):
        stated = text.rstrip(" |").rsplit("| ", 1)[-1].strip()
        if text != line(*row[:4], stated):
            problems.append(f"row differs: {text}\n  results: {line(*row[:4], bound(row[4]))}")
        elif not holds(stated, row[4]):
            problems.append(f"error {row[4]:.3g} exceeds the stated {stated}: {text}")
    return problems


def region(path):
    """The text between the marker lines of `path`, and the text around it."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(BEGIN + "\n", 1)
    body, tail = rest.split(END, 1)
    return head, body, tail


def main(argv):
    results_dir, path = argv[1], argv[2]
    rows = rows_of(results_dir)
    head, body, tail = region(path)
    if "--write" in argv[3:]:
        with open(path, "w", encoding="utf-8") as f:
            f.write(head + BEGIN + "\n" + table(rows) + END + tail)
        return 0
    problems = check(rows, body)
    if problems:
        sys.stderr.write(
            f"{path} does not hold for the suite's results:\n" + "\n".join(problems) +
            f"\nRegenerate it with\n  python {argv[0]} {results_dir} {path} --write\n"
            f"and copy its table into README.md.\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
