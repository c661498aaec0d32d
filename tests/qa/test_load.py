"""kdfast.qa.load: SQuAD JSON / flattened JSON / JSON lines -> HF-layout datasets.Dataset, validation
errors that locate the record, fix_spans, writers (round trips), counts, the offline hub error and the
real SQuAD v1.1 files."""
import copy
import json
import logging
import time
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from kdfast.qa import load as L  # noqa: E402
from kdfast.qa.load import (  # noqa: E402
    SquadFormatError, count_questions, load_squad, squad_features, write_jsonl, write_squad_json)

SQUAD_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "squad"

C1 = "The cat sat on the mat. Later the cat ran away from the dog."
C2 = "Paris is the capital of France. It lies on the Seine."
C3 = "Bees make honey. Honey is sweet."


def _rec(qid, title, context, question, texts):
    return {"id": qid, "title": title, "context": context, "question": question,
            "answers": {"text": list(texts), "answer_start": [context.index(t) for t in texts]}}


def _records():
    return [
        _rec("q1", "Animals", C1, "Who sat on the mat?", ["The cat"]),
        _rec("q2", "Animals", C1, "What did the cat run from?", ["the dog", "dog"]),
        _rec("q3", "Animals", C3, "What do bees make?", ["honey"]),
        _rec("q4", "Places", C2, "What is the capital of France?", ["Paris"]),
    ]


def _v2_records():
    recs = _records()
    for r in recs:
        r["is_impossible"] = False
    recs.insert(2, {"id": "u1", "title": "Animals", "context": C1, "question": "What colour is the mat?",
                    "answers": {"text": [], "answer_start": []}, "is_impossible": True})
    return recs


