"""The bf16 GEMM path of the CPU training attention (csrc/cpu/attention_train.cpp): bf16 q/k/v run
their products as bf16 GEMMs with fp32 accumulation (oneDNN brgemm, AMX) while softmax, LSE,
dropout and dS stay fp32. Checked against the float64 oracle with the kernel's dropout mask, for
the identity of that mask with the fp32-tile path, that the path really runs (and that it does not
when forced off, capped to AVX2, or for other dtypes), and that the forced fallback is exactly the
previous fp32-tile kernel (fp32 tiles of the bf16 values, outputs rounded to bf16 once)."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import _ext, cpu_isa
from kdfast.ops import attention, attention_reference
from kdfast.ops.attention import _attn_fwd, attention_dropout_mask, attention_varlen, draw_dropout_rng
from tests.numerics import assert_close_to_oracle, max_err

pytestmark = pytest.mark.cpu


def _c():
    return _ext.extension()


def _unavailable():
    """Why bf16 inputs would not run the bf16 GEMM path in this session (None if they would)."""
    c = _c()
    if c is None:
        return f"kdfast._C unavailable: {_ext.extension_error()}"
    if not c.attention_bf16_gemm_available():
        return ("oneDNN's brgemm cannot pack bf16 on this CPU (needs AMX-BF16 and AVX-512), or "
                "torch.backends.mkldnn is disabled; bf16 inputs run the fp32 tiles")
    if cpu_isa.ISAS.index(cpu_isa.current_isa()) < cpu_isa.ISAS.index("avx512"):
        return f"the CPU path is capped at {cpu_isa.current_isa()} (KDFAST_CPU_ISA): bf16 inputs run the fp32 tiles"
    return None


needs_bf16_gemm = pytest.mark.skipif(_unavailable() is not None, reason=f"bf16 GEMM path off: {_unavailable()}")


@contextlib.contextmanager
def bf16_gemm(on):
    c = _c()
    prev = c.attention_bf16_gemm_enabled()
    c.set_attention_bf16_gemm(on)
    try:
        yield
    finally:
        c.set_attention_bf16_gemm(prev)


def make_case(B, H, Lq, D, lengths, *, Lk=None, seed=0, dtype=torch.bfloat16):
    """q, k of scale 2, v of scale 10 as [B, H, L, D] views of [B, L, H, D] storage (HF layout), a key
    padding mask keeping the first lengths[b] keys, and a grad_output."""
    g = torch.Generator().manual_seed(seed)
    Lk = Lq if Lk is None else Lk

    def t(n, s):
        return (torch.randn(B, n, H, D, generator=g) * s).to(dtype).transpose(1, 2).requires_grad_()
    q, k, v = t(Lq, 2.0), t(Lk, 2.0), t(Lk, 10.0)
    mask = torch.zeros(B, Lk, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    go = (torch.randn(B, H, Lq, D, generator=g) * 3).to(dtype)
    return q, k, v, mask, go


def run_cpu(q, k, v, go, *, on, seed=5, **kw):
    """(out, grads of q, k, v[, head_gates]) of the CPU kernel with the bf16 GEMM path allowed or not, and
    the GEMMs the forward and the backward ran."""
    gates = kw.get("head_gates")
    ins = [q, k, v] + ([gates] if gates is not None and gates.requires_grad else [])
    with bf16_gemm(on), kdfast.use_backend("cpu"):
        torch.manual_seed(seed)
        out = attention(q, k, v, **kw)
        fwd = _c().attention_last_gemm()
        grads = torch.autograd.grad(out, ins, go)
        bwd = _c().attention_last_gemm()
    return (out,) + grads, (fwd, bwd)


def oracle(q, k, v, go, *, seed=5, **kw):
    """float64 reference (the kernel's dropout mask for the same seed) and the same-dtype reference."""
    gates = kw.get("head_gates")
    p = kw.get("dropout_p", 0.0)
    keep = None
    if p > 0:
        torch.manual_seed(seed)
        keep = attention_dropout_mask(draw_dropout_rng(), q.shape[0], q.shape[1], q.shape[2], k.shape[2], p)
    ins = [q, k, v] + ([gates] if gates is not None and gates.requires_grad else [])
    res = []
    for conv in (lambda x: x.detach().double().requires_grad_(), lambda x: x.detach().requires_grad_()):
        xs = [conv(x) for x in ins]
        kw2 = dict(kw, dropout_mask=keep)
        if len(xs) > 3:
            kw2["head_gates"] = xs[3]
        ref = attention_reference(*xs[:3], **kw2)
        res.append((ref,) + torch.autograd.grad(ref, xs, go.to(ref.dtype)))
    return res


# name: (B, H, Lq, D, lengths, extra kwargs, Lk)
CASES = {
    "padded": (3, 2, 70, 64, [70, 33, 1], {}, None),
    "padded_dropout": (3, 2, 70, 64, [70, 33, 0], {"dropout_p": 0.2}, None),
    "zpq_gates_bh_dropout": (3, 2, 45, 32, [45, 17, 0], {"zero_padded_queries": True, "dropout_p": 0.2,
                                                         "head_gates": "bh"}, None),
    "odd_d17_gates_h_dropout": (2, 3, 37, 17, [37, 5], {"dropout_p": 0.1, "head_gates": "h"}, None),
    "d33_odd_lengths": (2, 2, 99, 33, [99, 61], {"zero_padded_queries": True}, None),
    "short_n_lt_16": (2, 2, 5, 8, [5, 1], {"dropout_p": 0.3}, None),
    "cross_lq_ne_lk": (2, 2, 29, 40, [50, 13], {"dropout_p": 0.15}, 50),
    "active_heads": (2, 3, 40, 24, [40, 3], {"dropout_p": 0.1, "active_heads": "odd_off"}, None),
    "no_mask_d128": (1, 2, 33, 128, None, {}, None),
}


def _case(name, seed=0):
    B, H, L, D, lengths, extra, Lk = CASES[name]
    q, k, v, mask, go = make_case(B, H, L, D, lengths or [], Lk=Lk, seed=seed)
    kw = dict(extra)
    if lengths is not None:
        kw["mask"] = mask
    if kw.get("head_gates") == "bh":
        kw["head_gates"] = (torch.rand(B, H, generator=torch.Generator().manual_seed(seed + 1)) * 2).requires_grad_()
    elif kw.get("head_gates") == "h":
        kw["head_gates"] = (torch.rand(H, generator=torch.Generator().manual_seed(seed + 1)) + 0.5).requires_grad_()
    if kw.get("active_heads") == "odd_off":
        kw["active_heads"] = torch.arange(H) % 2 == 0
    return q, k, v, go, kw


@needs_bf16_gemm
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_gemm_matches_oracle(case):
    q, k, v, go, kw = _case(case)
    got, paths = run_cpu(q, k, v, go, on=True, **kw)
    assert paths == ("bf16", "bf16"), paths
    fb, fb_paths = run_cpu(q, k, v, go, on=False, **kw)
    assert fb_paths == ("fp32", "fp32"), fb_paths
    want, tref = oracle(q, k, v, go, **kw)
    names = ["out", "dq", "dk", "dv", "dgates"]
    for i, (a, w, r, f) in enumerate(zip(got, want, tref, fb)):
        assert a.dtype == (torch.bfloat16 if i < 4 else kw["head_gates"].dtype)
        assert_close_to_oracle(a.float(), w, r.float(), torch.bfloat16, what=f"{case} {names[i]}")
        # Tighter than the floor of the rule: bf16 GEMM operands (P and dS rounded to bf16, fp32
        # accumulation) stay within 1.2% of the largest value, the fp32-tile path within 0.5%.
        scale = max(w.abs().max().item(), 1e-30)
        err, err_fb = max_err(a, w) / scale, max_err(f, w) / scale
        assert err <= 1.2e-2, f"{case} {names[i]}: bf16 GEMM error {err:.2e} of the max (fp32 tiles {err_fb:.2e})"
    if "active_heads" in kw:
        off = ~kw["active_heads"]
        assert (got[0][:, off] == 0).all() and all((g[:, off] == 0).all() for g in got[1:4])
    if "mask" in kw and kw.get("zero_padded_queries"):
        pad = ~kw["mask"]
        assert (got[0].transpose(1, 2)[pad] == 0).all() and (got[1].transpose(1, 2)[pad] == 0).all()


@needs_bf16_gemm
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "varlen"])
def test_bf16_gemm_dropout_mask_is_the_fp32_paths(packed):
    # With V one-hot over the keys (D >= keys) the output row i is row i of the dropped
    # probabilities, and with grad_output one-hot over the queries dV[j][i] is Pd[i][j]: both are 0
    # exactly where the mask drops (P > 0 elsewhere at these score scales). Both paths, forward and
    # backward, must show the mask of attention_dropout_mask on the valid pairs.
    B, H, L, D, p = 2, 2, 24, 32, 0.3
    lengths = [24, 11]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, L, D, generator=g).bfloat16().requires_grad_()
    k = torch.randn(B, H, L, D, generator=g).bfloat16().requires_grad_()
    eye = torch.eye(L, D)
    v = eye.expand(B, H, L, D).bfloat16().contiguous().requires_grad_()
    go = eye.expand(B, H, L, D).bfloat16().contiguous()
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    torch.manual_seed(7)
    keep = attention_dropout_mask(draw_dropout_rng(), B, H, L, L, p)
    valid = mask[:, None, :, None] & mask[:, None, None, :]  # zero_padded_queries: valid (query, key) pairs
    for on, path in ((True, "bf16"), (False, "fp32")):
        with bf16_gemm(on), kdfast.use_backend("cpu"):
            torch.manual_seed(7)
            if packed:
                idx = mask.reshape(-1).nonzero().squeeze(1)
                cu = torch.tensor([0] + lengths).cumsum(0)

                def pack(x):
                    return x.detach().transpose(1, 2).reshape(B * L, H, D)[idx].requires_grad_()
                qp, kp, vp = pack(q), pack(k), pack(v)
                out = attention_varlen(qp, kp, vp, cu, cu, L, L, dropout_p=p)
                dv = torch.autograd.grad(out, vp, go.transpose(1, 2).reshape(B * L, H, D)[idx])[0]

                def unpack(x):
                    full = x.new_zeros(B * L, H, D)
                    full[idx] = x
                    return full.view(B, L, H, D).transpose(1, 2)
                out, dv = unpack(out), unpack(dv)
            else:
                out = attention(q, k, v, mask=mask, dropout_p=p, zero_padded_queries=True)
                dv = torch.autograd.grad(out, v, go)[0]
            assert _c().attention_last_gemm() == path
        kept_fwd = out[..., :L] != 0  # [B, H, i, j]
        kept_bwd = (dv[..., :L] != 0).transpose(-1, -2)  # dV[j][i] -> [B, H, i, j]
        for what, kept in (("forward", kept_fwd), ("backward", kept_bwd)):
            assert torch.equal(kept & valid, keep & valid), f"{path} {what}: dropout mask differs"
            assert not (kept & ~valid).any(), f"{path} {what}: padded pairs took part"


