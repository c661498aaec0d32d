"""The ``kdfast`` command line: help of every command, dash spellings, clear errors, ``eval``, and
``generate-data`` -> ``fine-tune`` -> ``distill`` end to end on tiny sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DOC_STRIDE, MAX_SEQ_LENGTH

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--max_seq_length", str(MAX_SEQ_LENGTH), "--doc_stride", str(DOC_STRIDE)]
TRAIN_FLAGS = ["--disable_tqdm", "true", "--use_cpu", "true", "--logging_steps", "1",
               "--per_device_eval_batch_size", "32"]

HELP_FLAGS = {
    "eval": ["--model_name_or_path", "--validation_file", "--output_dir", "--version_2_with_negative",
             "--n_best_size"],
    "generate-data": ["--output_dir", "--num_train", "--num_dev", "--vocab_size", "--domains"],
    "fine-tune": ["--train_file", "--validation_file", "--model_name_or_path", "--max_seq_length", "--doc_stride",
                  "--per_device_train_batch_size", "--per-device-train-batch-size", "--num_train_epochs",
                  "--max_steps", "--output_dir"],
    "distill": ["--teacher_name_or_path", "--student_layers", "--temperature", "--alpha", "--layer_losses",
                "--teacher_top_k", "--train_file", "--output_dir"],
    "compress": ["--teacher_name_or_path", "--target_sparsity", "--stages", "--ternary_method", "--prune_epochs",
                 "--ternary_embeddings", "--ternary-embeddings", "--ternary_float_dtype", "--ternary-float-dtype"],
    "demo": ["--output_dir", "--num_train", "--num_dev", "--fresh", "--ternary_embeddings", "--ternary_float_dtype"],
}


def run_main(argv):
    from kdfast.cli.main import main
    return main(argv)


def cli_error(argv) -> str:
    """The message of the SystemExit that ``kdfast argv`` raises (fails if it returns)."""
    with pytest.raises(SystemExit) as e:
        run_main(argv)
    assert e.value.code not in (0, None), f"expected an error, got exit code {e.value.code!r}"
    return str(e.value.code)


def test_python_m_kdfast_help():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "kdfast", "--help"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for cmd in list(HELP_FLAGS) + ["active"]:
        assert cmd in p.stdout


def test_main_without_command(capsys):
    assert run_main([]) == 2
    assert run_main(["--help"]) == 0
    assert "fine-tune" in capsys.readouterr().out
    assert cli_error(["no-such-command"]) == "2"  # argparse's usage error


@pytest.mark.parametrize("cmd", sorted(HELP_FLAGS))
def test_command_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        run_main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"kdfast {cmd}" in out
    for flag in HELP_FLAGS[cmd]:
        assert flag in out, f"kdfast {cmd} --help does not mention {flag}"


def test_active_help(capsys):
    with pytest.raises(SystemExit) as e:
        run_main(["active", "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


# --- clear errors -------------------------------------------------------------------------------------
def test_missing_train_file(squad_files, tmp_path):
    msg = cli_error(["fine-tune", "--train_file", str(tmp_path / "nope.json"), "--validation_file", squad_files[1],
                     "--output_dir", str(tmp_path / "o")])
    assert "--train_file" in msg and "nope.json" in msg and "no such file" in msg


def test_missing_validation_file_flag(squad_files, tmp_path):
    msg = cli_error(["fine-tune", "--train_file", squad_files[0], "--output_dir", str(tmp_path / "o")])
    assert "--validation_file" in msg


def test_missing_teacher(squad_files, tmp_path):
    base = ["distill", "--train_file", squad_files[0], "--validation_file", squad_files[1],
            "--output_dir", str(tmp_path / "o")]
    assert "--teacher_name_or_path is required" in cli_error(base)
    msg = cli_error(base + ["--teacher_name_or_path", str(tmp_path / "no_teacher")])
    assert "no_teacher" in msg and "does not exist" in msg


def test_student_deeper_than_teacher(squad_files, teacher_dir, tmp_path):
    msg = cli_error(["distill", "--teacher_name_or_path", teacher_dir, "--student_layers", "9",
                     "--train_file", squad_files[0], "--validation_file", squad_files[1],
                     "--output_dir", str(tmp_path / "o")])
    assert "--student_layers 9" in msg and "deeper than the teacher (4 layers)" in msg


def test_unknown_layer_loss_term(squad_files, teacher_dir, tmp_path):
    msg = cli_error(["distill", "--teacher_name_or_path", teacher_dir, "--layer_losses", "hidden:1,bogus:2",
                     "--train_file", squad_files[0], "--validation_file", squad_files[1],
                     "--output_dir", str(tmp_path / "o")])
    assert "--layer_losses" in msg and "'bogus'" in msg and "attention_kl" in msg


@pytest.mark.parametrize("cmd,flag,value,needle", [
    ("distill", "--layer_mapping", "diagonal", "--layer_mapping 'diagonal'"),
    ("distill", "--logit_loss", "hinge", "logit_loss"),
    ("distill", "--layer_weight_schedule", "two_stage:2", "two_stage:F"),
    ("distill", "--term_weighting", "ema:1.5", "term_weighting"),
    ("compress", "--ternary_layer_losses", "hidden:1,bogus", "--ternary_layer_losses: unknown term 'bogus'"),
    ("compress", "--ternary_teacher", "fp32", "ternary_teacher must be one of teacher, source, got 'fp32'")])
def test_bad_distillation_option(squad_files, teacher_dir, tmp_path, cmd, flag, value, needle):
    msg = cli_error([cmd, "--teacher_name_or_path", teacher_dir, flag, value,
                     "--train_file", squad_files[0], "--validation_file", squad_files[1],
                     "--output_dir", str(tmp_path / "o")])
    assert needle in msg


def test_distillation_flags_reach_the_config():
    from kdfast.cli.args import DistillArguments
    from kdfast.cli.main import _distill_config
    kd = DistillArguments(layer_losses="hidden:2,attention_kl", layer_mapping="mean", attention_mapping="2,4",
                          logit_loss="jsd", layer_weight_schedule="two_stage:0.25", term_weighting="ema:0.8",
                          temperature=3.0, alpha=0.7)
    cfg = _distill_config(kd)
    assert (cfg.layer_losses, cfg.layer_mapping, cfg.attention_mapping, cfg.hidden_mapping) == (
        {"hidden": 2.0, "attention_kl": 1.0}, "mean", [2, 4], None)
    assert (cfg.logit_loss, cfg.two_stage_fraction(), cfg.ema_decay(), cfg.temperature, cfg.alpha) == (
        "jsd", 0.25, 0.8, 3.0, 0.7)


@pytest.mark.parametrize("cuda", [False, True])
def test_training_attention_and_default_batches(monkeypatch, tmp_path, cuda):
    """CPU: every stage trains on the kdfast attention (unpadded) and the CLI's batches are random; CUDA
    (the Triton varlen kernels not yet run on a GPU): SDPA with length-grouped batches, except where
    the step needs the kdfast attention (layer losses, gates). An explicit flag wins."""
    import torch
    from kdfast.cli.main import _train_common
    from kdfast.distill.recipe import training_attention
    from kdfast.distill.trainer import DistillConfig
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert training_attention() == training_attention(DistillConfig()) == ("sdpa" if cuda else "kdfast")
    assert training_attention(DistillConfig(layer_losses={"hidden": 1.0})) == "kdfast"
    assert training_attention(DistillConfig(), gates=True) == "kdfast"
    base = ["--train_file", "t.json", "--output_dir", str(tmp_path)]
    *_, targs = _train_common(base + ["--use_cpu", "true"], "kdfast fine-tune")
    assert targs.train_sampling_strategy == ("group_by_length" if cuda else "random")
    *_, targs = _train_common(base + ["--use_cpu", "true", "--train_sampling_strategy", "group_by_length"],
                              "kdfast fine-tune")
    assert targs.train_sampling_strategy == "group_by_length"


@pytest.mark.parametrize("argv,embeddings,float_dtype", [
    ([], "all", "float16"),
    (["--ternary-embeddings", "word", "--ternary-float-dtype", "float32"], "word", "float32"),
    (["--ternary_embeddings", "none"], None, "float16"),
    (["--ternary_embeddings", "*word*,*position*"], ("*word*", "*position*"), "float16")])
def test_demo_ternary_storage_flags(monkeypatch, argv, embeddings, float_dtype):
    import kdfast.distill.demo as demo
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: seen.update(kw))
    assert run_main(["demo", *argv]) == 0
    assert (seen["ternary_embeddings"], seen["ternary_float_dtype"]) == (embeddings, float_dtype)


def test_demo_teacher_num_train_below_num_train(tmp_path):
    msg = cli_error(["demo", "--output_dir", str(tmp_path / "d"), "--num_train", "100", "--teacher-num-train", "50"])
    assert "--teacher_num_train 50 must be >= --num_train 100" in msg
    assert not (tmp_path / "d").exists()


def test_demo_kd_unlabeled_needs_more_teacher_questions(tmp_path, monkeypatch):
    msg = cli_error(["demo", "--output_dir", str(tmp_path / "d"), "--num_train", "100", "--kd-unlabeled"])
    assert "--kd_unlabeled" in msg and "--teacher_num_train larger than --num_train" in msg
    assert not (tmp_path / "d").exists()
    import kdfast.distill.demo as demo
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: seen.update(kw))
    assert run_main(["demo", "--num_train", "100", "--teacher_num_train", "300", "--kd_unlabeled",
                     "--distil-epochs", "0.5"]) == 0
    assert seen["kd_unlabeled"] is True and seen["teacher_num_train"] == 300 and seen["distil_epochs"] == 0.5


def test_bad_ternary_float_dtype(squad_files, teacher_dir, tmp_path):
    msg = cli_error(["demo", "--ternary-float-dtype", "float64"])
    assert "--ternary_float_dtype must be one of" in msg and "'float64'" in msg
    msg = cli_error(["compress", "--teacher_name_or_path", teacher_dir, "--ternary_float_dtype", "int8",
                     "--train_file", squad_files[0], "--validation_file", squad_files[1],
                     "--output_dir", str(tmp_path / "o")])
    assert "--ternary_float_dtype must be one of" in msg


def test_bad_prune_cost(squad_files, teacher_dir, tmp_path):
    msg = cli_error(["compress", "--teacher_name_or_path", teacher_dir, "--prune-cost", "latency",
                     "--train_file", squad_files[0], "--validation_file", squad_files[1],
                     "--output_dir", str(tmp_path / "o")])
    assert "--prune_cost must be flops or params" in msg and "'latency'" in msg
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_ternary_teaching_flags_reach_the_recipe(monkeypatch, squad_files, teacher_dir, tmp_path):
    import kdfast.distill.recipe as recipe
    seen = {}

    def stop(cfg, *a, **kw):
        seen["cfg"] = cfg
        raise ValueError("stopped by the test")

    monkeypatch.setattr(recipe, "run_recipe", stop)
    msg = cli_error(["compress", "--teacher_name_or_path", teacher_dir, "--ternary-teacher", "source",
                     "--ternary-layer-losses", "hidden:1,attention_score:2",
                     "--train_file", squad_files[0], "--validation_file", squad_files[1],
                     "--output_dir", str(tmp_path / "o")])
    assert "stopped by the test" in msg
    assert seen["cfg"].ternary_teacher == "source"
    assert seen["cfg"].ternary_layer_losses == {"hidden": 1.0, "attention_score": 2.0}


def test_bad_squad_file_names_the_record(squad_files, tmp_path):
    data = json.loads(Path(squad_files[0]).read_text())
    qas = data["data"][0]["paragraphs"][0]["qas"]
    assert len(qas) >= 2
    del qas[1]["question"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    msg = cli_error(["fine-tune", "--train_file", str(bad), "--validation_file", squad_files[1],
                     "--output_dir", str(tmp_path / "o")])
    assert "bad.json" in msg and "question 1" in msg and "missing field 'question'" in msg
    assert repr(qas[1]["id"]) in msg


# --- eval ---------------------------------------------------------------------------------------------
def test_eval_writes_predictions_and_metrics(teacher_dir, squad_files, qa_data, tmp_path, capsys):
    from kdfast.qa.metrics import squad_v1_metrics
    out = tmp_path / "eval"
    assert run_main(["eval", "--model_name_or_path", teacher_dir, "--validation_file", squad_files[1],
                     "--output_dir", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    for name in ("predictions.json", "nbest_predictions.json", "metrics.json"):
        assert (out / name).is_file(), name
    preds = json.loads((out / "predictions.json").read_text())
    nbest = json.loads((out / "nbest_predictions.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    dev = qa_data[1]
    assert set(preds) == set(dev["id"]) == set(nbest)
    assert all(isinstance(v, str) for v in preds.values())
    want = squad_v1_metrics(preds, dev)
    assert metrics["eval_exact_match"] == pytest.approx(want["exact_match"])
    assert metrics["eval_f1"] == pytest.approx(want["f1"])
    assert f"exact_match {want['exact_match']:.2f}" in printed and f"f1 {want['f1']:.2f}" in printed


def test_eval_missing_model(squad_files, tmp_path):
    msg = cli_error(["eval", "--model_name_or_path", str(tmp_path / "nomodel"), "--validation_file",
                     squad_files[1]])
    assert "nomodel" in msg


# --- generate-data -> fine-tune -> distill --------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    pytest.importorskip("kdfast.qa.tokenizer", reason="kdfast.qa.tokenizer (builtin tokenizer) not written yet")
    from kdfast.qa import synthetic
    if not hasattr(synthetic, "write_generated"):
        pytest.skip("kdfast.qa.synthetic.write_generated does not exist yet")
    d = tmp_path_factory.mktemp("gen") / "data"
    assert run_main(["generate-data", "--output_dir", str(d), "--num_train", "30", "--num_dev", "8",
                     "--vocab_size", "600", "--seed", "1"]) == 0
    return d


def test_generate_data_writes_train_dev_and_tokenizer(generated):
    from kdfast.distill.models import load_tokenizer
    from kdfast.qa.load import load_squad
    assert len(load_squad(str(generated / "train.json"))) == 30
    assert len(load_squad(str(generated / "dev.json"))) == 8
    tok = load_tokenizer(str(generated / "tokenizer"))
    assert tok.is_fast and len(tok) <= 600 and tok.pad_token_id is not None


def test_generate_data_domains(tmp_path):
    # A domain outside the default mix (sport, near biography) on request; an unknown one is
    # refused naming the flag and listing what exists, before anything is written.
    from kdfast.qa.load import load_squad
    d = tmp_path / "sport"
    assert run_main(["generate-data", "--output_dir", str(d), "--num_train", "12", "--num_dev", "4",
                     "--domains", "sport,biography", "--vocab_size", "300"]) == 0
    assert {r["id"][:3] for r in load_squad(str(d / "train.json"))} == {"spo", "bio"}
    msg = cli_error(["generate-data", "--output_dir", str(tmp_path / "bad"), "--domains", "cooking"])
    assert "--domains" in msg and "cooking" in msg and "sport" in msg
    assert not (tmp_path / "bad").exists()

def _trainer_state(out):
    states = sorted(Path(out).glob("checkpoints/checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[1]))
    assert states, f"no checkpoint under {out}"
    return json.loads(states[-1].read_text())


def _check_outputs(out, n_layers):
    from kdfast.distill.models import load_qa_model, model_kind
    assert model_kind(str(out)) == "dense"
    model = load_qa_model(str(out))
    assert model.config.num_hidden_layers == n_layers
    for name in ("metrics.json", "results.md", "README.md"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert len(rows) == 1 and {"exact_match", "f1", "parameters", "size_mb", "latency_ms"} <= set(rows[0])
    assert "| model | EM | F1 |" in (out / "results.md").read_text()
    return model


@pytest.mark.slow
def test_fine_tune_then_distill(generated, tmp_path, capsys):
    data = ["--train_file", str(generated / "train.json"), "--validation_file", str(generated / "dev.json"), *SMALL]
    ft = tmp_path / "ft"
    # dash spellings for two flags; the tokenizer is found next to the data (<data>/tokenizer)
    assert run_main(["fine-tune", *data, "--output-dir", str(ft), "--model_preset", "student", "--max-steps", "3",
                     "--per-device-train-batch-size", "4", *TRAIN_FLAGS]) == 0
    st = _trainer_state(ft)
    assert st["global_step"] == 3 and st["train_batch_size"] == 4
    teacher = _check_outputs(ft, 2)
    assert "| fine-tuned |" in capsys.readouterr().out

    ds = tmp_path / "ds"
    assert run_main(["distill", *data, "--teacher_name_or_path", str(ft), "--student_layers", "1",
                     "--output_dir", str(ds), "--max_steps", "3", "--per_device_train_batch_size", "4",
                     "--temperature", "3", "--alpha", "0.8", *TRAIN_FLAGS]) == 0
    assert _trainer_state(ds)["global_step"] == 3
    student = _check_outputs(ds, 1)
    assert student.config.hidden_size == teacher.config.hidden_size
    caches = [p for p in (ds / "teacher_cache").iterdir() if p.name.startswith("teacher-")]
    assert len(caches) == 1
    recipe = json.loads((ds / "metrics.json").read_text())["recipe"]
    assert recipe["temperature"] == 3 and recipe["alpha"] == 0.8 and recipe["teacher_cache"] is True


def _unlabeled_file(path, questions, *, prefix="u-", answers=True):
    """JSON lines of ``questions`` under new ids, ``"answers": []`` (or no answers field)."""
    with open(path, "w") as fh:
        for q in questions:
            rec = {"id": prefix + q["id"], "question": q["question"], "context": q["context"]}
            if answers:
                rec["answers"] = []
            fh.write(json.dumps(rec) + "\n")
    return str(path)


@pytest.mark.slow
def test_distill_on_unlabeled_questions(generated, tmp_path):
    from datasets import load_from_disk
    from kdfast.qa.load import load_squad
    from kdfast.qa.features import train_features
    from transformers import AutoTokenizer
    data = ["--train_file", str(generated / "train.json"), "--validation_file", str(generated / "dev.json"), *SMALL]
    teacher = tmp_path / "t"
    assert run_main(["fine-tune", *data, "--output_dir", str(teacher), "--model_preset", "student", "--max_steps",
                     "2", "--per_device_train_batch_size", "4", *TRAIN_FLAGS]) == 0
    train = load_squad(str(generated / "train.json"))
    unl = _unlabeled_file(tmp_path / "unl.jsonl", train.select(range(12)))
    out = tmp_path / "ds"
    assert run_main(["distill", *data, "--teacher_name_or_path", str(teacher), "--student_layers", "1",
                     "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
                     "--unlabeled-file", unl, *TRAIN_FLAGS]) == 0
    recipe = json.loads((out / "metrics.json").read_text())["recipe"]
    assert recipe["unlabeled_questions"] == 12
    tok = AutoTokenizer.from_pretrained(str(teacher))
    n_train = len(train_features(train, tok, max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE))
    (cache,) = [p for p in (out / "teacher_cache").iterdir() if p.name.startswith("teacher-")]
    ids = load_from_disk(str(cache))["example_id"]
    assert len(ids) > n_train and sum(i.startswith("u-") for i in ids) == len(ids) - n_train

    # named errors, before any training
    msg = cli_error(["distill", *data, "--teacher_name_or_path", str(teacher), "--output_dir", str(tmp_path / "e1"),
                     "--unlabeled_file", str(tmp_path / "nope.json")])
    assert "--unlabeled_file" in msg and "nope.json" in msg
    clash = _unlabeled_file(tmp_path / "clash.jsonl", train.select(range(3)), prefix="")
    msg = cli_error(["compress", *data, "--teacher_name_or_path", str(teacher), "--output_dir", str(tmp_path / "e2"),
                     "--unlabeled_file", clash])
    assert "--unlabeled_file: 3 unlabeled questions have the ids of labelled training questions" in msg
    bare = _unlabeled_file(tmp_path / "bare.jsonl", train.select(range(2)), answers=False)
    msg = cli_error(["distill", *data, "--teacher_name_or_path", str(teacher), "--output_dir", str(tmp_path / "e3"),
                     "--unlabeled_file", bare])
    assert "--unlabeled_file:" in msg and "missing field 'answers'" in msg
    assert not any((tmp_path / e).exists() for e in ("e1", "e2", "e3"))