def _nested(records, version="1.1", v2=False):
    """The official nested layout, built by hand (independently of write_squad_json)."""
    data = []
    for r in records:
        if not data or data[-1]["title"] != r["title"]:
            data.append({"title": r["title"], "paragraphs": []})
        paras = data[-1]["paragraphs"]
        if not paras or paras[-1]["context"] != r["context"]:
            paras.append({"context": r["context"], "qas": []})
        qa = {"id": r["id"], "question": r["question"],
              "answers": [{"text": t, "answer_start": s}
                          for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}
        if v2:
            qa["is_impossible"] = r["is_impossible"]
            if r["is_impossible"]:
                qa["plausible_answers"] = [{"text": "the mat", "answer_start": C1.index("the mat")}]
        paras[-1]["qas"].append(qa)
    return {"version": version, "data": data}


def _write(path, obj, indent=None):
    path.write_text(json.dumps(obj, indent=indent), encoding="utf-8")
    return path


def _write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _all_formats(tmp_path, records, nested):
    return {
        "nested": _write(tmp_path / "nested.json", nested),
        "nested_pretty": _write(tmp_path / "pretty.json", nested, indent=2),
        "flat_list": _write(tmp_path / "list.json", records, indent=1),
        "flat_data": _write(tmp_path / "data.json", {"version": "x", "data": records}),
        "jsonl": _write_lines(tmp_path / "recs.jsonl", records),
        "jsonl_named_json": _write_lines(tmp_path / "lines.json", records),  # detected from content
    }


# -- formats ---------------------------------------------------------------------------------------
def test_every_format_loads_the_same_dataset(tmp_path):
    recs = _records()
    for name, path in _all_formats(tmp_path, recs, _nested(recs)).items():
        ds = load_squad(path)
        assert isinstance(ds, datasets.Dataset), name
        assert ds.features == squad_features(False), name
        assert ds.column_names == ["id", "title", "context", "question", "answers"], name
        assert ds.to_list() == recs, name


def test_v2_formats_have_is_impossible_and_ignore_plausible_answers(tmp_path):
    recs = _v2_records()
    for name, path in _all_formats(tmp_path, recs, _nested(recs, "v2.0", v2=True)).items():
        ds = load_squad(path)
        assert ds.features == squad_features(True), name
        assert ds.to_list() == recs, name
        u = ds[2]
        assert u["id"] == "u1" and u["is_impossible"] is True
        assert u["answers"] == {"text": [], "answer_start": []}
    with pytest.raises(SquadFormatError, match=r"version_2=False"):
        load_squad(tmp_path / "nested.json", version_2=False)
    # answerable-only v2 data with version_2=False: loads as v1 (no column)
    only = [r for r in recs if not r["is_impossible"]]
    ds = load_squad(_write(tmp_path / "v2ok.json", _nested(only, "v2.0", v2=True)), version_2=False)
    assert "is_impossible" not in ds.column_names and len(ds) == 4


def test_version_2_true_allows_v1_records_without_answers(tmp_path):
    recs = _records()
    recs[1]["answers"] = {"text": [], "answer_start": []}
    path = _write_lines(tmp_path / "noans.jsonl", recs)
    with pytest.raises(SquadFormatError, match=r"no answers.*version_2=True"):
        load_squad(path)
    ds = load_squad(path, version_2=True)
    assert ds["is_impossible"] == [False, True, False, False]
    # v2-style because another record carries is_impossible
    recs[3]["is_impossible"] = False
    ds = load_squad(_write_lines(tmp_path / "mixed.jsonl", recs))
    assert ds["is_impossible"] == [False, True, False, False]


def test_mapping_gives_datasetdict_and_split_selects(tmp_path):
    recs = _records()
    tr = _write(tmp_path / "train.json", _nested(recs[:3]))
    va = _write_lines(tmp_path / "dev.jsonl", recs[3:])
    dd = load_squad({"train": tr, "validation": va})
    assert isinstance(dd, datasets.DatasetDict) and set(dd) == {"train", "validation"}
    assert dd["train"].to_list() == recs[:3] and dd["validation"].to_list() == recs[3:]
    one = load_squad({"train": tr, "validation": va}, split="validation")
    assert isinstance(one, datasets.Dataset) and one["id"] == ["q4"]
    with pytest.raises(FileNotFoundError, match="'test'"):
        load_squad({"test": tmp_path / "nope.json"})


def test_cache_dir_builds_on_disk_same_rows_and_tracks_file_changes(tmp_path):
    recs = _records()
    path = _write(tmp_path / "n.json", _nested(recs))
    cache = tmp_path / "cache"
    ds = load_squad(path, cache_dir=str(cache))
    assert ds.cache_files and str(cache) in ds.cache_files[0]["filename"]
    assert ds.to_list() == recs and ds.features == squad_features(False)
    again = load_squad(path, cache_dir=str(cache))
    assert again.cache_files == ds.cache_files
    recs[0]["question"] = "Who was on the mat?"
    _write(path, _nested(recs))
    changed = load_squad(path, cache_dir=str(cache))
    assert changed[0]["question"] == "Who was on the mat?"


def test_large_files_go_through_from_generator(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "IN_MEMORY_MAX_QUESTIONS", 2)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    recs = _v2_records()
    ds = load_squad(_write_lines(tmp_path / "big.jsonl", recs))
    assert ds.cache_files and ds.to_list() == recs


# -- errors ------------------------------------------------------------------------------------------
def _q(doc, a, p, q):
    return doc["data"][a]["paragraphs"][p]["qas"][q]


LOC_Q2 = ["article 0 'Animals'", "paragraph 0", "question 1", "'q2'"]
ERRORS = {
    "missing question": (lambda d: _q(d, 0, 0, 1).pop("question"), LOC_Q2 + ["missing field 'question'"]),
    "missing answers": (lambda d: _q(d, 0, 0, 1).pop("answers"), LOC_Q2 + ["missing field 'answers'"]),
    "missing id": (lambda d: _q(d, 0, 1, 0).pop("id"), ["article 0 'Animals'", "paragraph 1", "question 0",
                                                       "missing field 'id'"]),
    "missing context": (lambda d: d["data"][1]["paragraphs"][0].pop("context"),
                        ["article 1 'Places'", "paragraph 0", "missing field 'context'"]),
    "missing title": (lambda d: d["data"][1].pop("title"), ["article 1", "missing field 'title'"]),
    "question type": (lambda d: _q(d, 0, 0, 1).update(question=7), LOC_Q2 + ["'question' must be str, got int"]),
    "start type": (lambda d: _q(d, 0, 0, 1)["answers"][0].update(answer_start="33"),
                   LOC_Q2 + ["answer 0", "answer_start must be int, got str"]),
    "is_impossible type": (lambda d: _q(d, 0, 0, 1).update(is_impossible="no"),
                           LOC_Q2 + ["'is_impossible' must be bool"]),
    "empty context": (lambda d: d["data"][1]["paragraphs"][0].update(context="  \n "),
                      ["article 1 'Places'", "paragraph 0", "empty context"]),
    "empty question": (lambda d: _q(d, 0, 0, 1).update(question=" \t"), LOC_Q2 + ["empty question"]),
    "duplicate id": (lambda d: _q(d, 1, 0, 0).update(id="q2"),
                     ["duplicate id 'q2'", "article 1 'Places', paragraph 0, question 0",
                      "first seen at article 0 'Animals', paragraph 0, question 1"]),
    "text not at start": (lambda d: _q(d, 0, 0, 1)["answers"][0].update(answer_start=4),
                          LOC_Q2 + ["answer 0", "not at answer_start 4", "expected 'the dog'", "found 'cat sat'"]),
    "outside context": (lambda d: _q(d, 0, 0, 1)["answers"][1].update(answer_start=500),
                        LOC_Q2 + ["answer 1", "answer_start 500 is outside the context (length 60)"]),
    "negative start": (lambda d: _q(d, 0, 0, 1)["answers"][0].update(answer_start=-2),
                       LOC_Q2 + ["negative answer_start -2"]),
    "empty answer": (lambda d: _q(d, 0, 0, 1)["answers"][0].update(text=" "), LOC_Q2 + ["empty answer text"]),
    "v1 no answers": (lambda d: _q(d, 0, 0, 1).update(answers=[]), LOC_Q2 + ["no answers", "version_2=True"]),
    "unanswerable with answers": (lambda d: _q(d, 0, 0, 1).update(is_impossible=True),
                                  LOC_Q2 + ["unanswerable", "is_impossible", "still has answers (2)"]),
    "answerable without answers": (lambda d: _q(d, 0, 0, 1).update(answers=[], is_impossible=False),
                                   LOC_Q2 + ["no answers but is_impossible is false"]),
}


SPAN_CASES = ("text not at start", "outside context", "negative start")  # fix_spans repairs these


@pytest.mark.parametrize("case,fix", [(c, False) for c in sorted(ERRORS)]
                         + [(c, True) for c in sorted(ERRORS) if c not in SPAN_CASES])
def test_bad_nested_record_names_file_record_and_problem(tmp_path, case, fix):
    mutate, words = ERRORS[case]
    doc = _nested(_records())
    mutate(doc)
    path = _write(tmp_path / "bad_file.json", doc)
    with pytest.raises(SquadFormatError) as ei:
        load_squad(path, fix_spans=fix)
    msg = str(ei.value)
    assert "bad_file.json" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_long_texts_are_truncated_in_the_message(tmp_path):
    long_ctx = "x" * 30 + "A" * 100 + " and " + "B" * 100
    rec = {"id": "L1", "title": "T", "context": long_ctx, "question": "q?",
           "answers": {"text": ["B" * 60], "answer_start": [30]}}
    with pytest.raises(SquadFormatError) as ei:
        load_squad(_write_lines(tmp_path / "long.jsonl", [rec]))
    msg = str(ei.value)
    assert "expected '" + "B" * 40 + "...'" in msg and "found '" + "A" * 40 + "...'" in msg
    assert "B" * 41 not in msg


def test_json_lines_errors_name_the_line(tmp_path):
    recs = _records()
    bad = copy.deepcopy(recs)
    bad[2]["context"] = ""
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in bad[:2]) + "\n\n" + json.dumps(bad[2]) + "\n")
    with pytest.raises(SquadFormatError, match=r"bad\.jsonl: line 4 \(id 'q3'\): empty context"):
        load_squad(path)
    path.write_text(json.dumps(recs[0]) + "\n{not json\n")
    with pytest.raises(SquadFormatError, match=r"bad\.jsonl: line 2: not valid JSON"):
        load_squad(path)
    bad = copy.deepcopy(recs)
    bad[3]["id"] = "q1"
    with pytest.raises(SquadFormatError, match=r"line 4 \(id 'q1'\): duplicate id 'q1': first seen at line 1"):
        load_squad(_write_lines(path, bad))


