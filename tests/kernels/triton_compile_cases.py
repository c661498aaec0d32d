"""Launch cases for the Triton compile check (tests/kernels/test_triton_compile.py).

Each case calls a real launcher of kdfast/kernels/triton/*.py on meta tensors of a
realistic size, with the module's @triton.jit kernels replaced by recorders, so the
arguments, constexprs and num_warps compiled are exactly what the launcher passes on a
GPU. Run as a script (``python -m tests.kernels.triton_compile_cases OUT.json [case ...]``)
with TRITON_INTERPRET=0 it compiles every recorded launch for its target through
Triton's own toolchain (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin), binding the
arguments with Triton's own specialisation (dtypes, i32/i64, 16-byte alignment), and
writes one JSON record per (case, launch).

Case names are ``<module>.<what>@sm<NN>``; importing this module needs no GPU and does
not compile anything.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import sys
import time

import torch

MODULES = ("kd_loss", "ternary_linear", "attention", "attention_kl", "attention_score_mse", "hidden_mse")
# Per-block shared memory a launch may use (bytes): H100/H200 (sm_90) 227 KiB opt-in, A100 (sm_80) 163 KiB.
SHARED_LIMIT = {90: 228 * 1024, 80: 164 * 1024}
# CUDA grid limits: x up to 2^31 - 1 blocks, y and z up to 65535.
GRID_LIMIT = (2**31 - 1, 65535, 65535)
META = torch.device("meta")


def _t(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


# --------------------------------------------------------------------------
# Cases: name -> (targets, function(module) calling the launcher)
# --------------------------------------------------------------------------
CASES = {}


def case(module, what, targets=(90,)):
    def deco(fn):
        for cc in targets:
            CASES[f"{module}.{what}@sm{cc}"] = (module, cc, fn)
        return fn
    return deco


# kd_loss: student/teacher [N, V] any mix of fp32/bf16/fp16; V is a constexpr (one compile per vocabulary).
def _kd(m, V, s_dtype, t_dtype, labels, div, hard, T, bwd):
    N = 8
    s, t = _t(N, V, dtype=s_dtype), _t(N, V, dtype=t_dtype)
    lab = _t(N, dtype=torch.int64) if labels else None
    if not bwd:
        m.kd_loss_fwd(s, t, lab, T, div, 0.5, -100, hard)
    else:
        m.kd_loss_bwd(s, t, lab, _t(N, 4), _t(N, 2), T, div, 0.5, -100, hard)


BOTH = (90, 80)
case("kd_loss", "fwd_kl_bf16_labels_hard_T2_V128256", BOTH)(
    lambda m: _kd(m, 128256, torch.bfloat16, torch.bfloat16, True, 0, True, 2.0, False))
case("kd_loss", "fwd_kl_bf16_labels_hard_T1_V32000", BOTH)(
    lambda m: _kd(m, 32000, torch.bfloat16, torch.bfloat16, True, 0, True, 1.0, False))
case("kd_loss", "fwd_reverse_fp32_nolabels_V32000", BOTH)(
    lambda m: _kd(m, 32000, torch.float32, torch.float32, False, 1, False, 2.0, False))
case("kd_loss", "fwd_jsd_fp16_bf16_labels_soft_V50257", BOTH)(
    lambda m: _kd(m, 50257, torch.float16, torch.bfloat16, True, 2, False, 1.5, False))
case("kd_loss", "fwd_kl_fp32_bf16_labels_hard_V1000", BOTH)(
    lambda m: _kd(m, 1000, torch.float32, torch.bfloat16, True, 0, True, 4.0, False))
case("kd_loss", "bwd_kl_bf16_labels_hard_V128256", BOTH)(
    lambda m: _kd(m, 128256, torch.bfloat16, torch.bfloat16, True, 0, True, 2.0, True))
case("kd_loss", "bwd_reverse_fp32_nolabels_V32000", BOTH)(
    lambda m: _kd(m, 32000, torch.float32, torch.float32, False, 1, False, 2.0, True))
case("kd_loss", "bwd_jsd_fp16_bf16_labels_hard_V50257", BOTH)(
    lambda m: _kd(m, 50257, torch.float16, torch.bfloat16, True, 2, True, 1.0, True))
case("kd_loss", "bwd_kl_fp32_labels_soft_V10", BOTH)(
    lambda m: _kd(m, 10, torch.float32, torch.float16, True, 0, False, 1.0, True))


# ternary_linear: x [M, K] float (fp32/bf16/fp16) or int8; packed uint8 [N, 16 * K / 64].
def _tern(m, M, dtype, path):
    K, N = 4096, 4096
    m.ternary_accumulate(_t(M, K, dtype=dtype), _t(N, 16 * K // 64, dtype=torch.uint8), K, path=path)


for _dt, _name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.int8, "int8")):
    case("ternary_linear", f"gemm_{_name}", BOTH if _name in ("fp32", "int8") else (90,))(
        lambda m, _dt=_dt: _tern(m, 512, _dt, "gemm"))
    case("ternary_linear", f"gemv_{_name}")(lambda m, _dt=_dt: _tern(m, 8, _dt, "gemv"))


# attention: q, k, v [B, H, L, D] (fp32 -> IEEE fp32 dots; bf16/fp16 -> tensor-core dots), forward + backward.
def _attn(m, dtype, D, L=512, mask=False, gates=False, active=False, bs=None, zpq=False, keep_ungated=False,
          bwd=True):
    B, H = 2, 4
    q, k, v = _t(B, H, L, D, dtype=dtype), _t(B, H, L, D, dtype=dtype), _t(B, H, L, D, dtype=dtype)
    mk = _t(B, L, dtype=torch.bool) if mask else None
    g = _t(B, H, dtype=dtype) if gates else None
    act = _t(H, dtype=torch.bool) if active else None
    bm = _t(B, H, L // bs, L // bs, dtype=torch.bool) if bs else None
    scale = D ** -0.5
    out, lse, ung = m.attention_fwd(q, k, v, mk, g, act, bm, bs or 0, scale, zpq, keep_ungated)
    if bwd:
        m.attention_bwd(_t(B, H, L, D, dtype=dtype), q, k, v, out, ung, lse, mk, g, act, bm, bs or 0, scale, zpq)


case("attention", "bf16_d64")(lambda m: _attn(m, torch.bfloat16, 64))
case("attention", "bf16_d128_mask_gates_active_zpq_ungated", BOTH)(
    lambda m: _attn(m, torch.bfloat16, 128, mask=True, gates=True, active=True, zpq=True, keep_ungated=True))
case("attention", "fp16_d80_blockmask64")(lambda m: _attn(m, torch.float16, 80, mask=True, bs=64))
case("attention", "fp32_d64_mask")(lambda m: _attn(m, torch.float32, 64, mask=True, gates=True, keep_ungated=True))
case("attention", "bf16_d128_blockmask128")(lambda m: _attn(m, torch.bfloat16, 128, bs=128))
case("attention", "bf16_d256_blockmask128")(lambda m: _attn(m, torch.bfloat16, 256, bs=128))
case("attention", "fp32_d128_blockmask128", BOTH)(lambda m: _attn(m, torch.float32, 128, bs=128))


# attention varlen: packed q, k, v [T, H, D] with cu_seqlens [B + 1] (the same kernels, VARLEN=True), forward +
# backward; dropout draws tl.rand in all three kernels.
def _attn_varlen(m, dtype, D, lengths=(384, 201, 97, 1), gates=None, active=False, keep_ungated=False,
                 dropout=False):
    B, H, T, L = len(lengths), 4, sum(lengths), max(lengths)
    q, k, v = _t(T, H, D, dtype=dtype), _t(T, H, D, dtype=dtype), _t(T, H, D, dtype=dtype)
    cu = _t(B + 1, dtype=torch.int64)
    g = None if gates is None else _t(*((H,) if gates == "h" else (B, H)), dtype=dtype)
    act = _t(H, dtype=torch.bool) if active else None
    p = 0.1 if dropout else 0.0
    rng = _t(2, dtype=torch.int64) if dropout else None
    scale = D ** -0.5
    out, lse, ung = m.attention_varlen_fwd(q, k, v, cu, cu, L, L, g, act, scale, keep_ungated, p, rng)
    m.attention_varlen_bwd(_t(T, H, D, dtype=dtype), q, k, v, out, ung, lse, cu, cu, L, L, g, act, scale, p, rng)


case("attention", "varlen_bf16_d64")(lambda m: _attn_varlen(m, torch.bfloat16, 64))
case("attention", "varlen_bf16_d128_gates_active_ungated_dropout", BOTH)(
    lambda m: _attn_varlen(m, torch.bfloat16, 128, gates="bh", active=True, keep_ungated=True, dropout=True))
case("attention", "varlen_fp16_d80_gates_h")(lambda m: _attn_varlen(m, torch.float16, 80, gates="h"))
case("attention", "varlen_fp32_d64_dropout")(lambda m: _attn_varlen(m, torch.float32, 64, dropout=True))


# attention_kl / attention_score_mse on [B, H, L, D] q, k (any float dtype, student and teacher may
# differ), float32 [B, L] mask (the op's checks make it so); hidden_mse on [N, D] rows.
def _qk(B, H, L, Ds, Dt, ds, dt):
    return _t(B, H, L, Ds, dtype=ds), _t(B, H, L, Ds, dtype=ds), _t(B, H, L, Dt, dtype=dt), _t(B, H, L, Dt, dtype=dt)


# 16-bit students: the backward's launch, gradients weighted by grad_output [B, H] and stored in bf16.
case("attention_kl", "bf16_fp16_L384_d64_d128_weighted")(
    lambda m: m.attention_kl_fwd(*_qk(2, 12, 384, 64, 128, torch.bfloat16, torch.float16), _t(2, 384), 0.125,
                                 0.088, True, _t(2, 12)))
case("attention_kl", "fp32_L512_d128_d128", BOTH)(
    lambda m: m.attention_kl_fwd(*_qk(2, 12, 512, 128, 128, torch.float32, torch.float32), _t(2, 512), 0.088,
                                 0.088, True))
case("attention_score_mse", "bf16_fp32_L97_d48_d64_weighted")(
    lambda m: m.attention_score_mse_fwd(*_qk(2, 12, 97, 48, 64, torch.bfloat16, torch.float32), _t(2, 97), 0.14,
                                        0.125, True, _t(2, 12)))
case("attention_score_mse", "fp32_L512_d64_d128", BOTH)(
    lambda m: m.attention_score_mse_fwd(*_qk(2, 12, 512, 64, 128, torch.float32, torch.float32), _t(2, 512),
                                        0.125, 0.088, True))
for _kind in (0, 1):
    case("hidden_mse", f"kind{_kind}_proj_bf16_768_1024")(
        lambda m, _kind=_kind: m.hidden_mse_fwd(_t(4096, 768, dtype=torch.bfloat16), _t(4096, 1024,
                                                 dtype=torch.bfloat16), _t(1024, 768, dtype=torch.bfloat16),
                                                 _t(1024, dtype=torch.bfloat16), _t(4096), _kind, 1e-8, True))
case("hidden_mse", "kind0_noproj_fp32_1000")(
    lambda m: m.hidden_mse_fwd(_t(4096, 1000), _t(4096, 1000, dtype=torch.float16), None, None, _t(4096), 0,
                                1e-8, True))


# --------------------------------------------------------------------------
# Recording and compiling
# --------------------------------------------------------------------------
class _Recorder:
    """Stands for a kernel in its module: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kw: self.log.append((self.fn, tuple(grid), args, kw))


