"""Fused LM-head + distillation loss: kdfast.ops.fused_linear_kd_loss against
materialising the logits (torch eager and torch.compile) and Liger's
LigerFusedLinearJSD when installed. Forward + backward (student hidden and
weight gradients), time and peak memory.

    python bench/fused_linear_kd.py                  # N in {1024, 4096}, V=30522, H=768, fp32, CPU (< 3 min)
    python bench/fused_linear_kd.py --full           # adds H=4096, V=128256 (needs a big machine / GPU)
    python bench/fused_linear_kd.py --device cuda --dtype bf16

Loss in every provider: 0.5 * T^2 * KL(teacher || student) (batchmean, T=2)
+ 0.5 * CE(student, labels); teacher under no_grad. Liger computes JSD with
beta=0 (= KL) and no hard term: its row is labelled so.
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

from kdfast.ops import fused_linear_kd_loss  # noqa: E402

T = 2.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def eager_loss(sh, sw, th, tw, labels):
    s = F.linear(sh, sw)
    with torch.no_grad():
        t = F.linear(th, tw)
    kl = F.kl_div(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1), log_target=True,
                  reduction="batchmean")
    return 0.5 * T * T * kl + 0.5 * F.cross_entropy(s.float(), labels)


def kdfast_loss(sh, sw, th, tw, labels):
    return fused_linear_kd_loss(sh, sw, th, tw, labels, temperature=T, soft_weight=0.5, hard_weight=0.5)


def step(loss_fn, sh, sw, th, tw, labels):
    def fn():
        sh.grad = sw.grad = None
        loss_fn(sh, sw, th, tw, labels).backward()
    return fn


def liger_step(sh, sw, th, tw, labels):
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=T)
    return step(lambda a, b, c, d, e: jsd(a, b, c, d, e), sh, sw, th, tw, labels)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--full", action="store_true", help="also H=4096, V=128256")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--N", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--quick", action="store_true", help="N=512 only (make demo)")
    args = ap.parse_args(argv)
    if args.quick:
        args.N = [512]
    dtype = DTYPES[args.dtype]
    shapes = [(768, 30522)] + ([(4096, 128256)] if args.full else [])
    b = Bench("fused_linear_kd", device=args.device)
    cpu = args.device == "cpu"
    for H, V in shapes:
        for N in args.N:
            g = torch.Generator().manual_seed(0)
            sh = torch.randn(N, H, generator=g).to(args.device, dtype).requires_grad_()
            sw = (torch.randn(V, H, generator=g) / H ** 0.5 * 4).to(args.device, dtype).requires_grad_()
            th = torch.randn(N, H, generator=g).to(args.device, dtype)
            tw = (torch.randn(V, H, generator=g) / H ** 0.5 * 4).to(args.device, dtype)
            labels = torch.randint(0, V, (N,), generator=g).to(args.device)
            cfg = f"N={N} H={H} {args.dtype}"
            # A CPU fwd+bwd at N=4096 is 4 GEMMs of ~190 GFLOP each (~8 s for kdfast on 2 cores):
            # few reps keep the default run under 3 minutes. torch.compile always gets a warm-up
            # so that compilation is never timed.
            if not cpu:
                reps, creps = dict(warmup=3, reps=10), dict(warmup=3, reps=10)
            elif N * V * H > 2 ** 35:
                reps, creps = dict(warmup=0, reps=1), dict(warmup=1, reps=1)
            else:
                reps, creps = dict(warmup=1, reps=3), dict(warmup=1, reps=3)
            kw = dict(mode="fwd+bwd", x_name="V", x_value=V, config=cfg)
            b.run("fused_linear_kd", "kdfast", step(kdfast_loss, sh, sw, th, tw, labels), **kw, **reps)
            b.run("fused_linear_kd", "torch-eager", step(eager_loss, sh, sw, th, tw, labels), **kw, **reps)
            if not args.no_compile:
                b.run("fused_linear_kd", "torch-compile", step(torch.compile(eager_loss), sh, sw, th, tw, labels),
                      **kw, **creps)
            lg = liger_step(sh, sw, th, tw, labels)
            if lg is not None:
                b.run("fused_linear_kd", "liger-jsd(beta=0,no CE)", lg, **kw, **creps)
            del sh, sw, th, tw
    b.table()


if __name__ == "__main__":
    main()
