"""Distilling on unlabelled questions (kdfast.distill.unlabeled): windows with ignored gold positions
get the soft term only, and the recipe trains on them next to the labelled windows."""
from __future__ import annotations

import os

import pytest
import torch

from kdfast.distill.unlabeled import (IGNORE_POSITION, check_disjoint, unlabeled_windows, with_unlabeled,
                                      without_labels)

from .conftest import DOC_STRIDE, MAX_SEQ_LENGTH, train_options


def _unlabeled(qa_data, n=6, prefix="u-"):
    """n training questions under new ids, their answers removed."""
    qs = qa_data[0].select(range(n)).remove_columns("answers")
    return qs.map(lambda ex: {"id": prefix + ex["id"]})


def test_windows_of_questions_without_answers(qa_data, tok):
    qs = _unlabeled(qa_data)
    assert "answers" not in qs.column_names
    w = unlabeled_windows(qs, tok, max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE)
    assert len(w) >= len(qs) and set(w["example_id"]) == set(qs["id"])
    assert set(w["start_positions"]) == {IGNORE_POSITION} and set(w["end_positions"]) == {IGNORE_POSITION}


def test_answers_are_never_read(qa_data, tok):
    """The same questions with and without their answers give the same windows."""
    with_ans = qa_data[0].select(range(6))
    without = with_ans.remove_columns("answers")
    a = unlabeled_windows(with_ans, tok, max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE)
    b = unlabeled_windows(without, tok, max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE)
    assert a.to_dict() == b.to_dict()


def test_with_unlabeled_appends_and_keeps_labels(windows, qa_data, tok):
    extra = unlabeled_windows(_unlabeled(qa_data), tok, max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE)
    both = with_unlabeled(windows, extra)
    assert len(both) == len(windows) + len(extra)
    assert both["start_positions"][:len(windows)] == windows["start_positions"]
    assert set(both["start_positions"][len(windows):]) == {IGNORE_POSITION}
    assert with_unlabeled(windows, None) is windows
    relabelled = without_labels(windows)
    assert set(relabelled["end_positions"]) == {IGNORE_POSITION} and len(relabelled) == len(windows)


def test_clashing_ids_are_named(qa_data):
    train = qa_data[0].select(range(10))
    with pytest.raises(ValueError, match=r"2 unlabeled questions have the ids of labelled training questions") as e:
        check_disjoint(train, qa_data[0].select(range(8, 12)))
    assert repr(sorted(train["id"][8:10])[0]) in str(e.value)
    check_disjoint(train, _unlabeled(qa_data))


def test_ignored_positions_leave_the_soft_term_only():
    from kdfast.ops import qa_kd_loss
    g = torch.Generator().manual_seed(0)
    s, e, ts, te = (torch.randn(5, 40, generator=g, dtype=torch.float64) for _ in range(4))
    ignored = torch.full((5,), IGNORE_POSITION)
    soft_only = qa_kd_loss(s, e, ts, te, soft_weight=0.5, hard_weight=0.0)
    assert torch.allclose(qa_kd_loss(s, e, ts, te, ignored, ignored, soft_weight=0.5, hard_weight=0.5), soft_only)
    # one labelled row: its hard term counts alone (mean over counted rows)
    pos = ignored.clone()
    pos[2] = 7
    mixed = qa_kd_loss(s, e, ts, te, pos, pos, soft_weight=0.5, hard_weight=0.5)
    ce = 0.5 * (torch.nn.functional.cross_entropy(s[2:3], pos[2:3]) + torch.nn.functional.cross_entropy(e[2:3], pos[2:3]))
    assert torch.allclose(mixed, soft_only + 0.5 * ce.float())


@pytest.mark.slow
def test_recipe_distils_on_unlabeled_questions(tmp_path, teacher_dir, tok, qa_data, monkeypatch):
    import kdfast.distill.recipe as rmod
    train, dev = qa_data[0].select(range(12)), qa_data[1].select(range(4))
    unl = _unlabeled(qa_data, n=10)
    seen = {}
    real = rmod.train_stage

    def spy(model, windows, tokenizer, output_dir, options, **kw):
        seen[os.path.basename(output_dir)] = windows
        return real(model, windows, tokenizer, output_dir, options, **kw)

    monkeypatch.setattr(rmod, "train_stage", spy)
    cfg = rmod.RecipeConfig(output_dir=str(tmp_path / "out"), student_layers="0,2", stages=("distil",),
                            train=train_options(per_device_train_batch_size=8, num_train_epochs=1),
                            max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE)
    rows = rmod.run_recipe(cfg, teacher_dir, train, dev, tok, unlabeled_questions=unl, log=lambda m: None)
    assert [r["model"] for r in rows] == ["distil"]
    w = seen["distil"]
    ids = w["example_id"]
    assert set(ids) == set(train["id"]) | set(unl["id"])
    for i, (q, sp) in enumerate(zip(ids, w["start_positions"])):
        assert (sp == IGNORE_POSITION) == (q in set(unl["id"])), (i, q, sp)
    # every window, unlabelled ones included, carries the cached teacher logits
    assert all(len(x) > 1 for x in w["teacher_start"])
    with pytest.raises(ValueError, match="have the ids of labelled training questions"):
        rmod.run_recipe(cfg, teacher_dir, train, dev, tok, unlabeled_questions=qa_data[0].select(range(3)))
