"""``kdfast distill`` under ``torch.distributed.run`` (2 CPU processes, gloo) against one process with
the same global batch: same losses, one teacher cache for both ranks, reproducible weights.

Why the runs can agree: the student and teacher have dropout 0, the sampler is ``random`` with the
same seed (Accelerate shards each global batch of 8 into two per-rank batches of 4), the last partial
batch is dropped and every window has its answer inside the span, so the per-batch mean of the loss
is the same over 8 windows as the mean of two means over 4, and DDP's gradient average equals the
1-process gradient. What differs is float32 summation order (all-reduce, per-rank padding
lengths): about 1e-7 relative per step, so the logged losses must agree to 1e-5 relative.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import DOC_STRIDE, MAX_SEQ_LENGTH

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS = 4
# Failures of the launcher that come from the machine (no loopback networking, sandboxed sockets),
# not from kdfast: the test skips with the error text instead of failing.
ENV_ERRORS = ("Address family not supported", "Cannot assign requested address", "Connection refused",
              "Permission denied", "Network is unreachable", "gloo] Unable", "failed to bind")


def _flags(teacher, files, out, batch, distributed):
    """``kdfast distill`` flags of the comparison (``--ddp_backend`` only under torchrun: Accelerate asks
    for a process group when it is set)."""
    return ["distill", "--teacher_name_or_path", teacher, "--train_file", files[0], "--validation_file", files[1],
            "--max_seq_length", str(MAX_SEQ_LENGTH), "--doc_stride", str(DOC_STRIDE), "--student_layers", "2",
            "--output_dir", out, "--max_steps", str(STEPS), "--per_device_train_batch_size", str(batch),
            "--train_sampling_strategy", "random", "--dataloader_drop_last", "true", "--use_cpu", "true",
            "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "7", "--learning_rate", "1e-3",
            "--per_device_eval_batch_size", "32"] + (["--ddp_backend", "gloo"] if distributed else [])


def _torchrun(record, argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(record), *argv]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        text = p.stdout[-3000:] + p.stderr[-6000:]
        hit = next((e for e in ENV_ERRORS if e in text), None)
        if hit:
            pytest.skip(f"torchrun with gloo on CPU cannot run here ({hit}): {text[-800:]}")
        pytest.fail(f"torchrun failed (rc {p.returncode}):\n{text}")
    return p


def _records(d):
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in Path(d).glob("rank*.json")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir, squad_files):
    """One in-process run (batch 8) and two 2-process runs (batch 4 per rank) of the same job."""
    from . import ddp_worker
    root = tmp_path_factory.mktemp("ddp")
    teacher = root / "teacher"
    shutil.copytree(teacher_dir, teacher)
    cfg = json.loads((teacher / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # the student inherits it
    (teacher / "config.json").write_text(json.dumps(cfg))
    out = {}
    for name in ("single", "ddp_a", "ddp_b"):
        (root / f"rec_{name}").mkdir()
    single = _flags(str(teacher), squad_files, str(root / "single"), 8, False)
    assert ddp_worker.main([str(root / "rec_single"), *single]) == 0
    for name in ("ddp_a", "ddp_b"):
        _torchrun(root / f"rec_{name}", _flags(str(teacher), squad_files, str(root / name), 4, True))
    for name in ("single", "ddp_a", "ddp_b"):
        out[name] = {"dir": root / name, "records": _records(root / f"rec_{name}")}
    out["files"] = squad_files
    return out


def _state(run):
    return json.loads((run["dir"] / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())


def _weights(run):
    from safetensors.torch import load_file
    return load_file(str(run["dir"] / "model.safetensors"))


def test_losses_match_one_process_with_the_same_global_batch(runs):
    single, ddp = _state(runs["single"]), _state(runs["ddp_a"])
    assert single["train_batch_size"] == 8 and ddp["train_batch_size"] == 4
    assert single["global_step"] == ddp["global_step"] == STEPS
    a = [h["loss"] for h in single["log_history"] if "loss" in h]
    b = [h["loss"] for h in ddp["log_history"] if "loss" in h]
    assert len(a) == len(b) == STEPS
    assert b == pytest.approx(a, rel=1e-5)
    ws, wd = _weights(runs["single"]), _weights(runs["ddp_a"])
    assert set(ws) == set(wd)
    # Parameters the span softmax is invariant to (a constant added to every position's logit) have a
    # zero gradient in exact arithmetic, so Adam turns float noise into steps of up to lr: skip them.
    # Everything else must agree to float32 noise.
    last = max(int(k.split("encoder.layer.")[1].split(".")[0]) for k in ws if "encoder.layer." in k)
    invariant = {"qa_outputs.bias", f"bert.encoder.layer.{last}.output.LayerNorm.bias"}
    invariant |= {k for k in ws if k.endswith("attention.self.key.bias")}
    for k in ws:
        if k not in invariant:
            torch.testing.assert_close(wd[k], ws[k], atol=2e-6, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_teacher_cache_written_once_and_read_by_both_ranks(runs):
    recs = runs["ddp_a"]["records"]
    assert sorted(recs) == [0, 1] and all(r["world_size"] == 2 for r in recs.values())
    n = runs["single"]["records"][0]["teacher_windows"]
    assert n > 0
    assert sorted(r["teacher_windows"] for r in recs.values()) == [0, n], "the teacher ran on both ranks"
    paths = {p for r in recs.values() for p in r["cache_paths"]}
    assert len(paths) == 1 and all(len(r["cache_paths"]) == 1 for r in recs.values())
    cache_root = runs["ddp_a"]["dir"] / "teacher_cache"
    entries = sorted(p.name for p in cache_root.iterdir())
    assert len(entries) == 1 and entries[0].startswith("teacher-") and str(cache_root / entries[0]) in paths


def test_two_distributed_reruns_save_identical_weights(runs):
    wa, wb = _weights(runs["ddp_a"]), _weights(runs["ddp_b"])
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between two identical 2-process runs"


def test_only_rank_zero_writes_the_results(runs):
    """Both ranks reach the end of ``kdfast distill``; only the main process may write the output
    files (rank 1 writing them too races with rank 0 on the same paths, and the measured latency in
    metrics.json then depends on which process finished last)."""
    recs = runs["ddp_a"]["records"]
    assert recs[0]["write_results"] == 1
    assert recs[1]["write_results"] == 0, "rank 1 also wrote metrics.json / results.md / README.md"
    assert json.loads((runs["ddp_a"]["dir"] / "metrics.json").read_text())["rows"]


def test_logged_loss_parts_are_global_means(runs):
    """Without layer or pruning terms the loss is the span loss; Trainer logs the loss averaged over
    the ranks, so ``span_loss`` (logged next to it) must be the same global mean, not rank 0's."""
    for name in ("single", "ddp_a"):
        logs = [h for h in _state(runs[name])["log_history"] if "loss" in h]
        assert [h["span_loss"] for h in logs] == pytest.approx([h["loss"] for h in logs], rel=1e-5), name


