"""Active learning for QA: dev F1 at a 20% labelling budget per strategy, and pool-scoring speed.

    python bench/active_learning.py --quick      # ~2 min on 2 CPU cores: small pool, 1 seed
    python bench/active_learning.py              # 2,000-question pool, 3 seeds
    python bench/active_learning.py --real       # SQuAD in /work/shared/data/squad, 1 seed

For each strategy (random, least_confidence, margin, hybrid, disagreement) and
seed, :class:`kdfast.active.ActiveLearningLoop` distils a fresh student (the
teacher's layers) each round from the cached teacher logits, on the questions
labelled so far, until 20% of the pool is labelled. The same student distilled
on 100% of the pool is the reference. A teacher is fine-tuned first on the
whole pool (the oracle's answers), or given with ``--teacher``.

Pool scoring speed: the final student scores the whole pool (margin: one
forward over every window + n-best post-processing) with kdfast (kdfast
attention, unpadded encoder, dynamic padding) and as stock HF would
(``attn_implementation="sdpa"``, windows padded to ``max_seq_length``), in
alternating repetitions (medians).

Rows append to ``bench/results/active_learning.csv`` (strategy, seed,
labeled_fraction, em, f1, pool_questions_per_s, config, machine, timestamp):
one per round of every run, one for the reference (labeled_fraction 1.0) and
one per scoring provider (strategy ``scoring:kdfast`` / ``scoring:hf-sdpa-padded``).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from harness import RESULTS, device_name  # noqa: E402

STRATEGIES = ("random", "least_confidence", "margin", "hybrid", "disagreement")
COLUMNS = ["strategy", "seed", "labeled_fraction", "em", "f1", "pool_questions_per_s", "config", "machine",
           "timestamp"]
SQUAD_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared", "data",
                         "squad")

SIZES = {
    "quick": dict(pool=120, dev=30, teacher=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                  intermediate_size=128),
                  student_layers="1", max_seq_length=128, doc_stride=48, teacher_epochs=2.0, epochs=1.0,
                  seed_fraction=0.1, query_fraction=0.1, seeds=1, vocab=2000, reps=1),
    "full": dict(pool=2000, dev=400, teacher=dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                                  intermediate_size=1024),
                 student_layers="0,2", max_seq_length=256, doc_stride=96, teacher_epochs=4.0, epochs=4.0,
                 seed_fraction=0.02, query_fraction=0.03, seeds=3, vocab=4000, reps=3),
    "real": dict(pool=None, dev=1000, teacher=dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                                   intermediate_size=1024),
                 student_layers="0,2", max_seq_length=384, doc_stride=128, teacher_epochs=2.0, epochs=2.0,
                 seed_fraction=0.02, query_fraction=0.03, seeds=1, vocab=8000, reps=3),
}


_T0 = time.perf_counter()


def _log(msg):
    print(f"[bench active {time.perf_counter() - _T0:5.0f} s] {msg}", flush=True)


def _data(mode, size, seed=0, data_dir=None, teacher_dir=None):
    """(pool, dev, tokenizer, source). With ``teacher_dir`` on real data the teacher's own tokenizer
    is used (a pretrained teacher such as the MiniLM one of bench/qa_recipe.py --real)."""
    from datasets import Dataset
    if data_dir:  # a `kdfast generate-data` / demo data directory: train.json, dev.json, tokenizer/
        from kdfast.qa.load import load_squad
        from transformers import AutoTokenizer
        pool = load_squad(os.path.join(data_dir, "train.json"))
        dev = load_squad(os.path.join(data_dir, "dev.json"))
        if size["pool"]:
            pool = pool.select(range(min(size["pool"], len(pool))))
        dev = dev.select(range(min(size["dev"], len(dev))))
        return pool, dev, AutoTokenizer.from_pretrained(os.path.join(data_dir, "tokenizer")), data_dir
    if mode == "real":
        from kdfast.qa.load import load_squad
        from kdfast.qa.tokenizer import train_wordpiece_tokenizer
        train = sorted(f for f in os.listdir(SQUAD_DIR) if f.startswith("train") and f.endswith(".json"))
        pool = load_squad(os.path.join(SQUAD_DIR, train[0]))
        dev = load_squad(os.path.join(SQUAD_DIR, "dev-v1.1.json"))
        if size["pool"]:
            pool = pool.select(range(min(size["pool"], len(pool))))
        dev = dev.select(range(min(size["dev"], len(dev))))
        if teacher_dir:
            from transformers import AutoTokenizer
            return pool, dev, AutoTokenizer.from_pretrained(teacher_dir), train[0]
        texts = list(dict.fromkeys(pool["context"])) + list(pool["question"])
        return pool, dev, train_wordpiece_tokenizer(texts, vocab_size=size["vocab"]), train[0]
    from kdfast.qa.synthetic import generate_squad
    from kdfast.qa.tokenizer import builtin_tokenizer
    d = generate_squad(size["pool"], size["dev"], seed=seed)
    pool, dev = Dataset.from_list(d["train"]), Dataset.from_list(d["validation"])
    tok = builtin_tokenizer(vocab_size=size["vocab"])
    return pool, dev, tok, "kdfast.qa.synthetic"


def _options(epochs, seed, lr=1e-3, **kw):
    from kdfast.distill.stage import TrainOptions
    return TrainOptions(num_train_epochs=epochs, per_device_train_batch_size=16, learning_rate=lr, seed=seed,
                        logging_steps=1000, disable_tqdm=True, warmup_ratio=0.1, **kw)


def _teacher(out, pool, tok, size, teacher_dir):
    from kdfast.distill.stage import train_stage
    from kdfast.distill.student import student_from_config
    from kdfast.qa.configs import teacher_config
    from kdfast.qa.features import train_features
    if teacher_dir:
        return teacher_dir
    path = os.path.join(out, "teacher", "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        _log(f"fine-tuning the teacher on {len(pool)} questions")
        model = student_from_config(teacher_config(tok, **size["teacher"]), attn_implementation="kdfast", seed=0)
        windows = train_features(pool, tok, max_seq_length=size["max_seq_length"], doc_stride=size["doc_stride"])
        trainer = train_stage(model, windows, tok, os.path.join(out, "teacher"), _options(size["teacher_epochs"], 0))
        trainer.save_model(path)
    return path


def _reference(out, pool, dev, tok, teacher_dir, size, lr=1e-3, max_steps=-1):
    """The same student distilled on 100% of the pool with the same options: (em, f1, model dir)."""
    from kdfast.distill.models import inference_ready, load_qa_model
    from kdfast.distill.stage import train_stage
    from kdfast.distill.student import parse_student_layers, student_from_teacher
    from kdfast.distill.teacher_cache import TeacherCache
    from kdfast.distill.trainer import DistillConfig
    from kdfast.qa.evaluate import evaluate_qa
    from kdfast.qa.features import eval_features, train_features
    kw = dict(max_seq_length=size["max_seq_length"], doc_stride=size["doc_stride"])
    teacher = load_qa_model(teacher_dir)
    windows = train_features(pool, tok, **kw)
    cache = TeacherCache.build(teacher, windows, tok, os.path.join(out, "teacher_cache"), progress=False)
    layers = parse_student_layers(size["student_layers"], teacher.config.num_hidden_layers)
    student = student_from_teacher(teacher, layers, attn_implementation="kdfast")
    trainer = train_stage(student, cache.attach(windows), tok, os.path.join(out, "reference"),
                          _options(size["epochs"], 0, lr, max_steps=max_steps), distill=DistillConfig())
    path = os.path.join(out, "reference", "model")
    trainer.save_model(path)
    m = evaluate_qa(inference_ready(load_qa_model(path)), tok, dev, features=eval_features(dev, tok, **kw),
                    progress=False).metrics
    return m["exact_match"], m["f1"], path


def _scoring_speed(model_dir, pool, tok, size):
    """Questions/s of margin pool scoring: kdfast vs stock HF (sdpa, padded to max_seq_length)."""
    from kdfast.active.pool import score_pool
    from kdfast.distill.models import load_qa_model
    from kdfast.qa.features import eval_features
    kw = dict(max_seq_length=size["max_seq_length"], doc_stride=size["doc_stride"])
    setups = {"kdfast": (load_qa_model(model_dir), eval_features(pool, tok, **kw)),
              "hf-sdpa-padded": (load_qa_model(model_dir, attn_implementation="sdpa"),
                                 eval_features(pool, tok, pad_to_max_length=True, **kw))}
    times = {k: [] for k in setups}
    for rep in range(size["reps"] + 1):  # the first repetition warms up
        for name, (model, windows) in setups.items():
            _, stats = score_pool(model, tok, pool, pool_windows=windows, strategy="margin", progress=False,
                                  return_stats=True, **kw)
            if rep:
                times[name].append(stats["seconds"])
    return {k: len(pool) / statistics.median(v) for k, v in times.items()}


def _append(rows):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "active_learning.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def _mean_spread(xs):
    if not xs:
        return "n/a"
    m = statistics.fmean(xs)
    return f"{m:.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{m:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small pool and teacher, 1 seed (~2 min on 2 cores)")
    ap.add_argument("--real", action="store_true", help="SQuAD from /work/shared/data/squad, 1 seed")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", type=int, default=None, help="seeds per strategy (default: 3, quick/real: 1)")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--max_pool", type=int, default=None, help="--real: use the first N training questions")
    ap.add_argument("--teacher", default=None, help="a fine-tuned teacher directory (else one is trained)")
    ap.add_argument("--out", default=None, help="work directory (default /tmp/kdfast-bench-al-<mode>)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=None,
                    help="synthetic data directory (train.json, dev.json, tokenizer/), e.g. the data of "
                         "bench/qa_recipe.py --synthetic, whose teacher --teacher then gives; else generated")
    ap.add_argument("--pool", type=int, default=None, help="pool size in questions (default: the mode's)")
    ap.add_argument("--dev", type=int, default=None, help="dev questions (default: the mode's)")
    ap.add_argument("--epochs", type=float, default=None, help="student epochs per round (default: the mode's)")
    ap.add_argument("--max_steps", type=int, default=-1,
                    help="train every round and the 100%% reference for exactly this many steps (a fixed compute "
                         "budget per round, as when each round trains to convergence) instead of --epochs over "
                         "the labelled set; default: epochs")
    ap.add_argument("--student_layers", default=None, help="teacher layers the student keeps (default: the mode's)")
    ap.add_argument("--max_seq_length", type=int, default=None, help="window length (default: the mode's)")
    ap.add_argument("--doc_stride", type=int, default=None, help="window overlap (default: the mode's)")
    ap.add_argument("--lr", type=float, default=1e-3,
                    help="student learning rate (default %(default)s: from-scratch teachers; ~1e-4 for a "
                         "pretrained one)")
    ap.add_argument("--kd_on_pool", action="store_true",
                    help="also distil on the unlabeled pool from the teacher cache (costs no labels)")
    ap.add_argument("--query_fraction", type=float, default=None,
                    help="questions labelled per round, a fraction of the pool (default: the mode's, 0.03 for "
                         "full / real)")
    ap.add_argument("--speed_questions", type=int, default=None,
                    help="time pool scoring on the first N pool questions (default: the whole pool)")
    ap.add_argument("--no_reference", action="store_true",
                    help="skip the 100%% reference and the scoring-speed rows (a second process sharing --out "
                         "that runs other strategies while the first one measures them)")
    a = ap.parse_args(argv)
    mode = "real" if a.real else "quick" if a.quick else "full"
    if a.data:
        missing = [f for f in ("train.json", "dev.json", "tokenizer") if not os.path.exists(os.path.join(a.data, f))]
        if missing:
            raise SystemExit(f"--data {a.data}: missing {', '.join(missing)} (expected a `kdfast generate-data` "
                             "directory: train.json, dev.json, tokenizer/)")
    if a.teacher and not os.path.exists(os.path.join(a.teacher, "config.json")):
        raise SystemExit(f"--teacher {a.teacher}: no config.json there (expected a saved QA model directory)")
    if a.real and not os.path.exists(os.path.join(SQUAD_DIR, "dev-v1.1.json")):
        print(f"skipping --real: no SQuAD files in {os.path.normpath(SQUAD_DIR)}")
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    size = dict(SIZES[mode])
    if a.max_pool:
        size["pool"] = a.max_pool
    for key in ("pool", "dev", "epochs", "student_layers", "max_seq_length", "doc_stride", "query_fraction"):
        if getattr(a, key) is not None:
            size[key] = getattr(a, key)
    seeds = a.seeds or size["seeds"]
    strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    out = a.out or f"/tmp/kdfast-bench-al-{mode}"
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    from kdfast.active.loop import ALConfig, ActiveLearningLoop
    from kdfast.active.strategies import available_strategies
    bad = [s for s in strategies if s not in available_strategies()]
    if bad:
        raise SystemExit(f"unknown strategies {bad}; available: {', '.join(available_strategies())}")
    pool, dev, tok, source = _data(mode, size, data_dir=a.data, teacher_dir=a.teacher if a.real else None)
    teacher_dir = _teacher(out, pool, tok, size, a.teacher)
    config = (f"{source} pool={len(pool)} dev={len(dev)} teacher={a.teacher or size['teacher']} student_layers="
              f"{size['student_layers']} L={size['max_seq_length']} budget={a.budget} seed={size['seed_fraction']} "
              f"query={size['query_fraction']} epochs={size['epochs']}"
              f"{f' max_steps={a.max_steps}' if a.max_steps > 0 else ''} lr={a.lr:g} kd_on_pool={a.kd_on_pool} mode={mode}")
    machine = device_name("cpu")
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows, final = [], {}
    for strategy in strategies:
        for seed in range(seeds):
            _log(f"{strategy} seed {seed}")
            cfg = ALConfig(os.path.join(out, f"{strategy}-seed{seed}"), strategy=strategy, seed=seed,
                           seed_fraction=size["seed_fraction"], query_fraction=size["query_fraction"],
                           budget=a.budget, student_layers=size["student_layers"],
                           train=_options(size["epochs"], seed, a.lr, max_steps=a.max_steps),
                           max_seq_length=size["max_seq_length"],
                           doc_stride=size["doc_stride"], kd_on_pool=a.kd_on_pool, progress=False)
            loop = ActiveLearningLoop(cfg, pool, dev, tok, teacher_dir=teacher_dir)
            res = loop.run()
            for r in res["rounds"]:
                rows.append({"strategy": strategy, "seed": seed, "labeled_fraction": round(r["fraction"], 4),
                             "em": round(r["exact_match"], 3), "f1": round(r["f1"], 3),
                             "pool_questions_per_s": "" if r.get("pool_questions_per_s") is None
                             else round(r["pool_questions_per_s"], 2), "config": config, "machine": machine,
                             "timestamp": stamp})
            last = res["rounds"][-1]
            final.setdefault(strategy, []).append(last)
            qps = [r["pool_questions_per_s"] for r in res["rounds"] if r.get("pool_questions_per_s")]
            last["mean_qps"] = statistics.fmean(qps) if qps else None
            final_model = loop.state["checkpoint"]
    if a.no_reference:
        path = _append(rows)
        print(f"\n{config}\nmachine: {machine}\n")
        for strategy, lasts in final.items():
            print(f"{strategy}: F1 at {a.budget:.0%} {_mean_spread([x['f1'] for x in lasts])}")
        print(f"\nrows appended to {path} (--no_reference: no 100% reference, no scoring speed)")
        return 0
    _log("reference: the same student on 100% of the pool")
    ref_em, ref_f1, ref_dir = _reference(out, pool, dev, tok, teacher_dir, size, a.lr, a.max_steps)
    rows.append({"strategy": "reference-100%", "seed": 0, "labeled_fraction": 1.0, "em": round(ref_em, 3),
                 "f1": round(ref_f1, 3), "pool_questions_per_s": "", "config": config, "machine": machine,
                 "timestamp": stamp})
    _log("pool scoring speed: kdfast vs HF sdpa padded")
    speed_pool = pool.select(range(min(a.speed_questions, len(pool)))) if a.speed_questions else pool
    speed = _scoring_speed(final_model if strategies else ref_dir, speed_pool, tok, size)
    for name, qps in speed.items():
        rows.append({"strategy": f"scoring:{name}", "seed": "", "labeled_fraction": "", "em": "", "f1": "",
                     "pool_questions_per_s": round(qps, 2), "config": config, "machine": machine, "timestamp": stamp})
    path = _append(rows)
    from kdfast.active.plot import plot_curves
    logs = [os.path.join(out, f"{s}-seed{k}", "al_log.json") for s in strategies for k in range(seeds)]
    curve = plot_curves(logs, os.path.join(out, "curves.png"), reference={"label": "100% of the pool", "value": ref_f1})
    print(f"\n{config}\nmachine: {machine}\n")
    print(f"| strategy | runs | labeled | EM at {a.budget:.0%} | F1 at {a.budget:.0%} | pool scoring q/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for strategy, lasts in final.items():
        qps = [x["mean_qps"] for x in lasts if x.get("mean_qps")]
        em = _mean_spread([x["exact_match"] for x in lasts])
        print(f"| {strategy} | {len(lasts)} | {lasts[0]['labeled']} | {em} "
              f"| {_mean_spread([x['f1'] for x in lasts])} | {f'{statistics.fmean(qps):.1f}' if qps else 'n/a'} |")
    print(f"| reference (100%) | 1 | {len(pool)} | {ref_em:.2f} | {ref_f1:.2f} | |")
    print(f"\npool scoring (margin, {len(speed_pool)} questions, final student): kdfast {speed['kdfast']:.1f} q/s, "
          f"HF sdpa padded to {size['max_seq_length']} {speed['hf-sdpa-padded']:.1f} q/s "
          f"({speed['kdfast'] / speed['hf-sdpa-padded']:.2f}x)")
    print(f"\nrows appended to {path}; curves: {curve}  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
