"""TeacherCache: stored values, reuse from disk, keys, attach checks, top-k, and DistillCollator's scatter
(right and left padding)."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch


def padded(windows, pad_id, L=128):
    """All windows as [N, L] tensors (plain torch, independent of QACollator)."""
    n = len(windows)
    ids = torch.full((n, L), pad_id, dtype=torch.long)
    att = torch.zeros(n, L, dtype=torch.long)
    tt = torch.zeros(n, L, dtype=torch.long)
    for i, w in enumerate(windows):
        k = len(w["input_ids"])
        ids[i, :k] = torch.tensor(w["input_ids"])
        att[i, :k] = 1
        tt[i, :k] = torch.tensor(w["token_type_ids"])
    return dict(input_ids=ids, attention_mask=att, token_type_ids=tt)


def span_positions(w):
    return [w["cls_index"]] + list(range(w["context_start"], w["context_end"] + 1))


@pytest.fixture(scope="module")
def sub(windows):
    """24 windows of the session set (a few seconds of teacher forward at most)."""
    return windows.select(range(24))


@pytest.fixture(scope="module")
def direct_logits(teacher_dir, sub, tok):
    """The teacher's start/end logits over the padded windows, by a plain forward."""
    from kdfast.distill.models import load_qa_model
    t = load_qa_model(teacher_dir)
    with torch.no_grad():
        out = t(**padded(sub, tok.pad_token_id))
    return out.start_logits.numpy(), out.end_logits.numpy()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def built(teacher_dir, sub, tok, cache_dir):
    from kdfast.distill.models import load_qa_model
    from kdfast.distill.teacher_cache import TeacherCache
    return TeacherCache.build(load_qa_model(teacher_dir), sub, tok, cache_dir, batch_size=7, progress=False)


