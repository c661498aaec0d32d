"""kdfast.qa.metrics: the official SQuAD v1.1 / v2.0 definitions.

Expected numbers are worked out by hand in the comments; the real-data tests compare with a
deliberately plain, independent transcription of the official definitions written below.
"""
import json
import re
import string
import time
from collections import Counter
from pathlib import Path

import pytest

from kdfast.qa.metrics import (exact_match, f1, find_best_threshold, normalize_answer, per_question_scores,
                               squad_v1_metrics, squad_v2_metrics)

SQUAD_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "squad"


# ---------------------------------------------------------------- normalisation

@pytest.mark.parametrize("text, expected", [
    ("The Big  DOG!", "big dog"),              # lower, "!" removed, "the" removed, spaces collapsed
    ("theory", "theory"),                      # "the" only as a whole word
    ("A theory of an apple", "theory of apple"),
    ("Anathema and thesis", "anathema and thesis"),
    ("  a\tb\n c  ", "b c"),                   # article "a" gone, tab/newline are whitespace
    ("U.S.A.", "usa"),
    ("Don't", "dont"),
    ("the-end", "theend"),                     # punctuation goes before articles: no article left
    ("an_apple", "anapple"),                   # "_" is in string.punctuation
    ("rock’n’roll", "rock’n’roll"),            # U+2019 is not ASCII punctuation: kept
    ("1990–1995", "1990–1995"),                # en dash kept
    ("«Hello»", "«hello»"),
    ("the’s", "’s"),                           # "’" is a non-word char, so "the" is a whole word here
    ("the's", "thes"),                         # ASCII "'" is removed first: "thes" is one word
    ("Café Ünïcode", "café ünïcode"),          # accented letters kept, lower-cased
    ("thé", "thé"),                            # "é" is a word character: no boundary after "th"
    ("", ""),
    ("The", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# ---------------------------------------------------------------- single-pair EM / F1

def test_exact_match():
    assert exact_match("The dog.", "dog") == 1.0
    assert exact_match("dogs", "dog") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("", "the") == 1.0      # both normalise to ""
    assert exact_match("rock’n’roll", "rocknroll") == 0.0


def test_f1_partial_overlap():
    # pred tokens [big, red, dog], gold [red, dog]: P = 2/3, R = 1, F1 = 2*(2/3)/(5/3) = 0.8
    assert f1("the big red dog", "red dog") == pytest.approx(0.8, abs=1e-15)
    # pred [red], gold [big, red, dog]: P = 1, R = 1/3, F1 = (2/3)/(4/3) = 0.5
    assert f1("red", "big red dog") == pytest.approx(0.5, abs=1e-15)
    assert f1("Red dog!", "red DOG") == 1.0
    assert f1("cat", "dog") == 0.0


def test_f1_duplicate_tokens_use_multiset_overlap():
    # pred {x:2, y:1}, gold {x:1, y:2, z:1}: overlap {x:1, y:1} = 2
    # P = 2/3, R = 2/4 = 1/2, F1 = 2*(1/3)/(7/6) = 4/7
    assert f1("x x y", "x y y z") == pytest.approx(4 / 7, abs=1e-15)
    # pred {x:3}, gold {x:1}: overlap 1, P = 1/3, R = 1, F1 = (2/3)/(4/3) = 0.5
    assert f1("x x x", "x") == pytest.approx(0.5, abs=1e-15)
    # "a a b": both "a" are articles, so pred tokens [b]; gold [b, b]: P = 1, R = 1/2, F1 = 2/3
    assert f1("a a b", "b b") == pytest.approx(2 / 3, abs=1e-15)


def test_f1_empty_is_zero_in_v1():
    assert f1("", "dog") == 0.0
    assert f1("dog", "") == 0.0
    assert f1("", "") == 0.0                  # v1.1: no shared token -> 0 even when both are empty
    assert f1("The", "an") == 0.0


# ---------------------------------------------------------------- v1.1 aggregate

V1_GOLDS = {
    "q1": ["the big red dog", "dog"],   # pred "red dog": F1 0.8 vs gold 1 (P=1, R=2/3), 2/3 vs gold 2 -> 0.8
    "q2": ["Eiffel tower", "tower"],    # pred "The Eiffel Tower!": EM 1, F1 1
    "q3": ["Paris"],                    # pred "": 0, 0
    "q4": ["1990"],                     # no prediction: 0, 0, still in total
}
V1_PREDS = {"q1": "red dog", "q2": "The Eiffel Tower!", "q3": "", "unknown": "ignored"}


def _records(golds):
    return [{"id": k, "answers": {"text": list(v), "answer_start": [0] * len(v)}} for k, v in golds.items()]


def _check_v1(m):
    assert m["total"] == 4
    assert m["exact_match"] == pytest.approx(100 * 1 / 4, abs=1e-12)        # 25.0
    assert m["f1"] == pytest.approx(100 * (0.8 + 1.0) / 4, abs=1e-12)      # 45.0


def test_v1_mapping_references():
    _check_v1(squad_v1_metrics(V1_PREDS, V1_GOLDS))


def test_v1_record_references():
    _check_v1(squad_v1_metrics(V1_PREDS, _records(V1_GOLDS)))


def test_v1_dataset_references():
    datasets = pytest.importorskip("datasets")
    _check_v1(squad_v1_metrics(V1_PREDS, datasets.Dataset.from_list(_records(V1_GOLDS))))


def test_v1_per_question_scores():
    em, f = per_question_scores(V1_PREDS, V1_GOLDS, version_2=False)
    assert list(em) == ["q1", "q2", "q3"]      # missing q4 left out (official get_raw_scores), order kept
    assert em == {"q1": 0.0, "q2": 1.0, "q3": 0.0}
    assert f["q1"] == pytest.approx(0.8, abs=1e-15) and f["q2"] == 1.0 and f["q3"] == 0.0


def test_v1_no_gold_answer_raises_with_id():
    with pytest.raises(ValueError, match="q_empty"):
        squad_v1_metrics({"q_empty": "x"}, {"q_ok": ["y"], "q_empty": []})


def test_bad_inputs_name_the_problem():
    with pytest.raises(TypeError, match="q1"):
        squad_v1_metrics({"q1": 3}, {"q1": ["x"]})
    with pytest.raises(TypeError, match="q1"):
        squad_v1_metrics({"q1": "x"}, {"q1": "x"})          # gold must be a list, not a string
    with pytest.raises(ValueError, match="record 1"):
        squad_v1_metrics({}, [{"id": "a", "answers": {"text": ["x"]}}, {"id": "b"}])
    with pytest.raises(ValueError, match="more than once"):
        squad_v1_metrics({}, _records({"a": ["x"]}) * 2)
    with pytest.raises(ValueError, match="empty"):
        squad_v1_metrics({}, {})


# ---------------------------------------------------------------- v2.0

V2_GOLDS = {
    "h1": ["red dog"],        # pred "red dog":  exact 1, f1 1
    "h2": ["big red dog"],    # pred "red":      exact 0, f1 0.5 (P = 1, R = 1/3)
    "n1": [],                 # pred "":         gold [""] -> exact 1, f1 1 (empty vs empty)
    "n2": [],                 # pred "blue":     exact 0, f1 0
}
V2_PREDS = {"h1": "red dog", "h2": "red", "n1": "", "n2": "blue"}


def test_v2_no_answer_scoring():
    em, f = per_question_scores(V2_PREDS, V2_GOLDS, version_2=True)
    assert em == {"h1": 1.0, "h2": 0.0, "n1": 1.0, "n2": 0.0}
    assert f == {"h1": 1.0, "h2": pytest.approx(0.5, abs=1e-15), "n1": 1.0, "n2": 0.0}


def test_v2_splits_without_na_probs():
    m = squad_v2_metrics(V2_PREDS, _records(V2_GOLDS))
    assert list(m) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
                       "NoAns_exact", "NoAns_f1", "NoAns_total"]
    assert m["total"] == 4 and m["HasAns_total"] == 2 and m["NoAns_total"] == 2
    assert m["exact"] == pytest.approx(100 * 2 / 4, abs=1e-12)              # 50
    assert m["f1"] == pytest.approx(100 * 2.5 / 4, abs=1e-12)               # 62.5
    assert m["HasAns_exact"] == pytest.approx(50.0, abs=1e-12)              # (1 + 0) / 2
    assert m["HasAns_f1"] == pytest.approx(75.0, abs=1e-12)                 # (1 + 0.5) / 2
    assert m["NoAns_exact"] == pytest.approx(50.0, abs=1e-12)
    assert m["NoAns_f1"] == pytest.approx(50.0, abs=1e-12)


def test_v2_split_keys_only_when_present():
    m = squad_v2_metrics({"h": "x"}, {"h": ["x"]})
    assert set(m) == {"exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total"}
    m = squad_v2_metrics({"n": ""}, {"n": []})
    assert set(m) == {"exact", "f1", "total", "NoAns_exact", "NoAns_f1", "NoAns_total"}
    assert m["exact"] == 100.0 and m["f1"] == 100.0


def test_v2_gold_normalising_to_empty_is_dropped():
    golds = {"q": ["The", "cat"]}
    # v2: "The" -> "" is dropped, gold list is ["cat"]; pred "" scores 0
    assert per_question_scores({"q": ""}, golds, version_2=True) == ({"q": 0.0}, {"q": 0.0})
    # v1 keeps it: normalize("") == normalize("The") == "" -> EM 1; F1 of two empty lists is 0 in v1
    assert per_question_scores({"q": ""}, golds, version_2=False) == ({"q": 1.0}, {"q": 0.0})
    # all golds empty after normalisation -> [""]; the question still counts as HasAns (answers non-empty)
    m = squad_v2_metrics({"q": ""}, {"q": ["the", "A"]})
    assert m["exact"] == 100.0 and m["f1"] == 100.0 and m["HasAns_total"] == 1 and "NoAns_total" not in m


NA = {"n1": 0.1, "h2": 0.2, "h1": 0.3, "n2": 0.8}


def test_v2_na_prob_threshold_applied():
    # thresh 0.5: only n2 (0.8 > 0.5) is predicted "no answer" -> its score becomes 1 (it has none)
    # exact: h1 1, h2 0, n1 1, n2 1 -> 75; f1: 1, 0.5, 1, 1 -> 87.5
    m = squad_v2_metrics(V2_PREDS, V2_GOLDS, na_probs=NA, na_prob_thresh=0.5)
    assert m["exact"] == pytest.approx(75.0, abs=1e-12)
    assert m["f1"] == pytest.approx(87.5, abs=1e-12)
    assert m["HasAns_exact"] == pytest.approx(50.0, abs=1e-12)
    assert m["HasAns_f1"] == pytest.approx(75.0, abs=1e-12)
    assert m["NoAns_exact"] == 100.0 and m["NoAns_f1"] == 100.0
    # thresh 0.25: h1 (0.3) and n2 (0.8) abstain -> h1 becomes 0, n2 becomes 1
    # exact: 0, 0, 1, 1 -> 50; f1: 0, 0.5, 1, 1 -> 62.5
    m = squad_v2_metrics(V2_PREDS, V2_GOLDS, na_probs=NA, na_prob_thresh=0.25)
    assert m["exact"] == pytest.approx(50.0, abs=1e-12) and m["f1"] == pytest.approx(62.5, abs=1e-12)
    # default thresh 1.0: nothing abstains -> the raw numbers (50, 62.5)
    m = squad_v2_metrics(V2_PREDS, V2_GOLDS, na_probs=NA)
    assert m["exact"] == pytest.approx(50.0, abs=1e-12) and m["f1"] == pytest.approx(62.5, abs=1e-12)


def test_v2_best_threshold_by_hand():
    # start = 2 (no-answer questions); walk in na order n1 .1, h2 .2, h1 .3, n2 .8
    # exact: n1 +0 -> 2, h2 +0 -> 2, h1 +1 -> 3 (best, thresh .3), n2 -1 ("blue") -> 2 => 3/4 = 75, .3
    # f1:    n1 +0 -> 2, h2 +.5 -> 2.5 (best, .2), h1 +1 -> 3.5 (best, .3), n2 -1 -> 2.5 => 87.5, .3
    m = squad_v2_metrics(V2_PREDS, V2_GOLDS, na_probs=NA)
    assert m["best_exact"] == pytest.approx(75.0, abs=1e-12) and m["best_exact_thresh"] == 0.3
    assert m["best_f1"] == pytest.approx(87.5, abs=1e-12) and m["best_f1_thresh"] == 0.3
    assert list(m)[-4:] == ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]
    # other probabilities: n1 .1, h2 .2, n2 .8, h1 .9
    # exact: 2, 2, 1, 2 -> never > 2 => 50, thresh 0.0 (initial);  f1: 2, 2.5 (best, .2), 1.5, 2.5 => 62.5, .2
    m = squad_v2_metrics(V2_PREDS, V2_GOLDS, na_probs={"h1": 0.9, "h2": 0.2, "n1": 0.1, "n2": 0.8})
    assert m["best_exact"] == pytest.approx(50.0, abs=1e-12) and m["best_exact_thresh"] == 0.0
    assert m["best_f1"] == pytest.approx(62.5, abs=1e-12) and m["best_f1_thresh"] == 0.2


def test_find_best_threshold_ties_follow_na_probs_order():
    scores, has = {"a": 1.0, "b": 0.0}, {"a": True, "b": False}
    preds = {"a": "x", "b": "x"}
    # start 1; order a, b: a +1 -> 2 (best, .5), b -1 -> 1 => 100 * 2 / 2 = 100, 0.5
    assert find_best_threshold(preds, {"a": 0.5, "b": 0.5}, scores, has) == (100.0, 0.5)
    # order b, a: b -1 -> 0, a +1 -> 1, not strictly greater than 1 => 50, 0.0
    assert find_best_threshold(preds, {"b": 0.5, "a": 0.5}, scores, has) == (50.0, 0.0)


def test_find_best_threshold_uses_raw_prediction_string():
    # "The" normalises to "" so it scores 1 on a no-answer question, but the search tests the raw
    # string (official): diff -1 -> 0 < start 1 => 100 * 1 / 1, thresh 0.0
    em, _ = per_question_scores({"n": "The"}, {"n": []}, version_2=True)
    assert em == {"n": 1.0}
    assert find_best_threshold({"n": "The"}, {"n": 0.4}, em, {"n": False}) == (100.0, 0.0)
    # an empty prediction: diff 0 -> stays 1 => 100, 0.0 (never strictly greater)
    assert find_best_threshold({"n": ""}, {"n": 0.4}, em, {"n": False}) == (100.0, 0.0)


def test_find_best_threshold_counts_like_the_official_script():
    # the start counts every no-answer question in has_answer (n, though unscored), the
    # denominator is len(scores) = 1: start 1, n skipped (not scored), a +1 -> 2 (best, .3)
    # => 100 * 2 / 1 = 200 (why squad_v2_metrics passes only the scored questions)
    got = find_best_threshold({"a": "x"}, {"a": 0.3, "n": 0.1}, {"a": 1.0}, {"a": True, "n": False})
    assert got == (200.0, 0.3)
    with pytest.raises(ValueError, match="empty"):
        find_best_threshold({}, {}, {}, {})


def test_v2_missing_prediction_counts_zero():
    golds = {"h": ["x"], "n": []}
    m = squad_v2_metrics({"h": "x"}, golds, na_probs={"h": 0.2})
    # exact: h 1, n missing 0 -> 50; NoAns exact 0 over 1 question
    assert m["total"] == 2 and m["exact"] == 50.0 and m["NoAns_exact"] == 0.0 and m["NoAns_total"] == 1
    # search over predicted {h}: start 0, h +1 -> 1 (best, .2) => 100 * 1 / 2 questions = 50
    assert m["best_exact"] == 50.0 and m["best_exact_thresh"] == 0.2
    with pytest.raises(ValueError, match="'h'"):
        squad_v2_metrics({"h": "x"}, golds, na_probs={"n": 0.2})


# ---------------------------------------------------------------- real data, independent oracle
# A plain transcription of the official definitions; shares nothing with kdfast.qa.metrics.

def _oracle_norm(s):
    s = s.lower()
    kept = []
    for ch in s:
        if ch not in string.punctuation:
            kept.append(ch)
    s = "".join(kept)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _oracle_f1(pred, gold, v2):
    p, g = _oracle_norm(pred).split(), _oracle_norm(gold).split()
    if v2 and (len(p) == 0 or len(g) == 0):
        return int(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0
    prec, rec = 1.0 * same / len(p), 1.0 * same / len(g)
    return (2 * prec * rec) / (prec + rec)


def _oracle_v1(golds, preds):
    em = f = 0
    for qid, answers in golds.items():
        if qid in preds:
            em += max(_oracle_norm(preds[qid]) == _oracle_norm(a) for a in answers)
            f += max(_oracle_f1(preds[qid], a, False) for a in answers)
    return 100.0 * em / len(golds), 100.0 * f / len(golds)


def _oracle_v2(golds, preds, na, thresh):
    has = {q: len(a) > 0 for q, a in golds.items()}
    em, f = {}, {}
    for q, answers in golds.items():
        gl = [a for a in answers if _oracle_norm(a)] or [""]
        em[q] = max(int(_oracle_norm(a) == _oracle_norm(preds[q])) for a in gl)
        f[q] = max(_oracle_f1(preds[q], a, True) for a in gl)
    out = {}
    for key, raw in (("exact", em), ("f1", f)):
        th = {q: (float(not has[q]) if na[q] > thresh else s) for q, s in raw.items()}
        out[key] = 100.0 * sum(th.values()) / len(th)
        for name, qs in (("HasAns", [q for q in has if has[q]]), ("NoAns", [q for q in has if not has[q]])):
            out[f"{name}_{key}"] = 100.0 * sum(th[q] for q in qs) / len(qs)
            out[f"{name}_total"] = len(qs)
        cur = best = sum(1 for q in has if not has[q])
        best_t = 0.0
        for q in sorted(na, key=lambda k: na[k]):
            cur += raw[q] if has[q] else (-1 if preds[q] else 0)
            if cur > best:
                best, best_t = cur, na[q]
        out[f"best_{key}"], out[f"best_{key}_thresh"] = 100.0 * best / len(raw), best_t
    out["total"] = len(golds)
    return out


@pytest.fixture(scope="module")
def dev_golds():
    path = SQUAD_DIR / "dev-v1.1.json"
    if not path.exists():
        pytest.skip(f"SQuAD dev set not found at {path}")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)["data"]
    return {qa["id"]: [a["text"] for a in qa["answers"]]
            for art in data for par in art["paragraphs"] for qa in par["qas"]}


def _perturbed(golds):
    preds = {}
    for i, (qid, answers) in enumerate(golds.items()):
        if i % 3 == 0:
            preds[qid] = ""
        elif i % 3 == 1:
            preds[qid] = " ".join(answers[0].split()[:-1])
        else:
            preds[qid] = answers[0]
    return preds


def test_real_dev_gold_first_answer_is_perfect(dev_golds):
    assert len(dev_golds) == 10570
    m = squad_v1_metrics({q: a[0] for q, a in dev_golds.items()}, dev_golds)
    assert m == {"exact_match": 100.0, "f1": 100.0, "total": 10570}


def test_real_dev_perturbed_matches_oracle_and_is_fast(dev_golds):
    preds = _perturbed(dev_golds)
    want_em, want_f1 = _oracle_v1(dev_golds, preds)
    t0 = time.perf_counter()
    m = squad_v1_metrics(preds, dev_golds)
    elapsed = time.perf_counter() - t0
    assert m["total"] == 10570
    assert abs(m["exact_match"] - want_em) < 1e-9 and abs(m["f1"] - want_f1) < 1e-9
    assert 30.0 < m["exact_match"] < 90.0      # the perturbation really costs something
    assert elapsed < 2.0, f"squad_v1_metrics took {elapsed:.2f}s on the dev set"
    # the HF record layout gives the same numbers
    m2 = squad_v1_metrics(preds, _records(dev_golds))
    assert m2 == m


def test_real_dev_as_v2_matches_oracle(dev_golds):
    # every 5th question made unanswerable; na probs on a coarse grid so there are many ties
    golds = {q: ([] if i % 5 == 0 else a) for i, (q, a) in enumerate(dev_golds.items())}
    preds = _perturbed(dev_golds)
    na = {q: ((i * 7) % 11) / 10 for i, q in enumerate(golds)}
    want = _oracle_v2(golds, preds, na, 0.45)
    got = squad_v2_metrics(preds, golds, na_probs=na, na_prob_thresh=0.45)
    assert set(got) == set(want)
    for k in want:
        assert abs(got[k] - want[k]) < 1e-9, k
