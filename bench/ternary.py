"""Ternary matmul benchmark: kdfast W2A8 / W2-fp32 vs torch fp32, bf16 and int8 dynamic quantization.

    python bench/ternary.py            # subset, < 3 min on a 2-core CPU
    python bench/ternary.py --full     # all shapes x M in {1, 16, 384}
    python bench/ternary.py --threads 2
    python bench/ternary.py --bert384  # BERT shapes at M=384 only (the W2A8 vs int8 target)
    python bench/ternary.py --crossover  # float path: register-unpack kernel vs decode + GEMM, per M

Shapes are "in x out" of a Linear: BERT (768x768, 768x3072, 3072x768) and LLM
(4096x4096, 4096x11008). Also measures the saved size of a BERT-base-shaped
encoder's linear layers (12 x [4 x 768x768, 768x3072, 3072x768]), fp32 vs
ternary. Prints the issue's targets with PASS / MISS. Results append to
bench/results/ternary.csv.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import Bench  # noqa: E402

from kdfast import cpu_isa  # noqa: E402
from kdfast.compress import quantize  # noqa: E402
from kdfast.ops import pack_ternary, ternarize, ternary_linear  # noqa: E402

BERT = [(768, 768), (768, 3072), (3072, 768)]
LLM = [(4096, 4096), (4096, 11008)]
OURS = "kdfast-w2a8"


def int8_dynamic(lin: nn.Linear):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)


def bench_shape(b: Bench, K: int, N: int, M: int, reps: int):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=g)
    w = lin.weight.detach()
    bias = lin.bias.detach()
    codes, scale = ternarize(w)
    packed = pack_ternary(codes)
    x = torch.randn(M, K, generator=g)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()
    with torch.no_grad():
        ref = int8_dynamic(lin)
    cfg = f"{K}x{N}"
    common = dict(mode="fwd", x_name="M", x_value=M, config=cfg, reps=reps)
    with torch.no_grad():
        b.run("ternary_linear", "torch-fp32", lambda: F.linear(x, w, bias), **common)
        b.run("ternary_linear", "torch-bf16", lambda: F.linear(xb, wb, bb), **common)
        b.run("ternary_linear", "torch-int8-dynamic", lambda: ref(x), **common)
        b.run("ternary_linear", OURS, lambda: ternary_linear(x, packed, scale, bias, act_bits=8), **common)
        b.run("ternary_linear", "kdfast-w2-fp32", lambda: ternary_linear(x, packed, scale, bias), **common)
        b.run("ternary_linear", "kdfast-w2-bf16", lambda: ternary_linear(xb, packed, scale, bb), **common)


def crossover(threads_note: str):
    """Float-activation path: the register-unpack kernel vs decode + torch GEMM, per M (not recorded).

    Prints the best of several timings (ms); DENSE_MIN_ROWS in kdfast/ops/ternary_linear.py was
    chosen from this table.
    """
    import time

    from kdfast.ops.ternary_linear import DENSE_MIN_ROWS, _cpu_dense

    def best(fn, reps):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts) * 1e3

    print(f"crossover ({threads_note}); thresholds now: "
          + ", ".join(f"{str(k)[6:]} M >= {v}" for k, v in DENSE_MIN_ROWS.items()))
    for K, N in [(768, 768), (768, 3072), (3072, 768), (4096, 11008)]:
        g = torch.Generator().manual_seed(0)
        codes, scale = ternarize(torch.randn(N, K, generator=g) * 0.05)
        packed = pack_ternary(codes)
        sw = scale.float().contiguous()
        bias = torch.randn(N, generator=g)
        for M in (1, 4, 16, 64, 128, 384):
            x = torch.randn(M, K, generator=g)
            reps = 3 if K * N * M > 2e9 else (5 if K * N * M > 2e8 else 15)
            cells = []
            for dt in (torch.float32, torch.bfloat16):
                xd, bd = x.to(dt), bias.to(dt)
                w = (codes.to(dt) * sw.to(dt)[:, None]).contiguous()
                kern = best(lambda: torch.ops.kdfast_C.ternary_linear_f32(
                    xd.float().contiguous(), packed, sw, bias, K).to(dt), reps)
                dense = best(lambda: _cpu_dense(xd, packed, sw, bd), reps)
                ref = best(lambda: F.linear(xd, w, bd), reps)
                cells.append(f"{str(dt)[6:]} kern {kern:.3f} dense {dense:.3f} torch {ref:.3f}")
            print(f"  {K}x{N} M={M}: " + " | ".join(cells), flush=True)


def encoder_sizes():
    """Saved bytes of a BERT-base encoder's linear layers: fp32 state_dict vs ternary (packed)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        layers += [nn.Linear(768, 768) for _ in range(4)] + [nn.Linear(768, 3072), nn.Linear(3072, 768)]
    enc = nn.Sequential(*layers)

    def nbytes(sd):
        buf = io.BytesIO()
        torch.save(sd, buf)
        return buf.tell()

    fp32 = nbytes(enc.state_dict())
    tern = nbytes(quantize(enc, method="twn", act_bits=8, skip=None).state_dict())
    return fp32, tern


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="all shapes x M in {1, 16, 384}")
    ap.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per provider (3 for the largest shapes)")
    ap.add_argument("--quick", action="store_true", help="768x3072 M=384 and 4096x11008 M=1 only (make demo)")
    ap.add_argument("--bert384", action="store_true", help="BERT shapes at M=384 only")
    ap.add_argument("--crossover", action="store_true",
                    help="float path: register-unpack kernel vs decode + GEMM per M (prints, records nothing)")
    ap.add_argument("--device", default="cpu", help="only cpu is measured by this script so far")
    args = ap.parse_args(argv)
    if args.device != "cpu":
        print(f"bench/ternary.py measures CPU kernels only; --device {args.device} is not supported yet")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    b = Bench("ternary")
    amx = torch.ops.kdfast_C.ternary_amx_available() if hasattr(torch.ops.kdfast_C, "ternary_amx_available") else False
    load = os.getloadavg()[0]
    print(f"device: {b.dev_name}; kdfast CPU path: {cpu_isa.current_isa()}{' + AMX-INT8 (M >= 64)' if amx else ''}; "
          f"load average {load:.1f} on {os.cpu_count()} cores", flush=True)
    if load > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print("  note: the machine is oversubscribed; multi-threaded timings will be dominated by scheduler "
              "ticks. --threads 1 gives comparable numbers.", flush=True)
    if args.crossover:
        crossover(f"{torch.get_num_threads()} threads, load average {load:.1f}")
        return
    if args.bert384:
        plan = [(K, N, 384) for (K, N) in BERT]
    elif args.quick:
        plan = [(768, 3072, 384), (4096, 11008, 1)]
    elif args.full:
        plan = [(K, N, M) for (K, N) in BERT + LLM for M in (1, 16, 384)]
    else:
        plan = [(K, N, 384) for (K, N) in BERT] + [(768, 768, 1), (4096, 11008, 1), (4096, 11008, 16)]
    for K, N, M in plan:
        reps = args.reps if K * N * M < 2e8 else (7 if K * N * M < 2e9 else 3)
        print(f"  {K}x{N} M={M}", flush=True)
        bench_shape(b, K, N, M, reps)
    b.table(ours=OURS)

    if not args.bert384:
        fp32, tern = encoder_sizes()
        print(f"\nBERT-base encoder linear layers, saved state_dict: fp32 {fp32 / 2**20:.1f} MiB, "
              f"ternary {tern / 2**20:.2f} MiB -> {fp32 / tern:.1f}x smaller")

    times = {}
    for r in b.rows:
        if r["metric"] == "time":
            times[(r["config"], r["x_value"], r["provider"])] = r["p50"]

    def ratio(cfg, M, base, ours=OURS):
        a, o = times.get((cfg, M, base)), times.get((cfg, M, ours))
        return None if a is None or o is None else a / o

    print("\nTargets (CPU):")
    checks = [(f"{K}x{N} M=384 vs int8 dynamic", ratio(f"{K}x{N}", 384, "torch-int8-dynamic"), 1.3)
              for K, N in BERT]
    checks += [("4096x11008 M=1 vs int8 dynamic", ratio("4096x11008", 1, "torch-int8-dynamic"), 2.0),
               ("4096x11008 M=1 vs fp32", ratio("4096x11008", 1, "torch-fp32"), 8.0)]
    for name, r, target in checks:
        if r is None:
            print(f"  {name}: not measured")
        else:
            print(f"  {name}: {r:.2f}x (target >= {target}x) {'PASS' if r >= target else 'MISS'}")
    if not args.bert384:
        sr = fp32 / tern
        print(f"  saved encoder size vs fp32: {sr:.1f}x (target >= 12x) {'PASS' if sr >= 12 else 'MISS'}")
    print("Float activations vs dense torch in the same dtype (speed-up; >= ~0.8x is 'not much slower'):")
    for (cfg, M, prov) in sorted(k for k in times if k[2] in ("kdfast-w2-fp32", "kdfast-w2-bf16")):
        r = ratio(cfg, M, "torch-fp32" if prov.endswith("fp32") else "torch-bf16", ours=prov)
        if r is not None:
            print(f"  {cfg} M={M} {prov}: {r:.2f}x")


if __name__ == "__main__":
    main()
