"""CPU kernels of attention_kl / attention_score_mse: how they reach the valid rows.

The kernels read q/k rows in place and write gradient rows in place when an
example's valid tokens form one run (right or left padding) and the input is
float32 with unit stride in D; otherwise they gather rows into buffers (holes
in the mask, other dtypes, other strides). attention_kl also splits long
examples into several query-row tiles. Each layout is checked against the
float64 oracle, on every CPU ISA path.
"""
import pytest
import torch

from kdfast import cpu_isa
from kdfast.ops import attention_kl, attention_kl_reference, attention_score_mse, attention_score_mse_reference
from tests.ops.attention_cases import isa_list, run_case

pytestmark = pytest.mark.cpu

OPS = [
    pytest.param(attention_kl, attention_kl_reference, id="kl"),
    pytest.param(attention_score_mse, attention_score_mse_reference, id="score_mse"),
]


def _inputs(B, H, L, Ds, Dt, layout, spans, seed=0):
    """float64 q/k in `layout` and a [B, L] mask keeping tokens [start, stop) of each example."""
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


@pytest.mark.parametrize("op,ref", OPS)
@pytest.mark.parametrize("layout", ["contiguous", "blhd", "d_strided"])
def test_runs_of_valid_tokens(op, ref, layout):
    run_case(op, ref, "cpu", _inputs(5, 3, 23, 16, 8, layout, SPANS), torch.float32)


@pytest.mark.parametrize("op,ref", OPS)
def test_mixed_in_place_and_gathered_inputs(op, ref):
    # q_s in place, k_s gathered (D-strided), holes in one example's mask.
    q_s, _, q_t, k_t, mask = _inputs(3, 2, 19, 8, 12, "contiguous", [(0, 19), (2, 17), (0, 10)], seed=1)
    k_s = _inputs(3, 2, 19, 8, 12, "d_strided", [(0, 19)] * 3, seed=2)[1]
    mask[0, 7] = mask[0, 11] = False
    run_case(op, ref, "cpu", (q_s, k_s, q_t, k_t, mask), torch.float32)


@pytest.mark.parametrize("op,ref", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_runs_with_16_bit_inputs(op, ref, dtype):
    # Gathered inputs, gradients still written in place into the float32 output.
    run_case(op, ref, "cpu", _inputs(3, 2, 21, 16, 16, "contiguous", [(3, 21), (0, 9), (0, 21)], seed=3), dtype)


@pytest.mark.parametrize("isa", isa_list())
def test_kl_several_row_tiles(isa):
    # 700 valid keys: tiles of 224 query rows, the last one partial; left padding on example 1.
    with cpu_isa.use_cpu_isa(isa):
        run_case(attention_kl, attention_kl_reference, "cpu",
                 _inputs(2, 1, 720, 8, 8, "blhd", [(10, 710), (0, 655)], seed=4), torch.float32)


@pytest.mark.parametrize("isa", isa_list())
@pytest.mark.parametrize("op,ref", OPS)
def test_isa_paths_in_place(isa, op, ref):
    with cpu_isa.use_cpu_isa(isa):
        run_case(op, ref, "cpu", _inputs(3, 2, 40, 16, 16, "contiguous", [(0, 40), (4, 33), (39, 40)], seed=5),
                 torch.float32)


def test_kl_more_threads_than_tasks():
    # One (b, h) task: the scheduler must not hand out work twice or skip the zero rows.
    q_s, k_s, q_t, k_t, mask = _inputs(1, 1, 9, 4, 4, "contiguous", [(2, 7)], seed=6)
    run_case(attention_kl, attention_kl_reference, "cpu", (q_s, k_s, q_t, k_t, mask), torch.float32)
