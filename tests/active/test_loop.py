"""The active-learning loop end to end on a tiny BERT and a 60-question synthetic pool.

Pool scoring per question, loop invariants, kill-and-resume after every stage,
the annotator round trip, kd_on_pool positions, the plot, the CLI and 2-process
(gloo) sharded scoring against a 1-process run.
"""
import json
import os
import pickle

import numpy as np
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kdfast.active.loop import IGNORE_POSITION, ALConfig, ActiveLearningLoop  # noqa: E402
from kdfast.active.pool import score_pool, select_queries  # noqa: E402
from kdfast.active.strategies import get_strategy  # noqa: E402
from kdfast.distill.stage import TrainOptions  # noqa: E402

L_MAX, STRIDE = 128, 48
PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from datasets import Dataset
    from kdfast.distill.student import student_from_config
    from kdfast.qa.configs import teacher_config
    from kdfast.qa.load import write_jsonl
    from kdfast.qa.synthetic import generate_squad
    from kdfast.qa.tokenizer import train_wordpiece_tokenizer
    root = tmp_path_factory.mktemp("al")
    d = generate_squad(60, 16, seed=0)
    texts = [r["context"] for r in d["train"] + d["validation"]] + [r["question"] for r in d["train"]]
    tok = train_wordpiece_tokenizer(texts, vocab_size=800)
    cfg = teacher_config(tok, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    dirs = {}
    for name, seed in (("teacher", 0), ("student", 1)):
        dirs[name] = str(root / name)
        student_from_config(cfg, attn_implementation="kdfast", seed=seed).save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    write_jsonl(d["train"], root / "pool.jsonl")
    write_jsonl(d["validation"], root / "dev.jsonl")
    return {"pool": Dataset.from_list(d["train"]), "dev": Dataset.from_list(d["validation"]), "tok": tok,
            "root": root, **dirs}


def _config(out, **kw):
    train = TrainOptions(num_train_epochs=1, max_steps=2, per_device_train_batch_size=16, learning_rate=1e-3,
                         logging_steps=1000, disable_tqdm=True)
    base = dict(strategy="margin", seed_size=10, query_size=8, budget=23, student_layers="1", train=train,
                max_seq_length=L_MAX, doc_stride=STRIDE, mc_passes=2, progress=False)
    base.update(kw)
    return ALConfig(str(out), **base)


def _loop(data, out, **kw):
    return ActiveLearningLoop(_config(out, **kw), data["pool"], data["dev"], data["tok"], teacher_dir=data["teacher"])


def _load(path):
    from kdfast.distill.models import load_qa_model
    return load_qa_model(path, attn_implementation="kdfast")


# ------------------------------------------------------------------ pool scoring
def test_score_pool_is_per_question(data):
    from kdfast.distill.models import inference_ready
    from kdfast.distill.teacher_cache import TeacherCache
    from kdfast.qa.evaluate import predict_logits
    from kdfast.qa.features import eval_features, train_features, windows_per_example
    from kdfast.qa.postprocess import postprocess_predictions
    tok, pool = data["tok"], data["pool"].select(range(20))
    student, teacher = _load(data["student"]), _load(data["teacher"])
    windows = eval_features(pool, tok, max_seq_length=L_MAX, doc_stride=STRIDE)
    groups = windows_per_example(windows)
    assert max(len(g) for g in groups.values()) >= 2, "the fixture must have questions with several windows"
    rng_before = torch.get_rng_state()
    view = score_pool(student, tok, pool, pool_windows=windows, labeled_questions=data["pool"].select(range(20, 25)),
                      teacher=teacher, strategy="disagreement", fields=("nbest", "embeddings", "mc_nbest"),
                      mc_passes=2, max_seq_length=L_MAX, doc_stride=STRIDE, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before), "MC dropout must not move the global RNG"
    assert not student.training, "the model's mode is restored (eval after load)"
    ids = list(pool["id"])
    assert view.ids == ids and list(view.nbest) == ids
    # n-best: exactly post-processing over all windows of a question
    s, e = predict_logits(inference_ready(_load(data["student"])), windows, tok, progress=False)
    _, nbest, _ = postprocess_predictions(pool, windows, s, e)
    for q in ids:
        assert [x["text"] for x in view.nbest[q]] == [x["text"] for x in nbest[q]]
        np.testing.assert_allclose([x["probability"] for x in view.nbest[q]],
                                   [x["probability"] for x in nbest[q]], rtol=1e-5, atol=1e-7)
    # per-window logits over CLS + context, one entry per window of the question
    for q in ids:
        assert len(view.student_logits[q]) == len(groups[q]) == len(view.teacher_logits[q])
        for (ss, se), row in zip(view.student_logits[q], groups[q]):
            n = windows[row]["context_end"] - windows[row]["context_start"] + 2
            assert ss.shape == se.shape == (n,) and np.isfinite(ss).all()
    # teacher logits from the cache equal the live teacher's
    cache = TeacherCache.build(teacher, train_features(pool, tok, max_seq_length=L_MAX, doc_stride=STRIDE), tok,
                               str(data["root"] / "tc_score"), progress=False)
    from_cache = score_pool(student, tok, pool, pool_windows=windows, teacher_logits=cache,
                            strategy="disagreement", progress=False)
    for q in ids:
        for (a0, a1), (b0, b1) in zip(view.teacher_logits[q], from_cache.teacher_logits[q]):
            np.testing.assert_allclose(a0, b0, atol=1e-4)
            np.testing.assert_allclose(a1, b1, atol=1e-4)
    # embeddings: mean of the last hidden state over the first window's context tokens
    assert view.embeddings.shape == (20, 32) and view.embeddings.dtype == np.float32
    assert view.labeled_embeddings.shape == (5, 32)
    w0 = windows[groups[ids[3]][0]]
    with torch.no_grad():
        h = _load(data["student"]).bert(input_ids=torch.tensor([w0["input_ids"]]),
                                        token_type_ids=torch.tensor([w0["token_type_ids"]])).last_hidden_state[0]
    want = h[w0["context_start"]:w0["context_end"] + 1].mean(0).numpy()
    np.testing.assert_allclose(view.embeddings[3], want, atol=1e-4)
    # MC dropout: T passes, dropout really active (the passes differ somewhere)
    assert len(view.mc_nbest) == 2 and all(list(p) == ids for p in view.mc_nbest)
    probs = [[x["probability"] for q in ids for x in p[q][:1]] for p in view.mc_nbest]
    assert not np.allclose(probs[0], probs[1])
    assert np.isfinite(get_strategy("disagreement").score(view)).all()


def test_score_pool_errors(data):
    with pytest.raises(ValueError, match="grad_embeddings"):
        score_pool(_load(data["student"]), data["tok"], data["pool"].select(range(3)), strategy="badge")
    with pytest.raises(ValueError, match="teacher"):
        score_pool(_load(data["student"]), data["tok"], data["pool"].select(range(3)), strategy="disagreement")
    with pytest.raises(ValueError, match="available"):
        score_pool(_load(data["student"]), data["tok"], data["pool"].select(range(3)), strategy="nope")


# ------------------------------------------------------------------ the loop
class Killed(RuntimeError):
    pass


def _kill_everywhere(monkeypatch):
    """Raise once after every (round, stage): every stage boundary sees a kill."""
    seen = []

    def hook(self, name):
        key = (self.state["round"], name)
        if key not in seen:
            seen.append(key)
            raise Killed(str(key))
    monkeypatch.setattr(ActiveLearningLoop, "_after_stage", hook)
    return seen


def _metrics(rounds):
    return [(r["round"], r["labeled"], r["exact_match"], r["f1"], r.get("queried")) for r in rounds]


def test_loop_invariants_and_resume_after_every_stage(data, tmp_path, monkeypatch):
    ref = _loop(data, tmp_path / "a").run()
    assert ref["status"] == "done"
    lab = ref["labeled"]
    all_ids = list(data["pool"]["id"])
    assert len(lab) == 23 and len(set(lab)) == 23, "budget reached exactly, no duplicates"
    loop = _loop(data, tmp_path / "a")
    assert sorted(loop.labeled_ids + loop.pool_ids) == sorted(all_ids)
    assert [r["labeled"] for r in ref["rounds"]] == [10, 18, 23], "the last query is truncated to the budget"
    assert [r.get("queried") for r in ref["rounds"]] == [8, 5, None]
    assert all(r["pool_questions_per_s"] > 0 for r in ref["rounds"][:-1])
    log = json.loads((tmp_path / "a" / "al_log.json").read_text())
    assert [r["f1"] for r in log["rounds"]] == [r["f1"] for r in ref["rounds"]]
    assert "| 2 | 23 |" in (tmp_path / "a" / "al_results.md").read_text()
    assert (tmp_path / "a" / "al_curve.png").read_bytes()[:8] == PNG
    assert loop.run()["labeled"] == lab, "run() on a finished output_dir changes nothing"

    seen = _kill_everywhere(monkeypatch)
    kills = 0
    while True:
        try:
            out = _loop(data, tmp_path / "b").run()  # a fresh object: as a new process would
            break
        except Killed:
            kills += 1
            st = json.loads((tmp_path / "b" / "al_state.json").read_text())
            assert (st["round"], st["stage"]) == seen[-1], "the state names the stage that finished last"
    assert kills == 2 + 5 + 5 + 2, seen
    assert out["labeled"] == lab, "same selections in the same order (deterministic with the seed)"
    assert _metrics(out["rounds"]) == _metrics(ref["rounds"])
    assert not any((tmp_path / "b").glob("round-*/train/checkpoints")), "trainer checkpoints are cleaned up"


def test_seed_set_depends_on_seed_only(data, tmp_path):
    def seed_set(seed, out):
        loop = _loop(data, tmp_path / out, seed=seed)
        loop._load_or_init()
        loop._do_seed_select(0)
        return loop.state["queried"]
    assert seed_set(0, "s0") == seed_set(0, "s0b")
    assert seed_set(0, "s0") != seed_set(1, "s1")


def test_rng_states_round_trip_through_json():
    import random
    from kdfast.active.loop import restore_rng_states, rng_states
    rng = np.random.default_rng(3)
    rng.random(5)
    saved = json.loads(json.dumps(rng_states(rng)))
    first = (rng.random(3).tolist(), random.random(), torch.rand(3).tolist())
    rng2 = np.random.default_rng(99)
    torch.manual_seed(99)
    random.seed(99)
    restore_rng_states(rng2, saved)
    assert (rng2.random(3).tolist(), random.random(), torch.rand(3).tolist()) == first


def test_bad_options_are_rejected(data, tmp_path):
    with pytest.raises(ValueError, match="must exceed the seed set"):
        _loop(data, tmp_path / "x", seed_size=10, budget=10)
    with pytest.raises(ValueError, match="exceeds the pool"):
        _loop(data, tmp_path / "x", budget=61)
    with pytest.raises(ValueError, match="available: .*margin"):
        _loop(data, tmp_path / "x", strategy="bogus")
    with pytest.raises(ValueError, match="teacher"):
        ActiveLearningLoop(_config(tmp_path / "x"), data["pool"], data["dev"], data["tok"])
    with pytest.raises(ValueError, match="kd_on_pool"):
        _config(tmp_path / "x", distill=None, kd_on_pool=True)
    with pytest.raises(ValueError, match="labelling"):
        _config(tmp_path / "x", labelling="crowd")
    with pytest.raises(ValueError, match="fraction must be in"):
        _loop(data, tmp_path / "x", budget=1.5)
    loop = _loop(data, tmp_path / "y", rounds=1)
    loop._load_or_init()
    loop._save()
    with pytest.raises(ValueError, match="strategy"):
        _loop(data, tmp_path / "y", rounds=1, strategy="entropy").run()


def test_kd_on_pool_windows_have_no_hard_labels(data, tmp_path):
    from kdfast.distill.collate import DistillCollator, span_mask
    from kdfast.ops.qa_kd_loss import qa_kd_loss
    loop = _loop(data, tmp_path / "kd", kd_on_pool=True)
    labeled = list(data["pool"]["id"][:5])
    ds = loop.training_set(labeled)
    assert len(ds) == len(loop.plain_windows), "labeled + pool windows"
    assert {"teacher_start", "teacher_end"} <= set(ds.column_names)
    is_lab = np.isin(ds["example_id"], labeled)
    sp, ep = np.asarray(ds["start_positions"]), np.asarray(ds["end_positions"])
    assert (sp[~is_lab] == IGNORE_POSITION).all() and (ep[~is_lab] == IGNORE_POSITION).all()
    assert (sp[is_lab] < L_MAX).all() and (ep[is_lab] < L_MAX).all()
    # The loss really gives those windows no hard term (and keeps their soft term).
    coll = DistillCollator(data["tok"])
    for rows, hard_zero in ((np.flatnonzero(~is_lab)[:4], True), (np.flatnonzero(is_lab)[:4], False)):
        b = coll([ds[int(i)] for i in rows])
        L = b["input_ids"].shape[1]
        s = torch.randn(len(rows), L, requires_grad=True)
        kw = dict(mask=span_mask(b, L), temperature=2.0)
        hard = qa_kd_loss(s, s, b["teacher_start_logits"], b["teacher_end_logits"], b["start_positions"],
                          b["end_positions"], soft_weight=0.0, hard_weight=1.0, **kw)
        assert (float(hard.detach()) == 0.0) == hard_zero
    plain = _loop(data, tmp_path / "plain").training_set(labeled)
    assert sorted(set(plain["example_id"])) == sorted(labeled)


def _fill(path, oracle, *, drop=None, extra=None, move=None, other=None):
    """The exported records with the oracle's answers (optionally damaged)."""
    from kdfast.qa.load import write_jsonl
    recs = [json.loads(x) for x in open(path)]
    for r in recs:
        r["answers"] = oracle[r["id"]]
        if r["id"] == move:
            r["answers"] = {"text": r["answers"]["text"][:1], "answer_start": [r["answers"]["answer_start"][0] + 1]}
        if r["id"] == other:  # a different, valid answer: the context's first word
            first = r["context"].split()[0]
            r["answers"] = {"text": [first], "answer_start": [0]}
    if drop:
        recs = [r for r in recs if r["id"] != drop]
    if extra:
        recs.append(dict(extra))
    out = str(path) + ".filled.jsonl"
    write_jsonl(recs, out)
    return out


def test_annotate_round_trip(data, tmp_path):
    from kdfast.qa.load import SquadFormatError
    pool = data["pool"]
    oracle = {r["id"]: r["answers"] for r in pool}
    kw = dict(labelling="annotate", seed_size=6, query_size=6, budget=12)
    s = _loop(data, tmp_path / "h", **kw).run()
    assert s["status"] == "awaiting_labels" and s["file"].endswith("round-0/seed_to_label.jsonl")
    recs = [json.loads(x) for x in open(s["file"])]
    assert len(recs) == 6 and all(r["answers"]["text"] == [] for r in recs)
    assert {"id", "title", "context", "question"} <= set(recs[0])
    again = _loop(data, tmp_path / "h", **kw).run()
    assert again["status"] == "awaiting_labels" and not (tmp_path / "h" / "round-0" / "model").exists()
    ids = [r["id"] for r in recs]
    outsider = next(r for r in pool if r["id"] not in ids)
    with pytest.raises(ValueError, match=f"missing ids.*{ids[2]}"):
        _loop(data, tmp_path / "h", **kw).resume(labelled_file=_fill(s["file"], oracle, drop=ids[2]))
    with pytest.raises(ValueError, match=f"not queried.*{outsider['id']}"):
        _loop(data, tmp_path / "h", **kw).resume(labelled_file=_fill(s["file"], oracle, extra=outsider))
    with pytest.raises(SquadFormatError, match=f"{ids[1]}.*not at answer_start"):
        _loop(data, tmp_path / "h", **kw).resume(labelled_file=_fill(s["file"], oracle, move=ids[1]))
    loop = _loop(data, tmp_path / "h", **kw)
    assert loop.labeled_ids == [], "rejected files label nothing"
    s2 = loop.resume(labelled_file=_fill(s["file"], oracle, other=ids[0]))
    assert s2["status"] == "awaiting_labels" and s2["file"].endswith("round-0/to_label.jsonl")
    queried = [json.loads(x)["id"] for x in open(s2["file"])]
    assert len(queried) == 6 and not set(queried) & set(ids)
    done = _loop(data, tmp_path / "h", **kw).resume(labelled_file=_fill(s2["file"], oracle))
    assert done["status"] == "done" and done["labeled"] == ids + queried
    # Training positions come from the human answers: the oracle's everywhere except ids[0].
    loop = _loop(data, tmp_path / "h", **kw)
    ds = loop.training_set()
    sim = _loop(data, tmp_path / "sim").training_set(done["labeled"])
    assert ds["example_id"] == sim["example_id"]
    same = [a == b for a, b in zip(ds["start_positions"], sim["start_positions"])]
    changed = {e for e, ok in zip(ds["example_id"], same) if not ok}
    assert changed == {ids[0]}
    assert json.loads((tmp_path / "h" / "human_labels.json").read_text())[ids[0]]["answer_start"] == [0]


# ------------------------------------------------------------------ plot and CLI
def test_plot_curves(tmp_path):
    from kdfast.active.plot import main_plot, plot_curves
    names = ["margin", "margin", "random"]
    logs = [{"strategy": s, "rounds": [{"fraction": f, "f1": 10 * f + i, "exact_match": 5 * f}
                                       for f in (0.05, 0.1, 0.2)]} for i, s in enumerate(names)]
    out = plot_curves(logs, tmp_path / "c.png", reference={"label": "100%", "value": 3.0})
    assert open(out, "rb").read(8) == PNG
    with pytest.raises(ValueError, match="labels"):
        plot_curves(logs, tmp_path / "d.png", labels=["a"])
    (tmp_path / "a.json").write_text(json.dumps(logs[0]))
    assert main_plot(["--logs", str(tmp_path / "a.json"), "--output", str(tmp_path / "e.png")]) == 0
    assert (tmp_path / "e.png").read_bytes()[:8] == PNG
    with pytest.raises(SystemExit, match="does not exist"):
        main_plot(["--logs", str(tmp_path / "missing.json"), "--output", str(tmp_path / "f.png")])


def test_plot_cli_reference_line(tmp_path, monkeypatch):
    import kdfast.active.plot as plot
    (tmp_path / "a.json").write_text(json.dumps({"strategy": "random", "rounds": [{"fraction": 0.1, "f1": 1.0}]}))
    seen = []
    real = plot.plot_curves
    monkeypatch.setattr(plot, "plot_curves", lambda *a, **kw: seen.append(kw["reference"]) or real(*a, **kw))
    args = ["--logs", str(tmp_path / "a.json"), "--output", str(tmp_path / "r.png")]
    assert plot.main_plot(args + ["--reference", "42.5", "--reference_label", "all labels"]) == 0
    assert plot.main_plot(args) == 0
    assert seen == [{"label": "all labels", "value": 42.5}, None]
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG


def test_cli(data, tmp_path, capsys):
    from kdfast.cli.main import main
    root = data["root"]
    common = ["--train_file", str(root / "pool.jsonl"), "--validation_file", str(root / "dev.jsonl"),
              "--teacher_name_or_path", data["teacher"], "--output_dir", str(tmp_path / "cli")]
    with pytest.raises(SystemExit, match="--train_file .*no such file"):
        main(["active", *common[2:], "--train_file", str(root / "nope.json")])
    with pytest.raises(SystemExit, match="available: .*least_confidence"):
        main(["active", *common, "--strategy", "nope"])
    with pytest.raises(SystemExit, match="must exceed the seed set"):
        main(["active", *common, "--seed_size", "10", "--budget", "5"])
    args = [*common, "--student-layers", "1", "--strategy", "least_confidence", "--seed_size", "10",
            "--query_size", "5", "--budget", "0.5", "--rounds", "1", "--max_steps", "1", "--max_seq_length",
            str(L_MAX), "--doc_stride", str(STRIDE), "--disable_tqdm", "--per_device_train_batch_size", "16"]
    assert main(["active", *args]) == 0
    assert "| 0 | 10 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--resume_from_checkpoint"):
        main(["active", *args])
    assert main(["active", *args, "--resume_from_checkpoint"]) == 0
    log = json.loads((tmp_path / "cli" / "al_log.json").read_text())
    assert log["done"] and len(log["rounds"]) == 1 and log["budget"] == 30


