"""Reconstruction metrics for videos in [-1, 1]: PSNR, SSIM (scikit-image), confidence
intervals and codebook usage."""
from __future__ import annotations

import math

import torch


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos (any equal shapes) in [-1, 1], over all their elements."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = float(((a.double() - b.double()) / 2).square().mean())
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM over frames of two videos ``[3, T, H, W]`` in [-1, 1] (scikit-image's
    ``structural_similarity`` on each RGB frame, data range 1, default 7x7 window, shrunk
    to the frame size when smaller)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError as e:
        raise ImportError("SSIM needs scikit-image: pip install scikit-image") from e
    if a.shape != b.shape or a.dim() != 4 or a.shape[0] != 3:
        raise ValueError(f"ssim: need two videos [3, T, H, W] of equal shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    x = ((a.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy()
    y = ((b.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy()
    win = min(7, x.shape[1], x.shape[2])
    win -= 1 - win % 2  # odd
    return float(sum(structural_similarity(x[t], y[t], data_range=1.0, channel_axis=-1, win_size=win)
                     for t in range(x.shape[0])) / x.shape[0])


def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the ``level`` confidence interval of the mean, Student t)."""
    v = torch.as_tensor(list(values), dtype=torch.float64)
    if v.numel() == 0:
        raise ValueError("mean_ci: no values")
    if v.numel() == 1:
        return float(v[0]), float("nan")
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.5 + level / 2, v.numel() - 1)) * float(v.std()) / math.sqrt(v.numel())
    return float(v.mean()), half


def codebook_usage(tokens: torch.Tensor, codebook: int) -> dict:
    """Distinct tokens, perplexity (exp of the entropy of the token histogram) and the used
    fraction of a codebook of ``codebook`` codes."""
    hist = torch.bincount(tokens.reshape(-1).long().cpu(), minlength=codebook).double()
    p = hist[hist > 0] / hist.sum()
    distinct = int((hist > 0).sum())
    return {"tokens": int(hist.sum()), "distinct": distinct, "perplexity": float((-(p * p.log()).sum()).exp()),
            "used_fraction": distinct / codebook}
