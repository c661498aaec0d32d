"""Attention fwd+bwd for training: kdfast (valid-token GEMM tiles, in-kernel Philox dropout)
vs torch SDPA with the padding mask and the same dropout rate, same process, interleaved reps.

    OMP_NUM_THREADS=2 .venv/bin/python bench/attention_train.py [--B 16 --L 384 --reps 3]

Peak memory: harness.peak_memory (RSS sampler with large blocks mmap'd), extra over the
memory in use before the call, gradients included.

--step adds one distillation training step of HF BERT QA models (kernel "distill_step"): a 3-layer
384-wide student and a 6-layer 768-wide teacher, B=16, L=384, ~50% valid, dropout 0.1, stock HF vs
kdfast, for each of --step-losses (logit: logit KD; layer: logit KD + hidden MSE + attention KL; see
step_sides) and --step-dtypes (bfloat16: torch.autocast around the forwards and the loss). Before
timing, the two sides' losses are computed with dropout off and must agree (else exit 1).

    OMP_NUM_THREADS=2 .venv/bin/python bench/attention_train.py --step --only-step
    # smoke size, results not in bench/results:
    ... --only-step --step-small --step-B 2 --step-L 64 --reps 1 --out-dir /tmp/bench
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import RESULTS, Bench  # noqa: E402

from kdfast.ops import attention  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--H", type=int, default=12)
    ap.add_argument("--L", type=int, default=384)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--infer", action="store_true", help="also fwd-only B=64 L=216")
    ap.add_argument("--step", action="store_true", help="also one distillation training step (see --step-*)")
    ap.add_argument("--only-step", action="store_true", help="only the distillation step (implies --step)")
    ap.add_argument("--step-B", type=int, default=16)
    ap.add_argument("--step-L", type=int, default=None, help="sequence length of the step (default: --L)")
    ap.add_argument("--step-losses", default=",".join(STEP_LOSSES), help="comma list of logit, layer")
    ap.add_argument("--step-dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16")
    ap.add_argument("--step-small", action="store_true",
                    help="smoke size: 2-layer 64-wide student, 4-layer 128-wide teacher (4 heads each)")
    ap.add_argument("--out-dir", default=RESULTS, help="where attention_train.csv is appended (default: %(default)s)")
    a = ap.parse_args(argv)
    step_losses = [x for x in a.step_losses.split(",") if x]
    step_dtypes = [x for x in a.step_dtypes.split(",") if x]
    for x in step_losses:
        if x not in STEP_LOSSES:
            ap.error(f"--step-losses: unknown {x!r}; expected some of {', '.join(STEP_LOSSES)}")
    for x in step_dtypes:
        if x not in STEP_TOLERANCE:
            ap.error(f"--step-dtypes: unknown {x!r}; expected some of {', '.join(STEP_TOLERANCE)}")
    B, H, L, D, p = a.B, a.H, a.L, a.D, a.p
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(L // 4, 3 * L // 4 + 1, (B,), generator=g)  # ~50% valid tokens
    mask = torch.arange(L)[None, :] < lengths[:, None]
    valid = mask.float().mean().item()
    bench = Bench("attention_train", out_dir=a.out_dir)
    for dname in ([] if a.only_step else a.dtypes.split(",")):
        dt = getattr(torch, dname)
        q, k, v = [(torch.randn(B, L, H, D, generator=g) * s).to(dt).transpose(1, 2).requires_grad_()
                   for s in (1.0, 1.0, 3.0)]
        go = torch.randn(B, H, L, D, generator=g).to(dt)
        am = mask[:, None, None, :]

        def clear():
            for x in (q, k, v):
                x.grad = None

        def kd():
            out = attention(q, k, v, mask=mask, dropout_p=p)
            out.backward(go)

        def sdpa():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=am, dropout_p=p)
            out.backward(go)

        cfg = f"B={B} H={H} L={L} D={D} valid={valid:.2f} p={p} {dname} threads={torch.get_num_threads()}"
        bench.run_interleaved("attention_train", {"torch-sdpa": sdpa, "kdfast": kd}, mode="fwd+bwd", x_name="L",
                              x_value=L, config=cfg, warmup=1, reps=a.reps, setup=clear)
    if a.infer:
        _inference(bench, a.reps)
    if a.step or a.only_step:
        _distill_step(bench, a.reps, a.step_B, a.step_L or L, p, step_losses, step_dtypes, a.step_small)
    bench.table()


def _inference(bench, reps):
    """Forward only (inference, no grad): B=64 H=12 L=216 D=64, ~80% valid, fp32."""
    B, H, L, D = 64, 12, 216, 64
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    q, k, v = [torch.randn(B, L, H, D, generator=g).transpose(1, 2) for _ in range(3)]
    am = mask[:, None, None, :]

    def kd():
        with torch.no_grad():
            attention(q, k, v, mask=mask)

    def sdpa():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, attn_mask=am)
    cfg = f"B={B} H={H} L={L} D={D} valid={mask.float().mean().item():.2f} float32 threads={torch.get_num_threads()}"
    bench.run_interleaved("attention_infer", {"torch-sdpa": sdpa, "kdfast": kd}, mode="fwd", x_name="L", x_value=L,
                          config=cfg, warmup=1, reps=reps)


STEP_LOSSES = ("logit", "layer")
STEP_PROVIDERS = {"logit": "hf-sdpa", "layer": "hf-eager-maps"}
# loss check before timing (dropout off): relative tolerance of |stock - kdfast| / |stock| per dtype
STEP_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
LAYER_LOSSES = {"hidden": 1.0, "attention_kl": 1.0}


def step_sizes(variant, small=False):
    """(layers, hidden, heads) of the student and of the teacher. The per-head attention KL of the layer
    variant needs the teacher's head count in the student (12 heads of 32, as bench/layer_kd_hf.py)."""
    if small:
        return (2, 64, 4), (4, 128, 4)
    return (3, 384, 6 if variant == "logit" else 12), (6, 768, 12)


