"""Distilling on unlabelled questions (a transfer set): the teacher's soft labels cost no annotation.

    extra = unlabeled_windows(questions, tokenizer, max_seq_length=256, doc_stride=96)
    windows = with_unlabeled(train_windows, extra)   # then TeacherCache.build / attach as usual

The windows of an unlabelled question get ``start_positions = end_positions =``
:data:`IGNORE_POSITION`, so ``qa_kd_loss`` gives them the soft (teacher) term
only: positions are clamped to ``[0, L]`` and ``L`` is ignored, while -1 would
clamp to 0 and count as a CLS label. Any answers the questions carry are never
read. The student without KD cannot use these questions at all, which is where
distillation can add what the labelled set lacks.
"""
from __future__ import annotations

IGNORE_POSITION = 100_000


def without_labels(windows, desc: str = "windows (soft labels only)"):
    """The same windows with every gold position set to :data:`IGNORE_POSITION`."""
    return windows.map(lambda b: {"start_positions": [IGNORE_POSITION] * len(b["start_positions"]),
                                  "end_positions": [IGNORE_POSITION] * len(b["end_positions"])},
                       batched=True, desc=desc, load_from_cache_file=False)


def check_disjoint(labeled_questions, unlabeled_questions, what: str = "unlabeled questions") -> None:
    """ValueError naming the clashing ids when a question id is in both sets (the teacher cache keys
    rows by (question id, window), and a labelled question must not lose its labels)."""
    both = set(labeled_questions["id"]) & set(unlabeled_questions["id"])
    if both:
        raise ValueError(f"{len(both)} {what} have the ids of labelled training questions, e.g. "
                         f"{sorted(both)[:5]}: give the unlabeled set its own ids")


def unlabeled_windows(questions, tokenizer, *, max_seq_length: int = 384, doc_stride: int = 128,
                      num_proc: int | None = None):
    """Training windows of unlabelled questions (``id``, ``question``, ``context``; ``answers`` optional
    and ignored), every gold position :data:`IGNORE_POSITION`."""
    from kdfast.qa.features import train_features
    missing = {"id", "question", "context"} - set(questions.column_names)
    if missing:
        raise ValueError(f"unlabeled questions lack columns {sorted(missing)}")
    if "answers" not in questions.column_names:
        questions = questions.map(lambda b: {"answers": [{"text": [], "answer_start": []}] * len(b["id"])},
                                  batched=True, desc="empty answers", load_from_cache_file=False)
    windows = train_features(questions, tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride,
                             num_proc=num_proc)
    return without_labels(windows)


def with_unlabeled(windows, extra):
    """Labelled windows followed by unlabelled ones (the columns both have, in ``windows``' order)."""
    from datasets import concatenate_datasets
    if extra is None or len(extra) == 0:
        return windows
    cols = [c for c in windows.column_names if c in extra.column_names]
    drop = [c for c in windows.column_names if c not in cols]
    if {"start_positions", "end_positions"} - set(cols):
        raise ValueError("with_unlabeled: the windows need start_positions / end_positions (kdfast.qa.train_features)")
    return concatenate_datasets([windows.remove_columns(drop) if drop else windows,
                                 extra.select_columns(cols)])


__all__ = ["IGNORE_POSITION", "check_disjoint", "unlabeled_windows", "with_unlabeled", "without_labels"]
