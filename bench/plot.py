"""Turn bench/results/*.csv into PNG bar charts (one per family and metric).

    python bench/plot.py [--results bench/results] [--out bench/results]

Uses the latest measurement of each (kernel, provider, mode, config, x) per device.
Needs matplotlib (pip install matplotlib); prints a text summary without it.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))


# The columns bench/harness.py writes; other result files (kd_study, active_learning) have their own plots.
HARNESS_COLUMNS = {"kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "config", "device"}


def latest_rows(path):
    """The latest row of each case, or None for a CSV not in bench/harness.py's format."""
    rows = OrderedDict()
    with open(path) as f:
        reader = csv.DictReader(f)
        if not HARNESS_COLUMNS <= set(reader.fieldnames or ()):
            return None
        for r in reader:
            key = (r["device"], r["kernel"], r["provider"], r["mode"], r["metric"], r["config"], r["x_name"],
                   r["x_value"])
            rows[key] = r  # later rows win
    return list(rows.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = args.out or args.results
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        print("matplotlib not installed: text summary only")
    for path in sorted(glob.glob(os.path.join(args.results, "*.csv"))):
        family = os.path.splitext(os.path.basename(path))[0]
        rows = latest_rows(path)
        if rows is None:
            print(f"{family}: not a bench/harness.py results file, skipped")
            continue
        for metric in ("time", "peak_memory"):
            sel = [r for r in rows if r["metric"] == metric]
            if not sel:
                continue
            cases = list(OrderedDict.fromkeys(f"{r['kernel']} {r['config']} {r['x_name']}={r['x_value']}"
                                              for r in sel))
            provs = list(OrderedDict.fromkeys(r["provider"] for r in sel))
            unit = sel[0]["unit"]
            print(f"{family} {metric} ({unit}): {len(cases)} cases x {len(provs)} providers")
            if plt is None:
                continue
            fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
            w = 0.8 / len(provs)
            for i, p in enumerate(provs):
                vals = []
                for c in cases:
                    v = [float(r["p50"]) for r in sel if r["provider"] == p and
                         f"{r['kernel']} {r['config']} {r['x_name']}={r['x_value']}" == c]
                    vals.append(v[-1] if v else 0.0)
                ax.bar([j + i * w for j in range(len(cases))], vals, w, label=p)
            ax.set_xticks([j + 0.4 - w / 2 for j in range(len(cases))])
            ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
            ax.set_ylabel(f"{metric} ({unit}, median)")
            ax.set_title(f"{family}: {sel[0]['device']}", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            png = os.path.join(out, f"{family}_{metric}.png")
            fig.savefig(png, dpi=110)
            plt.close(fig)
            print(f"  wrote {png}")


if __name__ == "__main__":
    main()
