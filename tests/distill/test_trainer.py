"""DistillationTrainer: the span-KD loss against a plain-torch computation, gradients outside the
span, fine-tune mode, the frozen teacher, column handling, layer losses, resume and pruning."""
from __future__ import annotations

import copy
import glob
import inspect
import math
import os
import shutil

import pytest
import torch

from .conftest import tiny_config, train_options

T, ALPHA = 2.5, 0.3


# --- helpers ----------------------------------------------------------------------------------------
def make_trainer(model, train_ds, tok, out, *, teacher=None, distill=None, collator=None, callbacks=None,
                 pruning=None, **opts):
    """A DistillationTrainer on the tiny test options (``opts`` override TrainOptions fields)."""
    from kdfast.distill.collate import DistillCollator
    from kdfast.distill.trainer import DistillationTrainer
    args = train_options(**opts).training_arguments(str(out))
    return DistillationTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                               data_collator=collator or DistillCollator(tok), teacher=teacher, distill=distill,
                               pruning=pruning, callbacks=callbacks)


def random_student(tok, seed=1, **overrides):
    """A randomly initialised 2-layer student with kdfast attention."""
    from kdfast.distill.student import student_from_config
    cfg = tiny_config(len(tok), tok.pad_token_id, num_hidden_layers=2, **overrides)
    return student_from_config(cfg, attn_implementation="kdfast", seed=seed)


def kd_config(**kw):
    """DistillConfig with the test temperature and alpha."""
    from kdfast.distill.trainer import DistillConfig
    return DistillConfig(**{"temperature": T, "alpha": ALPHA, **kw})


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def hand_span_mask(batch):
    """[B, L] bool built row by row: CLS plus context_start..context_end."""
    B, L = batch["input_ids"].shape
    m = torch.zeros(B, L, dtype=torch.bool)
    for i in range(B):
        m[i, int(batch["cls_index"][i])] = True
        m[i, int(batch["context_start"][i]):int(batch["context_end"][i]) + 1] = True
    return m


def hand_loss(s_start, s_end, t_start, t_end, batch, temperature, alpha):
    """0.5 * sum over heads of alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE, in float64,
    over the span tokens only (explicit per-row loops)."""
    mask = hand_span_mask(batch)
    B = mask.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    heads = ((s_start, t_start, batch["start_positions"]), (s_end, t_end, batch["end_positions"]))
    for s, t, pos in heads:
        kl = ce = torch.zeros((), dtype=torch.float64)
        for i in range(B):
            idx = mask[i].nonzero().squeeze(1)
            si, ti = s[i, idx].double(), None if t is None else t[i, idx].double()
            j = idx.tolist().index(int(pos[i]))
            ce = ce - torch.log_softmax(si, 0)[j]
            if ti is not None:
                lps, lpt = torch.log_softmax(si / temperature, 0), torch.log_softmax(ti / temperature, 0)
                kl = kl + (lpt.exp() * (lpt - lps)).sum()
        if t is None:
            total = total + ce / B
        else:
            total = total + alpha * temperature ** 2 * kl / B + (1 - alpha) * ce / B
    return total / 2


@pytest.fixture(scope="module")
def cached(teacher_dir, tok, windows, tmp_path_factory):
    """The training windows with the teacher-cache columns attached."""
    from kdfast.distill.models import load_qa_model
    from kdfast.distill.teacher_cache import TeacherCache
    cache = TeacherCache.build(load_qa_model(teacher_dir), windows, tok, str(tmp_path_factory.mktemp("tc")),
                               progress=False)
    return cache.attach(windows)


def first_batch(ds, tok, n=8):
    from kdfast.distill.collate import DistillCollator
    return DistillCollator(tok)([ds[i] for i in range(n)])


# --- tests ------------------------------------------------------------------------------------------
def test_compute_loss_signature_and_short_training(tok, cached, teacher, tmp_path):
    from kdfast.distill.trainer import DistillationTrainer
    params = list(inspect.signature(DistillationTrainer.compute_loss).parameters)
    assert params == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]
    tr = make_trainer(random_student(tok), cached.select(range(32)), tok, tmp_path, teacher=teacher,
                      distill=kd_config(), max_steps=3)
    tr.train()
    assert tr.state.global_step == 3
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    spans = [h["span_loss"] for h in tr.state.log_history if "span_loss" in h]
    assert spans == pytest.approx(losses, rel=1e-4)  # no layer / pruning terms: loss is the span loss


