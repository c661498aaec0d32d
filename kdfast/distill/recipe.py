"""The compression recipe: distil -> prune (gates + Lagrangian target, while distilling) -> compact
-> ternary QAT with distillation -> pack and save.

    rows = run_recipe(RecipeConfig(output_dir="out"), teacher_dir, train_questions, dev_questions, tokenizer)

Every stage writes a loadable model (``out/<stage>/model``: dense, compacted,
ternary) and one row of the results table (``out/recipe_state.json``, written
atomically). A rerun skips finished stages and continues an unfinished one
from its last epoch checkpoint, so a killed run resumes where it stopped.

All stages distil from the same cached teacher logits (computed once in
``out/teacher_cache``); layer losses, when asked for, run the teacher live.
The ternary stage starts from the full-precision (pruned) student, as in
TernaryBERT, with 8-bit activations by default (W2A8 integer kernels); it
ternarizes the embedding tables too (``ternary_embeddings``) and stores what
stays full precision (LayerNorm, biases, the QA head) as float16
(``ternary_float_dtype``): on the demo student the fp32 embeddings were 1.28 of
the ternary file's 1.30 MB.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

from kdfast.distill.distributed import barrier, is_main_process, main_process_first
from kdfast.distill.models import (count_parameters, encoder_linear_weights, inference_ready, load_qa_model,
                                   save_ternary, weights_size)
from kdfast.distill.stage import TrainOptions, train_stage
from kdfast.distill.student import parse_student_layers, student_from_config, student_from_teacher
from kdfast.distill.teacher_cache import TeacherCache
from kdfast.distill.trainer import DistillConfig
from kdfast.distill.unlabeled import check_disjoint, unlabeled_windows, with_unlabeled

STAGES = ("distil", "prune", "ternary")
TERNARY_TEACHERS = ("teacher", "source")


def training_attention(distill: DistillConfig | None = None, *, gates: bool = False) -> str:
    """Attention implementation to train with: ``"kdfast"``, run by the trainer on the unpadded encoder
    (:func:`kdfast.distill.models.unpad_if_supported`), where padded tokens cost nothing; the steps that
    read q/k/v (layer losses through kdfast.hf.capture) or gate heads need it anyway. Measured on the
    AVX2 EPYC: one logit-KD distillation epoch on 512 real SQuAD questions (3-layer MiniLM student,
    B=16, 1 thread) takes 88-91 s unpadded with random batches against 99-110 s for SDPA with
    length-grouped batches and 189-240 s for SDPA with random batches (bench/qa_distill.py; README).
    On a CUDA machine the other steps keep ``"sdpa"`` (with length-grouped batches): the unpadded
    path there runs the Triton varlen kernels, which have not run on a GPU yet. Evaluation and the
    latency rows use SDPA (see :func:`kdfast.distill.models.load_qa_model`)."""
    import torch
    if gates or (distill is not None and distill.layer_losses) or not torch.cuda.is_available():
        return "kdfast"
    return "sdpa"


STATE_FILE = "recipe_state.json"
# The prune stage warns when its gates end this far below the target sparsity (too few steps).
SPARSITY_SHORTFALL = 0.05


@dataclasses.dataclass
class RecipeConfig:
    """Options of :func:`run_recipe` (CLI flags of ``kdfast compress`` have the same names)."""
    output_dir: str
    student_layers: str | None = "3"
    student_config: object = None          # a transformers config: random init instead of teacher layers
    student_path: str | None = None         # a model directory to start from
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    train: TrainOptions = dataclasses.field(default_factory=TrainOptions)
    prune_epochs: float = 2.0
    target_sparsity: float = 0.7            # of the encoder's prunable heads + FFN, counted as prune_cost says
    # "flops": multiply-adds per token at the training windows' mean length, attention included (CPU
    # latency follows it; "params" keeps attention heads that cost as much again in attention and
    # left the demo student at 1.45x its distilled latency with 64% of the weights removed); "params":
    # prunable weights.
    prune_cost: str = "flops"
    prune_warmup: float = 0.5               # fraction of the prune stage over which the target ramps up
    gate_learning_rate: float = 0.1         # gates and Lagrange multipliers (Adam: ~this much log_alpha per step)
    ternary_epochs: float = 1.0
    ternary_method: str = "twn"
    ternary_act_bits: int | None = 8
    ternary_learning_rate: float | None = None
    # Embedding tables to ternarize (kdfast.compress.quantize(embeddings=)): "all", "word", None or
    # patterns (CLI spelling: parse_ternary_embeddings). "all": on the demo student (pruned source
    # 1.55 MB, F1 6.9) "word" + fp16 gave 6.6x (the 512 x 128 position table, fp16, is half of its
    # file; only 256 positions are used), "all" + fp16 12.6x at F1 5.5 after the same 1-epoch QAT;
    # MiniLM-L3 (vocab 30,522 x 384): 14.4x "word", 15.5x "all".
    ternary_embeddings: str | tuple | None = "all"
    ternary_float_dtype: str | None = "float16"  # storage of the tensors that stay full precision
    # Who teaches the ternary stage: "teacher" (the cached teacher logits, as every other stage) or
    # "source" (TernaryBERT: the full-precision model the stage starts from, run live, teaches its own
    # ternary copy). ternary_layer_losses: LayerKD terms of that stage ({"hidden": 1.0,
    # "attention_score": 1.0} is TernaryBERT's), layer i <- layer i of a "source" teacher (same depth),
    # the distill config's mapping from the teacher otherwise; None: logits only.
    ternary_teacher: str = "teacher"
    ternary_layer_losses: dict | None = None
    max_seq_length: int = 384
    doc_stride: int = 128
    version_2_with_negative: bool = False
    teacher_top_k: int | None = None
    stages: tuple = STAGES


def _mean_length(windows) -> float:
    """Mean number of tokens per training window (the ``length`` column the collator sorts by)."""
    col = "length" if "length" in windows.column_names else "input_ids"
    vals = windows[col] if col == "length" else [len(x) for x in windows[col]]
    return float(sum(vals)) / max(1, len(vals))


def parse_ternary_embeddings(text: str | None):
    """``--ternary_embeddings``: ``"none"`` (or empty) -> None, ``"word"`` / ``"all"`` as they are,
    else comma-separated module-name patterns -> a tuple."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    parts = tuple(p.strip() for p in str(text).split(",") if p.strip())
    return parts[0] if len(parts) == 1 else parts


