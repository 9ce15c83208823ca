"""Reference register attention (docs/spec.md §2): dense mask, float32 (float64 for float64 input)
softmax. Dropped query rows give exactly zero output and lse = -inf; they pass no gradient.
For fp16 / bf16 inputs, P and dS are rounded to the inputs' dtype before their matrix
products, as the flash-style kernels do (and as flash-attention's reference does), so the
low-precision run measures the error those steps cause (docs/spec.md §4).

Packed (varlen) calls, ``cu_seqlens`` given: sample ``s`` is tokens ``[cu[s], cu[s+1])`` of
the one sequence (q is [1, H, N, D]) with ``(cu[s+1] - cu[s]) / (P + R)`` time blocks; each
sample is attended on its own slice, exactly as a dense call, and rows from ``cu[-1]`` on
(padding) give zero output, lse = -inf and zero gradients."""
import torch

from ..layout import RegisterLayout


LOW_PRECISION = (torch.float16, torch.bfloat16)


def _operand(t, dtype):
    """``t`` rounded to ``dtype`` (and back) when that is fp16/bf16: the flash-style kernels
    feed P and dS to their matrix products in the inputs' dtype, and the low-precision
    reference takes the same rounding steps so that it measures the error those steps
    cause (docs/spec.md §4: the bound is twice the low-precision reference's error). Identity
    in float32 / float64."""
    return t.to(dtype).to(t.dtype) if dtype in LOW_PRECISION else t


def varlen_samples(layout, cu_seqlens):
    """(s, start, end, RegisterLayout of sample s) for every non-empty sample of a packed call."""
    cu = [int(x) for x in cu_seqlens.tolist()]
    S = layout.block_size
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        if b > a:
            yield s, a, b, RegisterLayout((b - a) // S, layout.patches, layout.registers, layout.mode)


def _sample_keep(keep, s, layout):
    """Sample s's keep ([1], or [1, T_s] from a per-block [S, T_max]) in a packed call."""
    return keep[s:s + 1] if keep.dim() == 1 else keep[s:s + 1, :layout.blocks]


def _stitch(pieces, N, fills):
    """Concatenates per-sample results along the token dim (2) and pads them to N tokens
    (pieces: list of (start, tuple of tensors); fills: padding value per output)."""
    outs = []
    for j, fill in enumerate(fills):
        parts, end = [], 0
        for start, res in pieces:
            parts.append(res[j])
            end = start + res[j].shape[2]
        like = parts[0]
        parts.append(like.new_full(like.shape[:2] + (N - end,) + like.shape[3:], fill))
        outs.append(torch.cat(parts, dim=2))
    return tuple(outs)


def attention_forward(q, k, v, layout, keep, scale, cu_seqlens=None):
    """q, k, v [B, H, N, D]; keep int [B] or per-block [B, T] -> (out [B, H, N, D] q.dtype,
    lse [B, H, N] float32). Packed: q, k, v [1, H, N, D], keep [S] or [S, T], cu_seqlens int
    [S + 1] (see the module doc).

    Differentiable through autograd (used as the ground truth for the backward pass)."""
    if cu_seqlens is not None:
        # An empty leading "sample" gives the concatenation a correctly typed first piece.
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        pieces = [(0, (q[:, :, :0], q.new_empty(q.shape[:2] + (0,), dtype=lse_dtype)))]
        pieces += [(a, attention_forward(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], lay, _sample_keep(keep, s, lay),
                                         scale))
                   for s, a, b, lay in varlen_samples(layout, cu_seqlens)]
        return _stitch(pieces, q.shape[2], (0.0, float("-inf")))
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    allowed = layout.materialize(keep, q.device)[:, None]  # [B, 1, N, N]
    live = allowed.any(-1, keepdim=True)  # query rows with at least one allowed key
    # Rows without keys (dropped queries) get a harmless all-allowed row, then zeroed, so
    # no NaN reaches the output or the gradients.
    s = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    s = s.masked_fill(~(allowed | ~live), float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    out = torch.matmul(_operand(torch.exp(s - lse), v.dtype), v.to(cdt))
    out = torch.where(live, out, 0.0)
    lse = torch.where(live, lse, float("-inf"))
    return out.to(q.dtype), lse.squeeze(-1).to(torch.float32 if cdt == torch.float32 else cdt)


def attention_backward(dout, q, k, v, out, lse, layout, keep, scale, cu_seqlens=None):
    """(dq, dk, dv) by the textbook softmax-attention gradient (tests check it against
    autograd through attention_forward). Dropped query rows have P = 0: no gradient."""
    if cu_seqlens is not None:
        pieces = [(0, tuple(t[:, :, :0].to(q.dtype) for t in (q, k, v)))]
        pieces += [(a, attention_backward(dout[:, :, a:b], q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], out[:, :, a:b],
                                          lse[:, :, a:b], lay, _sample_keep(keep, s, lay), scale))
                   for s, a, b, lay in varlen_samples(layout, cu_seqlens)]
        return _stitch(pieces, q.shape[2], (0.0, 0.0, 0.0))
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, do = (t.to(cdt) for t in (q, k, v, dout))
    allowed = layout.materialize(keep, q.device)[:, None]
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    # Rows without any allowed key (softmax of all -inf = NaN) and masked pairs get P = 0;
    # a NaN from the inputs stays NaN on allowed pairs only.
    p = torch.where(allowed, torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1), 0.0)
    dv = torch.matmul(_operand(p, dout.dtype).transpose(-1, -2), do)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    # rowsum(dO * O) == (dp * p).sum(-1); computed from `out` like the flash kernels do, so
    # the low-precision reference carries the same cancellation error in dp - delta.
    ds = torch.where(allowed, p * (dp - (do * out.to(cdt)).sum(-1, keepdim=True)), 0.0)
    # A non-finite q_i (k_j) already makes every allowed ds entry of row i (column j) NaN;
    # zeroing it in the operand stops 0 * NaN on masked pairs from reaching other tokens.
    dq = torch.matmul(_operand(ds, k.dtype), torch.where(kf.isfinite(), kf, 0.0)) * scale
    dk = torch.matmul(_operand(ds, q.dtype).transpose(-1, -2), torch.where(qf.isfinite(), qf, 0.0)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
