"""Drop-in vft kernels for the official VideoFlexTok models (package ``videoflextok``)::

    from vft_kernels.integrations import videoflextok as vft_patch
    handle = vft_patch.patch(model)     # the official VideoFlexTok, or any nn.Module holding its parts
    print(handle)                       # what was replaced, what falls back and why
    handle.unpatch()
    with vft_patch.patched(model): ...  # the same, undone on exit

``patch(model, fsq=True, attention=True, guidance=True)`` walks ``model.modules()`` (and the
plain attributes of each module, where the wrapper keeps its sampler ``pipeline``) for the
official classes. They are looked up in ``sys.modules``: an instance can only exist once its
module is imported, so ``patch`` never imports the official package (or diffusers) itself.
Everything is per instance and reversible; ``state_dict()`` keys are untouched; patching a
patched model returns its existing handle (``unpatch`` first to change the options).

FSQ (``regularizers.quantize_fsq.FSQ``): ``forward_z`` runs on ``vk.fsq_quantize`` and
``indices_to_embedding`` on ``vk.fsq_indices_to_codes``, bit-identical quants and (int64)
tokens (SPEC.md §4: except tokens within 1e-5 of a rounding boundary). The official quantizer
draws one Bernoulli sample per batch row on every call, even with ``drop_quant_p = 0`` and in
eval mode; the patch makes the same draw, so random numbers drawn later (e.g. the sampler's
noise when no generator is given) stay the same. Falls back to the original:

* per call, in training mode with ``drop_quant_p > 0`` (quantization dropout) or
  ``corrupt_tokens_p > 0`` (token corruption), and in ``indices_to_embedding`` for non-integer
  or out-of-range ids (the original wraps them around);
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

Attention is not patched: the decoder keeps the official FlexAttention call (varlen register
attention is not implemented yet). Whole patched models should be pickled only after
``unpatch()`` (the private pipeline subclass cannot be pickled); ``state_dict()`` is unaffected.
"""
from __future__ import annotations

import copy
import inspect
import sys
import types
from dataclasses import dataclass
from typing import Optional

import torch

from .. import flow_step, fsq_indices_to_codes, fsq_quantize
from . import PatchHandle, existing_handle, override_reasons, patched_context

ATTENTION_LINE = ("attention: not patched (falls back to the official FlexAttention call; varlen register "
                  "attention is not implemented yet)")
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
                or indices.dtype == torch.bool or \
                (indices.numel() and bool(((indices < 0) | (indices >= self.codebook_size)).any())):
            return type(self).indices_to_embedding(self, indices)
        return fsq_indices_to_codes(indices, levels, validate=False)

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


def _patch_official(pkg: _OfficialPackage, model, fsq: bool, attention: bool, guidance: bool) -> PatchHandle:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{pkg.name} integration: expected the official {pkg.title} model or an nn.Module "
                        f"containing its FSQ / sampler, got {type(model).__module__}.{type(model).__qualname__}")
    earlier = existing_handle(pkg.name, model)
    if earlier is not None:
        return earlier
    if not (fsq or guidance):
        raise ValueError(f"{pkg.name} integration: nothing to patch with fsq=False and guidance=False "
                         "(attention patching is not implemented yet)")
    fsq_cls = getattr(sys.modules.get(f"{pkg.name}.regularizers.quantize_fsq"), "FSQ", None)
    pipes_mod = sys.modules.get(f"{pkg.name}.flow_matching.pipelines")
    pipe_classes = {n: getattr(pipes_mod, n) for n in list(pkg.samplers) + list(pkg.unsupported)
                    if hasattr(pipes_mod, n)}
    fsqs = [(p, m) for p, m in model.named_modules() if fsq_cls is not None and isinstance(m, fsq_cls)]
    pipes = _find_pipelines(model, tuple(pipe_classes.values()))
    if not ((fsq and fsqs) or (guidance and pipes)):
        wanted = ([f"{pkg.name}.regularizers.quantize_fsq.FSQ"] if fsq else []) + \
            ([f"{pkg.name}.flow_matching.pipelines.{n}" for n in pkg.samplers] if guidance else [])
        raise ValueError(f"{pkg.name} integration: found nothing to patch in {type(model).__qualname__}: expected "
                         f"instances of {' or '.join(wanted)} among its modules and their attributes")
    handle = PatchHandle(pkg.name, f"vft_kernels.integrations.{pkg.name}.patch({type(model).__qualname__})")

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
                     "and for non-integer or out-of-range token ids)")
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

    handle.lines.append(ATTENTION_LINE if attention else "attention: not requested")
    handle.register(model)
    return handle


def patch(model, fsq: bool = True, attention: bool = True, guidance: bool = True) -> PatchHandle:
    """Run the official VideoFlexTok ``model`` (or any nn.Module containing its FSQ / sampler)
    on the vft kernels: FSQ on vk.fsq_quantize / vk.fsq_indices_to_codes (``fsq``), the
    sampler's guidance + Euler update on vk.flow_step (``guidance``). ``attention`` is accepted
    and reported but not patched yet. Returns a PatchHandle (``summary()``, ``unpatch()``).
    Raises TypeError if ``model`` is not an nn.Module, ValueError if nothing patchable is found."""
    return _patch_official(_VIDEOFLEXTOK, model, fsq, attention, guidance)


def patched(model, fsq: bool = True, attention: bool = True, guidance: bool = True):
    """Context manager: ``patch(model, ...)`` for the ``with`` block, undone on exit (unless
    the model was already patched before the block)."""
    return patched_context(patch, _VIDEOFLEXTOK.name, model, fsq=fsq, attention=attention, guidance=guidance)
