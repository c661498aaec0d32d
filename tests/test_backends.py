"""Backend dispatch: automatic choice, reasons, forcing (context and env), and errors."""
import pytest
import torch

import kdfast
from kdfast import backends
from kdfast.backends import BackendUnavailable


def _logits(n=4, v=33):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, v, generator=g) * 10, torch.randn(n, v, generator=g) * 10


@pytest.mark.cpu
def test_auto_choice_on_cpu_is_compiled_kernel_with_reasons():
    s, t = _logits()
    c = kdfast.explain("kd_loss", s, t)
    assert c.backend == "cpu" and not c.forced
    assert set(c.rejected) == {"reference", "triton", "cuda"}
    assert "cuda" in c.rejected["cuda"]
    assert c.rejected["reference"] == "not preferred for this device"


def test_float64_takes_reference_and_says_why():
    s, t = _logits()
    c = kdfast.explain("kd_loss", s.double(), t.double())
    assert c.backend == "reference"
    if "cpu" in c.rejected and "extension" not in c.rejected["cpu"]:
        assert "float64" in c.rejected["cpu"]


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    s, t = _logits()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = kdfast.explain("kd_loss", s, t).rejected["triton"]
    assert "TRITON_INTERPRET" in reason or "not installed" in reason


def test_context_manager_forces_and_restores():
    s, t = _logits()
    with kdfast.use_backend("reference"):
        c = kdfast.explain("kd_loss", s, t)
        assert c.backend == "reference" and c.forced
    assert not kdfast.explain("kd_loss", s, t).forced


def test_forced_backend_that_cannot_run_raises_never_falls_back():
    s, t = _logits()
    with kdfast.use_backend("cuda"):
        with pytest.raises(BackendUnavailable, match="'cuda' is forced by use_backend.*kd_loss"):
            kdfast.ops.kd_loss(s, t)


