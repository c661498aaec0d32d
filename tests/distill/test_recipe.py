"""The compression recipe (distil -> prune -> ternary) on tiny sizes: loadable models of each kind, the
results rows, skipping finished stages, and resuming a stage killed after its first epoch checkpoint."""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import TrainerCallback

from .conftest import DOC_STRIDE, MAX_SEQ_LENGTH, train_options

ROW_KEYS = ("exact_match", "f1", "parameters", "encoder_weights", "size_mb", "latency_ms", "questions_per_s", "path")


class Killed(RuntimeError):
    pass


class KillAfterFirstSave(TrainerCallback):
    """Stop the run (as a crash would) right after the first epoch checkpoint is written."""

    def on_save(self, args, state, control, **kw):
        raise Killed(f"killed after saving step {state.global_step}")


class Record(TrainerCallback):
    """Where a run starts (global step after any resume) and how many optimizer steps it does."""

    def __init__(self, log):
        self.log = log

    def on_train_begin(self, args, state, control, **kw):
        self.log["start"] = state.global_step
        self.log["steps"] = 0

    def on_step_end(self, args, state, control, **kw):
        self.log["steps"] += 1
        self.log["end"] = state.global_step


def _config(out):
    from kdfast.distill.recipe import RecipeConfig
    return RecipeConfig(output_dir=out, student_layers="0,2",
                        train=train_options(per_device_train_batch_size=16, num_train_epochs=1, logging_steps=2),
                        prune_epochs=2, ternary_epochs=1, target_sparsity=0.5, prune_warmup=0.5,
                        max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, teacher_dir, tok, qa_data):
    """Run 1 is killed after the prune stage's first epoch checkpoint; run 2 resumes and finishes;
    run 3 has nothing left to do (train_stage raises if called)."""
    import kdfast.distill.recipe as rmod
    out = str(tmp_path_factory.mktemp("recipe"))
    train, dev = qa_data[0].select(range(12)), qa_data[1].select(range(8))
    real = rmod.train_stage
    runs = {1: {}, 2: {}}

    def wrapper(run):
        def train_stage(model, windows, tokenizer, output_dir, options, **kw):
            stage = os.path.basename(output_dir)
            log = runs[run].setdefault(stage, {"windows": len(windows),
                                              "batch": options.per_device_train_batch_size})
            cbs = [Record(log)] + ([KillAfterFirstSave()] if run == 1 and stage == "prune" else [])
            return real(model, windows, tokenizer, output_dir, options, callbacks=cbs, **kw)
        return train_stage

    def never(*a, **k):
        raise AssertionError("train_stage called although every stage is finished")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rmod, "train_stage", wrapper(1))
        with pytest.raises(Killed):
            rmod.run_recipe(_config(out), teacher_dir, train, dev, tok, log=lambda m: None)
        state1 = rmod.read_state(out)
        mp.setattr(rmod, "train_stage", wrapper(2))
        messages = []
        rows2 = rmod.run_recipe(_config(out), teacher_dir, train, dev, tok, log=messages.append)
        mp.setattr(rmod, "train_stage", never)
        rows3 = rmod.run_recipe(_config(out), teacher_dir, train, dev, tok, log=lambda m: None)
    return dict(out=out, runs=runs, state1=state1, rows2=rows2, rows3=rows3, train=train, dev=dev, messages=messages)


@pytest.mark.slow
def test_rows_and_state_file(recipe):
    from kdfast.distill.recipe import STATE_FILE
    rows = recipe["rows2"]
    assert [r["model"] for r in rows] == ["distil", "prune", "ternary"]
    with open(os.path.join(recipe["out"], STATE_FILE)) as fh:
        state = json.load(fh)
    assert list(state["done"]) == ["distil", "prune", "ternary"]
    for r in rows:
        assert state["done"][r["model"]] == json.loads(json.dumps(r))
        for k in ROW_KEYS:
            assert k in r, f"row {r['model']} lacks {k}"
        assert 0.0 <= r["exact_match"] <= 100.0 and 0.0 <= r["f1"] <= 100.0 and r["f1"] >= r["exact_match"]
        assert r["parameters"] > 0 and r["size_mb"] > 0 and r["latency_ms"] > 0 and r["questions_per_s"] > 0
        assert os.path.isdir(r["path"])


@pytest.mark.slow
def test_prune_row_records_sparsity_and_warns_when_short(recipe):
    """The prune row says which sparsity the gates reached against the target, and the stage warns
    exactly when they fell more than SPARSITY_SHORTFALL short (here: a few steps, so they do)."""
    from kdfast.distill.recipe import SPARSITY_SHORTFALL
    row = {r["model"]: r for r in recipe["rows2"]}["prune"]
    assert row["target_sparsity"] == 0.5
    assert 0.0 <= row["expected_sparsity"] <= 1.0
    short = row["expected_sparsity"] < row["target_sparsity"] - SPARSITY_SHORTFALL
    warned = [m for m in recipe["messages"] if "prune: WARNING" in m]
    assert bool(warned) == short, (row["expected_sparsity"], warned)
    if warned:
        assert f"{row['expected_sparsity']:.2f}" in warned[0] and "--prune_epochs" in warned[0]
    assert "expected_sparsity" not in {r["model"]: r for r in recipe["rows2"]}["distil"]


