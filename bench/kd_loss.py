"""Benchmark: fused KD loss (kdfast.ops.kd_loss) forward+backward time and peak
memory against the losses a user would write instead, in the same process:

  torch-eager    T*T * F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T), log_target=True, "batchmean")
                 (JSD: the textbook mixture formula), with backward
  torch-compile  torch.compile of the same function
  liger          Liger-Kernel LigerKLDIVLoss / LigerJSD on log-probabilities (GPU, when installed)

Shapes: QA (B=32, L=384, start + end logits -> N=64 rows of V=384) and
vocabulary rows N in {1024, 4096, 8192} x V in {30522, 128256}. The CPU
default runs a subset that finishes in a few minutes on a 2-core machine;
--full runs everything. Results go to bench/results/kd_loss.csv.

    python bench/kd_loss.py                       # CPU subset, fp32, KL
    python bench/kd_loss.py --device cuda --full --dtype bf16
    python bench/kd_loss.py --divergence jsd
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench  # noqa: E402

import kdfast  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
T = 2.0
BETA = 0.5


def eager_kl(s, t):
    return T * T * F.kl_div(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1), log_target=True,
                            reduction="batchmean")


def eager_jsd(s, t):
    lq = F.log_softmax(s.float() / T, -1)
    lp = F.log_softmax(t.float() / T, -1)
    log_m = torch.logaddexp(lp + torch.log(torch.tensor(BETA)), lq + torch.log(torch.tensor(1 - BETA)))
    kl_p = F.kl_div(log_m, lp, log_target=True, reduction="sum")
    kl_q = F.kl_div(log_m, lq, log_target=True, reduction="sum")
    return T * T * (BETA * kl_p + (1 - BETA) * kl_q) / s.shape[0]


def ours(divergence):
    def f(s, t):
        return kdfast.ops.kd_loss(s, t, temperature=T, divergence=divergence, beta=BETA)
    return f


def liger(divergence, device):
    """Liger-Kernel's loss on log-probabilities, or None when it cannot run here."""
    if not device.startswith("cuda"):
        return None
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError:
        return None
    if divergence == "kl":
        mod = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda s, t: T * T * mod(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1))
    mod = LigerJSD(beta=BETA)
    return lambda s, t: T * T * mod(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1))


def shapes(device, full, quick=False):
    qa = [("qa", 64, 384)]
    if quick:
        return qa + [("vocab", 1024, 30522)]
    if full:
        return qa + [("vocab", n, v) for v in (30522, 128256) for n in (1024, 4096, 8192)]
    if device.startswith("cuda"):
        return qa + [("vocab", n, v) for v in (30522, 128256) for n in (1024, 4096)]
    return qa + [("vocab", 1024, 30522), ("vocab", 4096, 30522)]


def fwd_bwd(loss_fn, s, t):
    leaf = s.detach().requires_grad_()

    def step():
        loss = loss_fn(leaf, t)
        loss.backward()
        leaf.grad = None
        return loss

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--divergence", default="kl", choices=("kl", "jsd"))
    ap.add_argument("--full", action="store_true", help="all shapes (slow on CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--quick", action="store_true", help="QA shape and N=1024, V=30522 only (make demo)")
    args = ap.parse_args(argv)
    dev, dtype = args.device, DTYPES[args.dtype]
    bench = Bench("kd_loss", device=dev)
    eager = eager_kl if args.divergence == "kl" else eager_jsd
    providers = [("kdfast", ours(args.divergence)), ("torch-eager", eager)]
    if not args.no_compile:
        providers.append(("torch-compile", torch.compile(eager)))
    lig = liger(args.divergence, dev)
    if lig is not None:
        providers.append(("liger", lig))
    g = torch.Generator(device=dev).manual_seed(0)
    for name, n, v in shapes(dev, args.full, args.quick):
        s = (torch.randn(n, v, generator=g, device=dev) * 10).to(dtype)
        t = (torch.randn(n, v, generator=g, device=dev) * 10).to(dtype)
        big = n * v >= 4096 * 30522 and not dev.startswith("cuda")
        cfg = f"{name} N={n} {args.dtype} {args.divergence} T={T:g}"
        if name == "vocab":
            backend = kdfast.explain("kd_loss", s, t).backend
            print(f"{cfg} V={v}: kdfast backend {backend}; one logits buffer = "
                  f"{n * v * s.element_size() / 2**20:.0f} MiB", flush=True)
        for prov, fn in providers:
            if prov == "torch-compile":
                torch._dynamo.reset()  # a fresh graph per shape, so no recompile limit is hit
            bench.run("kd_loss", prov, fwd_bwd(fn, s, t), mode="fwd+bwd", x_name="V", x_value=v, config=cfg,
                      warmup=1 if big else 2, reps=3 if big else 7)
            gc.collect()
        del s, t
    bench.table()


if __name__ == "__main__":
    main()