def test_flat_json_errors_name_the_record(tmp_path):
    bad = _records()
    bad[1]["answers"] = {"text": ["dog"], "answer_start": []}
    with pytest.raises(SquadFormatError, match=r"flat\.json: record 1 \(id 'q2'\): answers has 1 texts but 0"):
        load_squad(_write(tmp_path / "flat.json", {"data": bad}))
    bad = _records()
    del bad[3]["question"]
    with pytest.raises(SquadFormatError, match=r"flat\.json: record 3 \(id 'q4'\): missing field 'question'"):
        load_squad(_write(tmp_path / "flat.json", bad))


def test_unrecognised_and_missing_files(tmp_path):
    with pytest.raises(SquadFormatError, match=r"odd\.json: not a SQuAD file"):
        load_squad(_write(tmp_path / "odd.json", {"rows": []}))
    (tmp_path / "empty.json").write_text("\n \n")
    with pytest.raises(SquadFormatError, match=r"empty\.json: the file is empty"):
        load_squad(tmp_path / "empty.json")
    (tmp_path / "broken.json").write_text('{"data": [\n  {"title": "x",\n')
    with pytest.raises(SquadFormatError, match=r"broken\.json: not valid JSON.*line \d+"):
        load_squad(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_squad(str(tmp_path / "nothere.json"))


# -- fix_spans ---------------------------------------------------------------------------------------
FOX = "red fox. blue fox. green fox. The end."  # "fox" at 4, 14, 25


def _fox_doc():
    return {"version": "1.1", "data": [{"title": "Fox", "paragraphs": [{"context": FOX, "qas": [
        {"id": "f1", "question": "Which animal?",
         "answers": [{"text": "fox", "answer_start": 12}, {"text": "wolf", "answer_start": 3},
                     {"text": "red", "answer_start": 0}]},
        {"id": "f2", "question": "Which wolf?", "answers": [{"text": "wolf", "answer_start": 9}]},
        {"id": "f3", "question": "Which tie?", "answers": [{"text": "fox", "answer_start": 9}]},
        {"id": "f4", "question": "The?", "answers": [{"text": "The end", "answer_start": 30}]},
        {"id": "f5", "question": "Neg?", "answers": [{"text": "green", "answer_start": -1}]},
        {"id": "f6", "question": "Far?", "answers": [{"text": "end", "answer_start": 999}]},
    ]}]}]}


def test_fix_spans_relocates_to_nearest_and_drops_missing(tmp_path, caplog):
    path = _write(tmp_path / "fox.json", _fox_doc())
    with pytest.raises(SquadFormatError, match=r"fox\.json: article 0 'Fox', paragraph 0, question 0 "
                                               r"\(id 'f1'\): answer 0: text not at answer_start 12"):
        load_squad(path)
    with caplog.at_level(logging.INFO, logger="kdfast.qa.load"), \
            pytest.warns(UserWarning, match=r"relocated 4 answers.*dropped 2 answers.*1 questions"):
        ds = load_squad(path, fix_spans=True)
    assert L.last_fix_report == {"fixed": 4, "dropped_answers": 2, "dropped_questions": 1, "file": str(path)}
    assert any(r.levelno == logging.WARNING and "fox.json" in r.getMessage() for r in caplog.records)
    rows = {r["id"]: r["answers"] for r in ds}
    assert set(rows) == {"f1", "f3", "f4", "f5", "f6"}  # f2 had only the absent "wolf"
    assert rows["f1"] == {"text": ["fox", "red"], "answer_start": [14, 0]}  # 14 is nearest to 12 (4, 14, 25)
    assert rows["f3"] == {"text": ["fox"], "answer_start": [4]}  # 4 and 14 tie around 9: the earlier
    assert rows["f4"] == {"text": ["The end"], "answer_start": [30]}  # untouched
    assert rows["f5"]["answer_start"] == [19] and rows["f6"]["answer_start"] == [34]  # bad offsets relocated
    for r in ds:
        for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"]):
            assert FOX[s:s + len(t)] == t


def test_fix_spans_clean_file_reports_zero_without_warning(tmp_path, recwarn):
    path = _write(tmp_path / "clean.json", _nested(_records()))
    ds = load_squad(path, fix_spans=True)
    assert len(ds) == 4 and not [w for w in recwarn if "fix_spans" in str(w.message)]
    assert L.last_fix_report == {"fixed": 0, "dropped_answers": 0, "dropped_questions": 0, "file": str(path)}


def test_fix_spans_report_over_a_mapping(tmp_path):
    path = _write(tmp_path / "fox.json", _fox_doc())
    clean = _write(tmp_path / "clean.json", _nested(_records()))
    with pytest.warns(UserWarning):
        load_squad({"train": path, "validation": clean}, fix_spans=True)
    r = L.last_fix_report
    assert (r["fixed"], r["dropped_answers"], r["dropped_questions"]) == (4, 2, 1)
    assert r["splits"]["train"]["file"] == str(path) and r["splits"]["validation"]["fixed"] == 0


# -- writers and counts ------------------------------------------------------------------------------
def test_write_squad_json_round_trip_and_grouping(tmp_path):
    recs = _records()
    out = write_squad_json(recs, tmp_path / "sub" / "w.json")
    doc = json.loads(out.read_text())
    assert doc["version"] == "1.1" and [a["title"] for a in doc["data"]] == ["Animals", "Places"]
    assert [len(p["qas"]) for p in doc["data"][0]["paragraphs"]] == [2, 1]
    ds = load_squad(out)
    assert ds.to_list() == recs
    again = write_squad_json(ds, tmp_path / "w2.json")  # from a Dataset
    assert json.loads(again.read_text()) == doc
    recs[0]["answers"] = {"text": [], "answer_start": []}
    with pytest.raises(ValueError, match=r"record 0 \(id 'q1'\) has no answers.*version='2.0'"):
        write_squad_json(recs, tmp_path / "v1bad.json")


def test_write_squad_json_v2_round_trip(tmp_path):
    recs = _v2_records()
    out = write_squad_json(recs, tmp_path / "v2.json", version="v2.0")
    qa = json.loads(out.read_text())["data"][0]["paragraphs"][0]["qas"]
    assert [q["is_impossible"] for q in qa] == [False, False, True] and qa[2]["answers"] == []
    assert load_squad(out).to_list() == recs
    topic = [dict(r, topic=r.pop("title")) for r in _records()]
    ds = load_squad(write_squad_json(topic, tmp_path / "topic.json", title_field="topic"))
    assert ds["title"] == ["Animals"] * 3 + ["Places"]


def test_write_jsonl_round_trip(tmp_path):
    for recs in (_records(), _v2_records()):
        out = write_jsonl(recs, tmp_path / "r.jsonl")
        assert len(out.read_text().splitlines()) == len(recs)
        ds = load_squad(out)
        assert ds.to_list() == recs
        assert load_squad(write_jsonl(ds, tmp_path / "r2.jsonl")).to_list() == recs


def test_count_questions(tmp_path):
    recs = _v2_records()
    recs.append(_rec("q5", "Animals", C1, "Where did the cat sit?", ["the mat"]))  # C1 again, not adjacent
    ds = load_squad(_write_lines(tmp_path / "c.jsonl", recs))
    want = {"questions": 6, "answers": 6, "unanswerable": 1, "articles": 2, "paragraphs": 4,
            "distinct_paragraphs": 3}
    assert count_questions(ds) == want
    assert count_questions(recs) == want
    assert count_questions(ds.select([0, 1]))["questions"] == 2
    assert count_questions(datasets.DatasetDict(a=ds))["a"] == want


# -- hub ---------------------------------------------------------------------------------------------
def test_hub_name_offline_gives_a_clear_error(monkeypatch):
    calls = []

    def offline(name, **kw):
        calls.append((name, kw))
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"'squad_v2'.*Hub is unreachable.*local file path") as ei:
        load_squad("squad_v2", split="validation")
    assert isinstance(ei.value.__cause__, ConnectionError)
    assert calls == [("squad_v2", {"split": "validation"})]
    assert L.last_fix_report is None


