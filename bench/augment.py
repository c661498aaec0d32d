"""Learning to augment (issue #14) on the built-in generator: full method vs every baseline.

Source: resource-rich (geography + science + history train questions); target: biography
with 16 / 64 / 256 labeled questions (a quarter, by passage, held out as the selector's
reward dev; never trained on by any method); evaluation: biography *validation* questions
(entities unseen in train). Per seed:

1. teacher (4 x 256) fine-tuned on the source, then on each target size;
   a second teacher fine-tuned on the target alone (random init) as the comparison row;
2. student (1 x 128, ~13% of the teacher's parameters) distilled on the source once
   (the stand-in for a general-distilled TinyBERT), shared by every method;
3. every method of :mod:`kdfast.augment.loop` with the same warm-up / final budget.

Rows go to bench/results/augment.csv as they finish (a capped run keeps what it measured);
``--report`` rewrites bench/results/augment.md from the CSV.

    OMP_NUM_THREADS=1 python bench/augment.py --seeds 0 --sizes 16,64,256
    python bench/augment.py --report
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CSV = os.path.join(RESULTS, "augment.csv")
MD = os.path.join(RESULTS, "augment.md")
COLUMNS = ["kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "p20", "p50", "p80", "config",
           "device", "timestamp", "version"]
SOURCE = ("geography", "science", "history")
TARGET = "biography"
TEACHER = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024)
STUDENT = dict(num_hidden_layers=1, hidden_size=128, num_attention_heads=2, intermediate_size=512)
METHODS = ("full", "none", "tinybert", "mixkd", "source", "random", "confidence")
DEVICE = "2-core AMD EPYC (Zen 3), no GPU, shared with 3 other developers' jobs"


def _row(provider, metric, value, n, seed, config):
    import kdfast
    return {"kernel": "augment", "provider": provider, "mode": f"seed{seed}", "metric": metric, "unit": "points",
            "x_name": "target_questions", "x_value": n, "p20": value, "p50": value, "p80": value,
            "config": json.dumps(config, sort_keys=True), "device": DEVICE,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "version": getattr(kdfast, "__version__", "")}


def _append(rows):
    os.makedirs(RESULTS, exist_ok=True)
    new = not os.path.exists(CSV)
    with open(CSV, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)


def run(a):
    import torch
    from kdfast.augment.data import answered, relabel, split_target, synthetic_domains, to_windows
    from kdfast.augment.distil import Scorer, train_steps
    from kdfast.augment.loop import AugmentConfig, AugmentLoop, finetune_teacher
    from kdfast.augment.mlm import build_mlm, train_mlm
    from kdfast.distill.models import count_parameters
    from kdfast.distill.student import student_from_config
    from kdfast.qa.configs import student_config, teacher_config
    from kdfast.qa.tokenizer import train_wordpiece_tokenizer

    torch.set_num_threads(a.threads)
    sizes = [int(s) for s in a.sizes.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    work = a.work_dir
    t0 = time.perf_counter()

    def log(msg):
        print(f"[bench augment {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    for seed in [int(s) for s in a.seeds.split(",")]:
        d = synthetic_domains(SOURCE, TARGET, n_source=a.source_questions, n_target=max(sizes),
                              n_target_dev_pool=0, n_eval=a.eval_questions, seed=seed)
        texts = [r["context"] for r in d["source"] + d["target"]] + [r["question"] for r in d["source"] + d["target"]]
        tok = train_wordpiece_tokenizer(texts, vocab_size=2000)
        base = student_from_config(teacher_config(tok, **TEACHER), attn_implementation="sdpa", seed=seed)
        log(f"seed {seed}: teacher on {len(d['source'])} source questions, {a.teacher_steps} steps")
        finetune_teacher(base, d["source"], tok, steps=a.teacher_steps, seed=seed)
        student0 = student_from_config(student_config(tok, **STUDENT), attn_implementation="sdpa", seed=seed)
        ratio = count_parameters(student0) / count_parameters(base)
        log(f"student/teacher parameters: {count_parameters(student0)}/{count_parameters(base)} = {ratio:.3f}")
        src_w = relabel(base, tok, to_windows(answered(d["source"]), tok))
        train_steps(student0, src_w, tok, steps=a.student_source_steps, seed=seed)  # general-distillation stand-in
        student0_sd = {k: v.clone() for k, v in student0.state_dict().items()}
        for n in sizes:
            target = d["target"][:n]
            train_part, _ = split_target(target, max(1, round(0.25 * n)), seed)
            scorer = Scorer(d["eval"], tok)
            cfg_common = {"source": SOURCE, "target": TARGET, "source_questions": len(d["source"]),
                          "eval_questions": len(d["eval"]), "teacher": TEACHER, "student": STUDENT,
                          "student_teacher_params": round(ratio, 4), "target_train_questions": len(train_part)}
            teacher = student_from_config(teacher_config(tok, **TEACHER), attn_implementation="sdpa")
            teacher.load_state_dict(base.state_dict())
            finetune_teacher(teacher, train_part, tok, steps=a.teacher_target_steps, seed=seed)
            t_score = scorer(teacher)
            only = student_from_config(teacher_config(tok, **TEACHER), attn_implementation="sdpa", seed=seed + 7)
            finetune_teacher(only, train_part, tok, steps=a.teacher_only_steps, seed=seed)
            o_score = scorer(only)
            log(f"n={n}: teacher (source + target) F1 {t_score['f1']:.1f}; teacher on target alone F1 "
                f"{o_score['f1']:.1f}")
            _append([_row("teacher (source + target)", "f1", t_score["f1"], n, seed, cfg_common),
                      _row("teacher (source + target)", "exact_match", t_score["exact_match"], n, seed, cfg_common),
                      _row("teacher (target alone)", "f1", o_score["f1"], n, seed, cfg_common),
                      _row("teacher (target alone)", "exact_match", o_score["exact_match"], n, seed, cfg_common)])
            mlm_dir = os.path.join(work, f"seed{seed}-n{n}", "mlm")
            if not os.path.exists(os.path.join(mlm_dir, "config.json")):
                mlm = build_mlm(tok, seed=seed)
                train_mlm(mlm, tok, sorted({r["context"] for r in d["source"] + train_part}), steps=a.mlm_steps,
                          seed=seed)
                mlm.save_pretrained(mlm_dir)
            keep_rate = 0.5
            for m in sorted(methods, key=lambda m: m != "full"):
                t1 = time.perf_counter()
                cfg = AugmentConfig(method=m, episodes=a.episodes, candidates_per_episode=a.candidates,
                                    episode_steps=a.episode_steps, warmup_steps=a.warmup_steps,
                                    final_steps=a.final_steps, keep_rate=keep_rate, mlm_path=mlm_dir, seed=seed)
                student = student_from_config(student_config(tok, **STUDENT), attn_implementation="sdpa")
                student.load_state_dict(student0_sd)
                out = os.path.join(work, f"seed{seed}-n{n}", m)
                res = AugmentLoop(cfg, source=d["source"], target=target, eval_records=d["eval"], teacher=teacher,
                                  student=student, tokenizer=tok, output_dir=out, log=log).run(resume=True)
                if m == "full":
                    cand = sum(e["candidates"] for e in res["episodes"])
                    keep_rate = res["kept"] / cand if cand else 0.5
                c = dict(cfg_common, method=m, kept=res["kept"], seconds=round(time.perf_counter() - t1, 1),
                         episodes=a.episodes, candidates=a.candidates, warmup_steps=a.warmup_steps,
                         final_steps=a.final_steps, episode_steps=a.episode_steps, keep_rate=round(keep_rate, 3))
                _append([_row(m, "f1", res["eval"]["f1"], n, seed, c),
                         _row(m, "exact_match", res["eval"]["exact_match"], n, seed, c)])
                log(f"n={n} {m}: F1 {res['eval']['f1']:.2f} EM {res['eval']['exact_match']:.2f} "
                    f"(kept {res['kept']}, {time.perf_counter() - t1:.0f}s)")
    report()


NAMES = {"full": "generator + reinforced selector (full)", "none": "KD without augmentation",
         "tinybert": "TinyBERT word replacement", "mixkd": "MixKD embedding mixup",
         "source": "source data added unchanged", "random": "generator, random keep (same rate)",
         "confidence": "generator, confidence-heuristic selector"}


def report():
    with open(CSV) as fh:
        rows = [r for r in csv.DictReader(fh) if r["metric"] == "f1"]
    sizes = sorted({int(r["x_value"]) for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    cell = {}
    for r in rows:
        cell.setdefault((r["provider"], int(r["x_value"])), []).append(float(r["p50"]))
    lines = ["# kdfast augment: learning to augment on the built-in generator", "",
             f"Machine: {DEVICE}. Source {'+'.join(SOURCE)}, target {TARGET}; F1 on target validation questions "
             "(mean over seeds, +- half the min-max spread, [n seeds]). Measured numbers only; "
             "see bench/results/augment.csv for every row and its config.", "",
             "| method | " + " | ".join(f"{n} target questions" for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for p in providers:
        out = []
        for n in sizes:
            v = cell.get((p, n))
            if not v:
                out.append("-")
            else:
                spread = (max(v) - min(v)) / 2
                out.append(f"{statistics.mean(v):.2f} +- {spread:.2f} [{len(v)}]")
        lines.append(f"| {NAMES.get(p, p)} | " + " | ".join(out) + " |")
    with open(MD, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0")
    p.add_argument("--sizes", default="16,64,256")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--source_questions", type=int, default=600)
    p.add_argument("--eval_questions", type=int, default=80)
    p.add_argument("--teacher_steps", type=int, default=120)
    p.add_argument("--teacher_target_steps", type=int, default=15)
    p.add_argument("--teacher_only_steps", type=int, default=30)
    p.add_argument("--student_source_steps", type=int, default=80)
    p.add_argument("--mlm_steps", type=int, default=300)
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--episode_steps", type=int, default=8)
    p.add_argument("--warmup_steps", type=int, default=40)
    p.add_argument("--final_steps", type=int, default=120)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work_dir", default="/tmp/kdfast-bench-augment")
    p.add_argument("--report", action="store_true", help="only rewrite augment.md from augment.csv")
    a = p.parse_args()
    if a.report:
        report()
    else:
        run(a)


if __name__ == "__main__":
    main()
