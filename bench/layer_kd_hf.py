"""One layer-distillation training step on HuggingFace BERT QA models: kdfast vs eager output_attentions.

What a user runs today for MiniLM attention transfer + TinyBERT hidden-state
distillation with stock transformers: both models with eager attention and
``output_attentions=True`` (SDPA never returns the maps), the teacher under
no_grad, the losses on the returned [B, H, L, L] probabilities. kdfast: both
models with ``attn_implementation="kdfast"``, q/k/v captured
(kdfast.hf.capture, no maps; of the teacher only the mapped layers' q and k,
LayerKD.capture_args), the losses from kdfast.nn.LayerKD. Same weights,
same batch, same loss (the two totals are checked to agree before timing).

One step = student forward + teacher forward (no_grad) + losses + backward.
Time and peak extra memory (RSS) of the whole step, the providers interleaved.

Default: a 4-layer, 384-wide student (12 heads of 32) and a 12-layer BERT-base
teacher, B=8, L=384 with a SQuAD-like padding mix (bench/pruning.py), layers
mapped 1->3, 2->6, 3->9, 4->12, losses hidden MSE (learnable 384->768
projection) + attention KL. Random init, no downloads.

    python bench/layer_kd_hf.py [--batch 8] [--teacher-layers 12] [--reps 3] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import Bench  # noqa: E402
from pruning import padded_batch  # noqa: E402

import kdfast.hf  # noqa: E402,F401  (registers the "kdfast" attention)
from kdfast.hf.capture import capture  # noqa: E402
from kdfast.nn import LayerKD  # noqa: E402

LOSSES = {"hidden": 1.0, "attention_kl": 1.0}


def configs(teacher_layers, student_layers):
    from transformers import BertConfig
    common = dict(vocab_size=8192, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = BertConfig(num_hidden_layers=teacher_layers, **common)  # 768 wide, 12 heads, 3072 FFN
    student = BertConfig(num_hidden_layers=student_layers, hidden_size=384, num_attention_heads=12,
                         intermediate_size=1536, **common)
    return student, teacher


def models(cfg_s, cfg_t, impl):
    import copy

    from transformers import BertForQuestionAnswering
    # Own config copies: _from_config sets the attention implementation on the config it is given.
    torch.manual_seed(0)
    s = BertForQuestionAnswering._from_config(copy.deepcopy(cfg_s), attn_implementation=impl).train()
    torch.manual_seed(1)
    t = BertForQuestionAnswering._from_config(copy.deepcopy(cfg_t), attn_implementation=impl).eval()
    return s, t


def kdfast_step(s, t, kd, ids, am):
    with capture(s) as cs, capture(t, **kd.capture_args("teacher")) as ct:
        s_out = s(input_ids=ids, attention_mask=am, output_hidden_states=True)
        with torch.no_grad():
            t_out = t(input_ids=ids, attention_mask=am, output_hidden_states=True)
    total, _ = kd(s_out.hidden_states, cs.layers, t_out.hidden_states, ct.layers, am)
    return total


def eager_step(s, t, kd, ids, am):
    """The same loss from the eager models' output_attentions maps (materialised, autograd through PyTorch)."""
    s_out = s(input_ids=ids, attention_mask=am, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        t_out = t(input_ids=ids, attention_mask=am, output_hidden_states=True, output_attentions=True)
    keep = am.bool()
    n = keep.sum()
    pair = keep[:, None, :, None] & keep[:, None, None, :]
    H = s.config.num_attention_heads
    W, b = kd.hidden_proj[0].weight, kd.hidden_proj[0].bias
    hidden = kl = 0
    for ls, lt in kd.pairs:
        y, ht = F.linear(s_out.hidden_states[ls], W, b), t_out.hidden_states[lt]
        hidden = hidden + ((y - ht) ** 2)[keep].sum() / (n * ht.shape[-1])
        p_s, p_t = s_out.attentions[ls - 1], t_out.attentions[lt - 1]
        rows = torch.where(pair, p_t * (torch.log(p_t.clamp_min(1e-30)) - torch.log(p_s.clamp_min(1e-30))), 0.0)
        kl = kl + rows.sum() / (H * n)
    return LOSSES["hidden"] * hidden + LOSSES["attention_kl"] * kl


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=384)
    ap.add_argument("--teacher-layers", type=int, default=12)
    ap.add_argument("--student-layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (providers interleaved in each round)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="B=2, 4-layer teacher, 2-layer student, 1 rep (make demo)")
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.teacher_layers, a.student_layers, a.reps = 2, 4, 2, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg_s, cfg_t = configs(a.teacher_layers, a.student_layers)
    kd = LayerKD(cfg_s, cfg_t, mapping="uniform", losses=LOSSES)
    ids, am, lengths = padded_batch(a.batch, a.length, seed=a.batch)
    ids = ids % cfg_s.vocab_size  # padded_batch draws BERT-base token ids; this vocabulary is smaller
    ids, am = ids.to(a.device), am.to(a.device)
    fast_s, fast_t = models(cfg_s, cfg_t, "kdfast")
    eager_s, eager_t = models(cfg_s, cfg_t, "eager")
    eager_s.load_state_dict(fast_s.state_dict())
    eager_t.load_state_dict(fast_t.state_dict())
    for m in (fast_s, fast_t, eager_s, eager_t, kd):
        m.to(a.device)

    # Same computation: the totals and one student gradient agree before anything is timed.
    totals, grads = [], []
    for step, s, t in ((kdfast_step, fast_s, fast_t), (eager_step, eager_s, eager_t)):
        total = step(s, t, kd, ids, am)
        total.backward()
        totals.append(total.detach())
        grads.append(s.bert.encoder.layer[0].attention.self.query.weight.grad.clone())
    torch.testing.assert_close(totals[0], totals[1].float(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=1e-3 * grads[1].abs().max().item())

    def zero():
        for m in (fast_s, eager_s, kd):
            m.zero_grad(set_to_none=True)

    bench = Bench("layer_kd_hf", device=a.device)
    cfg = (f"student {a.student_layers}x384 teacher {a.teacher_layers}x768 H12 valid="
           f"{sum(lengths) / (a.batch * a.length):.0%} fp32")
    fns = {"kdfast": lambda: kdfast_step(fast_s, fast_t, kd, ids, am).backward(),
           "eager-maps": lambda: eager_step(eager_s, eager_t, kd, ids, am).backward()}
    bench.run_interleaved("distill_step", fns, mode="fwd+bwd", x_name="B", x_value=a.batch, config=cfg, warmup=1,
                          reps=a.reps, setup=zero)
    print(f"loss total kdfast {totals[0].item():.6g}, eager {totals[1].item():.6g}", file=sys.stderr)
    bench.table()


if __name__ == "__main__":
    main()
