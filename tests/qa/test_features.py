"""Windows (features) of SQuAD questions: answer positions, offsets, grouping, padding sides, collation."""
import pytest

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from datasets import Dataset  # noqa: E402

from kdfast.qa.collate import QACollator  # noqa: E402
from kdfast.qa.features import (eval_features, prepare_eval_features, prepare_train_features,  # noqa: E402
                                train_features, windows_per_example)
from kdfast.qa.tokenizer import train_wordpiece_tokenizer  # noqa: E402

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda river mountain city founded born year "
         "the of in was by who where when what is a an and capital named after built tower bridge museum").split()


def _long_context(n, seed=0):
    import random
    r = random.Random(seed)
    return " ".join(r.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tok():
    texts = [" ".join(WORDS)] * 5 + ["Café Zürich Ünïcödé naïve résumé", "北京 东京 上海 大学", "1887 1923 42 7"]
    return train_wordpiece_tokenizer(texts, vocab_size=300)


def _record(qid, question, context, answer=None, start=None):
    if answer is None:
        ans = {"text": [], "answer_start": []}
    else:
        start = context.index(answer) if start is None else start
        ans = {"text": [answer], "answer_start": [start]}
    return {"id": qid, "title": "t", "question": question, "context": context, "answers": ans}


def _batch(records):
    return {k: [r[k] for r in records] for k in records[0]}


def _span_text(feats, i, context):
    """Context text covered by the labelled token span of window i (through eval offsets)."""
    offs = feats["offset_mapping"][i]
    s, e = feats["start_positions"][i], feats["end_positions"][i]
    return context[offs[s][0]:offs[e][1]]


def _both(records, tok, **kw):
    b = _batch(records)
    tr = prepare_train_features(b, tok, **kw)
    ev = prepare_eval_features(b, tok, **kw)
    tr["offset_mapping"] = ev["offset_mapping"]
    return tr


def test_answer_positions_in_every_window_edge_and_split(tok):
    ctx = _long_context(120)
    # Answers placed at many character positions: at window edges, straddling a boundary, at the very end.
    words = ctx.split()
    recs = []
    for k, wi in enumerate([0, 20, 30, 31, 32, 55, 60, 61, 90, 118, 119]):
        ans = " ".join(words[wi:wi + 2]) if wi < 119 else words[wi]
        start = len(" ".join(words[:wi])) + (1 if wi else 0)
        assert ctx[start:start + len(ans)] == ans
        recs.append(_record(f"q{k}", "where was the tower built", ctx, ans, start))
    f = _both(recs, tok, max_seq_length=48, doc_stride=16, pad_to_max_length=False)
    by_q = windows_per_example(f)
    assert set(by_q) == {r["id"] for r in recs}
    for r in recs:
        idx = by_q[r["id"]]
        assert len(idx) > 1, "a 120-word context at 48 tokens must give several windows"
        assert [f["window"][i] for i in idx] == list(range(len(idx)))
        a0 = r["answers"]["answer_start"][0]
        a1 = a0 + len(r["answers"]["text"][0])
        found = 0
        for i in idx:
            offs = f["offset_mapping"][i]
            ctx_offs = [o for o in offs if o is not None]
            inside = ctx_offs[0][0] <= a0 and ctx_offs[-1][1] >= a1
            if inside:
                found += 1
                assert _span_text(f, i, ctx) == r["answers"]["text"][0]
                assert f["context_start"][i] <= f["start_positions"][i] <= f["end_positions"][i] <= f["context_end"][i]
            else:  # answer (partly) outside this window: labelled with CLS
                assert f["start_positions"][i] == f["end_positions"][i] == f["cls_index"][i] == 0
        assert found >= 1, f"answer of {r['id']} is in no window"


def test_answer_at_very_end_of_long_context(tok):
    ctx = _long_context(200, seed=3) + " museum"
    r = _record("end", "what is named", ctx, "museum", len(ctx) - len("museum"))
    f = _both([r], tok, max_seq_length=64, doc_stride=24, pad_to_max_length=True)
    last = len(f["input_ids"]) - 1
    assert _span_text(f, last, ctx) == "museum"
    assert all(f["start_positions"][i] == 0 for i in range(last))


def test_uncased_accents_and_cjk_offsets(tok):
    ctx = "The Café Zürich was founded in 1887 by Ünïcödé near 北京 大学 and a naïve résumé."
    recs = [_record("acc", "who founded the Cafe Zurich", ctx, "Café Zürich"),
            _record("num", "when", ctx, "1887"),
            _record("cjk", "where", ctx, "北京"),
            _record("cjk2", "where", ctx, "北京 大学"),
            _record("acc2", "what", ctx, "naïve résumé")]
    f = _both(recs, tok, max_seq_length=64, doc_stride=16)
    for i, r in enumerate(recs):
        assert _span_text(f, i, ctx) == r["answers"]["text"][0], r["id"]


def test_no_answer_and_cls(tok):
    ctx = _long_context(30)
    f = _both([_record("na", "what", ctx)], tok, max_seq_length=64, doc_stride=16)
    assert f["start_positions"] == f["end_positions"] == [0] * len(f["input_ids"])


def test_eval_offsets_none_outside_context_and_example_id(tok):
    ctx = _long_context(60)
    b = _batch([_record("e1", "where was the tower", ctx, ctx.split()[5]), _record("e2", "who", ctx)])
    f = prepare_eval_features(b, tok, max_seq_length=40, doc_stride=12, pad_to_max_length=True)
    for i in range(len(f["input_ids"])):
        offs = f["offset_mapping"][i]
        c0, c1 = f["context_start"][i], f["context_end"][i]
        assert offs[0] is None  # CLS
        assert all(o is None for o in offs[:c0]) and all(o is None for o in offs[c1 + 1:])
        assert all(o is not None for o in offs[c0:c1 + 1])
        assert f["length"][i] == sum(f["attention_mask"][i])
    ids = f["example_id"]
    assert ids[0] == "e1" and ids[-1] == "e2" and sorted(set(ids)) == ["e1", "e2"]


def test_left_padding_tokenizer_puts_context_first(tok):
    import copy
    left = copy.deepcopy(tok)
    left.padding_side = "left"
    ctx = _long_context(50, seed=5)
    ans = ctx.split()[40]
    start = len(" ".join(ctx.split()[:40])) + 1
    r = _record("lp", "where was the tower built", ctx, ans, start)
    f = _both([r], left, max_seq_length=40, doc_stride=12, pad_to_max_length=True)
    hit = 0
    for i in range(len(f["input_ids"])):
        ids, c0, cls = f["input_ids"][i], f["context_start"][i], f["cls_index"][i]
        # [PAD]... [CLS] context ... [SEP] question [SEP]: padding first, then CLS, then the context
        assert cls == c0 - 1 and ids[cls] == left.cls_token_id and set(ids[:cls]) <= {left.pad_token_id}
        assert f["token_type_ids"][i][f["context_end"][i] + 2] == 1  # the question is the second sequence
        if f["start_positions"][i] != f["cls_index"][i]:
            hit += 1
            assert _span_text(f, i, ctx) == ans
    assert hit >= 1


def test_slow_tokenizer_rejected(tok):
    class Slow:
        is_fast = False
    with pytest.raises(TypeError, match="fast tokenizer"):
        prepare_train_features(_batch([_record("x", "q", "a b c", "b")]), Slow())


def test_bad_stride(tok):
    with pytest.raises(ValueError, match="doc_stride"):
        prepare_train_features(_batch([_record("x", "what", "alpha beta", "beta")]), tok, max_seq_length=32,
                               doc_stride=32)


def test_dataset_map_and_dynamic_padding_collator(tok):
    ctx_short, ctx_long = _long_context(10), _long_context(70, seed=9)
    w = ctx_short.split()
    recs = [_record("s", "what", ctx_short, w[3], len(" ".join(w[:3])) + 1),
            _record("l", "where", ctx_long, ctx_long.split()[-1], len(ctx_long) - len(ctx_long.split()[-1]))]
    ds = Dataset.from_list(recs)
    feats = train_features(ds, tok, max_seq_length=64, doc_stride=16)
    assert {"input_ids", "start_positions", "example_id", "window", "length"} <= set(feats.column_names)
    lengths = [len(x) for x in feats["input_ids"]]
    assert min(lengths) < 64 and max(lengths) == 64  # dynamic: windows keep their own length
    coll = QACollator(tok, pad_to_multiple_of=8)
    short = [feats[i] for i in range(len(feats)) if feats[i]["example_id"] == "s"]
    b = coll(short)
    assert b["input_ids"].shape[1] == -(-len(short[0]["input_ids"]) // 8) * 8
    assert b["attention_mask"].sum().item() == len(short[0]["input_ids"])
    assert (b["input_ids"][0, len(short[0]["input_ids"]):] == tok.pad_token_id).all()
    full = QACollator(tok, max_length=64)([feats[0], feats[len(feats) - 1]])
    assert full["input_ids"].shape == (2, 64)
    ev = eval_features(ds, tok, max_seq_length=64, doc_stride=16)
    assert ev["example_id"] == feats["example_id"] and "offset_mapping" in ev.column_names


def test_collator_left_padding_shifts_positions(tok):
    import copy
    left = copy.deepcopy(tok)
    left.padding_side = "left"
    feats = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "start_positions": 2, "end_positions": 2,
              "cls_index": 0, "context_start": 1, "context_end": 2},
             {"input_ids": [1, 2, 3, 4, 5], "attention_mask": [1] * 5, "start_positions": 3, "end_positions": 4,
              "cls_index": 0, "context_start": 1, "context_end": 4}]
    b = QACollator(left, pad_to_multiple_of=None)(feats)
    assert b["input_ids"].tolist()[0] == [left.pad_token_id] * 2 + [1, 2, 3]
    assert b["start_positions"].tolist() == [4, 3] and b["cls_index"].tolist() == [2, 0]