def read_state(output_dir: str) -> dict:
    path = os.path.join(output_dir, STATE_FILE)
    if not os.path.exists(path):
        return {"done": {}}
    with open(path) as fh:
        return json.load(fh)


def write_state(output_dir: str, state: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, STATE_FILE)
    with open(path + ".tmp", "w") as fh:
        json.dump(state, fh, indent=2)
    os.replace(path + ".tmp", path)


def measure_row(name: str, model, model_dir: str, dev_questions, dev_windows, tokenizer, *, batch_size=64,
                version_2_with_negative=False, speed_questions: int = 64) -> dict:
    """One results-table row: EM / F1 on dev, parameters, size on disk, CPU latency and throughput."""
    from kdfast.distill.measure import cpu_speed
    from kdfast.qa.evaluate import evaluate_qa
    model = inference_ready(model)
    res = evaluate_qa(model, tokenizer, dev_questions, features=dev_windows, batch_size=batch_size,
                      version_2_with_negative=version_2_with_negative, progress=False)
    em = res.metrics.get("exact_match", res.metrics.get("exact"))
    speed = cpu_speed(model, dev_windows, tokenizer, n_questions=speed_questions)
    return {"model": name, "exact_match": em, "f1": res.metrics["f1"], "parameters": count_parameters(model),
            "encoder_weights": encoder_linear_weights(model), "size_mb": weights_size(model_dir) / 2**20,
            "latency_ms": speed["latency_ms"], "questions_per_s": speed["questions_per_s"], "path": model_dir}


