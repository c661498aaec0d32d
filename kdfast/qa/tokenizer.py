"""A BERT-style WordPiece tokenizer trained in-process (no download).

``train_wordpiece_tokenizer`` builds the same pipeline as BERT's uncased
tokenizer with the ``tokenizers`` library (BertNormalizer: lowercase, strip
accents; BertPreTokenizer; WordPiece with ``##`` continuations; ``[CLS] A [SEP]
B [SEP]`` with token_type_ids; WordPiece decoder) and wraps it in a
``transformers`` fast tokenizer, so everything HF ``run_qa.py`` needs works:
``return_offsets_mapping``, ``return_overflowing_tokens`` with ``stride``,
``truncation="only_second"``, ``sequence_ids()``, ``save_pretrained`` and
``AutoTokenizer.from_pretrained(dir)`` offline.
"""
from __future__ import annotations

import copy
import hashlib

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""Special tokens, in id order 0..4."""

_CACHE = {}


def train_wordpiece_tokenizer(texts, *, vocab_size=4000, lowercase=True, min_frequency=1):
    """Train a BERT-style WordPiece tokenizer on ``texts``.

    Args:
        texts: iterable of str (contexts, questions...).
        vocab_size: target vocabulary size, special tokens included (the trainer
            stops earlier when the texts offer no more merges).
        lowercase: lowercase and strip accents (BERT uncased); offsets still
            point into the original text.
        min_frequency: minimum count of a merged pair to enter the vocabulary.

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with [PAD]=0 [UNK]=1 [CLS]=2
        [SEP]=3 [MASK]=4, ``model_max_length=512``, right padding, and
        ``model_input_names`` input_ids, token_type_ids, attention_mask.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str):
        raise TypeError("texts: expected an iterable of strings, got one str")
    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size: expected an int > {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("texts: nothing to train on (no non-empty string)")
    if not all(isinstance(t, str) for t in texts):
        bad = next(t for t in texts if not isinstance(t, str))
        raise TypeError(f"texts: expected strings, got {type(bad).__name__}")

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            strip_accents=lowercase, lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # Deterministic training: the trainer gives the "##c" continuation tokens their ids in hash-map
    # order, and those ids break ties between equally frequent merges, so two processes trained
    # different vocabularies on the same texts (tokenizers issue #1794). Registering every
    # continuation of the texts up front, sorted, fixes their ids; the model is then rebuilt from the
    # vocabulary so that they are ordinary entries, not added special tokens.
    continuations = sorted({"##" + ch for t in texts
                            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))
                            for ch in word[1:]})
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    trained.normalizer, trained.pre_tokenizer = normalizer, pre_tokenizer
    trainer = trainers.WordPieceTrainer(vocab_size=max(vocab_size, len(SPECIAL_TOKENS) + len(continuations)),
                                        min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS) + continuations,
                                        continuing_subword_prefix="##", show_progress=False)
    trained.train_from_iterator(texts, trainer=trainer)
    tok = Tokenizer(models.WordPiece(vocab=trained.get_vocab(with_added_tokens=True), unk_token="[UNK]",
                                     continuing_subword_prefix="##"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512, padding_side="right",
        truncation_side="right", do_lower_case=lowercase,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def _builtin_texts(seed):
    from kdfast.qa.synthetic import DOMAINS, generate_domain

    texts, seen = [], set()
    for domain in DOMAINS:
        # Train split only: dev entities stay unseen (split into sub-words),
        # as names unseen by a pretrained vocabulary would be.
        for rec in generate_domain(domain, 1000, split="train", seed=seed):
            if rec["context"] not in seen:
                seen.add(rec["context"])
                texts.append(rec["context"])
            texts.append(rec["question"])
    return texts


def builtin_tokenizer(data_texts=None, *, vocab_size=4000, seed=0):
    """The built-in tokenizer: WordPiece trained on the synthetic generator's text.

    Args:
        data_texts: texts to train on; ``None`` -> contexts and questions of
            4,000 generated train questions (1,000 per domain, all of
            ``kdfast.qa.synthetic.DOMAINS``) drawn with ``seed``.
        vocab_size: target vocabulary size.
        seed: generator seed when ``data_texts`` is None.

    Returns:
        a ``PreTrainedTokenizerFast`` (see ``train_wordpiece_tokenizer``); the
        trained result is cached in-process per (texts, vocab_size, seed) and
        each call returns a fresh copy.
    """
    if data_texts is None:
        key = ("builtin", vocab_size, seed)
    else:
        data_texts = list(data_texts)
        digest = hashlib.sha1("\0".join(map(str, data_texts)).encode("utf-8")).hexdigest()
        key = (digest, vocab_size)
    if key not in _CACHE:
        texts = _builtin_texts(seed) if data_texts is None else data_texts
        _CACHE[key] = train_wordpiece_tokenizer(texts, vocab_size=vocab_size)
    return copy.deepcopy(_CACHE[key])