def jit_functions(mod):
    import triton
    return {n: f for n, f in vars(mod).items() if isinstance(f, triton.runtime.jit.JITFunction)}


def record(name):
    """The launches case ``name`` makes: [(JITFunction, grid, args, kwargs)]."""
    module, _, fn = CASES[name]
    mod = importlib.import_module(f"kdfast.kernels.triton.{module}")
    log = []
    saved = jit_functions(mod)
    try:
        for n, f in saved.items():
            setattr(mod, n, _Recorder(f, log))
        fn(mod)
    finally:
        for n, f in saved.items():
            setattr(mod, n, f)
    return log


def compile_launch(fn, args, kwargs, cc):
    """Compile one recorded launch for sm_<cc> the way JITFunction.run would; returns (compiled, ptxas log)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        c = triton.compile(src, target=target, options=options.__dict__)
    return c, log.getvalue()


def _ptxas_stats(log):
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores", log)
    return (int(regs[-1]) if regs else None), (int(spill[-1]) if spill else None)


def run(names):
    """Record and compile every case in ``names``; one dict per launch."""
    import triton  # noqa: F401
    from triton import knobs
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills
    out = []
    for name in names:
        module, cc, _ = CASES[name]
        try:
            launches = record(name)
        except Exception as e:  # the launcher itself failed
            out.append(dict(case=name, kernel=None, ok=False, error=f"launcher: {type(e).__name__}: {e}"))
            continue
        seen = set()
        for fn, grid, args, kw in launches:
            key = (fn.__name__, tuple(sorted((k, v) for k, v in kw.items())),
                   tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args))
            if key in seen:
                continue
            seen.add(key)
            rec = dict(case=name, kernel=fn.__name__, grid=list(grid), cc=cc,
                       meta={k: v for k, v in kw.items() if isinstance(v, (int, float, bool, str))})
            t0 = time.time()
            try:
                c, log = compile_launch(fn, args, kw, cc)
                regs, spills = _ptxas_stats(log)
                rec.update(ok=True, shared=c.metadata.shared, num_warps=c.metadata.num_warps,
                           num_stages=c.metadata.num_stages, regs=regs, spill_bytes=spills,
                           has_entry=".entry" in c.asm["ptx"], cubin_bytes=len(c.asm["cubin"]))
            except Exception as e:
                msg = str(e)
                if e.__cause__ is not None:  # Triton's CompilationError keeps the real error as its cause
                    msg = f"{type(e.__cause__).__name__}: {e.__cause__}\n{msg}"
                rec.update(ok=False, error=f"{type(e).__name__}: {msg[:4000]}")
            rec["seconds"] = round(time.time() - t0, 2)
            out.append(rec)
    return out


def coverage(records):
    """Per module: its @triton.jit functions compiled as kernels, those only called by them (helpers,
    compiled inside their callers) and those neither (no case launches them)."""
    out = {}
    for module in MODULES:
        fns = jit_functions(importlib.import_module(f"kdfast.kernels.triton.{module}"))
        kernels = sorted({r["kernel"] for r in records if r.get("ok") and r["kernel"] in fns})
        helpers = sorted(n for n in fns if n not in kernels
                         and any(re.search(rf"\b{n}\(", fns[k].src) for k in kernels))
        out[module] = dict(kernels=kernels, helpers=helpers,
                           uncovered=sorted(set(fns) - set(kernels) - set(helpers)))
    return out


def main(argv):
    path, names = argv[0], argv[1:] or list(CASES)
    res = run(names)
    with open(path, "w") as f:
        json.dump(dict(records=res, coverage=coverage(res)), f, indent=1)
    for r in res:
        if r["ok"]:
            print(f"{r['case']:<60} {r['kernel']:<24} shared={r['shared']:>7} warps={r['num_warps']:>2} "
                  f"regs={r['regs']} spill={r['spill_bytes']} {r['seconds']}s")
        else:
            print(f"{r['case']:<60} {r['kernel']} FAILED {r['error'][:300]}")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    main(sys.argv[1:])
