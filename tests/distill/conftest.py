"""Shared, session-scoped fixtures of the QA distillation tests.

Everything is tiny (BERT hidden 32, 4 layers, 2 heads, FFN 64; a WordPiece vocabulary
trained on the generated questions; windows of 128 tokens) so the whole directory runs
in a few minutes on 2 CPU cores. The expensive objects (tokenizer, windows, a teacher
fine-tuned for a few steps and saved with its tokenizer) are built once per session.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# One intra-op thread: on 2 shared cores, 2 OpenMP threads make these tiny models 10-70x slower
# (spin-waiting on a busy core). Subprocesses (CLI, torchrun) inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

MAX_SEQ_LENGTH = 128
DOC_STRIDE = 48
N_TRAIN, N_DEV = 48, 16
TEACHER_LAYERS = 4


def make_tokenizer(texts, vocab_size=800):
    """A BERT-style WordPiece fast tokenizer trained on ``texts`` (kdfast.qa.tokenizer when it
    exists, else built inline with the ``tokenizers`` library)."""
    try:
        from kdfast.qa.tokenizer import train_wordpiece_tokenizer
    except ImportError:
        train_wordpiece_tokenizer = None
    if train_wordpiece_tokenizer is not None:
        return train_wordpiece_tokenizer(texts, vocab_size=vocab_size)
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                           show_progress=False))
    t.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", t.token_to_id("[CLS]")), ("[SEP]", t.token_to_id("[SEP]"))])
    t.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def tiny_config(vocab_size, pad_token_id=0, **overrides):
    """A tiny ``BertConfig`` (hidden 32, 4 layers, 2 heads, FFN 64, 128 positions)."""
    from transformers import BertConfig
    kw = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=TEACHER_LAYERS, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=MAX_SEQ_LENGTH, pad_token_id=pad_token_id)
    kw.update(overrides)
    return BertConfig(**kw)


def train_options(**overrides):
    """``TrainOptions`` for the tiny tests: no tqdm, no warmup, random order, high learning rate."""
    from kdfast.distill.stage import TrainOptions
    kw = dict(num_train_epochs=1, per_device_train_batch_size=8, per_device_eval_batch_size=32,
              learning_rate=1e-3, warmup_ratio=0.0, logging_steps=1, group_by_length=False,
              disable_tqdm=True, save_total_limit=None)
    kw.update(overrides)
    return TrainOptions(**kw)


@pytest.fixture(scope="session")
def qa_records():
    """Generated SQuAD records: ``{"train": [...], "validation": [...]}``."""
    from kdfast.qa.synthetic import generate_squad
    return generate_squad(N_TRAIN, N_DEV, seed=0)


@pytest.fixture(scope="session")
def qa_data(qa_records):
    """``(train, dev)`` questions as ``datasets.Dataset``."""
    from datasets import Dataset
    return Dataset.from_list(qa_records["train"]), Dataset.from_list(qa_records["validation"])


@pytest.fixture(scope="session")
def tok(qa_records):
    """The session tokenizer (trained on the generated train + dev texts)."""
    texts = [r["context"] + " " + r["question"] for r in qa_records["train"] + qa_records["validation"]]
    return make_tokenizer(texts)


@pytest.fixture(scope="session")
def windows(qa_data, tok):
    """Training windows of the train questions (dynamic padding)."""
    from kdfast.qa.features import train_features
    return train_features(qa_data[0], tok, max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE)


@pytest.fixture(scope="session")
def dev_windows(qa_data, tok):
    """Evaluation windows of the dev questions."""
    from kdfast.qa.features import eval_features
    return eval_features(qa_data[1], tok, max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE)


@pytest.fixture(scope="session")
def small_windows(windows):
    """The first 24 training windows (3 batches of 8): short epochs."""
    return windows.select(range(24))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tok, windows):
    """A tiny teacher (4 layers, kdfast attention) fine-tuned for 12 steps, saved with the tokenizer."""
    from kdfast.distill.stage import train_stage
    from kdfast.distill.student import student_from_config
    root = tmp_path_factory.mktemp("teacher")
    model = student_from_config(tiny_config(len(tok), tok.pad_token_id), attn_implementation="kdfast", seed=0)
    trainer = train_stage(model, windows, tok, str(root / "run"), train_options(max_steps=12, logging_steps=6))
    out = root / "model"
    trainer.model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


@pytest.fixture
def teacher(teacher_dir):
    """A fresh copy of the session teacher (eval mode, kdfast attention)."""
    from kdfast.distill.models import load_qa_model
    return load_qa_model(teacher_dir, attn_implementation="kdfast")


@pytest.fixture(scope="session")
def squad_files(tmp_path_factory, qa_data):
    """The session questions written as official SQuAD v1.1 JSON: ``(train.json, dev.json)``."""
    from kdfast.qa.load import write_squad_json
    root = tmp_path_factory.mktemp("squad")
    return (str(write_squad_json(qa_data[0], root / "train.json")),
            str(write_squad_json(qa_data[1], root / "dev.json")))
