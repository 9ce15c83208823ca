"""Reconstruction metrics: PSNR, SSIM (scikit-image), confidence intervals, codebook usage."""
import math

import pytest
import torch

from vft.metrics import codebook_usage, mean_ci, psnr, ssim


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.rand((3, 4, 16, 16), generator=g) * 2 - 1
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    b = (a + 0.1).clamp(-1, 1)
    mse = float(((a - b) / 2).square().mean())
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / mse))
    noisy = (a + 0.5 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    assert ssim(a, noisy) < ssim(a, b) < 1  # more damage, lower SSIM
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:, :2])
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        ssim(a[None], a[None])


def test_mean_ci_and_usage():
    m, h = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == pytest.approx(2.5)
    assert h == pytest.approx(3.182446 * 1.290994 / 2, rel=1e-5)  # t(0.975, 3) * std / sqrt(4)
    u = codebook_usage(torch.tensor([[0, 0, 1, 2]]), 10)
    assert u["distinct"] == 3 and u["tokens"] == 4 and u["used_fraction"] == pytest.approx(0.3)
    assert u["perplexity"] == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))))
