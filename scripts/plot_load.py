# SPDX-License-Identifier: Apache-2.0
"""Heat map of an MoE layer's load per expert over training, from the CSV that
examples/00_train_tiny_moe writes with --load-csv (columns: step, load_0..load_{E-1},
dropped_0..dropped_{E-1}). Run it through scripts/plot_load.sh, which installs matplotlib."""

import csv
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    if not body:
        sys.exit(f"plot_load: {path} has no steps")
    load_columns = [i for i, name in enumerate(header) if name.startswith("load_")]
    dropped_columns = [i for i, name in enumerate(header) if name.startswith("dropped_")]
    steps = [int(r[0]) for r in body]
    load = [[int(r[i]) for r in body] for i in load_columns]  # experts × steps
    dropped = [[int(r[i]) for r in body] for i in dropped_columns]
    return steps, load, dropped


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot_load.py <load.csv> <out.png>")
    steps, load, dropped = read(sys.argv[1])
    experts = len(load)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 1.2 + 0.9 * experts), sharex=True)
    extent = (steps[0] - 0.5, steps[-1] + 0.5, experts - 0.5, -0.5)
    for axis, data, title, cmap in ((top, load, "assignments per expert", "viridis"),
                                    (bottom, dropped, "dropped per expert", "magma")):
        image = axis.imshow(data, aspect="auto", interpolation="nearest", extent=extent, cmap=cmap)
        axis.set_ylabel("expert")
        axis.set_yticks(range(experts))
        axis.set_title(title)
        fig.colorbar(image, ax=axis)
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=100)
    print(f"plot_load: wrote {sys.argv[2]} ({experts} experts, {len(steps)} steps)")


if __name__ == "__main__":
    main()
