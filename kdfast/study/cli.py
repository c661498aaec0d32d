"""``kdfast study``: argument parsing over :func:`kdfast.study.run_study` and the report.

    kdfast study --grid study.yaml --train_file train.json --validation_file dev.json \
        --teacher_name_or_path teacher/ --output_dir study-out [--num_workers 2]

Every grid and train key of the grid file (see :mod:`kdfast.study.grid`) is also a flag
(comma-separated lists for grid keys, e.g. ``--mapping uniform,mean --seed 0,1,2``); flags win.
"""
from __future__ import annotations

import argparse
import sys

from kdfast.study.grid import GRID_KEYS, TRAIN_KEYS, GridError, load_grid

_BOOL = ("include_default", "include_logits_only")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdfast study", description="distillation design study: mappings x losses x "
                                "weights x seeds as short distillations from one cached teacher")
    p.add_argument("--grid", help="YAML or JSON grid file ('grid' and 'train' sections)")
    p.add_argument("--train_file", "--train-file", required=True)
    p.add_argument("--validation_file", "--validation-file", required=True)
    p.add_argument("--teacher_name_or_path", "--teacher-name-or-path", required=True,
                   help="fine-tuned QA teacher directory (with its tokenizer)")
    p.add_argument("--output_dir", "--output-dir", required=True)
    p.add_argument("--num_workers", "--num-workers", type=int, default=1, help="parallel run processes")
    p.add_argument("--max_runs", type=int, default=None, help="run at most this many unfinished runs, then report")
    p.add_argument("--disable_tqdm", action="store_true")
    g = p.add_argument_group("grid keys (comma-separated lists; override the grid file)")
    for k in GRID_KEYS:
        g.add_argument(f"--{k}", default=None)
    t = p.add_argument_group("train keys (override the grid file)")
    for k in TRAIN_KEYS:
        if k in _BOOL:
            t.add_argument(f"--{k}", action="store_true", default=None)
        else:
            t.add_argument(f"--{k}", default=None)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(sys.argv[1:] if argv is None else argv)
    from kdfast.study.report import write_report
    from kdfast.study.runner import run_study
    overrides = {k: getattr(a, k) for k in list(GRID_KEYS) + list(TRAIN_KEYS)}
    for k in ("max_train_questions", "max_eval_questions"):
        if overrides[k] is not None:
            overrides[k] = int(overrides[k])
    try:
        grid = load_grid(a.grid, overrides)
        rows = run_study(grid, a.train_file, a.validation_file, a.teacher_name_or_path, a.output_dir,
                         num_workers=a.num_workers, progress=not a.disable_tqdm, max_runs=a.max_runs)
    except (GridError, FileNotFoundError) as e:
        raise SystemExit(f"kdfast study: error: {e}") from None
    best = write_report(rows, grid.train, a.output_dir)
    print(f"[kdfast study] best: {best['config']} F1 {best['f1_mean']:.2f} ± {best['f1_std']:.2f}; "
          f"outputs in {a.output_dir}/ (runs.csv, results.md, heatmap.png, best_config.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
