"""The one argument convention of the losses (kdfast/ops/__init__.py), checked so it cannot drift:
every <op>_reference has its op's signature, losses order student / teacher / targets / mask, masks of
any dtype mean the same, and the kdfast.nn loss modules take their op's tensors in the op's order."""
import inspect

import pytest
import torch

import kdfast.nn
import kdfast.ops
from tests.ops.attention_cases import make_inputs

POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD
KEYWORD = inspect.Parameter.KEYWORD_ONLY
LOSSES = {"kd_loss", "qa_kd_loss", "fused_linear_kd_loss", "hidden_mse", "hidden_cosine", "attention_kl",
          "attention_score_mse"}
OTHER_OPS = {"attention", "ternary_linear"}
# The attention oracle also returns the row log-sum-exp and replays a kernel's dropout mask (the tests
# and the reference backend need both); everything else in its signature is the op's.
REFERENCE_EXTRAS = {"attention": ("return_lse", "dropout_mask")}


def _pairs():
    names = kdfast.ops.__all__
    return sorted(n for n in names if f"{n}_reference" in names)


def _params(fn):
    return list(inspect.signature(fn).parameters.values())


def test_every_op_with_a_reference_is_classified():
    assert set(_pairs()) == LOSSES | OTHER_OPS


@pytest.mark.parametrize("name", _pairs())
def test_reference_has_its_ops_signature(name):
    op, ref = getattr(kdfast.ops, name), getattr(kdfast.ops, f"{name}_reference")
    got = [p for p in _params(ref) if p.name not in REFERENCE_EXTRAS.get(name, ())]
    assert [(p.name, p.kind, p.default) for p in got] == [(p.name, p.kind, p.default) for p in _params(op)]
    for extra in REFERENCE_EXTRAS.get(name, ()):
        p = inspect.signature(ref).parameters[extra]
        assert p.kind == KEYWORD and p.default in (None, False)


def _side(name):
    if name.startswith("student") or name.endswith("_s"):
        return "student"
    if name.startswith("teacher") or name.endswith("_t"):
        return "teacher"
    return None


def _check_order(params, where):
    pos = [p.name for p in params if p.kind == POSITIONAL]
    assert [p.kind for p in params] == sorted((p.kind for p in params), key=[POSITIONAL, KEYWORD].index), \
        f"{where}: positional arguments first, then keyword-only"
    sides = [_side(n) for n in pos]
    assert sides[0] == "student", f"{where}: the student's tensors come first: {pos}"
    teacher = sides.index("teacher")
    assert "student" not in sides[teacher:] and None not in sides[:teacher], f"{where}: student, then teacher: {pos}"
    names = [p.name for p in params]
    if "mask" in names:
        m = params[names.index("mask")]
        assert m.kind == POSITIONAL and m.default is None and pos[-1] == "mask", \
            f"{where}: mask is the last positional argument, default None"
    assert not {"attention_mask", "padding_mask", "keep"} & set(names), f"{where}: the mask is named mask"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_argument_order(name):
    _check_order(_params(getattr(kdfast.ops, name)), name)


MODULES = {"KDLoss": "kd_loss", "QAKDLoss": "qa_kd_loss", "FusedLinearKDLoss": "fused_linear_kd_loss"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_forward_takes_its_ops_tensors(module):
    forward = _params(getattr(kdfast.nn, module).forward)[1:]  # without self
    op = _params(getattr(kdfast.ops, MODULES[module]))
    # The module holds the options; forward takes the op's tensors, same names, order, kinds, defaults.
    want = [(p.name, p.kind, p.default) for p in op if p.kind == POSITIONAL or p.name.endswith("_bias")]
    assert [(p.name, p.kind, p.default) for p in forward] == want


def test_layer_kd_forward_order():
    params = _params(kdfast.nn.LayerKD.forward)[1:]
    assert [p.name for p in params] == ["student_hidden_states", "student_qkv", "teacher_hidden_states",
                                        "teacher_qkv", "mask"]
    _check_order(params, "LayerKD.forward")


def _masks(keep):
    return {"bool": keep.bool(), "int64": keep.long(), "int32": keep.int(), "uint8": keep.to(torch.uint8),
            "float32": keep.float(), "float64": keep.double()}


@pytest.mark.parametrize("name", ["attention_kl", "attention_score_mse"])
def test_attention_map_losses_take_masks_of_any_dtype(name):
    q_s, k_s, q_t, k_t, mask = (x.float() if x.is_floating_point() else x for x in make_inputs(2, 2, 9, 4, 8))
    for fn in (getattr(kdfast.ops, name), getattr(kdfast.ops, f"{name}_reference")):
        want = fn(q_s, k_s, q_t, k_t, mask)
        for dtype, m in _masks(mask).items():
            torch.testing.assert_close(fn(q_s, k_s, q_t, k_t, m), want, rtol=0, atol=0, msg=dtype)
            torch.testing.assert_close(fn(q_s, k_s, q_t, k_t, mask=m), want, rtol=0, atol=0, msg=dtype)


@pytest.mark.parametrize("name", ["hidden_mse", "hidden_cosine"])
def test_hidden_losses_take_masks_of_any_dtype(name):
    g = torch.Generator().manual_seed(3)
    hs, ht = torch.randn(2, 7, 6, generator=g) * 3, torch.randn(2, 7, 10, generator=g) * 3
    W, b = torch.randn(10, 6, generator=g), torch.randn(10, generator=g)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 3:] = False
    for fn in (getattr(kdfast.ops, name), getattr(kdfast.ops, f"{name}_reference")):
        want = fn(hs, ht, W, b, keep)
        for dtype, m in _masks(keep).items():
            torch.testing.assert_close(fn(hs, ht, W, b, m), want, rtol=0, atol=0, msg=dtype)


def test_old_names_warn_and_agree():
    g = torch.Generator().manual_seed(4)
    hs, ht = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    with pytest.warns(DeprecationWarning, match="hidden_cosine_reference"):
        old = kdfast.ops.hidden_loss_reference(hs, ht, kind="cosine")
    torch.testing.assert_close(old, kdfast.ops.hidden_cosine_reference(hs, ht), rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="hidden_mse_reference"):
        old = kdfast.ops.hidden_loss_reference(hs, ht)
    torch.testing.assert_close(old, kdfast.ops.hidden_mse_reference(hs, ht), rtol=0, atol=0)
    x = torch.randn(3, 8, generator=g)
    p = kdfast.ops.pack_ternary(torch.randint(-1, 2, (4, 8), generator=g, dtype=torch.int8))
    scale = torch.ones(4)
    with pytest.warns(DeprecationWarning, match="packed= is renamed packed_weight="):
        old = kdfast.ops.ternary_linear_reference(x, packed=p, scale=scale)
    torch.testing.assert_close(old, kdfast.ops.ternary_linear_reference(x, p, scale), rtol=0, atol=0)
    loss = kdfast.nn.FusedLinearKDLoss()
    W = torch.randn(11, 8, generator=g)
    with pytest.warns(DeprecationWarning, match="student_lm_head_weight= is renamed student_weight="):
        old = loss(x, student_lm_head_weight=W, teacher_hidden=x, teacher_weight=W.flip(0))
    torch.testing.assert_close(old, loss(x, W, x, W.flip(0)), rtol=0, atol=0)