# ------------------------------------------------------------------ sharded scoring
def _shard_worker(rank, world_size, init_file, model_dir, teacher_dir, pool_file, out_dir):
    import torch.distributed as dist
    from kdfast.distill.models import load_qa_model, load_tokenizer
    from kdfast.qa.load import load_squad
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        pool = load_squad(pool_file)
        view = score_pool(load_qa_model(model_dir, attn_implementation="kdfast"), load_tokenizer(model_dir), pool.select(range(0, 24)),
                          labeled_questions=pool.select(range(24, 29)), teacher=load_qa_model(teacher_dir, attn_implementation="kdfast"),
                          strategy="disagreement", fields=("nbest", "embeddings"), max_seq_length=L_MAX,
                          doc_stride=STRIDE, progress=False)
        assert (view is None) == (rank != 0)
        picked = select_queries(get_strategy("hybrid"), view, 6, np.random.default_rng(0))
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump({"view": view, "picked": picked}, fh)
    finally:
        dist.destroy_process_group()


def test_sharded_scoring_equals_one_process(data, tmp_path):
    import torch.multiprocessing as mp
    from kdfast.qa.load import load_squad
    pool = load_squad(str(data["root"] / "pool.jsonl"))
    mp.spawn(_shard_worker, args=(2, str(tmp_path / "init"), data["student"], data["teacher"],
                                  str(data["root"] / "pool.jsonl"), str(tmp_path)), nprocs=2, join=True)
    got = [pickle.load(open(tmp_path / f"rank{r}.pkl", "rb")) for r in (0, 1)]
    one = score_pool(_load(data["student"]), data["tok"], pool.select(range(0, 24)),
                     labeled_questions=pool.select(range(24, 29)), teacher=_load(data["teacher"]),
                     strategy="disagreement", fields=("nbest", "embeddings"), max_seq_length=L_MAX,
                     doc_stride=STRIDE, progress=False)
    two = got[0]["view"]
    assert two.ids == one.ids
    np.testing.assert_allclose(two.embeddings, one.embeddings, atol=1e-5)
    np.testing.assert_allclose(two.labeled_embeddings, one.labeled_embeddings, atol=1e-5)
    for q in one.ids:
        assert [e["text"] for e in two.nbest[q]] == [e["text"] for e in one.nbest[q]]
        np.testing.assert_allclose([e["probability"] for e in two.nbest[q]],
                                   [e["probability"] for e in one.nbest[q]], atol=1e-5)
        for name in ("student_logits", "teacher_logits"):
            for a, b in zip(getattr(two, name)[q], getattr(one, name)[q]):
                np.testing.assert_allclose(a[0], b[0], atol=1e-4)
                np.testing.assert_allclose(a[1], b[1], atol=1e-4)
    np.testing.assert_allclose(get_strategy("disagreement").score(two), get_strategy("disagreement").score(one),
                               atol=1e-4)
    want = get_strategy("hybrid").select(one, 6, np.random.default_rng(0))
    assert got[0]["picked"] == got[1]["picked"] == want