def _ternary_teaching(cfg: RecipeConfig, source_dir: str, teacher, teacher_dir: str, cached_windows,
                      plain_windows):
    """(distill config, teacher model, training windows) of the ternary stage (RecipeConfig.ternary_teacher,
    ternary_layer_losses)."""
    distill = cfg.distill
    if cfg.ternary_layer_losses:
        distill = dataclasses.replace(distill, layer_losses=dict(cfg.ternary_layer_losses))
    if cfg.ternary_teacher == "source":
        source = load_qa_model(source_dir, attn_implementation=training_attention(distill)).eval()
        if cfg.ternary_layer_losses:  # the same depth: student layer m <- source layer m (numbered from 1)
            depth = source.config.num_hidden_layers
            # a layer whose heads were all pruned has no attention to match: the attention terms skip it
            from kdfast.compress.prune import encoder_layers
            heads = [getattr(layer.attention.self, "num_attention_heads", 1) for layer in encoder_layers(source)]
            attention = [m if h else None for m, h in zip(range(1, depth + 1), heads)]
            distill = dataclasses.replace(distill, layer_mapping=list(range(1, depth + 1)),
                                          attention_mapping=attention if None in attention else None,
                                          hidden_mapping=None)
        return distill, source, plain_windows  # no cached teacher logits: the source's own, live
    if cfg.ternary_layer_losses and not cfg.distill.layer_losses:  # capture needs the kdfast attention
        teacher = load_qa_model(teacher_dir, attn_implementation="kdfast").eval()
    return distill, teacher, cached_windows


def _steps(n_windows, options: TrainOptions, epochs):
    return max(1, math.ceil(n_windows / options.per_device_train_batch_size) * epochs)


