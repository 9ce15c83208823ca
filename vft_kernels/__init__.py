"""vft_kernels: fast, validated kernels for flexible-length video tokenizers.

Public API (docs/spec.md §0)::

    codes, indices = fsq_quantize(z, levels, eps=1e-3, out_dtype=None)
    codes = fsq_indices_to_codes(indices, levels, validate=True)
    layout = RegisterLayout(blocks=T, patches=P, registers=R, mode="block_causal_last")
    out = register_attention(q, k, v, layout, keep=None, scale=None)
    x_next = flow_step(x, v_cond, t, t_next, v_uncond=None, guidance="none", scale=1.0, ...)
    x_next = flow_heun_step(x, v1, v2, t, t_next)
    y = modulated_layer_norm(x, layout, scale=scale, shift=shift)      # scale, shift keyword-only
    x, y = gated_residual_norm(x, gate, h, layout, scale=scale, shift=shift)
    out = swiglu(gate_up); q, k, v = qk_rms_norm(qkv, heads, q_weight, k_weight)
    q, k, v = qk_layer_norm(qkv, heads, eps=1e-5)
    available_backends(); use_backend("cpu")
    cpu_capability(); use_cpu_capability("avx2")     # the CPU kernels' instruction-set variant
"""
__version__ = "0.1.0"

from .capability import cpu_capabilities, cpu_capability, use_cpu_capability
from .dispatch import BackendUnavailableError, available_backends, use_backend
from .layout import RegisterLayout, Tile
from .ops.attention import register_attention
from .ops.block import gated_residual, gated_residual_norm, modulated_layer_norm, qk_layer_norm, qk_rms_norm, swiglu
from .ops.flow import flow_heun_step, flow_step
from .ops.fsq import fsq_indices_to_codes, fsq_quantize
from .sampling import flow_sample

__all__ = [
    "BackendUnavailableError",
    "RegisterLayout",
    "Tile",
    "available_backends",
    "cpu_capabilities",
    "cpu_capability",
    "flow_heun_step",
    "flow_sample",
    "flow_step",
    "gated_residual",
    "gated_residual_norm",
    "modulated_layer_norm",
    "qk_layer_norm",
    "qk_rms_norm",
    "swiglu",
    "fsq_indices_to_codes",
    "fsq_quantize",
    "register_attention",
    "use_backend",
    "use_cpu_capability",
]
