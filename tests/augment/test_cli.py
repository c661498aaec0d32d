"""``kdfast augment``: flags (dash spellings), outputs, clear errors."""
import json
import os

import pytest

from kdfast.qa.load import write_squad_json

from .conftest import tiny_model


@pytest.fixture
def files(tmp_path, aug_data, aug_tok):
    src = [r for r in aug_data["source"] if r.get("domain") == "geography"]
    paths = {}
    for name, recs in (("geo", src), ("target", aug_data["target"]), ("dev", aug_data["eval"])):
        paths[name] = str(tmp_path / f"{name}.json")
        write_squad_json([{k: r[k] for k in ("id", "title", "context", "question", "answers")} for r in recs],
                         paths[name])
    teacher = tiny_model(aug_tok, hidden=64, layers=2, seed=1)
    paths["teacher"] = str(tmp_path / "teacher")
    teacher.save_pretrained(paths["teacher"])
    aug_tok.save_pretrained(paths["teacher"])
    return paths


def _argv(files, out, *extra):
    return ["--source-file", files["geo"], "--train_file", files["target"], "--validation-file", files["dev"],
            "--teacher_name_or_path", files["teacher"], "--student-layers", "1", "--episodes", "1",
            "--candidates_per_episode", "3", "--episode_steps", "1", "--warmup_steps", "1", "--final_steps", "2",
            "--mlm_steps", "2", "--per_device_train_batch_size", "4", "--max_seq_length", "128",
            "--doc_stride", "48", "--output_dir", str(out), "--disable_tqdm", *extra]


def test_cli_runs_and_writes_outputs(files, tmp_path, capsys):
    from kdfast.cli.main import main

    out = tmp_path / "run"
    assert main(["augment", *_argv(files, out, "--methods", "full,none,random", "--bases", "target,source",
                                           "--reward-baseline", "critic", "--choose_strategy")]) == 0
    for f in ("augment_log.json", "results.md", "reward_curve.png", "full/state.pt", "none/augment_log.json",
              "mlm/config.json"):
        assert os.path.exists(out / f), f
    # One masked LM, trained once, serves both generator methods.
    assert not os.path.exists(out / "full" / "mlm") and not os.path.exists(out / "random" / "mlm")
    log = json.loads((out / "augment_log.json").read_text())
    assert [r["method"] for r in log["results"]] == ["full", "none", "random"]
    full_cfg = json.loads((out / "full" / "augment_log.json").read_text())["config"]
    assert full_cfg["bases"] == ["target", "source"] and full_cfg["reward_baseline"] == "critic"
    assert full_cfg["choose_strategy"] is True
    printed = capsys.readouterr().out
    assert "| KD without augmentation |" in printed
    assert printed.count("MLM trained 2 steps") == 1, printed
    with pytest.raises(SystemExit, match="--resume_from_checkpoint"):
        main(["augment", *_argv(files, out, "--methods", "none")])
    assert main(["augment", *_argv(files, out, "--methods", "none", "--resume_from_checkpoint")]) == 0


@pytest.mark.parametrize("flag,value,match", [
    ("--train_file", "/nope/t.json", "--train_file /nope/t.json: no such file"),
    ("--teacher_name_or_path", "/nope/dir", "--teacher_name_or_path /nope/dir: no such directory"),
    ("--methods", "full,bogus", "--methods 'full,bogus': unknown"),
    ("--reward", "bleu", "--reward: unknown 'bleu'"),
    ("--reward_baseline", "mean", "--reward_baseline: unknown 'mean'"),
    ("--mlm_init", "/nope/enc", "--mlm_init /nope/enc: no model directory"),
    ("--bases", "target,passage", "--bases 'target,passage': expected a comma-separated subset of target, source"),
])
def test_cli_errors_name_the_argument(files, tmp_path, flag, value, match):
    from kdfast.augment.cli import main

    argv = _argv(files, tmp_path / "e")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    with pytest.raises(SystemExit, match=match.replace("(", r"\(").replace("'", "'")):
        main(argv)
    assert not (tmp_path / "e" / "mlm").exists()  # refused before any training


def test_cli_mlm_init_starts_the_masked_lm_from_the_teacher(files, tmp_path, capsys):
    from kdfast.augment.cli import main

    out = tmp_path / "run"
    assert main([*_argv(files, out, "--methods", "random", "--mlm_init", files["teacher"])]) == 0
    cfg = json.loads((out / "mlm" / "config.json").read_text())
    teacher = json.loads(open(os.path.join(files["teacher"], "config.json")).read())
    assert cfg["intermediate_size"] == teacher["intermediate_size"] == 128  # the teacher's; the default MLM has 256
    assert f"MLM from {files['teacher']} trained 2 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exclude each other"):
        main(_argv(files, tmp_path / "e", "--mlm_init", files["teacher"], "--mlm_name_or_path", str(out / "mlm")))