def run_recipe(cfg: RecipeConfig, teacher_dir: str, train_questions, dev_questions, tokenizer, *,
               unlabeled_questions=None, log=print) -> list[dict]:
    """Run (or resume) the recipe; returns the rows of the stages in ``cfg.stages``.

    ``unlabeled_questions``: a transfer set (questions ``Dataset``; answers, if any, are never read).
    Every stage also distils on their windows, with the teacher's soft labels only (see
    :mod:`kdfast.distill.unlabeled`); their ids must differ from the training questions'."""
    import torch
    from kdfast import compress
    from kdfast.nn import SparsityController
    from kdfast.qa.features import eval_features, train_features

    unknown = set(cfg.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown recipe stages {sorted(unknown)}; stages are {', '.join(STAGES)}")
    if cfg.ternary_teacher not in TERNARY_TEACHERS:
        raise ValueError(f"ternary_teacher must be one of {', '.join(TERNARY_TEACHERS)}, got {cfg.ternary_teacher!r}")
    if unlabeled_questions is not None and len(unlabeled_questions):
        check_disjoint(train_questions, unlabeled_questions)
    os.makedirs(cfg.output_dir, exist_ok=True)
    state = read_state(cfg.output_dir)
    teacher = load_qa_model(teacher_dir, attn_implementation=training_attention(cfg.distill)).eval()
    with main_process_first():  # torchrun: windows and the teacher cache are made once, then read
        windows = train_features(train_questions, tokenizer, max_seq_length=cfg.max_seq_length,
                                 doc_stride=cfg.doc_stride)
        if unlabeled_questions is not None and len(unlabeled_questions):
            windows = with_unlabeled(windows, unlabeled_windows(unlabeled_questions, tokenizer,
                                                                max_seq_length=cfg.max_seq_length,
                                                                doc_stride=cfg.doc_stride))
        dev_windows = eval_features(dev_questions, tokenizer, max_seq_length=cfg.max_seq_length,
                                    doc_stride=cfg.doc_stride)
        cache = TeacherCache.build(teacher, windows, tokenizer, os.path.join(cfg.output_dir, "teacher_cache"),
                                   top_k=cfg.teacher_top_k, progress=not cfg.train.disable_tqdm)
    plain_windows, windows = windows, cache.attach(windows)
    common = dict(teacher=teacher, distill=cfg.distill)
    prev = None
    for stage in STAGES:
        extra = {}
        stage_dir = os.path.join(cfg.output_dir, stage)
        model_dir = os.path.join(stage_dir, "model")
        if stage in state["done"]:
            prev = model_dir
            continue
        if stage not in cfg.stages:
            continue
        log(f"[kdfast compress] stage {stage}")
        if stage == "distil":
            impl = training_attention(cfg.distill)
            if cfg.student_path:
                model = load_qa_model(cfg.student_path, attn_implementation=impl).train()
            elif cfg.student_config is not None:
                model = student_from_config(cfg.student_config, attn_implementation=impl, seed=cfg.train.seed)
            else:
                layers = parse_student_layers(cfg.student_layers, teacher.config.num_hidden_layers)
                model = student_from_teacher(teacher, layers, attn_implementation=impl)
            trainer = train_stage(model, windows, tokenizer, stage_dir, cfg.train, **common)
            model = trainer.model
            if is_main_process():
                model.save_pretrained(model_dir)
        elif stage == "prune":
            if prev is None:
                raise ValueError("the prune stage needs the distil stage's model (run it first)")
            model = load_qa_model(prev, attn_implementation=training_attention(cfg.distill, gates=True)).train()
            opts = dataclasses.replace(cfg.train, num_train_epochs=cfg.prune_epochs)
            gates = compress.add_gates(model, heads=True, ffn=True, cost=cfg.prune_cost,
                                       seq_len=_mean_length(windows) if cfg.prune_cost == "flops" else None)
            warm = int(cfg.prune_warmup * _steps(len(windows), opts, cfg.prune_epochs))
            ctl = SparsityController(cfg.target_sparsity, warmup_steps=warm)
            trainer = train_stage(model, windows, tokenizer, stage_dir, opts, pruning=(gates, ctl),
                                  gate_learning_rate=cfg.gate_learning_rate, **common)
            model = trainer.model.eval()
            with torch.no_grad():
                reached = float(gates.expected_sparsity())
            extra = {"target_sparsity": cfg.target_sparsity, "expected_sparsity": reached}
            if reached < cfg.target_sparsity - SPARSITY_SHORTFALL:
                log(f"[kdfast compress] prune: WARNING: the gates reached an expected sparsity of {reached:.2f} "
                    f"({cfg.prune_cost}) against the target {cfg.target_sparsity:g} in "
                    f"{trainer.state.global_step} steps: the pruned model is larger than asked for; give the "
                    "prune stage more steps (--prune_epochs, RecipeConfig.prune_epochs)")
            if hasattr(model, "kdfast_sparsity"):
                del model.kdfast_sparsity
            compress.compact(model)
            if is_main_process():
                compress.save_pruned(model, model_dir)
        else:  # ternary
            if prev is None:
                raise ValueError("the ternary stage needs a previous stage's model")
            t_distill, t_teacher, t_windows = _ternary_teaching(cfg, prev, teacher, teacher_dir, windows,
                                                                plain_windows)
            model = load_qa_model(prev, attn_implementation=training_attention(t_distill)).train()
            compress.quantize(model, method=cfg.ternary_method, act_bits=cfg.ternary_act_bits, qat=True,
                              embeddings=cfg.ternary_embeddings)
            opts = dataclasses.replace(cfg.train, num_train_epochs=cfg.ternary_epochs,
                                       learning_rate=cfg.ternary_learning_rate or cfg.train.learning_rate)
            trainer = train_stage(model, t_windows, tokenizer, stage_dir, opts, teacher=t_teacher,
                                  distill=t_distill)
            model = compress.freeze(trainer.model.eval())
            if is_main_process():
                save_ternary(model, model_dir, float_dtype=cfg.ternary_float_dtype)
        if not is_main_process():  # the main process saves, measures and writes the state
            barrier()
            state = read_state(cfg.output_dir)
            prev = model_dir
            continue
        tokenizer.save_pretrained(model_dir)
        with torch.no_grad():
            row = measure_row(stage, load_qa_model(model_dir), model_dir, dev_questions, dev_windows, tokenizer,
                              batch_size=cfg.train.per_device_eval_batch_size,
                              version_2_with_negative=cfg.version_2_with_negative)
        if trainer is not None and trainer.state.log_history:
            row["train_seconds"] = next((h.get("train_runtime") for h in reversed(trainer.state.log_history)
                                         if "train_runtime" in h), None)
        row.update(extra)
        state["done"][stage] = row
        write_state(cfg.output_dir, state)
        log(f"[kdfast compress] {stage}: EM {row['exact_match']:.2f} F1 {row['f1']:.2f} "
            f"({row['parameters'] / 1e6:.2f}M params, {row['size_mb']:.2f} MB)")
        barrier()
        prev = model_dir
    return [state["done"][s] for s in STAGES if s in state["done"] and s in cfg.stages]
