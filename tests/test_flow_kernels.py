"""Flow step kernels (docs/spec.md §3) against the reference with the docs/spec.md §4 tolerance rule.

Every available kernel backend (cpu; triton under TRITON_INTERPRET=1, forced) runs on
small odd shapes; the float64 reference is ground truth and the reference in the input
dtype sets the bound. Outputs are NaN-poisoned (tests/conftest.py)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import vft_kernels as vk
from vft_kernels import dispatch
from vft_kernels.reference import flow as ref
from vft_kernels.testing import assert_matches_reference, noncontiguous

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = (2, 3, 5, 7)
VIDEO = (2, 3, 4, 5, 3)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _backend_reason(name):
    reason = dispatch.backend_status(name)
    if reason is None:
        entry = dispatch._REGISTRY[("flow_step", name)]
        reason = entry.load()
    return reason


@pytest.fixture(params=["cpu", "triton"])
def backend(request):
    reason = _backend_reason(request.param)
    if reason is not None:
        pytest.skip(f"backend {request.param} unavailable: {reason}")
    return request.param


def _rand(shape, dtype, scale=1.0):
    return (torch.randn(shape) * scale).to(dtype)


def _times(B, per_sample):
    if not per_sample:
        return 0.75, 0.5
    t = torch.rand(B) * 0.8 + 0.2
    return t, t - torch.rand(B) * 0.15 - 0.01


def _up(v):
    return v.double() if isinstance(v, torch.Tensor) else v


def _group_len(shape, guidance, reduce_ndim=3):
    return math.prod(shape[len(shape) - reduce_ndim:]) if guidance == "apg" else 1


class Stepper:
    """Runs one backend and the two references side by side, each with its own momentum
    state, and checks every output (and the momentum state) after each step."""

    def __init__(self, backend, shape, dtype, momentum_dtype=torch.float32, **kw):
        self.backend, self.shape, self.dtype, self.kw = backend, shape, dtype, kw
        use_mom = kw.get("guidance") == "apg" and kw.get("apg_momentum", 0) != 0
        init = torch.randn(shape) if use_mom else None  # a state from earlier steps
        self.m = init.to(momentum_dtype, copy=True) if use_mom else None
        self.m64 = init.double() if use_mom else None
        self.mlp = init.to(momentum_dtype, copy=True) if use_mom else None
        self.red = _group_len(shape, kw.get("guidance"), kw.get("reduce_ndim", 3))

    def step(self, x, vc, vu, t, tn, prefix=None, noncontig=False, out=None, name="flow_step"):
        kw = dict(self.kw)
        if prefix is not None:
            kw.update(prefix=prefix, prefix_len=prefix.shape[2])
        r64 = ref.flow_step(x.double(), vc.double(), _up(t), _up(tn), None if vu is None else vu.double(),
                            momentum=self.m64, **{**kw, "prefix": None if prefix is None else prefix.double()})
        rlp = ref.flow_step(x, vc, t, tn, vu, momentum=self.mlp, **kw)
        args = [noncontiguous(a) if noncontig and a is not None else a for a in (x, vc, vu)]
        with vk.use_backend(self.backend):
            got = vk.flow_step(args[0], args[1], t, tn, args[2], momentum=self.m, out=out, **kw)
        assert got.dtype == self.dtype and got.shape == x.shape
        assert_matches_reference(f"{self.backend} {name}", got, r64, rlp, self.dtype, self.red)
        if self.m is not None:
            assert_matches_reference(f"{self.backend} momentum", self.m, self.m64, self.mlp,
                                     self.m.dtype, self.red)
        return got


@pytest.mark.parametrize("shape", [IMAGE, VIDEO], ids=["image", "video"])
@pytest.mark.parametrize("guidance", ["none", "cfg", "apg"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_matches_reference(backend, shape, guidance, dtype):
    s = Stepper(backend, shape, dtype, guidance=guidance, scale=3.5, apg_eta=0.25)
    t, tn = _times(shape[0], per_sample=dtype == torch.float32)
    s.step(_rand(shape, dtype), _rand(shape, dtype), _rand(shape, dtype), t, tn, noncontig=dtype != torch.float16)


@pytest.mark.parametrize("threshold", [0.0, 3.0], ids=["no_threshold", "threshold"])
@pytest.mark.parametrize("shape,dtype", [(VIDEO, torch.float32), (IMAGE, torch.float32), (VIDEO, torch.bfloat16)],
                         ids=["video-fp32", "image-fp32", "video-bf16"])
def test_apg_momentum_over_five_steps(backend, shape, dtype, threshold):
    """Momentum state carried over 5 steps (per-sample times), compared after every step."""
    s = Stepper(backend, shape, dtype, guidance="apg", scale=4.0, apg_eta=0.1, apg_norm_threshold=threshold,
                apg_momentum=-0.6)
    x = _rand(shape, dtype)
    t = torch.ones(shape[0]) - torch.rand(shape[0]) * 0.05
    for _ in range(5):
        tn = t - 0.15
        x = s.step(x, _rand(shape, dtype), _rand(shape, dtype), t, tn, noncontig=True)
        t = tn


def test_apg_momentum_state_in_low_precision(backend):
    s = Stepper(backend, VIDEO, torch.float32, momentum_dtype=torch.bfloat16, guidance="apg", scale=2.0,
                apg_momentum=0.5, apg_norm_threshold=2.0)
    for _ in range(2):
        s.step(_rand(VIDEO, torch.float32), _rand(VIDEO, torch.float32), _rand(VIDEO, torch.float32), 0.75, 0.5)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_apg_zero_norm_groups(backend, momentum):
    """Groups with v_cond = v_uncond (|diff| = 0, threshold on) and with v_cond = 0
    (|v_cond| = 0) must give the reference's finite values, no NaN."""
    shape = (2, 3, 2, 3, 4)
    vc, vu = torch.randn(shape), torch.randn(shape)
    vu[0, 0] = vc[0, 0]
    vc[0, 1] = 0.0
    vc[1, 2] = 0.0
    vu[1, 2] = 0.0
    s = Stepper(backend, shape, torch.float32, guidance="apg", scale=3.0, apg_eta=0.5, apg_norm_threshold=1.0,
                apg_momentum=momentum)
    if s.m is not None:  # keep the zero-diff groups zero after the momentum update
        for m in (s.m, s.m64, s.mlp):
            m[0, 0] = 0.0
            m[1, 2] = 0.0
    got = s.step(torch.randn(shape), vc, vu, 0.75, 0.5)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("guidance", ["cfg", "apg"])
