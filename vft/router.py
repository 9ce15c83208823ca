"""A lightweight token-budget router: predicts, in one pass, each latent frame's
PSNR at every token count K = 1..R, and picks per-frame K from it for a quality target or a
token budget, without the decodes that ``vft.adaptive.search_keep`` runs.

Features per latent frame (cheap, from one tokenization):

* with a linear-path model (``ModelConfig.linear_path``): the PSNR of the linear path's
  reconstruction from the first K codes, for every K (one small matmul per K, no decoder);
* the frame's pixel standard deviation, its mean absolute difference to the previous
  pixel frame (motion; 0 for the first) and its mean absolute spatial gradient (detail).

A small MLP maps them to R PSNRs, non-decreasing in K by construction (a base plus
cumulative softplus increments). Labels are the PSNR of each latent frame when the clip is
decoded with every frame at K (the decoder's sampling is part of what is learned: a router
is trained for one sampling setting, stored with it).

    from vft.router import KeepRouter
    router = KeepRouter.load(path)                     # or train_router(...)
    keep = router.keep_for_target(model, video, 16.0)  # [B, T'] smallest K predicted >= 16 dB + margin
    keep = router.keep_for_budget(model, video, 24)    # [B, T'] at most 24 tokens per clip
    keep = router.keep_for_lambda(model, video, 0.2)   # [B, T'] argmax PSNR(K) - 0.2 K per frame

Weights: safetensors + JSON (``save`` / ``load``). ``vft train-router`` trains one for a model.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import vft_kernels as vk

from .adaptive import allocate_budget, frame_quality_by_k, pixel_frames
from .metrics import psnr

STATS = ("std", "motion", "detail")


@torch.no_grad()
def frame_features(model, video: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Router features [B, T', F] of ``video`` [B, 3, T, H, W] (float32; F = R + 3 for a
    linear-path model, else 3)."""
    cfg = model.cfg
    if tokens is None:
        tokens = model.tokenize(video)
    B, T = tokens.shape[:2]
    feats = []
    dec = model.decoder
    if getattr(dec, "linear_out", None) is not None:
        codes = vk.fsq_indices_to_codes(tokens, cfg.fsq_levels)
        Hl, Wl = cfg.latent_hw
        lin_q = torch.zeros(B, T, cfg.registers)
        for k in range(1, cfg.registers + 1):
            lat = dec.linear_x0(codes, torch.full((B,), k, dtype=torch.int64, device=tokens.device))
            lat = lat.reshape(B, T, -1, Hl, Wl).transpose(1, 2)  # [B, C, T', H', W']
            rec = model.compressor.decode(lat.to(video.dtype)).clamp(-1, 1)
            for t in range(T):
                f = list(pixel_frames(cfg, t))
                for b in range(B):
                    lin_q[b, t, k - 1] = min(psnr(rec[b][:, f], video[b][:, f]), 60.0)
        feats.append(lin_q)
    stats = torch.zeros(B, T, len(STATS))
    v = video.float()
    for t in range(T):
        f = list(pixel_frames(cfg, t))
        clip = v[:, :, f]  # [B, 3, tf, H, W]
        prev = torch.cat([v[:, :, f[0] - 1:f[0]], clip[:, :, :-1]], dim=2) if f[0] > 0 else \
            torch.cat([clip[:, :, :1], clip[:, :, :-1]], dim=2)
        stats[:, t, 0] = clip.flatten(1).std(dim=1)
        stats[:, t, 1] = (clip - prev).abs().flatten(1).mean(dim=1)
        gx = (clip[..., 1:] - clip[..., :-1]).abs().flatten(1).mean(dim=1)
        gy = (clip[..., 1:, :] - clip[..., :-1, :]).abs().flatten(1).mean(dim=1)
        stats[:, t, 2] = gx + gy
    feats.append(stats)
    return torch.cat(feats, dim=-1)


