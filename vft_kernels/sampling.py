"""The flow-matching sampling loop (docs/spec.md §3) on the fused steps ``flow_step`` /
``flow_heun_step``: integrates ``dx/dt = v(x, t)`` from ``t = 1`` (noise) to ``t = 0`` (data)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch

from .ops.flow import GUIDANCE, _LoopStepper, flow_heun_step

SOLVERS = ("euler", "heun")
_GRAPHS: "OrderedDict[tuple, _Captured]" = OrderedDict()
_MAX_GRAPHS = 4


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """``steps + 1`` times from 1 down to 0: ``t_i = i / steps``, then ``s t / (1 + (s - 1) t)``
    (``shift = s > 1`` spends more steps near t = 1, the noisy end)."""
    ts = [i / steps for i in range(steps, -1, -1)]
    return [shift * t / (1 + (shift - 1) * t) for t in ts]


def flow_sample(velocity_fn: Callable, noise: torch.Tensor, steps: int, guidance: str = "none", scale: float = 1.0,
                shift: float = 1.0, solver: str = "euler", prefix: Optional[torch.Tensor] = None, prefix_len: int = 0,
                progress: bool = False, apg_eta: float = 0.0, apg_norm_threshold: float = 0.0,
                apg_momentum: float = 0.0, reduce_ndim: int = 3, cuda_graph: bool = False) -> torch.Tensor:
    """Sample by integrating the flow ODE from ``noise`` (t = 1) to t = 0 in ``steps`` steps.

    velocity_fn(x, t): x shaped like ``noise``, t a float32 tensor [B]; returns ``v_cond``
    (guidance "none") or ``(v_cond, v_uncond)`` ("cfg" / "apg"), shaped like x.
    noise: [B, ...] float32/float16/bfloat16 (images [B, C, H, W], videos [B, C, T, H, W]).
    guidance, scale, apg_*, reduce_ndim: as in :func:`vft_kernels.flow_step`; the APG
    momentum state is kept per sample across steps (zeros at the start).
    solver: "euler" (one velocity evaluation per step) or "heun" (two; second order). With
    guidance, Heun's half step is taken from the midpoint ``(x + x_pred) / 2`` with the
    guided step kernel, and the APG momentum advances at every velocity evaluation.
    prefix, prefix_len: clean frames [B, C, prefix_len, ...] that replace the first
    ``prefix_len`` entries of dim 2 of x at the start and after every step (continuation).
    progress: show a tqdm bar.
    cuda_graph: CUDA only. The first call captures the whole loop in a CUDA graph (after one
    eager warm-up run) and keeps it for later calls with the same velocity_fn, shapes,
    dtype, device and options, which then only copy ``noise`` / ``prefix`` in and replay.
    velocity_fn must then be capturable: no host synchronisation (``.item()``, printing
    tensors, CPU tensors, data-dependent shapes or control flow), the same kernels every
    call, and its weights updated in place (not reallocated) between calls. The cache holds
    the last 4 graphs and a reference to their velocity_fn.
    Returns x at t = 0, shaped and typed like ``noise``."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"flow_sample: steps must be an int >= 1, got {steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"flow_sample: solver must be one of {SOLVERS}, got {solver!r}")
    if guidance not in GUIDANCE:
        raise ValueError(f"flow_sample: guidance must be one of {GUIDANCE}, got {guidance!r}")
    if not shift > 0:
        raise ValueError(f"flow_sample: shift must be > 0, got {shift!r}")
    if not isinstance(noise, torch.Tensor) or noise.dim() < 1:
        raise ValueError(f"flow_sample: noise must be a tensor [B, ...], got {noise!r:.80}")
    if prefix_len > 0:
        want = tuple(noise.shape[:2]) + (prefix_len,) + tuple(noise.shape[3:])
        if not isinstance(prefix, torch.Tensor) or tuple(prefix.shape) != want:
            got = tuple(prefix.shape) if isinstance(prefix, torch.Tensor) else prefix
            raise ValueError(f"flow_sample: prefix must have shape {want} for prefix_len={prefix_len}, got {got}")
    opts = dict(guidance=guidance, scale=float(scale), apg_eta=float(apg_eta),
                apg_norm_threshold=float(apg_norm_threshold), apg_momentum=float(apg_momentum),
                reduce_ndim=reduce_ndim, prefix_len=prefix_len)
    times = time_grid(steps, shift)
    if not cuda_graph:
        return _integrate(velocity_fn, noise, prefix, _time_rows(times, noise.shape[0], noise.device), solver,
                          progress, opts)
    if noise.device.type != "cuda":
        raise ValueError(f"flow_sample: cuda_graph=True needs CUDA tensors, got noise on {noise.device}")
    key = (velocity_fn, tuple(noise.shape), noise.dtype, noise.device, tuple(times), solver,
           tuple(sorted(opts.items())), None if prefix is None else (tuple(prefix.shape), prefix.dtype))
    graph = _GRAPHS.pop(key, None) or _Captured(velocity_fn, noise, prefix, times, solver, opts)
    _GRAPHS[key] = graph
    while len(_GRAPHS) > _MAX_GRAPHS:
        _GRAPHS.popitem(last=False)
    return graph.replay(noise, prefix)


