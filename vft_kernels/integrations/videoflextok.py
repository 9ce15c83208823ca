"""Drop-in vft kernels for the official VideoFlexTok models (package ``videoflextok``)::

    from vft_kernels.integrations import videoflextok as vft_patch
    handle = vft_patch.patch(model)     # the official VideoFlexTok, or any nn.Module holding its parts
    print(handle)                       # what was replaced, what falls back and why
    handle.unpatch()
    with vft_patch.patched(model): ...  # the same, undone on exit

``patch(model, fsq=True, attention=True, guidance=True, blocks=True, dtype=None)`` walks ``model.modules()`` (and the
plain attributes of each module, where the wrapper keeps its sampler ``pipeline``) for the
official classes (FSQ, sequence packers, attention layers, samplers). They are looked up in
``sys.modules``: an instance can only exist once its module is imported, so ``patch`` never
imports the official package (or diffusers) itself. Everything is per instance and reversible;
``state_dict()`` keys are untouched; patching a patched model with the same options returns its
existing handle, with other options raises (``unpatch`` first); ``copy.deepcopy`` of a patched
model (or part) raises (copy before patching, or unpatch, copy, patch each).

What each part does, what falls back and why: ``official_fsq`` (FSQ), ``official_attention``
(packers and attention layers), ``blocks`` (whole trunks), ``official_sampler`` (guidance);
``official`` finds and patches them. This module only names VideoFlexTok's classes.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import PatchHandle, patched_context
from .official import _OfficialPackage, _patch_official
from .official_attention import ATTENTION_LINE  # noqa: F401
from .official_sampler import _SamplerSpec

_VIDEOFLEXTOK = _OfficialPackage(
    name="videoflextok",
    title="VideoFlexTok",
    samplers={
        "VideoMinRFPipeline": _SamplerSpec(
            params=("data_dict", "generator", "timesteps", "video_sizes", "noise_list", "verbose", "guidance_scale",
                    "cfg_rescaler", "perform_norm_guidance", "momentum", "eta", "norm_threshold", "cond_type"),
            sizes="video_sizes", video=True, apg=None, shared_momentum=True, source="9d95e2a08c3cb202"),
        "MinRFPipeline": _SamplerSpec(
            params=("data_dict", "generator", "timesteps", "image_sizes", "verbose", "guidance_scale", "cfg_rescaler",
                    "perform_norm_guidance"),
            sizes="image_sizes", video=False, apg=(-0.5, 0.0, 2.5), shared_momentum=True,
            source="dcf9339b45c4f014"),
    },
    unsupported={
        "AnyResPipelineCond": "scheduler-based (a diffusers scheduler makes the step)",
        "AnyResPipelineCondV2": "scheduler-based (a diffusers scheduler makes the step)",
    },
)


def patch(model, fsq: bool = True, attention: bool = True, guidance: bool = True, blocks=True,
          dtype: Optional[torch.dtype] = None) -> PatchHandle:
    """Run the official VideoFlexTok ``model`` (or any nn.Module containing its parts) on the
    vft kernels: FSQ on vk.fsq_quantize / vk.fsq_indices_to_codes (``fsq``), the FlexAttention
    calls over packed sequences on vk.register_attention (``attention``), the sampler's
    guidance + Euler update on vk.flow_step (``guidance``), whole transformer trunks on fused
    vft ops with identical register rows computed once (``blocks``, needs ``attention``; on the
    CPU, per call shape, the official blocks where they measured faster on the first calls;
    ``blocks="always"`` pins the vft blocks; see ``vft_kernels.integrations.blocks``). ``dtype=torch.bfloat16`` runs the patched decoder
    trunks (the flow model, called twice per guided step) in bf16 where the hardware multiplies
    bf16 natively (elsewhere: a warning, the model's dtype); the encoder keeps the model's dtype,
    since its outputs are quantised to tokens.
    Returns a PatchHandle (``summary()``, ``unpatch()``). Raises TypeError if ``model`` is not
    an nn.Module, ValueError if nothing patchable is found or the model is already patched
    with other options."""
    return _patch_official(_VIDEOFLEXTOK, model, fsq, attention, guidance, blocks, dtype)


def patched(model, fsq: bool = True, attention: bool = True, guidance: bool = True, blocks=True,
            dtype: Optional[torch.dtype] = None):
    """Context manager: ``patch(model, ...)`` for the ``with`` block, undone on exit (unless
    the model was already patched before the block)."""
    return patched_context(patch, _VIDEOFLEXTOK.name, model, fsq=fsq, attention=attention, guidance=guidance,
                           blocks=blocks, dtype=dtype)
