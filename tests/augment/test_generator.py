"""Answer spans survive every manipulation: text at the recomputed offsets."""
import random

import pytest
import torch

from kdfast.augment.baselines import EmbeddingNeighbours, tinybert_replace
from kdfast.augment.generator import Strategy, manipulate, rebuild, strategy_grid, words

EDGE = [
    ("Zoë Ångström was born in São Paulo, Brazil (in 1901). She moved to Köln—later.", "São Paulo, Brazil"),
    ("Élodie, née Müller, wrote “Les Misérables”; it sold 1,200,000 copies.", "“Les Misérables”"),
    ("1901 was the year. Nothing else happened here at all, really.", "1901"),
    ("The capital is far away from the sea, and its name is Ærøskøbing.", "Ærøskøbing."),
    ("He lived at No. 10's gate (the west one) until 1950.", "10's gate"),
    ("An answer inside a word: the word is unbelievable today.", "believ"),
    ("  Leading   spaces\tand\ttabs, then the answer: Smith  ", "Smith"),
]


def _rec(ctx, ans, i=0):
    return {"id": f"q{i}", "title": "t", "question": "Where?", "context": ctx,
            "answers": {"text": [ans], "answer_start": [ctx.index(ans)]}}


def _ok(rec):
    a = rec["answers"]
    t, s = a["text"][0], a["answer_start"][0]
    return rec["context"][s:s + len(t)] == t


def test_rebuild_keeps_separators_and_anchor():
    text = "a  b, c"
    segs = words(text)
    new, anchor = rebuild(text, segs, {0: "xyz"}, text.index("c"))
    assert new == "xyz  b, c" and new[anchor] == "c"
    with pytest.raises(ValueError):
        rebuild(text, segs, {0: "q"}, 0)


@pytest.mark.parametrize("ctx,ans", EDGE)
def test_answer_survives_every_strategy(ctx, ans, aug_tok, aug_filler):
    rec = _rec(ctx, ans)
    src = "The river Tamsa flows through Orvel, a city of 12,000 inhabitants, near the Bay of Kerro."
    gen = torch.Generator().manual_seed(0)
    for j, s in enumerate(strategy_grid(["geo"], mask_rates=(0.0, 0.3, 1.0), mix_rates=(0.0, 0.5, 1.0),
                                        steps=(1, 3))):
        for filler in (aug_filler, None):
            out = manipulate(rec, s, source_text=src, filler=filler, tokenizer=aug_tok, rng=random.Random(j),
                             generator=gen)
            assert _ok(out), (s, out["context"])
            assert out["question"] == rec["question"] and out["origin"] == "q0"


def test_manipulation_changes_the_passage_and_uses_source(aug_tok, aug_filler):
    rec = _rec(*EDGE[0])
    src = "zzqq " * 30
    out = manipulate(rec, Strategy(1.0, 1.0, 1, "geo"), source_text=src, filler=aug_filler, tokenizer=aug_tok,
                     rng=random.Random(0))
    assert "zzqq" in out["context"] and _ok(out)
    out = manipulate(rec, Strategy(0.5, 0.0, 2, "geo"), source_text=src, filler=aug_filler, tokenizer=aug_tok,
                     rng=random.Random(0), generator=torch.Generator().manual_seed(0))
    assert "zzqq" not in out["context"] and out["context"] != rec["context"] and _ok(out)


def test_answer_survives_on_generated_data(aug_data, aug_tok, aug_filler):
    src = aug_data["source"][0]["context"]
    gen = torch.Generator().manual_seed(0)
    for i, rec in enumerate(aug_data["target"][:12]):
        out = manipulate(rec, Strategy(0.5, 0.5, 2, "g"), source_text=src, filler=aug_filler, tokenizer=aug_tok,
                         rng=random.Random(i), generator=gen)
        assert _ok(out)


def test_unanswerable_record_is_fine(aug_tok):
    rec = {"id": "u", "title": "", "question": "?", "context": "Some text, here.", "answers": {"text": [],
                                                                                                "answer_start": []}}
    out = manipulate(rec, Strategy(1.0, 1.0, 1), source_text="other words entirely", tokenizer=aug_tok)
    assert out["answers"] == {"text": [], "answer_start": []}


@pytest.mark.parametrize("ctx,ans", EDGE)
def test_tinybert_replacement_keeps_answer(ctx, ans, aug_tok, aug_filler, aug_teacher):
    nb = EmbeddingNeighbours(aug_teacher.get_input_embeddings().weight, aug_filler.allowed)
    for s in range(4):
        out = tinybert_replace(_rec(ctx, ans), tokenizer=aug_tok, filler=aug_filler, neighbours=nb, rate=0.8,
                               rng=random.Random(s), generator=torch.Generator().manual_seed(s))
        assert _ok(out)


