"""The engine shared by the official-package integrations: finds the official parts in a
model and patches each with its module (``official_fsq``, ``official_attention``, ``blocks``,
``official_sampler``); ``videoflextok.py`` / ``flextok.py`` only say which classes of their
package map where (an ``OfficialPackage``).

Whole patched models should be pickled only after ``unpatch()`` (the private pipeline subclass
and the instance-level wrappers cannot be pickled); ``state_dict()`` is unaffected.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from . import PatchHandle, blocks as _blocks, existing_handle
from .official_attention import (ATTENTION_LINE, _ATTENTION_MODULE, _PACKING_MODULE, _TRUNKS_MODULE, _has_attention,
                                 _is_vft, _patch_attention, _plan_of)
from .official_fsq import _fsq_fallbacks, _patch_fsq
from .official_sampler import _patched_pipeline_class, _pipeline_fallback


@dataclass(frozen=True)
class _OfficialPackage:
    name: str  # the importable package, e.g. "videoflextok"
    title: str  # the top-level model class, for messages
    samplers: dict  # pipeline class name -> _SamplerSpec
    unsupported: dict  # pipeline class name -> why it is not patched


def _patch_trunks(pkg: _OfficialPackage, handle: PatchHandle, model, dtype=None, blocks=True) -> None:
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
        # bf16 only in the flow decoder (adaLN trunks): the encoder's outputs are quantised to
        # tokens, and bf16 there changed about 9 % of them on a random-weight model
        decoder = m.adaLN_emb_read_key is not None
        _blocks.patch_trunk(handle, m, _plan_of, stats, dtype=dtype if decoder else None,
                            tune=blocks != "always", name=path.rsplit(".", 1)[-1] or "trunk")
        done += 1
        kind = type(m.blocks[0]).__name__
        lines.append(f"  {where}: {len(m.blocks)} x {kind} on vft ops" +
                     (note if decoder else "; in the model's dtype (encoder: its outputs become tokens)"
                      if dtype is not None else ""))
    handle.lines.append(f"blocks: {done} of {len(trunks)} trunk(s) patched" + (
        " (fused norms + modulation, one QKV and one gate/up projection per block, QK LayerNorm, "
        "vk.register_attention, vk.swiglu; per call, runs the official blocks when the mask is not from a "
        "patched packer, samples differ in length, or score_mod / rope / intermediate outputs / dropout are "
        "in play" + ("; on the CPU, per call shape, the official blocks where they measured faster on the first "
                     "calls (blocks='always' pins the vft blocks)" if blocks != "always" else
                     "; blocks='always': no per-shape choice") + ")" if done else ""))
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
                    blocks=True, dtype=None) -> PatchHandle:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{pkg.name} integration: expected the official {pkg.title} model or an nn.Module "
                        f"containing its FSQ / attention / sampler, got "
                        f"{type(model).__module__}.{type(model).__qualname__}")
    if blocks not in (True, False, "always"):
        raise ValueError(f"{pkg.name} integration: blocks must be True (the vft blocks where they are faster "
                         f"per call shape), 'always' or False, got {blocks!r}")
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
        _patch_trunks(pkg, handle, model, dtype, blocks)
    handle.register(model)
    return handle
