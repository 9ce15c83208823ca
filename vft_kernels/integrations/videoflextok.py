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

FSQ (``regularizers.quantize_fsq.FSQ``): ``forward_z`` runs on ``vk.fsq_quantize`` and
``indices_to_embedding`` on ``vk.fsq_indices_to_codes``, bit-identical quants and (int64)
tokens (SPEC.md §4: except tokens within 1e-5 of a rounding boundary). The official quantizer
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
  codes, and for subclasses that override the quantization methods.

Guidance: the sampler pipelines ``VideoMinRFPipeline`` and ``MinRFPipeline`` (Euler steps,
CFG or APG) run their guidance + update on ``vk.flow_step`` (float32 math; APG groups = the
leading dims before the last three, i.e. per sample and channel for videos [1, C, T, H, W],
per sample for images [1, C, H, W], as in the official ``normalized_guidance``). Python looks
``__call__`` up on the type, so an instance attribute cannot replace ``pipeline(...)``: the
patch gives that one pipeline instance a private subclass whose ``__call__`` is the vft loop
(``isinstance`` still holds, ``unpatch`` restores ``__class__``; module globals are never
touched). The loop reproduces the official one: argument defaults (read from the official
signature), noise drawn in the same order with the same generator, ``copy.deepcopy`` of the
data dict for the conditional and unconditional passes, ``eval_dropout_mask``, callable
guidance scales, the pipeline's own conditioning helpers (clean / sdedit prefixes).
Numerics: the official APG projection runs in float64, ``vk.flow_step`` accumulates its group
reductions in float32 (within the SPEC.md §4 tolerance; the integration tests check it).
MomentumBuffer state: the official ``VideoMinRFPipeline`` / ``MinRFPipeline`` of this package
create ``[MomentumBuffer(m)] * batch_size``, one buffer object shared by every sample (sample
j's running average continues from sample j - 1's); the patch keeps that behaviour (it passes
the same state tensor to ``vk.flow_step`` for every sample) so results match the official
sampler, although SPEC.md §3 asks for per-sample state. The state lives in official
MomentumBuffer objects, fresh for each call, as in the original. Falls back: to the official
``__call__`` when a ``cfg_rescaler`` is given, and to the official guidance formula for a
sample whose latents and velocities differ in shape, dtype or device, have fewer than 4 dims,
or whose momentum state does not fit it. Scheduler-based pipelines (``AnyResPipelineCond``,
``AnyResPipelineCondV2``: a diffusers scheduler makes the step) are reported, not patched.