@pytest.mark.parametrize("source", ["cache", "live"])
def test_span_kd_loss_matches_plain_torch(source, tok, cached, windows, teacher, tmp_path):
    student = random_student(tok).eval()
    ds = cached if source == "cache" else windows
    batch = first_batch(ds, tok)
    assert ("teacher_start_logits" in batch) == (source == "cache")
    tr = make_trainer(student, ds, tok, tmp_path, teacher=teacher, distill=kd_config())
    loss = tr.compute_loss(student, batch)
    with torch.no_grad():
        s = student(**model_inputs(batch))
        t = teacher(**model_inputs(batch))
    want = hand_loss(s.start_logits, s.end_logits, t.start_logits, t.end_logits, batch, T, ALPHA)
    assert float(loss) == pytest.approx(float(want), abs=1e-5, rel=1e-5)
    # The loss must see the span only: a loss over all attended tokens differs.
    full = dict(batch, cls_index=torch.zeros_like(batch["cls_index"]),
                context_start=torch.zeros_like(batch["context_start"]),
                context_end=batch["attention_mask"].sum(1) - 1)
    wide = hand_loss(s.start_logits, s.end_logits, t.start_logits, t.end_logits, full, T, ALPHA)
    assert abs(float(wide) - float(want)) > 1e-3


def test_no_gradient_outside_the_span(tok, cached, teacher, tmp_path):
    student = random_student(tok).train()
    batch = first_batch(cached, tok)
    tr = make_trainer(student, cached, tok, tmp_path, teacher=teacher, distill=kd_config())
    loss, out = tr.compute_loss(student, batch, return_outputs=True)
    out.start_logits.retain_grad()
    out.end_logits.retain_grad()
    loss.backward()
    mask = hand_span_mask(batch)
    for g in (out.start_logits.grad, out.end_logits.grad):
        assert g is not None
        assert torch.count_nonzero(g[~mask]) == 0
        assert torch.count_nonzero(g[mask]) > 0.9 * mask.sum()
        # softmax gradients of each row sum to zero over the span
        torch.testing.assert_close(g.sum(1), torch.zeros(g.shape[0]), atol=1e-6, rtol=0)


def test_fine_tune_mode_is_masked_cross_entropy(tok, windows, tmp_path):
    student = random_student(tok).eval()
    batch = first_batch(windows, tok)
    tr = make_trainer(student, windows, tok, tmp_path, teacher=None, distill=kd_config())
    loss = tr.compute_loss(student, batch)
    with torch.no_grad():
        s = student(**model_inputs(batch))
    want = hand_loss(s.start_logits, s.end_logits, None, None, batch, T, ALPHA)
    assert float(loss) == pytest.approx(float(want), abs=1e-5, rel=1e-5)


def test_teacher_frozen_and_not_in_checkpoint(tok, windows, teacher, tmp_path):
    from safetensors.torch import load_file
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = random_student(tok)
    tr = make_trainer(student, windows.select(range(24)), tok, tmp_path, teacher=teacher,
                      distill=kd_config(), max_steps=3)  # no cache columns: the teacher runs live
    calls = []
    teacher.register_forward_hook(lambda m, a, o: calls.append(m.training))
    tr.train()
    assert calls and not any(calls), "the teacher must run, in eval mode"
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher weight {k} changed"
    ckpts = glob.glob(str(tmp_path / "checkpoint-*" / "model.safetensors"))
    assert ckpts, "no checkpoint written"
    keys = set(load_file(ckpts[0]).keys())
    student_keys = set(tr.model.state_dict().keys())
    assert keys == student_keys
    layer_ids = {int(k.split("encoder.layer.")[1].split(".")[0]) for k in keys if "encoder.layer." in k}
    assert layer_ids == {0, 1}  # the 2-layer student, not the 4-layer teacher


