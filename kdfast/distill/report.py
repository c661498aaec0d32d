"""Results tables, ``metrics.json`` and the model card (``README.md``) of a pipeline output directory."""
from __future__ import annotations

import json
import os
import platform

COLUMNS = (("model", "model", "{}"), ("exact_match", "EM", "{:.2f}"), ("f1", "F1", "{:.2f}"),
           ("parameters", "params (M)", "{:.2f}"), ("size_mb", "size (MB)", "{:.2f}"),
           ("latency_ms", "latency / question (ms)", "{:.1f}"), ("questions_per_s", "questions / s", "{:.1f}"),
           ("speedup", "speedup vs teacher", "{:.2f}x"))


def with_speedup(rows: list[dict], reference: str = "teacher") -> list[dict]:
    """Rows with ``speedup`` = reference latency / row latency (> 1: faster than the reference)."""
    ref = next((r for r in rows if r["model"] == reference), None)
    out = []
    for r in rows:
        r = dict(r)
        if ref is not None and r.get("latency_ms"):
            r["speedup"] = ref["latency_ms"] / r["latency_ms"]
        out.append(r)
    return out


def markdown_table(rows: list[dict]) -> str:
    """One Markdown table; parameters are shown in millions."""
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "| " + " | ".join("---" for _ in COLUMNS) + " |"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            if v is None:
                cells.append("")
            elif key == "parameters":
                cells.append(fmt.format(v / 1e6))
            else:
                cells.append(fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def write_results(output_dir: str, rows: list[dict], *, title: str, data: dict, recipe: dict) -> dict[str, str]:
    """Write ``metrics.json``, ``results.md`` and a model card ``README.md``; returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    table = markdown_table(rows)
    paths = {"metrics": os.path.join(output_dir, "metrics.json"), "summary": os.path.join(output_dir, "results.md"),
             "card": os.path.join(output_dir, "README.md")}
    with open(paths["metrics"], "w") as fh:
        json.dump({"rows": rows, "data": data, "recipe": recipe, "machine": machine()}, fh, indent=2, default=str)
    with open(paths["summary"], "w") as fh:
        fh.write(f"# {title}\n\n{table}\n\nMeasured on {machine()}.\n")
    data_lines = "\n".join(f"- {k}: {v}" for k, v in data.items())
    recipe_lines = "\n".join(f"- {k}: {v}" for k, v in recipe.items())
    with open(paths["card"], "w") as fh:
        fh.write(f"""---
library_name: transformers
tags: [question-answering, knowledge-distillation, kdfast]
---

# {title}

Extractive question-answering models produced by `kdfast` (SQuAD format).

## Data
{data_lines}

## Recipe
{recipe_lines}

## Results (dev set)
{table}

EM / F1: the official SQuAD definitions. Latency: one question's windows as one batch, median;
throughput: batches of windows sorted by length. Measured on {machine()}.

## Loading
Dense models load with `transformers.AutoModelForQuestionAnswering.from_pretrained(dir)`;
pruned and ternary ones with `kdfast.distill.load_qa_model(dir)`.
""")
    return paths
