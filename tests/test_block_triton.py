"""Triton block-op kernels (vft_kernels/triton/block.py) against the reference.

Runs under TRITON_INTERPRET=1 (set by conftest.py) on tiny odd shapes: the kernels are
called directly (outputs NaN-poisoned, some inputs non-contiguous) and through the public
ops with autograd under ``use_backend("triton")``. Ground truth is the reference in
float64; the reference in the input dtype sets the bound (docs/spec.md §4 rule)."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import vft_kernels as vk  # noqa: E402
from vft_kernels import dispatch  # noqa: E402
from vft_kernels.reference import block as ref  # noqa: E402
from vft_kernels.testing import assert_matches_reference, noncontiguous, poison_outputs  # noqa: E402
from vft_kernels.triton import block as tri  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-6


def _rand(shape, dtype, g, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def _up(t):
    return None if t is None else t.double()


def _nc(t, on):
    return noncontiguous(t) if on and t is not None else t


def _check(name, got, r64, rl, dtype, n):
    if r64 is None:
        assert got is None, f"{name}: expected None"
        return
    assert got is not None, f"{name}: got None"
    assert got.dtype == rl.dtype, f"{name}: dtype {got.dtype} != {rl.dtype}"
    assert_matches_reference(name, got, r64, rl, dtype, reduction_len=n)


# --------------------------------------------------------------------------------------
# Block norm (gated residual + modulated LayerNorm), kernels called directly

# (B, T, S, W, patches, K gate, K scale, K shift, parts); parts: "both", "norm", "res"
BLOCK_CASES = [
    (2, 2, 5, 24, 3, 2, 2, 2, "both"),
    (1, 3, 4, 5, 0, 2, 1, 2, "both"),     # patches = 0: every token is a register
    (2, 1, 3, 33, 3, 1, 2, 1, "both"),    # patches = S: no register tokens
    (1, 1, 1, 1, 1, 2, 2, 2, "both"),     # size-1 everything
    (2, 2, 3, 33, 1, 2, 2, 2, "norm"),
    (1, 2, 6, 5, 4, 1, 1, 1, "norm"),
    (2, 1, 4, 24, 2, 2, 2, 2, "res"),
    (1, 2, 13, 300, 10, 2, 2, 1, "both"),  # several row tiles and kind-sum steps / column tiles
    (1, 1, 3, 1030, 2, 2, 1, 2, "both"),   # one row per program
]


def _block_inputs(B, T, S, W, KG, KS, KB, parts, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = _rand((B, T, S, W), dtype, g, 2.0, 0.5)  # non-zero mean: the statistics matter
    gate = h = scale = shift = None
    if parts in ("both", "res"):
        gate, h = _rand((B, T, KG, W), dtype, g), _rand((B, T, S, W), dtype, g)
    if parts in ("both", "norm"):
        scale, shift = _rand((B, T, KS, W), dtype, g, 0.5), _rand((B, T, KB, W), dtype, g, 0.5)
    d_res = _rand((B, T, S, W), dtype, g) if parts != "norm" else None
    dy = _rand((B, T, S, W), dtype, g) if parts != "res" else None
    return x, gate, h, scale, shift, d_res, dy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(BLOCK_CASES)))
def test_block_norm_kernels(case, dtype):
    B, T, S, W, P, KG, KS, KB, parts = BLOCK_CASES[case]
    x, gate, h, scale, shift, d_res, dy = _block_inputs(B, T, S, W, KG, KS, KB, parts, dtype, seed=case)
    nc = case % 2 == 0  # non-contiguous inputs in every other case
    with poison_outputs():
        got = tri.block_norm_forward(*(_nc(t, nc) for t in (x, gate, h, scale, shift)), P, EPS)
    r64 = ref.block_norm_forward(*(_up(t) for t in (x, gate, h, scale, shift)), P, EPS)
    rl = ref.block_norm_forward(x, gate, h, scale, shift, P, EPS)
    for name, a, b, c in zip(("x_new", "y"), got, r64, rl):
        _check(f"{name} case {case}", a, b, c, dtype, W)

    # Backward, given the norm's input as each side computed it (x_new rounded, or x).
    xn_l = x if h is None else rl[0]
    xn_64 = _up(x) if h is None else r64[0]
    with poison_outputs():
        got = tri.block_norm_backward(*(_nc(t, nc) for t in (d_res, dy, xn_l, gate, h, scale, shift)), P, EPS)
    r64 = ref.block_norm_backward(_up(d_res), _up(dy), xn_64, *(_up(t) for t in (gate, h, scale, shift)), P, EPS)
    rl = ref.block_norm_backward(d_res, dy, xn_l, gate, h, scale, shift, P, EPS)
    for name, a, b, c, n in zip(("g", "dgate", "dh", "dscale", "dshift"), got, r64, rl, (W, S, W, S, S)):
        _check(f"{name} case {case}", a, b, c, dtype, n)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_block_norm_reads_rounded_x_new(dtype):
    """y is the norm of x_new as rounded to x's dtype (what the unfused pair computes): it
    equals the float64 norm of the kernel's own x_new, rounded, almost everywhere (the
    tolerance rule alone cannot tell, as the unrounded sum is closer to float64)."""
    x, gate, h, scale, shift, _, _ = _block_inputs(1, 2, 6, 64, 2, 2, 2, "both", dtype, seed=5)
    x_new, y = tri.block_norm_forward(x, gate, h, scale, shift, 4, EPS)
    want = ref.modulated_layer_norm(x_new.double(), scale.double(), shift.double(), 4, EPS).to(dtype)
    assert (y == want).double().mean() > 0.97


@pytest.mark.parametrize("missing", ["d_res", "dy", "both"])
def test_block_norm_backward_missing_grads(missing):
    """d_res / dy None mean zero gradients (dscale, dshift exactly 0 without dy)."""
    x, gate, h, scale, shift, d_res, dy = _block_inputs(2, 1, 5, 7, 2, 2, 1, "both", torch.float32, seed=11)
    d_res = None if missing in ("d_res", "both") else d_res
    dy = None if missing in ("dy", "both") else dy
    xn = ref.gated_residual(x, gate, h, 2)
    with poison_outputs():
        got = tri.block_norm_backward(d_res, dy, xn, gate, h, scale, shift, 2, EPS)
    r64 = ref.block_norm_backward(_up(d_res), _up(dy), xn.double(), *(_up(t) for t in (gate, h, scale, shift)), 2, EPS)
    rl = ref.block_norm_backward(d_res, dy, xn, gate, h, scale, shift, 2, EPS)
    for name, a, b, c in zip(("g", "dgate", "dh", "dscale", "dshift"), got, r64, rl):
        _check(f"{name} missing {missing}", a, b, c, torch.float32, 7)
    if dy is None:
        assert torch.equal(got[3], torch.zeros_like(got[3])) and torch.equal(got[4], torch.zeros_like(got[4]))


def test_block_norm_empty():
    x = torch.randn(2, 0, 3, 5)
    mod = torch.randn(2, 0, 2, 5)
    with poison_outputs():
        x_new, y = tri.block_norm_forward(x, mod, x, mod, mod, 1, EPS)
        grads = tri.block_norm_backward(x, x, x, mod, x, mod, mod, 1, EPS)
    assert x_new.shape == y.shape == x.shape
    assert [t.shape for t in grads] == [x.shape, mod.shape, x.shape, mod.shape, mod.shape]
    # S = 0: no tokens, so the modulation gradients are empty sums (zeros)
    x, mod = torch.randn(1, 2, 0, 4), torch.randn(1, 2, 2, 4)
    with poison_outputs():
        g, dgate, dh, dscale, dshift = tri.block_norm_backward(x, x, x, mod, x, mod, mod, 0, EPS)
    assert g.shape == dh.shape == x.shape
    for t in (dgate, dscale, dshift):
        assert torch.equal(t, torch.zeros_like(mod))


# --------------------------------------------------------------------------------------
# SwiGLU, QK-RMSNorm kernels


SWIGLU_SHAPES = [(3, 5, 14), (1, 2), (2, 3, 66), (3, 700)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=str)
def test_swiglu_kernels(shape, dtype):
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    gate_up = _rand(shape, dtype, g, 3.0)  # wide range: both tails of the sigmoid
    dout = _rand(shape[:-1] + (shape[-1] // 2,), dtype, g)
    nc = shape[-1] % 4 == 2
    with poison_outputs():
        out = tri.swiglu_forward(_nc(gate_up, nc))
        dgu = tri.swiglu_backward(_nc(dout, nc), _nc(gate_up, nc))
    _check("swiglu out", out, ref.swiglu_forward(gate_up.double()), ref.swiglu_forward(gate_up), dtype, 1)
    _check("swiglu dgate_up", dgu, ref.swiglu_backward(dout.double(), gate_up.double()),
           ref.swiglu_backward(dout, gate_up), dtype, 1)


# (B, N, heads, D)
QK_CASES = [(2, 3, 2, 5), (1, 1, 1, 1), (1, 4, 3, 24), (2, 2, 1, 33), (1, 7, 3, 130)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(QK_CASES)))
def test_qk_norm_kernels(case, dtype):
    B, N, H, D = QK_CASES[case]
    g = torch.Generator().manual_seed(50 + case)
    qkv = _rand((B, N, 3 * H * D), dtype, g, 1.5, 0.3)
    wq = _rand((D,), torch.float32, g, 0.3, 1.0)  # weights may be another float dtype
    wk = _rand((D,), dtype, g, 0.3, 1.0)
    dq, dk, dv = (_rand((B, H, N, D), dtype, g) for _ in range(3))
    nc = case % 2 == 0
    with poison_outputs():
        got = tri.qk_norm_forward(_nc(qkv, nc), H, _nc(wq, nc), wk, EPS)
    r64 = ref.qk_norm_forward(qkv.double(), H, wq.double(), wk.double(), EPS)
    rl = ref.qk_norm_forward(qkv, H, wq, wk, EPS)
    for name, a, b, c in zip("qkv", got, r64, rl):
        assert a.is_contiguous()
        _check(f"qk {name}", a, b, c, dtype, D)
    with poison_outputs():
        got = tri.qk_norm_backward(*(_nc(t, nc) for t in (dq, dk, dv, qkv)), H, wq, _nc(wk, nc), EPS)
    r64 = ref.qk_norm_backward(dq.double(), dk.double(), dv.double(), qkv.double(), H, wq.double(), wk.double(), EPS)
    rl = ref.qk_norm_backward(dq, dk, dv, qkv, H, wq, wk, EPS)
    for name, a, b, c, n in zip(("dqkv", "dq_weight", "dk_weight"), got, r64, rl, (D, B * N * H, B * N * H)):
        _check(f"qk {name}", a, b, c, dtype, n)


def test_qk_norm_backward_missing_grads():
    g = torch.Generator().manual_seed(3)
    qkv = _rand((2, 3, 3 * 2 * 5), torch.float32, g)
    wq, wk = _rand((5,), torch.float32, g), _rand((5,), torch.float32, g)
    dk = _rand((2, 2, 3, 5), torch.float32, g)
    with poison_outputs():
        got = tri.qk_norm_backward(None, dk, None, qkv, 2, wq, wk, EPS)
    r64 = ref.qk_norm_backward(None, dk.double(), None, qkv.double(), 2, wq.double(), wk.double(), EPS)
    rl = ref.qk_norm_backward(None, dk, None, qkv, 2, wq, wk, EPS)
    for name, a, b, c in zip(("dqkv", "dq_weight", "dk_weight"), got, r64, rl):
        _check(f"qk {name}", a, b, c, torch.float32, 5)


# (B, N, heads, D): odd head dims, a length of 97, one row per program at D = 130
QK_LN_CASES = [(2, 3, 2, 13), (1, 1, 1, 1), (1, 97, 1, 59), (2, 4, 3, 24), (1, 5, 2, 130)]


def _qkv_centered(B, N, H, D, dtype, g):
    """qkv [B, N, 3 H D] with a mean and spread per head (the centring matters)."""
    x = torch.randn((B, N, 3, H, D), generator=g, dtype=torch.float64)
    x = x * (0.5 + 2 * torch.rand((1, 1, 3, H, 1), generator=g, dtype=torch.float64))
    x = x + 3 * torch.randn((1, 1, 3, H, 1), generator=g, dtype=torch.float64)
    return x.reshape(B, N, 3 * H * D).to(dtype)


def _official_qk_layer_norm(qkv, heads):
    """The official attention's QK norm on q | k | v: "b n (h d) -> b h n d", then
    Fp32LayerNorm(D, bias=False, elementwise_affine=False) on q and k."""
    B, N, W3 = qkv.shape
    q, k, v = (t.reshape(B, N, heads, -1).transpose(1, 2) for t in qkv.split(W3 // 3, dim=-1))

    def norm(x):
        return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=1e-5).type_as(x)
    return norm(q), norm(k), v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(QK_LN_CASES)))
def test_qk_layer_norm_kernels(case, dtype):
    """The centred mode (QK-LayerNorm, no weights) against the reference in float64, bounded
    by the official formula in ``dtype``."""
    B, N, H, D = QK_LN_CASES[case]
    g = torch.Generator().manual_seed(70 + case)
    qkv = _qkv_centered(B, N, H, D, dtype, g)
    dq, dk, dv = (_rand((B, H, N, D), dtype, g) for _ in range(3))
    nc = case % 2 == 0
    with poison_outputs():
        got = tri.qk_norm_forward(_nc(qkv, nc), H, None, None, 1e-5, True)
    r64 = ref.qk_norm_forward(qkv.double(), H, None, None, 1e-5, True)
    for name, a, b, c in zip("qkv", got, r64, _official_qk_layer_norm(qkv, H)):
        assert a.is_contiguous()
        _check(f"qk_layer_norm {name}", a, b, c, dtype, D)
    with poison_outputs():
        got = tri.qk_norm_backward(*(_nc(t, nc) for t in (dq, dk, dv, qkv)), H, None, None, 1e-5, True)
    r64 = ref.qk_norm_backward(dq.double(), dk.double(), dv.double(), qkv.double(), H, None, None, 1e-5, True)
    rl = ref.qk_norm_backward(dq, dk, dv, qkv, H, None, None, 1e-5, True)
    for name, a, b, c in zip(("dqkv", "dq_weight", "dk_weight"), got, r64, rl):
        _check(f"qk_layer_norm {name}", a, b, c, dtype, D)


def test_qk_layer_norm_backward_missing_grads():
    g = torch.Generator().manual_seed(4)
    qkv = _qkv_centered(2, 3, 2, 5, torch.float32, g)
    dq = _rand((2, 2, 3, 5), torch.float32, g)
    with poison_outputs():
        got = tri.qk_norm_backward(dq, None, None, qkv, 2, None, None, 1e-5, True)
    r64 = ref.qk_norm_backward(dq.double(), None, None, qkv.double(), 2, None, None, 1e-5, True)
    rl = ref.qk_norm_backward(dq, None, None, qkv, 2, None, None, 1e-5, True)
    for name, a, b, c in zip(("dqkv", "dq_weight", "dk_weight"), got, r64, rl):
        _check(f"qk_layer_norm {name}", a, b, c, torch.float32, 5)


def test_swiglu_qk_empty():
    with poison_outputs():
        assert tri.swiglu_forward(torch.randn(0, 6)).shape == (0, 3)
        assert tri.swiglu_backward(torch.randn(3, 0), torch.randn(3, 0)).shape == (3, 0)
        q, k, v = tri.qk_norm_forward(torch.randn(2, 0, 12), 2, torch.randn(2), torch.randn(2), EPS)
        dqkv, dwq, dwk = tri.qk_norm_backward(q, k, v, torch.randn(2, 0, 12), 2, torch.randn(2), torch.randn(2), EPS)
    assert q.shape == k.shape == v.shape == (2, 2, 0, 2) and dqkv.shape == (2, 0, 12)
    assert torch.equal(dwq, torch.zeros(2)) and torch.equal(dwk, torch.zeros(2))
    with poison_outputs():
        q, k, v = tri.qk_norm_forward(torch.randn(2, 0, 12), 2, None, None, 1e-5, True)
        dqkv, dwq, dwk = tri.qk_norm_backward(q, k, v, torch.randn(2, 0, 12), 2, None, None, 1e-5, True)
    assert q.shape == k.shape == v.shape == (2, 2, 0, 2) and dqkv.shape == (2, 0, 12)
    assert dwq is None and dwk is None


def test_supports():
    x = torch.randn(1, 1, 2, 3)
    for dt in DTYPES:
        assert tri.supports(x.to(dt), None, None, x.to(dt), x.to(dt), 1, EPS) is None
    assert "float64" in tri.supports(x.double(), None, None, x.double(), x.double(), 1, EPS)
    assert tri.supports(torch.randn(2, 3, 12), 2, torch.randn(2).double(), torch.randn(2), EPS) is not None


# --------------------------------------------------------------------------------------
# Public ops with autograd: triton vs the reference backend


def _run_op(backend, fn, inputs, grads):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with vk.use_backend(backend):
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        got = torch.autograd.grad(outs, leaves, grads)
    return [o.detach() for o in outs], list(got)


def _compare_op(name, fn, inputs, grads, dtype, out_lens, grad_lens):
    outs, gr = _run_op("triton", fn, inputs, grads)
    outs64, gr64 = _run_op("reference", fn, [t.double() for t in inputs], [t.double() for t in grads])
    outsl, grl = _run_op("reference", fn, inputs, grads)
    for i, (a, b, c, n) in enumerate(zip(outs, outs64, outsl, out_lens)):
        _check(f"{name} out{i}", a, b, c, dtype, n)
    for i, (a, b, c, n) in enumerate(zip(gr, gr64, grl, grad_lens)):
        _check(f"{name} grad{i}", a, b, c, dtype, n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_block_ops_autograd(dtype):
    B, T, S, W, P = 2, 2, 5, 24, 3
    g = torch.Generator().manual_seed(123)
    x, h = _rand((B, T, S, W), dtype, g, 2.0, 0.5), _rand((B, T, S, W), dtype, g)
    gate, scale, shift = _rand((B, T, 2, W), dtype, g), _rand((B, T, 2, W), dtype, g, 0.5), \
        _rand((B, T, 1, W), dtype, g, 0.5)
    d1, d2 = _rand((B, T, S, W), dtype, g), _rand((B, T, S, W), dtype, g)
    layout = vk.RegisterLayout(T, P, S - P, "block_causal")
    _compare_op("gated_residual_norm", lambda x, g, h, s, b: vk.gated_residual_norm(x, g, h, layout, scale=s, shift=b,
                                                                                eps=EPS),
                [x, gate, h, scale, shift], [d1, d2], dtype, (W, W), (W, S, W, S, S))
    _compare_op("modulated_layer_norm", lambda x, s, b: vk.modulated_layer_norm(x, P, scale=s, shift=b, eps=EPS),
                [x, scale, shift], [d1], dtype, (W,), (W, S, S))
    _compare_op("gated_residual", lambda *a: vk.gated_residual(*a, P), [x, gate, h], [d1], dtype, (1,), (1, S, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_swiglu_qk_autograd(dtype):
    g = torch.Generator().manual_seed(321)
    gu = _rand((2, 3, 2 * 7), dtype, g, 2.0)
    _compare_op("swiglu", vk.swiglu, [gu], [_rand((2, 3, 7), dtype, g)], dtype, (1,), (1,))
    w = _rand((5, 7), dtype, g)
    _compare_op("swiglu+proj", vk.swiglu, [gu, w], [_rand((2, 3, 5), dtype, g)], dtype, (7,), (5, 6))
    B, N, H, D = 2, 3, 2, 6
    qkv = _rand((B, N, 3 * H * D), dtype, g)
    wq, wk = _rand((D,), dtype, g, 0.3, 1.0), _rand((D,), dtype, g, 0.3, 1.0)
    grads = [_rand((B, H, N, D), dtype, g) for _ in range(3)]
    _compare_op("qk_rms_norm", lambda *a: vk.qk_rms_norm(a[0], H, a[1], a[2], eps=EPS), [qkv, wq, wk], grads,
                dtype, (D, D, D), (D, B * N * H, B * N * H))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_qk_layer_norm_autograd(dtype):
    """vk.qk_layer_norm on the triton kernels (non-contiguous qkv, odd sizes) vs the
    reference in float64, bounded by the official formula in ``dtype``; contiguous outputs."""
    B, N, H, D = 2, 97, 2, 13
    g = torch.Generator().manual_seed(77)
    qkv = _qkv_centered(B, N, H, D, dtype, g)
    grads = [_rand((B, H, N, D), dtype, g) for _ in range(3)]

    def op(x):
        return vk.qk_layer_norm(noncontiguous(x), H)

    outs, gr = _run_op("triton", op, [qkv], grads)
    for t in outs:
        assert t.is_contiguous() and t.shape == (B, H, N, D)
    outs64, gr64 = _run_op("reference", op, [qkv.double()], [t.double() for t in grads])
    outsl, grl = _run_op("reference", lambda x: _official_qk_layer_norm(noncontiguous(x), H), [qkv], grads)
    for name, a, b, c in zip(("q", "k", "v", "dqkv"), outs + gr, outs64 + gr64, outsl + grl):
        _check(f"qk_layer_norm {name}", a, b, c, dtype, D)


def test_public_ops_select_triton():
    """Forced triton runs the triton kernels (not the reference), float64 is refused."""
    x = torch.randn(1, 1, 3, 4)
    mod = torch.randn(1, 1, 2, 4)
    with vk.use_backend("triton"):
        name, fn = dispatch.select("block_norm_forward", x.device, x, None, None, mod, mod, 1, EPS)
        assert name == "triton" and fn is tri.block_norm_forward
        with pytest.raises(dispatch.BackendUnavailableError, match="float64"):
            vk.swiglu(torch.randn(2, 4, dtype=torch.float64))


AOT_SCRIPT = """
from vft_kernels.triton import aot, block
rows = [aot.compile_variant(v, a) for v in block.aot_variants() for a in (80, 90)]
for r in rows:
    print("ROW", r["kernel"], r["arch"], r.get("regs"), r.get("spill_stores"), r.get("error", ""))
for f in aot.failures(rows):
    print("FAIL", f)
"""


def test_aot_compiles_block_kernels():
    """Every block kernel compiles for sm_80 and sm_90 without spills (no GPU needed)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FAIL" not in res.stdout, res.stdout[-3000:]
    for name in ("block_norm_fwd", "block_norm_bwd", "block_kind_sum", "swiglu_fwd", "swiglu_bwd", "qk_norm_fwd",
                 "qk_norm_bwd", "qk_layer_norm_fwd", "qk_layer_norm_bwd"):
        assert f"ROW {name}[" in res.stdout, f"{name} not compiled"
