"""``kdfast demo`` (what ``make demo`` runs): the whole QA compression recipe on built-in data, offline.

1. generate synthetic SQuAD train / dev sets and train a WordPiece tokenizer on them;
2. fine-tune a teacher from scratch (built-in 4-layer config);
3. fine-tune the student without distillation (the baseline: same layers, same init);
4. the recipe: distil the student from the cached teacher logits, prune heads and FFN
   units to a target sparsity while distilling, compact, ternary QAT, pack;
5. print one table: EM, F1, parameters, size on disk, CPU latency per question,
   throughput, speedup over the teacher.

Each step writes its model under ``output_dir`` and a rerun resumes (finished
steps are skipped). Sizes are chosen so the whole demo takes a few minutes on
2 CPU cores.
"""
from __future__ import annotations

import os
import shutil
import time

# Demo sizes (2 CPU cores): windows of at most 256 tokens (synthetic passages are ~80-250 words).
MAX_SEQ_LENGTH = 256
DOC_STRIDE = 96
TEACHER = dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=2, intermediate_size=512,
               attention_probs_dropout_prob=0.0)
STUDENT_LAYERS = "0,2"
# A 2,000-token vocabulary splits train and dev names into the same kind of pieces (at 4,000 train
# names are whole tokens and the unseen dev names are not: dev F1 fell to ~10 for a teacher whose
# train loss kept falling).
VOCAB_SIZE = 2000


def _log(msg):
    print(f"[kdfast demo] {msg}", flush=True)


