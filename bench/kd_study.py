"""The distillation design study of issue 15 on the built-in synthetic data, under a time cap.

    python bench/kd_study.py [--work-dir /tmp/kd_study] [--minutes 40] [--num-workers 2]

1. generate synthetic SQuAD train / dev sets and their WordPiece tokenizer (kdfast.qa.synthetic);
2. fine-tune a 4-layer x 128 teacher from scratch (a time-capped number of steps, windows of 192 tokens);
3. ``kdfast.study.run_study``: a 2-layer student from teacher layers 0, 2, short distillations
   (the paper's shape): attention loss {score MSE, attention KL} x mapping {uniform, last_k, mean,
   learned: --mappings; default uniform, last_k, mean) x (attention weight, hidden weight) in {1, 4} x {1, 4}, plus kdfast's default layer KD
   setting (LayerKD() losses: embedding + hidden + attention-score MSE, weight 1, and its mapping:
   mean since this study's 2026-12-06 run, uniform before; a grid point) and logits only (DistillConfig() default), 3 seeds, seed-major so a cut-short study
   covers every configuration once before any second seed;
4. copy runs.csv to bench/results/kd_study.csv, the heatmap and the best configuration to
   bench/results/kd_study_heatmap.png / kd_study_best_config.json, and write bench/results/kd_study.md
   (the table, the teacher's F1, the machine).

A rerun with the same --work-dir resumes (finished runs are skipped).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TEACHER = dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=2, intermediate_size=512,
               attention_probs_dropout_prob=0.0)
GRID = {"mapping": ["uniform", "last_k", "mean", "learned"], "attention_loss": ["attention_score", "attention_kl"],
        "hidden_loss": ["hidden"], "attention_weight": [1.0, 4.0], "hidden_weight": [1.0, 4.0],
        "embedding_weight": [1.0], "logit_loss": ["kl"], "seed": [0, 1, 2]}


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU, shared with other jobs ({platform.python_version()})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", default="/tmp/kd_study")
    p.add_argument("--minutes", type=float, default=40.0, help="time cap of the whole script")
    p.add_argument("--teacher-minutes", type=float, default=10.0)
    p.add_argument("--teacher-epochs", type=float, default=4.0, help="teacher epochs (stopped early by --teacher-minutes)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--num-train", type=int, default=1500)
    p.add_argument("--num-dev", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-length", type=int, default=128, help="windows of the study runs")
    p.add_argument("--mappings", default="uniform,last_k,mean", help="e.g. uniform,last_k,mean,learned")
    p.add_argument("--report-only", action="store_true", help="rewrite the results from the work dir's runs.csv")
    a = p.parse_args(argv)
    if a.report_only:
        return report(a)
    t0 = time.time()
    deadline = t0 + 60 * a.minutes
    import torch
    torch.set_num_threads(1)
    from transformers import AutoTokenizer, TrainerCallback
    from kdfast.distill.stage import TrainOptions, train_stage
    from kdfast.distill.student import student_from_config
    from kdfast.qa.configs import teacher_config
    from kdfast.qa.evaluate import evaluate_qa
    from kdfast.qa.features import eval_features, train_features
    from kdfast.qa.load import load_squad
    from kdfast.qa.synthetic import write_generated
    from kdfast.study import run_study, write_report

    os.makedirs(a.work_dir, exist_ok=True)
    data = os.path.join(a.work_dir, "data")
    if not os.path.exists(os.path.join(data, "dev.json")):
        write_generated(data, num_train=a.num_train, num_dev=a.num_dev, seed=0, vocab_size=2000)
    tok = AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer"))
    L, stride = 192, 64
    teacher_dir = os.path.join(a.work_dir, "teacher")
    f1_file = os.path.join(teacher_dir, "f1.txt")
    if not os.path.exists(f1_file):
        train = load_squad(os.path.join(data, "train.json"))
        dev = load_squad(os.path.join(data, "dev.json"))
        windows = train_features(train, tok, max_seq_length=L, doc_stride=stride)
        cap = time.time() + 60 * a.teacher_minutes

        class Cap(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if time.time() > cap:
                    control.should_training_stop = True

        model = student_from_config(teacher_config(tok, **TEACHER), attn_implementation="sdpa", seed=0)
        opts = TrainOptions(num_train_epochs=a.teacher_epochs, per_device_train_batch_size=16, learning_rate=1e-3, seed=0,
                            disable_tqdm=True, logging_steps=50, warmup_ratio=0.1, save_total_limit=1)
        args = opts.training_arguments(os.path.join(a.work_dir, "teacher-run"), save_strategy="no")
        tr = train_stage(model, windows, tok, os.path.join(a.work_dir, "teacher-run"), args, callbacks=[Cap()],
                         resume=False)
        tr.model.save_pretrained(teacher_dir)
        tok.save_pretrained(teacher_dir)
        res = evaluate_qa(tr.model.eval(), tok, dev, features=eval_features(dev, tok, max_seq_length=L,
                          doc_stride=stride), progress=False)
        with open(f1_file, "w") as fh:
            fh.write(f"{res.metrics['f1']:.2f} {res.metrics['exact_match']:.2f} {tr.state.global_step}\n")
    teacher_f1, teacher_em, teacher_steps = open(f1_file).read().split()
    print(f"[kd_study] teacher F1 {teacher_f1} EM {teacher_em} after {teacher_steps} steps "
          f"({(time.time() - t0) / 60:.1f} min so far)", flush=True)

    grid = _grid(a)
    out = os.path.join(a.work_dir, "study")
    rows = run_study(grid, os.path.join(data, "train.json"), os.path.join(data, "dev.json"), teacher_dir, out,
                     num_workers=a.num_workers, seed_major=True, deadline=deadline - 90)
    write_report(rows, grid.train, out, title="kd_study")
    report(a, started=t0)


def _grid(a):
    from kdfast.study import make_grid
    return make_grid({"grid": dict(GRID, mapping=a.mappings.split(",")), "train": {
        "student_layers": "0,2", "max_steps": a.max_steps, "learning_rate": 1e-3, "batch_size": a.batch_size,
        "temperature": 2.0, "alpha": 0.5, "max_seq_length": a.max_seq_length, "doc_stride": a.max_seq_length // 2,
        "include_default": True, "include_logits_only": True}})


def statement(summary, runs):
    """Which choices matter and by how much (marginal means over the finished runs), and the best
    configuration against kdfast's default layer KD setting and logits only."""
    from kdfast.study.grid import DEFAULT_CONFIG, LOGITS_ONLY, config_name
    out = []
    layer = [r for r in runs if r["mapping"] != "none"]
    spreads = sorted(e["f1_std"] for e in summary if e["n"] > 1)
    med = spreads[len(spreads) // 2] if spreads else float("nan")
    parts = []
    for knob in ("mapping", "attention_loss", "attention_weight", "hidden_weight"):
        vals = {}
        for r in layer:
            vals.setdefault(r[knob], []).append(r["f1"])
        means = {k: sum(v) / len(v) for k, v in vals.items()}
        if len(means) > 1:
            lo, hi = min(means, key=means.get), max(means, key=means.get)
            parts.append(f"{knob}: {means[hi] - means[lo]:.2f} F1 between the best ({hi}, {means[hi]:.2f}) and the "
                         f"worst ({lo}, {means[lo]:.2f}) value")
    out.append("Marginal mean dev F1 over the finished layer-KD runs, per knob: " + "; ".join(parts) +
               f". Median seed std of a configuration: {med:.2f} F1.")
    by = {e["config"]: e for e in summary}
    best = summary[0]
    for name, what in ((config_name(DEFAULT_CONFIG), "kdfast's default layer KD setting (LayerKD() losses, mean mapping)"),
                       (config_name(dict(DEFAULT_CONFIG, mapping="uniform")),
                        "the default layer KD setting before 2026-12-06 (LayerKD() losses, uniform mapping)"),
                       (config_name(LOGITS_ONLY), "logits only (DistillConfig() default)")):
        e = by.get(name)
        if e is None:
            out.append(f"{what}: not run within the cap.")
            continue
        diff = best["f1_mean"] - e["f1_mean"]
        spread = max(best["f1_std"], e["f1_std"])
        verdict = "more" if diff > spread else "not more"
        out.append(f"The best configuration (`{best['config']}`, F1 {best['f1_mean']:.2f} ± {best['f1_std']:.2f}, "
                   f"n={best['n']}) beats {what} (F1 {e['f1_mean']:.2f} ± {e['f1_std']:.2f}, n={e['n']}) by "
                   f"{diff:.2f} F1: {verdict} than the seed spread ({spread:.2f}).")
    return " ".join(out)


def report(a, started=None):
    from kdfast.study import read_runs, write_report
    from kdfast.study.report import markdown_table, summarize
    out = os.path.join(a.work_dir, "study")
    rows = read_runs(out)
    L = a.max_seq_length
    grid = _grid(a)
    write_report(rows, grid.train, out, title="kd_study")
    teacher_f1, teacher_em, teacher_steps = open(os.path.join(a.work_dir, "teacher", "f1.txt")).read().split()
    os.makedirs(RESULTS, exist_ok=True)
    shutil.copy(os.path.join(out, "runs.csv"), os.path.join(RESULTS, "kd_study.csv"))
    for name, dest in (("heatmap.png", "kd_study_heatmap.png"), ("best_config.json", "kd_study_best_config.json")):
        if os.path.exists(os.path.join(out, name)):
            shutil.copy(os.path.join(out, name), os.path.join(RESULTS, dest))
    summary = summarize(rows)
    total = len(grid.runs())
    md = ["# kd_study: distillation design study on the built-in synthetic data", "",
          f"Machine: {machine()}. Teacher: 4 x 128 BERT trained from scratch for {teacher_steps} steps "
          f"(dev F1 {teacher_f1}, EM {teacher_em}); student: teacher layers 0, 2; each run {a.max_steps} steps "
          f"of batch {a.batch_size}, lr 1e-3, T = 2, alpha = 0.5, study windows of {L} tokens (stride {L // 2}; teacher trained on 192 / 64); {a.num_train} train / {a.num_dev} dev "
          f"questions. {len(rows)} of {total} runs finished within the {a.minutes:g}-minute cap "
          f"({a.num_workers} worker processes, 1 thread each). Spread: sample std over seeds (ddof=1), and min-max.",
          "", "## Statement", "", statement(summary, rows), "", "## Table (sorted by mean dev F1)", "",
          markdown_table(summary), ""]
    with open(os.path.join(RESULTS, "kd_study.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))
    if started is not None:
        print(f"[kd_study] done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
