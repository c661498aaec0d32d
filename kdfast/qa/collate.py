"""Batching QA windows: dynamic padding (each batch padded to its longest window).

With dynamic padding a batch of SQuAD windows is padded to its own longest
window instead of 384 tokens; with the length-grouped sampler (Trainer's
``train_sampling_strategy="group_by_length"``, which reads the ``length``
column) the windows of a batch have similar lengths, so little padding is
computed at all.
"""
from __future__ import annotations

import torch

SEQUENCE_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
# Integer per-window columns that travel with a batch (positions, context bounds).
SCALAR_COLUMNS = ("start_positions", "end_positions", "cls_index", "context_start", "context_end")


class QACollator:
    """Collate features (dicts) into a batch of tensors.

    Args:
        tokenizer: gives the pad id and padding side.
        pad_to_multiple_of: round the padded length up (8 keeps GEMM shapes friendly).
        max_length: pad to exactly this length instead (the stock ``pad_to_max_length`` way).
        keep: extra scalar columns to stack (ints or floats), besides the standard ones.

    Columns that are not model inputs and cannot be batched (``example_id``, ``offset_mapping``,
    ``window``, ``length``) are dropped. Returns ``{column: tensor}``.
    """

    def __init__(self, tokenizer, *, pad_to_multiple_of: int | None = 8, max_length: int | None = None,
                 keep: tuple[str, ...] = ()):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before batching")
        self.pad_id = tokenizer.pad_token_id
        self.left = getattr(tokenizer, "padding_side", "right") == "left"
        self.multiple = pad_to_multiple_of
        self.max_length = max_length
        self.keep = tuple(keep)

    def padded_length(self, longest: int) -> int:
        if self.max_length is not None:
            return max(self.max_length, longest)
        if self.multiple:
            return -(-longest // self.multiple) * self.multiple
        return longest

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("QACollator: empty batch")
        L = self.padded_length(max(len(f["input_ids"]) for f in features))
        batch = {}
        for col in SEQUENCE_COLUMNS:
            if col not in features[0]:
                continue
            fill = self.pad_id if col == "input_ids" else 0
            out = torch.full((len(features), L), fill, dtype=torch.long)
            for i, f in enumerate(features):
                row = torch.as_tensor(f[col], dtype=torch.long)
                if self.left:
                    out[i, L - row.numel():] = row
                else:
                    out[i, :row.numel()] = row
            batch[col] = out
        shift = None
        if self.left:  # token indices move right by the padding added in front
            shift = torch.tensor([L - len(f["input_ids"]) for f in features])
        for col in SCALAR_COLUMNS + self.keep:
            if col in features[0]:
                v = torch.tensor([f[col] for f in features])
                if shift is not None and col in SCALAR_COLUMNS:
                    v = v + shift
                batch[col] = v
        return batch