@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_non_finite_velocities_propagate_like_the_reference(backend, guidance, threshold):
    """A NaN / inf velocity gives NaN exactly where the reference does (for APG with a norm
    threshold: its whole group; before the fix the kernels dropped a NaN |d| and kept the
    rest of the group finite)."""
    shape = (2, 3, 2, 4, 4)
    x, vc, vu = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    vc[0, 1, 0, 2, 2] = math.nan
    vu[1, 0, 1, 1, 1] = math.inf
    kw = dict(apg_norm_threshold=threshold, apg_momentum=-0.5) if guidance == "apg" else {}
    outs = {}
    for name in ("reference", backend):
        extra = dict(momentum=torch.zeros(shape)) if guidance == "apg" else {}
        with vk.use_backend(name):
            outs[name] = vk.flow_step(x, vc, 0.75, 0.5, vu, guidance=guidance, scale=3.0, **kw, **extra)
    want, got = outs["reference"], outs[backend]
    assert int(torch.isnan(want).sum()) > 0
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (
        f"NaN at {int(torch.isnan(got).sum())} places, reference {int(torch.isnan(want).sum())}")
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", ["none", "cfg", "apg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefix_frames(backend, guidance, dtype):
    shape = (2, 3, 5, 2, 3)
    s = Stepper(backend, shape, dtype, guidance=guidance, scale=2.5, apg_momentum=0.3 if guidance == "apg" else 0.0)
    prefix = _rand((2, 3, 2, 2, 3), dtype)
    t, tn = _times(2, per_sample=True)
    got = s.step(_rand(shape, dtype), _rand(shape, dtype), _rand(shape, dtype), t, tn, prefix=noncontiguous(prefix),
                 noncontig=True)
    assert torch.equal(got[:, :, :2], prefix)


