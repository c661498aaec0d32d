"""``kdfast <command>``: thin argument parsing over kdfast.qa and kdfast.distill.

Commands: eval, generate-data, fine-tune, distill, compress, demo. Flags follow
HF ``run_qa.py`` (``HfArgumentParser`` + ``TrainingArguments`` for the training
commands, so every Trainer flag works); dash spellings are accepted too.
Run ``kdfast <command> --help`` for the flags of one command.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from kdfast.cli.args import (DataArguments, DemoArguments, DistillArguments, EvalArguments, GenerateArguments,
                             ModelArguments, RecipeArguments)

COMMANDS = {
    "eval": "evaluate a QA model directory on SQuAD-format questions (EM / F1, predictions, n-best)",
    "generate-data": "write the built-in synthetic SQuAD train / dev sets and their tokenizer",
    "fine-tune": "train a QA model on hard labels (the teacher, or the no-KD student baseline)",
    "distill": "distil a student from a fine-tuned teacher (cached teacher logits, fused losses)",
    "compress": "the recipe: distil -> prune -> compact -> ternary QAT, one row per stage",
    "demo": "the whole recipe on built-in data, offline: ends with the results table",
    "active": "active learning: choose which questions to label (see kdfast active --help)",
    "active-plot": "overlay the F1-vs-labels curves of several kdfast active runs in one PNG",
    "augment": "learning to augment for data-scarce QA distillation (see kdfast augment --help)",
    "study": "distillation design study: layer mappings x losses x weights x seeds (see kdfast study --help)",
}


class CLIError(SystemExit):
    def __init__(self, msg):
        super().__init__(f"kdfast: error: {msg}")


def _parser(dataclass_types, prog, description, defaults=None):
    from transformers import HfArgumentParser
    p = HfArgumentParser(dataclass_types, prog=prog, description=description)
    if defaults:
        p.set_defaults(**defaults)
    return p


# Trainer defaults that differ for kdfast: save per epoch (resume), no trackers. Batches
# (train_sampling_strategy, set in _train_common) are random where models train on the unpadded encoder
# (padded tokens cost nothing; length-grouped batches gather the windows of one passage and cost F1:
# kdfast.distill.stage.sampling_strategy), length-grouped where they train padded (SDPA on CUDA).
TRAIN_DEFAULTS = dict(save_strategy="epoch", save_total_limit=2, report_to="none", logging_steps=50,
                      warmup_steps=0.1, weight_decay=0.01, per_device_train_batch_size=16,
                      per_device_eval_batch_size=64, learning_rate=5e-5, num_train_epochs=2.0)


def _need_file(flag, path):
    if path is None:
        raise CLIError(f"{flag} is required")
    if not os.path.exists(path):
        raise CLIError(f"{flag} {path}: no such file")
    return path



def _mapping(flag, spec):
    """--layer_mapping / --attention_mapping / --hidden_mapping: a mapping name or 1-based teacher layers."""
    from kdfast.nn.layer_mapping import MAPPINGS
    if spec is None or spec in MAPPINGS:
        return spec
    try:
        return [int(x) for x in str(spec).split(",")]
    except ValueError:
        raise CLIError(f"{flag} {spec!r}: expected one of {', '.join(MAPPINGS)} or 1-based teacher layers "
                       "like '2,4,6'") from None


def _distill_config(kd: DistillArguments):
    """DistillConfig from the distillation flags (ValueError names the bad flag)."""
    from kdfast.distill.trainer import DistillConfig, parse_layer_losses
    return DistillConfig(kd.temperature, kd.alpha, parse_layer_losses(kd.layer_losses),
                         _mapping("--layer_mapping", kd.layer_mapping),
                         attention_mapping=_mapping("--attention_mapping", kd.attention_mapping),
                         hidden_mapping=_mapping("--hidden_mapping", kd.hidden_mapping),
                         logit_loss=kd.logit_loss, layer_weight_schedule=kd.layer_weight_schedule,
                         term_weighting=kd.term_weighting)


def _questions(data: DataArguments, which: str):
    from kdfast.qa.load import SquadFormatError, load_squad
    path = data.train_file if which == "train" else data.validation_file
    limit = data.max_train_samples if which == "train" else data.max_eval_samples
    try:
        if path is not None:
            _need_file(f"--{which}_file" if which == "train" else "--validation_file", path)
            ds = load_squad(path, fix_spans=data.fix_spans, version_2=data.version_2_with_negative or None)
        elif data.dataset_name:
            ds = load_squad(data.dataset_name, split="train" if which == "train" else "validation")
        else:
            raise CLIError(f"give --{'train' if which == 'train' else 'validation'}_file (or --dataset_name)")
    except SquadFormatError as e:
        raise CLIError(str(e)) from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def _unlabeled(kd: DistillArguments, train=None):
    """--unlabeled_file -> questions Dataset (answers dropped), or None."""
    if not kd.unlabeled_file:
        return None
    from kdfast.qa.load import SquadFormatError, load_squad
    _need_file("--unlabeled_file", kd.unlabeled_file)
    try:
        ds = load_squad(kd.unlabeled_file, version_2=True)  # empty answers allowed; never read
    except SquadFormatError as e:
        raise CLIError(f"--unlabeled_file: {e}") from None
    if train is not None:
        from kdfast.distill.unlabeled import check_disjoint
        try:
            check_disjoint(train, ds)
        except ValueError as e:
            raise CLIError(f"--unlabeled_file: {e}") from None
    return ds.remove_columns([c for c in ("answers", "is_impossible") if c in ds.column_names])


def _tokenizer(model_args: ModelArguments | None, data: DataArguments | None, *extra_dirs):
    from kdfast.distill.models import load_tokenizer
    candidates = [getattr(model_args, "tokenizer_name", None), getattr(model_args, "model_name_or_path", None),
                  *extra_dirs]
    if data is not None and data.train_file:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(data.train_file)), "tokenizer"))
    for c in candidates:
        if c and os.path.isdir(c):
            try:
                return load_tokenizer(c)
            except FileNotFoundError:
                continue
    raise CLIError("no tokenizer found: pass --tokenizer_name DIR (kdfast generate-data saves one next to the data)")


def _fits(model, tok, what="model"):
    from kdfast.distill.models import check_tokenizer_fits
    try:
        check_tokenizer_fits(model, tok, what)
    except ValueError as e:
        raise CLIError(str(e)) from None


# --- commands ------------------------------------------------------------------------------------
def cmd_eval(argv):
    (a,) = _parser((EvalArguments,), "kdfast eval", COMMANDS["eval"]).parse_args_into_dataclasses(argv)
    from kdfast.distill.models import inference_ready, load_qa_model
    from kdfast.qa.evaluate import evaluate_qa
    from kdfast.qa.load import SquadFormatError, load_squad
    _need_file("--validation_file", a.validation_file)
    try:
        model = load_qa_model(a.model_name_or_path, attn_implementation=a.attn_implementation)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    tok = _tokenizer(ModelArguments(model_name_or_path=a.model_name_or_path, tokenizer_name=a.tokenizer_name), None)
    _fits(model, tok)
    try:
        dev = load_squad(a.validation_file, fix_spans=a.fix_spans, version_2=a.version_2_with_negative or None)
    except SquadFormatError as e:
        raise CLIError(str(e)) from None
    if a.max_eval_samples is not None:
        dev = dev.select(range(min(a.max_eval_samples, len(dev))))
    if a.attn_implementation == "kdfast":
        inference_ready(model)
    res = evaluate_qa(model, tok, dev, max_seq_length=a.max_seq_length, doc_stride=a.doc_stride,
                      batch_size=a.per_device_eval_batch_size, version_2_with_negative=a.version_2_with_negative,
                      n_best_size=a.n_best_size, max_answer_length=a.max_answer_length,
                      null_score_diff_threshold=a.null_score_diff_threshold, output_dir=a.output_dir)
    m = res.metrics
    keys = ["exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_f1", "best_f1_thresh"] \
        if a.version_2_with_negative else ["exact_match", "f1"]
    print(" ".join(f"{k} {m[k]:.2f}" for k in keys if k in m) +
          f"  ({len(dev)} questions, {m['questions_per_second']:.1f} questions/s)")
    if a.output_dir:
        print(f"wrote {a.output_dir}/predictions.json, nbest_predictions.json, metrics.json")
    return 0


def cmd_generate(argv):
    (a,) = _parser((GenerateArguments,), "kdfast generate-data", COMMANDS["generate-data"]) \
        .parse_args_into_dataclasses(argv)
    from kdfast.qa.synthetic import DOMAINS, RELATED_DOMAINS, write_generated
    domains = tuple(d.strip() for d in a.domains.split(",")) if a.domains else DOMAINS
    known = DOMAINS + tuple(RELATED_DOMAINS)
    bad = [d for d in domains if d not in known]
    if bad:
        raise CLIError(f"--domains: unknown {bad}; available: {', '.join(known)}")
    paths = write_generated(a.output_dir, num_train=a.num_train, num_dev=a.num_dev, domains=domains,
                            version_2=a.version_2_with_negative, seed=a.seed, vocab_size=a.vocab_size)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def _train_common(argv, prog, extra=()):
    types = (ModelArguments, DataArguments, *extra)
    from transformers import TrainingArguments
    from kdfast.distill.recipe import training_attention
    from kdfast.distill.stage import sampling_strategy
    unpadded = training_attention() == "kdfast"
    defaults = dict(TRAIN_DEFAULTS, train_sampling_strategy=sampling_strategy(None, unpadded))
    p = _parser(types + (TrainingArguments,), prog, COMMANDS[prog.split()[-1]], defaults)
    return p.parse_args_into_dataclasses(argv)


def _finish(output_dir, model, tok, dev, data: DataArguments, trainer, name, recipe, train_n, rows=None):
    from kdfast.distill.recipe import measure_row
    from kdfast.distill.report import markdown_table, write_results, with_speedup
    from kdfast.distill.distributed import is_main_process
    from kdfast.qa.features import eval_features
    if not is_main_process():  # torchrun: the main process saves, measures and writes the results
        return 0
    model.save_pretrained(output_dir)
    tok.save_pretrained(output_dir)
    dev_windows = eval_features(dev, tok, max_seq_length=data.max_seq_length, doc_stride=data.doc_stride)
    row = measure_row(name, model, output_dir, dev, dev_windows, tok,
                      version_2_with_negative=data.version_2_with_negative)
    if trainer is not None:
        row["train_seconds"] = next((h["train_runtime"] for h in reversed(trainer.state.log_history)
                                     if "train_runtime" in h), None)
    rows = with_speedup((rows or []) + [row])
    write_results(output_dir, rows, title=f"kdfast {name}",
                  data={"train": data.train_file or data.dataset_name, "train_questions": train_n,
                        "validation": data.validation_file, "dev_questions": len(dev)}, recipe=recipe)
    print(markdown_table(rows))
    return 0


def cmd_fine_tune(argv):
    model_args, data, targs = _train_common(argv, "kdfast fine-tune")
    from kdfast.distill.models import load_qa_model
    from kdfast.distill.recipe import training_attention
    from kdfast.distill.stage import train_stage
    from kdfast.qa.features import train_features
    train, dev = _questions(data, "train"), _questions(data, "validation")
    tok = _tokenizer(model_args, data)
    if model_args.model_name_or_path:
        model = load_qa_model(model_args.model_name_or_path, attn_implementation=training_attention()).train()
        _fits(model, tok)
    else:
        from kdfast.qa import configs
        from kdfast.distill.student import student_from_config
        if model_args.model_preset not in ("teacher", "student"):
            raise CLIError(f"--model_preset must be teacher or student, got {model_args.model_preset!r}")
        cfg = getattr(configs, f"{model_args.model_preset}_config")(tok)
        model = student_from_config(cfg, attn_implementation=training_attention(), seed=targs.seed)
    with targs.main_process_first(desc="windowing"):
        windows = train_features(train, tok, max_seq_length=data.max_seq_length, doc_stride=data.doc_stride,
                                 num_proc=data.preprocessing_num_workers)
    trainer = train_stage(model, windows, tok, targs.output_dir, targs, resume=True)
    return _finish(targs.output_dir, trainer.model, tok, dev, data, trainer, "fine-tuned",
                   {"mode": "fine-tune (hard labels)", "epochs": targs.num_train_epochs}, len(train))


def _student(model_args, kd: DistillArguments, teacher, tok, seed, impl):
    from kdfast.distill.models import load_qa_model, load_tokenizer
    from kdfast.distill.student import (check_compatible, parse_student_layers, student_from_config,
                                        student_from_teacher)
    if model_args.model_name_or_path:
        s_tok = load_tokenizer(model_args.model_name_or_path, fallback=model_args.tokenizer_name)
        check_compatible(tok, s_tok, teacher.config, None)
        student = load_qa_model(model_args.model_name_or_path, attn_implementation=impl).train()
        check_compatible(None, None, teacher.config, student.config)
        return student
    if kd.student_config:
        if kd.student_config == "student":
            from kdfast.qa.configs import student_config
            cfg = student_config(tok)
        else:
            from transformers import AutoConfig
            cfg = AutoConfig.from_pretrained(kd.student_config)
        check_compatible(None, None, teacher.config, cfg)
        return student_from_config(cfg, attn_implementation=impl, seed=seed)
    n = teacher.config.num_hidden_layers
    layers = parse_student_layers(kd.student_layers or str(max(1, n // 2)), n)
    return student_from_teacher(teacher, layers, attn_implementation=impl)


def cmd_distill(argv):
    model_args, data, kd, targs = _train_common(argv, "kdfast distill", (DistillArguments,))
    from kdfast.distill.models import load_qa_model
    from kdfast.distill.recipe import training_attention
    from kdfast.distill.stage import train_stage
    from kdfast.distill.teacher_cache import TeacherCache
    from kdfast.distill.unlabeled import unlabeled_windows, with_unlabeled
    from kdfast.qa.features import train_features
    if not kd.teacher_name_or_path:
        raise CLIError("--teacher_name_or_path is required (fine-tune a teacher with kdfast fine-tune)")
    try:
        cfg = _distill_config(kd)
        teacher = load_qa_model(kd.teacher_name_or_path, attn_implementation=training_attention(cfg)).eval()
        tok = _tokenizer(model_args, data, kd.teacher_name_or_path)
        _fits(teacher, tok, "teacher")
        student = _student(model_args, kd, teacher, tok, targs.seed, training_attention(cfg))
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    train, dev = _questions(data, "train"), _questions(data, "validation")
    unlabeled = _unlabeled(kd, train)
    with targs.main_process_first(desc="windowing and teacher cache"):
        windows = train_features(train, tok, max_seq_length=data.max_seq_length, doc_stride=data.doc_stride,
                                 num_proc=data.preprocessing_num_workers)
        if unlabeled is not None:
            windows = with_unlabeled(windows, unlabeled_windows(
                unlabeled, tok, max_seq_length=data.max_seq_length, doc_stride=data.doc_stride,
                num_proc=data.preprocessing_num_workers))
        if not kd.no_teacher_cache:
            cache = TeacherCache.build(teacher, windows, tok, os.path.join(targs.output_dir, "teacher_cache"),
                                       top_k=kd.teacher_top_k, progress=not targs.disable_tqdm)
            windows = cache.attach(windows)
    trainer = train_stage(student, windows, tok, targs.output_dir, targs, teacher=teacher, distill=cfg)
    recipe = {"mode": "distill", "teacher": kd.teacher_name_or_path, "temperature": kd.temperature,
              "alpha": kd.alpha, "layer_losses": kd.layer_losses, "teacher_cache": not kd.no_teacher_cache,
              "epochs": targs.num_train_epochs,
              "unlabeled_questions": len(unlabeled) if unlabeled is not None else 0}
    return _finish(targs.output_dir, trainer.model, tok, dev, data, trainer, "distilled", recipe, len(train))


def cmd_compress(argv):
    model_args, data, kd, rec, targs = _train_common(argv, "kdfast compress", (DistillArguments, RecipeArguments))
    from kdfast.distill.models import load_qa_model
    from kdfast.distill.recipe import RecipeConfig, measure_row, run_recipe
    from kdfast.distill.report import markdown_table, with_speedup, write_results
    from kdfast.qa.features import eval_features
    if not kd.teacher_name_or_path:
        raise CLIError("--teacher_name_or_path is required")
    try:
        teacher = load_qa_model(kd.teacher_name_or_path)
        tok = _tokenizer(model_args, data, kd.teacher_name_or_path)
        _fits(teacher, tok, "teacher")
        dcfg = _distill_config(kd)
        from kdfast.distill.trainer import parse_layer_losses
        ternary_layer_losses = parse_layer_losses(rec.ternary_layer_losses, "--ternary_layer_losses")
        if kd.student_layers:
            from kdfast.distill.student import parse_student_layers
            parse_student_layers(kd.student_layers, teacher.config.num_hidden_layers)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    if rec.prune_cost not in ("flops", "params"):
        raise CLIError(f"--prune_cost must be flops or params, not {rec.prune_cost!r}")
    train, dev = _questions(data, "train"), _questions(data, "validation")
    unlabeled = _unlabeled(kd, train)
    embeddings, float_dtype = _ternary_storage(rec)
    cfg = RecipeConfig(output_dir=targs.output_dir, student_layers=kd.student_layers or
                       str(max(1, teacher.config.num_hidden_layers // 2)), student_path=model_args.model_name_or_path,
                       distill=dcfg, train=targs, prune_epochs=rec.prune_epochs, target_sparsity=rec.target_sparsity,
                       prune_cost=rec.prune_cost,
                       ternary_epochs=rec.ternary_epochs, ternary_method=rec.ternary_method,
                       ternary_act_bits=rec.ternary_act_bits or None, ternary_embeddings=embeddings,
                       ternary_float_dtype=float_dtype, ternary_teacher=rec.ternary_teacher,
                       ternary_layer_losses=ternary_layer_losses,
                       max_seq_length=data.max_seq_length,
                       doc_stride=data.doc_stride, version_2_with_negative=data.version_2_with_negative,
                       teacher_top_k=kd.teacher_top_k, stages=tuple(s.strip() for s in rec.stages.split(",")))
    try:
        rows = run_recipe(cfg, kd.teacher_name_or_path, train, dev, tok, unlabeled_questions=unlabeled)
    except ValueError as e:
        raise CLIError(str(e)) from None
    dev_windows = eval_features(dev, tok, max_seq_length=data.max_seq_length, doc_stride=data.doc_stride)
    t_row = measure_row("teacher", teacher, kd.teacher_name_or_path, dev, dev_windows, tok,
                        version_2_with_negative=data.version_2_with_negative)
    rows = with_speedup([t_row] + rows)
    write_results(targs.output_dir, rows, title="kdfast compression recipe",
                  data={"train": data.train_file, "validation": data.validation_file, "train_questions": len(train),
                        "unlabeled_questions (distillation only)": len(unlabeled) if unlabeled is not None else 0,
                        "dev_questions": len(dev)},
                  recipe={**{k: v for k, v in dataclasses.asdict(rec).items()}, "temperature": kd.temperature,
                          "alpha": kd.alpha, "layer_losses": kd.layer_losses})
    print(markdown_table(rows))
    return 0


def _ternary_storage(args):
    """--ternary_embeddings / --ternary_float_dtype -> quantize(embeddings=) and save_quantized(float_dtype=)."""
    from kdfast.compress.quantize import FLOAT_DTYPES
    from kdfast.distill.recipe import parse_ternary_embeddings
    if args.ternary_float_dtype not in FLOAT_DTYPES:
        raise CLIError(f"--ternary_float_dtype must be one of {', '.join(sorted(FLOAT_DTYPES))}, "
                       f"got {args.ternary_float_dtype!r}")
    return parse_ternary_embeddings(args.ternary_embeddings), args.ternary_float_dtype


def cmd_demo(argv):
    (a,) = _parser((DemoArguments,), "kdfast demo", COMMANDS["demo"]).parse_args_into_dataclasses(argv)
    from kdfast.distill.demo import run_demo
    embeddings, float_dtype = _ternary_storage(a)
    if a.teacher_num_train is not None and a.teacher_num_train < a.num_train:
        raise CLIError(f"--teacher_num_train {a.teacher_num_train} must be >= --num_train {a.num_train} (the "
                       "students' questions are a subset of the teacher's)")
    if a.kd_unlabeled and not (a.teacher_num_train is not None and a.teacher_num_train > a.num_train):
        raise CLIError("--kd_unlabeled distils on the teacher's questions beyond --num_train: give "
                       "--teacher_num_train larger than --num_train")
    run_demo(a.output_dir, num_train=a.num_train, num_dev=a.num_dev, seed=a.seed, fresh=a.fresh,
             teacher_epochs=a.teacher_epochs, student_epochs=a.student_epochs, prune_epochs=a.prune_epochs,
             ternary_epochs=a.ternary_epochs, target_sparsity=a.target_sparsity, ternary_embeddings=embeddings,
             ternary_float_dtype=float_dtype, teacher_num_train=a.teacher_num_train, kd_unlabeled=a.kd_unlabeled,
             distil_epochs=a.distil_epochs)
    return 0


def cmd_active(argv):
    try:
        from kdfast.active.cli import main as active_main
    except ImportError as e:  # pragma: no cover
        raise CLIError(f"active learning is not available: {e}") from None
    return active_main(argv)


def cmd_active_plot(argv):
    from kdfast.active.cli import main_plot
    return main_plot(argv)


def cmd_augment(argv):
    try:
        from kdfast.augment.cli import main as augment_main
    except ImportError as e:  # pragma: no cover
        raise CLIError(f"augmentation is not available: {e}") from None
    return augment_main(argv)


def cmd_study(argv):
    try:
        from kdfast.study.cli import main as study_main
    except ImportError as e:  # pragma: no cover
        raise CLIError(f"the study is not available: {e}") from None
    return study_main(argv)


HANDLERS = {"eval": cmd_eval, "generate-data": cmd_generate, "fine-tune": cmd_fine_tune, "distill": cmd_distill,
            "compress": cmd_compress, "demo": cmd_demo, "active": cmd_active, "active-plot": cmd_active_plot,
            "study": cmd_study, "augment": cmd_augment}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="kdfast", description="kdfast: distil, prune and ternarize extractive-QA "
                                  "models (HF run_qa.py flags; kdfast <command> --help for one command's flags)",
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="commands:\n" + "\n".join(f"  {k:14s} {v}" for k, v in COMMANDS.items()))
    top.add_argument("command", choices=sorted(HANDLERS), metavar="command", help="one of: " + ", ".join(HANDLERS))
    top.add_argument("args", nargs=argparse.REMAINDER, help="the command's flags (kdfast <command> --help)")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    ns = top.parse_args(argv[:1])
    rc = HANDLERS[ns.command](argv[1:]) or 0
    from kdfast.distill.distributed import finish
    finish()  # torchrun / accelerate launch: end the process group before the interpreter exits
    return rc


if __name__ == "__main__":
    sys.exit(main())
