"""kdfast demo's data split: ``teacher_num_train`` trains the teacher on more questions than the students."""
import json
import os
import types

import pytest

import kdfast.distill.demo as demo
import kdfast.distill.recipe as recipe
import kdfast.distill.stage as stage

ROW = dict(exact_match=1.0, f1=2.0, parameters=10, encoder_weights=5, size_mb=0.1, latency_ms=1.0,
           questions_per_s=1.0)


@pytest.fixture
def recorded(monkeypatch):
    """run_demo with training, measuring and the recipe replaced by recorders (the split is under test)."""
    seen = {"train_stage": [], "recipe": None, "unlabeled": None, "epochs": {}}

    def fake_train_stage(model, windows, tok, out, opts, **kw):
        seen["train_stage"].append((os.path.basename(out), len(windows), len(set(windows["example_id"]))
                                    if "example_id" in windows.column_names else None))
        seen["epochs"][os.path.basename(out)] = opts.num_train_epochs
        return types.SimpleNamespace(model=model)

    def fake_run_recipe(cfg, teacher_dir, train, dev, tok, unlabeled_questions=None, log=print):
        seen["recipe"] = list(train["id"])
        seen["unlabeled"] = unlabeled_questions
        seen["epochs"]["distil"] = cfg.train.num_train_epochs
        return []

    monkeypatch.setattr(stage, "train_stage", fake_train_stage)
    monkeypatch.setattr(recipe, "run_recipe", fake_run_recipe)
    monkeypatch.setattr(recipe, "measure_row", lambda name, *a, **kw: dict(ROW, model=name, path="x"))
    monkeypatch.setattr(demo, "TEACHER", dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                                              intermediate_size=64))
    return seen


def _generated_ids(out):
    with open(os.path.join(out, "data", "train.json")) as fh:
        data = json.load(fh)["data"]
    return [q["id"] for a in data for p in a["paragraphs"] for q in p["qas"]]


def test_teacher_trains_on_more_questions_than_the_students(recorded, tmp_path):
    out = str(tmp_path / "demo")
    demo.run_demo(out, num_train=30, num_dev=6, teacher_num_train=90, disable_tqdm=True)
    generated = _generated_ids(out)
    assert len(generated) == 90
    (t_name, t_windows, _), (s_name, s_windows, _) = recorded["train_stage"]
    assert (t_name, s_name) == ("teacher", "student-no-kd")
    assert t_windows >= 90 and 30 <= s_windows < t_windows
    students = recorded["recipe"]
    assert len(students) == 30 and len(set(students)) == 30
    assert set(students) <= set(generated)
    assert students != generated[:30]  # a random subset, not the first domain's questions
    assert recorded["unlabeled"] is None  # only kd_unlabeled hands the rest to the recipe
    with open(os.path.join(out, "metrics.json")) as fh:
        assert json.load(fh)["data"]["teacher_train_questions"] == 90


def test_kd_unlabeled_hands_the_teachers_other_questions_to_the_recipe(recorded, tmp_path):
    out = str(tmp_path / "demo")
    demo.run_demo(out, num_train=30, num_dev=6, teacher_num_train=90, kd_unlabeled=True, disable_tqdm=True)
    students, unl = recorded["recipe"], recorded["unlabeled"]
    assert len(unl) == 60 and "answers" not in unl.column_names
    assert set(unl["id"]) | set(students) == set(_generated_ids(out)) and not set(unl["id"]) & set(students)
    (_, _, no_kd_questions), = [r for r in recorded["train_stage"] if r[0] == "student-no-kd"]
    assert no_kd_questions == 30  # the baseline never sees them
    with open(os.path.join(out, "metrics.json")) as fh:
        assert json.load(fh)["data"]["unlabeled_questions (distillation only)"] == 60
    with pytest.raises(ValueError, match="kd_unlabeled .* needs teacher_num_train > num_train"):
        demo.run_demo(str(tmp_path / "c"), num_train=30, num_dev=6, kd_unlabeled=True)


def test_without_teacher_num_train_everyone_trains_on_the_same_questions(recorded, tmp_path):
    out = str(tmp_path / "demo")
    demo.run_demo(out, num_train=30, num_dev=6, disable_tqdm=True)
    assert recorded["recipe"] == _generated_ids(out)
    (_, t_windows, _), (_, s_windows, _) = recorded["train_stage"]
    assert t_windows == s_windows


def test_teacher_num_train_errors(recorded, tmp_path):
    with pytest.raises(ValueError, match="teacher_num_train=10 must be >= num_train=30"):
        demo.run_demo(str(tmp_path / "a"), num_train=30, num_dev=6, teacher_num_train=10)
    out = str(tmp_path / "b")
    demo.run_demo(out, num_train=30, num_dev=6, disable_tqdm=True)
    with pytest.raises(ValueError, match="train.json has 30 questions, this run asks for 90"):
        demo.run_demo(out, num_train=30, num_dev=6, teacher_num_train=90)


def test_distil_epochs(recorded, tmp_path):
    demo.run_demo(str(tmp_path / "a"), num_train=30, num_dev=6, student_epochs=2.0, disable_tqdm=True)
    assert recorded["epochs"]["student-no-kd"] == 2.0 and recorded["epochs"]["distil"] == 2.0
    demo.run_demo(str(tmp_path / "b"), num_train=30, num_dev=6, student_epochs=2.0, distil_epochs=0.5,
                  disable_tqdm=True)
    assert recorded["epochs"]["student-no-kd"] == 2.0 and recorded["epochs"]["distil"] == 0.5
    with open(os.path.join(tmp_path / "b", "metrics.json")) as fh:
        assert json.load(fh)["recipe"]["distil_epochs"] == 0.5
