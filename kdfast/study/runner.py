"""Run a study: every (configuration, seed) of a :class:`~kdfast.study.grid.StudyGrid` as a short
distillation from one cached teacher, optionally in parallel processes, resumable.

    rows = run_study(grid, train_file, validation_file, teacher_dir, output_dir, num_workers=2)

Outputs in ``output_dir``: ``runs.csv`` (one row per finished run, appended as runs finish; a
rerun skips the runs whose ``run_id`` is already there), then the report
(:func:`kdfast.study.report.write_report`: ``results.md``, ``heatmap.png``, ``best_config.json``).
The teacher's logits are cached once (``teacher_cache/``); runs with layer terms run the teacher
live, as ``kdfast distill`` does. Workers are ``spawn``-ed processes with one intra-op thread each.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import time

from kdfast.study.grid import KNOBS, Run, StudyGrid, distill_config_dict

FIELDS = ("run_id", "config") + KNOBS + ("seed", "exact_match", "f1", "train_seconds", "steps", "learned_weights")
RUNS_CSV = "runs.csv"
_CTX: dict = {}


def read_runs(output_dir: str) -> list[dict]:
    """Rows of ``output_dir/runs.csv`` (numbers parsed), [] when there is none."""
    path = os.path.join(output_dir, RUNS_CSV)
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("attention_weight", "hidden_weight", "embedding_weight", "exact_match", "f1", "train_seconds"):
            r[k] = float(r[k])
        r["seed"], r["steps"] = int(r["seed"]), int(r["steps"])
    return rows


def _append(output_dir: str, row: dict) -> None:
    path = os.path.join(output_dir, RUNS_CSV)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in FIELDS})
        fh.flush()


def _context(spec: dict) -> dict:
    """Data, tokenizer, teacher and cached windows of this process (built once per process)."""
    key = json.dumps({k: v for k, v in spec.items() if k != "cache_path"}, sort_keys=True)
    if _CTX.get("key") == key:
        return _CTX
    from kdfast.distill.models import load_qa_model, load_tokenizer
    from kdfast.distill.student import parse_student_layers
    from kdfast.distill.teacher_cache import TeacherCache
    from kdfast.qa.features import eval_features, train_features
    from kdfast.qa.load import load_squad
    tr = spec["train"]
    tok = load_tokenizer(spec["teacher_dir"])
    train = load_squad(spec["train_file"])
    dev = load_squad(spec["validation_file"])
    if tr["max_train_questions"]:
        train = train.select(range(min(len(train), int(tr["max_train_questions"]))))
    if tr["max_eval_questions"]:
        dev = dev.select(range(min(len(dev), int(tr["max_eval_questions"]))))
    windows = train_features(train, tok, max_seq_length=tr["max_seq_length"], doc_stride=tr["doc_stride"])
    dev_windows = eval_features(dev, tok, max_seq_length=tr["max_seq_length"], doc_stride=tr["doc_stride"])
    teacher = load_qa_model(spec["teacher_dir"], attn_implementation="kdfast").eval()
    if spec.get("cache_path") is None:
        sdpa_teacher = load_qa_model(spec["teacher_dir"], attn_implementation="sdpa").eval()
        cache = TeacherCache.build(sdpa_teacher, windows, tok, os.path.join(spec["output_dir"], "teacher_cache"),
                                   progress=False)
        spec = dict(spec, cache_path=cache.path)
    else:
        cache = TeacherCache.load(spec["cache_path"])
    _CTX.clear()
    _CTX.update(key=key, spec=spec, tok=tok, dev=dev, dev_windows=dev_windows, teacher=teacher,
                windows=cache.attach(windows),
                layers=parse_student_layers(str(tr["student_layers"]), teacher.config.num_hidden_layers))
    return _CTX


def run_one(run: Run, spec: dict) -> dict:
    """Distil one student for ``run`` and score it on the dev questions; returns its CSV row."""
    import torch
    from kdfast.distill.recipe import training_attention
    from kdfast.distill.stage import TrainOptions, train_stage
    from kdfast.distill.student import student_from_teacher
    from kdfast.distill.trainer import DistillConfig
    from kdfast.qa.evaluate import evaluate_qa
    ctx = _context(spec)
    tr = spec["train"]
    distill = DistillConfig(**distill_config_dict(run.knobs, tr), mapping_seed=run.seed)
    torch.manual_seed(run.seed)
    student = student_from_teacher(ctx["teacher"], ctx["layers"], attn_implementation=training_attention(distill))
    opts = TrainOptions(max_steps=tr["max_steps"], per_device_train_batch_size=tr["batch_size"],
                        learning_rate=tr["learning_rate"], seed=run.seed, disable_tqdm=True,
                        logging_steps=tr["max_steps"], group_by_length=False, save_total_limit=None)
    run_dir = os.path.join(spec["output_dir"], "runs", f"run-{os.getpid()}")
    args = opts.training_arguments(run_dir, save_strategy="no")
    t0 = time.perf_counter()
    trainer = train_stage(student, ctx["windows"], ctx["tok"], run_dir, args, teacher=ctx["teacher"],
                          distill=distill, resume=False)
    seconds = time.perf_counter() - t0
    model = trainer.model.eval()
    try:  # evaluate with SDPA (the kdfast CPU attention forward is slower, see kdfast.distill.models)
        model.set_attn_implementation("sdpa")
    except Exception:  # noqa: BLE001 - older transformers: evaluate as trained
        pass
    with torch.no_grad():
        res = evaluate_qa(model, ctx["tok"], ctx["dev"], features=ctx["dev_windows"], batch_size=64, progress=False)
    learned = {}
    if trainer.layer_kd is not None:
        learned = {k: [[round(float(x), 4) for x in row] for row in v.tolist()]
                   for k, v in trainer.layer_kd.learned_mapping_weights().items()}
    shutil.rmtree(run_dir, ignore_errors=True)
    m = res.metrics
    return {"run_id": run.run_id, "config": run.config_name, **run.knobs, "seed": run.seed,
            "exact_match": round(float(m.get("exact_match", m.get("exact", 0.0))), 4), "f1": round(float(m["f1"]), 4),
            "train_seconds": round(seconds, 2), "steps": int(trainer.state.global_step),
            "learned_weights": json.dumps(learned) if learned else ""}


def _worker_init():
    import torch
    torch.set_num_threads(1)


def run_study(grid: StudyGrid, train_file: str, validation_file: str, teacher_dir: str, output_dir: str, *,
              num_workers: int = 1, progress: bool = True, log=print, max_runs: int | None = None,
              seed_major: bool = False, deadline: float | None = None) -> list[dict]:
    """Run the unfinished runs of ``grid`` (at most ``max_runs`` of them), append their rows to
    ``runs.csv`` and return every row of the study.

    seed_major: run every configuration's first seed before any second seed (a study cut short
    still covers every configuration). deadline: a ``time.time()`` after which no new run starts.
    """
    for flag, path in (("--train_file", train_file), ("--validation_file", validation_file),
                       ("--teacher_name_or_path", teacher_dir)):
        if not path or not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "study.json"), "w") as fh:
        json.dump({"grid": grid.grid, "train": grid.train}, fh, indent=2)
    runs = grid.runs()
    done = {r["run_id"] for r in read_runs(output_dir)}
    todo = [r for r in runs if r.run_id not in done]
    if seed_major:
        order = {s: i for i, s in enumerate(grid.grid["seed"])}
        todo.sort(key=lambda r: order[r.seed])  # stable: grid order within a seed
    if max_runs is not None:
        todo = todo[:max_runs]
    log(f"[kdfast study] {len(runs)} runs ({len(runs) // max(len(grid.grid['seed']), 1)} configurations x "
        f"{len(grid.grid['seed'])} seeds): {len(runs) - len(todo)} done, {len(todo)} to run")
    if todo:
        spec = {"train_file": os.path.abspath(train_file), "validation_file": os.path.abspath(validation_file),
                "teacher_dir": os.path.abspath(teacher_dir), "output_dir": os.path.abspath(output_dir),
                "train": grid.train, "cache_path": None}
        spec["cache_path"] = _context(spec)["spec"]["cache_path"]  # data + teacher cache, once, here
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="kdfast study", unit="run", disable=not progress)
        if num_workers <= 1:
            for run in todo:
                if deadline is not None and time.time() > deadline:
                    log("[kdfast study] deadline reached: stopping (rerun to continue)")
                    break
                _append(output_dir, run_one(run, spec))
                bar.update(1)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed
            with ProcessPoolExecutor(max_workers=num_workers, mp_context=mp.get_context("spawn"),
                                     initializer=_worker_init) as pool:
                futures = [pool.submit(run_one, run, spec) for run in todo]
                for f in as_completed(futures):
                    if f.cancelled():
                        continue
                    _append(output_dir, f.result())
                    bar.update(1)
                    if deadline is not None and time.time() > deadline:
                        log("[kdfast study] deadline reached: cancelling the runs not started (rerun to continue)")
                        for other in futures:
                            other.cancel()
        bar.close()
    return read_runs(output_dir)