def test_strategy_validation():
    with pytest.raises(ValueError, match="mask_rate"):
        Strategy(mask_rate=1.5)
    with pytest.raises(ValueError, match="steps"):
        Strategy(steps=0)
    with pytest.raises(ValueError, match="base: expected one of target, source, got 'both'"):
        Strategy(base="both")


def test_strategy_grid_bases():
    one = strategy_grid(["geo", "sci"], mask_rates=(0.1, 0.2), mix_rates=(0.5,), steps=(1,))
    both = strategy_grid(["geo", "sci"], mask_rates=(0.1, 0.2), mix_rates=(0.5,), steps=(1,),
                         bases=("target", "source"))
    assert len(one) == 4 and {s.base for s in one} == {"target"}
    assert len(both) == 8 and sorted(s.base for s in both) == ["source"] * 4 + ["target"] * 4
    assert len({s.name() for s in both}) == 8


def test_masked_lm_loss_equals_the_full_head_loss(aug_tok):
    """The masked-positions-only head gives the loss of BertForMaskedLM's own (all positions) head."""
    import torch

    from kdfast.augment.mlm import build_mlm, masked_lm_loss

    mlm = build_mlm(aug_tok, hidden_size=32, num_hidden_layers=1, intermediate_size=64, seed=3).double().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(aug_tok), (3, 20), generator=g)
    att = torch.ones_like(ids)
    att[2, 15:] = 0
    labels = torch.full_like(ids, -100)
    pick = torch.rand(ids.shape, generator=g) < 0.3
    pick[0, 0] = True
    labels[pick] = ids[pick]
    want = mlm(input_ids=ids, attention_mask=att, labels=labels).loss
    got = masked_lm_loss(mlm, ids, att, labels)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    labels[1] = -100  # a row without masks changes nothing either way
    torch.testing.assert_close(masked_lm_loss(mlm, ids, att, labels).double(),
                               mlm(input_ids=ids, attention_mask=att, labels=labels).loss, rtol=1e-6, atol=1e-6)


def test_filler_slots_head_matches_the_full_head(aug_tok, aug_filler):
    """The filler's slots-only vocabulary head picks what the full-sequence head would pick."""
    import torch

    from kdfast.augment.mlm import WholeWordFiller

    class FullHead(torch.nn.Module):  # hides .bert/.cls: the plain path
        def __init__(self, mlm):
            super().__init__()
            self.m = mlm

        def forward(self, **kw):
            return self.m(**kw)

    ids = aug_tok("the river flows past the old town to the sea", add_special_tokens=True)["input_ids"]
    ids[2] = ids[5] = ids[7] = aug_tok.mask_token_id
    plain = WholeWordFiller(FullHead(aug_filler.mlm), aug_tok)
    for seed in range(3):
        a = aug_filler.fill(ids, torch.Generator().manual_seed(seed))
        b = plain.fill(ids, torch.Generator().manual_seed(seed))
        assert a == b and len(a) == 3 and None not in a


def test_mlm_from_a_pretrained_encoder(aug_tok, aug_data, tmp_path):
    """build_mlm(init=dir) carries the model's encoder over unchanged, ties the output layer to its
    word embeddings, and trains from there; a vocabulary mismatch is refused naming mlm_init."""
    from kdfast.augment.mlm import build_mlm, train_mlm
    from kdfast.qa.tokenizer import train_wordpiece_tokenizer

    from .conftest import tiny_model

    qa = tiny_model(aug_tok, hidden=32, seed=5)
    qa.save_pretrained(tmp_path / "qa")
    mlm = build_mlm(aug_tok, init=str(tmp_path / "qa"), seed=0)
    enc = dict(mlm.bert.named_parameters())
    shared = [n for n, _ in qa.bert.named_parameters() if not n.startswith("pooler.")]
    assert shared and all(n in enc for n in shared)
    for n, p in qa.bert.named_parameters():
        if n in enc:
            torch.testing.assert_close(enc[n], p, rtol=0, atol=0)
    emb = mlm.bert.embeddings.word_embeddings.weight
    assert mlm.cls.predictions.decoder.weight.data_ptr() == emb.data_ptr()
    before = emb.detach().clone()
    train_mlm(mlm, aug_tok, [r["context"] for r in aug_data["source"]], steps=3, learning_rate=1e-3)
    assert not torch.equal(before, emb)  # it trains the pretrained weights, tied head included
    other = train_wordpiece_tokenizer([r["context"] for r in aug_data["source"]], vocab_size=300)
    assert len(other) != len(aug_tok)
    with pytest.raises(ValueError, match="mlm_init"):
        build_mlm(other, init=str(tmp_path / "qa"))
    with pytest.raises(FileNotFoundError, match="mlm_init"):
        build_mlm(aug_tok, init=str(tmp_path / "nothing"))