@pytest.mark.slow
def test_each_stage_writes_a_loadable_model_of_its_kind(recipe, tok):
    from kdfast.distill.models import count_parameters, load_qa_model, model_kind
    from kdfast.nn import TernaryEmbedding, TernaryLinear
    from kdfast.qa.collate import QACollator
    from kdfast.qa.features import eval_features
    dev_w = eval_features(recipe["dev"], tok, max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE)
    batch = QACollator(tok)([{k: dev_w[i][k] for k in ("input_ids", "attention_mask", "token_type_ids")}
                             for i in range(4)])
    models = {}
    for stage, kind in (("distil", "dense"), ("prune", "pruned"), ("ternary", "ternary")):
        d = os.path.join(recipe["out"], stage, "model")
        assert model_kind(d) == kind
        m = load_qa_model(d)
        assert not m.training and m.config.num_hidden_layers == 2
        with torch.no_grad():
            out = m(**batch)
        assert torch.isfinite(out.start_logits).all() and out.start_logits.shape == batch["input_ids"].shape
        models[stage] = m
    assert not any(isinstance(x, TernaryLinear) for x in models["distil"].modules())
    assert sum(isinstance(x, TernaryLinear) for x in models["ternary"].modules()) >= 2 * 6  # q k v o ffn1 ffn2
    # default ternary_embeddings="all": word, position and token-type tables
    assert sum(isinstance(x, TernaryEmbedding) for x in models["ternary"].modules()) == 3
    rows = {r["model"]: r for r in recipe["rows2"]}
    assert rows["distil"]["parameters"] == count_parameters(models["distil"])
    assert rows["prune"]["parameters"] <= rows["distil"]["parameters"]
    # ternary layers and embeddings count their logical weights: ternarizing removes no parameter
    assert rows["ternary"]["parameters"] == rows["prune"]["parameters"] == count_parameters(models["ternary"])


@pytest.mark.slow
def test_ternary_model_is_much_smaller(recipe):
    """The ternary directory stores packed 2-bit encoder weights (no float copies): on disk, the part
    that is not the float embeddings / QA head is less than half the float model's, and the packed
    weight payload is 1/8 of float32 or less (2 bits per weight, rows padded to 64 weights)."""
    from safetensors.torch import load_file
    from kdfast.distill.models import TERNARY_FILE, weights_size
    src_dir = os.path.join(recipe["out"], "prune", "model")  # the ternary stage starts from this model
    tern_dir = os.path.join(recipe["out"], "ternary", "model")
    dense_sd = load_file(os.path.join(src_dir, "model.safetensors"))
    tern_sd = torch.load(os.path.join(tern_dir, TERNARY_FILE), weights_only=False)["state_dict"]
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    shared = sum(nbytes(v) for k, v in dense_sd.items() if ".encoder." not in k)
    dense, tern = weights_size(src_dir), weights_size(tern_dir)
    assert tern - shared < 0.5 * (dense - shared), (tern, dense, shared)
    linear = [k[:-len(".weight")] for k, v in dense_sd.items() if ".encoder." in k and k.endswith(".weight")
              and v.dim() == 2]
    assert linear
    for name in linear:
        assert f"{name}.weight" not in tern_sd, f"{name}: a float weight is stored next to the packed one"
        packed = tern_sd[f"{name}.packed_weight"]
        assert packed.dtype == torch.uint8
        assert nbytes(packed) * 8 <= nbytes(dense_sd[f"{name}.weight"]), name
    rows = {r["model"]: r for r in recipe["rows2"]}
    assert rows["ternary"]["size_mb"] < rows["prune"]["size_mb"]
    # defaults: embedding tables packed too, the tensors left in full precision stored as float16
    obj = torch.load(os.path.join(tern_dir, TERNARY_FILE), weights_only=True)
    assert obj["kdfast_float_dtype"] == "float16"
    assert not any(k.endswith("embeddings.weight") for k in tern_sd)
    assert tern_sd["bert.embeddings.LayerNorm.weight"].dtype == torch.float16
    assert tern_sd["qa_outputs.weight"].dtype == torch.float16


@pytest.mark.slow
def test_rerun_skips_finished_stages(recipe):
    assert recipe["rows3"] == recipe["rows2"]  # run 3: train_stage raised if called, so nothing ran
    assert "distil" not in recipe["runs"][2], "run 2 retrained the finished distil stage"


