"""Learning to augment (issue #14) on the built-in generator: full method vs every baseline.

Source: resource-rich (geography + science + history train questions); target: biography
with 16 / 64 / 256 labeled questions (a quarter, by passage, held out as the selector's
reward dev; never trained on by any method); evaluation: biography *validation* questions
(entities unseen in train). Per seed:

1. teacher (``--teacher_shape``, default 4 x 256) fine-tuned on the source, then on each target
   size; a second teacher fine-tuned on the target alone (random init) as the comparison row;
2. student (``--student_shape``, default 1 x 128, ~13% of that teacher's parameters) distilled on
   the source once (the stand-in for a general-distilled TinyBERT), shared by every method;
3. every method of :mod:`kdfast.augment.loop` with the same warm-up / final budget.

``--teacher_seed S`` trains step 1's source teacher and step 2's student once, from data seed S,
and shares them across ``--seeds``: each seed then draws its own target questions (from a pool
4x the largest size) and seeds every method. Either way they are saved under
``--work_dir/base-seed<S>`` and loaded on a rerun (a finished method run is loaded too).

``--source_domains biography,geography,science,history --target_domain sport`` is the near-target case:
sport (``kdfast.qa.synthetic.RELATED_DOMAINS``) shares biography's towns and half its phrasings, a target
near the source as a related real domain is; ``--teacher_mlm_steps`` pre-trains the teacher's encoder on
unlabelled text of every domain first (measured: the two together lift the teacher on the target from ~5.5 to
~8 F1 only; bench/results/augment.md).

``--teacher DIR`` (without ``--real``) starts the teacher from a pretrained model directory instead of a
from-scratch ``--teacher_shape`` one: its tokenizer replaces the built-in one, it is fine-tuned on the source for
``--teacher_steps`` (use ``--teacher_learning_rate 1e-4``), and the "teacher (target alone)" row starts from the
same directory or from ``--teacher_only_init DIR`` (the research compares a BERT fine-tuned on the target alone:
give the plain pretrained encoder there when ``--teacher`` is a QA model already). E.g. the all-MiniLM-L6-v2 encoder
of ../shared/data/README.md (a new QA head); the student (``--student_shape``, its own random weights) then has
that tokenizer's vocabulary. The report has one table per (source, target, teacher start) triple.

Rows go to bench/results/augment.csv as they finish (a capped run keeps what it measured);
``--report`` rewrites bench/results/augment.md from the CSV.

    OMP_NUM_THREADS=1 python bench/augment.py --seeds 0 --sizes 16,64,256
    OMP_NUM_THREADS=1 python bench/augment.py --seeds 1 --teacher_seed 0 --teacher_shape 6x128 \
        --student_shape 1x64 --teacher_steps 2000 ...     # one process per seed, a shared teacher
    python bench/augment.py --report

``--real --teacher DIR`` runs the one real-data case through ``kdfast augment``: source = the
first ``--real_source`` questions of the real SQuAD train file in ../shared/data/squad, target =
``--real_target`` questions from a few passages of the dev articles ``--real_articles`` (one
topic), evaluated on every other question of those articles (no target passage among them);
the teacher is a QA model fine-tuned on the source (bench/qa_recipe.py --real writes one).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
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
SOURCE = ("geography", "science", "history")  # the defaults of --source_domains / --target_domain
TARGET = "biography"
NOTES = "### What these numbers say"
METHODS = ("full", "none", "tinybert", "mixkd", "source", "random", "confidence")
BOTH = ("target", "source")  # candidates from target questions and from retrieved source questions
VARIANTS = {"full_dev_loss": dict(method="full", reward="dev_loss"),  # bench names -> AugmentConfig fields
            "full_src": dict(method="full", bases=BOTH), "random_src": dict(method="random", bases=BOTH),
            "confidence_src": dict(method="confidence", bases=BOTH),
            "full_src_dev_loss": dict(method="full", bases=BOTH, reward="dev_loss")}
DEVICE = "2-core AMD EPYC (Zen 3), no GPU, shared with 3 other developers' jobs"
SQUAD_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared", "data",
                         "squad")
REAL_ARTICLES = "Ctenophora,Immune_system,Chloroplast"


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


def _shape(spec, flag):
    """'LxH' -> BertConfig overrides: L layers of width H, H // 64 heads (at least 2), FFN 4H."""
    try:
        layers, hidden = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"augment {flag} {spec!r}: expected LAYERSxHIDDEN, e.g. 6x128") from None
    return dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=max(2, hidden // 64),
                intermediate_size=4 * hidden, max_position_embeddings=256)


