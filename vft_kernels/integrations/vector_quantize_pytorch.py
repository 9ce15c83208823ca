"""Drop-in vft FSQ kernels for ``vector_quantize_pytorch.FSQ`` (checked against 1.32.0)::

    from vft_kernels.integrations import vector_quantize_pytorch as vqp_patch
    handle = vqp_patch.patch(fsq)       # fsq: a vector_quantize_pytorch.FSQ instance
    out, indices = fsq(z)               # quantization now runs on vk.fsq_quantize
    codes = fsq.indices_to_codes(indices)   # on vk.fsq_indices_to_codes
    print(handle)                       # what was replaced, what falls back and why
    handle.unpatch()
    with vqp_patch.patched(fsq): ...    # the same, undone on exit

The patch replaces ``forward`` and ``indices_to_codes`` on that one instance (never the
class): layout (``channel_first``, image / video inputs), ``project_in`` / ``project_out``,
``num_codebooks``, ``keep_num_codebooks_dim`` and ``return_indices`` behave as in the original,
and codes and indices are bit-identical to it for float32 quantization (docs/spec.md §4: except
tokens within 1e-5 of a rounding boundary). ``state_dict()`` is untouched; patching twice
returns the existing handle.

Bound formula: in 1.32.0 ``FSQ.bound`` is the docs/spec.md §1 form (half_l = (L - 1)(1 + eps) / 2,
shift = atanh(offset / half_l), eps = 1e-3, round half to even, codes q / (L // 2)) and
``codes_to_indices`` rounds a float32 sum, first dim least significant: bit-for-bit what the
kernels compute. Only such configurations are patched, and ``patch`` also checks it on a probe
(so another release with another formula is left unpatched, not silently changed). Left to
the original (listed in the summary):

* for the whole instance: ``preserve_symmetry=True`` (a different bound: tanh then floor),
  ``noise_dropout > 0`` (random noise in training), ``bound_hard_clamp=True`` (clamp instead
  of tanh / atanh), ``orthogonal_rotation=True``, a ``scale`` (unused by 1.32.0, not covered),
  a codebook of more than 2**24 codes (the original's float32 index sum is inexact there),
  subclasses that override the quantization methods, and a failed probe;
* per call: quantization in a dtype other than float32 (float64 input, or
  ``force_quantization_f32=False`` with float16 / bfloat16 input), inputs the original rejects
  (it raises its own error), and ``indices_to_codes`` with non-integer or out-of-range indices
  (the original wraps them around; the kernel would reject them).
"""
from __future__ import annotations

import math
import types

import torch

from .. import fsq_indices_to_codes, fsq_quantize
from ..ops.fsq import MAX_EXACT_CODEBOOK
from ..testing import fsq_boundary_tokens
from . import PatchHandle, existing_handle, override_reasons, patched_context

# Methods whose behaviour the patch reproduces; a subclass overriding any of them is not patched.
_COVERED_METHODS = ("forward", "quantize", "bound", "codes_to_indices", "indices_to_codes",
                    "_indices_to_codes", "indices_to_level_indices", "_scale_and_shift",
                    "_scale_and_shift_inverse", "maybe_apply_noise")
_NAME = "vector_quantize_pytorch"


def _fsq_class():
    try:
        from vector_quantize_pytorch import FSQ
    except ImportError as e:
        raise ImportError("vft_kernels.integrations.vector_quantize_pytorch needs the vector-quantize-pytorch "
                          "package (pip install -r requirements-integrations.txt)") from e
    return FSQ


