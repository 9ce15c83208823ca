"""Adaptive token budgets (docs/adaptive.md): the fewest tokens per clip, per chunk or per latent
frame whose reconstruction reaches a quality target.

One tokenization serves every prefix length, so the search only detokenizes:

    from vft.adaptive import search_keep
    res = search_keep(model, video, target=20.0)                      # PSNR >= 20 dB, one K per clip
    res = search_keep(model, video, target=20.0, granularity="frame") # one K per latent frame
    res = search_keep(model, video, lam=0.5)                          # max PSNR - 0.5 * tokens per frame
    model.detokenize(res["tokens"], keep=res["keep"])

``choose_keep`` puts the budget modes a user asks for behind one call: a PSNR target per
frame, a token budget per clip, or a rate (mean tokens per latent frame), by decoding or
with a learned router (``vft.router``); docs/adaptive.md says what each guarantees.

Granularity "clip" gives one K per clip; "chunk" one per chunk of the model (the latent
frames each chunk produces); "frame" one per latent frame. Groups are searched in time
order: the decoder is block-causal (a frame's reconstruction depends on the tokens of that
frame and earlier ones, never later ones), so each group's K is searched with the earlier
groups' answers fixed and the later groups at R, and its quality is measured on its own
frames only.

Search: with a ``target``, bisection over K in [1, R] (quality is near-monotone in K), then
the answer is verified: it meets the target and K - 1 does not (descending further while it
does, for non-monotone steps). ``exact=True`` checks every K below the answer instead, so
it returns the smallest K that meets the target even on a non-monotone curve. With ``lam``,
every K is evaluated and the one maximising ``quality - lam * K`` is taken (per group; K
counts tokens per latent frame).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .data import DETAILED_WAVES, HELDOUT_PHOTOS, HELDOUT_SEED, HELDOUT_VIDEO, TRAIN_PHOTOS, TRAIN_VIDEOS, \
    photo_video, real_video_clip, synthetic_video, to_model_range
from .metrics import psnr, ssim

GRANULARITIES = ("clip", "chunk", "frame")
METRICS = ("psnr", "ssim")

KINDS = ("static", "slow", "fast", "cluttered", "cut")
REAL_KINDS = ("photo", "real")  # camera moves over photographs, windows of a real video


def mixed_clips(cfg, per_kind: int, seed: int = HELDOUT_SEED + 50_000,
                real: bool = False) -> tuple[torch.Tensor, list[str]]:
    """``per_kind`` clips of each kind in KINDS (and REAL_KINDS with ``real``): ([n, 3, T, H,
    W] in [-1, 1], kinds). The default seed is held out (benchmarks.eval_adaptive); seeds
    below HELDOUT_SEED make training clips (the router's labels). Kinds: ``static`` (the
    first frame repeated), ``slow`` (a clip as generated), ``fast`` (every third frame of a
    3x longer clip), ``cluttered`` (the busy background), ``cut`` (half of one clip, then half
    of another), ``photo`` (a pan / zoom over a photograph) and ``real`` (a window of a
    bundled real video): held-out photographs and ``bikes.mp4`` for held-out seeds, the
    training ones below."""
    T, H, W = cfg.frames, cfg.height, cfg.width
    heldout = seed >= HELDOUT_SEED
    clips, kinds = [], []
    for i in range(per_kind):
        s = seed + 10 * i
        base = synthetic_video(s, T, H, W)
        clips += [base[:1].expand(T, H, W, 3), base, synthetic_video(s + 1, 3 * T, H, W)[::3],
                  synthetic_video(s + 2, T, H, W, wave_cycles=DETAILED_WAVES),
                  torch.cat([base[:T // 2], synthetic_video(s + 3, T, H, W)[T // 2:]])]
        kinds += list(KINDS)
        if real:
            clips += [photo_video(s + 4, T, H, W, HELDOUT_PHOTOS if heldout else TRAIN_PHOTOS),
                      real_video_clip(s + 5, T, H, W, (HELDOUT_VIDEO,) if heldout else TRAIN_VIDEOS)]
            kinds += list(REAL_KINDS)
    return torch.stack([to_model_range(c.contiguous()) for c in clips]), kinds


def pixel_frames(cfg, latent_frame: int) -> range:
    """The video frames that latent frame ``latent_frame`` reconstructs."""
    tf = cfg.compressor.temporal_factor
    if cfg.compressor.kind == "vae":  # causal first frame: 1 + (T - 1) / tf latent frames
        return range(0, 1) if latent_frame == 0 else range(1 + tf * (latent_frame - 1), 1 + tf * latent_frame)
    return range(tf * latent_frame, tf * (latent_frame + 1))


def _groups(model, frames: int, granularity: str) -> list[list[int]]:
    if granularity == "clip":
        return [list(range(frames))]
    if granularity == "frame":
        return [[t] for t in range(frames)]
    return [list(range(new, min(start + model.cfg.latent_frames, frames))) for (start, new) in model.chunks(frames)]


def _quality_fn(metric: str) -> Callable:
    if metric == "psnr":
        return psnr
    return ssim


def _check(model, video, target, lam, metric, granularity):
    if metric not in METRICS:
        raise ValueError(f"search_keep: metric must be one of {METRICS}, got {metric!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"search_keep: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if (target is None) == (lam is None):
        raise ValueError("search_keep: give exactly one of target (a quality to reach) and lam (the trade-off "
                         f"weight), got target={target!r}, lam={lam!r}")
    for name, value in (("target", target), ("lam", lam)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"search_keep: {name} must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"search_keep: {name} must be >= 0, got {value!r}")
    if metric == "ssim" and target is not None and target > 1:
        raise ValueError(f"search_keep: an SSIM target must be <= 1, got {target}")
    _check_video(video, "search_keep")


def _check_video(video, who: str) -> None:
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"{who}: video must be a float tensor [B, 3, T, H, W] in [-1, 1], got {shape}")


@torch.no_grad()
def search_keep(model, video: torch.Tensor, target: Optional[float] = None, metric: str = "psnr",
                granularity: str = "clip", lam: Optional[float] = None, exact: bool = False,
                **sampling) -> dict:
    """The fewest tokens that reach ``target`` (or the best quality-cost trade-off for
    ``lam``) for each clip of ``video`` [B, 3, T, H, W] in [-1, 1].

    model: a VideoFlexTok (``tokenize``, ``detokenize(tokens, keep=..., **sampling)``,
    ``chunks``, ``cfg``). metric "psnr" (dB) or "ssim". granularity "clip" | "chunk" |
    "frame". sampling: keyword arguments of ``detokenize`` (steps, guidance, scale, seed...).

    Returns a dict: ``tokens`` int32 [B, T', R] (the one tokenization), ``keep`` int64
    [B, T'] (per latent frame; constant over a group), ``quality`` [B] (metric of the whole
    clip reconstructed with ``keep``), ``group_quality`` (per clip, per group), ``mean_tokens``
    [B] (tokens per latent frame, averaged over the clip) and ``evaluations`` (detokenize
    calls). A target that a group cannot reach even with all R tokens is an error that
    names the group and the best quality it reaches."""
    _check(model, video, target, lam, metric, granularity)
    measure = _quality_fn(metric)
    R = model.cfg.registers
    tokens = model.tokenize(video)
    B, T = tokens.shape[:2]
    keep = torch.full((B, T), R, dtype=torch.int64, device=tokens.device)
    group_quality, evaluations = [], 0
    for b in range(B):
        tok, clip = tokens[b:b + 1], video[b]
        k_row = keep[b:b + 1].clone()
        per_group = []
        for group in _groups(model, T, granularity):
            frames = [f for t in group for f in pixel_frames(model.cfg, t)]
            cache: dict[int, float] = {}

            def quality(k: int) -> float:
                nonlocal evaluations
                if k not in cache:
                    trial = k_row.clone()
                    trial[:, group] = k
                    rec = model.detokenize(tok, keep=trial, **sampling)[0]
                    evaluations += 1
                    cache[k] = measure(rec[:, frames], clip[:, frames])
                return cache[k]

            if lam is not None:
                best = max(range(1, R + 1), key=lambda k: (quality(k) - lam * k, -k))
            else:
                if quality(R) < target:
                    raise ValueError(f"search_keep: target {metric} {target} is unreachable for clip {b}, latent "
                                     f"frames {group[0]}..{group[-1]}: all R = {R} tokens give {quality(R):.3f}")
                lo, hi = 1, R
                while lo < hi:  # invariant: quality(hi) >= target
                    mid = (lo + hi) // 2
                    if quality(mid) >= target:
                        hi = mid
                    else:
                        lo = mid + 1
                best = hi
                if exact:
                    best = next(k for k in range(1, best + 1) if quality(k) >= target)
                else:
                    while best > 1 and quality(best - 1) >= target:  # verify: K - 1 must miss
                        best -= 1
            k_row[:, group] = best
            per_group.append(quality(best))
        keep[b] = k_row[0]
        group_quality.append(per_group)
    recs = torch.cat([model.detokenize(tokens[b:b + 1], keep=keep[b:b + 1], **sampling) for b in range(B)])
    evaluations += B
    return {"tokens": tokens, "keep": keep, "quality": torch.tensor([measure(recs[b], video[b]) for b in range(B)], dtype=torch.float64),
            "group_quality": group_quality, "mean_tokens": keep.double().mean(dim=1), "evaluations": evaluations}


@torch.no_grad()
def frame_quality_by_k(model, video: torch.Tensor, tokens: Optional[torch.Tensor] = None, **sampling) -> torch.Tensor:
    """Each latent frame's PSNR [B, T', R] (float32, capped at 60 dB) when the clip is decoded
    with every frame at K, for K = 1..R (one decode per K for the whole batch)."""
    cfg = model.cfg
    if tokens is None:
        tokens = model.tokenize(video)
    B, T = tokens.shape[:2]
    out = torch.zeros(B, T, cfg.registers)
    for k in range(1, cfg.registers + 1):
        rec = model.detokenize(tokens, keep=k, **sampling)
        for b in range(B):
            for t in range(T):
                f = list(pixel_frames(cfg, t))
                out[b, t, k - 1] = min(psnr(rec[b][:, f], video[b][:, f]), 60.0)
    return out


def allocate_budget(curves: torch.Tensor, budget: int, who: str = "allocate_budget") -> torch.Tensor:
    """Per-frame K int64 [B, T'] spending exactly min(budget, T' R) tokens per clip, at least
    one per latent frame, from PSNR curves [B, T', R] (measured or predicted): greedily gives
    the next token to the frame whose MSE (10^(-PSNR/10)) falls most, so it minimises the
    clip's MSE where the curves are convex."""
    B, T, R = curves.shape
    _check_budget(budget, T, who)
    budget = min(budget, T * R)
    mse = 10 ** (-curves.double() / 10)
    keep = torch.ones(B, T, dtype=torch.int64)
    frames = torch.arange(T)
    for b in range(B):
        for _ in range(budget - T):
            k = keep[b]
            gain = torch.where(k < R, mse[b, frames, k - 1] - mse[b, frames, k.clamp(max=R - 1)],
                               torch.full((T,), -math.inf, dtype=torch.float64))
            keep[b, int(gain.argmax())] += 1
    return keep.to(curves.device)


def _check_budget(budget, frames: int, who: str) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or not frames <= budget:
        raise ValueError(f"{who}: budget must be an int >= T' = {frames} tokens per clip (one per latent frame), "
                         f"got {budget!r}")
