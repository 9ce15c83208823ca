"""Register attention op (docs/spec.md §2): argument checks, torch.library custom ops, autograd."""
from __future__ import annotations

import math
import numbers
import warnings
import weakref
from typing import Optional

import torch

from .. import dispatch
from ..layout import RegisterLayout

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 256

for _op in ("attention_forward", "attention_backward"):
    dispatch.register(_op, "reference", f"vft_kernels.reference.attention:{_op}")
    dispatch.register(_op, "triton", f"vft_kernels.triton.attention:{_op}",
                      check=f"vft_kernels.triton.attention:supports_{_op}")
    dispatch.register(_op, "cpu", f"vft_kernels.cpp.attention:{_op}", devices=("cpu",),
                      check=f"vft_kernels.cpp.attention:supports_{_op}")


def _layout(T, P, R, mode):
    return RegisterLayout(T, P, R, mode)


# keep tensors whose values were checked: id -> (weakref, version counter, R). A model passes
# the same keep tensor to every layer, so a device tensor costs one host sync per forward
# pass, not one per layer; an in-place change bumps the version and forces a new check.
_KEEP_CHECKED: dict = {}


def _check_keep_values(keep: torch.Tensor, R: int):
    """ValueError unless every keep value is in [0, R], read in keep's own integer dtype (no
    narrowing first: an int64 2**32 + 3 must not pass as 3). Free on the CPU; a device tensor
    is checked once (one sync) and then remembered until it changes."""
    if keep.numel() == 0:
        return
    key = id(keep)
    if keep.device.type != "cpu":
        seen = _KEEP_CHECKED.get(key)
        if seen is not None and seen[0]() is keep and seen[1] == keep._version and seen[2] == R:
            return
    lo, hi = (int(x) for x in torch.stack([keep.min(), keep.max()]).tolist())
    if lo < 0 or hi > R:
        bad = lo if lo < 0 else hi
        raise ValueError(f"register_attention: keep values must be in [0, R={R}], got {bad}")
    if keep.device.type != "cpu":
        if len(_KEEP_CHECKED) > 64:
            _KEEP_CHECKED.clear()
        _KEEP_CHECKED[key] = (weakref.ref(keep), keep._version, R)


def _check_cu_seqlens(vals: list, layout: RegisterLayout, N: int) -> None:
    """Host-side checks of a packed call's offsets (Python ints, never narrowed first)."""
    if len(vals) < 2:
        raise ValueError(f"register_attention: cu_seqlens must hold at least 2 offsets (1 sample), got {len(vals)}")
    if vals[0] != 0:
        raise ValueError(f"register_attention: cu_seqlens[0] must be 0, got {vals[0]}")
    S = layout.block_size
    for s in range(len(vals) - 1):
        length = vals[s + 1] - vals[s]
        if length < 0:
            raise ValueError(f"register_attention: cu_seqlens must be non-decreasing, got cu_seqlens[{s}] = "
                             f"{vals[s]} > cu_seqlens[{s + 1}] = {vals[s + 1]}")
        if length % S:
            raise ValueError(f"register_attention: sample {s} has {length} tokens, not a multiple of the block "
                             f"size P + R = {S} of layout {layout}")
        if length // S > layout.blocks:
            raise ValueError(f"register_attention: sample {s} has {length // S} time blocks, more than "
                             f"layout.blocks = {layout.blocks} (the maximum per sample in a packed call)")
    if vals[-1] > N:
        raise ValueError(f"register_attention: cu_seqlens[-1] = {vals[-1]} exceeds the sequence length N = {N}")


# Device copies of checked host offsets, keyed by (offsets, device): a model passes the same
# offsets to every layer of every step, so the steady path does no host-to-device copy.
_CU_DEVICE: dict = {}


def _cu_on_device(vals: tuple, device: torch.device) -> torch.Tensor:
    key = (vals, device)
    cu = _CU_DEVICE.get(key)
    if cu is None:
        cu = torch.tensor(vals, dtype=torch.int32)
        if device.type == "cuda":  # pinned + non_blocking: no host synchronisation
            cu = cu.pin_memory().to(device, non_blocking=True)
        else:
            cu = cu.to(device)
        if len(_CU_DEVICE) >= 256:
            _CU_DEVICE.clear()
        _CU_DEVICE[key] = cu
    return cu


# The default keep (every register kept), one per (samples, R, device): its values are known
# valid, so a call without keep does no value check (no host sync) and no allocation.
_FULL_KEEP: dict = {}


def _full_keep(B: int, R: int, device: torch.device) -> torch.Tensor:
    key = (B, R, device)
    keep = _FULL_KEEP.get(key)
    if keep is None:
        if len(_FULL_KEEP) >= 256:
            _FULL_KEEP.clear()
        keep = _FULL_KEEP[key] = torch.full((B,), R, dtype=torch.int32, device=device)
    return keep