def test_values_are_the_teacher_logits_at_cls_and_context(built, sub, direct_logits):
    s, e = direct_logits
    ds = built.dataset
    assert len(ds) == len(sub)
    assert ds["example_id"] == sub["example_id"] and ds["window"] == sub["window"]
    assert built.meta["windows"] == len(sub) and built.meta["top_k"] is None
    for i, w in enumerate(sub):
        pos = span_positions(w)
        row = ds[i]
        assert len(row["teacher_start"]) == len(pos) == len(row["teacher_end"])
        np.testing.assert_allclose(row["teacher_start"], s[i, pos], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(row["teacher_end"], e[i, pos], atol=1e-4, rtol=1e-4)


def test_kdfast_teacher_builds_unpadded_with_the_same_values(teacher_dir, sub, tok, tmp_path, direct_logits):
    """A kdfast-attention teacher is switched to the unpadded encoder for the build; its cached logits
    equal the padded SDPA forward's."""
    from kdfast.distill.models import load_qa_model
    from kdfast.distill.teacher_cache import TeacherCache
    from kdfast.hf import is_unpadded
    t = load_qa_model(teacher_dir, attn_implementation="kdfast")
    assert not is_unpadded(t)
    cache = TeacherCache.build(t, sub, tok, str(tmp_path), batch_size=7, progress=False)
    assert is_unpadded(t)
    s, e = direct_logits
    for i, w in enumerate(sub):
        pos = span_positions(w)
        np.testing.assert_allclose(cache.dataset[i]["teacher_start"], s[i, pos], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(cache.dataset[i]["teacher_end"], e[i, pos], atol=1e-4, rtol=1e-4)


def test_second_build_reads_the_disk(built, teacher, sub, tok, cache_dir, monkeypatch):
    from kdfast.distill.teacher_cache import TeacherCache

    def boom(*a, **k):
        raise AssertionError("the teacher ran although the cache exists")

    monkeypatch.setattr(teacher, "forward", boom)
    again = TeacherCache.build(teacher, sub, tok, cache_dir, progress=False)
    assert again.path == built.path
    assert again.dataset["teacher_start"] == built.dataset["teacher_start"]
    assert TeacherCache.load(built.path).dataset["teacher_end"] == built.dataset["teacher_end"]
    with pytest.raises(FileNotFoundError, match="not a kdfast teacher cache"):
        TeacherCache.load(cache_dir)


def test_other_teacher_or_windows_get_another_cache(built, teacher, sub, tok, cache_dir):
    from kdfast.distill.teacher_cache import TeacherCache
    with torch.no_grad():
        teacher.qa_outputs.weight[0, 0] += 1e-3
    other = TeacherCache.build(teacher, sub, tok, cache_dir, progress=False)
    assert other.path != built.path
    assert os.path.isdir(built.path) and os.path.isdir(other.path)
    fewer = TeacherCache.build(teacher, sub.select(range(5)), tok, cache_dir, progress=False)
    assert fewer.path not in (built.path, other.path) and len(fewer.dataset) == 5
    assert not [d for d in os.listdir(cache_dir) if d.endswith(".tmp")]


def test_same_windows_with_another_datasets_fingerprint_find_the_cache(built, teacher, sub, tok, cache_dir,
                                                                        monkeypatch):
    """The key follows the windows' content: the same windows under another ``datasets`` fingerprint (as
    when a run directory is copied, or the tokenizer is read from another path) reuse the cache."""
    from kdfast.distill.teacher_cache import TeacherCache, windows_fingerprint
    same = sub.map(lambda w: w, new_fingerprint="another-fingerprint-same-windows")
    assert same._fingerprint != sub._fingerprint
    assert windows_fingerprint(same) == windows_fingerprint(sub)

    def boom(*a, **k):
        raise AssertionError("the teacher ran although the same windows are cached")

    monkeypatch.setattr(teacher, "forward", boom)
    assert TeacherCache.build(teacher, same, tok, cache_dir, progress=False).path == built.path


def test_windows_fingerprint_sees_tokens_spans_ids_and_order(sub):
    from kdfast.distill.teacher_cache import windows_fingerprint
    base = windows_fingerprint(sub)

    def edit(i, **change):
        return sub.map(lambda w, k: {**w, **change} if k == i else w, with_indices=True,
                       new_fingerprint=f"edit-{i}-{sorted(change)}")

    w = sub[3]
    tokens = list(w["input_ids"])
    tokens[-2] = tokens[-2] + 1
    variants = {
        "a token": edit(3, input_ids=tokens),
        "a context end": edit(3, context_end=w["context_end"] - 1),
        "an example id": edit(3, example_id=w["example_id"] + "x"),
        "a window index": edit(3, window=w["window"] + 1),
        "the order": sub.select([1, 0] + list(range(2, len(sub)))),
        "one window fewer": sub.select(range(len(sub) - 1)),
    }
    for what, v in variants.items():
        assert windows_fingerprint(v) != base, what
    assert windows_fingerprint(sub.select(range(len(sub)))) == base


def test_attach_checks_the_windows(built, sub):
    out = built.attach(sub)
    assert {"teacher_start", "teacher_end"} <= set(out.column_names)
    assert out["input_ids"] == sub["input_ids"]
    with pytest.raises(ValueError, match=r"has 24 windows, the data has 23"):
        built.attach(sub.select(range(23)))
    with pytest.raises(ValueError, match=r"\(example_id, window\) keys differ"):
        built.attach(sub.select(list(reversed(range(len(sub))))))


def test_build_rejects_bad_input(teacher, sub, tok, cache_dir):
    from kdfast.distill.teacher_cache import TeacherCache
    with pytest.raises(ValueError, match="top_k"):
        TeacherCache.build(teacher, sub, tok, cache_dir, top_k=0)
    with pytest.raises(ValueError, match="context_start"):
        TeacherCache.build(teacher, sub.remove_columns(["context_start"]), tok, cache_dir)


def test_top_k_stores_k_values_and_scatters_them(teacher, sub, tok, tmp_path, direct_logits):
    from kdfast.distill.collate import DistillCollator
    from kdfast.distill.teacher_cache import TeacherCache
    k = 5
    cache = TeacherCache.build(teacher, sub, tok, str(tmp_path), top_k=k, progress=False)
    assert cache.meta["top_k"] == k
    rows = cache.attach(sub)
    for col in ("teacher_start", "teacher_end", "teacher_start_idx", "teacher_end_idx"):
        assert all(len(r) == k for r in rows[col]), col
    batch = DistillCollator(tok)([rows[i] for i in range(8)])
    s, e = direct_logits
    for i in range(8):
        pos = np.array(span_positions(sub[i]))
        for got, full in ((batch["teacher_start_logits"][i], s[i]), (batch["teacher_end_logits"][i], e[i])):
            finite = torch.isfinite(got).nonzero().squeeze(1).numpy()
            want = pos[np.argsort(-full[pos], kind="stable")[:k]]  # the k largest over CLS + context
            assert sorted(finite.tolist()) == sorted(want.tolist())
            np.testing.assert_allclose(got[finite].numpy(), full[finite], atol=1e-4, rtol=1e-4)
            assert torch.isneginf(got[torch.isfinite(got).logical_not()]).all()


def test_top_k_cache_gives_a_finite_loss_and_gradient(teacher, sub, tok, tmp_path):
    """Inside the span, non-top-k teacher tokens are -inf (p = 0): KL must treat 0 * log 0 as 0."""
    from kdfast.distill.collate import DistillCollator
    from kdfast.distill.student import student_from_teacher
    from kdfast.distill.teacher_cache import TeacherCache
    from kdfast.distill.trainer import DistillationTrainer, DistillConfig
    from transformers import TrainingArguments
    rows = TeacherCache.build(teacher, sub, tok, str(tmp_path / "c"), top_k=3, progress=False).attach(sub)
    student = student_from_teacher(teacher, [0, 2])
    tr = DistillationTrainer(model=student, args=TrainingArguments(str(tmp_path / "o"), report_to=[]),
                             train_dataset=rows, data_collator=DistillCollator(tok), teacher=teacher,
                             distill=DistillConfig(temperature=2.0, alpha=1.0))
    loss = tr.compute_loss(student, DistillCollator(tok)([rows[i] for i in range(8)]))
    assert torch.isfinite(loss) and float(loss) > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_scatters_at_the_token_positions(side, built, sub, tok):
    from kdfast.distill.collate import DistillCollator, span_mask
    rows = built.attach(sub)
    feats = [rows[i] for i in (0, 3, 5, 11, 17)]  # windows of several lengths
    lengths = [len(f["input_ids"]) for f in feats]
    assert len(set(lengths)) > 1
    t = copy.deepcopy(tok)
    t.padding_side = side
    batch = DistillCollator(t)(feats)
    L = batch["input_ids"].shape[1]
    assert L % 8 == 0 and L >= max(lengths)
    for name in ("teacher_start_logits", "teacher_end_logits"):
        assert batch[name].shape == (len(feats), L)
    for i, f in enumerate(feats):
        shift = L - lengths[i] if side == "left" else 0
        assert batch["input_ids"][i, shift:shift + lengths[i]].tolist() == f["input_ids"]
        pos = [p + shift for p in span_positions(f)]
        for key in ("start", "end"):
            got = batch[f"teacher_{key}_logits"][i]
            np.testing.assert_allclose(got[pos].numpy(), np.asarray(f[f"teacher_{key}"]), rtol=0, atol=0)
            rest = torch.ones(L, dtype=torch.bool)
            rest[pos] = False
            assert torch.isneginf(got[rest]).all()
    # the trainer's span mask (from the shifted cls / context bounds) covers exactly the cached tokens
    assert torch.equal(span_mask(batch, L), torch.isfinite(batch["teacher_start_logits"]))
