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

import kdfast  # noqa: E402
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
    bench.table()


if __name__ == "__main__":
    main()
