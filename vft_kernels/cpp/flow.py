"""Host wrappers of the C++ flow step kernels (csrc/cpu/flow.cpp, csrc/cuda/flow.cu),
serving backends "cpu" and "cuda" (dispatch contract in vft_kernels.dispatch).

The kernels take contiguous tensors; non-contiguous inputs are copied once here (``out``
and ``momentum`` arrive contiguous from the ops layer). Importing this module fails when
``_C`` lacks the CPU flow kernels, so the dispatcher reports the backends unavailable.
"""
from __future__ import annotations

import torch

from .._ext import C

if C is None:
    raise ImportError("vft_kernels._C is not available")
_KERNELS = {"cpu": (C.flow_step_cpu, C.flow_heun_step_cpu),
            "cuda": (getattr(C, "flow_step_cuda", None), getattr(C, "flow_heun_step_cuda", None))}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _reason(x, momentum=None):
    if _KERNELS.get(x.device.type, (None,))[0] is None:
        return f"vft_kernels._C has no flow kernels for {x.device.type}"
    for name, t in (("x", x), ("momentum", momentum)):
        if t is not None and t.dtype not in DTYPES:
            return f"{name} dtype {t.dtype} not supported (float32, float16, bfloat16)"
    return None


def supports_flow_step(out, x, v_cond, v_uncond, t, t_next, guidance, scale, apg_eta, apg_norm_threshold,
                       apg_momentum, momentum, reduce_ndim, prefix, prefix_len):
    return _reason(x, momentum)


def supports_flow_heun_step(out, x, v1, v2, t, t_next):
    return _reason(x)


def _c(t):
    return None if t is None else t.contiguous()


def flow_step(out, x, v_cond, v_uncond, t, t_next, guidance, scale, apg_eta, apg_norm_threshold, apg_momentum,
              momentum, reduce_ndim, prefix, prefix_len):
    """Writes ``out`` (contiguous, may alias x); updates ``momentum`` in place for APG."""
    _KERNELS[x.device.type][0](out, _c(x), _c(v_cond), _c(v_uncond), t.contiguous(), t_next.contiguous(), guidance,
                               scale, apg_eta, apg_norm_threshold, apg_momentum, momentum, reduce_ndim, _c(prefix),
                               prefix_len)


def flow_heun_step(out, x, v1, v2, t, t_next):
    """Writes ``out`` = x + (t_next - t) * (v1 + v2) / 2."""
    _KERNELS[x.device.type][1](out, _c(x), _c(v1), _c(v2), t.contiguous(), t_next.contiguous())
