"""DistillConfig options of issue 15: logit losses, two-stage schedule, EMA term weighting, mappings."""
import math

import pytest
import torch

from kdfast.distill.trainer import DistillConfig, logit_kd_loss


def _hand(s, t, keep, kind, T):
    """Plain Python float64: start/end rows -> mean over rows, 0.5 (start + end)."""
    def head(S, Tt):
        total = 0.0
        if kind == "mse":
            n = sum(1 for b in range(len(S)) for j in range(len(S[b])) if keep[b][j])
            return sum((S[b][j] - Tt[b][j]) ** 2 for b in range(len(S)) for j in range(len(S[b])) if keep[b][j]) / n
        for b in range(len(S)):
            idx = [j for j in range(len(S[b])) if keep[b][j]]
            zs = [S[b][j] / T for j in idx]
            zt = [Tt[b][j] / T for j in idx]
            ms, mt = max(zs), max(zt)
            es, et = [math.exp(z - ms) for z in zs], [math.exp(z - mt) for z in zt]
            ps, pt = [e / sum(es) for e in es], [e / sum(et) for e in et]
            if kind == "reverse_kl":
                total += sum(p * math.log(p / q) for p, q in zip(ps, pt))
            elif kind == "kl":
                total += sum(q * math.log(q / p) for p, q in zip(ps, pt))
            else:
                m = [(p + q) / 2 for p, q in zip(ps, pt)]
                total += 0.5 * sum(p * math.log(p / x) for p, x in zip(ps, m)) + \
                    0.5 * sum(q * math.log(q / x) for q, x in zip(pt, m))
        return T * T * total / len(S)
    return 0.5 * (head(*s) + head(*t))


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd", "mse"])
def test_logit_losses_match_float64_hand_computation(kind):
    g = torch.Generator().manual_seed(0)
    B, L, T = 3, 9, 2.0
    ss, se, ts, te = (torch.randn(B, L, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, 5:] = False
    keep[2, 1:3] = False
    got = logit_kd_loss(ss, se, ts, te, keep, kind=kind, temperature=T)
    want = _hand((ss.tolist(), ts.tolist()), (se.tolist(), te.tolist()), keep.tolist(), kind, T)
    assert abs(got.item() - want) <= 1e-9 * max(1.0, abs(want))
    s32 = ss.float().requires_grad_()
    loss = logit_kd_loss(s32, se.float(), ts.float(), te.float(), keep, kind=kind, temperature=T)
    loss.backward()
    assert torch.isfinite(s32.grad).all() and s32.grad[~keep].abs().max() == 0 and s32.grad.abs().sum() > 0


def test_kl_choice_matches_the_fused_default():
    from kdfast.ops.qa_kd_loss import qa_kd_loss
    g = torch.Generator().manual_seed(1)
    ss, se, ts, te = (torch.randn(2, 7, generator=g) * 10 for _ in range(4))
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    fused = qa_kd_loss(ss, se, ts, te, soft_weight=1.0, hard_weight=0.0, temperature=2.0, mask=keep)
    assert abs(fused.item() - logit_kd_loss(ss, se, ts, te, keep, kind="kl", temperature=2.0).item()) < 1e-4


def test_config_spellings_and_errors():
    assert DistillConfig().two_stage_fraction() is None and DistillConfig().ema_decay() is None
    assert DistillConfig(layer_weight_schedule="two_stage:0.5").two_stage_fraction() == 0.5
    assert DistillConfig(term_weighting="ema").ema_decay() == 0.9
    assert DistillConfig(term_weighting="ema:0.99").ema_decay() == 0.99
    with pytest.raises(ValueError, match="logit_loss must be one of"):
        DistillConfig(logit_loss="kld")
    with pytest.raises(ValueError, match="layer_weight_schedule"):
        DistillConfig(layer_weight_schedule="two_stage:1.5")
    with pytest.raises(ValueError, match="term_weighting"):
        DistillConfig(term_weighting="uncertainty")


def test_trainer_runs_new_options(tmp_path, teacher, small_windows, tok):
    """A few steps with JSD logits, the two-stage schedule, EMA weighting, a learned hidden mapping and a
    random attention mapping: finite loss, the learned weights moved, the random mapping resampled."""
    from kdfast.distill.stage import train_stage
    from kdfast.distill.student import student_from_teacher
    from tests.distill.conftest import train_options
    student = student_from_teacher(teacher, [1, 3], attn_implementation="kdfast")
    distill = DistillConfig(layer_losses={"hidden": 1.0, "attention_kl": 1.0}, hidden_mapping="learned",
                            attention_mapping="random", logit_loss="jsd", layer_weight_schedule="two_stage:0.5",
                            term_weighting="ema", mapping_seed=3)
    trainer = train_stage(student, small_windows, tok, str(tmp_path), train_options(max_steps=4, num_train_epochs=2),
                          teacher=teacher, distill=distill, resume=False)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["loss"]) for h in logs)
    w = trainer.layer_kd.learned_mapping_weights()["hidden"]
    assert w.shape == (2, 4) and not torch.allclose(w, torch.full((2, 4), 0.25))
    assert trainer.layer_kd.attention_map.epoch >= 1  # resampled at the second epoch's start
    # stage 1 (steps 0, 1): layer terms only -> the logged loss is their EMA-normalised sum, about 2
    assert abs(logs[0]["loss"] - 2.0) < 0.5