@torch.library.custom_op("vft::register_attention", mutates_args=())
def _register_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: int, patches: int,
                        registers: int, mode: str, keep: torch.Tensor, scale: float,
                        cu_seqlens: Optional[torch.Tensor] = None,
                        cu_checked: bool = False, keep_checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if not keep_checked:
        _check_keep_values(keep, registers)
    layout = _layout(blocks, patches, registers, mode)
    if cu_seqlens is not None and not cu_checked:  # (a device tensor: one sync), read in its own dtype
        _check_cu_seqlens([int(x) for x in cu_seqlens.tolist()], layout, q.shape[2])
        cu_seqlens = cu_seqlens.to(torch.int32)  # in [0, N] once checked: narrowing is exact
    args = (q, k, v, layout, keep, scale, cu_seqlens)
    backend, fn = dispatch.select("attention_forward", q.device, *args)
    if backend == "reference" and dispatch.forced_backend() is None:
        _warn_dense_fallback(q, args)
    return fn(*args)


# The dense reference materialises [B, N, N] masks and [B, H, N, N] float32 scores. When the
# automatic selection falls back to it, warn once per reason: always on a GPU (a kernel was
# expected), on the CPU from this many bytes on.
DENSE_WARN_BYTES_CPU = 1 << 30
_DENSE_WARNED: set = set()


def _warn_dense_fallback(q: torch.Tensor, args: tuple) -> None:
    B, H, N, _ = q.shape
    # scores, probabilities and one more [B, H, N, N] float32 temporary, plus the bool mask
    need = 3 * 4 * B * H * N * N + B * N * N
    if q.device.type == "cpu" and need < DENSE_WARN_BYTES_CPU:
        return
    reasons = "; ".join(f"{name}: {why}" for name, fn, why in
                        dispatch.candidates("attention_forward", q.device, *args) if fn is None)
    key = (q.device.type, reasons)
    if key in _DENSE_WARNED:
        return
    _DENSE_WARNED.add(key)
    warnings.warn(f"register_attention: no kernel can run this call on {q.device.type} ({reasons}); falling back "
                  f"to the dense reference, which materialises the [B, N, N] mask and [B, H, N, N] float32 scores: "
                  f"about {need / 2**30:.2f} GiB for B={B}, H={H}, N={N} (warned once per reason)",
                  RuntimeWarning, stacklevel=3)


@_register_attention.register_fake
def _(q, k, v, blocks, patches, registers, mode, keep, scale, cu_seqlens=None, cu_checked=False, keep_checked=False):
    B, H, N, _ = q.shape
    # lse is float32, float64 for float64 input (as the reference computes it)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # contiguous, as every backend allocates it (empty_like would copy a permuted q's strides)
    return q.new_empty(q.shape), q.new_empty((B, H, N), dtype=lse_dtype)


@torch.library.custom_op("vft::register_attention_backward", mutates_args=())
def _register_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, blocks: int, patches: int,
                                 registers: int, mode: str, keep: torch.Tensor, scale: float,
                                 cu_seqlens: Optional[torch.Tensor] = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = _layout(blocks, patches, registers, mode)
    return dispatch.call("attention_backward", q.device, dout, q, k, v, out, lse, layout, keep, scale, cu_seqlens)


@_register_attention_backward.register_fake
def _(dout, q, k, v, out, lse, blocks, patches, registers, mode, keep, scale, cu_seqlens=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, blocks, patches, registers, mode, keep, scale, cu_seqlens, _, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, keep, cu_seqlens)
    ctx.args = (blocks, patches, registers, mode)
    ctx.scale = scale
    ctx.dispatch_state = dispatch.capture_state()  # the backward runs under the forward's choice
    ctx.mark_non_differentiable(lse)  # gradients flow through `out` only


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, keep, cu_seqlens = ctx.saved_tensors
    with dispatch.restored_state(ctx.dispatch_state):
        dq, dk, dv = _register_attention_backward(dout, q, k, v, out, lse, *ctx.args, keep, ctx.scale,
                                                  cu_seqlens)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_register_attention.register_autograd(_backward, setup_context=_setup_context)