def test_env_override(monkeypatch):
    s, t = _logits()
    monkeypatch.setenv("KDFAST_BACKEND", "reference")
    c = kdfast.explain("kd_loss", s, t)
    assert c.backend == "reference" and c.forced
    with kdfast.use_backend(None):  # the context wins over the environment
        assert not kdfast.explain("kd_loss", s, t).forced
    monkeypatch.setenv("KDFAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="KDFAST_BACKEND"):
        kdfast.ops.kd_loss(s, t)
    monkeypatch.setenv("KDFAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match="KDFAST_BACKEND: unknown backend 'gpu'"):
        kdfast.explain("kd_loss", s, t)


def test_force_for_some_ops_only():
    s, t = _logits()
    with kdfast.use_backend("reference", ops=["some_other_op"]):
        assert not kdfast.explain("kd_loss", s, t).forced
    with kdfast.use_backend("reference", ops=["kd_loss"]):
        assert kdfast.explain("kd_loss", s, t).forced


def test_bad_names():
    with pytest.raises(ValueError, match="use_backend: unknown backend 'fast'"):
        with kdfast.use_backend("fast"):
            pass
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        kdfast.explain("nope")


@pytest.mark.cpu
def test_backward_runs_on_the_forward_backend(monkeypatch):
    """The backend chosen at forward time is used by backward, even outside the force block."""
    calls = []
    impl = backends._impls["kd_loss_bwd"]["reference"]
    orig = impl.fn
    monkeypatch.setattr(impl, "fn", lambda *a, **k: calls.append(1) or orig(*a, **k))
    s, t = _logits()
    s.requires_grad_(True)
    with kdfast.use_backend("reference"):
        loss = kdfast.ops.kd_loss(s, t)
    loss.backward()
    assert calls == [1]


def test_plan_without_inputs():
    assert kdfast.plan("kd_loss", "cpu").backend in ("cpu", "reference")
    assert kdfast.plan("kd_loss", "cuda").backend in ("triton", "cuda", "reference")


def test_not_supported_reasons_lists_every_reason():
    """Every broken limit is reported, not just the first: device, both dtypes, the argument value."""
    x = torch.randn(3, 70, dtype=torch.float64)
    p = kdfast.ops.pack_ternary(torch.zeros(5, 70, dtype=torch.int8))
    reasons = backends.not_supported_reasons("ternary_linear", "cuda", x, p, torch.ones(5), None, 4)
    assert any("cpu" in r for r in reasons)  # tensors are on the CPU
    assert any("x dtype torch.float64" in r for r in reasons)
    assert any("act_bits=4" in r for r in reasons)
    assert backends.not_supported_reasons("ternary_linear", "reference", x, p, torch.ones(5), None, 4) == []
    s, t = _logits()
    both = backends.not_supported_reasons("kd_loss", "triton", s.double(), t.half().double())
    assert sum("dtype torch.float64" in r for r in both) == 2  # student and teacher
    with pytest.raises(KeyError):
        backends.not_supported_reasons("nope", "cpu")


def test_explain_reports_every_limit():
    s, t = _logits()
    c = kdfast.explain("kd_loss", s.double(), t.double())
    assert c.backend == "reference"
    for b in ("triton", "cuda"):
        assert "student dtype torch.float64" in c.rejected[b] and "teacher dtype torch.float64" in c.rejected[b]


def test_limits_shape_and_value_rules():
    lim = backends.Limits(dtypes=backends.kernel_dtypes("q"), max_size={("q", -1): 8},
                          same_size=((("q", -1), ("v", -1)),), values={"mode": (0, 1)})
    args = {"q": torch.zeros(2, 16, dtype=torch.float64), "v": torch.zeros(2, 4), "mode": 2}
    reasons = list(lim.reasons(args.get))
    assert len(reasons) == 4, reasons
    assert list(lim.reasons({"q": torch.zeros(2, 4), "v": torch.zeros(1, 4), "mode": 1}.get)) == []
    with pytest.raises(ValueError, match="does not take"):
        backends.register("test_limits_op", "cpu", limits=lim)(lambda q, v: None)


def test_one_dispatch_name_per_op_and_phase():
    """The forward of op X dispatches as "X" (what kdfast.explain("X", ...) reports), its backward as
    "X_bwd"; no implementation is registered under two names."""
    ops = backends.registered_ops()
    assert not [o for o in ops if o.endswith("_fwd")]
    for op in ("kd_loss", "attention", "attention_varlen"):
        assert op in ops and f"{op}_bwd" in ops
    seen = {}
    for op in ops:
        for b, impl in backends._impls[op].items():
            assert seen.setdefault(id(impl.fn), (op, b)) == (op, b), f"{op}/{b} is also {seen[id(impl.fn)]}"


@pytest.mark.cpu
def test_attention_forward_runs_what_explain_says(monkeypatch):
    calls = []
    for b in ("reference", "cpu"):
        impl = backends._impls["attention"][b]
        monkeypatch.setattr(impl, "fn", (lambda name, f: lambda *a, **k: calls.append(name) or f(*a, **k))(b, impl.fn))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    for forced in (None, "reference"):
        with kdfast.use_backend(forced, ops=None if forced is None else ["attention"]):
            want = kdfast.explain("attention", q, k, v, None, None, None, None, 64, 8 ** -0.5, False, False, 0.0,
                                  None).backend
            calls.clear()
            kdfast.ops.attention(q, k, v)
            assert calls == [want]


def test_not_supported_reasons_next_to_explain():
    assert "not_supported_reasons" in kdfast.__all__
    assert kdfast.not_supported_reasons is backends.not_supported_reasons
    s, t = _logits()
    assert kdfast.not_supported_reasons("kd_loss", "reference", s, t) == []
    reasons = kdfast.not_supported_reasons("kd_loss", "cpu", s.double(), t.double())
    assert reasons and all("float64" in r for r in reasons)
    assert kdfast.explain("kd_loss", s.double(), t.double()).rejected["cpu"] == "; ".join(reasons)
