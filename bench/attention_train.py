"""Attention fwd+bwd for training: kdfast (valid-token GEMM tiles, in-kernel Philox dropout)
vs torch SDPA with the padding mask and the same dropout rate, same process, interleaved reps.

    OMP_NUM_THREADS=2 .venv/bin/python bench/attention_train.py [--B 16 --L 384 --reps 3]

Peak memory: harness.peak_memory (RSS sampler with large blocks mmap'd), extra over the
memory in use before the call, gradients included.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench  # noqa: E402

from kdfast.ops import attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--H", type=int, default=12)
    ap.add_argument("--L", type=int, default=384)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--infer", action="store_true", help="also fwd-only B=64 L=216")
    ap.add_argument("--step", action="store_true", help="also one logit-KD distillation step")
    ap.add_argument("--step-B", type=int, default=16)
    a = ap.parse_args()
    B, H, L, D, p = a.B, a.H, a.L, a.D, a.p
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(L // 4, 3 * L // 4 + 1, (B,), generator=g)  # ~50% valid tokens
    mask = torch.arange(L)[None, :] < lengths[:, None]
    valid = mask.float().mean().item()
    bench = Bench("attention_train")
    for dname in a.dtypes.split(","):
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
    if a.step:
        _distill_step(bench, a.reps, a.step_B, L, p)
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


def _distill_step(bench, reps, B, L, p):
    """One logit-KD training step: 3-layer 384-wide student (6 heads), 6-layer 768-wide teacher (no grad),
    BERT dropouts (attention 0.1); stock HF (SDPA) vs kdfast attention + unpadded encoder, fp32.
    The KD loss is the same plain PyTorch KL in both (fused kdfast losses not used here)."""
    import kdfast.hf
    from transformers import AutoModelForQuestionAnswering, BertConfig
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(L // 4, 3 * L // 4 + 1, (B,), generator=g)
    am = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = torch.randint(0, 30522, (B, L), generator=g)

    def build(impl, layers, hidden, heads, seed):
        torch.manual_seed(seed)
        cfg = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                         intermediate_size=4 * hidden, attention_probs_dropout_prob=p)
        return AutoModelForQuestionAnswering.from_config(cfg, attn_implementation=impl)

    runs = {}
    for name, impl in (("hf-sdpa", "sdpa"), ("kdfast", "kdfast")):
        student = build(impl, 3, 384, 6, 0).train()
        teacher = build(impl, 6, 768, 12, 1).eval()
        if impl == "kdfast":
            kdfast.hf.unpad_encoder(student)
            kdfast.hf.unpad_encoder(teacher)
        opt = torch.optim.SGD(student.parameters(), lr=1e-4)

        def step(student=student, teacher=teacher, opt=opt):
            with torch.no_grad():
                t = teacher(input_ids=ids, attention_mask=am)
            s = student(input_ids=ids, attention_mask=am)
            valid = am.bool()
            loss = 0.0
            for sl, tl_ in ((s.start_logits, t.start_logits), (s.end_logits, t.end_logits)):
                sl = sl.masked_fill(~valid, -1e4)
                tl_ = tl_.masked_fill(~valid, -1e4)
                loss = loss + F.kl_div(F.log_softmax(sl, -1), F.log_softmax(tl_, -1), log_target=True,
                                       reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        runs[name] = step
    cfg = (f"student 3x384 teacher 6x768 B={B} L={L} valid={am.float().mean().item():.2f} p={p} float32 "
           f"threads={torch.get_num_threads()} logit-KD")
    bench.run_interleaved("distill_step", runs, mode="train-step", x_name="L", x_value=L, config=cfg, warmup=1,
                          reps=reps)


if __name__ == "__main__":
    main()