def _probe_mismatch(fsq, levels: tuple[int, ...]):
    """None if the instance's own quantize / codes_to_indices agree bit for bit with
    vk.fsq_quantize on a fixed random probe (rounding-boundary tokens excused), else why not."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(1, 509, 1, len(levels), generator=g) * 2).to(fsq._levels.device)
    try:
        with torch.no_grad():
            ref_codes = fsq.quantize(z)
            ref_indices = fsq.codes_to_indices(ref_codes)
    except Exception as e:  # another release with other signatures: leave it alone
        return f"the probe could not run the original quantize ({type(e).__name__}: {e})"
    codes, indices = fsq_quantize(z, levels)
    ok = ~fsq_boundary_tokens(z, levels).to(z.device)
    same = (codes == ref_codes).all(-1) & (indices == ref_indices)
    if ref_codes.shape != codes.shape or not bool(same[ok].all()):
        return "its quantize / codes_to_indices differ from docs/spec.md §1 on a probe (another bound formula?)"
    return None


def _whole_instance_fallbacks(fsq, cls, levels: tuple[int, ...]) -> list[str]:
    reasons = override_reasons(fsq, cls, _COVERED_METHODS, ("forward", "indices_to_codes"))
    if getattr(fsq, "preserve_symmetry", False):
        reasons.append("preserve_symmetry=True (symmetry-preserving bound: tanh then floor, not docs/spec.md §1)")
    if getattr(fsq, "noise_dropout", 0.0) > 0:
        reasons.append(f"noise_dropout={fsq.noise_dropout} (random noise on the codes in training)")
    if getattr(fsq, "bound_hard_clamp", False):
        reasons.append("bound_hard_clamp=True (clamp instead of tanh / atanh shift)")
    if getattr(fsq, "orthogonal_rotation", False):
        reasons.append("orthogonal_rotation=True")
    if getattr(fsq, "scale", None) is not None:
        reasons.append(f"scale={fsq.scale} (unused by vector-quantize-pytorch 1.32.0, not covered)")
    if math.prod(levels) > MAX_EXACT_CODEBOOK:
        reasons.append(f"codebook of {math.prod(levels)} > 2**24 codes (the original's float32 index sum is inexact)")
    if not reasons:
        mismatch = _probe_mismatch(fsq, levels)
        if mismatch:
            reasons.append(mismatch)
    return reasons


def _kernel_forward(fsq, z: torch.Tensor, levels: tuple[int, ...]):
    """The original forward's result computed on vk.fsq_quantize, or None when this call is
    not covered (the caller then runs the original)."""
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        return None
    move_channels = z.ndim >= 4 or fsq.channel_first
    spatial = None
    if move_channels:  # [b, D, ...] -> [b, n, D]
        if z.ndim < 2:
            return None
        z = z.movedim(1, -1)
        spatial = z.shape[1:-1]
        z = z.reshape(z.shape[0], -1, z.shape[-1])
    elif z.ndim != 3:
        return None
    if z.shape[-1] != fsq.dim:
        return None
    z = fsq.project_in(z)
    b, n, c, d = z.shape[0], z.shape[1], fsq.num_codebooks, len(levels)
    z = z.reshape(b, n, c, d)
    quant_dtype = torch.float32 if fsq.force_quantization_f32 and z.dtype not in fsq.allowed_dtypes else z.dtype
    if quant_dtype != torch.float32:
        return None
    codes, indices = fsq_quantize(z.float(), levels)
    out = fsq.project_out(codes.reshape(b, n, c * d).to(z.dtype))
    if move_channels:  # back to [b, D, ...]
        out = out.reshape((b,) + tuple(spatial) + (out.shape[-1],)).movedim(-1, 1)
        indices = indices.reshape((b,) + tuple(spatial) + (c,))
    if not fsq.return_indices:
        return out, None
    if not fsq.keep_num_codebooks_dim:
        indices = indices.squeeze(-1)
    return out, indices


def _kernel_indices_to_codes(fsq, indices: torch.Tensor, levels: tuple[int, ...]):
    """The original indices_to_codes computed on vk.fsq_indices_to_codes, or None when this
    call is not covered."""
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex() \
            or indices.dtype == torch.bool:
        return None
    if indices.numel() and bool(((indices < 0) | (indices >= math.prod(levels))).any()):
        return None
    is_img_or_video = indices.ndim >= 3 + int(fsq.keep_num_codebooks_dim)
    codes = fsq_indices_to_codes(indices, levels, validate=False)
    if fsq.keep_num_codebooks_dim:
        codes = codes.flatten(-2)
    codes = fsq.project_out(codes)
    if is_img_or_video or fsq.channel_first:
        codes = codes.movedim(-1, 1)
    return codes


def patch(fsq_module) -> PatchHandle:
    """Run ``fsq_module`` (a ``vector_quantize_pytorch.FSQ``) on the vft FSQ kernels.

    Returns a PatchHandle (``summary()``, ``unpatch()``); a module that is already patched
    returns its existing handle. Configurations the kernels do not cover are left to the
    original code and listed in the summary. Raises TypeError for anything but an FSQ."""
    cls = _fsq_class()
    if not isinstance(fsq_module, cls):
        raise TypeError(f"vector_quantize_pytorch integration: expected a vector_quantize_pytorch.FSQ instance, "
                        f"got {type(fsq_module).__module__}.{type(fsq_module).__qualname__}")
    earlier = existing_handle(_NAME, fsq_module)
    if earlier is not None:
        return earlier
    levels = tuple(int(L) for L in fsq_module._levels.tolist())
    handle = PatchHandle(_NAME, f"vft_kernels.integrations.vector_quantize_pytorch.patch(FSQ(levels={levels}, "
                         f"num_codebooks={fsq_module.num_codebooks}, dim={fsq_module.dim}))")
    reasons = _whole_instance_fallbacks(fsq_module, cls, levels)
    if reasons:
        handle.lines.append("not patched, every call runs the original: " + "; ".join(reasons))
    else:
        def forward(self, z):
            out = _kernel_forward(self, z, levels)
            return type(self).forward(self, z) if out is None else out

        def indices_to_codes(self, indices):
            codes = _kernel_indices_to_codes(self, indices, levels)
            return type(self).indices_to_codes(self, indices) if codes is None else codes

        handle.set_instance_attr(fsq_module, "forward", types.MethodType(forward, fsq_module))
        handle.set_instance_attr(fsq_module, "indices_to_codes", types.MethodType(indices_to_codes, fsq_module))
        handle.lines.append("patched: forward -> vk.fsq_quantize, indices_to_codes -> vk.fsq_indices_to_codes "
                            f"(projections: {'yes' if fsq_module.has_projections else 'no'}, "
                            f"channel_first={fsq_module.channel_first}, return_indices={fsq_module.return_indices}, "
                            f"keep_num_codebooks_dim={fsq_module.keep_num_codebooks_dim})")
        handle.lines.append("per call, falls back to the original for: quantization in a dtype other than float32 "
                            "(float64 input, or force_quantization_f32=False with float16/bfloat16 input); inputs "
                            "the original rejects; indices_to_codes with non-integer or out-of-range indices")
    handle.register(fsq_module)
    return handle


def patched(fsq_module):
    """Context manager: ``patch(fsq_module)`` for the ``with`` block, undone on exit (unless
    the module was already patched before the block)."""
    return patched_context(patch, _NAME, fsq_module)
