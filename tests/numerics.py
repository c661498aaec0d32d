"""The numerics rule of DESIGN.md, in one place.

A kernel's error against the float64 oracle may be at most 2x the error of the
same-dtype PyTorch reference, plus a per-dtype floor (absolute, scaled by the
oracle's magnitude).
"""
import torch

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-10}


def max_err(x, oracle):
    x = x.double()
    oracle = oracle.double()
    both_inf = torch.isinf(x) & torch.isinf(oracle) & (torch.sign(x) == torch.sign(oracle))
    d = torch.where(both_inf, torch.zeros_like(x), (x - oracle).abs())
    return d.max().item() if d.numel() else 0.0


def assert_close_to_oracle(out, oracle, torch_ref, dtype, *, what="output", factor=2.0):
    """out: kernel result; oracle: float64 reference; torch_ref: same-dtype PyTorch reference."""
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert torch.equal(torch.isnan(out), torch.isnan(oracle)), f"{what}: NaN pattern differs from the oracle"
    finite = torch.isfinite(oracle)
    assert torch.equal(torch.isinf(out), ~finite & ~torch.isnan(oracle)), f"{what}: inf pattern differs"
    scale = max(oracle[finite].abs().max().item(), 1.0) if finite.any() else 1.0
    err = max_err(out[finite], oracle[finite])
    ref_err = max_err(torch_ref[finite], oracle[finite])
    bound = factor * ref_err + FLOOR[dtype] * scale
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (torch {dtype} error {ref_err:.3g})"
