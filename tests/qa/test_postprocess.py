"""n-best post-processing: crafted logits with known answers, and a nested-loop oracle of the HF rules."""
import math

import numpy as np
import pytest

from kdfast.qa.postprocess import apply_null_threshold, postprocess_predictions, write_predictions

CTX = "alpha beta gamma delta epsilon"
# token k (context) covers word k-? : [CLS] q q [SEP] alpha beta gamma delta epsilon [SEP]
OFFS = [None, None, None, None, (0, 5), (6, 10), (11, 16), (17, 22), (23, 30), None]


def _feat(eid, offs=OFFS, cls=0):
    return {"example_id": eid, "offset_mapping": list(offs), "cls_index": cls}


def _logits(best_start, best_end, L=10, base=-5.0):
    s = np.full(L, base)
    e = np.full(L, base)
    s[best_start] = 5.0
    e[best_end] = 5.0
    return s, e


def test_best_span_and_rules():
    ex = [{"id": "a", "context": CTX}]
    s, e = _logits(5, 7)
    s[1], e[1] = 9.0, 9.0       # question tokens: never an answer
    e[4] = 8.0                  # end before start: not a candidate with start 5
    preds, nbest, null = postprocess_predictions(ex, [_feat("a")], s[None], e[None])
    assert preds["a"] == "beta gamma delta"
    assert null == {}
    probs = [x["probability"] for x in nbest["a"]]
    assert math.isclose(sum(probs), 1.0, rel_tol=1e-9)
    assert probs == sorted(probs, reverse=True)
    # probabilities are the softmax of start + end scores of the listed spans
    scores = np.array([x["start_logit"] + x["end_logit"] for x in nbest["a"]])
    ref = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    np.testing.assert_allclose(probs, ref, rtol=1e-12)


def test_max_answer_length():
    ex = [{"id": "a", "context": CTX}]
    s, e = _logits(4, 8)
    s[6] = 4.0
    preds, _, _ = postprocess_predictions(ex, [_feat("a")], s[None], e[None], max_answer_length=3)
    assert preds["a"] == "gamma delta epsilon"  # 4..8 is 5 tokens: too long; 6..8 is the best valid


def test_best_over_windows_and_grouping():
    ex = [{"id": "a", "context": CTX}, {"id": "b", "context": CTX}]
    s1, e1 = _logits(4, 4)
    s2, e2 = _logits(6, 6)
    s2[6] = e2[6] = 7.0  # window 2 of "a" is more confident
    s3, e3 = _logits(8, 8)
    feats = [_feat("a"), _feat("a"), _feat("b")]
    preds, nbest, _ = postprocess_predictions(ex, feats, np.stack([s1, s2, s3]), np.stack([e1, e2, e3]))
    assert preds == {"a": "gamma", "b": "epsilon"}
    assert {x["text"] for x in nbest["a"]} >= {"gamma", "alpha"}


def test_v2_null_and_threshold():
    ex = [{"id": "a", "context": CTX}, {"id": "b", "context": CTX}]
    s, e = _logits(5, 5)
    s_na, e_na = s.copy(), e.copy()
    s_na[0] = e_na[0] = 9.0  # CLS beats the best span by 8
    feats = [_feat("a"), _feat("b")]
    preds, nbest, null = postprocess_predictions(ex, feats, np.stack([s, s_na]), np.stack([e, e_na]),
                                                 version_2_with_negative=True)
    assert preds == {"a": "beta", "b": ""}
    assert null["b"] == pytest.approx(18.0 - 10.0)
    assert null["a"] == pytest.approx((-5.0 - 5.0) - 10.0)
    assert any(x["text"] == "" for x in nbest["a"])  # the null answer is always listed in v2
    assert apply_null_threshold(nbest, null, 10.0) == {"a": "beta", "b": "beta"}
    assert apply_null_threshold(nbest, null, -100.0) == {"a": "", "b": ""}


def test_empty_when_no_valid_span():
    ex = [{"id": "a", "context": CTX}]
    offs = [None] * 10
    s, e = _logits(5, 5)
    preds, nbest, _ = postprocess_predictions(ex, [_feat("a", offs)], s[None], e[None])
    assert preds["a"] == "empty" and nbest["a"][0]["probability"] == 1.0


def _oracle(examples, features, start, end, n_best=20, max_len=30, v2=False):
    """Straight nested-loop statement of the HF utils_qa rules (index 0 null score: CLS at 0 here)."""
    out = {}
    for ex in examples:
        cands, null = [], None
        for fi, f in enumerate(features):
            if f["example_id"] != ex["id"]:
                continue
            sl, el, offs = start[fi], end[fi], f["offset_mapping"]
            fnull = sl[0] + el[0]
            if null is None or null > fnull:
                null = fnull
            si = list(np.argsort(sl)[-1:-n_best - 1:-1])
            ei = list(np.argsort(el)[-1:-n_best - 1:-1])
            for a in si:
                for b in ei:
                    if a >= len(offs) or b >= len(offs) or offs[a] is None or offs[b] is None:
                        continue
                    if b < a or b - a + 1 > max_len:
                        continue
                    cands.append((sl[a] + el[b], ex["context"][offs[a][0]:offs[b][1]]))
        if v2:
            cands.append((null, ""))
        cands = sorted(cands, key=lambda c: c[0], reverse=True)[:n_best]
        out[ex["id"]] = cands[0][1] if cands else "empty"
    return out


def test_matches_nested_loop_oracle_random():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(60)]
    ctx = " ".join(words)
    starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])
    examples, feats, S, E = [], [], [], []
    for q in range(40):
        examples.append({"id": f"q{q}", "context": ctx})
        for w in range(rng.integers(1, 4)):
            L = 48
            offs = [None] * 4 + [(int(starts[k]), int(starts[k] + len(words[k]))) for k in range(40)] + [None] * 4
            shift = rng.integers(0, 20)
            offs = [None] * 4 + [(int(starts[k]), int(starts[k] + len(words[k]))) for k in range(shift, shift + 40)] \
                + [None] * 4
            feats.append(_feat(f"q{q}", offs))
            S.append(rng.normal(size=L) * 3)
            E.append(rng.normal(size=L) * 3)
    S, E = np.stack(S), np.stack(E)
    for kw in ({}, {"n_best": 5, "max_len": 4}):
        preds, _, _ = postprocess_predictions(examples, feats, S, E, n_best_size=kw.get("n_best", 20),
                                              max_answer_length=kw.get("max_len", 30))
        assert preds == _oracle(examples, feats, S, E, **kw)


def test_shape_errors_and_write(tmp_path):
    ex = [{"id": "a", "context": CTX}]
    s, e = _logits(5, 5)
    with pytest.raises(ValueError, match="rows of logits"):
        postprocess_predictions(ex, [_feat("a"), _feat("a")], s[None], e[None])
    with pytest.raises(ValueError, match="not in examples"):
        postprocess_predictions(ex, [_feat("zz")], s[None], e[None])
    preds, nbest, null = postprocess_predictions(ex, [_feat("a")], s[None], e[None])
    paths = write_predictions(str(tmp_path), preds, nbest, null)
    import json
    assert json.load(open(paths["predictions"])) == {"a": "beta"}
    assert json.load(open(paths["nbest"]))["a"][0]["text"] == "beta"
