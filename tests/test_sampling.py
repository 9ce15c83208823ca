"""flow_sample (the sampling loop) on an analytic velocity field.

Data x0 ~ N(mu, sigma^2) per element and x_t = t * noise + (1 - t) * x0 give the exact
rectified-flow velocity v(x, t) = E[noise - x0 | x_t = x]
  = -mu + (t - (1 - t) sigma^2) / (t^2 + (1 - t)^2 sigma^2) * (x - (1 - t) mu),
whose ODE keeps the standardised value (x - m_t) / s_t fixed, so the exact endpoint of a
trajectory that starts at noise n is mu + sigma * n."""
import math

import pytest
import torch

import vft_kernels as vk
from vft_kernels import dispatch
from vft_kernels.testing import assert_matches_reference

SHAPE = (2, 3, 3, 4, 5)


def gaussian_velocity(mu, sigma):
    def v(x, t):
        tt = t.to(torch.float64).reshape((-1,) + (1,) * (x.dim() - 1))
        coef = (tt - (1 - tt) * sigma**2) / (tt**2 + (1 - tt) ** 2 * sigma**2)
        return (-mu + coef * (x.double() - (1 - tt) * mu)).to(x.dtype)

    return v


def _mu_sigma():
    mu = torch.linspace(-1.0, 1.5, SHAPE[1], dtype=torch.float64).reshape(1, -1, 1, 1, 1)
    return mu, 0.6


def _available(name):
    return dispatch.backend_status(name) is None and dispatch._REGISTRY[("flow_step", name)].load() is None


@pytest.mark.parametrize("solver,order,steps", [("euler", 1.0, (4, 8, 16, 32)), ("heun", 2.0, (16, 32, 64))])
def test_convergence_order(solver, order, steps):
    """Error to the exact endpoint falls as steps^-order (slopes between successive
    doublings, in the asymptotic range: Heun is still pre-asymptotic below 16 steps)."""
    mu, sigma = _mu_sigma()
    noise = torch.randn(SHAPE)
    exact = mu + sigma * noise.double()
    errs = [float((vk.flow_sample(gaussian_velocity(mu, sigma), noise, n, solver=solver).double() - exact).abs().max())
            for n in steps]
    slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(order - 0.25 < s < order + 0.35 for s in slopes), f"{solver}: errors {errs}, slopes {slopes}"


@pytest.mark.parametrize("guidance", ["cfg", "apg"])
def test_guided_heun_is_second_order(guidance):
    """With guidance the velocity field is v_u + s (v_c - v_u) (for cfg) — still smooth, so
    Heun (midpoint half step through the guided kernel) must converge at second order
    towards a fine-grid solution. For apg: eta = 1 and no threshold/momentum makes APG equal
    to CFG, exercising the APG kernels on a field with a known limit."""
    mu, sigma = _mu_sigma()
    vc, vu = gaussian_velocity(mu, sigma), gaussian_velocity(-mu, sigma)

    def fn(x, t):
        return vc(x, t), vu(x, t)

    kw = dict(guidance=guidance, scale=1.5, apg_eta=1.0)
    noise = torch.randn(SHAPE)
    fine = vk.flow_sample(fn, noise.double(), 512, solver="heun", **kw)
    errs = [float((vk.flow_sample(fn, noise, n, solver="heun", **kw).double() - fine).abs().max())
            for n in (16, 32, 64)]
    slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(1.7 < s < 2.4 for s in slopes), f"errors {errs}, slopes {slopes}"


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("guidance", ["none", "cfg", "apg"])
def test_backends_agree(guidance, solver):
    """Each kernel backend's trajectory matches the reference backend's (float64 ground
    truth; the float32 reference sets the bound), with APG momentum carried across steps
    and prefix frames."""
    mu, sigma = _mu_sigma()
    vc, vu = gaussian_velocity(mu, sigma), gaussian_velocity(0.5 * mu, 0.8)

    def fn(x, t):
        return vc(x, t) if guidance == "none" else (vc(x, t), vu(x, t))

    noise = torch.randn(SHAPE)
    prefix = torch.randn(SHAPE[:2] + (1,) + SHAPE[3:])
    kw = dict(guidance=guidance, scale=2.0, shift=3.0, solver=solver, prefix=prefix, prefix_len=1,
              apg_eta=0.2, apg_norm_threshold=4.0, apg_momentum=-0.5)
    with vk.use_backend("reference"):
        r64 = vk.flow_sample(fn, noise.double(), 3, **{**kw, "prefix": prefix.double()})
        r32 = vk.flow_sample(fn, noise, 3, **kw)
    ran = 0
    for backend in ("cpu", "triton"):
        if not _available(backend):
            continue
        with vk.use_backend(backend):
            got = vk.flow_sample(fn, noise, 3, **kw)
        assert_matches_reference(f"{backend} flow_sample", got, r64, r32, torch.float32, math.prod(SHAPE[2:]))
        assert torch.equal(got[:, :, :1], prefix)
        ran += 1
    if ran == 0:
        pytest.skip("no kernel backend available")


