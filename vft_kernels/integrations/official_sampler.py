"""The official flow samplers' guidance + Euler update on vk.flow_step.

Guidance: the sampler pipelines ``VideoMinRFPipeline`` and ``MinRFPipeline`` (Euler steps,
CFG or APG) run their guidance + update on ``vk.flow_step`` (float32 math; APG groups = the
leading dims before the last three, i.e. per sample and channel for videos [1, C, T, H, W],
per sample for images [1, C, H, W], as in the official ``normalized_guidance``). Python looks
``__call__`` up on the type, so an instance attribute cannot replace ``pipeline(...)``: the
patch gives that one pipeline instance a private subclass whose ``__call__`` is the vft loop
(``isinstance`` still holds, ``unpatch`` restores ``__class__``; module globals are never
touched). The loop reproduces the official one: argument defaults (read from the official
signature), noise drawn in the same order with the same generator, a fresh copy of the data
dict per model call (containers new, tensors cloned: what the official ``copy.deepcopy``
guarantees), ``eval_dropout_mask``, callable guidance scales, the pipeline's own conditioning
helpers (clean / sdedit prefixes). One difference in how the work is laid out, not in what
it computes: a guided step runs the conditional and the unconditional pass as one model call
on twice the samples (``_guided_pair``; the samples of a packed call do not see each other),
which halves the per-call work and, on patched trunks, lets the unconditional half's
identical register rows be computed once while the conditional half keeps all of its rows.
Numerics: the official APG projection runs in float64, ``vk.flow_step`` accumulates its group
reductions in float32 (within the docs/spec.md §4 tolerance; the integration tests check it).
MomentumBuffer state: the official ``VideoMinRFPipeline`` / ``MinRFPipeline`` of this package
create ``[MomentumBuffer(m)] * batch_size``, one buffer object shared by every sample (sample
j's running average continues from sample j - 1's); the patch keeps that behaviour (it passes
the same state tensor to ``vk.flow_step`` for every sample) so results match the official
sampler, although docs/spec.md §3 asks for per-sample state. The state lives in official
MomentumBuffer objects, fresh for each call, as in the original. Falls back: to the official
``__call__`` (not patched, reported) when its source differs from the version the vft loop
reproduces (a hash of it is pinned per package: ``_SamplerSpec.source``), per call when a
``cfg_rescaler`` is given, and to the official guidance formula for a
sample whose latents and velocities differ in shape, dtype or device, have fewer than 4 dims,
or whose momentum state does not fit it. Scheduler-based pipelines (``AnyResPipelineCond``,
``AnyResPipelineCondV2``: a diffusers scheduler makes the step) are reported, not patched.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import sys
import textwrap
from dataclasses import dataclass
from typing import Optional

import torch

from .. import flow_step


@dataclass(frozen=True)
class _SamplerSpec:
    """What the vft loop needs to know about one official Euler sampler class."""
    params: tuple[str, ...]  # the official __call__ parameters after self, checked at patch time
    sizes: str  # name of the per-sample sizes argument
    video: bool  # [1, C, T, H, W] latents, with zero_noise / noise_list / prefix conditioning
    apg: Optional[tuple[float, float, float]]  # fixed (momentum, eta, norm_threshold); None: call args
    shared_momentum: bool  # the official code shares one MomentumBuffer across the batch
    source: str = ""  # source_hash of the official __call__ this loop reproduces ("": not checked)


def source_hash(fn) -> str:
    """A short hash of ``fn``'s source (dedented, trailing spaces dropped): the vft loop
    reproduces one version of the official sampler loop, and a changed loop (a new release)
    must fall back to the official one instead of being replaced by an outdated copy."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return "unavailable"
    src = "\n".join(line.rstrip() for line in textwrap.dedent(src).splitlines())
    return hashlib.sha256(src.encode()).hexdigest()[:16]


_PATCHED_PIPELINE_CLASSES: dict[type, type] = {}  # official class -> its vft subclass


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


def _fresh(value):
    """A copy of a data dict (or a value in it) for one model call: the containers are new and
    every tensor is cloned, so a module that writes into the dict or into a tensor in place
    (the official null conditions overwrite their list's tensors in place) changes nothing
    the loop keeps. What the official ``copy.deepcopy`` guarantees, without pickling-style
    traversal of other objects (copied with ``copy.copy``)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh(v) for v in value) if type(value) in (list, tuple) else copy.deepcopy(value)
    return copy.copy(value)


def _guided_pair(pipe, data_dict: dict, batch: int):
    """(v_cond, v_uncond) of a guided step from one model call on 2 x batch samples: the
    samples as they are, then the same samples with ``eval_dropout_mask`` set (the official
    unconditional pass). Per-sample entries of the data dict are the lists of ``batch``
    items (the official data dicts hold per-sample lists) and the timesteps tensor; None
    (two calls, as officially) when another tensor of the dict has ``batch`` rows (it could
    be per sample) or the model does not return 2 x batch outputs. Samples of one packed call
    do not see each other (block-diagonal masks), so each output is the one of its own pass."""
    if batch < 1:
        return None
    merged = {}
    for k, v in data_dict.items():
        if k == "eval_dropout_mask":
            continue
        if k == pipe.timesteps_read_key and isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == batch:
            merged[k] = torch.cat([v, v])
        elif type(v) in (list, tuple) and len(v) == batch:
            merged[k] = type(v)(list(_fresh(v)) + list(_fresh(v)))
        elif isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch:
            return None
        else:
            merged[k] = _fresh(v)
    mask = data_dict.get("eval_dropout_mask")
    merged["eval_dropout_mask"] = (list(mask) if mask is not None else [False] * batch) + [True] * batch
    out = pipe.model(merged)[pipe.reconst_write_key]
    if not isinstance(out, (list, tuple)) or len(out) != 2 * batch:
        return None
    return list(out[:batch]), list(out[batch:])


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
        both = _guided_pair(pipe, data_dict, batch) if do_cfg else None
        if both is not None:  # the conditional and the unconditional pass in one model call
            v_cond, v_uncond = both
        else:
            v_cond = pipe.model(_fresh(data_dict))[pipe.reconst_write_key]
            v_uncond = [None] * len(v_cond)
            if do_cfg:
                uncond_dict = _fresh(data_dict)
                uncond_dict["eval_dropout_mask"] = [True] * len(v_cond)
                v_uncond = pipe.model(uncond_dict)[pipe.reconst_write_key]
        scale = 1.0
        if do_cfg:
            scale = guidance_scale(t) if callable(guidance_scale) else guidance_scale
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
    if spec.source and source_hash(cls.__call__) != spec.source:
        return (f"its __call__ differs from the version this integration reproduces (source hash "
                f"{source_hash(cls.__call__)}, known {spec.source}): the official loop runs")
    return None
