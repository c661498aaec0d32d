"""The study's report from ``runs.csv``: a Markdown table of mean +- std per configuration, a
heatmap of F1 over (attention weight, hidden weight) (mapping x attention loss when every family has
one weight point), and the best configuration as a
distillation config.

Spread: the sample standard deviation over seeds (ddof=1; 0 for one seed) and the min-max range,
both in the table.
"""
from __future__ import annotations

import json
import math
import os

from kdfast.study.grid import KNOBS, distill_config_dict, layer_losses

SUMMARY_FILE, HEATMAP_FILE, BEST_FILE = "results.md", "heatmap.png", "best_config.json"


def _stats(xs):
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return mean, std, min(xs), max(xs)


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per configuration (best mean F1 first): knobs, n, F1 / EM mean, std, min, max,
    mean train seconds, and the learned mapping weights averaged over seeds (when any)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["config"], []).append(r)
    out = []
    for name, rs in groups.items():
        f1, em = _stats([r["f1"] for r in rs]), _stats([r["exact_match"] for r in rs])
        e = {"config": name, **{k: rs[0][k] for k in KNOBS}, "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
             "f1_mean": f1[0], "f1_std": f1[1], "f1_min": f1[2], "f1_max": f1[3], "em_mean": em[0], "em_std": em[1],
             "train_seconds": sum(r["train_seconds"] for r in rs) / len(rs)}
        learned = [json.loads(r["learned_weights"]) for r in rs if r.get("learned_weights")]
        if learned:
            e["learned_weights"] = {k: [[round(sum(lw[k][i][j] for lw in learned) / len(learned), 3)
                                         for j in range(len(learned[0][k][i]))] for i in range(len(learned[0][k]))]
                                    for k in learned[0]}
        out.append(e)
    out.sort(key=lambda e: -e["f1_mean"])
    return out


