"""The active-learning loop for extractive QA: which questions to label, one round at a time.

    loop = ActiveLearningLoop(ALConfig("out/al", strategy="margin", student_layers="0,2"),
                              train_pool, dev, tokenizer, teacher_dir="out/teacher/model")
    summary = loop.run()            # simulate: the dataset's answers are the oracle

Round k: **train** a fresh student (the teacher's layers, or a config) on the
labeled questions (distilled from the cached teacher logits, or fine-tuned on
hard labels), **evaluate** it on dev, **score** the rest of the pool with it,
**select** the next questions with the strategy, **label** them. Round 0 first
draws the seed set at random and labels it. Counting is in questions: labelling
a question labels all its windows.

Labelling: ``"simulate"`` reveals the dataset's answers; ``"annotate"`` writes
the queried questions to ``output_dir/round-K/to_label.jsonl`` (the seed set to
``round-0/seed_to_label.jsonl``), saves the state and returns; fill in the
answers and call ``resume(labelled_file=...)``.

State: ``output_dir/al_state.json``, written atomically after every stage (the
labeled ids in order, per-round metrics, numpy / python / torch RNG states, the
round and stage, the student checkpoint). ``run()`` on an existing output_dir
continues after the last finished stage; a kill inside training resumes from
the trainer's last epoch checkpoint. Outputs: ``al_log.json``, ``al_results.md``,
``al_curve.png``.

With ``kd_on_pool`` the student is also distilled on the unlabeled pool's
windows (teacher soft labels cost no annotation); their gold positions are set
to :data:`IGNORE_POSITION` so ``qa_kd_loss`` gives them no hard loss (positions
are clamped to ``[0, L]`` and ``L`` is ignored; -1 would clamp to 0 and count).
"""
from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import time

import numpy as np
import torch

from kdfast.active.pool import score_pool, select_queries, world
from kdfast.active.strategies import get_strategy
from kdfast.distill.stage import TrainOptions
from kdfast.distill.trainer import DistillConfig
from kdfast.distill.unlabeled import IGNORE_POSITION, without_labels

STAGES = ("train", "evaluate", "score", "select", "label")
SEED_STAGES = ("seed_select", "seed_label")
STATE_FILE = "al_state.json"
LABELS_FILE = "human_labels.json"
LABELLING = ("simulate", "annotate")
_NOT_COMPARED = ("output_dir", "progress")
_SECONDS = ("train_seconds", "eval_seconds", "score_seconds", "select_seconds")


@dataclasses.dataclass
class ALConfig:
    """Options of :class:`ActiveLearningLoop` (``kdfast active`` flags have the same names).

    Sizes: an ``int`` is a number of questions, a ``float`` in (0, 1] a fraction of the pool.
    ``seed_size`` / ``query_size`` override the fractions. ``rounds`` caps the training
    rounds (round 0 trains on the seed set). ``student_layers`` ("0,2" or a count) takes the
    student from the teacher's layers; ``student_config`` (a transformers config, a config dict,
    a config.json path or "student" for the built-in one) builds it at random instead.
    ``distill=None`` fine-tunes on hard labels (no teacher needed unless the strategy needs one).
    """
    output_dir: str
    strategy: str = "margin"
    strategy_kwargs: dict = dataclasses.field(default_factory=dict)
    seed_fraction: float = 0.02
    seed_size: int | None = None
    query_fraction: float = 0.03
    query_size: int | None = None
    budget: float | int = 0.2
    rounds: int | None = None
    student_layers: str | None = None
    student_config: object = None
    distill: DistillConfig | None = dataclasses.field(default_factory=DistillConfig)
    kd_on_pool: bool = False
    train: TrainOptions = dataclasses.field(default_factory=TrainOptions)
    max_seq_length: int = 384
    doc_stride: int = 128
    labelling: str = "simulate"
    mc_passes: int = 5
    seed: int = 0
    score_batch_size: int = 64
    version_2_with_negative: bool = False
    keep_checkpoints: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.labelling not in LABELLING:
            raise ValueError(f"labelling must be one of {LABELLING}, got {self.labelling!r}")
        if self.kd_on_pool and self.distill is None:
            raise ValueError("kd_on_pool distils on the unlabeled pool: it needs distillation (distill is None / "
                             "--no_distill given)")
        if self.rounds is not None and self.rounds < 1:
            raise ValueError(f"rounds must be >= 1 (round 0 trains on the seed set), got {self.rounds}")
        if self.mc_passes < 1:
            raise ValueError(f"mc_passes must be >= 1, got {self.mc_passes}")
        if not isinstance(self.strategy_kwargs, dict):
            raise ValueError(f"strategy_kwargs must be a dict, got {self.strategy_kwargs!r}")

    def to_dict(self) -> dict:
        """JSON-able form (what the state records and a resume compares)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["distill"] = None if self.distill is None else dataclasses.asdict(self.distill)
        d["train"] = dataclasses.asdict(self.train)
        sc = self.student_config
        d["student_config"] = sc.to_dict() if hasattr(sc, "to_dict") else sc
        return json.loads(json.dumps(d, default=str))


def resolve_size(value, n: int, name: str, *, minimum: int = 1) -> int:
    """A size given as a count (int) or a fraction of ``n`` (float in (0, 1]) -> a count."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a count (int) or a fraction (float in (0, 1]), got {value!r}")
    if isinstance(value, (int, np.integer)):
        count = int(value)
    else:
        if not 0 < value <= 1:
            raise ValueError(f"{name}={value}: a fraction must be in (0, 1] (give an int for a count)")
        count = int(round(value * n))
    return max(minimum, count)