Attention (``attention=True``): the official sequence packers (``model.preprocessors.
flex_seq_packing``: ``BlockWiseSequencePacker``, ``BlockWiseSequenceInterleavePacker``) build a
FlexAttention BlockMask per call from their ``mask_mode`` and the packed shapes, and the
attention layers (``model.layers.attention.FlexAttention`` / ``FlexSelfAttention``) call their
instance attribute ``flex_attention`` (``torch.compile(flex_attention)``) with it. The patch
wraps both, per instance: the packer derives from its packed shapes the samples' offsets
(``cu_seqlens``, Python ints), the padded length N and one ``RegisterLayout`` (P, R and mode
shared by the samples, ``blocks`` = the largest sample's), and each layer's ``flex_attention``
becomes a function that runs ``vk.register_attention(q, k, v, layout, cu_seqlens=..., scale=...)``
for masks carrying such a layout (q, k, v [1, H, N, D]; padded rows give 0, as FlexAttention
gives them). Mask modes (keep = R always: nested dropout here replaces tokens by a mask token,
it is not an attention mask; "inner tensors" are the packer's input lists, e.g. patches then
registers, per time block for the interleave packer):

* ``full`` -> ``full`` per sample and ``causal`` (token-causal per sample) -> ``block_causal``,
  both with P = 1, R = 0, T = sample length (any samples);
* ``time_block_causal`` -> ``block_causal`` with P = tokens per time block, R = 0, T = frames;
* ``time_block_causal_last`` -> ``block_causal_last`` with P = tokens of all inner tensors but
  the last per time block, R = tokens of the last (without a prefix the block is token-causal,
  which is P = 1); FlexTok's ``causal_last`` is the same with T = 1;
* ``flexible_time_block_causal_last`` only with its all-"full" cross-timestep config (then it
  equals ``time_block_causal_last``); other configs are not patched (reported).

Nothing is compiled or rebuilt when the samples, frames or keep change (the patched path runs
eagerly; a ``torch.compile`` of the whole patched model would specialise on the layout's ints,
which is untested): the layout is Python ints, and when every module of the model that reads the packer's mask key is an official trunk
whose self-attention layers are all patched, the packer skips ``create_block_mask`` and writes a
``VftBlockMask`` (the layout, plus the real BlockMask built only if some layer falls back;
attribute access is forwarded to it). Otherwise it keeps building its BlockMask and patched
layers look the layout up by that mask. Falls back to the layer's original FlexAttention call
(same result as unpatched), per call: samples of one call that need different (P, R) (e.g.
images or videos of different sizes under ``causal_last`` / ``time_block_causal``), a
``score_mod``, other FlexAttention options, q / k / v not alike [1, H, N, D] or of another
dtype, masks from unpatched packers, calls without a mask; and entirely for cross-attention
layers and packers (``FlexCrossAttention``, ``BlockWiseSequencePackerWithCrossAttention``),
FlexTok layers using SDPA (``use_flex_attention=False``) and packers returning a dense mask
(``return_materialized_mask=True``). The summary counts the patched layers and packers, says
why the rest is not patched, and keeps a live count of calls on vft and of fallbacks by reason.

Blocks (``blocks=True``, the default): each official trunk (``FlexTransformer`` of ``FlexBlock``
or ``FlexBlockAdaLN``) of the known form runs on vft ops (``vft_kernels.integrations.blocks``):
fused modulated norms, one QKV and one gate/up projection per block on cached concatenated
weights, ``vk.qk_layer_norm``, ``vk.register_attention``, ``vk.swiglu``, every block's adaLN
modulation in one matmul, and runs of identical register rows (mask tokens past keep, the null
condition of the unconditional pass) computed once where the mask treats a group's tokens alike.

Whole patched models should be pickled only after ``unpatch()`` (the private pipeline subclass
and the instance-level wrappers cannot be pickled); ``state_dict()`` is unaffected.
"""
from __future__ import annotations

import collections
import copy
import functools
import inspect
import math
import sys
import threading
import types
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from .. import RegisterLayout, flow_step, fsq_indices_to_codes, fsq_quantize, register_attention
from ..ops.attention import MAX_HEAD_DIM
from . import PatchHandle, blocks as _blocks, existing_handle, override_reasons, patched_context

ATTENTION_LINE = "attention: no official FlexAttention layer or sequence packer found (nothing to patch)"
_MAX_EXACT_CODEBOOK = 2**24  # float32 sums of integers are exact up to here
_FSQ_METHODS = ("forward", "forward_z", "quantize", "bound", "codes_to_indices", "indices_to_embedding",
                "_scale_and_shift", "_scale_and_shift_inverse", "corrupt_quant")


@dataclass(frozen=True)
class _SamplerSpec:
    """What the vft loop needs to know about one official Euler sampler class."""
    params: tuple[str, ...]  # the official __call__ parameters after self, checked at patch time
    sizes: str  # name of the per-sample sizes argument
    video: bool  # [1, C, T, H, W] latents, with zero_noise / noise_list / prefix conditioning
    apg: Optional[tuple[float, float, float]]  # fixed (momentum, eta, norm_threshold); None: call args
    shared_momentum: bool  # the official code shares one MomentumBuffer across the batch


@dataclass(frozen=True)
class _OfficialPackage:
    name: str  # the importable package, e.g. "videoflextok"
    title: str  # the top-level model class, for messages
    samplers: dict  # pipeline class name -> _SamplerSpec
    unsupported: dict  # pipeline class name -> why it is not patched


_VIDEOFLEXTOK = _OfficialPackage(
    name="videoflextok",
    title="VideoFlexTok",
    samplers={
        "VideoMinRFPipeline": _SamplerSpec(
            params=("data_dict", "generator", "timesteps", "video_sizes", "noise_list", "verbose", "guidance_scale",
                    "cfg_rescaler", "perform_norm_guidance", "momentum", "eta", "norm_threshold", "cond_type"),
            sizes="video_sizes", video=True, apg=None, shared_momentum=True),
        "MinRFPipeline": _SamplerSpec(
            params=("data_dict", "generator", "timesteps", "image_sizes", "verbose", "guidance_scale", "cfg_rescaler",
                    "perform_norm_guidance"),
            sizes="image_sizes", video=False, apg=(-0.5, 0.0, 2.5), shared_momentum=True),
    },
    unsupported={
        "AnyResPipelineCond": "scheduler-based (a diffusers scheduler makes the step)",
        "AnyResPipelineCondV2": "scheduler-based (a diffusers scheduler makes the step)",
    },
)

_PATCHED_PIPELINE_CLASSES: dict[type, type] = {}  # official class -> its vft subclass


# --------------------------------------------------------------------------------------
# FSQ


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
    if fsq.codebook_size > _MAX_EXACT_CODEBOOK:
        reasons.append(f"codebook of {fsq.codebook_size} > 2**24 codes (the original's float32 token sum is inexact)")
    inexact = _inexact_levels(fsq)
    if inexact:
        reasons.append(f"levels {inexact}: the original's float32 code -> token arithmetic is inexact for them "
                       "(its tokens would differ from the exact ones)")
    return reasons


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


# --------------------------------------------------------------------------------------
# Sampler: guidance + Euler update on vk.flow_step


def _euler_step(mod, x, v_cond, v_uncond, t, t_next, dt, guidance, scale, apg, buf):
    """x + (t_next - t) * guided velocity on vk.flow_step, or the official formula (guidance
    functions of the pipelines module ``mod``, then ``x - dt * v``) where the kernel does not
    apply. ``buf``: the official MomentumBuffer of this sample (APG only)."""
    tensors = [x, v_cond] + ([v_uncond] if guidance != "none" else [])
    fused = all(isinstance(v, torch.Tensor) and v.shape == x.shape and v.dtype == x.dtype and v.device == x.device
                for v in tensors) and x.dim() >= 4 and x.is_floating_point()
    momentum = None
    if fused and guidance == "apg" and apg[0] != 0:
        state = buf.running_average
        if isinstance(state, torch.Tensor):
            fused = state.shape == x.shape and state.dtype == x.dtype and state.device == x.device
            momentum = state
        elif isinstance(state, (int, float)) and state == 0:  # a fresh buffer
            momentum = torch.zeros_like(x)
        else:
            fused = False
    if not fused:
        if guidance == "none":
            v = v_cond
        elif guidance == "cfg":
            v = mod.classifier_free_guidance(v_cond, v_uncond, scale)
        else:
            v = mod.normalized_guidance(v_cond, v_uncond, scale, buf, eta=apg[1], norm_threshold=apg[2])
        return x - dt * v
    kw = {}
    if guidance == "apg":
        kw = dict(apg_momentum=apg[0], momentum=momentum, apg_eta=apg[1], apg_norm_threshold=max(apg[2], 0.0))
    x_next = flow_step(x, v_cond, t, t_next, v_uncond=v_uncond if guidance != "none" else None, guidance=guidance,
                       scale=float(scale), **kw)
    if momentum is not None:
        buf.running_average = momentum  # updated in place by flow_step
    return x_next


def _sizes(pipe, spec: _SamplerSpec, data_dict, sizes):
    """Per-sample latent sizes, resolved as the official pipelines do."""
    if sizes is None:
        sizes = data_dict[pipe.target_sizes_read_key]
    elif isinstance(sizes, int):
        sizes = [(sizes, sizes) for _ in data_dict[pipe.latents_read_key]]
    elif spec.video and isinstance(sizes, (list, tuple)) and not isinstance(sizes[0], (list, tuple)):
        sizes = [list(sizes) for _ in data_dict[pipe.latents_read_key]]
    if not isinstance(sizes, list):
        raise TypeError(f"{type(pipe).__name__}: {spec.sizes} must resolve to a list of per-sample sizes, "
                        f"got {type(sizes).__name__}")
    return sizes


def _initial_latents(pipe, spec: _SamplerSpec, data_dict, sizes, generator, noise_list):
    """The starting noise, drawn in the official order (same generator use)."""
    if pipe.noise_read_key is not None:
        return data_dict[pipe.noise_read_key]
    device, C = pipe.model.device, pipe.out_channels
    if not spec.video:
        return [torch.randn((1, C, h, w), generator=generator, device=device) for h, w in sizes]
    if pipe.zero_noise:
        return [torch.zeros((1, C, t, h, w), device=device) for t, h, w in sizes]
    if noise_list is not None:
        return [noise_list[i].to(device) for i in range(len(sizes))]
    return [torch.randn((1, C, t, h, w), generator=generator, device=device) for t, h, w in sizes]


def _condition(pipe, latents, cond_latents, cond_type, noise, t):
    """The pipeline's own prefix conditioning before a model call."""
    if cond_type == "clean":
        return pipe._apply_vae_latents_conditioning(latents, cond_latents)
    if cond_type == "sdedit":
        return pipe._apply_noise_vae_latents_conditioning(latents, cond_latents, noise, timestep=t)
    raise ValueError(f"Unknown cond_type: {cond_type}")


def _sample(pipe, spec: _SamplerSpec, mod, a: dict):
    """The official Euler sampling loop with the guided update on vk.flow_step.
    ``a``: the official ``__call__`` arguments (defaults applied); ``mod``: its module."""
    data_dict, timesteps, guidance_scale = a["data_dict"], a["timesteps"], a["guidance_scale"]
    sizes = _sizes(pipe, spec, data_dict, a[spec.sizes])
    batch = len(sizes)
    latents = _initial_latents(pipe, spec, data_dict, sizes, a["generator"], a.get("noise_list"))
    cond_latents, cond_type, noise = None, a.get("cond_type"), None
    if spec.video and pipe.cond_vae_latents_key is not None and pipe.cond_vae_latents_key in data_dict:
        cond_latents = data_dict[pipe.cond_vae_latents_key]
        if cond_type == "sdedit":
            noise = copy.deepcopy(latents)
    do_cfg = callable(guidance_scale) or guidance_scale != 1.0
    guidance = "none" if not do_cfg else ("apg" if a["perform_norm_guidance"] else "cfg")
    apg, buffers = None, [None] * batch
    if a["perform_norm_guidance"]:
        apg = spec.apg or (a["momentum"], a["eta"], a["norm_threshold"])
        buffers = [mod.MomentumBuffer(apg[0])] * batch if spec.shared_momentum else \
            [mod.MomentumBuffer(apg[0]) for _ in range(batch)]
    noised_key = pipe.noised_videos_read_key if spec.video else pipe.noised_images_read_key
    pbar = None
    if a["verbose"]:
        from tqdm import tqdm
        pbar = tqdm(total=timesteps)
    dt = 1.0 / timesteps
    for i in range(timesteps, 0, -1):
        t, t_next = i / timesteps, (i - 1) / timesteps
        data_dict[pipe.timesteps_read_key] = t * torch.ones(batch, device=pipe.model.device)
        if cond_latents is not None:
            latents = _condition(pipe, latents, cond_latents, cond_type, noise, t)
        data_dict[noised_key] = latents
        v_cond = pipe.model(copy.deepcopy(data_dict))[pipe.reconst_write_key]
        v_uncond, scale = [None] * len(v_cond), 1.0
        if do_cfg:
            scale = guidance_scale(t) if callable(guidance_scale) else guidance_scale
            uncond_dict = copy.deepcopy(data_dict)
            uncond_dict["eval_dropout_mask"] = [True] * len(v_cond)
            v_uncond = pipe.model(uncond_dict)[pipe.reconst_write_key]
        latents = [_euler_step(mod, x, vc, vu, t, t_next, dt, guidance, scale, apg, buffers[j])
                   for j, (x, vc, vu) in enumerate(zip(latents, v_cond, v_uncond))]
        if pbar is not None:
            pbar.update()
    if pbar is not None:
        pbar.close()
    if cond_latents is not None and cond_type != "sdedit":
        latents = _condition(pipe, latents, cond_latents, cond_type, noise, 0.0)
    data_dict[pipe.reconst_write_key] = latents
    return data_dict


def _patched_call(self, *args, **kwargs):
    """``__call__`` of a patched pipeline: the official arguments, the vft loop."""
    official = type(self)._vft_official
    call = inspect.signature(official.__call__).bind(self, *args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    if a.get("cfg_rescaler") is not None:
        return official.__call__(self, *args, **kwargs)
    with torch.no_grad():
        return _sample(self, type(self)._vft_spec, sys.modules[official.__module__], a)


def _patched_pipeline_class(cls: type, spec: _SamplerSpec) -> type:
    sub = _PATCHED_PIPELINE_CLASSES.get(cls)
    if sub is None:
        sub = type(f"VftPatched{cls.__name__}", (cls,), {
            "__call__": _patched_call, "__module__": __name__, "_vft_official": cls, "_vft_spec": spec,
            "__doc__": f"{cls.__name__} whose guidance + Euler update run on vk.flow_step (see {__name__})."})
        _PATCHED_PIPELINE_CLASSES[cls] = sub
    return sub


def _pipeline_fallback(pipe, cls: type, spec: _SamplerSpec) -> Optional[str]:
    if hasattr(type(pipe), "_vft_official"):
        return "already patched (by another handle)"
    if type(pipe).__call__ is not cls.__call__:
        return f"{type(pipe).__name__} overrides __call__"
    params = tuple(inspect.signature(cls.__call__).parameters)[1:]
    if params != spec.params:
        return f"unrecognized __call__ signature {params} (this integration knows {spec.params})"
    return None


# --------------------------------------------------------------------------------------
# Attention: packed FlexAttention masks -> vk.register_attention

_ATTENTION_MODULE = "model.layers.attention"
_PACKING_MODULE = "model.preprocessors.flex_seq_packing"
_TRUNKS_MODULE = "model.trunks.transformers"
_PACKERS = ("BlockWiseSequencePacker", "BlockWiseSequenceInterleavePacker")
_UNSUPPORTED_PACKERS = {
    "BlockWiseSequencePackerWithCrossAttention":
        "cross-attention packer (its layers attend across two sequences; not mapped)",
}
# mask modes each packer class can map (flexible_time_block_causal_last: only its all-"full" config)
_PACKER_MODES = {
    "BlockWiseSequencePacker": ("full", "causal", "causal_last"),
    "BlockWiseSequenceInterleavePacker": ("full", "causal", "time_block_causal", "time_block_causal_last",
                                          "flexible_time_block_causal_last"),
}
_MODE_DOC = {
    "full": "full per sample (P = 1, R = 0, T = sample length)",
    "causal": "block_causal (token-causal per sample: P = 1, R = 0, T = sample length)",
    "causal_last": "block_causal_last with T = 1 (P = prefix tokens, R = tokens of the last inner tensor)",
    "time_block_causal": "block_causal (P = tokens per time block, R = 0, T = frames)",
    "time_block_causal_last": "block_causal_last (P = prefix tokens per time block, R = tokens of the last "
                              "inner tensor, T = frames)",
    "flexible_time_block_causal_last": "block_causal_last (all-'full' cross-timestep config; as "
                                       "time_block_causal_last)",
}
_FLEX_DEFAULTS = {"enable_gqa": False, "return_lse": False, "kernel_options": None}
_ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # real BlockMask -> _Plan (eager packers)


@dataclass(frozen=True)
class _Plan:
    """How one packed sequence maps onto vk.register_attention: the layout (``blocks`` = the
    largest sample's block count; None when the call has no exact equivalent, then ``reason``
    says why), the samples' offsets (Python ints) and the padded length N."""
    layout: Optional[RegisterLayout]
    cu_seqlens: tuple
    seq_len: int
    reason: str = ""


class VftBlockMask:
    """What a patched packer writes under its ``block_mask_write_key`` instead of a FlexAttention
    BlockMask, when every consumer of that key in the model is a patched attention layer: the
    packed layout as a ``_Plan`` (``plan``) and, built only on demand (``materialize()``, e.g.
    for a layer that falls back), the packer's real BlockMask. Attribute access it does not
    define is forwarded to that BlockMask (which builds it), so code that inspects the mask
    keeps working; ``isinstance(mask, BlockMask)`` is False."""

    def __init__(self, plan: Optional[_Plan], build):
        self.plan = plan
        self._build = build
        self._mask = None

    def materialize(self):
        """The packer's real BlockMask (built on the first call, with its own create_block_mask)."""
        if self._mask is None:
            self._mask = self._build()
        return self._mask

    def __getattr__(self, name):
        if name.startswith("__") or name in ("plan", "_build", "_mask"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __repr__(self):
        built = "built" if self._mask is not None else "not built"
        if self.plan is None:
            return f"VftBlockMask(no plan, BlockMask {built})"
        return (f"VftBlockMask({self.plan.layout or 'no layout: ' + self.plan.reason}, "
                f"cu_seqlens={list(self.plan.cu_seqlens)}, N={self.plan.seq_len}, BlockMask {built})")


def _numel(shape) -> int:
    return int(math.prod(tuple(shape)))


def _sample_layouts(mode: str, interleaved: bool, lengths, block_sizes, prefixes, config=None):
    """Per non-empty sample (P, R, layout mode, blocks) equal to the packer's mask ``mode``, or
    a string saying why there is none. lengths: tokens per sample; block_sizes / prefixes:
    tokens per time block (the whole sample when not interleaved) / of all inner tensors but
    the last."""
    if mode == "flexible_time_block_causal_last":
        if not config or any(config.get(k) != "full" for k in
                             ("prefix2prefix", "prefix2nonprefix", "nonprefix2prefix", "nonprefix2nonprefix")):
            return (f"mask mode 'flexible_time_block_causal_last' with cross_timestep_attention_config {config}: "
                    "only the all-'full' config has a register-attention equivalent")
        mode = "time_block_causal_last"
    if mode not in _PACKER_MODES["BlockWiseSequenceInterleavePacker" if interleaved else "BlockWiseSequencePacker"]:
        return f"mask mode {mode!r} has no register-attention equivalent in this integration"
    out = []
    for n, s, p in zip(lengths, block_sizes, prefixes):
        if n == 0:
            continue
        if mode in ("full", "causal"):
            out.append((1, 0, "full" if mode == "full" else "block_causal", n))
        elif mode == "time_block_causal":
            out.append((s, 0, "block_causal", n // s))
        else:  # block_causal_last; without a prefix the block is token-causal, which is P = 1
            P = max(p, 1)
            out.append((P, s - P, "block_causal_last", n // s))
    return out


def _plan_packed(mode: str, interleaved: bool, inner_shapes, outer_shapes, seq_len: int, config=None) -> _Plan:
    """The _Plan of one packer call from its packed shapes (see _sample_layouts)."""
    lengths = [_numel(s) for s in outer_shapes]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu = tuple(cu)
    block_sizes = [sum(_numel(s) for s in shapes) for shapes in inner_shapes]
    prefixes = [sum(_numel(s) for s in shapes[:-1]) for shapes in inner_shapes]
    if not interleaved:
        block_sizes = lengths
    per_sample = _sample_layouts(mode, interleaved, lengths, block_sizes, prefixes, config)
    if isinstance(per_sample, str):
        return _Plan(None, cu, seq_len, per_sample)
    if not per_sample:
        return _Plan(None, cu, seq_len, "no tokens to attend")
    forms = sorted({(P, R, m) for P, R, m, _ in per_sample})
    if len(forms) > 1:
        return _Plan(None, cu, seq_len, "the samples of one call differ in (patches, registers) per block: "
                     + ", ".join(f"({P}, {R})" for P, R, _ in forms))
    P, R, m = forms[0]
    if any(n % (P + R) for n in lengths) or cu[-1] > seq_len:
        return _Plan(None, cu, seq_len, f"sample lengths {lengths} do not split into blocks of {P + R} tokens")
    return _Plan(RegisterLayout(max(b for *_, b in per_sample), P, R, m), cu, seq_len)


class _AttentionStats:
    """Per-call counts of one handle's patched attention layers (shown in its summary)."""

    def __init__(self):
        self.vft = 0
        self.fallbacks = collections.Counter()

    def lines(self) -> list[str]:
        total = self.vft + sum(self.fallbacks.values())
        if not total:
            return ["attention calls so far: none"]
        line = f"attention calls so far: {self.vft} on vk.register_attention"
        if self.fallbacks:
            line += f", {sum(self.fallbacks.values())} fell back to FlexAttention (" + "; ".join(
                f"{why}: {n}" for why, n in self.fallbacks.most_common()) + ")"
        return [line]


def _plan_of(block_mask) -> Optional[_Plan]:
    if isinstance(block_mask, VftBlockMask):
        return block_mask.plan
    if block_mask is None:
        return None
    try:
        return _PLANS.get(block_mask)
    except TypeError:  # not weak-referenceable: not one of ours
        return None


def _call_fallback(plan: Optional[_Plan], q, k, v, score_mod, kwargs) -> Optional[str]:
    """Why this FlexAttention call cannot run on vk.register_attention (None: it can)."""
    if plan is None:
        return "mask not from a patched packer"
    if plan.layout is None:
        return plan.reason
    if score_mod is not None:
        return "score_mod given"
    extra = [name for name, value in kwargs.items() if _FLEX_DEFAULTS.get(name, object()) != value]
    if extra:
        return f"FlexAttention options {extra}"
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or not (q.shape == k.shape == v.shape):
        return "q, k, v differ in shape (cross-attention / GQA)"
    if q.dim() != 4 or q.shape[0] != 1 or q.shape[2] != plan.seq_len:
        return f"q of shape {tuple(q.shape)} is not [1, H, {plan.seq_len}, D]"
    if q.dtype not in _ATTN_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if k.device != q.device or v.device != q.device:
        return "q, k, v on different devices"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return None


def _patch_attention_layer(handle: PatchHandle, layer, stats: _AttentionStats) -> None:
    original = layer.flex_attention

    def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, **kwargs):
        plan = _plan_of(block_mask)
        why = _call_fallback(plan, query, key, value, score_mod, kwargs)
        if why is None:
            stats.vft += 1
            return register_attention(query, key, value, plan.layout, scale=scale, cu_seqlens=plan.cu_seqlens)
        if block_mask is not None or score_mod is not None:
            stats.fallbacks[why] += 1
        else:
            stats.fallbacks["no block_mask"] += 1
        if isinstance(block_mask, VftBlockMask):
            block_mask = block_mask.materialize()
        return original(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale, **kwargs)

    flex_attention._vft_original = original
    handle.set_instance_attr(layer, "flex_attention", flex_attention)


def _patch_packer(handle: PatchHandle, packer, official_cls: type, create_sig: inspect.Signature, lazy: bool,
                  interleaved: bool) -> None:
    create = vars(packer)["create_block_mask"]
    names = list(create_sig.parameters)
    local = threading.local()  # per thread: concurrent forward calls keep their own masks

    def made() -> list:  # (mask, N) of the main masks created during this thread's forward call
        if not hasattr(local, "made"):
            local.made = []
        return local.made

    def create_block_mask(*args, **kwargs):
        try:
            a = create_sig.bind(*args, **kwargs).arguments
        except TypeError:
            return create(*args, **kwargs)
        B, H, M, N = (a.get(n) for n in names[1:5])
        main = B is None and H is None and isinstance(N, int) and M == N
        mask = VftBlockMask(None, functools.partial(create, *args, **kwargs)) if main and lazy else \
            create(*args, **kwargs)
        if main:
            made().append((mask, N))
        return mask

    @torch.compiler.disable
    def forward(self, data_dict):
        made().clear()
        out = official_cls.forward(self, data_dict)
        try:
            mask = out.get(self.block_mask_write_key) if isinstance(out, dict) else None
            N = next((n for m, n in made() if m is mask), None)
            if N is not None:
                plan = _plan_packed(self.mask_mode, interleaved, out[self.inner_packed_shapes_write_key],
                                    out[self.outer_packed_shapes_write_key], N,
                                    getattr(self, "cross_timestep_attention_config", None))
                if isinstance(mask, VftBlockMask):
                    mask.plan = plan
                else:
                    try:
                        _PLANS[mask] = plan
                    except TypeError:
                        pass
        finally:
            made().clear()
        return out

    create_block_mask._vft_original = create
    forward._vft_original = official_cls.forward
    handle.set_instance_attr(packer, "create_block_mask", create_block_mask)
    handle.set_instance_attr(packer, "forward", types.MethodType(forward, packer))


def _is_vft(fn) -> bool:
    return hasattr(fn, "_vft_original") or hasattr(getattr(fn, "__func__", None), "_vft_original")


def _mask_consumers(model, key) -> list:
    """(path, module, attribute) of every module of ``model`` reading ``key`` as a block mask."""
    return [(path, m, attr) for path, m in model.named_modules() for attr, value in vars(m).items()
            if attr.endswith("block_mask_read_key") and value == key]


def _eager_reason(pkg: _OfficialPackage, model, packer, patched_layers: set) -> Optional[str]:
    """Why ``packer`` must keep building its real BlockMask (None: every consumer of its key
    in ``model`` is an official trunk whose self-attention layers are all patched)."""
    trunks = sys.modules.get(f"{pkg.name}.{_TRUNKS_MODULE}")
    attn = sys.modules.get(f"{pkg.name}.{_ATTENTION_MODULE}")
    flex = getattr(attn, "FlexAttention", None)
    cross = getattr(attn, "FlexCrossAttention", ())
    consumers = _mask_consumers(model, packer.block_mask_write_key)
    if not consumers:
        return f"no module of the model reads its mask key {packer.block_mask_write_key!r}"
    for path, m, attr in consumers:
        official = (getattr(trunks, "FlexTransformer", None), getattr(trunks, "FlexTransformerDecoder", None))
        trunk = next((c for c in official if c is not None and type(m) is c), None)
        if trunk is None or attr not in ("block_mask_read_key", "sa_block_mask_read_key"):
            return f"its mask is read by .{path} ({type(m).__name__}.{attr}), not an official trunk's self-attention"
        layers = [x for x in m.modules() if flex is not None and isinstance(x, flex) and not isinstance(x, cross)]
        if not layers or any(id(x) not in patched_layers for x in layers):
            return f"trunk .{path} has self-attention layers that are not patched"
    return None


def _has_attention(pkg: _OfficialPackage, model) -> bool:
    """Whether ``model`` holds an official FlexAttention layer or sequence packer."""
    attn_mod = sys.modules.get(f"{pkg.name}.{_ATTENTION_MODULE}")
    pack_mod = sys.modules.get(f"{pkg.name}.{_PACKING_MODULE}")
    classes = tuple(c for c in [getattr(attn_mod, "FlexAttention", None)] +
                    [getattr(pack_mod, n, None) for n in list(_PACKERS) + list(_UNSUPPORTED_PACKERS)] if c is not None)
    return bool(classes) and any(isinstance(m, classes) for m in model.modules())


def _patch_attention(pkg: _OfficialPackage, handle: PatchHandle, model) -> None:
    attn_mod = sys.modules.get(f"{pkg.name}.{_ATTENTION_MODULE}")
    pack_mod = sys.modules.get(f"{pkg.name}.{_PACKING_MODULE}")
    flex_cls = getattr(attn_mod, "FlexAttention", None)
    cross_cls = getattr(attn_mod, "FlexCrossAttention", None)
    packer_classes = {n: getattr(pack_mod, n) for n in list(_PACKERS) + list(_UNSUPPORTED_PACKERS)
                      if hasattr(pack_mod, n)}
    layers = [(p, m) for p, m in model.named_modules() if flex_cls is not None and isinstance(m, flex_cls)]
    packers = [(p, m) for p, m in model.named_modules() if isinstance(m, tuple(packer_classes.values()))]
    stats = _AttentionStats()

    done, skipped = set(), collections.Counter()
    for _, m in layers:
        if cross_cls is not None and isinstance(m, cross_cls):
            skipped["cross-attention (vk.register_attention is self-attention over one packed sequence)"] += 1
        elif not callable(vars(m).get("flex_attention")):
            skipped["no flex_attention (use_flex_attention=False: scaled_dot_product_attention)"] += 1
        elif _is_vft(m.flex_attention):
            skipped["already patched (by another handle)"] += 1
        else:
            _patch_attention_layer(handle, m, stats)
            done.add(id(m))
    line = f"attention: {len(done)} of {len(layers)} FlexAttention layer(s) patched"
    if done:
        line += (" (calls whose mask comes from a patched packer -> vk.register_attention over the packed "
                 "samples (cu_seqlens), padded rows 0; per call, falls back to the layer's original FlexAttention "
                 "call for score_mod, other FlexAttention options, q / k / v not alike [1, H, N, D], and masks "
                 "from unpatched packers)")
    handle.lines += [line] + [f"  {n} not patched: {why}" for why, n in skipped.items()]

    create_fn = getattr(pack_mod, "create_block_mask_cached", None)
    create_sig = inspect.signature(create_fn) if create_fn is not None else None
    lines, n_done = [], 0
    for path, m in packers:
        where = f".{path}" if path else "<model>"
        name = next(n for n, c in packer_classes.items() if type(m) is c or isinstance(m, c))
        cls = packer_classes[name]
        if name in _UNSUPPORTED_PACKERS:
            lines.append(f"  {where} ({name}): not patched, {_UNSUPPORTED_PACKERS[name]}")
            continue
        mode = m.mask_mode
        reason = None
        if type(m).forward is not cls.forward:
            reason = f"{type(m).__name__} overrides forward"
        elif getattr(m, "return_materialized_mask", False):
            reason = "it builds a dense mask for scaled_dot_product_attention (return_materialized_mask=True)"
        elif _is_vft(vars(m).get("forward")) or _is_vft(vars(m).get("create_block_mask")):
            reason = "already patched (by another handle)"
        elif create_sig is None or not callable(vars(m).get("create_block_mask")):
            reason = "no create_block_mask of the known form"
        else:
            check = _sample_layouts(mode, name == "BlockWiseSequenceInterleavePacker", [], [], [],
                                    getattr(m, "cross_timestep_attention_config", None))
            if isinstance(check, str):
                reason = check
        if reason:
            lines.append(f"  {where} ({name}, mask_mode {mode!r}): not patched, {reason}")
            continue
        eager = _eager_reason(pkg, model, m, done)
        _patch_packer(handle, m, cls, create_sig, lazy=eager is None,
                      interleaved=name == "BlockWiseSequenceInterleavePacker")
        n_done += 1
        how = ("BlockMask built only if a layer falls back" if eager is None else
               f"BlockMask still built ({eager}); patched layers look its layout up")
        lines.append(f"  {where} ({name}): mask_mode {mode!r} -> {_MODE_DOC[mode]}; {how}")
    handle.lines.append(f"attention: {n_done} of {len(packers)} sequence packer(s) patched" +
                        ("" if n_done == len(packers) else
                         " (layers fed by an unpatched packer run the original FlexAttention call)"))
    handle.lines += lines
    if done:
        handle.live.append(stats.lines)


def _patch_trunks(pkg: _OfficialPackage, handle: PatchHandle, model, dtype=None) -> None:
    """Whole official trunks (FlexTransformer of FlexBlock / FlexBlockAdaLN) on vft ops
    (``vft_kernels.integrations.blocks``)."""
    mods = {k: sys.modules.get(f"{pkg.name}.{v}") for k, v in (
        ("trunks", _TRUNKS_MODULE), ("blocks", "model.layers.transformer_blocks"), ("attn", _ATTENTION_MODULE),
        ("mlp", "model.layers.mlp"), ("norm", "model.layers.norm"))}
    classes = {"FlexTransformer": getattr(mods["trunks"], "FlexTransformer", None),
               "FlexBlock": getattr(mods["blocks"], "FlexBlock", None),
               "FlexBlockAdaLN": getattr(mods["blocks"], "FlexBlockAdaLN", None),
               "FlexSelfAttention": getattr(mods["attn"], "FlexSelfAttention", None),
               "GatedMlp": getattr(mods["mlp"], "GatedMlp", None),
               "Fp32LayerNorm": getattr(mods["norm"], "Fp32LayerNorm", None)}
    trunk_cls = classes["FlexTransformer"]
    trunks = [(p, m) for p, m in model.named_modules() if trunk_cls is not None and isinstance(m, trunk_cls)]
    if not trunks:
        handle.lines.append("blocks: no official FlexTransformer trunk found")
        return
    stats = _blocks.TrunkStats()
    param = next(model.parameters(), None)
    dtype, note = _blocks.resolve_dtype(dtype, param.device if param is not None else torch.device("cpu"))
    lines, done = [], 0
    for path, m in trunks:
        where = f".{path}" if path else "<model>"
        if any(v is None for v in classes.values()):
            reasons = ["the official block modules are not all imported"]
        elif _is_vft(vars(m).get("forward")):
            reasons = ["already patched (by another handle)"]
        else:
            reasons = _blocks.trunk_reasons(m, classes)
        if reasons:
            lines.append(f"  {where}: not patched, " + "; ".join(reasons))
            continue
        _blocks.patch_trunk(handle, m, _plan_of, stats, dtype=dtype)
        done += 1
        kind = type(m.blocks[0]).__name__
        lines.append(f"  {where}: {len(m.blocks)} x {kind} on vft ops{note}")
    handle.lines.append(f"blocks: {done} of {len(trunks)} trunk(s) patched" + (
        " (fused norms + modulation, one QKV and one gate/up projection per block, QK LayerNorm, "
        "vk.register_attention, vk.swiglu; per call, runs the official blocks when the mask is not from a "
        "patched packer, samples differ in length, or score_mod / rope / intermediate outputs / dropout are "
        "in play)" if done else ""))
    handle.lines += lines
    if done:
        handle.live.append(stats.lines)


# --------------------------------------------------------------------------------------
# patch / patched


def _find_pipelines(model, classes: tuple):
    """(where, object) for every plain attribute of a module of ``model`` that is an instance of
    ``classes`` (each object once)."""
    found, seen = [], set()
    for path, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, classes) and id(value) not in seen:
                seen.add(id(value))
                found.append((f"{path}.{attr}" if path else attr, value))
    return found


def _patch_official(pkg: _OfficialPackage, model, fsq: bool, attention: bool, guidance: bool,
                    blocks: bool = True, dtype=None) -> PatchHandle:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{pkg.name} integration: expected the official {pkg.title} model or an nn.Module "
                        f"containing its FSQ / attention / sampler, got "
                        f"{type(model).__module__}.{type(model).__qualname__}")
    options = dict(fsq=fsq, attention=attention, guidance=guidance, blocks=blocks, dtype=dtype)
    earlier = existing_handle(pkg.name, model)
    if earlier is not None:
        if earlier.options != options:
            raise ValueError(f"{pkg.name} integration: this model is already patched with {earlier.options}; "
                             f"unpatch() it before patching with {options}")
        return earlier
    if not (fsq or guidance or attention):
        raise ValueError(f"{pkg.name} integration: nothing to patch with fsq=False, guidance=False and "
                         "attention=False")
    fsq_cls = getattr(sys.modules.get(f"{pkg.name}.regularizers.quantize_fsq"), "FSQ", None)
    pipes_mod = sys.modules.get(f"{pkg.name}.flow_matching.pipelines")
    pipe_classes = {n: getattr(pipes_mod, n) for n in list(pkg.samplers) + list(pkg.unsupported)
                    if hasattr(pipes_mod, n)}
    fsqs = [(p, m) for p, m in model.named_modules() if fsq_cls is not None and isinstance(m, fsq_cls)]
    pipes = _find_pipelines(model, tuple(pipe_classes.values()))
    attn_found = attention and _has_attention(pkg, model)
    if not ((fsq and fsqs) or (guidance and pipes) or attn_found):
        if not (fsq or guidance):
            raise ValueError(f"{pkg.name} integration: nothing to patch with fsq=False and guidance=False: no "
                             f"official FlexAttention layer or sequence packer found in {type(model).__qualname__}")
        wanted = ([f"{pkg.name}.regularizers.quantize_fsq.FSQ"] if fsq else []) + \
            ([f"{pkg.name}.flow_matching.pipelines.{n}" for n in pkg.samplers] if guidance else []) + \
            ([f"{pkg.name}.{_ATTENTION_MODULE}.FlexAttention", f"{pkg.name}.{_PACKING_MODULE}.<packer>"]
             if attention else [])
        raise ValueError(f"{pkg.name} integration: found nothing to patch in {type(model).__qualname__}: expected "
                         f"instances of {' or '.join(wanted)} among its modules and their attributes")
    handle = PatchHandle(pkg.name, f"vft_kernels.integrations.{pkg.name}.patch({type(model).__qualname__})")
    handle.options = options

    if not fsq:
        handle.lines.append("fsq: not requested")
    else:
        done, skipped = 0, []
        for path, m in fsqs:
            reasons = _fsq_fallbacks(m, fsq_cls)
            if reasons:
                where = path or "<model>"
                skipped.append(f"  {where} (levels {m._levels.tolist()}): not patched, " + "; ".join(reasons))
            else:
                _patch_fsq(handle, m)
                done += 1
        line = f"fsq: {done} of {len(fsqs)} official FSQ module(s) patched"
        if done:
            line += (" (forward_z -> vk.fsq_quantize, indices_to_embedding -> vk.fsq_indices_to_codes; per call, "
                     "falls back to the original in training mode when drop_quant_p > 0 or corrupt_tokens_p > 0, "
                     "and for non-integer token ids; out-of-range ids wrap around as in the original)")
        handle.lines += [line] + skipped

    if not guidance:
        handle.lines.append("guidance: not requested")
    elif not pipes:
        handle.lines.append("guidance: no official sampler pipeline found")
    else:
        for where, pipe in pipes:
            name = next(n for n, c in pipe_classes.items() if isinstance(pipe, c))
            if name in pkg.unsupported:
                handle.lines.append(f"guidance: {name} at .{where} not patched ({pkg.unsupported[name]})")
                continue
            cls, spec = pipe_classes[name], pkg.samplers[name]
            reason = _pipeline_fallback(pipe, cls, spec)
            if reason:
                handle.lines.append(f"guidance: {name} at .{where} not patched ({reason})")
                continue
            handle.set_class(pipe, _patched_pipeline_class(cls, spec))
            handle.lines.append(
                f"guidance: sampler patched: {name} at .{where} (CFG / APG guidance + Euler update -> vk.flow_step; "
                f"MomentumBuffer state {'shared across the batch' if spec.shared_momentum else 'per sample'}, as in "
                "the official code; falls back to the official __call__ when cfg_rescaler is given, and to the "
                "official formula for a sample whose tensors differ in shape / dtype / device or have < 4 dims)")

    if not attention:
        handle.lines.append("attention: not requested")
    elif not attn_found:
        handle.lines.append(ATTENTION_LINE)
    else:
        _patch_attention(pkg, handle, model)
    if not blocks:
        handle.lines.append("blocks: not requested")
    elif not (attention and attn_found):
        handle.lines.append("blocks: not patched (they run on the attention plan: needs attention=True)")
    else:
        _patch_trunks(pkg, handle, model, dtype)
    handle.register(model)
    return handle


def patch(model, fsq: bool = True, attention: bool = True, guidance: bool = True, blocks: bool = True,
          dtype: Optional[torch.dtype] = None) -> PatchHandle:
    """Run the official VideoFlexTok ``model`` (or any nn.Module containing its parts) on the
    vft kernels: FSQ on vk.fsq_quantize / vk.fsq_indices_to_codes (``fsq``), the FlexAttention
    calls over packed sequences on vk.register_attention (``attention``), the sampler's
    guidance + Euler update on vk.flow_step (``guidance``), whole transformer trunks on fused
    vft ops with identical register rows computed once (``blocks``, needs ``attention``; see
    ``vft_kernels.integrations.blocks``). ``dtype=torch.bfloat16`` runs the patched trunks in
    bf16 where the hardware multiplies bf16 natively (elsewhere: a warning, the model's dtype).
    Returns a PatchHandle (``summary()``, ``unpatch()``). Raises TypeError if ``model`` is not
    an nn.Module, ValueError if nothing patchable is found or the model is already patched
    with other options."""
    return _patch_official(_VIDEOFLEXTOK, model, fsq, attention, guidance, blocks, dtype)


def patched(model, fsq: bool = True, attention: bool = True, guidance: bool = True, blocks: bool = True,
            dtype: Optional[torch.dtype] = None):
    """Context manager: ``patch(model, ...)`` for the ``with`` block, undone on exit (unless
    the model was already patched before the block)."""
    return patched_context(patch, _VIDEOFLEXTOK.name, model, fsq=fsq, attention=attention, guidance=guidance,
                           blocks=blocks, dtype=dtype)