def test_time_grid_and_shift():
    from vft_kernels.sampling import time_grid

    assert time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    g = time_grid(4, shift=3.0)
    assert g[0] == 1.0 and g[-1] == 0.0 and g[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    assert all(a > b for a, b in zip(g, g[1:]))


def test_low_precision_and_progress(capsys):
    mu, sigma = _mu_sigma()
    noise = torch.randn(SHAPE)
    out = vk.flow_sample(gaussian_velocity(mu, sigma), noise.to(torch.bfloat16), 8, progress=True)
    assert out.dtype == torch.bfloat16 and out.shape == noise.shape
    full = vk.flow_sample(gaussian_velocity(mu, sigma), noise.to(torch.bfloat16).float(), 8)
    assert float((out.float() - full).abs().max()) < 0.06  # 8 steps of bf16 rounding (|x| < 4, ulp <= 1/64)
    assert "8/8" in capsys.readouterr().err


def test_bad_arguments():
    mu, sigma = _mu_sigma()
    fn = gaussian_velocity(mu, sigma)
    noise = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="solver"):
        vk.flow_sample(fn, noise, 4, solver="rk4")
    with pytest.raises(ValueError, match="steps"):
        vk.flow_sample(fn, noise, 0)
    with pytest.raises(ValueError, match=r"\(v_cond, v_uncond\)"):
        vk.flow_sample(fn, noise, 2, guidance="cfg", scale=2.0)
    with pytest.raises(ValueError, match="prefix must have shape"):
        vk.flow_sample(fn, noise, 2, prefix_len=2)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA"):
        vk.flow_sample(fn, noise, 2, cuda_graph=True)


def _spy_backend(monkeypatch, op, backend):
    entry = dispatch._REGISTRY[(op, backend)]
    assert entry.load() is None
    calls, real = [], entry._fn

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(entry, "_fn", spy)
    monkeypatch.setattr(dispatch, "_SELECTED", {})  # forget choices memoised before the spy
    return calls


def _spy_fast_path(monkeypatch, calls):
    """Counts the steps the op layer's C++ fast path (the cpu backend's kernels) ran."""
    from vft_kernels.ops import flow as flow_ops

    real = flow_ops._fast_entry()
    if real is None:
        return

    def spy(*args):
        res = real(*args)
        if res is not None:
            calls.append(1)
        return res

    monkeypatch.setattr(flow_ops, "_FAST", spy)


@pytest.mark.parametrize("guidance", ["none", "apg"])
def test_loop_checks_the_velocities_of_every_step(guidance):
    """The loop validates its options once, but every step's velocities are still checked:
    a wrong shape or dtype at a late step is a clear error, not garbage."""
    mu, sigma = _mu_sigma()
    good = gaussian_velocity(mu, sigma)
    for bad, match in ((lambda v: v[:, :2], "v_cond must have x's shape"),
                       (lambda v: v.double(), "v_cond must have x's dtype")):
        def fn(x, t):
            v = good(x, t)
            v = bad(v) if float(t[0]) < 0.6 else v  # steps 1-2 of 4 are fine
            return v if guidance == "none" else (v, good(x, t))

        with pytest.raises(ValueError, match=match):
            vk.flow_sample(fn, torch.randn(SHAPE), 4, guidance=guidance, scale=1.5)


@pytest.mark.parametrize("guidance", ["none", "cfg"])
def test_loop_takes_strided_and_grad_velocities(guidance):
    """Velocities that are non-contiguous views or require grad (a model called without
    no_grad) take the checked path and give the same trajectory."""
    mu, sigma = _mu_sigma()
    vel = gaussian_velocity(mu, sigma)
    noise = torch.randn(SHAPE)

    def plain(x, t):
        return vel(x, t) if guidance == "none" else (vel(x, t), 0.5 * vel(x, t))

    def odd(x, t):
        v = vel(x, t)
        if float(t[0]) < 0.6:
            v = v.transpose(3, 4).contiguous().transpose(3, 4)  # same values, strided
        else:
            v = v.clone().requires_grad_()
        return v if guidance == "none" else (v, 0.5 * vel(x, t))

    want = vk.flow_sample(plain, noise, 4, guidance=guidance, scale=1.5)
    got = vk.flow_sample(odd, noise, 4, guidance=guidance, scale=1.5)
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)


def test_loop_runs_on_the_backend_in_force(monkeypatch):
    """The loop picks its backend at its first step, honouring use_backend (and a later loop
    honours a change)."""
    if not _available("cpu"):
        pytest.skip("cpu backend not built")
    ref = _spy_backend(monkeypatch, "flow_step", "reference")
    cpu = _spy_backend(monkeypatch, "flow_step", "cpu")
    _spy_fast_path(monkeypatch, cpu)  # eager CPU steps may run the cpu kernels through it
    mu, sigma = _mu_sigma()
    fn = gaussian_velocity(mu, sigma)
    noise = torch.randn(SHAPE)
    with vk.use_backend("reference"):
        a = vk.flow_sample(fn, noise, 5)
    assert len(ref) == 5 and len(cpu) == 0
    b = vk.flow_sample(fn, noise, 5)
    assert len(ref) == 5 and len(cpu) == 5
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