def step_batch(B, L, seed=2):
    """Random token ids and a right-padded attention mask with ~50% valid tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(L // 4, 3 * L // 4 + 1, (B,), generator=g)
    am = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = torch.randint(0, 30522, (B, L), generator=g)
    return ids, am


class Side:
    """One provider of the step: loss(dtype) runs the forwards (teacher under no_grad) and returns the loss;
    student: the model to train; params: what the optimizer updates (student, and the projection)."""

    def __init__(self, loss, student, params):
        self.loss, self.student, self.params = loss, student, list(params)


def _autocast(dtype):
    """bf16: autocast around the forwards and the loss (backward outside); float32: nothing."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def _bert(impl, size, p, seed):
    from transformers import AutoModelForQuestionAnswering, BertConfig
    layers, hidden, heads = size
    torch.manual_seed(seed)
    cfg = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                     intermediate_size=4 * hidden, hidden_dropout_prob=p, attention_probs_dropout_prob=p)
    return AutoModelForQuestionAnswering.from_config(cfg, attn_implementation=impl)


def _hf_logit_kd(s_out, t_out, valid):
    """Plain PyTorch: KL(teacher || student) of the start and of the end distributions over valid tokens.
    The logits are taken in float32 (under CPU autocast log_softmax stays bf16, which loses ~7% of a small KL)."""
    loss = 0.0
    for sl, tl_ in ((s_out.start_logits.float(), t_out.start_logits.float()),
                    (s_out.end_logits.float(), t_out.end_logits.float())):
        sl = sl.masked_fill(~valid, -1e4)
        tl_ = tl_.masked_fill(~valid, -1e4)
        loss = loss + F.kl_div(F.log_softmax(sl, -1), F.log_softmax(tl_, -1), log_target=True,
                               reduction="batchmean")
    return loss


def _kdfast_logit_kd(s_out, t_out, am):
    """The same loss with kdfast's fused QA KD loss: mean of start and end terms, soft_weight 2 = their sum."""
    from kdfast.ops import qa_kd_loss
    return qa_kd_loss(s_out.start_logits, s_out.end_logits, t_out.start_logits, t_out.end_logits, mask=am,
                      temperature=1.0, soft_weight=2.0, hard_weight=0.0)