@pytest.mark.parametrize("top_k", [None, 3])
def test_remove_unused_columns_keeps_cache_columns(top_k, tok, windows, teacher, tmp_path):
    from kdfast.distill.collate import DistillCollator
    from kdfast.distill.teacher_cache import TeacherCache
    sub = windows.select(range(16))
    rows = TeacherCache.build(teacher, sub, tok, str(tmp_path / "c"), top_k=top_k, progress=False).attach(sub)
    seen = []

    class Recording(DistillCollator):
        def __call__(self, features):
            seen.append(set(features[0]))
            return super().__call__(features)

    tr = make_trainer(random_student(tok), rows, tok, tmp_path / "o", teacher=teacher, distill=kd_config(),
                      collator=Recording(tok), max_steps=1)
    assert tr.args.remove_unused_columns
    tr.train()
    assert seen
    want = ["teacher_start", "teacher_end", "cls_index", "context_start", "context_end", "start_positions"]
    if top_k:
        want += ["teacher_start_idx", "teacher_end_idx"]
    for c in want:
        assert c in seen[0], f"{c} was dropped before the collator"
    assert "example_id" not in seen[0]  # unused columns are still removed


def test_layer_losses_train_and_log(tok, cached, teacher, tmp_path):
    from kdfast.distill.student import student_from_teacher
    student = student_from_teacher(teacher, [0, 2], attn_implementation="kdfast")
    tr = make_trainer(student, cached.select(range(24)), tok, tmp_path, teacher=teacher,
                      distill=kd_config(layer_losses={"hidden": 1.0, "attention_kl": 1.0}), max_steps=2)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["layer_hidden"] > 0 and h["layer_attention_kl"] >= 0
        assert math.isfinite(h["layer_hidden"]) and math.isfinite(h["layer_attention_kl"])
        # total = span + layer terms (weights 1)
        assert h["loss"] == pytest.approx(h["span_loss"] + h["layer_hidden"] + h["layer_attention_kl"], rel=1e-3)


def test_layer_losses_need_kdfast_attention(tok, cached, teacher, tmp_path):
    from kdfast.distill.student import student_from_config
    student = student_from_config(tiny_config(len(tok), tok.pad_token_id, num_hidden_layers=2),
                                  attn_implementation="eager", seed=0)
    with pytest.raises(ValueError, match=r"student must use attn_implementation='kdfast'.*'eager'"):
        make_trainer(student, cached, tok, tmp_path, teacher=teacher,
                     distill=kd_config(layer_losses={"hidden": 1.0}))
    with pytest.raises(ValueError, match="need a teacher"):
        make_trainer(random_student(tok), cached, tok, tmp_path, teacher=None,
                     distill=kd_config(layer_losses={"hidden": 1.0}))


