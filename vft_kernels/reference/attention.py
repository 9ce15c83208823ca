"""Reference register attention (SPEC.md §2): dense mask, float32 (float64 for float64 input)
softmax. Dropped query rows give exactly zero output and lse = -inf; they pass no gradient."""
import torch


def attention_forward(q, k, v, layout, keep, scale):
    """q, k, v [B, H, N, D]; keep int [B] -> (out [B, H, N, D] q.dtype, lse [B, H, N] float32).

    Differentiable through autograd (used as the ground truth for the backward pass)."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    allowed = layout.materialize(keep, q.device)[:, None]  # [B, 1, N, N]
    live = allowed.any(-1, keepdim=True)  # query rows with at least one allowed key
    # Rows without keys (dropped queries) get a harmless all-allowed row, then zeroed, so
    # no NaN reaches the output or the gradients.
    s = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    s = s.masked_fill(~(allowed | ~live), float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    out = torch.matmul(torch.exp(s - lse), v.to(cdt))
    out = torch.where(live, out, 0.0)
    lse = torch.where(live, lse, float("-inf"))
    return out.to(q.dtype), lse.squeeze(-1).to(torch.float32 if cdt == torch.float32 else cdt)


def attention_backward(dout, q, k, v, out, lse, layout, keep, scale):
    """(dq, dk, dv) by the textbook softmax-attention gradient (tests check it against
    autograd through attention_forward). Dropped query rows have P = 0: no gradient."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, do = (t.to(cdt) for t in (q, k, v, dout))
    allowed = layout.materialize(keep, q.device)[:, None]
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    p = torch.where(allowed, torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1), 0.0)
    p = torch.nan_to_num(p)  # rows without any allowed key: softmax of all -inf
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    # rowsum(dO * O) == (dp * p).sum(-1); computed from `out` like the flash kernels do, so
    # the low-precision reference carries the same cancellation error in dp - delta.
    ds = p * (dp - (do * out.to(cdt)).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