@pytest.fixture(scope="module")
def layer_kd_run(runs, tok):
    """A 2-process run with a hidden-state loss through a learnable 16 -> 32 projection."""
    from .conftest import tiny_config
    root = runs["ddp_a"]["dir"].parent
    cfg_dir = root / "student16"
    tiny_config(len(tok), tok.pad_token_id, num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(str(cfg_dir))
    rec = root / "rec_lkd"
    rec.mkdir()
    flags = _flags(str(root / "teacher"), runs["files"], str(root / "lkd"), 4, True)
    i = flags.index("--student_layers")
    flags[i:i + 2] = ["--student_config", str(cfg_dir), "--layer_losses", "hidden:1"]
    _torchrun(rec, [*flags[:flags.index("--max_steps") + 1], "2", *flags[flags.index("--max_steps") + 2:]])
    return rec


def test_layer_kd_projections_stay_in_sync_across_ranks(layer_kd_run):
    """DDP all-reduces the gradients of the wrapped student only: LayerKD's projections live outside
    it, so unless the trainer syncs them, each rank trains its own projection on its own half batch."""
    states = [torch.load(layer_kd_run / f"layer_kd_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0], "no LayerKD projection parameters (student and teacher widths must differ)"
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), f"LayerKD {k} differs between rank 0 and rank 1"
