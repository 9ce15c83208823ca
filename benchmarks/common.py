"""What a benchmark module gives the harness (benchmarks/run.py).

A module ``benchmarks/bench_<op>.py`` defines ``cases(ctx: Context) -> list[Case]``. Each
case is one timed callable; cases with the same (op, name, shape, dtype) form a group,
and the harness reports each case's ``speedup`` against the group's ``baseline``
provider (normally "reference") measured in the same run, plus achieved GB/s or GFLOP/s
against the copy bandwidth / matmul rate measured at the start of the run. A case that
cannot run here (a GPU-only library on CPU, a library that is not installed) is still
returned, with ``skipped`` saying why, so the results record it instead of omitting it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Context:
    device: torch.device
    quick: bool = False  # small shapes / few providers: the demo and smoke tests
    copy_gbps: Optional[float] = None  # measured by the harness before the cases run
    matmul_gflops: Optional[float] = None
    matmul_dtype: str = ""


@dataclass
class Case:
    op: str  # "fsq", "attention", "flow", "e2e"
    name: str  # what is timed, e.g. "forward", "forward+backward", "apg step"
    shape: str  # human-readable shape, e.g. "4M x 6" or "B=4 H=12 N=512 D=64"
    dtype: str  # "float32", "bfloat16", ...
    provider: str  # "reference", "compile(reference)", "cpu", "triton", "sdpa(shared [N,N] mask)", ...
    fn: Optional[Callable[[], object]]  # the timed call, inputs already prepared (None when skipped)
    baseline: str = "reference"  # provider of the same group that speedups are measured against
    bytes: Optional[float] = None  # bytes that must move, for GB/s
    flops: Optional[float] = None  # useful flops, for GFLOP/s
    extra: dict = field(default_factory=dict)  # more columns (e.g. density, keep)
    skipped: Optional[str] = None  # why this case is not timed here (then fn is None)


def train_step_fn(model, opt, video, inputs):
    """One training step of a VideoFlexTok (forward, backward, optimizer) as a closure."""
    def step():
        loss = model(video, **inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step
