"""VideoFlexTok: a flexible-length, coarse-to-fine video tokenizer on vft_kernels ops.

Latents ``[B, C, T', H', W']`` (from a compressor) are cut into 2D patches per latent
frame; every latent frame ``t`` is one block ``[patches_t | registers_t]`` of the
interleaved sequence (``P`` patches, ``R`` registers, ``N = T' (P + R)``), matching
``vk.RegisterLayout``.

* Encoder: patch embedding + sin-cos positions, learned registers, pre-LN blocks
  (QK-norm, SwiGLU, no biases) with ``block_causal_last`` register attention, then
  LayerNorm + Linear to ``d`` dims on the registers and FSQ -> tokens ``[B, T', R]``.
  Register ``r`` sees registers ``0..r`` of its block only, so the first ``K`` tokens of a
  frame never depend on the later ones (coarse to fine).
* Decoder: a rectified-flow velocity model. FSQ codes -> Linear (nested dropout:
  ``mask_token`` replaces registers ``r >= keep`` by a learned token; ``drop`` masks them
  out of attention through ``keep``), a learned null condition for guidance, noised
  latent patches + registers interleaved, ``block_causal`` attention (patches see their
  own frame's registers and everything earlier), adaLN-zero timestep conditioning with
  separate modulation for patch and register tokens, linear head -> velocity.

Quantisation, attention and sampling use only ``vft_kernels`` (``fsq_quantize``,
``fsq_indices_to_codes``, ``register_attention``, and ``flow_sample`` on the fused flow steps).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

import vft_kernels as vk

from .compressor import build_compressor, check_video
from .config import ModelConfig

KeepArg = Union[None, int, torch.Tensor]
X_PRED_T_MIN = 0.05  # x-prediction: v = (x_t - x0_hat) / max(t, this)


# ------------------------------------------------------------------------------------
# Embeddings


def sincos_1d(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """positions float [n] -> [n, dim] (sin half, cos half; dim even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(base) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def sincos_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """[h * w, dim]: half the channels encode the row, half the column."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.cat([sincos_1d(ys.reshape(-1), dim // 2), sincos_1d(xs.reshape(-1), dim // 2)], dim=-1)


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, T, (H/p)(W/p), C p p]."""
    B, C, T, H, W = latents.shape
    x = latents.reshape(B, C, T, H // p, p, W // p, p).permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(B, T, (H // p) * (W // p), C * p * p)


def unpatchify(x: torch.Tensor, C: int, H: int, W: int, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, T, P, C p p] -> [B, C, T, H, W]."""
    B, T = x.shape[:2]
    x = x.reshape(B, T, H // p, W // p, C, p, p).permute(0, 4, 1, 2, 5, 3, 6)
    return x.reshape(B, C, T, H, W)


# ------------------------------------------------------------------------------------
# Transformer pieces


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm, no biases, through ``vk.register_attention``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, layout: vk.RegisterLayout, keep: Optional[torch.Tensor]) -> torch.Tensor:
        B, N, W = x.shape
        qkv = self.qkv(x)
        # split + per-head RMSNorm of q and k in one op (vk.qk_rms_norm), into [B, H, N, D]
        q, k, v = vk.qk_rms_norm(qkv, self.heads, self.q_norm.weight, self.k_norm.weight, eps=self.q_norm.eps)
        # The kernel has its own precision rules (fp32 softmax); keep autocast out of it.
        with torch.autocast(x.device.type, enabled=False):
            out = vk.register_attention(q, k, v, layout, keep=keep)
        return self.proj(out.transpose(1, 2).reshape(B, N, W))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        # the down projection inside the op: its backward recomputes the activation
        return vk.swiglu(self.gate_up(x), self.down.weight)


class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, bias=False)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, bias=False)
        self.mlp = SwiGLU(width, hidden)

    def forward(self, x, layout, keep):
        x = x + self.attn(self.norm1(x), layout, keep)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Pre-LN block with adaLN-zero: per-frame conditioning ``c`` [B, T, W] modulates the
    patch tokens and the register tokens of each frame with separate parameters."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = SwiGLU(width, hidden)
        # 6 vectors (shift, scale, gate for attention and MLP) x {patches, registers}.
        self.modulation = nn.Linear(width, 12 * width)

    def forward(self, x, c, layout, keep):
        """x [B, T, S, W] (S = P + R tokens per frame), c [B, T, W] -> [B, T, S, W]."""
        B, T, S, W = x.shape
        # [B, T, 2 (patch, register), 6, W] -> vector i is mod[:, :, :, i] ([B, T, 2, W]); the
        # block ops pick the patch or register row per token from the layout.
        mod = self.modulation(F.silu(c)).reshape(B, T, 2, 6, W).to(x.dtype)
        eps = self.norm1.eps
        h = vk.modulated_layer_norm(x, layout, scale=mod[:, :, :, 1], shift=mod[:, :, :, 0], eps=eps)
        a = self.attn(h.reshape(B, T * S, W), layout, keep).reshape(B, T, S, W).to(x.dtype)
        x, h = vk.gated_residual_norm(x, mod[:, :, :, 2], a, layout, scale=mod[:, :, :, 4], shift=mod[:, :, :, 3],
                                      eps=eps)
        return vk.gated_residual(x, mod[:, :, :, 5], self.mlp(h).to(x.dtype), layout)


class TimestepEmbedding(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t float [...] in [0, 1] -> [..., width]."""
        emb = sincos_1d(t.reshape(-1) * 1000, self.freq_dim)
        return self.mlp(emb).reshape(*t.shape, -1)


# ------------------------------------------------------------------------------------
# Encoder and decoder


def _keep_tensor(keep: KeepArg, batch: int, registers: int, device, frames: Optional[int] = None) -> torch.Tensor:
    """None / int / [B] int tensor -> int64 [B] in [0, R]; with ``frames`` given, a per-frame
    [B, T'] int tensor is accepted too (returned as int64 [B, T']). Clear errors otherwise."""
    if keep is None:
        return torch.full((batch,), registers, dtype=torch.int64, device=device)
    what = "an int tensor [B]" + (f" or [B, T'] = ({batch}, {frames})" if frames is not None else "")
    if isinstance(keep, bool) or not isinstance(keep, (int, torch.Tensor)):
        raise TypeError(f"keep must be None, an int or {what}, got {type(keep).__name__}")
    if isinstance(keep, int):
        keep = torch.full((batch,), keep, dtype=torch.int64, device=device)
    if keep.dtype.is_floating_point or keep.dtype == torch.bool:
        raise ValueError(f"keep must be an integer tensor, got {keep.dtype}")
    if keep.dim() == 0:
        keep = keep.expand(batch)
    if tuple(keep.shape) != (batch,) and (frames is None or tuple(keep.shape) != (batch, frames)):
        raise ValueError(f"keep must be {what}, got shape {tuple(keep.shape)}")
    if keep.numel():
        lo, hi = int(keep.min()), int(keep.max())
        if lo < 0 or hi > registers:
            raise ValueError(f"keep must be in [0, R={registers}], got {lo if lo < 0 else hi}")
    return keep.to(device=device, dtype=torch.int64)


def _frame_keep(keep: torch.Tensor, frames: int) -> torch.Tensor:
    """keep [B] or [B, T] -> [B, T]."""
    return keep[:, None].expand(keep.shape[0], frames) if keep.dim() == 1 else keep


class FSQInputNorm(nn.Module):
    """Per-dimension normalisation of the FSQ input ``z`` (batch norm without affine).

    Keeps every FSQ dimension centred with unit spread across the batch, so the encoder
    cannot drift into tanh saturation (where the straight-through gradient vanishes and
    every token becomes the same code) while the decoder still ignores the tokens early in
    training. Training mode (``batch_stats=True``) normalises by the batch's statistics,
    with gradient through them, and updates running statistics; tokenization always uses
    the running statistics, so tokens never depend on the batch."""

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, z: torch.Tensor, batch_stats: bool) -> torch.Tensor:
        shape = z.shape
        z = z.reshape(-1, shape[-1])
        out = F.batch_norm(z, self.running_mean, self.running_var, training=batch_stats and z.shape[0] > 1,
                           momentum=self.momentum, eps=self.eps)
        return out.reshape(shape)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e = cfg.encoder
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, e.width, bias=False)
        self.registers = nn.Parameter(torch.randn(cfg.registers, e.width) * 0.5)  # O(1) like the patch embeddings
        self.blocks = nn.ModuleList(EncoderBlock(e.width, e.heads, e.mlp_hidden) for _ in range(e.depth))
        self.norm = nn.LayerNorm(e.width, bias=False)
        self.to_fsq = nn.Linear(e.width, cfg.fsq_dim, bias=False)
        self.fsq_norm = FSQInputNorm(cfg.fsq_dim) if cfg.fsq_norm == "batch" else None
        # linear_path: a per-frame linear code of the whole latent frame, added to the FSQ input.
        self.linear_in = nn.Linear(cfg.frame_dim, cfg.registers * cfg.fsq_dim) if cfg.linear_path else None
        if cfg.linear_path:  # the transformer's part starts at zero, as the decoder's head does
            nn.init.zeros_(self.to_fsq.weight)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, C, T, H, W] -> (codes [B, T, R, d] float32 (differentiable),
        tokens [B, T, R] int32), with the FSQ input normalised by running statistics."""
        return vk.fsq_quantize(self.pre_quant(latents), self.cfg.fsq_levels)

    def pre_quant(self, latents: torch.Tensor, batch_stats: bool = False) -> torch.Tensor:
        """latents [B, C, T, H, W] -> the FSQ input z [B, T, R, d] float32 (normalised by the
        batch's statistics when ``batch_stats``, else by the running ones; see FSQInputNorm)."""
        z = self.raw_z(latents)
        return z if self.fsq_norm is None else self.fsq_norm(z, batch_stats)

    def raw_z(self, latents: torch.Tensor) -> torch.Tensor:
        """The register features projected to the FSQ dims, before FSQInputNorm: [B, T, R, d]."""
        cfg, W = self.cfg, self.cfg.encoder.width
        B, C, T, H, Wd = latents.shape
        p = cfg.patch_size
        patches = self.patch_embed(patchify(latents, p))  # [B, T, P, W]
        P = patches.shape[2]
        time = sincos_1d(torch.arange(T, device=latents.device), W)[:, None]  # [T, 1, W]
        patches = patches + sincos_2d(H // p, Wd // p, W, latents.device) + time
        regs = (self.registers[None] + time).expand(B, T, cfg.registers, W).to(patches.dtype)
        x = torch.cat([patches, regs], dim=2).reshape(B, T * (P + cfg.registers), W)
        layout = vk.RegisterLayout(T, P, cfg.registers, "block_causal_last")
        for block in self.blocks:
            x = block(x, layout, None)
        regs = x.reshape(B, T, P + cfg.registers, W)[:, :, P:]
        z = self.to_fsq(self.norm(regs)).float()
        if self.linear_in is not None:
            frames = latents.transpose(1, 2).reshape(B, T, C * H * Wd)
            z = z + self.linear_in(frames).reshape(B, T, cfg.registers, cfg.fsq_dim).float()
        return z


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.decoder
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, d.width, bias=False)
        self.code_embed = nn.Linear(cfg.fsq_dim, d.width, bias=False)
        self.register_pos = nn.Parameter(torch.randn(cfg.registers, d.width) * 0.5)
        self.null_token = nn.Parameter(torch.randn(d.width) * 0.02)
        if cfg.dropout_mode == "mask_token":
            self.mask_token = nn.Parameter(torch.randn(d.width) * 0.02)
        self.time_embed = TimestepEmbedding(d.width)
        self.blocks = nn.ModuleList(DecoderBlock(d.width, d.heads, d.mlp_hidden) for _ in range(d.depth))
        self.final_norm = nn.LayerNorm(d.width, elementwise_affine=False)
        self.final_modulation = nn.Linear(d.width, 2 * d.width)
        self.head = nn.Linear(d.width, cfg.patch_dim, bias=False)
        if cfg.linear_path:
            # All R codes of a frame -> its clean latents; registers past keep (and the null
            # condition) read a learned per-register code instead.
            self.linear_out = nn.Linear(cfg.registers * cfg.fsq_dim, cfg.frame_dim)
            self.linear_mask = nn.Parameter(torch.zeros(cfg.registers, cfg.fsq_dim))
        else:
            self.linear_out = None
        self._zero_init()

    def _zero_init(self):
        # adaLN-zero: every block starts as the identity and the head outputs zero.
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        nn.init.zeros_(self.final_modulation.weight)
        nn.init.zeros_(self.final_modulation.bias)
        nn.init.zeros_(self.head.weight)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, codes: torch.Tensor, keep: torch.Tensor,
                null: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity of the flow.

        x_t: noised latents [B, C, T, H, W]; t: float [B, T] (per latent frame: clean
        prefix frames have t = 0); codes: [B, T, K, d] float (K <= R registers given);
        keep: int64 [B] in [0, K], or [B, T] (per latent frame; in ``drop`` mode the
        attention kernels take it as a per-block keep);
        null: optional bool [B], samples that get the learned null condition instead of the
        codes. Returns v [B, C, T, H, W] float32."""
        cfg, W = self.cfg, self.cfg.decoder.width
        B, C, T, H, Wd = x_t.shape
        K = codes.shape[2]
        p = cfg.patch_size
        patches = self.patch_embed(patchify(x_t, p))
        P = patches.shape[2]
        time = sincos_1d(torch.arange(T, device=x_t.device), W)[:, None]
        patches = patches + sincos_2d(H // p, Wd // p, W, x_t.device) + time
        regs = self.code_embed(codes.to(patches.dtype))  # [B, T, K, W]
        r = torch.arange(K, device=x_t.device)
        dropped = (r[None, None, :] >= _frame_keep(keep, T)[:, :, None])[..., None]  # [B, T, K, 1]
        if cfg.dropout_mode == "mask_token":
            regs = torch.where(dropped, self.mask_token.to(regs.dtype), regs)
        if null is not None:
            regs = torch.where(null[:, None, None, None], self.null_token.to(regs.dtype), regs)
        regs = regs + self.register_pos[:K] + time
        x = torch.cat([patches, regs.to(patches.dtype)], dim=2)  # [B, T, P + K, W]
        layout = vk.RegisterLayout(T, P, K, "block_causal")
        attn_keep = keep.to(torch.int32) if cfg.dropout_mode == "drop" else None
        c = self.time_embed(t)  # [B, T, W]
        for block in self.blocks:
            x = block(x, c, layout, attn_keep)
        shift, scale = self.final_modulation(F.silu(c))[:, :, None].chunk(2, dim=-1)
        out = unpatchify(self.head(self.final_norm(x[:, :, :P]) * (1 + scale) + shift).float(), C, H, Wd, p)
        if cfg.prediction == "v":
            return out
        if self.linear_out is not None:
            out = out + self.linear_x0(codes, keep, null).reshape(B, T, C, H, Wd).transpose(1, 2)
        # x-prediction: the network outputs the clean latents and the velocity follows from
        # x_t = t * noise + (1 - t) * x0, so it never has to reproduce the noise itself.
        tc = t.float().clamp(min=X_PRED_T_MIN)[:, None, :, None, None]
        return (x_t.float() - out) / tc

    def linear_x0(self, codes: torch.Tensor, keep: torch.Tensor, null: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The linear path's clean-latent estimate [B, T, C * H' * W'] (float32) from the first
        ``keep`` codes of each frame (keep [B] or [B, T]; the rest, and every code of a null
        sample, replaced by the learned ``linear_mask``)."""
        cfg = self.cfg
        B, T, K, d = codes.shape
        R = cfg.registers
        full = F.pad(codes.float(), (0, 0, 0, R - K))
        kept = (torch.arange(R, device=codes.device)[None, None, :] < _frame_keep(keep, T)[:, :, None])[..., None]
        if null is not None:
            kept = kept & ~null[:, None, None, None]
        full = torch.where(kept, full, self.linear_mask.float())
        return self.linear_out(full.reshape(B, T, R * d).to(self.linear_out.weight.dtype)).float()


# ------------------------------------------------------------------------------------
# The tokenizer


class VideoFlexTok(nn.Module):
    """Compressor + encoder + FSQ + flow decoder. Videos are float ``[B, 3, T, H, W]``
    in [-1, 1] (see ``vft.data.to_model_range``)."""

    def __init__(self, cfg: ModelConfig, vae: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        self.compressor = build_compressor(cfg.compressor, vae)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def attach_vae(self, vae: nn.Module) -> None:
        """Attach the frozen video VAE of a ``vae``-latent config."""
        self.compressor = build_compressor(self.cfg.compressor, vae)

    # Training ------------------------------------------------------------------------
    def forward(self, video: torch.Tensor, t: torch.Tensor, prefix_len: torch.Tensor, noise: torch.Tensor,
                keep: torch.Tensor, null: torch.Tensor, return_stats: bool = False, shuffled_loss: bool = False,
                loss_t_min: float = 0.0, linear_loss: float = 1.0):
        """Rectified-flow training loss (the random draws come from the caller, see
        ``vft.train.draw``).

        video [B, 3, T, H, W]; t float [B] flow times; prefix_len int [B]: the first
        prefix_len latent frames are given clean (t = 0) and excluded from the loss;
        noise [B, C, T', H', W']; keep int [B], or [B, T'] (a keep per latent frame); null bool
        [B]. Returns the velocity MSE ``|v - (noise - x0)|^2`` averaged over the non-prefix
        frames (float32 scalar); with ``loss_t_min > 0`` each frame's error is weighted by
        ``max(t, loss_t_min)^2``, which makes it the squared error of the implied clean
        estimate ``x_t - t v`` (for t >= loss_t_min).

        linear_loss: with ``cfg.linear_path``, add this times the squared error of the linear
        path's own clean-latent estimate (from the kept codes; over the non-prefix frames of
        the samples with codes). The flow loss alone teaches the codes only through the
        high-noise samples; this term trains the encoder and the linear path as a
        (nested-dropout) linear autoencoder at every step.

        return_stats: also return a dict of detached telemetry: ``tokens`` [B, T', R] and
        ``z`` (the FSQ input); with ``shuffled_loss`` also ``shuffled_loss``, the same loss
        with the codes rolled by one sample across the batch (no gradient; equal to the
        loss when the decoder ignores its tokens), and ``flow_loss``, the loss without the
        linear term."""
        x0 = self.compressor.encode(video)
        B, T = x0.shape[0], x0.shape[2]
        z = self.encoder.pre_quant(x0, batch_stats=self.training)
        codes, tokens = vk.fsq_quantize(z, self.cfg.fsq_levels)
        frame = torch.arange(T, device=x0.device)
        clean = frame[None, :] < prefix_len[:, None]  # [B, T]
        t_frames = torch.where(clean, 0.0, t[:, None].expand(B, T))
        tb = t_frames[:, None, :, None, None]
        x_t = tb * noise + (1 - tb) * x0
        weight = (~clean).float()

        def loss_with(c):
            v = self.decoder(x_t, t_frames, c, keep, null)
            err = (v - (noise - x0)).square()
            if loss_t_min > 0:  # t^2 |v - v*|^2 = |x0_hat - x0|^2: the error of the clean estimate
                err = err * tb.clamp(min=loss_t_min).square()
            err = err.mean(dim=(1, 3, 4))  # [B, T]
            return (err * weight).sum() / weight.sum().clamp(min=1)

        loss = flow_loss = loss_with(codes)
        if self.decoder.linear_out is not None and linear_loss > 0:
            C, H, Wd = x0.shape[1], x0.shape[3], x0.shape[4]
            lin = self.decoder.linear_x0(codes, keep).reshape(B, T, C, H, Wd).transpose(1, 2)
            w = weight * (~null).float()[:, None]
            err = (lin - x0.float()).square().mean(dim=(1, 3, 4))  # [B, T]
            loss = loss + linear_loss * (err * w).sum() / w.sum().clamp(min=1)
        if not return_stats:
            return loss
        stats = {"tokens": tokens.detach(), "z": z.detach(), "flow_loss": flow_loss.detach()}
        if shuffled_loss:
            with torch.no_grad():
                stats["shuffled_loss"] = loss_with(codes.detach().roll(1, dims=0)) if B > 1 else loss.detach()
        return loss, stats

    # Shapes --------------------------------------------------------------------------
    def check_input_video(self, video: torch.Tensor) -> None:
        check_video(video)
        cfg = self.cfg
        if tuple(video.shape[3:]) != (cfg.height, cfg.width):
            raise ValueError(f"video must be {cfg.height}x{cfg.width} (H x W) for config {cfg.name!r}, got "
                             f"{video.shape[3]}x{video.shape[4]}; resize/crop first (vft.data.resize_crop)")

    def chunks(self, latent_frames: int) -> list[tuple[int, int]]:
        """Overlapping chunks of a ``latent_frames``-long latent video: ``(start, new)`` pairs;
        chunk i covers ``[start, start + T'_chunk)`` and produces frames ``[new, end)``, the
        frames ``[start, new)`` being its prefix (already produced by earlier chunks)."""
        Tc, o = self.cfg.latent_frames, self.cfg.chunk_overlap
        if latent_frames <= Tc:
            return [(0, 0)]
        out, start, done = [], 0, 0
        while done < latent_frames:
            start = min(start, latent_frames - Tc)
            out.append((start, done))
            done = start + Tc
            start = done - o
        return out

    # Tokenize ------------------------------------------------------------------------
    def encode_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, C, T', H', W'] (any T') -> (codes [B, T', R, d], tokens [B, T', R] int32);
        long inputs are encoded in overlapping chunks."""
        Tc = self.cfg.latent_frames
        codes, tokens = [], []
        for start, new in self.chunks(latents.shape[2]):
            c, i = self.encoder(latents[:, :, start:start + Tc])
            codes.append(c[:, new - start:])
            tokens.append(i[:, new - start:])
        return torch.cat(codes, dim=1), torch.cat(tokens, dim=1)

    @torch.no_grad()
    def tokenize(self, video: torch.Tensor) -> torch.Tensor:
        """video float [B, 3, T, H, W] in [-1, 1] -> tokens int32 [B, T', R] in
        [0, prod(fsq_levels)); T' = latent frames (videos longer than one chunk are
        processed in overlapping chunks)."""
        self.check_input_video(video)
        return self.encode_latents(self.compressor.encode(video))[1]

    # Detokenize ----------------------------------------------------------------------
    def check_tokens(self, tokens: torch.Tensor) -> None:
        cfg = self.cfg
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be an int tensor [B, T', R], got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dim() != 3:
            raise ValueError(f"tokens must be an int tensor [B, T', K] with K <= R = {cfg.registers}, got "
                             f"{tokens.dtype} of shape {tuple(tokens.shape)}")
        if not 1 <= tokens.shape[2] <= cfg.registers or tokens.shape[1] < 1 or tokens.shape[0] < 1:
            raise ValueError(f"tokens must have shape [B, T', K] with B, T' >= 1 and 1 <= K <= R = "
                             f"{cfg.registers}, got {tuple(tokens.shape)}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= cfg.codebook_size:
            raise ValueError(f"token values must be in [0, {cfg.codebook_size}) for FSQ levels {cfg.fsq_levels}, "
                             f"got {lo if lo < 0 else hi}")

    def velocity(self, x_t, t_frames, codes, keep, null=None):
        return self.decoder(x_t, t_frames, codes, keep, null)

    def _sample_chunk(self, codes, keep, noise, prefix, prefix_len, steps, guidance, scale, solver, shift,
                      apg_momentum, progress):
        B, T = codes.shape[:2]
        guided = guidance != "none"
        null = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(codes.device)

        def velocity_fn(x, t):  # t: float32 [B], the same time for every sample
            t_frames = t[:, None].expand(B, T).clone()
            t_frames[:, :prefix_len] = 0.0  # the prefix frames are clean
            if not guided:
                return self.decoder(x, t_frames, codes, keep)
            v = self.decoder(x.repeat(2, 1, 1, 1, 1), t_frames.repeat(2, 1), codes.repeat(2, 1, 1, 1),
                             keep.repeat(2, *([1] * (keep.dim() - 1))), null)
            return v[:B], v[B:]

        return vk.flow_sample(velocity_fn, noise, steps, guidance=guidance, scale=scale, shift=shift, solver=solver,
                              prefix=prefix, prefix_len=prefix_len, apg_momentum=apg_momentum, progress=progress)

    @torch.no_grad()
    def detokenize_latents(self, tokens: torch.Tensor, keep: KeepArg = None, steps: int = 25,
                           guidance: str = "apg", scale: float = 1.5, solver: str = "euler", seed: int = 0,
                           shift: float = 1.0, apg_momentum: float = 0.0, progress: bool = False) -> torch.Tensor:
        """tokens int [B, T', K] (K <= R; registers past K count as dropped) -> latents
        float32 [B, C, T', H', W'] by flow sampling from seeded noise."""
        self.check_tokens(tokens)
        cfg = self.cfg
        B, T, K = tokens.shape
        keep = _keep_tensor(keep, B, cfg.registers, tokens.device, frames=T).clamp(max=K)
        codes = vk.fsq_indices_to_codes(tokens, cfg.fsq_levels)
        C, h, w = cfg.compressor.latent_channels, *cfg.latent_hw
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        # Time-major draw: a video's first frames get the same noise as a shorter video's.
        noise = torch.randn((T, B, C, h, w), generator=gen).permute(1, 2, 0, 3, 4).to(tokens.device)
        out = torch.empty_like(noise)
        Tc = cfg.latent_frames
        for start, new in self.chunks(T):
            end = min(start + Tc, T)
            prefix_len = new - start
            prefix = out[:, :, start:new] if prefix_len else None
            k = keep[:, start:end] if keep.dim() == 2 else keep
            x = self._sample_chunk(codes[:, start:end], k, noise[:, :, start:end], prefix, prefix_len, steps,
                                   guidance, scale, solver, shift, apg_momentum, progress)
            out[:, :, new:end] = x[:, :, prefix_len:]
        return out

    @torch.no_grad()
    def detokenize(self, tokens: torch.Tensor, keep: KeepArg = None, steps: int = 25, guidance: str = "apg",
                   scale: float = 1.5, solver: str = "euler", seed: int = 0, shift: float = 1.0,
                   apg_momentum: float = 0.0, progress: bool = False) -> torch.Tensor:
        """tokens int [B, T', K] -> video float32 [B, 3, T, H, W] (clamped to [-1, 1]).

        keep: None (all), an int or an int tensor [B] in [0, R]: use only the first keep
        tokens of every latent frame; or [B, T'] for a number per latent frame (e.g. from
        ``vft.adaptive.search_keep`` or the router). guidance "none" | "cfg" | "apg" with ``scale``;
        solver "euler" | "heun"; the same seed gives the same output."""
        lat = self.detokenize_latents(tokens, keep, steps, guidance, scale, solver, seed, shift, apg_momentum,
                                      progress)
        return self.compressor.decode(lat).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, keep: KeepArg = None, **kwargs) -> torch.Tensor:
        """tokenize then detokenize (kwargs as :meth:`detokenize`)."""
        return self.detokenize(self.tokenize(video), keep, **kwargs)

    # Parameter counts ----------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters of encoder, decoder and total, with and without the adaLN modulation."""
        def count(m):
            return sum(p.numel() for p in m.parameters())

        adaln = sum(count(b.modulation) for b in self.decoder.blocks) + count(self.decoder.final_modulation)
        enc, dec = count(self.encoder), count(self.decoder)
        return {"encoder": enc, "decoder": dec, "decoder_adaln": adaln, "total": enc + dec,
                "total_excluding_adaln": enc + dec - adaln}