def _pretrain(a, teacher, tok, data_seed, log):
    """The stand-in for BERT pre-training: masked-LM training of the teacher's encoder on unlabelled
    passages of every domain, the target's included (``--teacher_mlm_passages`` per domain, drawn with
    another seed than every labelled or evaluated question; train-split names only), before any QA
    training. Without it the built-in teacher has never seen the target's words and transfers little."""
    from kdfast.augment.mlm import build_mlm, train_mlm
    from kdfast.qa.synthetic import generate_domain

    corpus = sorted({r["context"] for dom in (*a.source_domains, a.target_domain)
                     for r in generate_domain(dom, 5 * a.teacher_mlm_passages, split="train", seed=data_seed + 1000)})
    c = teacher.config
    mlm = build_mlm(tok, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                    num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                    max_position_embeddings=c.max_position_embeddings, seed=data_seed)
    log(f"teacher pre-training: masked LM {a.teacher_mlm_steps} steps on {len(corpus)} passages")
    loss = train_mlm(mlm, tok, corpus, steps=a.teacher_mlm_steps, learning_rate=1e-3, seed=data_seed)
    missing, unexpected = teacher.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"teacher pre-training: encoder weights do not match ({missing}, {unexpected})")
    log(f"teacher pre-training: masked-LM loss {loss:.2f}")


def _base(a, data_seed, n_target, log):
    """Data, tokenizer, the source-trained teacher and the source-distilled student of ``data_seed``,
    saved under ``work_dir/base-seed<data_seed>`` and loaded from there on a rerun."""
    import torch
    from kdfast.augment.data import synthetic_domains
    from kdfast.augment.loop import finetune_teacher
    from kdfast.distill.models import load_qa_model, load_tokenizer
    from kdfast.qa.tokenizer import train_wordpiece_tokenizer

    d = synthetic_domains(a.source_domains, a.target_domain, n_source=a.source_questions, n_target=n_target, n_target_dev_pool=0,
                          n_eval=a.eval_questions or 80, seed=data_seed)
    base_dir = os.path.join(a.work_dir, f"base-seed{data_seed}")
    t_dir = os.path.join(base_dir, "teacher")
    # One teacher per base directory; one source-distilled student per student kind and step count.
    kind = _student_name(a).replace(" ", "")  # a method's run of this student: <seed dir>/student-<kind>/<method>
    s_path = os.path.join(base_dir, f"student0-{kind}-{a.student_source_steps}-lr{a.learning_rate:g}.pt")
    teacher_shape = _shape(a.teacher_shape, "--teacher_shape")
    setup = {k: getattr(a, k) for k in ("source_domains", "target_domain", "source_questions", "teacher_shape",
                                        "teacher_steps", "teacher_learning_rate", "teacher_mlm_steps",
                                        "teacher_mlm_passages", "teacher")}
    setup["source_domains"] = list(setup["source_domains"])
    setup_path = os.path.join(base_dir, "base.json")
    if os.path.exists(os.path.join(t_dir, "config.json")) and os.path.exists(setup_path):
        with open(setup_path) as fh:
            saved = json.load(fh)
        diff = {k: (saved.get(k), v) for k, v in setup.items() if saved.get(k) != v}
        if diff:
            raise SystemExit(f"augment: {base_dir} holds a teacher of another setup ({diff}, saved vs asked): "
                             "use another --work_dir")
        log(f"data seed {data_seed}: loading the source-trained teacher from {base_dir}")
        tok, teacher = load_tokenizer(t_dir), load_qa_model(t_dir, attn_implementation="sdpa").eval()
        if not os.path.exists(s_path):
            _source_student(a, d, tok, teacher, data_seed, s_path, log)
        return d, tok, teacher, torch.load(s_path)
    if a.teacher:  # a pretrained start brings its tokenizer; the built-in MLM pre-training does not apply
        tok = load_tokenizer(a.teacher)
    else:
        texts = [r["context"] for r in d["source"] + d["target"]] + [r["question"] for r in d["source"] + d["target"]]
        tok = train_wordpiece_tokenizer(texts, vocab_size=2000)
    teacher = _teacher_start(a, tok, teacher_shape, data_seed)
    if a.teacher_mlm_steps and not a.teacher:
        _pretrain(a, teacher, tok, data_seed, log)
        os.makedirs(base_dir, exist_ok=True)
        torch.save(teacher.bert.state_dict(), os.path.join(base_dir, "pretrained.pt"))
    log(f"data seed {data_seed}: teacher {_teacher_name(a, teacher)} on {len(d['source'])} source questions, "
        f"{a.teacher_steps} steps")
    finetune_teacher(teacher, d["source"], tok, steps=a.teacher_steps, seed=data_seed,
                     learning_rate=a.teacher_learning_rate)
    os.makedirs(base_dir, exist_ok=True)
    teacher.save_pretrained(t_dir)
    tok.save_pretrained(t_dir)
    with open(setup_path, "w") as fh:
        json.dump(setup, fh, indent=1)
    return d, tok, teacher, _source_student(a, d, tok, teacher, data_seed, s_path, log)


