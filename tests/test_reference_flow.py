"""Reference flow steps (docs/spec.md §3) against the spec's formulas written out here in float64
with an explicit loop over APG groups."""
import itertools
import math

import pytest
import torch

import vft_kernels as vk
from vft_kernels.reference import flow as rflow


def spec_velocity(v_cond, v_uncond, guidance, scale, eta=0.0, thr=0.0, mom=0.0, state=None, reduce_ndim=3):
    """Guided velocity in float64; `state` (float64, shape of x) is updated in place."""
    vc = v_cond.double()
    if guidance == "none":
        return vc.clone()
    vu = v_uncond.double()
    if guidance == "cfg":
        return vu + scale * (vc - vu)
    v = torch.empty_like(vc)
    lead = vc.shape[: vc.dim() - reduce_ndim]
    for g in itertools.product(*(range(n) for n in lead)):
        c, d = vc[g], vc[g] - vu[g]
        if mom != 0:
            d = d + mom * state[g]
            state[g] = d
        if thr > 0:
            n = math.sqrt(float((d * d).sum()))
            d = d * (min(1.0, thr / n) if n > 0 else 1.0)
        nc = math.sqrt(float((c * c).sum()))
        u = c / nc if nc > 0 else torch.zeros_like(c)
        par = float((d * u).sum()) * u
        orth = d - par
        v[g] = c + (scale - 1) * (orth + eta * par)
    return v


def per_sample(t, x):
    if isinstance(t, torch.Tensor):
        return t.double().reshape((-1,) + (1,) * (x.dim() - 1))
    return t


def spec_step(x, v, t, t_next, prefix=None, prefix_len=0):
    out = x.double() + (per_sample(t_next, x) - per_sample(t, x)) * v
    if prefix_len > 0:
        out[:, :, :prefix_len] = prefix.double()
    return out


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


SHAPES = [((2, 3, 5, 4), 3), ((2, 3, 3, 4, 5), 3), ((3, 1, 2, 3, 1), 3), ((2, 3, 5, 4), 2)]