@pytest.mark.parametrize("gates", [False, True])
def test_forced_fallback_is_the_fp32_tile_kernel(gates):
    # Forced off, bf16 inputs run the fp32-tile kernel: fp32 tiles of the bf16 values and one rounding
    # of the fp32 results to bf16, i.e. exactly the fp32 kernel on the same values, rounded.
    q, k, v, mask, go = make_case(3, 2, 41, 24, [41, 20, 0], seed=4)
    kw = {"mask": mask, "dropout_p": 0.2}
    if gates:
        kw["head_gates"] = (torch.rand(3, 2, generator=torch.Generator().manual_seed(2)) * 2).requires_grad_()
    got, paths = run_cpu(q, k, v, go, on=False, **kw)
    assert paths == ("fp32", "fp32")
    f32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want, _ = run_cpu(*f32, go.float(), on=True, **kw)  # float32 inputs never take the bf16 path
    for a, w in zip(got[:4], want[:4]):
        assert a.dtype == torch.bfloat16 and torch.equal(a, w.to(a.dtype))
    if gates:  # from the saved ungated output, itself rounded to bf16 on the bf16 run
        torch.testing.assert_close(got[4], want[4], rtol=2e-2, atol=2e-2 * want[4].abs().max().item())


@needs_bf16_gemm
def test_path_choice():
    q, k, v, mask, go = make_case(2, 2, 19, 16, [19, 7], seed=6)
    kw = {"mask": mask, "dropout_p": 0.1}
    ref, paths = run_cpu(q, k, v, go, on=True, **kw)
    assert paths == ("bf16", "bf16")
    fallback, paths = run_cpu(q, k, v, go, on=False, **kw)
    assert paths == ("fp32", "fp32")
    # An AVX2 cap emulates an AVX2 machine: fp32 tiles (the same results as forced off).
    with cpu_isa.use_cpu_isa("avx2"):
        capped, paths = run_cpu(q, k, v, go, on=True, **kw)
    assert paths == ("fp32", "fp32")
    for a, b in zip(capped, fallback):
        assert torch.equal(a, b)
    # torch.backends.mkldnn off: oneDNN's brgemm is not used either.
    torch.backends.mkldnn.enabled = False
    try:
        assert not _c().attention_bf16_gemm_available()
        _, paths = run_cpu(q, k, v, go, on=True, **kw)
    finally:
        torch.backends.mkldnn.enabled = True
    assert paths == ("fp32", "fp32")
    assert _c().attention_bf16_gemm_available()
    for dt in (torch.float32, torch.float16):
        xs = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        _, paths = run_cpu(*xs, go.to(dt), on=True, **kw)
        assert paths == ("fp32", "fp32"), dt
    # Back on: the same results as the first run (deterministic, nothing left over).
    again, paths = run_cpu(q, k, v, go, on=True, **kw)
    assert paths == ("bf16", "bf16")
    for a, b in zip(again, ref):
        assert torch.equal(a, b)


