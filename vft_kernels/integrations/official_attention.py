"""The official packed FlexAttention masks and layers on vk.register_attention.

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
"""
from __future__ import annotations

import collections
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

from .. import RegisterLayout, register_attention
from ..ops.attention import MAX_HEAD_DIM
from . import CallStats, PatchHandle

ATTENTION_LINE = "attention: no official FlexAttention layer or sequence packer found (nothing to patch)"
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


def _attention_stats() -> CallStats:
    return CallStats("attention", "on vk.register_attention", "fell back to FlexAttention")


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


def _patch_attention_layer(handle: PatchHandle, layer, stats: CallStats) -> None:
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


def _eager_reason(pkg, model, packer, patched_layers: set) -> Optional[str]:
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


def _has_attention(pkg, model) -> bool:
    """Whether ``model`` holds an official FlexAttention layer or sequence packer."""
    attn_mod = sys.modules.get(f"{pkg.name}.{_ATTENTION_MODULE}")
    pack_mod = sys.modules.get(f"{pkg.name}.{_PACKING_MODULE}")
    classes = tuple(c for c in [getattr(attn_mod, "FlexAttention", None)] +
                    [getattr(pack_mod, n, None) for n in list(_PACKERS) + list(_UNSUPPORTED_PACKERS)] if c is not None)
    return bool(classes) and any(isinstance(m, classes) for m in model.modules())


def _patch_attention(pkg, handle: PatchHandle, model) -> None:
    attn_mod = sys.modules.get(f"{pkg.name}.{_ATTENTION_MODULE}")
    pack_mod = sys.modules.get(f"{pkg.name}.{_PACKING_MODULE}")
    flex_cls = getattr(attn_mod, "FlexAttention", None)
    cross_cls = getattr(attn_mod, "FlexCrossAttention", None)
    packer_classes = {n: getattr(pack_mod, n) for n in list(_PACKERS) + list(_UNSUPPORTED_PACKERS)
                      if hasattr(pack_mod, n)}
    layers = [(p, m) for p, m in model.named_modules() if flex_cls is not None and isinstance(m, flex_cls)]
    packers = [(p, m) for p, m in model.named_modules() if isinstance(m, tuple(packer_classes.values()))]
    stats = _attention_stats()

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