def test_hub_other_errors_pass_through_and_paths_never_reach_the_hub(monkeypatch, tmp_path):
    def missing(name, **kw):
        raise ValueError("no such dataset")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(ValueError, match="no such dataset"):
        load_squad("no-such-dataset-name")
    with pytest.raises(FileNotFoundError):
        load_squad("some/dir/train.json")  # looks like a file: no hub call


# -- real SQuAD v1.1 ---------------------------------------------------------------------------------
def _real(name):
    path = SQUAD_DIR / name
    if not path.is_file():
        pytest.skip(f"real SQuAD file absent: {path}")
    t = time.perf_counter()
    ds = load_squad(path)
    dt = time.perf_counter() - t
    print(f"load_squad({name}): {len(ds)} questions in {dt:.2f} s")
    return ds, dt


def _every_answer_at_its_start(ds):
    for r in ds:
        c = r["context"]
        for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"]):
            assert c[s:s + len(t)] == t, r["id"]


def test_real_train_du():
    ds, dt = _real("train-du-v1.1.json")
    n = count_questions(ds)
    assert (n["articles"], n["paragraphs"], n["questions"], n["answers"]) == (44, 2430, 11877, 11877)
    assert n["unanswerable"] == 0 and "is_impossible" not in ds.column_names
    assert all(len(a["text"]) == 1 for a in ds["answers"])
    _every_answer_at_its_start(ds)
    assert dt < 30


def test_real_dev():
    ds, dt = _real("dev-v1.1.json")
    n = count_questions(ds)
    assert (n["articles"], n["paragraphs"], n["questions"]) == (48, 2067, 10570)
    print(f"dev-v1.1.json: {n['answers']} answers")
    assert n["answers"] > 30000 and n["unanswerable"] == 0
    assert min(len(a["text"]) for a in ds["answers"]) >= 1
    _every_answer_at_its_start(ds)
    assert dt < 30