def run_demo(output_dir: str = "demo-output", *, num_train: int = 2000, num_dev: int = 300, seed: int = 0,
             fresh: bool = False, teacher_epochs: float = 2.0, student_epochs: float = 2.0,
             prune_epochs: float = 1.0, ternary_epochs: float = 1.0, target_sparsity: float = 0.7,
             disable_tqdm: bool = False, batch_size: int = 16, learning_rate: float = 1e-3,
             ternary_embeddings="all", ternary_float_dtype: str | None = "float16",
             teacher_num_train: int | None = None, kd_unlabeled: bool = False,
             distil_epochs: float | None = None) -> list[dict]:
    """Run the demo; returns the table rows (also written to ``output_dir/results.md``).
    ``ternary_embeddings`` / ``ternary_float_dtype``: see :class:`kdfast.distill.recipe.RecipeConfig`.

    ``teacher_num_train``: generate this many training questions and fine-tune the teacher on all of
    them, while both students (no KD and distilled, and the later stages) train on a seeded random
    subset of ``num_train`` of them: a teacher that knows more than the students' labelled data, as a
    pretrained teacher does on real data (a from-scratch teacher trained on the students' data alone is
    no better than the student without KD on this generator).

    ``kd_unlabeled`` (needs ``teacher_num_train > num_train``): the recipe's stages also distil on the
    teacher's other ``teacher_num_train - num_train`` questions with their answers dropped (teacher soft
    labels only, :mod:`kdfast.distill.unlabeled`): unlabelled in-domain questions as a transfer set. The
    student without KD trains on the ``num_train`` labelled questions either way. ``distil_epochs``: epochs
    of the distil stage (default ``student_epochs``; with ``kd_unlabeled`` an epoch covers the unlabelled
    questions too, so fewer epochs give the distillation as many steps as the baseline's labelled epochs)."""
    import torch
    from kdfast.distill.models import load_qa_model
    from kdfast.distill.recipe import (RecipeConfig, measure_row, read_state, run_recipe, training_attention,
                                       write_state)
    from kdfast.distill.report import markdown_table, with_speedup, write_results
    from kdfast.distill.stage import TrainOptions, train_stage
    from kdfast.distill.student import parse_student_layers, student_from_config, student_from_teacher
    from kdfast.distill.trainer import DistillConfig
    from kdfast.qa.configs import teacher_config
    from kdfast.qa.features import eval_features, train_features
    from kdfast.qa.load import load_squad
    from kdfast.qa.synthetic import write_generated
    from transformers import AutoTokenizer

    if teacher_num_train is not None and teacher_num_train < num_train:
        raise ValueError(f"teacher_num_train={teacher_num_train} must be >= num_train={num_train} (the students' "
                         "questions are a subset of the teacher's)")
    if kd_unlabeled and not (teacher_num_train is not None and teacher_num_train > num_train):
        raise ValueError("kd_unlabeled distils on the teacher's questions beyond num_train: it needs "
                         f"teacher_num_train > num_train (got {teacher_num_train} and {num_train})")
    t_start = time.perf_counter()
    if fresh and os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    torch.manual_seed(seed)
    data_dir = os.path.join(output_dir, "data")
    n_generated = teacher_num_train or num_train
    if not os.path.exists(os.path.join(data_dir, "dev.json")):
        _log(f"generating {n_generated} train / {num_dev} dev questions")
        write_generated(data_dir, num_train=n_generated, num_dev=num_dev, seed=seed, vocab_size=VOCAB_SIZE)
    tok = AutoTokenizer.from_pretrained(os.path.join(data_dir, "tokenizer"))
    train = load_squad(os.path.join(data_dir, "train.json"))
    if len(train) != n_generated:
        raise ValueError(f"{data_dir}/train.json has {len(train)} questions, this run asks for {n_generated}: "
                         "use another output_dir (or fresh=True) when changing num_train / teacher_num_train")
    dev = load_squad(os.path.join(data_dir, "dev.json"))
    teacher_windows = unlabeled = None
    if teacher_num_train is not None and teacher_num_train > num_train:
        teacher_windows = train_features(train, tok, max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE)
        shuffled = train.shuffle(seed=seed)
        train = shuffled.select(range(num_train))  # the students' labelled questions
        if kd_unlabeled:  # the rest, answers never read: a transfer set for distillation
            unlabeled = shuffled.select(range(num_train, len(shuffled))).remove_columns("answers")
    windows = train_features(train, tok, max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE)
    dev_windows = eval_features(dev, tok, max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE)
    _log(f"{len(train)} train questions ({len(windows)} windows), {len(dev)} dev questions"
         + (f"; the teacher trains on {n_generated} ({len(teacher_windows)} windows)" if teacher_windows else "")
         + (f"; the recipe also distils on {len(unlabeled)} unlabelled questions" if unlabeled else ""))
    opts = TrainOptions(num_train_epochs=teacher_epochs, per_device_train_batch_size=batch_size,
                        learning_rate=learning_rate, seed=seed, disable_tqdm=disable_tqdm, logging_steps=100,
                        warmup_ratio=0.1)
    state = read_state(output_dir)
    rows = state.setdefault("demo_rows", {})

    teacher_dir = os.path.join(output_dir, "teacher", "model")
    if "teacher" not in rows:
        _log("fine-tuning the teacher")
        cfg = teacher_config(tok, **TEACHER)
        teacher = student_from_config(cfg, attn_implementation=training_attention(), seed=seed)
        trainer = train_stage(teacher, teacher_windows if teacher_windows is not None else windows, tok,
                              os.path.join(output_dir, "teacher"), opts)
        trainer.model.save_pretrained(teacher_dir)
        tok.save_pretrained(teacher_dir)
        rows["teacher"] = measure_row("teacher", load_qa_model(teacher_dir), teacher_dir, dev, dev_windows, tok)
        write_state(output_dir, state)
    _log(f"teacher F1 {rows['teacher']['f1']:.2f}")
    teacher = load_qa_model(teacher_dir)
    layers = parse_student_layers(STUDENT_LAYERS, teacher.config.num_hidden_layers)

    no_kd_dir = os.path.join(output_dir, "student-no-kd", "model")
    if "student without KD" not in rows:
        _log("fine-tuning the student without distillation (baseline)")
        student = student_from_teacher(teacher, layers, attn_implementation=training_attention())
        s_opts = TrainOptions(**{**opts.__dict__, "num_train_epochs": student_epochs})
        trainer = train_stage(student, windows, tok, os.path.join(output_dir, "student-no-kd"), s_opts)
        trainer.model.save_pretrained(no_kd_dir)
        tok.save_pretrained(no_kd_dir)
        rows["student without KD"] = measure_row("student without KD", load_qa_model(no_kd_dir), no_kd_dir, dev,
                                                 dev_windows, tok)
        write_state(output_dir, state)

    if distil_epochs is None:
        distil_epochs = student_epochs
    recipe = RecipeConfig(
        output_dir=output_dir, student_layers=STUDENT_LAYERS,
        distill=DistillConfig(temperature=2.0, alpha=0.5),
        train=TrainOptions(**{**opts.__dict__, "num_train_epochs": distil_epochs}),
        prune_epochs=prune_epochs, target_sparsity=target_sparsity, ternary_epochs=ternary_epochs,
        ternary_learning_rate=learning_rate / 4, max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE,
        ternary_embeddings=ternary_embeddings, ternary_float_dtype=ternary_float_dtype)
    names = {"distil": "distilled student", "prune": "pruned student", "ternary": "ternary student"}
    recipe_rows = run_recipe(recipe, teacher_dir, train, dev, tok, unlabeled_questions=unlabeled, log=_log)
    state = read_state(output_dir)
    table = [state["demo_rows"]["teacher"], state["demo_rows"]["student without KD"]]
    table += [dict(r, model=names[r["model"]]) for r in recipe_rows]
    table = with_speedup(table)
    write_results(output_dir, table, title="kdfast demo: QA distillation recipe on built-in synthetic data",
                  data={"generator": "kdfast.qa.synthetic (all domains)", "train_questions": len(train),
                        "teacher_train_questions": n_generated,
                        "unlabeled_questions (distillation only)": len(unlabeled) if unlabeled else 0,
                        "dev_questions": len(dev), "max_seq_length": MAX_SEQ_LENGTH},
                  recipe={"teacher": TEACHER, "student_layers": STUDENT_LAYERS, "temperature": 2.0, "alpha": 0.5,
                          "student_epochs": student_epochs,
                          "distil_epochs": distil_epochs,
                          "target_sparsity": target_sparsity,
                          "prune_cost": recipe.prune_cost,
                          "ternary": f"twn, W2A8, ternary embeddings: {ternary_embeddings}, "
                                     f"other tensors stored as {ternary_float_dtype or 'float32'}"})
    print()
    print(markdown_table(table))
    print(f"\nwhole demo: {time.perf_counter() - t_start:.0f} s; outputs in {output_dir}/ "
          "(results.md, metrics.json, README.md, one model directory per row)")
    return table