def register_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: RegisterLayout,
                       keep: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                       return_lse: bool = False, cu_seqlens=None):
    """Attention over interleaved ``[patches | registers]`` blocks (docs/spec.md §2).

    q, k, v: [B, H, N, D] (fp32/fp16/bf16, same dtype and device), N = layout.seq_len.
    keep: optional int tensor [B] in [0, R]: registers r >= keep[b] are dropped (never
    attended to; their output rows are zero); or per time block, [B, T]: registers
    r >= keep[b, t] of block t are dropped. scale defaults to 1/sqrt(D).
    Returns out [B, H, N, D] (input dtype), and lse [B, H, N] float32 (-inf on dropped
    rows; not differentiable) when ``return_lse``.

    Packed samples (varlen, like flash-attn's ``cu_seqlens``): ``cu_seqlens`` int offsets
    ``[S + 1]`` (a 1-D integer tensor or a sequence of ints), ``0 = cu[0] <= ... <= cu[S] <= N``,
    with q, k, v ``[1, H, N, D]``. Sample ``s`` is tokens ``[cu[s], cu[s+1])``: its own
    sequence of ``(cu[s+1] - cu[s]) / (P + R)`` time blocks (a multiple of P + R, at most
    ``layout.blocks``; ``layout`` gives P, R and the mode, ``layout.blocks`` is the largest
    sample's block count) that attends only within itself, keeping ``keep[s]`` registers
    (keep ``[S]``), or ``keep[s, t]`` in its block ``t`` (keep ``[S, layout.blocks]``; columns
    past the sample's own block count are ignored). Rows ``n >= cu[S]`` are padding: zero output, lse -inf, zero gradients.
    The offsets are always checked on the host: a list/tuple before the call (then copied to
    the device without a sync), a tensor inside the op (also under torch.compile; a device
    tensor costs one sync, so on GPU pass a list)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"register_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(layout, RegisterLayout):
        raise TypeError(f"register_attention: layout must be a RegisterLayout, got {type(layout).__name__}")
    if q.dim() != 4:
        raise ValueError(f"register_attention: q must be [B, H, N, D], got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"register_attention: {name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"register_attention: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"register_attention: {name} must be on q's device {q.device}, got {t.device}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"register_attention: dtype must be float32, float16 or bfloat16, got {q.dtype}")
    B, H, N, D = q.shape
    if cu_seqlens is None and N != layout.seq_len:
        raise ValueError(f"register_attention: layout {layout} expects N = {layout.seq_len} tokens, got N = {N}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"register_attention: packed calls (cu_seqlens) take q, k, v of shape [1, H, N, D], "
                             f"got B = {B}")
        if isinstance(cu_seqlens, torch.Tensor):
            if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool \
                    or cu_seqlens.dim() != 1:
                raise ValueError(f"register_attention: cu_seqlens must be a 1-D integer tensor, got "
                                 f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
            # Values are checked inside the op (opaque to torch.compile, like keep's), in the
            # tensor's own dtype: int64 offsets >= 2**31 must not wrap into range first.
            cu_seqlens = cu_seqlens.to(device=q.device)
            cu_checked = False
        else:
            if not (isinstance(cu_seqlens, (list, tuple)) and all(
                    isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in cu_seqlens)):
                raise TypeError(f"register_attention: cu_seqlens must be an int tensor [S + 1] or a list/tuple of "
                                f"ints, got {cu_seqlens!r}")
            vals = tuple(int(x) for x in cu_seqlens)
            _check_cu_seqlens(vals, layout, N)  # on the host, so the op need not read the device copy
            cu_checked = True
            cu_seqlens = _cu_on_device(vals, q.device)
        if cu_seqlens.numel() < 2:
            raise ValueError(f"register_attention: cu_seqlens must hold at least 2 offsets (1 sample), got "
                             f"{cu_seqlens.numel()}")
        B = cu_seqlens.numel() - 1  # samples: keep is [S]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"register_attention: head dim D must be in [1, {MAX_HEAD_DIM}], got {D}")
    keep_checked = keep is None
    if keep is None:
        keep = _full_keep(B, layout.registers, q.device)
    else:
        if not isinstance(keep, torch.Tensor):
            raise TypeError(f"register_attention: keep must be an int tensor [B] or [B, T], or None, got "
                            f"{type(keep).__name__}")
        if keep.dtype.is_floating_point or keep.dtype.is_complex or keep.dtype == torch.bool:
            raise ValueError(f"register_attention: keep must be an integer tensor, got {keep.dtype}")
        if tuple(keep.shape) not in ((B,), (B, layout.blocks)):
            what = (f"[S] = ({B},) (one per packed sample) or [S, T] = ({B}, {layout.blocks}) (per time block)"
                    if cu_seqlens is not None else
                    f"[B] = ({B},) or [B, T] = ({B}, {layout.blocks}) (per time block)")
            raise ValueError(f"register_attention: keep must have shape {what}, got {tuple(keep.shape)}")
        if keep.device != q.device:
            raise ValueError(f"register_attention: keep must be on q's device {q.device}, got {keep.device}")
        # Passed as given: the op checks the values in this dtype, the backends narrow.
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    out, lse = _register_attention(q, k, v, layout.blocks, layout.patches, layout.registers, layout.mode,
                                   keep, float(scale), cu_seqlens, cu_checked if cu_seqlens is not None else False,
                                   keep_checked)
    return (out, lse) if return_lse else out
