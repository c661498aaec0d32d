"""Layer distillation losses: kdfast (no L x L maps) vs the materialising eager losses.

Times forward+backward of attention_score_mse, attention_kl (also as the MiniLM
value relation, attention_kl(v, v, v_t, v_t): config "... value relation")
and hidden_mse against the PyTorch code a user would write (materialise
both [B, H, L, L] maps, mask, reduce; autograd), in the same process, with
peak extra memory (RSS on CPU, allocator peak on GPU).

The attention losses are timed interleaved (kdfast, eager, kdfast, eager, ...)
so that a slow phase of a shared machine hits both alike. Two memory numbers:

  peak_memory     honest peak extra memory of one step over what was in use
                  before it (inputs, and no gradients: they are freed first),
                  INCLUDING the returned gradient tensors (.grad of q_s, k_s).
  working_memory  the same peak minus the bytes of the returned gradients: what
                  the loss itself costs beyond its inputs and outputs (same
                  definition for kdfast and eager).

Default run (< 3 min on a 2-core CPU): B=4 at L=384 and B=1 at L=2048, H=12,
D=64 (reduced batch: the eager baseline is slow and large on 2 cores).
``--mmap-malloc``: exact RSS peaks (see _reexec_with_mmap_malloc); times
from the default mode. ``--full``: the issue's sizes, B=32 at L=384 and B=32 at L=2048 (the eager
baseline at L=2048 needs ~6 GiB per map; it is reported as failed if it
cannot run); ``--full --only-l 384`` runs only the issue's B=32, L=384 cases
(~1.5 min on 2 cores). ``--compile`` adds torch.compile of the eager losses.

    python bench/layer_kd.py [--full [--only-l 384]] [--compile] [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import Bench  # noqa: E402

import kdfast  # noqa: E402
from kdfast.ops import (attention_kl, attention_kl_reference, attention_score_mse,  # noqa: E402
                        attention_score_mse_reference, hidden_mse, hidden_mse_reference)


def eager_score_mse(q_s, k_s, q_t, k_t, mask):
    return attention_score_mse_reference(q_s, k_s, q_t, k_t, mask)


def eager_kl(q_s, k_s, q_t, k_t, mask):
    return attention_kl_reference(q_s, k_s, q_t, k_t, mask)


def inputs(B, H, L, D, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda: (torch.randn(B, H, L, D, generator=g) * 2).to(device=device, dtype=dtype)  # noqa: E731
    q_s, k_s, q_t, k_t = mk().requires_grad_(), mk().requires_grad_(), mk(), mk()
    mask = torch.ones(B, L, device=device)
    for b in range(B):  # realistic padding: lengths from L/2 to L
        mask[b, L // 2 + (b * 37) % (L // 2 + 1):] = 0
    mask[0] = 1
    return q_s, k_s, q_t, k_t, mask


def step(fn, args):
    def run():
        fn(*args).backward()
    return run


def clear(grads):
    """setup() for the harness: free the previous step's gradients before each step (not timed, and not in the
    memory baseline), so every step allocates its gradients afresh as a training step with zero_grad(None)."""
    def run():
        for x in grads:
            x.grad = None
    return run


def grad_bytes(grads):
    return sum(x.grad.numel() * x.grad.element_size() for x in grads if x.grad is not None)


def _reexec_with_mmap_malloc():
    """Peak memory is sampled as RSS. glibc keeps freed large blocks mapped (its mmap threshold
    grows after frees), which hides the peaks of later runs (reported as ~0 MiB); a fixed
    threshold makes every block >= 128 KiB its own mapping, returned to the OS when freed, so
    RSS follows live memory. It also adds page-fault time to every large allocation, so use
    this mode for memory and the default mode for time."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main(argv=None):
    if "--mmap-malloc" in sys.argv:
        _reexec_with_mmap_malloc()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="issue sizes: B=32 at L=384 and L=2048")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the eager losses")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (providers interleaved in each round)")
    ap.add_argument("--only-l", type=int, default=None, help="run only the size with this L")
    ap.add_argument("--scaling", action="store_true",
                    help="kdfast only, B=1, L = 512..4096: how time and peak memory grow with L")
    ap.add_argument("--eager-limit-gib", type=float, default=4.0,
                    help="skip the eager baseline when one [B, H, L, L] float32 map exceeds this")
    ap.add_argument("--mmap-malloc", action="store_true",
                    help="re-run under glibc MALLOC_MMAP_THRESHOLD_=128K so that RSS peaks are exact "
                         "(use for the memory column; times then include page faults)")
    ap.add_argument("--quick", action="store_true", help="B=2, L=384 only, 2 reps (make demo)")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    H, D = 12, 64
    sizes = [(32, 384), (32, 2048)] if a.full else [(4, 384), (1, 2048)]
    if a.quick:
        sizes, a.reps = [(2, 384)], 2
    bench = Bench("layer_kd", device=a.device)
    working = []
    # Config tag: dtype, and "mm" when RSS peaks are exact (--mmap-malloc).
    tag = {"float32": "fp32", "bfloat16": "bf16"}[a.dtype] + (" mm" if a.mmap_malloc else "")
    if a.scaling:
        for L in (512, 1024, 2048, 4096):
            q_s, k_s, q_t, k_t, mask = inputs(1, H, L, D, a.device, dtype)
            cfg = f"B=1 H{H} D{D} {tag}"
            for name, ours in (("attention_score_mse", attention_score_mse), ("attention_kl", attention_kl)):
                bench.run(name, "kdfast", step(ours, (q_s, k_s, q_t, k_t, mask)), mode="fwd+bwd",
                          x_name="L", x_value=L, config=cfg, warmup=1, reps=1, setup=clear((q_s, k_s)))
        bench.table()
        return
    for B, L in sizes:
        if a.only_l is not None and L != a.only_l:
            continue
        map_gib = B * H * L * L * 4 / 2**30
        run_eager = map_gib <= a.eager_limit_gib
        if not run_eager:
            print(f"B={B} L={L}: eager baseline skipped, one score map alone is {map_gib:.1f} GiB "
                  f"(--eager-limit-gib {a.eager_limit_gib})", file=sys.stderr)
        cfg = f"B={B} H{H} D{D} {tag}"
        q_s, k_s, q_t, k_t, mask = inputs(B, H, L, D, a.device, dtype)
        # Kernel column = op name; the MiniLM value relation is attention_kl(v, v, v_t, v_t), tagged in the config.
        cases = [
            ("attention_score_mse", cfg, attention_score_mse, eager_score_mse, (q_s, k_s, q_t, k_t, mask)),
            ("attention_kl", cfg, attention_kl, eager_kl, (q_s, k_s, q_t, k_t, mask)),
            ("attention_kl", f"{cfg} value relation", lambda v, _, vt, __, m: attention_kl(v, v, vt, vt, m),
             lambda v, _, vt, __, m: eager_kl(v, v, vt, vt, m), (q_s, k_s, q_t, k_t, mask)),
        ]
        for name, case_cfg, ours, eager, args in cases:
            kw = dict(mode="fwd+bwd", x_name="L", x_value=L, config=case_cfg, warmup=1, reps=a.reps,
                      setup=clear((q_s, k_s)))
            fns = {"kdfast": step(ours, args)}
            if run_eager:
                fns["torch-eager"] = step(eager, args)
            if a.compile and run_eager:
                fns["torch-compile"] = step(torch.compile(eager), args)
            ms = bench.run_interleaved(name, fns, **kw)
            # Both providers return the same gradients (q_s, k_s; only q_s for the value relation).
            gb = grad_bytes((q_s, k_s))
            for provider, m in (ms or {}).items():
                work = max(0, m["peak_bytes"] - gb) / 2**20
                bench.add_metric(name, provider, "working_memory", "MiB", work, mode="fwd+bwd", x_name="L",
                                 x_value=L, config=case_cfg)
                working.append((name, case_cfg, L, provider, m["peak_bytes"] / 2**20, gb / 2**20, work))
        # hidden_mse with a projection (768 -> 768 style, on [B, L, H * D]).
        Dm = H * D
        hs = (torch.randn(B, L, Dm) * 2).to(a.device, dtype).requires_grad_()
        ht = (torch.randn(B, L, Dm) * 2).to(a.device, dtype)
        W = (torch.randn(Dm, Dm) / Dm ** 0.5).to(a.device, dtype).requires_grad_()
        bias = torch.zeros(Dm).to(a.device, dtype).requires_grad_()
        kw = dict(mode="fwd+bwd", x_name="L", x_value=L, config=f"B={B} D{Dm} {tag}", warmup=1, reps=a.reps)
        kw["setup"] = clear((hs, W, bias))
        bench.run("hidden_mse", "kdfast", step(hidden_mse, (hs, ht, W, bias, mask)), **kw)
        bench.run("hidden_mse", "torch-eager", step(hidden_mse_reference, (hs, ht, W, bias, mask)),
                  **kw)
        print(f"done B={B} L={L}: backends {kdfast.explain('attention_kl', q_s, k_s, q_t, k_t)}", file=sys.stderr)
    bench.table()
    if working:
        print("\nworking memory = peak extra memory minus the returned gradient tensors (MiB; the plain peak above "
              "includes them)")
        print(f"{'kernel':22s} {'config':40s} {'provider':14s} {'peak':>8s} {'grads':>8s} {'working':>8s} {'x':>7s}")
        ours = {(n, c, L): w for n, c, L, p, _, _, w in working if p == "kdfast"}
        for n, c, L, p, peak, g, w in working:
            mine = ours.get((n, c, L))
            x = f"{w / mine:.1f}x" if p != "kdfast" and mine else ""
            print(f"{n:22s} {(c + ' L=' + str(L))[:40]:40s} {p:14s} {peak:8.1f} {g:8.1f} {w:8.1f} {x:>7s}")


if __name__ == "__main__":
    main()
