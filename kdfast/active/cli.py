"""``kdfast active`` and ``kdfast active-plot``: thin argument parsing over :mod:`kdfast.active.loop`.

    kdfast active --train_file pool.json --validation_file dev.json --teacher_name_or_path teacher/ \\
        --student_layers 0,2 --strategy margin --budget 0.2 --output_dir out/al
    kdfast active ... --annotate                 # writes round-K/to_label.jsonl and stops
    kdfast active ... --labelled_file done.jsonl # merges the answers, continues
    kdfast active-plot --logs out/a/al_log.json out/b/al_log.json --output curves.png

Flags follow HF ``run_qa.py`` names (``HfArgumentParser``; dash spellings work too).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import field

from kdfast.active.plot import main_plot

__all__ = ["ActiveArguments", "main", "main_plot", "parse_size"]


@dataclasses.dataclass
class ActiveArguments:
    output_dir: str = field(metadata={"help": "where the loop keeps its state, models, log, table and curve"})
    train_file: str | None = field(default=None, metadata={"help": "the pool: SQuAD JSON / JSON lines questions"})
    validation_file: str | None = field(default=None, metadata={"help": "dev questions with answers (EM / F1)"})
    teacher_name_or_path: str | None = field(default=None, metadata={"help": "fine-tuned QA teacher directory"})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "tokenizer directory (default: the teacher's, else <train_file dir>/tokenizer)"})
    student_layers: str | None = field(default=None, metadata={
        "help": "student from teacher layers: a count ('2') or 0-based layers ('0,2'); default half the teacher"})
    student_config: str | None = field(default=None, metadata={
        "help": "random-init student instead: a config.json path or 'student' (the built-in config)"})
    strategy: str = field(default="margin", metadata={
        "help": "random, least_confidence, margin, entropy, bald, coreset, hybrid, disagreement, ..."})
    strategy_kwargs: str | None = field(default=None, metadata={"help": "JSON object, e.g. '{\"prefilter\": 3}'"})
    budget: str = field(default="0.2", metadata={"help": "questions to label in all: a fraction ('0.2') or a count"})
    seed_fraction: float = field(default=0.02, metadata={"help": "random seed set, fraction of the pool"})
    seed_size: int | None = field(default=None, metadata={"help": "seed set size (overrides --seed_fraction)"})
    query_fraction: float = field(default=0.03, metadata={"help": "questions queried per round, fraction"})
    query_size: int | None = field(default=None, metadata={"help": "questions per round (overrides the fraction)"})
    rounds: int | None = field(default=None, metadata={"help": "cap on training rounds (round 0 = seed set)"})
    kd_on_pool: bool = field(default=False, metadata={
        "help": "also distil on the unlabeled pool (teacher soft labels only, no hard loss)"})
    no_distill: bool = field(default=False, metadata={"help": "fine-tune the student on hard labels only"})
    temperature: float = 2.0
    alpha: float = field(default=0.5, metadata={"help": "weight of the soft term; the hard term gets 1 - alpha"})
    annotate: bool = field(default=False, metadata={
        "help": "human labelling: write each query to round-K/to_label.jsonl and stop"})
    labelled_file: str | None = field(default=None, metadata={
        "help": "the filled-in to_label file: merge its answers and continue"})
    resume_from_checkpoint: bool = field(default=False, metadata={
        "help": "continue the loop saved in --output_dir (where it stopped)"})
    num_train_epochs: float = 2.0
    max_steps: int = -1
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 64
    learning_rate: float = 5e-5
    max_seq_length: int = 384
    doc_stride: int = 128
    mc_passes: int = field(default=5, metadata={"help": "MC-dropout passes (bald)"})
    seed: int = 42
    max_train_samples: int | None = field(default=None, metadata={"help": "use the first N pool questions"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use the first N dev questions"})
    version_2_with_negative: bool = False
    fix_spans: bool = False
    disable_tqdm: bool = False


def _error(msg):
    return SystemExit(f"kdfast active: error: {msg}")


def parse_size(text: str, flag: str):
    """``"0.2"`` -> 0.2 (a fraction), ``"500"`` -> 500 (a count)."""
    s = str(text).strip()
    try:
        if s.isdigit():
            return int(s)
        v = float(s)
    except ValueError:
        raise _error(f"{flag} {text!r}: expected a fraction (0.2) or a count (500)") from None
    if not 0 < v <= 1:
        raise _error(f"{flag} {text!r}: a fraction must be in (0, 1]; give a whole number for a count")
    return v


def _load(path, flag, *, limit, version_2, fix_spans):
    from kdfast.qa.load import SquadFormatError, load_squad
    if path is None:
        raise _error(f"{flag} is required")
    if not os.path.isfile(path):
        raise _error(f"{flag} {path}: no such file")
    try:
        ds = load_squad(path, version_2=version_2, fix_spans=fix_spans)
    except SquadFormatError as e:
        raise _error(str(e)) from None
    return ds.select(range(min(limit, len(ds)))) if limit is not None else ds


def _tokenizer(a: ActiveArguments):
    from kdfast.distill.models import load_tokenizer
    cands = [a.tokenizer_name, a.teacher_name_or_path]
    if a.train_file:
        cands.append(os.path.join(os.path.dirname(os.path.abspath(a.train_file)), "tokenizer"))
    for c in cands:
        if c and os.path.isdir(c):
            try:
                return load_tokenizer(c)
            except FileNotFoundError:
                continue
    raise _error("no tokenizer found: pass --tokenizer_name DIR (kdfast generate-data saves one next to the data)")


def build_config(a: ActiveArguments):
    """The :class:`~kdfast.active.loop.ALConfig` the flags describe."""
    from kdfast.active.loop import ALConfig
    from kdfast.distill.stage import TrainOptions
    from kdfast.distill.trainer import DistillConfig
    kwargs = {}
    if a.strategy_kwargs:
        try:
            kwargs = json.loads(a.strategy_kwargs)
        except json.JSONDecodeError as e:
            raise _error(f"--strategy_kwargs {a.strategy_kwargs!r}: not JSON ({e})") from None
        if not isinstance(kwargs, dict):
            raise _error(f"--strategy_kwargs must be a JSON object, got {a.strategy_kwargs!r}")
    train = TrainOptions(num_train_epochs=a.num_train_epochs, max_steps=a.max_steps,
                         per_device_train_batch_size=a.per_device_train_batch_size,
                         per_device_eval_batch_size=a.per_device_eval_batch_size, learning_rate=a.learning_rate,
                         seed=a.seed, disable_tqdm=a.disable_tqdm)
    try:
        distill = None if a.no_distill else DistillConfig(temperature=a.temperature, alpha=a.alpha)
        return ALConfig(output_dir=a.output_dir, strategy=a.strategy, strategy_kwargs=kwargs,
                        seed_fraction=a.seed_fraction, seed_size=a.seed_size, query_fraction=a.query_fraction,
                        query_size=a.query_size, budget=parse_size(a.budget, "--budget"), rounds=a.rounds,
                        student_layers=a.student_layers, student_config=a.student_config, distill=distill,
                        kd_on_pool=a.kd_on_pool, train=train, max_seq_length=a.max_seq_length,
                        doc_stride=a.doc_stride, labelling="annotate" if a.annotate else "simulate",
                        mc_passes=a.mc_passes, seed=a.seed, score_batch_size=a.per_device_eval_batch_size,
                        version_2_with_negative=a.version_2_with_negative, progress=not a.disable_tqdm)
    except ValueError as e:
        raise _error(str(e)) from None


def main(argv=None) -> int:
    """``kdfast active`` (see the module doc); ``main(["plot", ...])`` is ``kdfast active-plot``."""
    from transformers import HfArgumentParser
    argv = list(argv or [])
    if argv[:1] == ["plot"]:
        return main_plot(argv[1:])
    parser = HfArgumentParser((ActiveArguments,), prog="kdfast active",
                              description="active learning: choose which questions to label")
    (a,) = parser.parse_args_into_dataclasses(argv)
    from kdfast.active.loop import STATE_FILE, ActiveLearningLoop
    from kdfast.active.strategies import available_strategies
    if a.strategy not in available_strategies():
        raise _error(f"--strategy {a.strategy!r} is unknown; available: {', '.join(available_strategies())}")
    if a.teacher_name_or_path and not os.path.isdir(a.teacher_name_or_path):
        raise _error(f"--teacher_name_or_path {a.teacher_name_or_path}: no such directory")
    if a.labelled_file and not os.path.isfile(a.labelled_file):
        raise _error(f"--labelled_file {a.labelled_file}: no such file")
    has_state = os.path.exists(os.path.join(a.output_dir, STATE_FILE))
    if has_state and not (a.resume_from_checkpoint or a.labelled_file):
        raise _error(f"--output_dir {a.output_dir} holds a loop already: pass --resume_from_checkpoint to continue "
                     "it (or --labelled_file FILE to merge labels), or choose another --output_dir")
    if a.labelled_file and not has_state:
        raise _error(f"--labelled_file given but --output_dir {a.output_dir} holds no loop ({STATE_FILE})")
    cfg = build_config(a)
    v2 = True if (a.version_2_with_negative or a.annotate) else None
    pool = _load(a.train_file, "--train_file", limit=a.max_train_samples, version_2=v2, fix_spans=a.fix_spans)
    dev = _load(a.validation_file, "--validation_file", limit=a.max_eval_samples,
                version_2=True if a.version_2_with_negative else None, fix_spans=a.fix_spans)
    tok = _tokenizer(a)
    try:
        loop = ActiveLearningLoop(cfg, pool, dev, tok, teacher_dir=a.teacher_name_or_path)
        summary = loop.resume(labelled_file=a.labelled_file) if a.labelled_file else loop.run()
    except (ValueError, FileNotFoundError) as e:
        raise _error(str(e)) from None
    print(loop.results_markdown())
    if summary["status"] == "done":
        print(f"wrote {a.output_dir}/al_log.json, al_results.md, al_curve.png")
    return 0
