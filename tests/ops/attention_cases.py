"""Shared cases for the attention distillation ops (attention_score_mse, attention_kl).

Each op is checked against its float64 reference, which materialises the
L x L maps, on every backend: different head dims for student and teacher,
per-example padding (including an example with a single kept token and an
example with none), non-contiguous [B, L, H, D] -> [B, H, L, D] views (the
layout HF attention modules hand over), bf16, grad_output != 1.
"""
import pytest
import torch

import kdfast
from kdfast import cpu_isa
from tests.numerics import assert_close_to_oracle

BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpu", id="cpu", marks=pytest.mark.cpu),
    pytest.param("triton", id="triton", marks=pytest.mark.triton),
]


def make_inputs(B, H, L, Ds, Dt, *, scale=3.0, seed=0, lengths=None):
    """q/k of realistic magnitude as non-contiguous [B, H, L, D] views, and a [B, L] int mask."""
    g = torch.Generator().manual_seed(seed)

    def qk(D):
        return (torch.randn(B, L, H, D, generator=g, dtype=torch.float64) * scale).permute(0, 2, 1, 3)

    q_s, k_s, q_t, k_t = qk(Ds), qk(Ds), qk(Dt), qk(Dt)
    mask = torch.ones(B, L, dtype=torch.int64)
    if lengths is None:
        lengths = [L, max(1, L // 2), 1, 0][:B]
    for b, n in enumerate(lengths):
        mask[b, n:] = 0
    if B > 1 and L > 3:  # a hole in the middle and left padding, not only right padding
        mask[0, L // 3] = 0
    return q_s, k_s, q_t, k_t, mask


def layout_inputs(B, H, L, Ds, Dt, layout, spans, seed=0):
    """float64 q/k in `layout` and a [B, L] mask keeping tokens [start, stop) of each example.

    For the CPU kernels' row access: they read q/k rows in place and write gradient rows in place
    when an example's valid tokens form one run (right or left padding) and the input is float32
    with unit stride in D; otherwise they gather rows into buffers (holes in the mask, other
    dtypes, other strides).
    """
    g = torch.Generator().manual_seed(seed)

    def qk(D):
        x = torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * 3
        if layout == "contiguous":
            return x
        if layout == "blhd":  # [B, L, H, D] storage, as HF attention modules hand over: row stride H * D
            return x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        if layout == "d_strided":  # stride in D != 1: gathered
            return x.transpose(-1, -2).contiguous().transpose(-1, -2)
        raise ValueError(layout)

    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, (start, stop) in enumerate(spans):
        mask[b, start:stop] = True
    return qk(Ds), qk(Ds), qk(Dt), qk(Dt), mask


SPANS = [(0, 23), (5, 23), (0, 1), (0, 0), (22, 23)]  # right pad, left pad, one token, none, last token only


def run_case(op, ref, backend, inputs, dtype, *, grad_scale=2.5, value=False):
    q_s, k_s, q_t, k_t, mask = inputs
    if value:  # value relation: the same tensor as "q" and "k"
        k_s, k_t = q_s, q_t
    cast = [x.to(dtype) for x in (q_s, k_s, q_t, k_t)]
    # Oracle: float64 on the dtype-rounded inputs.
    o_leaf = [x.double().detach().requires_grad_() for x in cast[:2]]
    oracle = ref(o_leaf[0], o_leaf[1] if not value else o_leaf[0], cast[2].double(), cast[3].double(), mask)
    (grad_scale * oracle).backward()
    # Same-dtype PyTorch reference (materialising, float32 accumulation for 16-bit inputs).
    r_leaf = [x.detach().requires_grad_() for x in cast[:2]]
    tref = ref(r_leaf[0], r_leaf[1] if not value else r_leaf[0], cast[2], cast[3], mask)
    (grad_scale * tref).backward()
    leaf = [x.detach().requires_grad_() for x in cast[:2]]
    with kdfast.use_backend(backend):
        out = op(leaf[0], leaf[1] if not value else leaf[0], cast[2], cast[3], mask)
        (grad_scale * out).backward()
    assert out.dtype == torch.float32 and out.dim() == 0
    assert_close_to_oracle(out.detach().reshape(1), oracle.detach().reshape(1), tref.detach().float().reshape(1),
                           dtype, what=f"{backend} loss")
    n = 1 if value else 2
    for i in range(n):
        assert leaf[i].grad.dtype == dtype
        assert_close_to_oracle(leaf[i].grad.float(), o_leaf[i].grad, r_leaf[i].grad.float(), dtype,
                               what=f"{backend} grad {'qk'[i]}_s")
    return out


def isa_list():
    return cpu_isa.available_isas() if kdfast._ext.extension() is not None else []


def run_double_backward(op, ref, backend, inputs, dtype, *, value=False, scales=(2.5, -0.7)):
    """Two backwards through one loss (retain_graph=True), grad_output != 1 each time: the first
    uses the gradients the forward wrote, the second recomputes them; both vs the float64 oracle."""
    q_s, k_s, q_t, k_t, mask = inputs
    if value:
        k_s, k_t = q_s, q_t
    cast = [x.to(dtype) for x in (q_s, k_s, q_t, k_t)]
    n = 1 if value else 2

    def grads(fn, conv):
        leaf = [conv(x).detach().requires_grad_() for x in cast[:n]]
        args = (leaf[0], leaf[0] if value else leaf[1], conv(cast[2]), conv(cast[3]), mask)
        return leaf, fn(*args)

    o_leaf, oracle = grads(ref, lambda x: x.double())
    o_grads = torch.autograd.grad(oracle, o_leaf)
    r_leaf, tref = grads(ref, lambda x: x)
    r_grads = torch.autograd.grad(tref, r_leaf)
    with kdfast.use_backend(backend):
        leaf, out = grads(op, lambda x: x)
        for k, s in enumerate(scales):
            got = torch.autograd.grad(out, leaf, grad_outputs=torch.tensor(s), retain_graph=k + 1 < len(scales))
            for i in range(n):
                assert got[i].dtype == dtype
                assert_close_to_oracle(got[i].float(), s * o_grads[i], s * r_grads[i].float(), dtype,
                                       what=f"{backend} backward {k + 1} grad {'qk'[i]}_s")
    return out


def cpu_row_access_tests(op, ref):
    """The CPU kernel row-access tests of one attention-map loss (see layout_inputs): each layout
    against the float64 oracle, on every CPU ISA path. The op's test module assigns the returned
    functions to its test_cpu_* names."""

    @pytest.mark.cpu
    @pytest.mark.parametrize("layout", ["contiguous", "blhd", "d_strided"])
    def runs_of_valid_tokens(layout):
        run_case(op, ref, "cpu", layout_inputs(5, 3, 23, 16, 8, layout, SPANS), torch.float32)

    @pytest.mark.cpu
    def mixed_in_place_and_gathered_inputs():
        # q_s in place, k_s gathered (D-strided), holes in one example's mask.
        q_s, _, q_t, k_t, mask = layout_inputs(3, 2, 19, 8, 12, "contiguous", [(0, 19), (2, 17), (0, 10)], seed=1)
        k_s = layout_inputs(3, 2, 19, 8, 12, "d_strided", [(0, 19)] * 3, seed=2)[1]
        mask[0, 7] = mask[0, 11] = False
        run_case(op, ref, "cpu", (q_s, k_s, q_t, k_t, mask), torch.float32)

    @pytest.mark.cpu
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    def runs_with_16_bit_inputs(dtype):
        # Gathered inputs, gradients still written in place into the float32 output.
        run_case(op, ref, "cpu", layout_inputs(3, 2, 21, 16, 16, "contiguous", [(3, 21), (0, 9), (0, 21)], seed=3),
                 dtype)

    @pytest.mark.cpu
    @pytest.mark.parametrize("isa", isa_list())
    def isa_paths_in_place(isa):
        with cpu_isa.use_cpu_isa(isa):
            run_case(op, ref, "cpu",
                     layout_inputs(3, 2, 40, 16, 16, "contiguous", [(0, 40), (4, 33), (39, 40)], seed=5),
                     torch.float32)

    return runs_of_valid_tokens, mixed_in_place_and_gathered_inputs, runs_with_16_bit_inputs, isa_paths_in_place