def _student_name(a):
    """The student column of the rows: ``--student_shape``, or ``layers 0,2`` (``--student_layers``)."""
    return f"layers {a.student_layers}" if a.student_layers else a.student_shape


def _new_student(a, tok, teacher, seed=None):
    """A fresh student: the ``--student_layers`` of ``teacher`` (copied), or a random-init
    ``--student_shape`` model on ``tok``."""
    from kdfast.distill.student import parse_student_layers, student_from_config, student_from_teacher
    from kdfast.qa.configs import student_config

    if a.student_layers:
        layers = parse_student_layers(a.student_layers, teacher.config.num_hidden_layers)
        return student_from_teacher(teacher, layers)
    return student_from_config(student_config(tok, **_shape(a.student_shape, "--student_shape")),
                               attn_implementation="sdpa", seed=seed)


def _source_student(a, d, tok, teacher, data_seed, path, log):
    """The student every method starts from: distilled ``--student_source_steps`` on the source's
    teacher soft labels (the stand-in for a general-distilled TinyBERT); its state dict, saved at ``path``."""
    import torch
    from kdfast.augment.data import answered, relabel, to_windows
    from kdfast.augment.distil import train_steps

    student0 = _new_student(a, tok, teacher, seed=data_seed)
    log(f"student {_student_name(a)}: distilled {a.student_source_steps} steps on the source")
    src_w = relabel(teacher, tok, to_windows(answered(d["source"]), tok))
    train_steps(student0, src_w, tok, steps=a.student_source_steps, seed=data_seed, learning_rate=a.learning_rate)
    sd = {k: v.clone() for k, v in student0.state_dict().items()}
    torch.save(sd, path)
    return sd


def _teacher_name(a, model):
    """The teacher column of the rows: ``--teacher_shape``, or LAYERSxHIDDEN of the pretrained start."""
    if not a.teacher:
        return a.teacher_shape
    return f"{model.config.num_hidden_layers}x{model.config.hidden_size}"


def _teacher_start(a, tok, shape, seed, path=None):
    """A fresh teacher before any QA training on the built-in data: ``path`` or ``--teacher``
    (pretrained) or a from-scratch model of ``shape`` (``_shape`` overrides) on ``tok``."""
    from kdfast.distill.models import load_qa_model
    from kdfast.distill.student import student_from_config
    from kdfast.qa.configs import teacher_config

    if path or a.teacher:
        return load_qa_model(path or a.teacher, attn_implementation="sdpa")
    return student_from_config(teacher_config(tok, **shape), attn_implementation="sdpa", seed=seed)


