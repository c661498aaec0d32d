"""BERT configs for the QA pipeline's built-in teacher and student (no download).

Sized for a 2-core CPU: the teacher (6 x 256, ~5M parameters with a 4k vocab)
trains on a few thousand synthetic questions in minutes, the student
(2 x 128) is ~8x smaller.
"""
from __future__ import annotations


def _vocab_and_pad(tokenizer_or_vocab_size):
    if isinstance(tokenizer_or_vocab_size, bool):
        raise TypeError("tokenizer_or_vocab_size: expected a tokenizer or an int, got a bool")
    if isinstance(tokenizer_or_vocab_size, int):
        if tokenizer_or_vocab_size <= 0:
            raise ValueError(f"tokenizer_or_vocab_size: expected a positive int, got {tokenizer_or_vocab_size}")
        return tokenizer_or_vocab_size, {}
    tok = tokenizer_or_vocab_size
    if not hasattr(tok, "pad_token_id") or not hasattr(tok, "__len__"):
        raise TypeError("tokenizer_or_vocab_size: expected a tokenizer (with pad_token_id and len()) "
                        f"or an int, got {type(tok).__name__}")
    if tok.pad_token_id is None:
        raise ValueError("tokenizer_or_vocab_size: the tokenizer has no pad token")
    # len() counts added tokens, which the backend's vocab_size does not.
    return len(tok), {"pad_token_id": tok.pad_token_id}


def _config(tokenizer_or_vocab_size, defaults, overrides):
    from transformers import BertConfig

    vocab_size, token_ids = _vocab_and_pad(tokenizer_or_vocab_size)
    kwargs = {"vocab_size": vocab_size, "max_position_embeddings": 512, "type_vocab_size": 2,
              "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
              **defaults, **token_ids, **overrides}
    if kwargs["hidden_size"] % kwargs["num_attention_heads"]:
        raise ValueError(f"hidden_size ({kwargs['hidden_size']}) must be a multiple of "
                         f"num_attention_heads ({kwargs['num_attention_heads']})")
    return BertConfig(**kwargs)


def teacher_config(tokenizer_or_vocab_size, **overrides):
    """BertConfig of the built-in teacher: 6 layers, hidden 256, 4 heads, FFN 1024.

    Args:
        tokenizer_or_vocab_size: a tokenizer (vocab size = ``len(tokenizer)``,
            pad id from it) or an int vocab size (pad id 0).
        **overrides: any ``BertConfig`` field, e.g. ``num_hidden_layers=4``.

    Returns:
        ``transformers.BertConfig`` (max_position_embeddings 512, 2 token types).
    """
    return _config(tokenizer_or_vocab_size, {"num_hidden_layers": 6, "hidden_size": 256,
                                             "num_attention_heads": 4, "intermediate_size": 1024}, overrides)


def student_config(tokenizer_or_vocab_size, **overrides):
    """BertConfig of the built-in student: 2 layers, hidden 128, 2 heads, FFN 512.

    Args and returns as ``teacher_config``.
    """
    return _config(tokenizer_or_vocab_size, {"num_hidden_layers": 2, "hidden_size": 128,
                                             "num_attention_heads": 2, "intermediate_size": 512}, overrides)
