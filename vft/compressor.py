"""Compressors: the latent space the tokenizer works in.

Interface (anything with these fits, e.g. a frozen video VAE wrapped by
:class:`VAECompressor`):

* ``encode(video)``: video float ``[B, 3, T, H, W]`` in [-1, 1] -> latents float
  ``[B, C, T', H', W']``;
* ``decode(latents)`` -> video ``[B, 3, T, H, W]``;
* ``latent_shape(frames, height, width) -> (C, T', H', W')`` and
  ``frames_for(latent_frames) -> T``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import CompressorConfig


def check_video(video: torch.Tensor, name: str = "video") -> None:
    """Validate a float video ``[B, 3, T, H, W]``."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, 3, T, H, W], got {type(video).__name__}")
    if video.dim() != 5:
        raise ValueError(f"{name} must have shape [B, 3, T, H, W], got {tuple(video.shape)}")
    if video.shape[1] != 3:
        raise ValueError(f"{name} must have 3 (RGB) channels in dim 1, got {video.shape[1]} "
                         f"(shape {tuple(video.shape)})")
    if not video.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float tensor in [-1, 1], got {video.dtype} "
                         "(convert uint8 frames with vft.data.to_model_range)")


class PixelCompressor(nn.Module):
    """Lossless space-time-to-depth: ``[B, 3, T, H, W]`` -> ``[B, 3*tf*sf*sf, T/tf, H/sf, W/sf]``.

    No weights; ``decode(encode(x)) == x`` exactly."""

    def __init__(self, cfg: CompressorConfig):
        super().__init__()
        if cfg.kind != "pixel":
            raise ValueError(f"PixelCompressor needs kind 'pixel', got {cfg.kind!r}")
        self.tf, self.sf = cfg.temporal_factor, cfg.spatial_factor
        self.channels = cfg.latent_channels

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        for n, v, f in (("frames", frames, self.tf), ("height", height, self.sf), ("width", width, self.sf)):
            if v % f or v == 0:
                raise ValueError(f"pixel compressor: {n} must be a positive multiple of {f}, got {v}")
        return self.channels, frames // self.tf, height // self.sf, width // self.sf

    def frames_for(self, latent_frames: int) -> int:
        return latent_frames * self.tf

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        check_video(video)
        B, C, T, H, W = video.shape
        _, t, h, w = self.latent_shape(T, H, W)
        x = video.reshape(B, C, t, self.tf, h, self.sf, w, self.sf)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B, C, tf, sf, sf, t, h, w]
        return x.reshape(B, self.channels, t, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 5 or latents.shape[1] != self.channels:
            raise ValueError(f"pixel compressor: latents must be [B, {self.channels}, T', H', W'], "
                             f"got {tuple(latents.shape)}")
        B, _, t, h, w = latents.shape
        x = latents.reshape(B, 3, self.tf, self.sf, self.sf, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # [B, 3, t, tf, h, sf, w, sf]
        return x.reshape(B, 3, t * self.tf, h * self.sf, w * self.sf)


class VAECompressor(nn.Module):
    """A frozen video VAE (e.g. VidTok KL 4x8x8, 16 channels) behind the compressor interface.

    ``vae`` is any module whose ``encode(video) -> latents`` and ``decode(latents) ->
    video`` use the layouts above (wrap the VAE's own API in a small adapter if it
    differs). Latents are multiplied by ``cfg.scale`` after encoding and divided before
    decoding. The VAE is frozen (no gradients, eval mode) and is not part of the
    tokenizer's checkpoint."""

    def __init__(self, cfg: CompressorConfig, vae: Optional[nn.Module] = None):
        super().__init__()
        if cfg.kind != "vae":
            raise ValueError(f"VAECompressor needs kind 'vae', got {cfg.kind!r}")
        self.cfg = cfg
        self.channels = cfg.latent_channels
        # Kept outside the module tree so it is neither trained nor saved with the tokenizer.
        self.__dict__["vae"] = vae
        if vae is not None:
            vae.requires_grad_(False).eval()

    def _need_vae(self):
        if self.vae is None:
            raise RuntimeError("this model works in a video-VAE latent space (4x8x8, "
                               f"{self.channels} channels) and no VAE was attached: pass one with "
                               "VideoFlexTok.attach_vae(vae)")
        return self.vae

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        tf, sf = self.cfg.temporal_factor, self.cfg.spatial_factor
        if frames < 1 or (frames - 1) % tf or height % sf or width % sf:
            raise ValueError(f"VAE compressor: needs 1 + {tf}k frames and sizes divisible by {sf}, got "
                             f"{frames} frames of {height}x{width}")
        return self.channels, self.cfg.latent_frames(frames), height // sf, width // sf

    def frames_for(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.cfg.temporal_factor

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        check_video(video)
        vae = self._need_vae()
        want = (video.shape[0],) + self.latent_shape(*video.shape[2:])
        z = vae.encode(video)
        _check_vae_output("encode", z, want)
        return z * self.cfg.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._need_vae()
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[1] != self.channels:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"VAE compressor: latents must be [B, {self.channels}, T', H', W'], got {got}")
        B, _, t, h, w = latents.shape
        sf = self.cfg.spatial_factor
        video = vae.decode(latents / self.cfg.scale)
        _check_vae_output("decode", video, (B, 3, self.frames_for(t), h * sf, w * sf))
        return video


def _check_vae_output(what: str, out, want: tuple) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"VAE {what} must return a tensor of shape {want}, got {type(out).__name__} (wrap the "
                        "VAE's own API in a small adapter module)")
    if tuple(out.shape) != want:
        raise ValueError(f"VAE {what} returned {tuple(out.shape)}, expected {want}")


def build_compressor(cfg: CompressorConfig, vae: Optional[nn.Module] = None) -> nn.Module:
    if cfg.kind == "pixel":
        if vae is not None:  # it would be silently ignored
            raise ValueError("this model works in pixel space (compressor kind 'pixel'): it takes no VAE, got "
                             f"{type(vae).__name__}")
        return PixelCompressor(cfg)
    return VAECompressor(cfg, vae)
