"""Flow ODE sampler (SPEC.md §3) on the fused vft_kernels steps.

Integrates ``dx/dt = v`` from ``t = 1`` (noise) to ``t = 0`` (data) with
``vk.flow_step`` (Euler, guidance fused) or ``vk.flow_heun_step`` (Heun), so every
backend of those ops speeds it up. Time grid: ``t_i = i / steps``, optionally shifted
``t' = s t / (1 + (s - 1) t)``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

import vft_kernels as vk

GUIDANCE = ("none", "cfg", "apg")
SOLVERS = ("euler", "heun")

VelocityFn = Callable[[torch.Tensor, float], tuple[torch.Tensor, Optional[torch.Tensor]]]


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """``steps + 1`` decreasing times from 1 to 0."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    ts = [1 - i / steps for i in range(steps + 1)]
    return [shift * t / (1 + (shift - 1) * t) for t in ts]


def sample(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int, guidance: str = "none", scale: float = 1.0,
           shift: float = 1.0, solver: str = "euler", prefix: Optional[torch.Tensor] = None, prefix_len: int = 0,
           apg_eta: float = 0.0, apg_norm_threshold: float = 0.0, apg_momentum: float = 0.0,
           progress: bool = False) -> torch.Tensor:
    """Sample from noise ``[B, C, T, ...]`` (time in dim 2).

    ``velocity_fn(x, t)`` returns ``(v_cond, v_uncond)``; ``v_uncond`` may be None when
    ``guidance == "none"``. With ``prefix_len > 0`` the first ``prefix_len`` frames are
    held at the clean ``prefix`` ``[B, C, prefix_len, ...]`` throughout (continuation of an
    already-decoded video); ``velocity_fn`` should treat them as clean (t = 0) frames.
    Returns the sample, dtype of ``noise``."""
    if guidance not in GUIDANCE:
        raise ValueError(f"guidance must be one of {GUIDANCE}, got {guidance!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    grid = time_grid(steps, shift)
    x = noise.clone()
    if prefix_len > 0:
        x[:, :, :prefix_len] = prefix
    guide = dict(guidance=guidance, scale=scale, apg_eta=apg_eta, apg_norm_threshold=apg_norm_threshold,
                 apg_momentum=apg_momentum, momentum=torch.zeros_like(x) if apg_momentum else None)
    zero = torch.zeros_like(x) if solver == "heun" else None
    for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        t, t_next = grid[i], grid[i + 1]
        v_cond, v_uncond = velocity_fn(x, t)
        if solver == "euler":
            x = vk.flow_step(x, v_cond, t, t_next, v_uncond=v_uncond, prefix=prefix, prefix_len=prefix_len, **guide)
            continue
        # Heun needs the guided velocities themselves: a unit step from 0 gives -v exactly.
        v1 = -vk.flow_step(zero, v_cond, 1.0, 0.0, v_uncond=v_uncond, **guide)
        x_euler = vk.flow_step(x, v1, t, t_next, prefix=prefix, prefix_len=prefix_len)
        v_cond2, v_uncond2 = velocity_fn(x_euler, t_next)
        v2 = -vk.flow_step(zero, v_cond2, 1.0, 0.0, v_uncond=v_uncond2, **guide)
        x = vk.flow_heun_step(x, v1, v2, t, t_next)
        if prefix_len > 0:
            x[:, :, :prefix_len] = prefix
    return x
