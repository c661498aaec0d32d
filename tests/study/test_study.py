"""`kdfast study` end to end on the tiny synthetic set: 2 configurations x 2 seeds."""
import json
import os

import pytest

from kdfast.study.grid import GridError, load_grid, make_grid

TRAIN = dict(student_layers="1,3", max_steps=2, batch_size=8, learning_rate=1e-3, max_seq_length=128, doc_stride=48,
             max_train_questions=12, max_eval_questions=6)


def test_grid_runs_and_errors(tmp_path):
    g = make_grid({"grid": {"mapping": ["uniform", "mean"], "attention_weight": [0, 1], "seed": [0, 1]},
                   "train": {"include_default": True}})
    names = {r.config_name for r in g.runs()}
    assert len(names) == 4 and len(g.runs()) == 8  # the default equals uniform/attention 1: no duplicate
    assert "map=uniform,att=attention_score:1,hid=hidden:1,emb=1,logit=kl" in names
    for data, key in (({"grid": {"mapings": ["uniform"]}}, "'mapings'"),
                      ({"grid": {"max_steps": [3]}}, "'max_steps'"),
                      ({"train": {"seed": 1}}, "'seed'"),
                      ({"grid": {"mapping": ["middle"]}}, "'mapping'"),
                      ({"grid": {"hidden_weight": ["x"]}}, "'hidden_weight'"),
                      ({"grid": {"layer_weight_schedule": ["two_stage"]}}, "'layer_weight_schedule'"),
                      ({"train": {"max_steps": 0}}, "'max_steps'"),
                      ({"grids": {}}, "'grids'")):
        with pytest.raises(GridError, match=key):
            make_grid(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  mapping: [uniform\n")
    with pytest.raises(GridError, match="cannot parse"):
        load_grid(str(bad))
    with pytest.raises(GridError, match="no such file"):
        load_grid(str(tmp_path / "none.yaml"))


def test_study_outputs_and_resume(tmp_path, squad_files, teacher_dir, capsys):
    from kdfast.cli.main import main
    from kdfast.distill.trainer import DistillConfig
    grid = tmp_path / "study.yaml"
    grid.write_text("grid:\n  mapping: [uniform, learned]\n  attention_loss: [attention_score]\n"
                    "  hidden_loss: [hidden]\n  seed: [0, 1]\ntrain:\n" +
                    "".join(f"  {k}: {json.dumps(v)}\n" for k, v in TRAIN.items()))
    out = tmp_path / "out"
    argv = ["study", "--grid", str(grid), "--train_file", squad_files[0], "--validation_file", squad_files[1],
            "--teacher_name_or_path", teacher_dir, "--output_dir", str(out), "--disable_tqdm"]
    assert main(argv) == 0
    for f in ("runs.csv", "results.md", "heatmap.png", "best_config.json"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    from kdfast.study.runner import read_runs
    rows = read_runs(str(out))
    assert len(rows) == 4 and {r["seed"] for r in rows} == {0, 1}
    assert all(0 <= r["f1"] <= 100 and r["train_seconds"] > 0 and r["steps"] == 2 for r in rows)
    assert all(r["learned_weights"] for r in rows if r["mapping"] == "learned")
    md = (out / "results.md").read_text()
    assert "± " in md and "learned" in md and "Learned mapping weights" in md
    best = json.loads((out / "best_config.json").read_text())
    DistillConfig(**best["distill"])  # usable as a distillation config
    assert "--layer_losses" in best["kdfast_distill_args"]
    mtime = os.path.getmtime(out / "runs.csv")
    capsys.readouterr()
    assert main(argv) == 0  # rerun: every run is skipped
    assert "4 done, 0 to run" in capsys.readouterr().out
    assert os.path.getmtime(out / "runs.csv") == mtime and len(read_runs(str(out))) == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  mapings: [uniform]\n")
    with pytest.raises(SystemExit, match="unknown grid key 'mapings'"):
        main(["study", "--grid", str(bad), *argv[3:]])


def test_heatmap_plots_the_best_layer_family_when_logits_only_wins(tmp_path):
    """Logits only (a one-cell family) tops the summary: the heatmap shows the best family that has
    weight points to compare, not a single cell."""
    from kdfast.study.grid import DEFAULT_CONFIG, LOGITS_ONLY
    from kdfast.study.report import write_heatmap
    summary = [dict(LOGITS_ONLY, f1_mean=40.0)]
    for mapping, base in (("mean", 37.0), ("uniform", 31.0)):
        for aw in (1.0, 4.0):
            for hw in (1.0, 4.0):
                summary.append(dict(DEFAULT_CONFIG, mapping=mapping, attention_weight=aw, hidden_weight=hw,
                                    f1_mean=base - aw / 4 + hw / 8))
    summary.sort(key=lambda e: -e["f1_mean"])
    fam = write_heatmap(summary, str(tmp_path / "h.png"))
    assert fam["mapping"] == "mean" and fam["attention_loss"] == "attention_score"
    assert (tmp_path / "h.png").stat().st_size > 0
    # Without a logits-only winner the top configuration's family is plotted, as before.
    fam = write_heatmap([e for e in summary if e["mapping"] == "uniform"], str(tmp_path / "u.png"))
    assert fam["mapping"] == "uniform" and fam["axes"] == "attention weight x hidden weight"


def test_heatmap_with_fixed_weights_plots_mapping_by_attention_loss(tmp_path):
    """Weights fixed (every family one cell, as in a reduced grid): mapping x attention loss is plotted,
    each cell the best F1 over the other knobs, logits only left out of the cells."""
    import matplotlib.image
    from kdfast.study.grid import DEFAULT_CONFIG, LOGITS_ONLY
    from kdfast.study.report import write_heatmap, write_report
    summary = [dict(LOGITS_ONLY, f1_mean=39.0)]
    for mapping, base in (("mean", 35.0), ("uniform", 26.0)):
        for att, d in (("attention_score", 0.0), ("attention_kl", -2.0)):
            summary.append(dict(DEFAULT_CONFIG, mapping=mapping, attention_loss=att, f1_mean=base + d))
    summary.sort(key=lambda e: -e["f1_mean"])
    what = write_heatmap(summary, str(tmp_path / "h.png"))
    assert what == {"axes": "mapping x attention loss (best over the other knobs, layer-term configurations)"}
    img = matplotlib.image.imread(str(tmp_path / "h.png"))
    assert img.shape[0] > 100 and img.shape[1] > 100
    # The report names what the heatmap shows.
    rows = [{"run_id": f"{e['mapping']}-{e['attention_loss']}|seed=0", "config": f"{e['mapping']}-{e['attention_loss']}",
             **{k: e[k] for k in DEFAULT_CONFIG}, "seed": 0, "exact_match": e["f1_mean"] - 5, "f1": e["f1_mean"],
             "train_seconds": 1.0, "steps": 1, "learned_weights": ""} for e in summary]
    write_report(rows, {"student_layers": "0,2", "max_steps": 1, "learning_rate": 1e-3, "batch_size": 2,
                        "temperature": 2.0, "alpha": 0.5, "max_seq_length": 64, "doc_stride": 32}, str(tmp_path))
    assert "F1 over mapping x attention loss" in (tmp_path / "results.md").read_text()