def test_reduce_ndim_and_size_one_dims(backend):
    """Groups over the last 2 dims of a video, and a shape with size-1 dims."""
    for shape, rn in (((1, 2, 3, 1, 5), 2), ((3, 1, 1, 4), 3), ((2, 5), 1)):
        s = Stepper(backend, shape, torch.float32, guidance="apg", scale=2.0, apg_eta=0.3, reduce_ndim=rn,
                    apg_momentum=0.5, apg_norm_threshold=1.5)
        s.step(torch.randn(shape), torch.randn(shape), torch.randn(shape), 0.75, 0.5)


@pytest.mark.parametrize("guidance", ["cfg", "apg"])
def test_out_and_in_place(backend, guidance):
    s = Stepper(backend, VIDEO, torch.float32, guidance=guidance, scale=2.0, apg_momentum=0.5)
    out = torch.full(VIDEO, float("nan"))
    got = s.step(torch.randn(VIDEO), torch.randn(VIDEO), torch.randn(VIDEO), 0.75, 0.5, out=out)
    assert got is out
    x = torch.randn(VIDEO)
    x_before = x.clone()
    s2 = Stepper(backend, VIDEO, torch.float32, guidance=guidance, scale=2.0, apg_momentum=0.5)
    vc, vu = torch.randn(VIDEO), torch.randn(VIDEO)
    r64 = ref.flow_step(x_before.double(), vc.double(), 0.75, 0.5, vu.double(), guidance, 2.0, apg_momentum=0.5,
                        momentum=s2.m64)
    rlp = ref.flow_step(x_before, vc, 0.75, 0.5, vu, guidance, 2.0, apg_momentum=0.5, momentum=s2.mlp)
    with vk.use_backend(backend):
        got = vk.flow_step(x, vc, 0.75, 0.5, vu, guidance, 2.0, apg_momentum=0.5, momentum=s2.m, out=x)
    assert got is x
    assert_matches_reference("in-place", x, r64, rlp, torch.float32, _group_len(VIDEO, guidance))