def _velocities(velocity_fn, x, t, guided):
    v = velocity_fn(x, t)
    if guided:
        if not (isinstance(v, (tuple, list)) and len(v) == 2):
            raise ValueError("flow_sample: with guidance, velocity_fn must return (v_cond, v_uncond), "
                             f"got {type(v).__name__}")
        return v[0], v[1]
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"flow_sample: with guidance='none', velocity_fn must return a tensor, got {type(v).__name__}")
    return v, None


def _time_rows(times, B, device):
    """[steps + 1, B] float32 times and [steps, B] midpoints, built once per loop (contiguous
    rows: no per-step allocation, launch or host-to-device copy)."""
    t = torch.tensor(times, dtype=torch.float64)
    rows = t.to(torch.float32).reshape(-1, 1).repeat(1, B).to(device)
    mids = (0.5 * (t[:-1] + t[1:])).to(torch.float32).reshape(-1, 1).repeat(1, B).to(device)
    return rows, mids


def _integrate(velocity_fn, noise, prefix, time_rows, solver, progress, opts):
    """The loop itself; ping-pongs between two buffers so no step writes a tensor that the
    velocity function's output might alias."""
    p = opts["prefix_len"]
    guided = opts["guidance"] != "none"
    rows, mids = time_rows
    x = noise.clone(memory_format=torch.contiguous_format)
    buf = torch.empty_like(x)
    if p > 0:
        x[:, :, :p] = prefix
    step_kw = dict(opts, prefix=prefix)
    if opts["guidance"] == "apg" and opts["apg_momentum"] != 0:
        step_kw["momentum"] = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    euler = _LoopStepper(step_kw)
    steps = range(rows.shape[0] - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="flow_sample", unit="step")
    for i in steps:
        t, tn = rows[i], rows[i + 1]
        vc, vu = _velocities(velocity_fn, x, t, guided)
        euler(x, vc, t, tn, vu, buf)  # Euler step, or Heun's predictor
        if solver == "heun":
            v2c, v2u = _velocities(velocity_fn, buf, tn, guided)
            if guided:
                x.lerp_(buf, 0.5)  # x + dt/2 v1
                euler(x, v2c, mids[i], tn, v2u, buf)
            else:
                flow_heun_step(x, vc, v2c, t, tn, out=buf)
                if p > 0:
                    buf[:, :, :p] = prefix
        x, buf = buf, x
    return x


class _Captured:
    """One CUDA graph of the whole loop with its static input and output buffers."""

    def __init__(self, velocity_fn, noise, prefix, times, solver, opts):
        self.noise = noise.clone(memory_format=torch.contiguous_format)
        self.prefix = None if prefix is None else prefix.clone()
        time_rows = _time_rows(times, noise.shape[0], noise.device)  # static: made before capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: lazy initialisation, Triton compilation
            _integrate(velocity_fn, self.noise, self.prefix, time_rows, solver, False, opts)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = _integrate(velocity_fn, self.noise, self.prefix, time_rows, solver, False, opts)

    def replay(self, noise, prefix):
        self.noise.copy_(noise)
        if prefix is not None:
            self.prefix.copy_(prefix)
        self.graph.replay()
        return self.out.clone()