def markdown_table(summary: list[dict]) -> str:
    lines = ["| mapping | attention loss (w) | hidden loss (w) | emb w | logit | schedule | weighting | seeds | "
             "F1 mean ± std | F1 min-max | EM mean ± std | train s |",
             "|---|---|---|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for e in summary:
        lines.append(f"| {e['mapping']} | {e['attention_loss']} ({e['attention_weight']:g}) | {e['hidden_loss']} "
                     f"({e['hidden_weight']:g}) | {e['embedding_weight']:g} | {e['logit_loss']} | "
                     f"{e['layer_weight_schedule']} | {e['term_weighting']} | {e['n']} | "
                     f"{e['f1_mean']:.2f} ± {e['f1_std']:.2f} | {e['f1_min']:.2f}-{e['f1_max']:.2f} | "
                     f"{e['em_mean']:.2f} ± {e['em_std']:.2f} | {e['train_seconds']:.1f} |")
    learned = [e for e in summary if e.get("learned_weights")]
    for e in learned:
        lines.append("")
        lines.append(f"Learned mapping weights of `{e['config']}` (mean over seeds; row = student layer, "
                     "column = teacher layer 1..N):")
        for k, w in e["learned_weights"].items():
            lines.append(f"- {k}: " + "; ".join("[" + ", ".join(f"{x:.3f}" for x in row) + "]" for row in w))
    return "\n".join(lines)


def _family(e):
    return tuple(e[k] for k in KNOBS if k not in ("attention_weight", "hidden_weight"))


def write_heatmap(summary: list[dict], path: str) -> dict:
    """Mean F1 over (attention weight, hidden weight) for the best configuration's mapping and losses;
    returns what was plotted (``axes`` and, for a weight heatmap, the family's knobs). The best
    configuration whose family has more than one weight point is plotted (when logits only wins, its
    family is a single cell: the best layer-term family is shown). A grid with one weight point per
    family (weights fixed) is plotted as mapping x attention loss instead: the best F1 of each cell
    over the other knobs, layer-term configurations only (logits only named in the title)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    best = next((e for e in summary if sum(_family(x) == _family(e) for x in summary) > 1), None)
    layered = [e for e in summary if layer_losses(e) is not None]
    if best is None and layered:
        ys = sorted({e["mapping"] for e in layered})
        xs = sorted({e["attention_loss"] for e in layered})
        xlabel, ylabel = "attention loss", "mapping"
        grid = [[float("nan")] * len(xs) for _ in ys]
        for e in layered:
            i, j = ys.index(e["mapping"]), xs.index(e["attention_loss"])
            grid[i][j] = e["f1_mean"] if math.isnan(grid[i][j]) else max(grid[i][j], e["f1_mean"])
        plain = next((e for e in summary if layer_losses(e) is None), None)
        title = "dev F1 (best over the other knobs)" + \
            (f"; logits only {plain['f1_mean']:.1f}" if plain is not None else "")
        what = {"axes": "mapping x attention loss (best over the other knobs, layer-term configurations)"}
    else:
        best = best or summary[0]
        fam = [e for e in summary if _family(e) == _family(best)]
        xs = sorted({e["attention_weight"] for e in fam})
        ys = sorted({e["hidden_weight"] for e in fam})
        grid = [[float("nan")] * len(xs) for _ in ys]
        for e in fam:
            grid[ys.index(e["hidden_weight"])][xs.index(e["attention_weight"])] = e["f1_mean"]
        xlabel, ylabel = f"attention weight ({best['attention_loss']})", f"hidden weight ({best['hidden_loss']})"
        title = f"dev F1, mapping {best['mapping']}, logit {best['logit_loss']}"
        what = {"axes": "attention weight x hidden weight",
                **{k: best[k] for k in KNOBS if k not in ("attention_weight", "hidden_weight")}}
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 1.0 * len(ys) + 2.0))
    im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xs)), [x if isinstance(x, str) else f"{x:g}" for x in xs])
    ax.set_yticks(range(len(ys)), [y if isinstance(y, str) else f"{y:g}" for y in ys])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="F1 (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return what


def best_config(summary: list[dict], train: dict) -> dict:
    """The best configuration (highest mean F1) as a distillation config: ``distill`` maps 1:1 to
    :class:`kdfast.distill.trainer.DistillConfig` (``DistillConfig(**best["distill"])``) and
    ``kdfast_distill_args`` to ``kdfast distill`` flags for the fields that have one."""
    best = summary[0]
    distill = distill_config_dict(best, train)
    args = ["--temperature", f"{distill['temperature']:g}", "--alpha", f"{distill['alpha']:g}",
            "--student_layers", str(train["student_layers"]), "--max_steps", str(train["max_steps"]),
            "--learning_rate", f"{train['learning_rate']:g}", "--per_device_train_batch_size", str(train["batch_size"]),
            "--max_seq_length", str(train["max_seq_length"]), "--doc_stride", str(train["doc_stride"])]
    if distill["layer_losses"]:
        args += ["--layer_losses", ",".join(f"{k}:{v:g}" for k, v in distill["layer_losses"].items()),
                 "--layer_mapping", str(distill["layer_mapping"])]
    defaults = {"logit_loss": "kl", "layer_weight_schedule": "constant", "term_weighting": "fixed"}
    for k, default in defaults.items():
        if distill[k] != default:
            args += [f"--{k}", str(distill[k])]
    # DistillConfig fields kdfast distill has no flag for.
    no_flag = {k: distill[k] for k in ("mapping_k", "mapping_seed", "mapping_learning_rate") if k in distill}
    return {"config": best["config"], "f1_mean": best["f1_mean"], "f1_std": best["f1_std"], "n": best["n"],
            "distill": distill, "student_layers": str(train["student_layers"]),
            "train": {k: train[k] for k in ("max_steps", "learning_rate", "batch_size", "max_seq_length",
                                            "doc_stride")},
            "kdfast_distill_args": args,
            "needs_python_api": no_flag,
            **({"learned_weights": best["learned_weights"]} if best.get("learned_weights") else {})}


def write_report(rows: list[dict], train: dict, output_dir: str, *, title: str = "kdfast study") -> dict:
    """Write ``results.md``, ``heatmap.png`` and ``best_config.json``; returns the best config."""
    if not rows:
        raise ValueError("kdfast study: no finished runs to report")
    summary = summarize(rows)
    fam = write_heatmap(summary, os.path.join(output_dir, HEATMAP_FILE))
    best = best_config(summary, train)
    with open(os.path.join(output_dir, BEST_FILE), "w") as fh:
        json.dump(best, fh, indent=2)
    text = [f"# {title}", "", f"{len(rows)} runs, {len(summary)} configurations. Spread: sample std over seeds "
            "(ddof=1) and min-max. Sorted by mean dev F1.", "", markdown_table(summary), "",
            f"Best: `{best['config']}` (F1 {best['f1_mean']:.2f} ± {best['f1_std']:.2f}). Heatmap "
            f"({HEATMAP_FILE}): F1 over {fam.pop('axes')}" + (f" for {fam}." if fam else ".")]
    with open(os.path.join(output_dir, SUMMARY_FILE), "w") as fh:
        fh.write("\n".join(text) + "\n")
    return best