def run(a):
    import copy
    import random

    import torch
    from kdfast.augment.data import split_target
    from kdfast.augment.distil import Scorer
    from kdfast.augment.loop import AugmentConfig, AugmentLoop, finetune_teacher, train_default_mlm
    from kdfast.distill.models import count_parameters, load_qa_model

    torch.set_num_threads(a.threads)
    sizes = [int(s) for s in a.sizes.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    work = a.work_dir
    teacher_shape = _shape(a.teacher_shape, "--teacher_shape")
    if not a.student_layers:
        _shape(a.student_shape, "--student_shape")  # a bad spec fails before any training
    t0 = time.perf_counter()

    def log(msg):
        print(f"[bench augment {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    for seed in [int(s) for s in a.seeds.split(",")]:
        shared = a.teacher_seed is not None
        # A shared teacher: one data seed for source, tokenizer and teacher; each seed draws its own
        # target questions from a pool 4x the largest size, and seeds every method.
        d, tok, base, student0_sd = _base(a, a.teacher_seed if shared else seed,
                                          4 * max(sizes) if shared else max(sizes), log)
        # The teacher's weights identify the setup: a teacher retrained on another machine or thread count
        # differs in its last bits, and its rows must not mix with the earlier teacher's in one table.
        h = hashlib.sha256()
        for k, v in sorted(base.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().contiguous().numpy().tobytes())
        teacher_sha = h.hexdigest()[:12]
        target_all = list(d["target"])
        if shared:
            random.Random(f"augment-target:{seed}").shuffle(target_all)
        target_all = target_all[:max(sizes)]
        student0 = _new_student(a, tok, base)
        ratio = count_parameters(student0) / count_parameters(base)
        log(f"seed {seed}: student/teacher parameters {count_parameters(student0)}/{count_parameters(base)} = "
            f"{ratio:.3f}")
        scorer = Scorer(d["eval"], tok)
        for n in sizes:
            target = target_all[:n]
            train_part, _ = split_target(target, max(1, round(0.25 * n)), seed)
            cfg_common = {"source": list(a.source_domains), "target": a.target_domain, "source_questions": len(d["source"]),
                          "eval_questions": len(d["eval"]), "teacher": _teacher_name(a, base),
                          "teacher_init": a.teacher or None, "teacher_only_init": a.teacher_only_init,
                          "student": _student_name(a), "student_learning_rate": a.learning_rate,
                          "teacher_steps": a.teacher_steps, "student_source_steps": a.student_source_steps,
                          "teacher_target_steps": a.teacher_target_steps, "teacher_only_steps": a.teacher_only_steps,
                          "teacher_seed": a.teacher_seed, "student_teacher_params": round(ratio, 4),
                          "teacher_sha": teacher_sha, "teacher_mlm_steps": a.teacher_mlm_steps,
                          "target_train_questions": len(train_part)}
            # Both teachers of (seed, size) are saved (the target-tuned one, the scores) and reused by a
            # rerun of the same teacher setup, e.g. with another student.
            t_cache = os.path.join(work, f"seed{seed}-n{n}", "teacher")
            key = {k: cfg_common[k] for k in ("teacher_sha", "teacher_target_steps", "teacher_only_steps",
                                              "teacher_only_init", "target_train_questions")}
            key["teacher_learning_rate"] = a.teacher_learning_rate
            cached = None
            if os.path.exists(os.path.join(t_cache, "scores.json")):
                with open(os.path.join(t_cache, "scores.json")) as fh:
                    cached = json.load(fh)
            if cached and cached["key"] == key:
                log(f"n={n}: loading the target-tuned teacher and both teachers' scores from {t_cache}")
                teacher = load_qa_model(t_cache, attn_implementation="sdpa").eval()
                t_score, o_score = cached["teacher"], cached["teacher_only"]
            else:
                teacher = copy.deepcopy(base)
                finetune_teacher(teacher, train_part, tok, steps=a.teacher_target_steps, seed=seed,
                                 learning_rate=a.teacher_learning_rate)
                t_score = scorer(teacher)
                only = _teacher_start(a, tok, teacher_shape, seed + 7, path=a.teacher_only_init)
                if a.teacher_mlm_steps and not a.teacher:  # the same pre-trained encoder, then the target alone
                    only.bert.load_state_dict(torch.load(os.path.join(
                        work, f"base-seed{a.teacher_seed if shared else seed}", "pretrained.pt")))
                finetune_teacher(only, train_part, tok, steps=a.teacher_only_steps, seed=seed,
                                 learning_rate=a.teacher_learning_rate)
                o_score = scorer(only)
                teacher.save_pretrained(t_cache)
                with open(os.path.join(t_cache, "scores.json"), "w") as fh:
                    json.dump({"key": key, "teacher": dict(t_score), "teacher_only": dict(o_score)}, fh)
            log(f"n={n}: teacher (source + target) F1 {t_score['f1']:.1f}; teacher on target alone F1 "
                f"{o_score['f1']:.1f}")
            _append([_row("teacher (source + target)", "f1", t_score["f1"], n, seed, cfg_common),
                      _row("teacher (source + target)", "exact_match", t_score["exact_match"], n, seed, cfg_common),
                      _row("teacher (target alone)", "f1", o_score["f1"], n, seed, cfg_common),
                      _row("teacher (target alone)", "exact_match", o_score["exact_match"], n, seed, cfg_common)])
            mlm_dir = os.path.join(work, f"seed{seed}-n{n}", "mlm")
            if not os.path.exists(os.path.join(mlm_dir, "config.json")):
                train_default_mlm(AugmentConfig(mlm_steps=a.mlm_steps, seed=seed), d["source"], train_part, tok,
                                  mlm_dir, log)
            keep_rates = {}  # per candidate bases: the full method's keep rate sizes the random / confidence keep
            def fields_of(m):
                return VARIANTS.get(m, {"method": m})

            # Full methods with the F1 reward first: their keep rates size the random / confidence keeps.
            for m in sorted(methods, key=lambda m: (fields_of(m)["method"], fields_of(m).get("reward", "f1"))
                            != ("full", "f1")):
                t1 = time.perf_counter()
                fields = fields_of(m)
                keep_rate = keep_rates.get(fields.get("bases", ("target",)), 0.5)
                cfg = AugmentConfig(**fields, episodes=a.episodes, learning_rate=a.learning_rate,
                                    candidates_per_episode=a.candidates, episode_steps=a.episode_steps,
                                    warmup_steps=a.warmup_steps, final_steps=a.final_steps, keep_rate=keep_rate,
                                    mlm_path=mlm_dir, seed=seed)
                student = _new_student(a, tok, base)
                student.load_state_dict(student0_sd)
                out = os.path.join(work, f"seed{seed}-n{n}", "student-" + _student_name(a).replace(" ", ""), m)
                res = AugmentLoop(cfg, source=d["source"], target=target, eval_records=d["eval"], teacher=teacher,
                                  student=student, tokenizer=tok, output_dir=out, log=log).run(resume=True)
                if cfg.method == "full" and cfg.reward == "f1":
                    cand = sum(e["candidates"] for e in res["episodes"])
                    keep_rates[cfg.bases] = keep_rate = res["kept"] / cand if cand else 0.5
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
         "confidence": "generator, confidence-heuristic selector",
         "full_dev_loss": "generator + reinforced selector, dev-loss reward",
         "full_src": "generator with source-based candidates + reinforced selector",
         "random_src": "generator with source-based candidates, random keep (same rate)",
         "confidence_src": "generator with source-based candidates, confidence-heuristic selector",
         "full_src_dev_loss": "generator with source-based candidates + reinforced selector, dev-loss reward"}


SETUP_KEYS = ("source", "target", "teacher", "student", "teacher_seed", "teacher_steps", "source_questions", "eval_questions",
              "student_teacher_params", "teacher_sha", "teacher_mlm_steps", "teacher_init", "teacher_only_init")


def _setup_of(row):
    c = json.loads(row["config"])
    return tuple((k, json.dumps(c.get(k))) for k in SETUP_KEYS)


def _table(rows):
    """Lines of the table of one (source, target) pair: the setup of its newest row; a rerun of
    (method, size, seed) replaces the earlier row."""
    setup = _setup_of(rows[-1])
    older = sum(_setup_of(r) != setup for r in rows)
    latest = {}
    for r in rows:
        if _setup_of(r) == setup:
            latest[(r["provider"], int(r["x_value"]), r["mode"])] = r
    rows = list(latest.values())
    sizes = sorted({int(r["x_value"]) for r in rows})
    last = json.loads(rows[-1]["config"])
    src, tgt = last.get("source", SOURCE), last.get("target", TARGET)
    cell = {}
    for r in rows:
        cell.setdefault((r["provider"], int(r["x_value"])), []).append(float(r["p50"]))
    init = ""
    if last.get("teacher_init"):  # the last two path parts name it (a package's model/ directory)
        init = (", teacher from " + "/".join(os.path.normpath(last["teacher_init"]).split(os.sep)[-2:])
                + f", student {last.get('student')}")
    lines = [f"## Source {' + '.join(src)}, target {tgt}{init}", "",
             "| method | " + " | ".join(f"{n} target questions" for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for p in dict.fromkeys(r["provider"] for r in rows):
        out = []
        for n in sizes:
            v = cell.get((p, n))
            if not v:
                out.append("-")
            else:
                spread = (max(v) - min(v)) / 2
                out.append(f"{statistics.mean(v):.2f} +- {spread:.2f} [{len(v)}]")
        lines.append(f"| {NAMES.get(p, p)} | " + " | ".join(out) + " |")
    lines += ["", "Setup (from the rows' config): " + ", ".join(f"{k} {v}" for k, v in setup if v != "null")
              + (f". {older} F1 rows of earlier setups stay in the CSV, not in this table." if older else "."), ""]
    return lines


def report():
    with open(CSV) as fh:
        rows = [r for r in csv.DictReader(fh) if r["metric"] == "f1"]
    real = [r for r in rows if r["mode"].startswith("real")]
    # (source, target, pretrained teacher start, its student) -> its rows; the pair of the newest row first.
    # From-scratch teachers: one table per pair (the newest setup); a pretrained start: one per student.
    pairs = {}
    for r in reversed([r for r in rows if not r["mode"].startswith("real")]):
        c = json.loads(r["config"])
        init = c.get("teacher_init")
        key = (tuple(c.get("source", SOURCE)), c.get("target", TARGET), init, c.get("student") if init else None)
        pairs.setdefault(key, []).insert(0, r)
    lines = ["# kdfast augment: learning to augment on the built-in generator", "",
             f"Machine: {DEVICE}. F1 on the target's validation questions (mean over seeds, +- half the min-max "
             "spread, [n seeds]). Measured numbers only; see bench/results/augment.csv for every row and its "
             "config.", ""]
    for pair_rows in pairs.values():
        lines += _table(pair_rows)
    if real:
        c = json.loads(real[-1]["config"])
        lines += [f"## Real SQuAD: source {c['source_questions']} questions of {c['source']}, target "
                      f"{c['target_questions']} questions of {', '.join(c['target_articles'])}", "",
                  f"Evaluated on the {c['eval_questions']} other questions of those articles; teacher "
                  f"{c['teacher']}, student = its layers {c['student_layers']} "
                  f"({100 * c['student_teacher_params']:.0f}% of its parameters); latest run of each row.", "",
                  "| method | F1 | EM |", "|---|---|---|"]
        with open(CSV) as fh:
            em = {(r["provider"], r["mode"]): float(r["p50"]) for r in csv.DictReader(fh)
                  if r["metric"] == "exact_match" and r["mode"].startswith("real")}
        # The latest run of each method, per masked LM (built-in from scratch / from the teacher's encoder).
        from kdfast.augment.loop import MLM_METHODS
        latest = {(r["provider"], r["provider"] in MLM_METHODS and bool(json.loads(r["config"]).get("mlm_init"))): r
                  for r in real}
        for (p, init), r in latest.items():
            name = NAMES.get(p, p) + (" (MLM from the teacher's encoder)" if init else "")
            lines.append(f"| {name} | {float(r['p50']):.2f} | {em.get((p, r['mode']), float('nan')):.2f} |")
    notes = ""  # hand-written commentary after the tables survives a regenerated report
    if os.path.exists(MD):
        with open(MD) as fh:
            text = fh.read()
        if NOTES in text:
            notes = "\n" + text[text.index(NOTES):]
    with open(MD, "w") as fh:
        fh.write("\n".join(lines) + "\n" + notes)
    print("\n".join(lines))


def real_split(records, articles, n_target, seed):
    """(target, eval) from the dev records of ``articles``: whole passages, drawn in a seeded order,
    go to the target until it holds ``n_target`` questions; every other question of those articles
    is an evaluation question (no passage in both)."""
    import random

    recs = [r for r in records if r["title"] in articles]
    missing = sorted(set(articles) - {r["title"] for r in recs})
    if missing:
        raise SystemExit(f"augment --real_articles: not in the dev file: {', '.join(missing)}")
    ctxs = list(dict.fromkeys(r["context"] for r in recs))
    random.Random(f"augment-real:{seed}").shuffle(ctxs)
    chosen, n = set(), 0
    for c in ctxs:
        if n >= n_target:
            break
        chosen.add(c)
        n += sum(r["context"] == c for r in recs)
    return [r for r in recs if r["context"] in chosen], [r for r in recs if r["context"] not in chosen]


def run_real(a):
    import torch
    from kdfast.augment.cli import main as augment_main
    from kdfast.augment.distil import Scorer
    from kdfast.distill.models import count_parameters, load_qa_model, load_tokenizer
    from kdfast.qa.load import load_squad, write_squad_json

    torch.set_num_threads(a.threads)
    train = sorted(f for f in os.listdir(SQUAD_DIR) if f.startswith("train") and f.endswith(".json"))
    cols = ("id", "title", "context", "question", "answers")
    source = [{k: r[k] for k in cols} for r in load_squad(os.path.join(SQUAD_DIR, train[0]))][:a.real_source]
    dev = [{k: r[k] for k in cols} for r in load_squad(os.path.join(SQUAD_DIR, "dev-v1.1.json"))]
    articles = [t for t in a.real_articles.split(",") if t]
    target, evals = real_split(dev, articles, a.real_target, a.seeds.split(",")[0])
    evals = evals[:a.eval_questions] if a.eval_questions else evals
    work = os.path.join(a.work_dir, "real")
    os.makedirs(work, exist_ok=True)
    paths = {n: os.path.join(work, f"{n}.json") for n in ("squad", "target", "eval")}
    for n, recs in zip(paths, (source, target, evals)):
        write_squad_json(recs, paths[n])
    print(f"[bench augment real] source {len(source)} questions ({train[0]}), target {len(target)} and evaluation "
          f"{len(evals)} questions of {', '.join(articles)}", flush=True)
    out = os.path.join(work, "run-mlm-teacher" if a.mlm_init_teacher else "run")
    args = ["--source_file", paths["squad"], "--train_file", paths["target"], "--validation_file", paths["eval"],
            "--teacher_name_or_path", a.teacher, "--student_layers", a.student_layers, "--methods", a.methods,
            "--episodes", str(a.episodes), "--candidates_per_episode", str(a.candidates),
            "--episode_steps", str(a.episode_steps), "--warmup_steps", str(a.warmup_steps),
            "--final_steps", str(a.final_steps), "--learning_rate", str(a.learning_rate),
            "--mlm_steps", str(a.mlm_steps), "--max_seq_length", "256", "--doc_stride", "96",
            "--seed", a.seeds.split(",")[0], "--output_dir", out, "--disable_tqdm"]
    if a.mlm_init_teacher:
        args += ["--mlm_init", a.teacher]
    if os.path.exists(os.path.join(out, "full", "state.pt")):
        args.append("--resume_from_checkpoint")
    t0 = time.perf_counter()
    augment_main(args)
    with open(os.path.join(out, "augment_log.json")) as fh:
        results = json.load(fh)["results"]
    teacher, tok = load_qa_model(a.teacher).eval(), load_tokenizer(a.teacher)
    t_score = Scorer(evals, tok)(teacher)
    from kdfast.distill.student import parse_student_layers, student_from_teacher
    n_layers = teacher.config.num_hidden_layers
    student = student_from_teacher(teacher, parse_student_layers(a.student_layers, n_layers))
    s0 = Scorer(evals, tok)(student)  # the student before any target training
    cfg = {"source": train[0], "source_questions": len(source), "target_articles": articles,
           "target_questions": len(target), "eval_questions": len(evals), "teacher": a.teacher,
           "student_layers": a.student_layers,
           "student_teacher_params": round(count_parameters(student) / count_parameters(teacher), 4),
           "episodes": a.episodes, "candidates": a.candidates, "warmup_steps": a.warmup_steps,
           "final_steps": a.final_steps, "episode_steps": a.episode_steps, "learning_rate": a.learning_rate,
           "mlm_init": a.teacher if a.mlm_init_teacher else None, "seconds": round(time.perf_counter() - t0, 1)}
    seed = a.seeds.split(",")[0]
    rows = []
    for name, sc in (("teacher (source)", t_score), ("student from teacher layers, untrained on target", s0)):
        rows += [_row(name, "f1", sc["f1"], len(target), seed, cfg),
                 _row(name, "exact_match", sc["exact_match"], len(target), seed, cfg)]
    for r in results:
        c = dict(cfg, method=r["method"], kept=r["kept"])
        rows += [_row(r["method"], "f1", r["eval"]["f1"], len(target), seed, c),
                 _row(r["method"], "exact_match", r["eval"]["exact_match"], len(target), seed, c)]
    for r in rows:
        r["mode"] = f"real-seed{seed}" + ("-mlm-teacher" if a.mlm_init_teacher else "")  # apart from synthetic
    _append(rows)
    for r in rows:
        if r["metric"] == "f1":
            print(f"[bench augment real] {r['provider']}: F1 {r['p50']:.2f}", flush=True)
    report()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0")
    p.add_argument("--sizes", default="16,64,256")
    p.add_argument("--source_domains", default=",".join(SOURCE),
                   help="synthetic source domains, comma-separated (kdfast.qa.synthetic.DOMAINS)")
    p.add_argument("--target_domain", default=TARGET, help="synthetic target domain (not a source domain; sport: near biography)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--source_questions", type=int, default=600)
    p.add_argument("--eval_questions", type=int, default=None,
                   help="evaluation questions (default: 80 synthetic; --real: every other question of the articles)")
    p.add_argument("--teacher_shape", default="4x256", help="synthetic teacher LAYERSxHIDDEN")
    p.add_argument("--student_shape", default="1x128", help="synthetic student LAYERSxHIDDEN")
    p.add_argument("--teacher_seed", type=int, default=None,
                   help="one teacher for every seed, built from this data seed (each seed still draws its own "
                        "target questions and seeds every method); default: a teacher per seed")
    p.add_argument("--teacher_learning_rate", type=float, default=1e-3)
    p.add_argument("--teacher_only_init", default=None,
                   help="with --teacher: where the 'teacher (target alone)' row starts (default: --teacher), e.g. "
                        "the pretrained encoder a QA-tuned --teacher was fine-tuned from")
    p.add_argument("--teacher_steps", type=int, default=120)
    p.add_argument("--teacher_mlm_steps", type=int, default=0,
                   help="pre-train the teacher's encoder as a masked LM this many steps first (0: none)")
    p.add_argument("--teacher_mlm_passages", type=int, default=800, help="unlabelled passages per domain for it")
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
    p.add_argument("--real", action="store_true", help="the real-data run (SQuAD in ../shared/data/squad)")
    p.add_argument("--teacher", help="--real: a QA teacher directory fine-tuned on the source; else a pretrained "
                                     "model directory the teacher starts from (its tokenizer too) instead of "
                                     "--teacher_shape")
    p.add_argument("--real_source", type=int, default=3000, help="--real: first N train questions as the source")
    p.add_argument("--real_target", type=int, default=48, help="--real: target questions (whole passages)")
    p.add_argument("--real_articles", default=REAL_ARTICLES, help="--real: the target topic's dev articles")
    p.add_argument("--student_layers", default=None,
                   help="student = these teacher layers (--real: default 0,2,4; else instead of --student_shape, "
                        "taken from the source-trained teacher)")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="student learning rate (default: 1e-4 --real or with --student_layers; else 1e-3)")
    p.add_argument("--mlm_init_teacher", action="store_true",
                   help="--real: start the masked LM from the teacher's pretrained encoder (kdfast augment "
                        "--mlm_init) instead of training a small one from scratch; its own work directory")
    a = p.parse_args(argv)
    a.learning_rate = a.learning_rate or (1e-4 if a.real or a.student_layers else 1e-3)
    a.source_domains = tuple(d for d in a.source_domains.split(",") if d)
    if a.report:
        report()
    elif a.real:
        a.student_layers = a.student_layers or "0,2,4"
        if not os.path.exists(os.path.join(SQUAD_DIR, "dev-v1.1.json")):
            print(f"skipping --real: no SQuAD files in {os.path.normpath(SQUAD_DIR)}")
            return
        if not a.teacher or not os.path.isdir(a.teacher):
            raise SystemExit("augment --real: --teacher DIR (a QA model fine-tuned on the source) is required")
        run_real(a)
    else:
        for flag, path in (("--teacher", a.teacher), ("--teacher_only_init", a.teacher_only_init)):
            if path and not os.path.exists(os.path.join(path, "config.json")):
                raise SystemExit(f"augment {flag} {path}: no config.json there (expected a model directory)")
        if a.teacher_only_init and not a.teacher:
            raise SystemExit("augment --teacher_only_init needs --teacher (a pretrained teacher start)")
        run(a)


if __name__ == "__main__":
    main()
