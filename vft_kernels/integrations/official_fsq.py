"""The official FlexTok / VideoFlexTok quantizer on vft kernels.

FSQ (``regularizers.quantize_fsq.FSQ``): ``forward_z`` runs on ``vk.fsq_quantize`` and
``indices_to_embedding`` on ``vk.fsq_indices_to_codes``, bit-identical quants and (int64)
tokens (docs/spec.md §4: except tokens within 1e-5 of a rounding boundary). The official quantizer
draws one Bernoulli sample per batch row on every call, even with ``drop_quant_p = 0`` and in
eval mode; the patch makes the same draw, so random numbers drawn later (e.g. the sampler's
noise when no generator is given) stay the same. Falls back to the original:

* per call, in training mode with ``drop_quant_p > 0`` (quantization dropout) or
  ``corrupt_tokens_p > 0`` (token corruption), and in ``indices_to_embedding`` for non-integer
  ids; out-of-range ids wrap around as in the original (ids taken mod the codebook size, with
  no range check read back from the device);
* for the whole module, when a level's code does not map back to its token exactly in the
  original float32 arithmetic ((q / h) * h + h is inexact for some L // 2 = h >= 13, and the
  original truncates it, so its tokens differ from the exact ones), for codebooks above 2**24
  codes, for subclasses that override the quantization methods, and when the instance's own
  ``forward_z`` / ``indices_to_embedding`` disagree with the kernels on a patch-time probe (the
  class alone does not prove the behaviour; the probe runs in eval mode and leaves the global
  random stream as it was).
"""
from __future__ import annotations

import types

import torch

from .. import fsq_indices_to_codes, fsq_quantize
from ..ops.fsq import MAX_EXACT_CODEBOOK
from ..testing import fsq_boundary_tokens
from . import PatchHandle, override_reasons

_FSQ_METHODS = ("forward", "forward_z", "quantize", "bound", "codes_to_indices", "indices_to_embedding",
                "_scale_and_shift", "_scale_and_shift_inverse", "corrupt_quant")


def _inexact_levels(fsq) -> list[int]:
    """Levels whose codes q / (L // 2) do not map back to q + L // 2 exactly in the module's own
    ``_scale_and_shift`` (float32): the original truncates those sums to wrong tokens."""
    L = fsq._levels
    hw = L // 2
    k = torch.arange(int(L.max()), device=L.device)[:, None]
    q = (torch.minimum(k, L - 1) - hw).float()  # [max L, d]: every code of each level (padded)
    back = fsq._scale_and_shift(q / hw)
    exact = ((back == q + hw) | (k >= L)).all(0)
    return [int(v) for v, ok in zip(L.tolist(), exact.tolist()) if not ok]


def _fsq_fallbacks(fsq, cls) -> list[str]:
    reasons = override_reasons(fsq, cls, _FSQ_METHODS, ("forward_z", "indices_to_embedding"))
    if fsq.codebook_size > MAX_EXACT_CODEBOOK:
        reasons.append(f"codebook of {fsq.codebook_size} > 2**24 codes (the original's float32 token sum is inexact)")
    inexact = _inexact_levels(fsq)
    if inexact:
        reasons.append(f"levels {inexact}: the original's float32 code -> token arithmetic is inexact for them "
                       "(its tokens would differ from the exact ones)")
    if not reasons:
        mismatch = _probe_mismatch(fsq)
        if mismatch:
            reasons.append(mismatch)
    return reasons


def _probe_mismatch(fsq):
    """None if the instance's own ``forward_z`` and ``indices_to_embedding`` agree with the vft
    kernels on a fixed random probe (tokens on a rounding boundary excused, docs/spec.md §4),
    else why not: the class alone does not prove the behaviour (a new release, a patched
    method). Runs in eval mode, without touching the global random stream (forward_z draws)."""
    levels = tuple(int(L) for L in fsq._levels.tolist())
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(3, 173, len(levels), generator=g) * 2).to(fsq._levels.device)
    ids = torch.arange(min(fsq.codebook_size, 4096), device=z.device)[None]
    was_training = fsq.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            fsq.train(False)
            ref_quant, ref_tokens = type(fsq).forward_z(fsq, z)
            ref_codes = type(fsq).indices_to_embedding(fsq, ids)
    except Exception as e:  # another release with other signatures: leave it alone
        return f"the probe could not run the original quantizer ({type(e).__name__}: {e})"
    finally:
        fsq.train(was_training)
    quant, tokens = fsq_quantize(z, levels)
    ok = ~fsq_boundary_tokens(z, levels).to(z.device)
    same = (quant == ref_quant).all(-1) & (tokens.long() == ref_tokens)
    if ref_quant.shape != quant.shape or not bool(same[ok].all()) or \
            not torch.equal(fsq_indices_to_codes(ids, levels), ref_codes.to(torch.float32)):
        return "its forward_z / indices_to_embedding differ from docs/spec.md §1 on a probe (another release?)"
    return None


def _patch_fsq(handle: PatchHandle, fsq) -> None:
    levels = tuple(int(L) for L in fsq._levels.tolist())

    def forward_z(self, z):
        if not isinstance(z, torch.Tensor) or z.ndim == 0 or z.shape[-1] != self.dim or \
                (self.training and (self.drop_quant_p > 0 or self.corrupt_tokens_p > 0)):
            return type(self).forward_z(self, z)
        z = z.float()
        # The original draws this (unused when its probability is 0) on every call: same RNG stream.
        torch.bernoulli(torch.full((z.shape[0],), self.drop_quant_p if self.training else 0.0, device=z.device))
        quant, tokens = fsq_quantize(z, levels)
        return quant, tokens.long()

    def indices_to_embedding(self, indices):
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex() \
                or indices.dtype == torch.bool:
            return type(self).indices_to_embedding(self, indices)
        # The original's (id // basis) % levels digits are those of id mod codebook_size for every
        # integer id (floor division and modulo agree): the same wrap-around, with no range check
        # read back from the device.
        return fsq_indices_to_codes(indices.remainder(self.codebook_size), levels, validate=False)

    handle.set_instance_attr(fsq, "forward_z", types.MethodType(forward_z, fsq))
    handle.set_instance_attr(fsq, "indices_to_embedding", types.MethodType(indices_to_embedding, fsq))
