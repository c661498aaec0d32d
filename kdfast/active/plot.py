"""Learning curves of active-learning runs: F1 (or EM) against the labeled fraction of the pool.

    plot_curves(["out/margin/al_log.json", "out/random/al_log.json"], "curves.png")
    kdfast active-plot --logs out/*/al_log.json --output curves.png

Runs with the same label (by default the strategy name) are drawn in one
colour: their mean as a line and their min-max spread as a band, so several
seeds of one strategy read as one curve.
"""
from __future__ import annotations

import argparse
import json
import os

METRICS = {"f1": "F1", "exact_match": "EM"}


def _read(log):
    if isinstance(log, dict):
        return log
    if not isinstance(log, (str, os.PathLike)):
        raise TypeError(f"a log must be a dict or a path to al_log.json, got {type(log).__name__}")
    path = os.fspath(log)
    if os.path.isdir(path):
        path = os.path.join(path, "al_log.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"active-learning log {path!r} does not exist")
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or "rounds" not in data:
        raise ValueError(f"{path!r} is not an active-learning log (no 'rounds')")
    return data


def _points(log, metric):
    pts = [(r["fraction"], r[metric]) for r in log["rounds"] if r.get(metric) is not None and "fraction" in r]
    return sorted(pts)


def plot_curves(logs, out_png, labels=None, *, metric: str = "f1", title: str | None = None,
                reference: dict | None = None) -> str:
    """Overlay the learning curves of several runs in one PNG; returns the path written.

    Args:
        logs: ``al_log.json`` contents (dicts) or paths to them (or to their output dirs).
        out_png: the PNG to write (parent folders are created).
        labels: one legend label per log (default: the strategy name); equal labels are
            averaged (line = mean, band = min..max over the runs, x = labeled fraction).
        metric: ``"f1"`` or ``"exact_match"``.
        title: the plot title.
        reference: ``{"label": str, "value": float}`` drawn as a horizontal line (e.g. the same
            student trained on 100% of the pool).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    logs = [_read(x) for x in logs]
    if not logs:
        raise ValueError("plot_curves: no logs given")
    if labels is not None and len(labels) != len(logs):
        raise ValueError(f"plot_curves: {len(labels)} labels for {len(logs)} logs")
    labels = list(labels) if labels is not None else [str(x.get("strategy", f"run {i}")) for i, x in enumerate(logs)]
    groups: dict = {}
    for lab, log in zip(labels, logs):
        pts = _points(log, metric)
        if pts:
            groups.setdefault(lab, []).append(pts)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for lab, runs in groups.items():
        xs = sorted({round(x, 6) for pts in runs for x, _ in pts})
        table = np.full((len(runs), len(xs)), np.nan)
        for i, pts in enumerate(runs):
            for x, y in pts:
                table[i, xs.index(round(x, 6))] = y
        mean = np.nanmean(table, axis=0)
        line, = ax.plot(np.array(xs) * 100, mean, marker="o", ms=3,
                        label=lab if len(runs) == 1 else f"{lab} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(np.array(xs) * 100, np.nanmin(table, axis=0), np.nanmax(table, axis=0),
                            color=line.get_color(), alpha=0.2, lw=0)
    if reference is not None:
        ax.axhline(reference["value"], color="k", ls="--", lw=1, label=reference.get("label", "reference"))
    ax.set_xlabel("labeled questions (% of the pool)")
    ax.set_ylabel(f"dev {METRICS[metric]}")
    ax.set_title(title or f"active learning: dev {METRICS[metric]} vs labeled fraction")
    ax.grid(alpha=0.3)
    if groups or reference is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, format="png")
    plt.close(fig)
    return out_png


def main_plot(argv=None) -> int:
    """``kdfast active-plot --logs a.json b.json --output curve.png [--labels ...] [--metric f1]``."""
    p = argparse.ArgumentParser(prog="kdfast active-plot", description="overlay active-learning curves "
                                "(al_log.json of several runs) in one PNG")
    p.add_argument("--logs", nargs="+", required=True, help="al_log.json files (or their output directories)")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per log (default: strategy)")
    p.add_argument("--metric", default="f1", choices=sorted(METRICS))
    p.add_argument("--title", default=None)
    p.add_argument("--reference", type=float, default=None,
                   help="draw this score as a dashed line (e.g. the same student trained on 100%% of the pool)")
    p.add_argument("--reference_label", default="100% of the pool", help="legend label of --reference")
    a = p.parse_args(argv)
    ref = None if a.reference is None else {"label": a.reference_label, "value": a.reference}
    try:
        path = plot_curves(a.logs, a.output, a.labels, metric=a.metric, title=a.title, reference=ref)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise SystemExit(f"kdfast active-plot: error: {e}") from None
    print(f"wrote {path}")
    return 0


__all__ = ["plot_curves", "main_plot"]
