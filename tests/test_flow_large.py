"""Flow step kernels at sizes the small-shape tests (test_flow_kernels.py) never reach, and
the CUDA-graph sampler.

* cpu: groups / samples of more than ``kParallelMin`` (65,536) elements with a remainder
  after the last ``kBlock`` (2,048) block, so the APG reduction folds several blocks and
  ``at::parallel_for`` really splits the work (1 and 2 threads). test_threads.py runs
  similar sizes but only compares thread counts, and the reference loosely.
* triton (interpreter): an APG group longer than ``NPART * BLOCK`` elements, so every
  program of the reduction loops over several blocks of its chunk, with a partial last
  chunk; none / cfg / Heun over a sample of more than ``BLOCK`` elements per row.
* ``flow_sample(cuda_graph=True)`` against the eager loop on a CUDA device (skipped
  without one; the CPU refusal is tested in test_sampling.py).

Every result is checked against the float64 reference with the docs/spec.md §4 rule
(``assert_matches_reference``), NaN-poisoned outputs (tests/conftest.py)."""
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import vft_kernels as vk
from vft_kernels import dispatch
from vft_kernels.reference import flow as ref
from vft_kernels.testing import assert_matches_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
VIDEO = (2, 4, 3, 97, 129)  # per sample 150,156 elements; per (sample, channel) group 37,539
IMAGE = (2, 3, 97, 229)     # per sample (= APG group) 66,639 elements


def _skip_unless(backend):
    reason = dispatch.backend_status(backend) or dispatch._REGISTRY[("flow_step", backend)].load()
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable: {reason}")


def _cpu_constants():
    """kBlock and kParallelMin of csrc/cpu/flow.cpp, so the sizes below are checked against
    the thresholds the kernel actually uses."""
    src = (ROOT / "csrc" / "cpu" / "flow.cpp").read_text()
    block = int(re.search(r"kBlock\s*=\s*(\d+)", src).group(1))
    parallel_min = eval(re.search(r"kParallelMin\s*=\s*([\d <]+);", src).group(1))  # e.g. "1 << 16"
    return block, parallel_min


def _inputs(shape, dtype, reduce_ndim, seed):
    """x, v_cond, v_uncond and per-sample times; |v_cond - v_uncond| varies by group (0.05x to
    2x) so a norm threshold clips some groups and leaves others alone."""
    g = torch.Generator().manual_seed(seed)
    x, vc, diff = (torch.randn(shape, generator=g) for _ in range(3))
    lead = shape[:len(shape) - reduce_ndim]
    group_scale = torch.linspace(0.05, 2.0, math.prod(lead)).reshape(lead + (1,) * reduce_ndim)
    vu = vc - diff * group_scale
    t = 0.5 + 0.5 * torch.rand(shape[0], generator=g)
    tn = t - 0.01 - 0.2 * torch.rand(shape[0], generator=g)
    return [a.to(dtype) for a in (x, vc, vu)] + [t, tn]


def _check_step(backend, shape, dtype, guidance, reduce_ndim=3, seed=0, **kw):
    """One flow_step (or Heun step for guidance "heun") on ``backend`` against the float64
    reference; APG with momentum starts from a random state and checks it too."""
    x, vc, vu, t, tn = _inputs(shape, dtype, reduce_ndim, seed)
    name = f"{backend} {guidance} {shape} {dtype}"
    if guidance == "heun":
        r64 = ref.flow_heun_step(x.double(), vc.double(), vu.double(), t.double(), tn.double())
        rlp = ref.flow_heun_step(x, vc, vu, t, tn)
        with vk.use_backend(backend):
            got = vk.flow_heun_step(x, vc, vu, t, tn)
        assert_matches_reference(name, got, r64, rlp, dtype)
        return
    use_mom = guidance == "apg" and kw.get("apg_momentum", 0) != 0
    state = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)) if use_mom else None
    m, m64, mlp = ((state.clone(), state.double(), state.clone()) if use_mom else (None, None, None))
    kw = dict(kw, guidance=guidance, reduce_ndim=reduce_ndim)
    r64 = ref.flow_step(x.double(), vc.double(), t.double(), tn.double(), vu.double(), momentum=m64, **kw)
    rlp = ref.flow_step(x, vc, t, tn, vu, momentum=mlp, **kw)
    with vk.use_backend(backend):
        got = vk.flow_step(x, vc, t, tn, vu, momentum=m, **kw)
    red = math.prod(shape[len(shape) - reduce_ndim:]) if guidance == "apg" else 1
    assert_matches_reference(name, got, r64, rlp, dtype, red)
    if use_mom:
        assert_matches_reference(f"{name} momentum", m, m64, mlp, torch.float32, red)
    if guidance == "apg" and kw.get("apg_norm_threshold", 0) > 0:  # ||d|| per group vs the threshold
        dims = tuple(range(len(shape) - reduce_ndim, len(shape)))
        return torch.linalg.vector_norm(m64 if use_mom else vc.double() - vu.double(), dim=dims) \
            / kw["apg_norm_threshold"]