def _comparable(cfg: dict) -> dict:
    """The options a resume must not change (display options may)."""
    out = {k: v for k, v in cfg.items() if k not in _NOT_COMPARED}
    out["train"] = {k: v for k, v in (out.get("train") or {}).items() if k not in ("disable_tqdm", "logging_steps")}
    return out


def _write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    os.replace(tmp, path)


def rng_states(rng: np.random.Generator) -> dict:
    """JSON-able numpy (the loop's Generator), python and torch RNG states."""
    v, internal, gauss = random.getstate()
    out = {"numpy": rng.bit_generator.state, "python": [v, list(internal), gauss],
           "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng_states(rng: np.random.Generator, states: dict) -> None:
    """Inverse of :func:`rng_states`."""
    rng.bit_generator.state = states["numpy"]
    v, internal, gauss = states["python"]
    random.setstate((v, tuple(internal), gauss))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(states["torch"])), dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in states["cuda"]])


def _bcast(obj):
    """Rank 0's ``obj`` on every rank (no-op when not distributed)."""
    rank, size = world()
    if size == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier():
    if world()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


@contextlib.contextmanager
def _main_first():
    rank = world()[0]
    if rank != 0:
        _barrier()
    yield
    if rank == 0:
        _barrier()


class ActiveLearningLoop:
    """See the module docstring.

    Args:
        config: :class:`ALConfig`.
        train_pool: questions ``Dataset`` (HF SQuAD columns) to choose from; in ``"simulate"``
            mode its answers are the oracle, in ``"annotate"`` mode they are not read.
        dev: questions ``Dataset`` with gold answers (EM / F1 every round).
        tokenizer: the fast tokenizer shared by teacher and student.
        teacher_dir: fine-tuned teacher directory (needed to distil, for ``student_layers``,
            ``kd_on_pool`` and teacher-reading strategies such as ``disagreement``).
    """

    def __init__(self, config: ALConfig, train_pool, dev, tokenizer, *, teacher_dir: str | None = None):
        from kdfast.qa.features import check_tokenizer
        if not isinstance(config, ALConfig):
            raise TypeError(f"config must be an ALConfig, got {type(config).__name__}")
        check_tokenizer(tokenizer)
        self.config, self.pool, self.dev, self.tokenizer = config, train_pool, dev, tokenizer
        for name, ds in (("train_pool", train_pool), ("dev", dev)):
            missing = {"id", "context", "question", "answers"} - set(getattr(ds, "column_names", []))
            if missing:
                raise ValueError(f"{name} lacks columns {sorted(missing)} (load it with kdfast.qa.load_squad)")
        self.ids = list(train_pool["id"])
        if len(set(self.ids)) != len(self.ids):
            dup = next(q for q, c in collections.Counter(self.ids).items() if c > 1)
            raise ValueError(f"train_pool has duplicate question id {dup!r}")
        self.index = {q: i for i, q in enumerate(self.ids)}
        N = len(self.ids)
        if N < 2:
            raise ValueError(f"train_pool has {N} questions: need at least 2")
        self.budget = resolve_size(config.budget, N, "budget")
        self.seed_size = resolve_size(config.seed_size if config.seed_size is not None else config.seed_fraction,
                                      N, "seed_size" if config.seed_size is not None else "seed_fraction")
        self.query_size = resolve_size(config.query_size if config.query_size is not None else config.query_fraction,
                                       N, "query_size" if config.query_size is not None else "query_fraction")
        if self.budget > N:
            raise ValueError(f"budget {config.budget} = {self.budget} questions exceeds the pool ({N} questions)")
        if self.budget <= self.seed_size:
            raise ValueError(f"budget ({self.budget} questions) must exceed the seed set ({self.seed_size} "
                             "questions): nothing would be queried")
        self.strategy = get_strategy(config.strategy, **config.strategy_kwargs)
        self.teacher_dir = teacher_dir
        needs_teacher = []
        if config.distill is not None:
            needs_teacher.append("distillation (pass distill=None / --no_distill to fine-tune on hard labels)")
        if config.student_config is None:
            needs_teacher.append("a student taken from the teacher's layers (or give student_config)")
        if "teacher_logits" in self.strategy.needs:
            needs_teacher.append(f"strategy {config.strategy!r}")
        if needs_teacher and teacher_dir is None:
            raise ValueError("a teacher is needed for " + "; ".join(needs_teacher) +
                             ": pass teacher_dir (--teacher_name_or_path)")
        if teacher_dir is not None and not os.path.isdir(teacher_dir):
            raise FileNotFoundError(f"teacher directory {teacher_dir!r} does not exist")
        self.out = config.output_dir
        self.state = None
        self.rng = np.random.default_rng(config.seed)
        self._ready = False
        self._human = None

    # --- hook ---------------------------------------------------------------------------
    def _after_stage(self, name: str) -> None:
        """Called after every stage's state is saved (a point where a kill loses nothing)."""

    # --- public views ---------------------------------------------------------------------
    @property
    def labeled_ids(self) -> list[str]:
        """Labeled question ids, in labelling order."""
        return list(self._load_or_init()["labeled"])

    @property
    def pool_ids(self) -> list[str]:
        """Unlabeled question ids, in pool order."""
        lab = set(self._load_or_init()["labeled"])
        return [q for q in self.ids if q not in lab]

    def planned_rounds(self) -> int:
        """Training rounds the budget allows (capped by ``rounds``)."""
        n = 1 + math.ceil((self.budget - self.seed_size) / self.query_size)
        return min(n, self.config.rounds) if self.config.rounds else n

    # --- state ------------------------------------------------------------------------------
    def _state_path(self):
        return os.path.join(self.out, STATE_FILE)

    def _load_or_init(self) -> dict:
        if self.state is not None:
            return self.state
        path = self._state_path()
        if os.path.exists(path):
            with open(path) as fh:
                st = json.load(fh)
            saved, now = _comparable(st["config"]), _comparable(self.config.to_dict())
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            if diff:
                raise ValueError(f"{path} was written with other options ({', '.join(diff)} differ): resume with the "
                                 "same options or choose another output_dir")
            if st["pool_size"] != len(self.ids) or st.get("pool_head") != self.ids[:3]:
                raise ValueError(f"{path} belongs to another pool ({st['pool_size']} questions, this one has "
                                 f"{len(self.ids)})")
            restore_rng_states(self.rng, st["rng"])
            self.state = st
        else:
            self.state = {"format": 1, "round": 0, "stage": None, "labeled": [], "queried": [], "awaiting": None,
                          "rounds": [], "checkpoint": None, "done": False, "pool_size": len(self.ids),
                          "pool_head": self.ids[:3], "budget": self.budget, "seed_size": self.seed_size,
                          "query_size": self.query_size, "config": self.config.to_dict(), "labelled_files": []}
        return self.state

    def _save(self):
        self.state["rng"] = rng_states(self.rng)
        if world()[0] == 0:
            os.makedirs(self.out, exist_ok=True)
            _write_json(self._state_path(), self.state)
            _write_json(os.path.join(self.out, "al_log.json"), self.log())
        _barrier()

    def log(self) -> dict:
        """What ``al_log.json`` holds: the run's settings and one row per round."""
        st = self._load_or_init()
        c = self.config
        rows = [dict(r, seconds=sum(r.get(k) or 0.0 for k in _SECONDS)) for r in st["rounds"]]
        return {"strategy": c.strategy, "strategy_kwargs": c.strategy_kwargs, "seed": c.seed,
                "pool_questions": len(self.ids), "budget": self.budget, "seed_size": self.seed_size,
                "query_size": self.query_size, "distill": c.distill is not None, "kd_on_pool": c.kd_on_pool,
                "labelling": c.labelling, "done": st["done"], "rounds": rows, "config": st["config"]}

    # --- setup ---------------------------------------------------------------------------------
    def _setup(self):
        if self._ready:
            return
        from kdfast.qa.features import eval_features, train_features, windows_per_example
        c = self.config
        self.teacher = None
        if self.teacher_dir is not None:
            from kdfast.distill.models import load_qa_model
            self.teacher = load_qa_model(self.teacher_dir).eval()
        kw = dict(max_seq_length=c.max_seq_length, doc_stride=c.doc_stride)
        with _main_first():
            windows = train_features(self.pool, self.tokenizer, **kw)
            self.eval_windows = eval_features(self.pool, self.tokenizer, **kw)
            self.dev_windows = eval_features(self.dev, self.tokenizer, **kw)
            self.cache = None
            if self.teacher is not None and (c.distill is not None or "teacher_logits" in self.strategy.needs):
                from kdfast.distill.teacher_cache import TeacherCache
                self.cache = TeacherCache.build(self.teacher, windows, self.tokenizer,
                                                os.path.join(self.out, "teacher_cache"), progress=c.progress)
        self.plain_windows = windows
        self.train_windows = self.cache.attach(windows) if (self.cache is not None and c.distill is not None) \
            else windows
        self.rows = windows_per_example(windows, self.ids)
        empty = [q for q, r in self.rows.items() if not r]
        if empty:
            raise ValueError(f"questions {empty[:5]} have no windows")
        self._ready = True

    def _answers_table(self) -> dict:
        if self._human is None:
            path = os.path.join(self.out, LABELS_FILE)
            self._human = {}
            if os.path.exists(path):
                with open(path) as fh:
                    self._human = json.load(fh)
        return self._human

    # --- the training set ---------------------------------------------------------------------------
    def training_set(self, labeled_ids=None):
        """The windows a round trains on: every window of the labeled questions (with the
        teacher-cache columns when distilling), plus with ``kd_on_pool`` every window of the
        unlabeled pool with ``start_positions = end_positions =`` :data:`IGNORE_POSITION`."""
        from datasets import concatenate_datasets
        self._setup()
        lab = list(self._load_or_init()["labeled"] if labeled_ids is None else labeled_ids)
        lab_set = set(lab)
        q_rows = sorted(self.index[q] for q in lab)
        rows = [r for i in q_rows for r in self.rows[self.ids[i]]]
        ds = self.train_windows.select(rows)
        if self.config.labelling == "annotate" and rows:
            ds = self._with_human_positions(ds, q_rows)
        if self.config.kd_on_pool:
            un = [r for q in self.ids if q not in lab_set for r in self.rows[q]]
            if un:
                pool_part = without_labels(self.train_windows.select(un), "pool windows (soft labels only)")
                ds = concatenate_datasets([ds, pool_part]) if len(ds) else pool_part
        return ds

    def _with_human_positions(self, ds, q_rows):
        from kdfast.qa.features import train_features
        human = self._answers_table()
        qs = self.pool.select(q_rows)
        missing = [q for q in qs["id"] if q not in human]
        if missing:
            raise RuntimeError(f"no human labels for labeled questions {missing[:5]} ({LABELS_FILE} lost?)")
        qs = qs.map(lambda ex: {"answers": human[ex["id"]]}, desc="human answers", load_from_cache_file=False)
        fresh = train_features(qs, self.tokenizer, max_seq_length=self.config.max_seq_length,
                               doc_stride=self.config.doc_stride, load_from_cache=False)
        if fresh["example_id"] != ds["example_id"] or fresh["window"] != ds["window"]:
            raise RuntimeError("windows of the labelled questions differ from the pool's (tokenizer changed?)")
        sp, ep = fresh["start_positions"], fresh["end_positions"]
        return ds.map(lambda b, idx: {"start_positions": [sp[i] for i in idx], "end_positions": [ep[i] for i in idx]},
                      batched=True, with_indices=True, desc="human positions", load_from_cache_file=False)

    # --- stages ---------------------------------------------------------------------------------
    def _round_dir(self, k):
        return os.path.join(self.out, f"round-{k}")

    def _row(self, k) -> dict:
        rows = self.state["rounds"]
        while len(rows) <= k:
            rows.append({"round": len(rows)})
        return rows[k]

    def _fresh_student(self):
        from kdfast.distill.student import (check_compatible, parse_student_layers, student_from_config,
                                            student_from_teacher)
        c = self.config
        if c.student_config is not None:
            cfg = c.student_config
            if isinstance(cfg, str):
                if cfg == "student":
                    from kdfast.qa.configs import student_config
                    cfg = student_config(self.tokenizer)
                else:
                    from transformers import AutoConfig
                    if not os.path.exists(cfg):
                        raise FileNotFoundError(f"student_config {cfg!r}: no such config file or directory")
                    cfg = AutoConfig.from_pretrained(cfg)
            elif isinstance(cfg, dict):
                from transformers import AutoConfig
                d = dict(cfg)
                cfg = AutoConfig.for_model(d.pop("model_type", "bert"), **d)
            if self.teacher is not None:
                check_compatible(None, None, self.teacher.config, cfg)
            return student_from_config(cfg, attn_implementation="kdfast", seed=c.seed)
        n = self.teacher.config.num_hidden_layers
        layers = parse_student_layers(c.student_layers or str(max(1, n // 2)), n)
        return student_from_teacher(self.teacher, layers, attn_implementation="kdfast")

    def _do_seed_select(self, k):
        picked = self.rng.choice(len(self.ids), size=self.seed_size, replace=False)
        self.state["queried"] = [self.ids[int(i)] for i in picked]
        print(f"[kdfast active] seed set: {self.seed_size} random questions of {len(self.ids)}")

    def _do_train(self, k):
        from kdfast.distill.stage import train_stage
        self._setup()
        c = self.config
        t0 = time.perf_counter()
        ds = self.training_set()
        rdir = self._round_dir(k)
        opts = dataclasses.replace(c.train, seed=c.seed + k, disable_tqdm=c.train.disable_tqdm or not c.progress)
        live = self.teacher if (c.distill is not None and c.distill.layer_losses) else None
        trainer = train_stage(self._fresh_student(), ds, self.tokenizer, os.path.join(rdir, "train"), opts,
                              teacher=live, distill=c.distill)
        model_dir = os.path.join(rdir, "model")
        trainer.save_model(model_dir)
        n = len(self.state["labeled"])
        row = self._row(k)
        row.update(labeled=n, fraction=n / len(self.ids), train_windows=len(ds),
                   train_seconds=time.perf_counter() - t0)
        self.state["checkpoint"] = model_dir

    def _load_student(self):
        from kdfast.distill.models import inference_ready, load_qa_model
        return inference_ready(load_qa_model(self.state["checkpoint"], attn_implementation="kdfast"))

    def _do_evaluate(self, k):
        from kdfast.qa.evaluate import evaluate_qa
        self._setup()
        ckpts = os.path.join(self._round_dir(k), "train")
        if not self.config.keep_checkpoints and world()[0] == 0:
            shutil.rmtree(ckpts, ignore_errors=True)  # the model is saved; resuming training needs them no more
        t0 = time.perf_counter()
        metrics = None
        if world()[0] == 0:
            res = evaluate_qa(self._load_student(), self.tokenizer, self.dev, features=self.dev_windows,
                              batch_size=self.config.train.per_device_eval_batch_size,
                              version_2_with_negative=self.config.version_2_with_negative,
                              progress=self.config.progress, prefix=f"round {k}")
            m = res.metrics
            metrics = {"exact_match": float(m.get("exact_match", m.get("exact"))), "f1": float(m["f1"]),
                       "eval_seconds": time.perf_counter() - t0}
        row = self._row(k)
        row.update(_bcast(metrics))
        print(f"[kdfast active] round {k}: {row['labeled']} labeled ({100 * row['fraction']:.1f}%)  "
              f"EM {row['exact_match']:.2f}  F1 {row['f1']:.2f}")

    def _view_path(self, k):
        return os.path.join(self._round_dir(k), "pool_view.pkl")

    def _do_score(self, k):
        self._setup()
        lab = set(self.state["labeled"])
        pool_rows = [i for i, q in enumerate(self.ids) if q not in lab]
        labeled_q = self.pool.select(sorted(self.index[q] for q in lab)) if "embeddings" in self.strategy.needs \
            else None
        c = self.config
        view, stats = score_pool(self._load_student(), self.tokenizer, self.pool.select(pool_rows),
                                 pool_windows=self.eval_windows, labeled_questions=labeled_q,
                                 teacher_logits=self.cache if "teacher_logits" in self.strategy.needs else None,
                                 strategy=self.strategy, batch_size=c.score_batch_size, mc_passes=c.mc_passes,
                                 max_seq_length=c.max_seq_length, doc_stride=c.doc_stride, seed=c.seed + k,
                                 version_2_with_negative=c.version_2_with_negative, progress=c.progress,
                                 return_stats=True)
        if world()[0] == 0:
            os.makedirs(self._round_dir(k), exist_ok=True)
            tmp = self._view_path(k) + ".tmp"
            with open(tmp, "wb") as fh:
                pickle.dump(view, fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, self._view_path(k))
        stats = _bcast(stats)
        self._row(k).update(pool_questions=stats["questions"], score_seconds=stats["seconds"],
                            pool_questions_per_s=stats["questions_per_s"])

    def _do_select(self, k):
        view = None
        if world()[0] == 0:
            with open(self._view_path(k), "rb") as fh:
                view = pickle.load(fh)
        lab = set(self.state["labeled"])
        n = min(self.query_size, self.budget - len(lab), len(self.ids) - len(lab))
        t0 = time.perf_counter()
        picked = select_queries(self.strategy, view, n, self.rng)
        bad = [q for q in picked if q in lab or q not in self.index]
        if bad or len(set(picked)) != len(picked) or len(picked) != n:
            raise RuntimeError(f"strategy {self.config.strategy!r} returned a bad selection ({len(picked)} ids for "
                               f"{n}, labeled or unknown: {bad[:5]})")
        self.state["queried"] = picked
        row = self._row(k)
        row.update(queried=n, select_seconds=time.perf_counter() - t0)
        if world()[0] == 0 and os.path.exists(self._view_path(k)):
            os.remove(self._view_path(k))

    def _do_label(self, k, seed=False):
        """Simulate: reveal the answers. Annotate: export and return "stop" (resume() completes it)."""
        queried = self.state["queried"]
        if self.config.labelling == "simulate":
            self.state["labeled"].extend(queried)
            self.state["queried"] = []
            return None
        name = "seed_to_label.jsonl" if seed else "to_label.jsonl"
        path = os.path.join(self._round_dir(k), name)
        if world()[0] == 0:
            from kdfast.qa.load import write_jsonl
            recs = self.pool.select([self.index[q] for q in queried])
            write_jsonl(({"id": r["id"], "title": r.get("title", ""), "context": r["context"],
                          "question": r["question"], "answers": {"text": [], "answer_start": []}} for r in recs), path)
        self.state["awaiting"] = {"file": path, "stage": "seed_label" if seed else "label", "round": k}
        return "stop"

    def _do_seed_label(self, k):
        return self._do_label(k, seed=True)

    # --- driving ----------------------------------------------------------------------------------
    def _order(self, k):
        return (SEED_STAGES if k == 0 else ()) + STAGES

    def _is_final(self, k) -> bool:
        n = len(self.state["labeled"])
        capped = self.config.rounds is not None and k + 1 >= self.config.rounds
        return n >= self.budget or n >= len(self.ids) or capped

    def _next(self):
        k, last = self.state["round"], self.state["stage"]
        order = self._order(k)
        if last is None:
            return k, order[0]
        if last == "evaluate" and self._is_final(k):
            return None
        i = order.index(last)
        return (k, order[i + 1]) if i + 1 < len(order) else (k + 1, "train")

    def _complete(self, k, stage):
        self.state["round"], self.state["stage"] = k, stage
        self._save()
        self._after_stage(stage)

    def _awaiting_message(self):
        a = self.state["awaiting"]
        n = len(self.state["queried"])
        return (f"[kdfast active] {n} questions to label in {a['file']}: fill in each record's answers "
                "({'text': [...], 'answer_start': [...]}, character offsets into the context), then resume with "
                f"--labelled_file FILE (ActiveLearningLoop.resume(labelled_file=FILE)) and the same --output_dir "
                f"{self.out}")

    def _summary(self, status):
        st = self.state
        return {"status": status, "rounds": st["rounds"], "labeled": list(st["labeled"]),
                "file": (st["awaiting"] or {}).get("file"), "output_dir": self.out}

    def run(self) -> dict:
        """Run (or continue) the loop until the budget is spent or labels are awaited.

        Returns ``{"status": "done" | "awaiting_labels", "rounds", "labeled", "file", "output_dir"}``.
        """
        from tqdm.auto import tqdm
        st = self._load_or_init()
        if st["awaiting"]:
            print(self._awaiting_message())
            return self._summary("awaiting_labels")
        if st["done"]:
            self.write_outputs()
            return self._summary("done")
        bar = tqdm(total=self.planned_rounds(), initial=len([r for r in st["rounds"] if "f1" in r]),
                   desc=f"active learning ({self.config.strategy})", unit="round", disable=not self.config.progress)
        try:
            while True:
                nxt = self._next()
                if nxt is None:
                    st["done"] = True
                    self._save()
                    self.write_outputs()
                    return self._summary("done")
                k, stage = nxt
                if stage == "train":
                    st["round"] = k
                if getattr(self, f"_do_{stage}")(k) == "stop":
                    self._save()
                    self.write_outputs()
                    print(self._awaiting_message())
                    return self._summary("awaiting_labels")
                self._complete(k, stage)
                if stage == "evaluate":
                    bar.update(1)
                    if world()[0] == 0:
                        self.write_outputs(plot=False)
        finally:
            bar.close()

    def resume(self, labelled_file: str | None = None) -> dict:
        """Merge the answers of ``labelled_file`` (annotate mode) and continue :meth:`run`.

        The file (SQuAD JSON or JSON lines, read by :func:`kdfast.qa.load_squad`) must hold
        exactly the queried questions, each with at least one answer (SQuAD v1) whose text is
        at its ``answer_start`` in the unchanged context.
        """
        st = self._load_or_init()
        if labelled_file is None:
            return self.run()
        if not st["awaiting"]:
            raise ValueError(f"{self.out}: no questions are awaiting labels; run() continues the loop")
        self._merge_labels(labelled_file)
        a = st["awaiting"]
        st["awaiting"] = None
        st["labeled"].extend(st["queried"])
        st["queried"] = []
        st["labelled_files"].append(os.path.abspath(labelled_file))
        self._complete(a["round"], a["stage"])
        return self.run()

    def _merge_labels(self, path):
        from kdfast.qa.load import load_squad
        if not os.path.isfile(path):
            raise FileNotFoundError(f"labelled file {path!r} does not exist")
        ds = load_squad(path, version_2=True if self.config.version_2_with_negative else False)
        got = list(ds["id"])
        want = list(self.state["queried"])
        dup = sorted({q for q in got if got.count(q) > 1})
        missing = [q for q in want if q not in set(got)]
        extra = [q for q in got if q not in set(want)]
        if dup or missing or extra:
            parts = []
            if missing:
                parts.append(f"missing ids {missing[:10]}" + (f" (+{len(missing) - 10} more)" if len(missing) > 10
                                                             else ""))
            if extra:
                parts.append(f"ids that were not queried {extra[:10]}" + (f" (+{len(extra) - 10} more)"
                                                                         if len(extra) > 10 else ""))
            if dup:
                parts.append(f"repeated ids {dup[:10]}")
            raise ValueError(f"labelled file {path}: must hold exactly the {len(want)} queried questions of "
                             f"{self.state['awaiting']['file']}: " + "; ".join(parts))
        human = dict(self._answers_table())
        for rec in ds:
            q = rec["id"]
            if rec["context"] != self.pool[self.index[q]]["context"]:
                raise ValueError(f"labelled file {path}: question {q!r}: the context was changed (answers must "
                                 "point into the original context)")
            if not rec["answers"]["text"] and not self.config.version_2_with_negative:
                raise ValueError(f"labelled file {path}: question {q!r} has no answer")
            human[q] = {"text": list(rec["answers"]["text"]), "answer_start": list(rec["answers"]["answer_start"])}
        if world()[0] == 0:
            os.makedirs(self.out, exist_ok=True)
            _write_json(os.path.join(self.out, LABELS_FILE), human)
        self._human = human

    # --- outputs -------------------------------------------------------------------------------
    def results_markdown(self) -> str:
        """The per-round table of ``al_results.md``."""
        st = self._load_or_init()
        head = (f"# Active learning: {self.config.strategy} ({len(self.ids)} pool questions, budget {self.budget}, "
                f"seed {self.seed_size}, query {self.query_size}, "
                f"{'distilled' if self.config.distill is not None else 'fine-tuned'}"
                f"{', KD on pool' if self.config.kd_on_pool else ''})\n\n")
        lines = ["| round | labeled | fraction | EM | F1 | train s | score s | pool q/s | seconds |",
                 "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def f(v, fmt):
            return "" if v is None else format(v, fmt)
        for r in st["rounds"]:
            secs = sum(r.get(k) or 0.0 for k in _SECONDS)
            lines.append(f"| {r['round']} | {r.get('labeled', '')} | {f(r.get('fraction'), '.3f')} | "
                         f"{f(r.get('exact_match'), '.2f')} | {f(r.get('f1'), '.2f')} | "
                         f"{f(r.get('train_seconds'), '.1f')} | {f(r.get('score_seconds'), '.1f')} | "
                         f"{f(r.get('pool_questions_per_s'), '.1f')} | {secs:.1f} |")
        return head + "\n".join(lines) + "\n"

    def write_outputs(self, plot: bool = True) -> dict:
        """Write ``al_log.json``, ``al_results.md`` and (``plot``) ``al_curve.png``; returns their paths."""
        paths = {"log": os.path.join(self.out, "al_log.json"), "results": os.path.join(self.out, "al_results.md")}
        if world()[0] != 0:
            return paths
        os.makedirs(self.out, exist_ok=True)
        log = self.log()
        _write_json(paths["log"], log)
        with open(paths["results"], "w") as fh:
            fh.write(self.results_markdown())
        if plot and any("f1" in r for r in log["rounds"]):
            from kdfast.active.plot import plot_curves
            paths["curve"] = plot_curves([log], os.path.join(self.out, "al_curve.png"))
        return paths


__all__ = ["ALConfig", "ActiveLearningLoop", "IGNORE_POSITION", "STAGES", "SEED_STAGES", "resolve_size",
           "rng_states", "restore_rng_states"]