@pytest.mark.parametrize("shape", [IMAGE, VIDEO, (3, 7)], ids=["image", "video", "2d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_heun_matches_reference(backend, shape, dtype):
    x, v1, v2 = _rand(shape, dtype), _rand(shape, dtype), _rand(shape, dtype)
    t, tn = _times(shape[0], per_sample=True)
    r64 = ref.flow_heun_step(x.double(), v1.double(), v2.double(), t.double(), tn.double())
    rlp = ref.flow_heun_step(x, v1, v2, t, tn)
    with vk.use_backend(backend):
        got = vk.flow_heun_step(noncontiguous(x), v1, noncontiguous(v2), t, tn)
        assert_matches_reference(f"{backend} heun", got, r64, rlp, dtype)
        got = vk.flow_heun_step(x, v1, v2, t, tn, out=x)
    assert got is x
    assert_matches_reference(f"{backend} heun in place", x, r64, rlp, dtype)


def test_requires_grad_falls_back_to_reference(backend):
    """Inference kernels: inputs requiring grad run the differentiable reference."""
    x, vc, vu = (torch.randn(VIDEO, requires_grad=True) for _ in range(3))
    with vk.use_backend(backend):
        y = vk.flow_step(x, vc, 0.75, 0.5, vu, guidance="apg", scale=3.0, apg_norm_threshold=1.0)
        yh = vk.flow_heun_step(x, vc, vu, 0.75, 0.5)
    g = torch.randn(VIDEO)
    grads = torch.autograd.grad((y * g).sum() + yh.sum(), (x, vc, vu))
    xr, vcr, vur = (a.detach().double().requires_grad_() for a in (x, vc, vu))
    yr = ref.flow_step(xr, vcr, 0.75, 0.5, vur, guidance="apg", scale=3.0, apg_norm_threshold=1.0)
    yhr = ref.flow_heun_step(xr, vcr, vur, 0.75, 0.5)
    want = torch.autograd.grad((yr * g.double()).sum() + yhr.sum(), (xr, vcr, vur))
    for name, a, b in zip(("x", "v_cond", "v_uncond"), grads, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=f"grad {name}")


def test_empty_batch(backend):
    x = torch.randn(0, 3, 2, 2, 2)
    with vk.use_backend(backend):
        assert vk.flow_step(x, x, torch.ones(0), torch.zeros(0), x, guidance="apg").shape == x.shape


def test_cpu_kernel_rejects_bad_arguments():
    from vft_kernels._ext import C

    if C is None or not hasattr(C, "flow_step_cpu"):
        pytest.skip("vft_kernels._C with flow kernels is not built")
    x = torch.randn(2, 3, 4)
    t, tn = torch.ones(2), torch.zeros(2)
    with pytest.raises(ValueError, match="contiguous"):
        C.flow_step_cpu(torch.empty_like(x), x.transpose(1, 2), x, None, t, tn, "none", 1.0, 0.0, 0.0, 0.0, None, 1,
                        None, 0)
    with pytest.raises(ValueError, match=r"\[B\] = \[2\]"):
        C.flow_step_cpu(torch.empty_like(x), x, x, None, torch.ones(3), tn, "none", 1.0, 0.0, 0.0, 0.0, None, 1,
                        None, 0)
    with pytest.raises(ValueError, match="guidance"):
        C.flow_step_cpu(torch.empty_like(x), x, x, x, t, tn, "pag", 1.0, 0.0, 0.0, 0.0, None, 1, None, 0)


def _spy_on_fast_path(monkeypatch, attr):
    """Replaces the op layer's C++ fast path ``flow_ops.<attr>`` with a spy; returns its runs:
    True when it ran a step, False when it declined."""
    from vft_kernels.ops import flow as flow_ops

    real = flow_ops._fast_entry() if attr == "_FAST" else flow_ops._fast_heun_entry()
    if real is None:
        pytest.skip("vft_kernels._C with flow kernels is not built")
    calls = []

    def spy(*args):
        res = real(*args)
        calls.append(res is not None)
        return res

    monkeypatch.setattr(flow_ops, attr, spy)
    return calls


@pytest.fixture
def fast_calls(monkeypatch):
    """Runs of flow_step's C++ fast path."""
    return _spy_on_fast_path(monkeypatch, "_FAST")


APG_KW = dict(guidance="apg", scale=3.0, apg_eta=0.3, apg_norm_threshold=1.5, apg_momentum=-0.5)


@pytest.mark.parametrize("kw", [dict(guidance="none"), dict(guidance="cfg", scale=2.5), APG_KW,
                                dict(APG_KW, apg_momentum=0.0)], ids=["none", "cfg", "apg", "apg-no-momentum"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("times", ["float", "tensor"])
@pytest.mark.parametrize("where", ["new", "out", "in-place"])
def test_fast_path_runs_ordinary_calls_exactly_like_the_checked_path(fast_calls, kw, dtype, times, where):
    """Eager CPU calls with contiguous inputs take the C++ fast path, which gives bit for bit
    what the checked path's cpu backend gives (same kernels), writes every element of a
    poisoned output and updates the momentum state the same way."""
    shape = (3, 2, 3, 5, 7)
    x, vc, vu, pre = (_rand(s, dtype) for s in (shape, shape, shape, (3, 2, 1, 5, 7)))
    t, tn = _times(3, times == "tensor")
    m_fast = torch.randn(shape) if kw["guidance"] == "apg" else None
    m_full = None if m_fast is None else m_fast.clone()
    want = torch.full_like(x, float("nan"))
    tt, ttn = (v if isinstance(v, torch.Tensor) else torch.full((3,), v) for v in (t, tn))
    full = dispatch._REGISTRY[("flow_step", "cpu")]
    assert full.load() is None
    full._fn(want, x, vc, None if kw["guidance"] == "none" else vu, tt, ttn, kw["guidance"], kw.get("scale", 1.0),
             kw.get("apg_eta", 0.0), kw.get("apg_norm_threshold", 0.0), kw.get("apg_momentum", 0.0),
             m_full if kw.get("apg_momentum") else None, 3, pre, 1)
    xin = x.clone()
    out = {"new": None, "out": torch.full_like(x, float("nan")), "in-place": xin}[where]
    got = vk.flow_step(xin, vc, t, tn, vu, momentum=m_fast, prefix=pre, prefix_len=1, out=out, **kw)
    assert fast_calls == [True]
    assert got.dtype == dtype and not torch.isnan(got).any()
    if out is not None:
        assert got is out
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if m_fast is not None:
        torch.testing.assert_close(m_fast, m_full, rtol=0, atol=0)


def test_fast_path_declines_what_it_does_not_check(fast_calls):
    """Anything unusual goes to the checked path: autograd, strides, float64 or [B, 1]
    times, a forced backend other than cpu; results are still right."""
    x, vc, vu = (torch.randn(2, 3, 4, 5) for _ in range(3))
    want = ref.flow_step(x, vc, 0.7, 0.4, vu, guidance="cfg", scale=2.0)
    cases = {
        "grad": lambda: vk.flow_step(x, vc.clone().requires_grad_(), 0.7, 0.4, vu, guidance="cfg", scale=2.0),
        "strided": lambda: vk.flow_step(x, noncontiguous(vc), 0.7, 0.4, vu, guidance="cfg", scale=2.0),
        "float64 times": lambda: vk.flow_step(x, vc, torch.full((2,), 0.7, dtype=torch.float64),
                                              torch.full((2,), 0.4, dtype=torch.float64), vu, guidance="cfg",
                                              scale=2.0),
        "strided out": lambda: vk.flow_step(x, vc, 0.7, 0.4, vu, guidance="cfg", scale=2.0,
                                            out=torch.empty(2, 3, 5, 4).transpose(2, 3)),
    }
    for name, run in cases.items():
        fast_calls.clear()
        got = run()
        assert fast_calls == [False], name
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6, msg=name)
    fast_calls.clear()
    with vk.use_backend("reference"):
        torch.testing.assert_close(vk.flow_step(x, vc, 0.7, 0.4, vu, guidance="cfg", scale=2.0), want)
    assert fast_calls == []  # a forced backend other than cpu never reaches the fast path


@pytest.mark.parametrize("case", ["t_next == t", "one sample backwards", "nan time", "bool time", "shape",
                                  "dtype", "guidance", "no v_uncond", "momentum missing", "prefix shape",
                                  "reduce_ndim", "threshold", "int tensor", "list velocity"])
def test_fast_path_leaves_bad_calls_to_the_checked_errors(fast_calls, case):
    """Bad calls still get the op layer's clear errors: the fast path declines them without
    writing anything."""
    x, vc, vu = (torch.randn(2, 3, 4, 5) for _ in range(3))
    t = torch.tensor([0.7, 0.5])
    kw = dict(t=0.7, t_next=0.4, v_uncond=vu, guidance="cfg")
    expect, match = ValueError, None
    if case == "t_next == t":
        kw.update(t_next=0.7)
        match = "t_next must be < t"
    elif case == "one sample backwards":
        kw.update(t=t, t_next=torch.tensor([0.6, 0.6]))
        match = "sample 1"
    elif case == "nan time":
        kw.update(t=t, t_next=torch.tensor([0.6, float("nan")]))
        match = "sample 1"
    elif case == "bool time":
        kw.update(t=True)
        expect, match = TypeError, "t must be a float"
    elif case == "shape":
        kw.update(v_uncond=vu[:, :2])
        match = "v_uncond must have x's shape"
    elif case == "dtype":
        kw.update(v_uncond=vu.double())
        match = "v_uncond must have x's dtype"
    elif case == "guidance":
        kw.update(guidance="pag")
        match = "guidance must be one of"
    elif case == "no v_uncond":
        kw.update(v_uncond=None)
        match = "needs v_uncond"
    elif case == "momentum missing":
        kw.update(guidance="apg", apg_momentum=0.5)
        match = "needs a momentum state"
    elif case == "prefix shape":
        kw.update(prefix=torch.randn(2, 3, 2, 5), prefix_len=1)
        match = "prefix must have shape"
    elif case == "reduce_ndim":
        kw.update(guidance="apg", reduce_ndim=4)
        match = "reduce_ndim"
    elif case == "threshold":
        kw.update(guidance="apg", apg_norm_threshold=-1.0)
        match = "apg_norm_threshold"
    elif case == "int tensor":
        x = x.to(torch.int32)
        match = "x must be float32"
    elif case == "list velocity":
        kw.update(v_uncond=vu.tolist())
        expect, match = TypeError, "v_uncond must be a torch.Tensor"
    out = torch.full((2, 3, 4, 5), float("nan"))
    with pytest.raises(expect, match=match):
        vk.flow_step(x, vc, out=out, **kw)
    assert all(ran is False for ran in fast_calls)
    assert torch.isnan(out).all()  # nothing was written before the error


@pytest.fixture
def fast_heun_calls(monkeypatch):
    """Runs of flow_heun_step's C++ fast path."""
    return _spy_on_fast_path(monkeypatch, "_FAST_HEUN")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("times", ["float", "tensor"])
@pytest.mark.parametrize("where", ["new", "out", "in-place"])
def test_heun_fast_path_runs_ordinary_calls_exactly_like_the_checked_path(fast_heun_calls, dtype, times, where):
    shape = (3, 2, 5, 7)
    x, v1, v2 = (_rand(shape, dtype) for _ in range(3))
    t, tn = _times(3, times == "tensor")
    tt, ttn = (v if isinstance(v, torch.Tensor) else torch.full((3,), v) for v in (t, tn))
    want = torch.full_like(x, float("nan"))
    full = dispatch._REGISTRY[("flow_heun_step", "cpu")]
    assert full.load() is None
    full._fn(want, x, v1, v2, tt, ttn)
    xin = x.clone()
    out = {"new": None, "out": torch.full_like(x, float("nan")), "in-place": xin}[where]
    got = vk.flow_heun_step(xin, v1, v2, t, tn, out=out)
    assert fast_heun_calls == [True]
    assert got.dtype == dtype and not torch.isnan(got).any()
    if out is not None:
        assert got is out
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    r64 = ref.flow_heun_step(*(a.double() for a in (x, v1, v2)), tt.double(), ttn.double())
    assert_matches_reference("heun fast path", got, r64, ref.flow_heun_step(x, v1, v2, t, tn), dtype)


@pytest.mark.parametrize("case", ["grad", "strided", "float64 times", "strided out", "t_next == t",
                                  "one sample backwards", "nan time", "shape", "dtype", "int tensor",
                                  "list velocity"])
def test_heun_fast_path_declines_and_leaves_errors_to_the_checked_path(fast_heun_calls, case):
    x, v1, v2 = (torch.randn(2, 3, 4, 5) for _ in range(3))
    kw = dict(t=0.7, t_next=0.4)
    expect = match = None
    if case == "grad":
        v1 = v1.clone().requires_grad_()
    elif case == "strided":
        v2 = noncontiguous(v2)
    elif case == "float64 times":
        kw = dict(t=torch.full((2,), 0.7, dtype=torch.float64), t_next=torch.full((2,), 0.4, dtype=torch.float64))
    elif case == "strided out":
        kw["out"] = torch.empty(2, 3, 5, 4).transpose(2, 3)
    elif case == "t_next == t":
        kw.update(t_next=0.7)
        expect, match = ValueError, "t_next must be < t"
    elif case == "one sample backwards":
        kw.update(t=torch.tensor([0.7, 0.5]), t_next=torch.tensor([0.6, 0.6]))
        expect, match = ValueError, "sample 1"
    elif case == "nan time":
        kw.update(t=torch.tensor([0.7, 0.5]), t_next=torch.tensor([0.6, float("nan")]))
        expect, match = ValueError, "sample 1"
    elif case == "shape":
        v2 = v2[:, :2]
        expect, match = ValueError, "v2 must have x's shape"
    elif case == "dtype":
        v2 = v2.double()
        expect, match = ValueError, "v2 must have x's dtype"
    elif case == "int tensor":
        x = x.to(torch.int32)
        expect, match = ValueError, "x must be float32"
    elif case == "list velocity":
        v1 = v1.tolist()
        expect, match = TypeError, "v1 must be a torch.Tensor"
    if expect is None:
        got = vk.flow_heun_step(x, v1, v2, **kw)
        assert fast_heun_calls == [False], case
        torch.testing.assert_close(got.detach(), ref.flow_heun_step(x, v1.detach(), v2, 0.7, 0.4), rtol=1e-6,
                                   atol=1e-6)
        return
    out = torch.full((2, 3, 4, 5), float("nan"))
    with pytest.raises(expect, match=match):
        vk.flow_heun_step(x, v1, v2, out=out, **kw)
    assert all(ran is False for ran in fast_heun_calls)
    assert torch.isnan(out).all()


def test_unsupported_dtype_is_reported():
    from vft_kernels.triton import flow as tflow

    x = torch.randn(2, 3, dtype=torch.float64)
    assert "float64" in tflow.supports_flow_heun_step(x, x, x, x, None, None)


def test_aot_compiles_flow_kernels():
    """The Triton flow kernels compile for sm_80 and sm_90 without spills (no GPU needed)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "vft_kernels.triton.aot", "--only", "flow"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "flow_update[apg" in res.stdout and "flow_apg_reduce" in res.stdout