@pytest.mark.parametrize("shape, reduce_ndim", SHAPES)
@pytest.mark.parametrize("guidance", ["none", "cfg", "apg"])
@pytest.mark.parametrize("per_sample_t", [False, True])
def test_single_step(shape, reduce_ndim, guidance, per_sample_t):
    x, vc, vu = rand(*shape), rand(*shape), rand(*shape)
    B = shape[0]
    if per_sample_t:
        t = torch.linspace(0.9, 0.5, B, dtype=torch.float64)
        t_next = t - torch.linspace(0.1, 0.3, B, dtype=torch.float64)
    else:
        t, t_next = 0.8, 0.55
    kw = dict(scale=3.0, apg_eta=0.25, apg_norm_threshold=0.0 if guidance != "apg" else 2.5)
    want = spec_step(x, spec_velocity(vc, vu, guidance, 3.0, 0.25, kw["apg_norm_threshold"],
                                      reduce_ndim=reduce_ndim), t, t_next)
    got = rflow.flow_step(x, vc, t, t_next, vu, guidance, reduce_ndim=reduce_ndim, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with vk.use_backend("reference"):
        pub = vk.flow_step(x.float(), vc.float(), t if not per_sample_t else t.float(),
                           t_next if not per_sample_t else t_next.float(), vu.float(), guidance,
                           reduce_ndim=reduce_ndim, **kw)
    assert pub.dtype == torch.float32 and pub.shape == x.shape
    want32 = spec_step(x.float(), spec_velocity(vc.float(), vu.float(), guidance, 3.0, 0.25,
                                                kw["apg_norm_threshold"], reduce_ndim=reduce_ndim),
                       t if not per_sample_t else t.float(), t_next if not per_sample_t else t_next.float())
    torch.testing.assert_close(pub.double(), want32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("thr", [0.0, 1.5])
@pytest.mark.parametrize("mom", [0.5, -0.75])
def test_apg_momentum_over_steps(thr, mom):
    """Momentum state: zeros before step 1, updated in place to `running` each step, per sample."""
    shape = (3, 2, 3, 2, 3)
    steps = [1.0, 0.75, 0.5, 0.3, 0.0]
    x = rand(*shape)
    x_pub = x.float()
    state_ref = torch.zeros(shape, dtype=torch.float64)
    state_pub = torch.zeros(shape, dtype=torch.float32)
    state_spec = torch.zeros(shape, dtype=torch.float64)
    xs = x.clone()
    for t, t_next in zip(steps, steps[1:]):
        vc, vu = rand(*shape), rand(*shape)
        v = spec_velocity(vc, vu, "apg", 4.0, 0.5, thr, mom, state_spec)
        xs = spec_step(xs, v, t, t_next)
        x = rflow.flow_step(x, vc, t, t_next, vu, "apg", 4.0, 0.5, thr, mom, state_ref)
        torch.testing.assert_close(state_ref, state_spec, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x, xs, rtol=1e-12, atol=1e-12)
        with vk.use_backend("reference"):
            ptr = state_pub.data_ptr()
            x_pub = vk.flow_step(x_pub, vc.float(), t, t_next, vu.float(), "apg", 4.0, 0.5, thr, mom, state_pub)
            assert state_pub.data_ptr() == ptr
        torch.testing.assert_close(state_pub.double(), state_spec, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_pub.double(), xs, rtol=1e-5, atol=1e-5)
    assert float(state_spec.abs().sum()) > 0


def test_apg_momentum_is_per_sample():
    shape = (3, 2, 2, 3, 2)
    x, vc, vu = rand(*shape), rand(*shape), rand(*shape)
    state = rand(*shape)  # some non-zero history
    state_1 = state[1:2].clone()
    full = rflow.flow_step(x, vc, 0.6, 0.4, vu, "apg", 2.0, 0.0, 1.0, 0.5, state)
    alone = rflow.flow_step(x[1:2], vc[1:2], 0.6, 0.4, vu[1:2], "apg", 2.0, 0.0, 1.0, 0.5, state_1)
    torch.testing.assert_close(full[1:2], alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state[1:2], state_1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("thr", [0.0, 1.0])
def test_apg_zero_norm_groups(thr):
    """0/0 is 0: a group with zero v_cond (u = 0) or zero diff gives no NaN."""
    shape = (3, 2, 2, 3, 4)
    x, vc, vu = rand(*shape), rand(*shape), rand(*shape)
    vc[0, 1] = 0           # ||v_cond|| = 0 in group (0, 1)
    vu[1, 0] = vc[1, 0]    # diff = 0 in group (1, 0)
    vc[2, 0] = 0
    vu[2, 0] = 0           # both zero
    want = spec_step(x, spec_velocity(vc, vu, "apg", 3.0, 0.5, thr), 0.5, 0.25)
    for dtype in (torch.float64, torch.float32):
        got = rflow.flow_step(x.to(dtype), vc.to(dtype), 0.5, 0.25, vu.to(dtype), "apg", 3.0, 0.5, thr)
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # zero v_cond, non-zero diff: u = 0, par = 0, v = (scale - 1) * diff
    torch.testing.assert_close(want[0, 1], x[0, 1] - 0.25 * (3.0 - 1) * (-vu[0, 1]) *
                               (min(1.0, thr / float(vu[0, 1].norm())) if thr > 0 else 1.0))


def test_threshold_scales_diff():
    shape = (2, 1, 2, 2, 2)
    x, vc, vu = rand(*shape), rand(*shape), rand(*shape)
    norms = [float((vc[b, 0] - vu[b, 0]).norm()) for b in range(2)]
    thr = (norms[0] + norms[1]) / 2  # clips the larger group only
    off = rflow.flow_step(x, vc, 0.5, 0.0, vu, "apg", 2.0, 1.0, 0.0)
    on = rflow.flow_step(x, vc, 0.5, 0.0, vu, "apg", 2.0, 1.0, thr)
    big = 0 if norms[0] > norms[1] else 1
    torch.testing.assert_close(on[1 - big], off[1 - big], rtol=1e-12, atol=1e-12)
    # eta = 1: v = v_cond + (scale - 1) * diff_clipped, so the step scales by thr / norm
    torch.testing.assert_close(on[big] - x[big], (-0.5) * (vc[big] + (thr / norms[big]) * (vc[big] - vu[big])))
    torch.testing.assert_close(off[big] - x[big], (-0.5) * (vc[big] + (vc[big] - vu[big])))


@pytest.mark.parametrize("guidance", ["none", "cfg", "apg"])
@pytest.mark.parametrize("prefix_len", [1, 2])
def test_prefix(guidance, prefix_len):
    shape = (2, 3, 4, 3, 2)
    x, vc, vu = rand(*shape), rand(*shape), rand(*shape)
    prefix = rand(2, 3, prefix_len, 3, 2)
    want = spec_step(x, spec_velocity(vc, vu, guidance, 2.0, 0.0, 0.0), 0.7, 0.2, prefix, prefix_len)
    got = rflow.flow_step(x, vc, 0.7, 0.2, vu, guidance, 2.0, prefix=prefix, prefix_len=prefix_len)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:, :, :prefix_len], prefix)
    with vk.use_backend("reference"):
        pub = vk.flow_step(x.float(), vc.float(), 0.7, 0.2, vu.float(), guidance, 2.0, prefix=prefix.float(),
                           prefix_len=prefix_len)
    assert torch.equal(pub[:, :, :prefix_len], prefix.float())
    torch.testing.assert_close(pub.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_sample_t", [False, True])
def test_heun(per_sample_t):
    shape = (3, 2, 3, 5)
    x, v1, v2 = rand(*shape), rand(*shape), rand(*shape)
    if per_sample_t:
        t, t_next = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64), torch.tensor([0.8, 0.5, 0.0], dtype=torch.float64)
    else:
        t, t_next = 0.6, 0.35
    want = x + (per_sample(t_next, x) - per_sample(t, x)) * (v1 + v2) / 2
    torch.testing.assert_close(rflow.flow_heun_step(x, v1, v2, t, t_next), want, rtol=1e-12, atol=1e-12)
    with vk.use_backend("reference"):
        tt = t.float() if per_sample_t else t
        tn = t_next.float() if per_sample_t else t_next
        pub = vk.flow_heun_step(x.float(), v1.float(), v2.float(), tt, tn)
        # Heun with v1 == v2 is the Euler step
        euler = vk.flow_step(x.float(), v1.float(), tt, tn)
        heun_same = vk.flow_heun_step(x.float(), v1.float(), v1.float(), tt, tn)
    torch.testing.assert_close(pub.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(heun_same, euler, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtype(dtype):
    shape = (2, 3, 4, 5)
    x, vc, vu = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype), rand(*shape, dtype=dtype)
    with vk.use_backend("reference"):
        got = vk.flow_step(x, vc, 0.5, 0.25, vu, "apg", 2.0, 0.3, 1.0)
    assert got.dtype == dtype
    want = spec_step(x, spec_velocity(vc, vu, "apg", 2.0, 0.3, 1.0), 0.5, 0.25)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_out_argument_and_in_place():
    shape = (2, 3, 4, 5)
    x, vc, vu = rand(*shape, dtype=torch.float32), rand(*shape, dtype=torch.float32), rand(*shape, dtype=torch.float32)
    want = spec_step(x, spec_velocity(vc, vu, "cfg", 1.5), 0.5, 0.1)
    with vk.use_backend("reference"):
        out = torch.empty_like(x)
        res = vk.flow_step(x, vc, 0.5, 0.1, vu, "cfg", 1.5, out=out)
        assert res.data_ptr() == out.data_ptr()
        x_copy = x.clone()
        res2 = vk.flow_step(x_copy, vc, 0.5, 0.1, vu, "cfg", 1.5, out=x_copy)
        assert res2.data_ptr() == x_copy.data_ptr()
        nc = torch.empty(2, 3, 4, 10)[..., ::2]
        vk.flow_step(x, vc, 0.5, 0.1, vu, "cfg", 1.5, out=nc)
    for r in (out, x_copy, nc):
        torch.testing.assert_close(r.double(), want, rtol=1e-5, atol=1e-5)


def test_requires_grad_uses_differentiable_reference():
    shape = (2, 3, 2, 2)
    x = rand(*shape).requires_grad_()
    vc = rand(*shape).requires_grad_()
    out = vk.flow_step(x, vc, 0.75, 0.25)
    (gx, gv) = torch.autograd.grad(out.sum(), (x, vc))
    torch.testing.assert_close(gx, torch.ones_like(gx))
    torch.testing.assert_close(gv, torch.full_like(gv, -0.5))