@pytest.mark.slow
def test_killed_stage_resumes_from_its_checkpoint(recipe):
    run1, run2 = recipe["runs"][1], recipe["runs"][2]
    assert list(recipe["state1"]["done"]) == ["distil"]
    p1 = run1["prune"]
    per_epoch = -(-p1["windows"] // p1["batch"])
    assert per_epoch >= 2
    assert p1["start"] == 0 and p1["steps"] == per_epoch  # killed at the epoch-1 checkpoint
    ck = os.path.join(recipe["out"], "prune", "checkpoints", f"checkpoint-{per_epoch}")
    assert os.path.isdir(ck)
    p2 = run2["prune"]
    assert p2["start"] == per_epoch, "the rerun restarted the prune stage instead of resuming it"
    assert p2["steps"] == per_epoch and p2["end"] == 2 * per_epoch
    assert run2["ternary"]["start"] == 0 and run2["ternary"]["end"] == per_epoch


def test_parse_ternary_embeddings():
    from kdfast.distill.recipe import RecipeConfig, parse_ternary_embeddings
    assert parse_ternary_embeddings("none") is None and parse_ternary_embeddings("") is None
    assert parse_ternary_embeddings(None) is None
    assert parse_ternary_embeddings("word") == "word" and parse_ternary_embeddings("all") == "all"
    assert parse_ternary_embeddings("*word*, *position*") == ("*word*", "*position*")
    cfg = RecipeConfig(output_dir="x")
    assert (cfg.ternary_embeddings, cfg.ternary_float_dtype) == ("all", "float16")


def test_unknown_stage_is_rejected(tmp_path, tok, qa_data):
    from kdfast.distill.recipe import RecipeConfig, run_recipe
    with pytest.raises(ValueError, match=r"unknown recipe stages \['quantise'\]"):
        run_recipe(RecipeConfig(output_dir=str(tmp_path), stages=("distil", "quantise")), str(tmp_path / "none"),
                   qa_data[0], qa_data[1], tok)


@pytest.mark.slow
@pytest.mark.parametrize("layer_losses", [None, {"hidden": 1.0, "attention_score": 1.0}])
def test_ternary_stage_taught_by_its_source(recipe, tmp_path, teacher_dir, tok, layer_losses):
    """ternary_teacher="source" (TernaryBERT): the full-precision pruned model the stage starts from teaches
    it live (no cached teacher logits in the batches), with its layers matched one to one when layer terms
    are asked for; the stage writes a ternary model and its row."""
    import shutil
    import kdfast.distill.recipe as rmod
    from kdfast.distill.models import count_parameters, load_qa_model, model_kind
    out = str(tmp_path / "recipe")
    for stage in ("distil", "prune"):
        shutil.copytree(os.path.join(recipe["out"], stage), os.path.join(out, stage))
    shutil.copytree(os.path.join(recipe["out"], "teacher_cache"), os.path.join(out, "teacher_cache"))
    state = rmod.read_state(recipe["out"])
    state["done"] = {k: dict(v, path=v["path"].replace(recipe["out"], out)) for k, v in state["done"].items()
                     if k != "ternary"}
    rmod.write_state(out, state)
    seen = {}
    real = rmod.train_stage

    def train_stage(model, windows, tokenizer, output_dir, options, **kw):
        seen.update(stage=os.path.basename(output_dir), columns=windows.column_names, **kw)
        trainer = real(model, windows, tokenizer, output_dir, options, **kw)
        seen["trainer"] = trainer
        return trainer

    cfg = rmod.RecipeConfig(**{**_config(out).__dict__, "ternary_teacher": "source",
                               "ternary_layer_losses": layer_losses})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rmod, "train_stage", train_stage)
        rows = rmod.run_recipe(cfg, teacher_dir, recipe["train"], recipe["dev"], tok, log=lambda m: None)
    assert seen["stage"] == "ternary"
    source = load_qa_model(os.path.join(out, "prune", "model"))
    assert count_parameters(seen["teacher"]) == count_parameters(source)  # the pruned source, not the teacher
    assert not any(c.startswith("teacher_") for c in seen["columns"])
    trainer = seen["trainer"]
    if layer_losses:
        assert seen["distill"].layer_losses == layer_losses
        depth = source.config.num_hidden_layers
        assert seen["distill"].layer_mapping == list(range(1, depth + 1))  # layers are numbered from 1
        logged = {k for h in trainer.state.log_history for k in h}
        assert {"layer_hidden", "layer_attention_score"} <= logged, logged
    else:
        assert trainer.layer_kd is None and seen["distill"].layer_losses is None
    assert [r["model"] for r in rows] == ["distil", "prune", "ternary"]
    assert model_kind(os.path.join(out, "ternary", "model")) == "ternary"
    assert 0.0 <= rows[-1]["f1"] <= 100.0


def test_unknown_ternary_teacher_is_rejected(tmp_path, tok, qa_data):
    from kdfast.distill.recipe import RecipeConfig, run_recipe
    with pytest.raises(ValueError, match="ternary_teacher must be one of teacher, source, got 'fp32'"):
        run_recipe(RecipeConfig(output_dir=str(tmp_path), ternary_teacher="fp32"), str(tmp_path / "none"),
                   qa_data[0], qa_data[1], tok)