APG = dict(scale=3.5, apg_eta=0.25)
APG_MOM = dict(scale=3.5, apg_eta=0.25, apg_momentum=-0.6, apg_norm_threshold=120.0)
CPU_CASES = [  # (shape, reduce_ndim, guidance, dtype, kwargs)
    (VIDEO, 3, "none", torch.float32, {}),
    (VIDEO, 3, "cfg", torch.float32, dict(scale=4.0)),
    (VIDEO, 3, "cfg", torch.bfloat16, dict(scale=4.0)),
    (VIDEO, 3, "heun", torch.float32, {}),
    (VIDEO, 3, "apg", torch.float32, APG),
    (VIDEO, 3, "apg", torch.float32, APG_MOM),  # 8 groups of 37,539 (19 blocks of 2,048 + 675)
    (VIDEO, 4, "apg", torch.float32, APG_MOM),  # 2 groups of 150,156 (73 blocks + 652)
    (IMAGE, 3, "apg", torch.float32, APG_MOM),  # 2 groups of 66,639 (32 blocks + 1,103)
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,reduce_ndim,guidance,dtype,kw", CPU_CASES,
                         ids=[f"{'video' if c[0] == VIDEO else 'image'}-r{c[1]}-{c[2]}-{str(c[3])[6:]}"
                              f"{'-mom' if c[4].get('apg_momentum') else ''}" for c in CPU_CASES])
def test_cpu_large_groups_multi_block_and_parallel(threads, shape, reduce_ndim, guidance, dtype, kw):
    _skip_unless("cpu")
    block, parallel_min = _cpu_constants()
    per_sample = math.prod(shape[1:])
    group = math.prod(shape[len(shape) - reduce_ndim:])
    assert per_sample > parallel_min and per_sample % block, "sizes must cross the elementwise thresholds"
    if guidance == "apg":
        assert group > block and group % block, "APG groups must span several blocks plus a remainder"
        assert shape[0] * per_sample // group >= 2, "at least 2 groups to split across threads"
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ratio = _check_step("cpu", shape, dtype, guidance, reduce_ndim, **kw)
    finally:
        torch.set_num_threads(previous)
    if ratio is not None and shape == VIDEO and reduce_ndim == 3:  # both sides of min(1, thr / ||d||)
        assert bool((ratio > 1).any()) and bool((ratio < 1).any()), f"||d|| / threshold per group: {ratio}"


@pytest.mark.parametrize("guidance", ["apg", "cfg", "none", "heun"])
def test_triton_chunked_partial_sums(guidance):
    """IMAGE: one APG group of 66,639 > NPART * BLOCK elements per sample, so the reduction
    runs 33 chunks of 2 blocks (the last one partial) and the update folds 33 partials;
    the elementwise modes cover 66 blocks per row with a partial last block."""
    _skip_unless("triton")
    from vft_kernels.triton import flow as tflow

    L = math.prod(IMAGE[1:])
    assert L > tflow.NPART * tflow.BLOCK and L % tflow.BLOCK, "the group must need multi-block chunks"
    kw = APG_MOM if guidance == "apg" else dict(scale=4.0) if guidance == "cfg" else {}
    _check_step("triton", IMAGE, torch.float32, guidance, 3, seed=5, **kw)


# --------------------------------------------------------------------------------------
# flow_sample(cuda_graph=True): CUDA only. Run in a subprocess without TRITON_INTERPRET
# (tests/conftest.py sets it, and the interpreter's host copies cannot be captured).

CUDA_GRAPH_SCRIPT = r"""
import torch
import vft_kernels as vk
from vft_kernels import dispatch
from vft_kernels.sampling import _GRAPHS

dev = torch.device("cuda")
shape = (2, 3, 4, 8, 8)
w = torch.randn(shape[1:], device=dev) * 0.5
ran = []


def make_fn(guided):
    def fn(x, t):
        v = torch.tanh(x * w) - t.view(-1, 1, 1, 1, 1) * x
        return (v, 0.5 * v + 0.1 * x) if guided else v
    return fn


for backend in ("triton", "cuda"):
    if dispatch.backend_status(backend) is not None or dispatch._REGISTRY[("flow_step", backend)].load() is not None:
        continue
    for solver in ("euler", "heun"):
        for guidance, kw in (("none", {}), ("cfg", dict(scale=2.0)),
                             ("apg", dict(scale=3.0, apg_eta=0.2, apg_norm_threshold=2.0, apg_momentum=-0.5))):
            with vk.use_backend(backend):
                fn = make_fn(guidance != "none")
                opts = dict(guidance=guidance, solver=solver, prefix_len=1, shift=2.0, **kw)
                name = f"{backend} {solver} {guidance}"
                results = []
                for i in range(3):
                    if i == 2:
                        w.mul_(0.5)  # weights updated in place: the captured graph must see it
                    noise = torch.randn(shape, device=dev)
                    prefix = torch.randn(shape[:2] + (1,) + shape[3:], device=dev)
                    want = vk.flow_sample(fn, noise, 5, prefix=prefix, **opts)
                    got = vk.flow_sample(fn, noise, 5, prefix=prefix, cuda_graph=True, **opts)
                    torch.cuda.synchronize()
                    if i == 0:
                        captured = next(reversed(_GRAPHS.values()))
                    else:
                        assert next(reversed(_GRAPHS.values())) is captured, f"{name}: call {i} captured again"
                    assert got.shape == noise.shape and got.dtype == noise.dtype and got.device == noise.device
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{name} call {i}")
                    assert torch.equal(got[:, :, :1], prefix), f"{name} call {i}: prefix frames"
                    results.append((got, got.clone()))
                for got, copy in results:  # earlier results are not overwritten by later replays
                    assert torch.equal(got, copy), f"{name}: a replay overwrote an earlier result"
                assert not torch.allclose(results[0][0], results[1][0]), f"{name}: new noise, same output"
                ran.append(name)
print("RAN", len(ran), ran)
assert ran, "no CUDA flow backend available"
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flow_sample(cuda_graph=True) needs a CUDA device")
def test_cuda_graph_sampling_matches_eager():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", CUDA_GRAPH_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "RAN " in res.stdout and "RAN 0" not in res.stdout, res.stdout
