"""Reference flow-matching ODE steps (docs/spec.md §3): guidance (none / cfg / apg) + Euler
update, and the Heun update. Float32 math (float64 for float64 input), differentiable."""
import torch


def _per_sample(t, x):
    """Python float or [B] tensor -> something that broadcasts against x [B, ...]."""
    if isinstance(t, torch.Tensor):
        return t.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return t


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def guided_velocity(v_cond, v_uncond, guidance, scale, apg_eta, apg_norm_threshold, apg_momentum,
                    momentum, reduce_ndim):
    """The velocity after guidance; updates ``momentum`` in place for APG with momentum."""
    if guidance == "none":
        return v_cond
    if guidance == "cfg":
        return v_uncond + scale * (v_cond - v_uncond)
    dims = tuple(range(v_cond.ndim - reduce_ndim, v_cond.ndim))  # group = all leading indices
    diff = v_cond - v_uncond
    if apg_momentum != 0:
        diff = diff + apg_momentum * momentum.to(diff.dtype)
        momentum.copy_(diff.detach())
    if apg_norm_threshold > 0:
        norm = torch.linalg.vector_norm(diff, dim=dims, keepdim=True)
        diff = diff * torch.clamp(apg_norm_threshold / norm, max=1.0)  # norm 0 -> inf -> 1
    norm_c = torch.linalg.vector_norm(v_cond, dim=dims, keepdim=True)
    u = torch.where(norm_c > 0, v_cond / torch.where(norm_c > 0, norm_c, 1.0), 0.0)  # 0/0 -> 0
    par = (diff * u).sum(dim=dims, keepdim=True) * u
    orth = diff - par
    return v_cond + (scale - 1) * (orth + apg_eta * par)


def flow_step(x, v_cond, t, t_next, v_uncond=None, guidance="none", scale=1.0, apg_eta=0.0,
              apg_norm_threshold=0.0, apg_momentum=0.0, momentum=None, reduce_ndim=3, prefix=None,
              prefix_len=0):
    """x_next = x + (t_next - t) * v, v the guided velocity; prefix frames (dim 2) replaced."""
    cdt = _compute_dtype(x)
    xf = x.to(cdt)
    v = guided_velocity(v_cond.to(cdt), None if v_uncond is None else v_uncond.to(cdt), guidance, scale,
                        apg_eta, apg_norm_threshold, apg_momentum, momentum, reduce_ndim)
    x_next = xf + (_per_sample(t_next, xf) - _per_sample(t, xf)) * v
    if prefix_len > 0:
        x_next = torch.cat([prefix.to(cdt), x_next[:, :, prefix_len:]], dim=2)
    return x_next.to(x.dtype)


def flow_heun_step(x, v1, v2, t, t_next):
    """x_next = x + (t_next - t) * (v1 + v2) / 2."""
    cdt = _compute_dtype(x)
    xf = x.to(cdt)
    dt = _per_sample(t_next, xf) - _per_sample(t, xf)
    return (xf + dt * (v1.to(cdt) + v2.to(cdt)) / 2).to(x.dtype)


def flow_step_out(out, x, v_cond, v_uncond, t, t_next, guidance, scale, apg_eta, apg_norm_threshold,
                  apg_momentum, momentum, reduce_ndim, prefix, prefix_len):
    """The backend form of flow_step (dispatch contract): writes ``out``."""
    out.copy_(flow_step(x, v_cond, t, t_next, v_uncond, guidance, scale, apg_eta, apg_norm_threshold,
                        apg_momentum, momentum, reduce_ndim, prefix, prefix_len))


def flow_heun_step_out(out, x, v1, v2, t, t_next):
    """The backend form of flow_heun_step (dispatch contract): writes ``out``."""
    out.copy_(flow_heun_step(x, v1, v2, t, t_next))