class KeepRouter(nn.Module):
    """features [..., F] -> predicted PSNR [..., R], non-decreasing in K."""

    def __init__(self, registers: int, features: int, hidden: int = 64, sampling: Optional[dict] = None):
        super().__init__()
        self.registers, self.features, self.hidden = registers, features, hidden
        self.sampling = dict(sampling or {})
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, registers))
        self.register_buffer("feat_mean", torch.zeros(features))
        self.register_buffer("feat_std", torch.ones(features))
        self.register_buffer("margin", torch.zeros(()))  # dB added to a target (calibrated on training frames)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h = self.net((feats - self.feat_mean) / self.feat_std)
        return h[..., :1] + torch.cat([torch.zeros_like(h[..., :1]), F.softplus(h[..., 1:]).cumsum(-1)], dim=-1)

    @torch.no_grad()
    def predict(self, model, video: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predicted PSNR [B, T', R] for ``video`` (one tokenization, no decoding)."""
        if model.cfg.registers != self.registers:
            raise ValueError(f"router: trained for R = {self.registers} registers, the model has {model.cfg.registers}")
        feats = frame_features(model, video, tokens)
        if feats.shape[-1] != self.features:
            raise ValueError(f"router: expects {self.features} features per frame, this model gives {feats.shape[-1]} "
                             "(a router trained for a linear-path model needs one)")
        return self(feats)

    @torch.no_grad()
    def keep_for_target(self, model, video: torch.Tensor, target: float, tokens: Optional[torch.Tensor] = None,
                        margin: Optional[float] = None) -> torch.Tensor:
        """Per-frame K [B, T']: the smallest K whose predicted PSNR reaches target + margin
        (R where none does)."""
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target < 0:
            raise ValueError(f"router: target must be a finite PSNR >= 0 (dB), got {target!r}")
        pred = self.predict(model, video, tokens)
        m = float(self.margin) if margin is None else float(margin)
        ok = pred >= target + m
        first = torch.where(ok.any(-1), ok.float().argmax(-1), torch.full(ok.shape[:-1], self.registers - 1))
        return (first + 1).to(torch.int64)

    @torch.no_grad()
    def keep_for_lambda(self, model, video: torch.Tensor, lam: float, tokens: Optional[torch.Tensor] = None,
                        pred: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-frame K [B, T']: argmax_K predicted PSNR(K) - lam * K (the trade-off form of
        ``search_keep``, on predicted curves; ``pred`` reuses a ``predict`` result)."""
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"router: lam must be a finite number >= 0, got {lam!r}")
        if pred is None:
            pred = self.predict(model, video, tokens)
        ks = torch.arange(1, pred.shape[-1] + 1, dtype=torch.float64)
        return ((pred.double() - lam * ks).argmax(-1) + 1).to(torch.int64)

    @torch.no_grad()
    def keep_for_budget(self, model, video: torch.Tensor, budget: int,
                        tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-frame K [B, T'] spending at most ``budget`` tokens per clip (at least one per
        frame): ``vft.adaptive.allocate_budget`` on the predicted curves."""
        return allocate_budget(self.predict(model, video, tokens), budget, who="router")

    # -- persistence (safetensors + JSON) --------------------------------------------
    def config(self) -> dict:
        return {"registers": self.registers, "features": self.features, "hidden": self.hidden,
                "sampling": self.sampling, "stats": list(STATS)}

    def save(self, folder: str, extra: Optional[dict] = None) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(folder, "router.safetensors"))
        with open(os.path.join(folder, "router.json"), "w") as f:
            json.dump({**self.config(), **(extra or {})}, f, indent=2)

    @classmethod
    def load(cls, folder: str) -> "KeepRouter":
        from safetensors.torch import load_file

        json_path, weights = os.path.join(folder, "router.json"), os.path.join(folder, "router.safetensors")
        if not (os.path.exists(json_path) and os.path.exists(weights)):
            raise FileNotFoundError(f"router: no router.json + router.safetensors in {folder!r}")
        with open(json_path) as f:
            cfg = json.load(f)
        router = cls(cfg["registers"], cfg["features"], cfg["hidden"], cfg.get("sampling"))
        router.load_state_dict(load_file(weights))
        return router.eval()


def train_router(feats: torch.Tensor, quality: torch.Tensor, steps: int = 3000, lr: float = 3e-3, hidden: int = 64,
                 seed: int = 0, sampling: Optional[dict] = None, margin_quantile: float = 0.8,
                 log: Optional[list] = None) -> KeepRouter:
    """Fit a router to features [N, T', F] and labels [N, T', R] (full-batch Adam on the
    squared PSNR error). The margin is the ``margin_quantile`` of (label - prediction)
    shortfalls on these frames, so that about that fraction of frames reach a target."""
    torch.manual_seed(seed)
    x, y = feats.reshape(-1, feats.shape[-1]).float(), quality.reshape(-1, quality.shape[-1]).float()
    router = KeepRouter(y.shape[-1], x.shape[-1], hidden, sampling)
    router.feat_mean.copy_(x.mean(0))
    router.feat_std.copy_(x.std(0).clamp(min=1e-4))
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        loss = (router(x) - y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log.append({"step": step, "mse_db2": loss.item()})
    with torch.no_grad():
        shortfall = (router(x) - y).flatten()
        router.margin.fill_(float(torch.quantile(shortfall, margin_quantile)))
    return router.eval()


def collect(model, clips: torch.Tensor, sampling: dict, batch: int = 10, progress: bool = True):
    """(features [N, T', F], labels [N, T', R]) of ``clips``, in batches."""
    from tqdm.auto import tqdm

    feats, labels = [], []
    for i in tqdm(range(0, len(clips), batch), desc="router labels", disable=not progress):
        video = clips[i:i + batch]
        tokens = model.tokenize(video)
        feats.append(frame_features(model, video, tokens))
        labels.append(frame_quality_by_k(model, video, tokens, **sampling))
    return torch.cat(feats), torch.cat(labels)