def test_layer_kd_gradients_are_reset_every_step(tok, cached, teacher, tmp_path):
    """Each optimizer step must use the gradient of its own batch: the LayerKD projections (not part of
    the model, so Trainer's ``model.zero_grad()`` does not reach them) must start every step at zero."""
    from transformers import TrainerCallback
    student = random_student(tok, hidden_size=16, intermediate_size=32)
    tr = make_trainer(student, cached.select(range(24)), tok, tmp_path, teacher=teacher,
                      distill=kd_config(layer_losses={"hidden": 1.0}), max_steps=3)
    assert sum(p.numel() for p in tr.layer_kd.parameters()) > 0  # 16 -> 32 projections
    leftover = []

    class Check(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            leftover.append(max((float(p.grad.abs().max()) for p in tr.layer_kd.parameters()
                                 if p.grad is not None), default=0.0))

    tr.add_callback(Check())
    tr.train()
    assert len(leftover) == 3
    assert leftover == [0.0, 0.0, 0.0], (f"LayerKD projection gradients carried over from earlier steps "
                                         f"(max |grad| at each step start: {leftover})")


@pytest.mark.slow
def test_resume_gives_the_same_weights_and_restores_layer_kd(tok, teacher_dir, tmp_path, monkeypatch):
    """2 epochs straight vs. resuming the epoch-1 checkpoint of the same run to epoch 2."""
    from kdfast.distill.models import load_qa_model
    from kdfast.distill.stage import train_stage
    from kdfast.qa.features import train_features
    from datasets import Dataset
    from .conftest import MAX_SEQ_LENGTH, DOC_STRIDE
    from kdfast.qa.synthetic import generate_squad
    ds = train_features(Dataset.from_list(generate_squad(8, 0, seed=3)["train"]), tok,
                        max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE).select(range(16))
    kd = dict(temperature=T, alpha=ALPHA, layer_losses={"hidden": 1.0, "attention_kl": 1.0})
    # hidden 16 vs the teacher's 32: LayerKD has learnable projections to restore
    opts = train_options(num_train_epochs=2, save_total_limit=None)
    a = train_stage(random_student(tok, hidden_size=16, intermediate_size=32), ds, tok, str(tmp_path / "a"), opts,
                    teacher=load_qa_model(teacher_dir, attn_implementation="kdfast"), distill=kd_config(**kd))
    steps = a.state.global_step
    assert steps == 4  # 16 windows, batch 8, 2 epochs
    ck = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    assert (ck / "kdfast_layer_kd.pt").exists()
    saved = torch.load(ck / "kdfast_layer_kd.pt", weights_only=True)
    assert saved and any(not torch.equal(saved[k], v) for k, v in a.layer_kd.state_dict().items())
    os.makedirs(tmp_path / "b" / "checkpoints")
    shutil.copytree(ck, tmp_path / "b" / "checkpoints" / "checkpoint-2")

    from transformers import TrainerCallback
    restored = {}

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            restored["step"] = state.global_step

        def on_step_begin(self, args, state, control, **kw):
            if "layer_kd" not in restored:
                restored["layer_kd"] = copy.deepcopy(holder[0].layer_kd.state_dict())

    holder = []
    import kdfast.distill.stage as stage_mod
    orig = stage_mod.DistillationTrainer

    class Keep(orig):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            holder.append(self)

    monkeypatch.setattr(stage_mod, "DistillationTrainer", Keep)
    b = train_stage(random_student(tok, hidden_size=16, intermediate_size=32), ds, tok, str(tmp_path / "b"),
                    opts, teacher=load_qa_model(teacher_dir, attn_implementation="kdfast"), distill=kd_config(**kd), callbacks=[Snapshot()])
    assert restored["step"] == 2 and b.state.global_step == steps
    for k, v in saved.items():
        torch.testing.assert_close(restored["layer_kd"][k], v, atol=0, rtol=0)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-5, rtol=0, msg=f"student weight {k} differs")
    for k, v in a.layer_kd.state_dict().items():
        torch.testing.assert_close(b.layer_kd.state_dict()[k], v, atol=1e-5, rtol=0,
                                   msg=lambda m: f"LayerKD {k} differs after resume (gradients carried across "
                                                 f"steps in the straight run?): {m}")


def test_pruning_adds_the_penalty_and_logs_sparsity(tok, cached, teacher, tmp_path):
    from kdfast import compress
    from kdfast.nn import SparsityController
    student = random_student(tok)
    gates = compress.add_gates(student, heads=True, ffn=True)
    ctl = SparsityController(0.5, warmup_steps=4)
    tr = make_trainer(student, cached.select(range(24)), tok, tmp_path, teacher=teacher,
                      distill=kd_config(), pruning=(gates, ctl), max_steps=3)
    # the penalty on one batch, by hand: lambda_1 * d + lambda_2 * d^2, d = s - target * step / warmup
    student.eval()
    with torch.no_grad():
        ctl.lambda_1.fill_(0.7)
        ctl.lambda_2.fill_(1.3)
        batch = first_batch(cached, tok)
        tr.state.global_step = 2
        with_pen = tr.compute_loss(student, batch)
        s = float(gates.expected_sparsity())
        d = s - 0.5 * 2 / 4
        tr.pruning = None
        without = tr.compute_loss(student, batch)
        tr.pruning = (gates, ctl)
        ctl.lambda_1.zero_()
        ctl.lambda_2.zero_()
        tr.state.global_step = 0
    assert float(with_pen - without) == pytest.approx(0.7 * d + 1.3 * d * d, abs=1e-6)
    tr._parts = {}
    student.train()
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert 0.0 <= h["expected_sparsity"] < 1.0
        assert "target_sparsity" in h
    assert logs[-1]["target_sparsity"] == pytest.approx(0.5 * 2 / 4)


