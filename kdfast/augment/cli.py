"""``kdfast augment``: thin argument parsing over :mod:`kdfast.augment.loop`.

    kdfast augment --source_file source.json --train_file target.json --validation_file dev.json \\
        --teacher_name_or_path teacher/ --student_layers 0 --episodes 8 --output_dir out/aug
    kdfast augment ... --methods full,none,tinybert,mixkd,source,random,confidence
    kdfast augment ... --resume_from_checkpoint        # continue where it stopped

``--source_file`` takes comma-separated files: each file is one source domain. Without
``--teacher_name_or_path`` a built-in teacher is fine-tuned on source + target first. Flags
follow HF ``run_qa.py`` names (``HfArgumentParser``; dash spellings work too). Writes
``<output_dir>/<method>/`` (state, MLM, log), ``augment_log.json``, ``results.md`` and
``reward_curve.png``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import field

__all__ = ["AugmentArguments", "main"]


@dataclasses.dataclass
class AugmentArguments:
    output_dir: str = field(metadata={"help": "where the runs keep their state, logs, table and curve"})
    source_file: str | None = field(default=None, metadata={
        "help": "resource-rich source questions (SQuAD JSON / JSON lines); comma-separated: one domain per file"})
    train_file: str | None = field(default=None, metadata={"help": "the few labeled target-domain questions"})
    validation_file: str | None = field(default=None, metadata={"help": "target evaluation questions (EM / F1)"})
    teacher_name_or_path: str | None = field(default=None, metadata={
        "help": "fine-tuned QA teacher directory (default: fine-tune the built-in teacher on source + target)"})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "tokenizer directory (default: the teacher's, else <train_file dir>/tokenizer)"})
    student_layers: str | None = field(default=None, metadata={
        "help": "student from teacher layers: a count ('2') or 0-based layers ('0,2'); default half the teacher"})
    student_config: str | None = field(default=None, metadata={
        "help": "random-init student instead: a config.json path or 'student' (the built-in config)"})
    methods: str = field(default="full,none", metadata={
        "help": "comma-separated: full, none, tinybert, mixkd, source, random, confidence"})
    bases: str = field(default="target", metadata={
        "help": "what generated candidates start from, comma-separated: target (the target questions, passages "
                "mixed with retrieved source text), source (retrieved source questions, passages mixed with the "
                "target passage's words)"})
    episodes: int = 8
    candidates_per_episode: int = 32
    episode_steps: int = 8
    warmup_steps: int = 60
    final_steps: int = 150
    teacher_steps: int = 300
    keep_rate: float | None = field(default=None, metadata={
        "help": "keep rate of the random / confidence selectors (default: the full method's, else 0.5)"})
    dev_fraction: float = field(default=0.25, metadata={
        "help": "share of --train_file held out (by passage) for the selector's reward; never trained on"})
    mlm_name_or_path: str | None = field(default=None, metadata={
        "help": "a local masked-LM directory (same tokenizer); default: train a small one on source + target"})
    mlm_init: str | None = field(default=None, metadata={
        "help": "start the masked LM from this pretrained BERT-family model directory (e.g. the teacher's, "
                "when it was fine-tuned from a pretrained encoder; same tokenizer) instead of random weights"})
    mlm_steps: int = 300
    per_device_train_batch_size: int = 16
    learning_rate: float = 1e-3
    policy_learning_rate: float = 0.05
    reward: str = field(default="f1", metadata={
        "help": "the selector's reward: f1 (change of the student's held-out dev F1, the paper's) or dev_loss "
                "(decrease of its KD + CE loss there: less noisy on a few dev questions)"})
    reward_baseline: str = field(default="moving_average", metadata={
        "help": "what the full method subtracts from the reward: moving_average (REINFORCE) or critic "
                "(actor-critic: a value network on the episode's candidate states)"})
    choose_strategy: bool = field(default=False, metadata={
        "help": "the full method's policy also picks which generator strategy makes each candidate "
                "(default: strategies drawn uniformly); the random / confidence selectors keep drawing uniformly"})
    temperature: float = 2.0
    alpha: float = field(default=0.5, metadata={"help": "weight of the soft term; the hard term gets 1 - alpha"})
    max_seq_length: int = 256
    doc_stride: int = 96
    seed: int = 42
    resume_from_checkpoint: bool = field(default=False, metadata={"help": "continue the runs in --output_dir"})
    disable_tqdm: bool = False


def _error(msg):
    return SystemExit(f"kdfast augment: error: {msg}")


def _records(path, flag):
    from kdfast.qa.load import SquadFormatError, load_squad

    if path is None:
        raise _error(f"{flag} is required")
    if not os.path.isfile(path):
        raise _error(f"{flag} {path}: no such file")
    try:
        ds = load_squad(path)
    except SquadFormatError as e:
        raise _error(f"{flag} {path}: {e}") from None
    if len(ds) == 0:
        raise _error(f"{flag} {path}: no questions")
    return [{k: r[k] for k in ("id", "title", "context", "question", "answers")} for r in ds]


def _tokenizer(a):
    from kdfast.distill.models import load_tokenizer

    cands = [a.tokenizer_name, a.teacher_name_or_path]
    if a.train_file:
        cands.append(os.path.join(os.path.dirname(os.path.abspath(a.train_file)), "tokenizer"))
    for c in cands:
        if c and os.path.isdir(c):
            try:
                return load_tokenizer(c)
            except (FileNotFoundError, OSError, ValueError):
                continue
    raise _error("no tokenizer found: pass --tokenizer_name DIR (kdfast generate-data saves one next to the data)")


def _student(a, teacher, tok):
    from kdfast.distill.student import parse_student_layers, student_from_config, student_from_teacher

    if a.student_config:
        from kdfast.qa.configs import student_config
        if a.student_config == "student":
            cfg = student_config(tok)
        elif os.path.isfile(a.student_config):
            from transformers import BertConfig
            cfg = BertConfig.from_json_file(a.student_config)
        else:
            raise _error(f"--student_config {a.student_config}: no such file (or 'student')")
        return student_from_config(cfg, attn_implementation="sdpa", seed=a.seed)
    n = teacher.config.num_hidden_layers
    try:
        layers = parse_student_layers(a.student_layers or str(max(1, n // 2)), n)
    except ValueError as e:
        raise _error(str(e) if "--student_layers" in str(e) else f"--student_layers {a.student_layers!r}: {e}") from None
    return student_from_teacher(teacher, layers, attn_implementation="sdpa")


def main(argv=None) -> int:
    from transformers import HfArgumentParser

    from kdfast.augment.loop import (METHODS, MLM_METHODS, AugmentConfig, AugmentLoop, finetune_teacher,
                                     target_split, train_default_mlm)
    from kdfast.augment.report import markdown_table, plot_rewards

    parser = HfArgumentParser((AugmentArguments,), prog="kdfast augment",
                              description="learning to augment for data-scarce QA distillation")
    (a,) = parser.parse_args_into_dataclasses(list(argv or []))
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise _error(f"--methods {a.methods!r}: unknown {bad or 'empty'}; choose from {', '.join(METHODS)}")
    from kdfast.augment.generator import BASES
    bases = tuple(b.strip() for b in a.bases.split(",") if b.strip())
    if not bases or any(b not in BASES for b in bases):
        raise _error(f"--bases {a.bases!r}: expected a comma-separated subset of {', '.join(BASES)}")
    try:  # the config's own checks (reward, reward baseline, ...) before any data, model or training
        AugmentConfig(reward=a.reward, reward_baseline=a.reward_baseline, dev_fraction=a.dev_fraction, bases=bases)
    except ValueError as e:
        raise _error(f"--{e}") from None
    if a.teacher_name_or_path and not os.path.isdir(a.teacher_name_or_path):
        raise _error(f"--teacher_name_or_path {a.teacher_name_or_path}: no such directory")
    if a.mlm_name_or_path and not os.path.isdir(a.mlm_name_or_path):
        raise _error(f"--mlm_name_or_path {a.mlm_name_or_path}: no such directory")
    if a.mlm_init and not os.path.exists(os.path.join(a.mlm_init, "config.json")):
        raise _error(f"--mlm_init {a.mlm_init}: no model directory (config.json) there")
    if a.mlm_init and a.mlm_name_or_path:
        raise _error("--mlm_init and --mlm_name_or_path exclude each other: the first trains a masked LM from "
                     "an encoder, the second uses a trained one as it is")
    if a.episodes < 1:
        raise _error(f"--episodes {a.episodes}: expected >= 1")
    if a.source_file is None:
        raise _error("--source_file is required")
    source = []
    for path in [p for p in a.source_file.split(",") if p]:
        dom = os.path.splitext(os.path.basename(path))[0]
        source += [dict(r, domain=dom) for r in _records(path, "--source_file")]
    target = _records(a.train_file, "--train_file")
    evals = _records(a.validation_file, "--validation_file")
    tok = _tokenizer(a)
    os.makedirs(a.output_dir, exist_ok=True)
    def log(msg):  # --disable_tqdm turns the progress bars off, not the log
        print(f"[kdfast augment] {msg}", flush=True)

    from kdfast.distill.models import load_qa_model
    if a.teacher_name_or_path:
        teacher = load_qa_model(a.teacher_name_or_path)
    else:
        teacher_dir = os.path.join(a.output_dir, "teacher")
        if os.path.exists(os.path.join(teacher_dir, "config.json")):
            teacher = load_qa_model(teacher_dir)
        else:
            from kdfast.distill.student import student_from_config
            from kdfast.qa.configs import teacher_config
            log(f"fine-tuning the built-in teacher ({a.teacher_steps} steps on source + target)")
            teacher = student_from_config(teacher_config(tok), attn_implementation="sdpa", seed=a.seed)
            finetune_teacher(teacher, source + target, tok, steps=a.teacher_steps,
                             batch_size=a.per_device_train_batch_size, learning_rate=a.learning_rate, seed=a.seed,
                             max_seq_length=a.max_seq_length, doc_stride=a.doc_stride)
            teacher.save_pretrained(teacher_dir)
            tok.save_pretrained(teacher_dir)
    teacher.eval()
    results = []
    keep_rate = a.keep_rate
    mlm_path = a.mlm_name_or_path
    if mlm_path is None and any(m in MLM_METHODS for m in methods):
        # One masked LM for every method that needs one (trained once, reused on a rerun).
        mlm_path = os.path.join(a.output_dir, "mlm")
        if not os.path.exists(os.path.join(mlm_path, "config.json")):
            cfg = AugmentConfig(mlm_steps=a.mlm_steps, mlm_init=a.mlm_init, dev_fraction=a.dev_fraction,
                                seed=a.seed)
            train_default_mlm(cfg, source, target_split(cfg, target)[0], tok, mlm_path, log)
    for m in sorted(methods, key=lambda m: m != "full"):  # full first: its keep rate sizes the random selector
        out = os.path.join(a.output_dir, m)
        if os.path.exists(os.path.join(out, "state.pt")) and not a.resume_from_checkpoint:
            raise _error(f"--output_dir {a.output_dir} holds a {m!r} run already: pass --resume_from_checkpoint "
                         "to continue it, or choose another --output_dir")
        try:
            cfg = AugmentConfig(method=m, episodes=a.episodes, candidates_per_episode=a.candidates_per_episode,
                                episode_steps=a.episode_steps, warmup_steps=a.warmup_steps,
                                final_steps=a.final_steps, batch_size=a.per_device_train_batch_size,
                                learning_rate=a.learning_rate, policy_learning_rate=a.policy_learning_rate,
                                reward=a.reward, reward_baseline=a.reward_baseline,
                                choose_strategy=a.choose_strategy,
                                temperature=a.temperature, alpha=a.alpha,
                                keep_rate=0.5 if keep_rate is None else keep_rate, dev_fraction=a.dev_fraction,
                                mlm_path=mlm_path, mlm_steps=a.mlm_steps,
                                bases=bases,
                                max_seq_length=a.max_seq_length, doc_stride=a.doc_stride, seed=a.seed)
            loop = AugmentLoop(cfg, source=source, target=target, eval_records=evals, teacher=teacher,
                               student=_student(a, teacher, tok), tokenizer=tok, output_dir=out, log=log,
                               progress=not a.disable_tqdm)
            res = loop.run(resume=a.resume_from_checkpoint)
        except (ValueError, FileNotFoundError) as e:
            raise _error(str(e)) from None
        if m == "full" and keep_rate is None:
            cand = sum(e["candidates"] for e in res["episodes"])
            keep_rate = res["kept"] / cand if cand else 0.5
        results.append(res)
    with open(os.path.join(a.output_dir, "augment_log.json"), "w") as fh:
        json.dump({"arguments": dataclasses.asdict(a), "results": results}, fh, indent=2)
    table = markdown_table(results)
    with open(os.path.join(a.output_dir, "results.md"), "w") as fh:
        fh.write("# kdfast augment\n\n" + table + "\n")
    full = [r for r in results if r["method"] == "full"]
    if full:
        plot_rewards(full[0]["episodes"], os.path.join(a.output_dir, "reward_curve.png"))
    print(table)
    print(f"wrote {a.output_dir}/augment_log.json, results.md" + (", reward_curve.png" if full else ""))
    return 0