def step_sides(variant, ids, am, p, small=False):
    """{provider: Side} of one distillation step, the stock HF side first, then kdfast; same weights, batch.

    logit: stock = SDPA models + F.kl_div on the start/end logits; kdfast = kdfast attention,
    unpad_encoder (attention on packed tokens, attention_varlen) and qa_kd_loss.
    layer: logit KD + hidden-state MSE (learnable shared Linear D_s -> D_t) + MiniLM attention KL on
    uniformly mapped layers (student m <- teacher m * N / M). Stock = eager models with output_attentions
    and output_hidden_states, losses on the returned [B, H, L, L] maps in PyTorch (during training HF
    returns the maps after attention dropout, so the KL sees the dropped maps there); kdfast = kdfast
    attention + unpad_encoder (linears, FFN, LayerNorms and the attention on packed tokens:
    attention_varlen) + kdfast.hf.capture (zero-padded copies of q/k of the mapped layers only) +
    qa_kd_loss + kdfast.nn.LayerKD (hidden_mse, attention_kl).
    """
    import kdfast.hf
    from kdfast.hf.capture import capture
    from kdfast.nn import LayerKD
    s_size, t_size = step_sizes(variant, small)
    valid = am.bool()
    models = {}
    for impl in ("sdpa" if variant == "logit" else "eager", "kdfast"):
        student = _bert(impl, s_size, p, 0).train()
        teacher = _bert(impl, t_size, p, 1).eval()
        if models:  # identical weights on both sides
            first_s, first_t = next(iter(models.values()))
            student.load_state_dict(first_s.state_dict())
            teacher.load_state_dict(first_t.state_dict())
        models[impl] = (student, teacher)
    (hf_s, hf_t), (kd_s, kd_t) = models.values()
    kdfast.hf.unpad_encoder(kd_s)
    kdfast.hf.unpad_encoder(kd_t)

    if variant == "logit":
        def logit_loss(student, teacher, kd):
            def loss_of(dtype):
                with _autocast(dtype):
                    with torch.no_grad():
                        t = teacher(input_ids=ids, attention_mask=am)
                    s = student(input_ids=ids, attention_mask=am)
                    loss = kd(s, t)
                    return loss, {"logit": loss}
            return loss_of
        hf_loss = logit_loss(hf_s, hf_t, lambda s, t: _hf_logit_kd(s, t, valid))
        kd_loss = logit_loss(kd_s, kd_t, lambda s, t: _kdfast_logit_kd(s, t, am))
        return {STEP_PROVIDERS[variant]: Side(hf_loss, hf_s, hf_s.parameters()),
                "kdfast": Side(kd_loss, kd_s, kd_s.parameters())}

    torch.manual_seed(3)
    layer_kd = LayerKD(kd_s.config, kd_t.config, mapping="uniform", losses=LAYER_LOSSES)
    proj = torch.nn.Linear(s_size[1], t_size[1])  # the stock side's own projection, same initial weights
    proj.load_state_dict(layer_kd.hidden_proj[0].state_dict())
    M, N, H = s_size[0], t_size[0], s_size[2]
    pairs = [(m, m * N // M) for m in range(1, M + 1)]  # uniform mapping, 1-based layers
    if pairs != list(layer_kd.pairs) or pairs != list(layer_kd.attention_map.pairs):
        raise RuntimeError(f"distill_step: layer mapping {pairs} differs from LayerKD's {layer_kd.pairs}")
    n_valid = valid.sum()
    pair_mask = valid[:, None, :, None] & valid[:, None, None, :]

    def hf_loss(dtype):
        with _autocast(dtype):
            with torch.no_grad():
                t = hf_t(input_ids=ids, attention_mask=am, output_hidden_states=True, output_attentions=True)
            s = hf_s(input_ids=ids, attention_mask=am, output_hidden_states=True, output_attentions=True)
            terms = {"logit": _hf_logit_kd(s, t, valid), "hidden": 0.0, "attention_kl": 0.0}
            for ls, lt in pairs:
                terms["hidden"] = terms["hidden"] + F.mse_loss(proj(s.hidden_states[ls])[valid],
                                                               t.hidden_states[lt][valid])
                p_s, p_t = s.attentions[ls - 1], t.attentions[lt - 1]
                kl = p_t * (p_t.clamp_min(1e-30).log() - p_s.clamp_min(1e-30).log())
                terms["attention_kl"] = terms["attention_kl"] + torch.where(pair_mask, kl, 0.0).sum() / (H * n_valid)
            return terms["logit"] + terms["hidden"] + terms["attention_kl"], terms

    def kd_loss(dtype):
        with _autocast(dtype):
            with capture(kd_s, **layer_kd.capture_args("student")) as cs, \
                    capture(kd_t, **layer_kd.capture_args("teacher")) as ct:
                with torch.no_grad():
                    t = kd_t(input_ids=ids, attention_mask=am, output_hidden_states=True)
                s = kd_s(input_ids=ids, attention_mask=am, output_hidden_states=True)
            layer, terms = layer_kd(s.hidden_states, cs.layers, t.hidden_states, ct.layers, am)
            logit = _kdfast_logit_kd(s, t, am)
            return logit + layer, {"logit": logit, **terms}
    return {STEP_PROVIDERS[variant]: Side(hf_loss, hf_s, [*hf_s.parameters(), *proj.parameters()]),
            "kdfast": Side(kd_loss, kd_s, [*kd_s.parameters(), *layer_kd.parameters()])}


def check_step_losses(sides, variant, dname):
    """Both sides' losses once with dropout off (students in eval mode, same batch); prints them and exits
    (status 1) if the totals or any term differ by more than the dtype's relative tolerance.
    Returns {provider: {"total": value, term: value, ...}}."""
    dt = getattr(torch, dname)
    values = {}
    for name, side in sides.items():
        side.student.eval()
        try:
            total, terms = side.loss(dt)
            values[name] = {"total": total.item(), **{k: v.item() for k, v in terms.items()}}
        finally:
            side.student.train()
    (ref_name, ref), (name, val) = values.items()
    tol = STEP_TOLERANCE[dname]
    print(f"distill_step loss check {variant} {dname} (dropout off, tol {tol:g} relative):", flush=True)
    bad = []
    for term in ref:
        rel = abs(val[term] - ref[term]) / max(abs(ref[term]), 1e-12)
        print(f"  {term:12s} {ref_name} {ref[term]:.7g}  {name} {val[term]:.7g}  rel diff {rel:.2e}", flush=True)
        if not rel <= tol:
            bad.append(f"{term} {ref[term]:.7g} vs {val[term]:.7g} (rel diff {rel:.2e})")
    if bad:
        sys.exit(f"distill_step {variant} {dname}: {ref_name} and {name} losses differ beyond tolerance {tol:g}: "
                 f"{'; '.join(bad)}; the two steps do not compute the same loss, not timed")
    return values


def _distill_step(bench, reps, B, L, p, losses=STEP_LOSSES, dtypes=("float32", "bfloat16"), small=False):
    """One distillation training step (student forward + teacher forward under no_grad + loss + backward +
    SGD step), stock HF vs kdfast, per loss variant (step_sides) and dtype (bf16: autocast). The losses of
    the two sides are checked to agree (dropout off) before the steps are timed with dropout p."""
    ids, am = step_batch(B, L)
    valid = am.float().mean().item()
    for variant in losses:
        (sl, sh, sH), (tl, th, _) = step_sizes(variant, small)
        for dname in dtypes:
            dt = getattr(torch, dname)
            sides = step_sides(variant, ids, am, p, small)
            check_step_losses(sides, variant, dname)
            runs = {}
            for name, side in sides.items():
                opt = torch.optim.SGD(side.params, lr=1e-4)

                def step(side=side, opt=opt):
                    loss, _ = side.loss(dt)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                runs[name] = step
            if variant == "logit":
                what = "logit-KD; hf: sdpa + F.kl_div; kdfast: attention_varlen (unpad_encoder) + qa_kd_loss"
            else:
                what = ("logit+hidden+attention-KL; hf: eager output_attentions maps; kdfast: unpad_encoder "
                        "+ attention_varlen + capture (padded q/k copies) + qa_kd_loss + LayerKD")
            cfg = (f"{variant}-KD {dname} student {sl}x{sh} H{sH} teacher {tl}x{th} B={B} L={L} valid={valid:.2f} "
                   f"p={p} threads={torch.get_num_threads()} {what}")
            bench.run_interleaved("distill_step", runs, mode="train-step", x_name="L", x_value=L, config=cfg,
                                  warmup=1, reps=reps)


if __name__ == "__main__":
    main()