def test_length_grouped_sampler_reads_lengths_once_as_a_list(tok, windows, tmp_path):
    """group_by_length: the sampler gets the ``length`` column as a plain list (datasets' lazy Column made
    every index a table slice), in the dataset's order, including a concatenated (labelled + unlabelled) set;
    its batches group similar lengths as Trainer's do."""
    from datasets import concatenate_datasets
    from kdfast.distill.unlabeled import without_labels
    ds = concatenate_datasets([windows, without_labels(windows.select(range(0, len(windows), 2)))])
    trainer = make_trainer(random_student(tok), ds, tok, tmp_path, group_by_length=True,
                           per_device_train_batch_size=4)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler.lengths, list) and sampler.lengths == list(ds["length"])
    order = list(sampler)
    assert sorted(order) == list(range(len(ds)))
    # the first index is the longest window (LengthGroupedSampler puts the longest megabatch first)
    assert ds["length"][order[0]] == max(ds["length"])
    plain = make_trainer(random_student(tok), ds, tok, tmp_path / "r", group_by_length=False)
    assert not hasattr(plain._get_train_sampler(), "lengths")


def test_student_and_live_teacher_train_unpadded(tok, windows, teacher_dir, tmp_path):
    """A kdfast-attention student (and the live teacher) run on the unpadded encoder; an SDPA student and
    ``unpad=False`` keep the padded forward. One unpadded training step changes the student's weights."""
    from kdfast.distill.collate import DistillCollator
    from kdfast.distill.models import load_qa_model
    from kdfast.distill.student import student_from_config
    from kdfast.distill.trainer import DistillationTrainer
    from kdfast.hf import is_unpadded
    teacher = load_qa_model(teacher_dir, attn_implementation="kdfast")
    student = random_student(tok)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    tr = make_trainer(student, windows, tok, tmp_path / "a", teacher=teacher, distill=kd_config(), max_steps=1)
    assert tr.unpadded and is_unpadded(student) and is_unpadded(teacher)
    tr.train()
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())
    sdpa = student_from_config(tiny_config(len(tok), tok.pad_token_id, num_hidden_layers=2),
                               attn_implementation="sdpa", seed=1)
    assert not make_trainer(sdpa, windows, tok, tmp_path / "b").unpadded
    kept = random_student(tok)
    args = train_options().training_arguments(str(tmp_path / "c"))
    tr = DistillationTrainer(model=kept, args=args, train_dataset=windows, processing_class=tok,
                             data_collator=DistillCollator(tok), unpad=False)
    assert not tr.unpadded and not is_unpadded(kept)


def test_stage_sampling_random_for_unpadded_grouped_for_padded(tok, windows, tmp_path):
    """TrainOptions.group_by_length None (default): random batches for an unpadded student, length-grouped
    ones for a padded (SDPA) student; True / False are kept as given."""
    from kdfast.distill.stage import TrainOptions, sampling_strategy, train_stage
    from kdfast.distill.student import student_from_config
    assert TrainOptions().group_by_length is None
    assert sampling_strategy(None, True) == "random" and sampling_strategy(None, False) == "group_by_length"
    assert sampling_strategy(True, True) == "group_by_length" and sampling_strategy(False, False) == "random"
    opts = train_options(group_by_length=None, max_steps=1)
    tr = train_stage(random_student(tok), windows, tok, str(tmp_path / "u"), opts)
    assert tr.unpadded and tr.args.train_sampling_strategy == "random"
    assert not hasattr(tr._get_train_sampler(), "lengths")
    sdpa = student_from_config(tiny_config(len(tok), tok.pad_token_id, num_hidden_layers=2),
                               attn_implementation="sdpa", seed=1)
    tr = train_stage(sdpa, windows, tok, str(tmp_path / "p"), opts)
    assert not tr.unpadded and tr.args.train_sampling_strategy == "group_by_length"
    assert hasattr(tr._get_train_sampler(), "lengths")
