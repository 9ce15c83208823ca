"""Drop-in vft kernels for the official FlexTok models (package ``flextok``)::

    from vft_kernels.integrations import flextok as ft_patch
    handle = ft_patch.patch(model)      # the official FlexTok, or any nn.Module holding its parts
    print(handle)
    handle.unpatch()
    with ft_patch.patched(model): ...

FlexTok shares VideoFlexTok's FSQ (``regularizers.quantize_fsq.FSQ``, here called through
``packed_call``), attention (``model.layers.attention``, ``model.preprocessors.flex_seq_packing``)
and guidance code, so this is the same machinery with FlexTok's classes;
``vft_kernels.integrations.official_*`` and ``.blocks`` document what is replaced, what falls back and why.
FlexTok's only sampler is ``flow_matching.pipelines.MinRFPipeline`` (images [1, C, H, W]: APG
groups are whole samples; APG fixed at momentum -0.5, eta 0, norm threshold 2.5, as in the
official code). Unlike VideoFlexTok's, it keeps one MomentumBuffer per sample, and so does the
patch. Attention: FlexTok's only packer is ``BlockWiseSequencePacker`` (images, T = 1): ``full``
and ``causal`` map to full / token-causal register attention per sample, ``causal_last`` (the
encoder's: patches see the patches, register r the patches and registers 0..r) to
``block_causal_last`` with T = 1, P = patch tokens, R = registers; a call whose images differ
in size (so in P) falls back to FlexAttention, as do layers built with
``use_flex_attention=False`` (SDPA) and packers with ``return_materialized_mask=True``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import PatchHandle, patched_context
from .official import _OfficialPackage, _patch_official
from .official_attention import ATTENTION_LINE  # noqa: F401
from .official_sampler import _SamplerSpec

_FLEXTOK = _OfficialPackage(
    name="flextok",
    title="FlexTok",
    samplers={
        "MinRFPipeline": _SamplerSpec(
            params=("data_dict", "generator", "timesteps", "vae_image_sizes", "verbose", "guidance_scale",
                    "perform_norm_guidance"),
            sizes="vae_image_sizes", video=False, apg=(-0.5, 0.0, 2.5), shared_momentum=False,
            source="166d5c216a647ea2"),
    },
    unsupported={},
)


def patch(model, fsq: bool = True, attention: bool = True, guidance: bool = True, blocks=True,
          dtype: Optional[torch.dtype] = None) -> PatchHandle:
    """Run the official FlexTok ``model`` (or any nn.Module containing its parts) on the vft
    kernels: FSQ on vk.fsq_quantize / vk.fsq_indices_to_codes (``fsq``), the FlexAttention calls
    over packed sequences on vk.register_attention (``attention``), the sampler's guidance +
    Euler update on vk.flow_step (``guidance``), whole transformer trunks on fused vft ops
    (``blocks``, needs ``attention``; on the CPU, per call shape, the official blocks where they
    measured faster on the first calls; ``blocks="always"`` pins the vft blocks),
    ``dtype=torch.bfloat16``: the decoder trunks in bf16 where it is native (see
    ``vft_kernels.integrations.videoflextok.patch``). Returns a PatchHandle (``summary()``,
    ``unpatch()``). Raises TypeError if ``model`` is not an nn.Module, ValueError if nothing
    patchable is found."""
    return _patch_official(_FLEXTOK, model, fsq, attention, guidance, blocks, dtype)


def patched(model, fsq: bool = True, attention: bool = True, guidance: bool = True, blocks=True,
            dtype: Optional[torch.dtype] = None):
    """Context manager: ``patch(model, ...)`` for the ``with`` block, undone on exit (unless
    the model was already patched before the block)."""
    return patched_context(patch, _FLEXTOK.name, model, fsq=fsq, attention=attention, guidance=guidance,
                           blocks=blocks, dtype=dtype)