@needs_bf16_gemm
def test_other_amx_users_in_between():
    # brgemm keeps the AMX tile configuration of its last kernel per thread; oneDNN bf16 matmuls and
    # PyTorch's own CPU flash attention (brgemm too) running in between must not change the results.
    q, k, v, mask, go = make_case(2, 3, 64, 64, [64, 30], seed=8)
    kw = {"mask": mask, "dropout_p": 0.1}
    first, _ = run_cpu(q, k, v, go, on=True, **kw)
    a = torch.randn(256, 512).bfloat16()
    for _ in range(2):
        (a @ a.T).sum()
        x = torch.randn(4, 8, 256, 64).bfloat16()
        F.scaled_dot_product_attention(x, x, x)
        again, paths = run_cpu(q, k, v, go, on=True, **kw)
        assert paths == ("bf16", "bf16")
        for p, r in zip(again, first):
            assert torch.equal(p, r)


@needs_bf16_gemm
def test_varlen_equals_padded_on_the_bf16_path():
    B, H, L, D = 3, 2, 23, 16
    lengths = [23, 9, 0]
    q, k, v, mask, go = make_case(B, H, L, D, lengths, seed=13)
    gates = torch.rand(B, H, requires_grad=True)
    idx = mask.reshape(-1).nonzero().squeeze(1)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)

    def pack(x):
        return x.detach().transpose(1, 2).reshape(B * L, H, D)[idx].requires_grad_()
    qp, kp, vp = pack(q), pack(k), pack(v)
    gp = go.transpose(1, 2).reshape(B * L, H, D)[idx]
    with bf16_gemm(True), kdfast.use_backend("cpu"):
        torch.manual_seed(2)
        out = attention_varlen(qp, kp, vp, cu, cu, L, L, head_gates=gates, dropout_p=0.25)
        a = torch.autograd.grad(out, (qp, kp, vp, gates), gp)
        assert _c().attention_last_gemm() == "bf16"
    pad, paths = run_cpu(q, k, v, go, on=True, seed=2, mask=mask, head_gates=gates, zero_padded_queries=True,
                         dropout_p=0.25)
    assert paths == ("bf16", "bf16")

    def unpack(x):
        return x.transpose(1, 2).reshape(B * L, H, D)[idx]
    assert out.dtype == torch.bfloat16 and torch.equal(out, unpack(pad[0]))
    for x, y in zip(a[:3], pad[1:4]):
        assert torch.equal(x, unpack(y))
    torch.testing.assert_close(a[3], pad[4], rtol=1e-6, atol=1e-6)


@needs_bf16_gemm
def test_opcheck_bf16():
    q, k, v, mask, _ = make_case(2, 2, 19, 8, [19, 7], seed=2)
    gates = torch.rand(2, requires_grad=True)
    rng = torch.tensor([12345, 678], dtype=torch.int64)
    with bf16_gemm(True):
        torch.library.opcheck(_attn_fwd, (q, k.detach(), v.detach(), mask, gates, None, None, 16, 0.25, True, True,
                                          0.2, rng, "cpu"))


def test_environment_switch_turns_it_off():
    code = ("import torch, kdfast\nfrom kdfast import _ext\nfrom kdfast.ops import attention\n"
            "c = _ext.extension()\n"
            "q = torch.randn(1, 2, 8, 16).bfloat16()\n"
            "with kdfast.use_backend('cpu'):\n    attention(q, q, q)\n"
            "print(c.attention_bf16_gemm_enabled(), c.attention_last_gemm())")
    env = dict(os.environ, KDFAST_ATTENTION_BF16_GEMM="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False fp32"
