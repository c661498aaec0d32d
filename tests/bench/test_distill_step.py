"""bench/attention_train.py --step: the stock and kdfast distillation steps compute the same loss (checked
before timing), the check rejects a student that differs, and a smoke run writes where it is told."""
import os

import pytest
import torch

from tests.bench.scripts import BENCH, load_bench

at = load_bench("attention_train")


@pytest.mark.parametrize("variant", ["logit", "layer"])
@pytest.mark.parametrize("dname", ["float32", "bfloat16"])
def test_losses_agree(variant, dname):
    ids, am = at.step_batch(2, 32)
    sides = at.step_sides(variant, ids, am, 0.1, small=True)
    values = at.check_step_losses(sides, variant, dname)
    ref, val = values.values()
    assert set(ref) == set(val) == ({"total", "logit"} | ({"hidden", "attention_kl"} if variant == "layer" else set()))
    for term in ref:
        assert val[term] == pytest.approx(ref[term], rel=at.STEP_TOLERANCE[dname])
    for side in sides.values():
        assert side.student.training  # back in training mode for the timed steps


@pytest.mark.parametrize("variant", ["logit", "layer"])
def test_perturbed_student_rejected(variant):
    ids, am = at.step_batch(2, 32)
    sides = at.step_sides(variant, ids, am, 0.1, small=True)
    student = sides["kdfast"].student
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # (at random init the logits barely depend on the attention: the QA head too)
        for w in (student.bert.encoder.layer[0].attention.self.query.weight, student.qa_outputs.weight):
            w.add_(0.05 * torch.randn(w.shape, generator=g))
    with pytest.raises(SystemExit, match="differ beyond tolerance"):
        at.check_step_losses(sides, variant, "float32")


def test_smoke_run_writes_to_out_dir(tmp_path, capsys):
    committed = os.path.join(BENCH, "results", "attention_train.csv")
    before = os.path.getsize(committed) if os.path.exists(committed) else None
    at.main(["--only-step", "--step-small", "--step-B", "2", "--step-L", "32", "--reps", "1",
             "--step-dtypes", "float32", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "distill_step loss check logit float32" in out and "distill_step loss check layer float32" in out
    rows = (tmp_path / "attention_train.csv").read_text().splitlines()
    assert sum(r.startswith("distill_step,") for r in rows) == 8  # 2 variants x 2 providers x (time, memory)
    assert not any(r.startswith("attention_train,") for r in rows)  # --only-step
    assert (os.path.getsize(committed) if os.path.exists(committed) else None) == before
