"""The study tests reuse the tiny session fixtures of the QA distillation tests (tokenizer, windows,
a 4-layer hidden-32 teacher fine-tuned for 12 steps, SQuAD JSON files)."""
from tests.distill.conftest import (  # noqa: F401  (fixtures)
    DOC_STRIDE, MAX_SEQ_LENGTH, dev_windows, qa_data, qa_records, small_windows, squad_files, teacher, teacher_dir,
    tiny_config, tok, train_options, windows)
