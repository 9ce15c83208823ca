"""The demo (``vft demo``, ``make demo``) and ``vft reconstruct``: tokenize a clip once,
reconstruct it from the first K tokens per latent frame for several K, measure and write.

Outputs in the output folder:

* ``reconstruction.mp4``: the original and every K side by side (left to right);
* ``grid.png``: rows = the original and each K, columns = frames;
* ``quality.png``: PSNR and SSIM against K;
* ``frames.safetensors``: the exact uint8 frames [T, H, W, 3] of the original ("original")
  and of each reconstruction ("k<K>") that the metrics were computed on;
* ``tokens.safetensors``: the tokens (``vft detokenize`` reads them);
* ``summary.json`` and ``summary.md``: metrics per K, codebook usage, timings.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch
from tqdm.auto import tqdm

import vft_kernels as vk

from .data import from_model_range, to_model_range, write_video
from .metrics import codebook_usage, psnr, ssim
from .tokenfile import save_tokens

OUTPUT_FILES = ("reconstruction.mp4", "grid.png", "quality.png", "frames.safetensors", "tokens.safetensors",
                "summary.json", "summary.md")


def write_grid_png(path: str, rows: list[tuple[str, torch.Tensor]], max_frames: int = 16) -> None:
    """PNG grid: one row per (label, video [3, T, H, W] in [-1, 1]), one column per frame."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = min(rows[0][1].shape[1], max_frames)
    fig, axes = plt.subplots(len(rows), T, figsize=(1.1 * T + 1, 1.15 * len(rows)), squeeze=False)
    for r, (label, video) in enumerate(rows):
        frames = from_model_range(video)
        for c in range(T):
            ax = axes[r][c]
            ax.imshow(frames[c].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title(f"frame {c}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_quality_png(path: str, ks: list[int], psnr_db: list[float], ssim_values: list[float], title: str,
                      psnr_ci: Optional[list[float]] = None, ssim_ci: Optional[list[float]] = None) -> None:
    """PSNR and SSIM against K (log2 axis), with optional 95 % CI error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    for a, values, ci, label in ((ax[0], psnr_db, psnr_ci, "PSNR (dB)"), (ax[1], ssim_values, ssim_ci, "SSIM")):
        a.errorbar(ks, values, yerr=ci, marker="o", capsize=3)
        a.set_xscale("log", base=2)
        a.set_xticks(ks, [str(k) for k in ks])
        a.set_xlabel("tokens per latent frame (K)")
        a.set_ylabel(label)
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _time_roundtrip(model, video, keep, sampling, backend: Optional[str]) -> float:
    with vk.use_backend(backend):
        t0 = time.perf_counter()
        model.detokenize(model.tokenize(video), keep=keep, **sampling)
        return time.perf_counter() - t0


def reconstruct_report(model, video: torch.Tensor, keeps: list[int], out: str, fps: float, sampling: dict,
                       compare_reference: bool = True, progress: bool = True, source: str = "") -> dict:
    """Tokenize ``video`` [1, 3, T, H, W] once, reconstruct from the first K tokens for each
    K in ``keeps``, write the files listed in the module docstring to ``out`` and return the
    summary. Metrics are computed on the uint8 frames that are written. With
    ``compare_reference``, one tokenize + detokenize at the largest K is also timed on the
    automatically selected backend and on ``reference``."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    cfg = model.cfg
    t0 = time.perf_counter()
    tokens = model.tokenize(video)
    t_tok = time.perf_counter() - t0
    original = from_model_range(video[0])
    frames, rows, per_k, recons = {"original": original}, [("original", video[0])], {}, []
    for k in tqdm(keeps, desc="reconstruct", disable=not progress):
        t0 = time.perf_counter()
        rec = from_model_range(model.detokenize(tokens, keep=k, **sampling)[0])
        seconds = time.perf_counter() - t0
        frames[f"k{k}"] = rec
        a, b = to_model_range(rec), to_model_range(original)
        per_k[k] = {"psnr_db": psnr(a, b), "ssim": ssim(a, b), "detokenize_s": seconds}
        rows.append((f"K={k}", a))
        recons.append(a)
    write_video(os.path.join(out, "reconstruction.mp4"),
                from_model_range(torch.cat([to_model_range(original)] + recons, dim=3)), fps)
    write_grid_png(os.path.join(out, "grid.png"), rows)
    write_quality_png(os.path.join(out, "quality.png"), list(per_k), [r["psnr_db"] for r in per_k.values()],
                      [r["ssim"] for r in per_k.values()],
                      f"{source or 'clip'}: {cfg.name}, {sampling.get('steps')} steps, {sampling.get('guidance')}")
    save_file({k: v.contiguous() for k, v in frames.items()}, os.path.join(out, "frames.safetensors"))
    save_tokens(os.path.join(out, "tokens.safetensors"), tokens, cfg, fps)
    summary = {
        "model": cfg.name, "source": source, "video_shape": list(video.shape), "fps": fps,
        "tokens_shape": list(tokens.shape), "sampling": sampling,
        "usage": codebook_usage(tokens, cfg.codebook_size), "tokenize_s": t_tok,
        "per_k": {str(k): v for k, v in per_k.items()},
    }
    if compare_reference:
        k = max(keeps)
        fast = _time_roundtrip(model, video, k, sampling, None)
        ref = _time_roundtrip(model, video, k, sampling, "reference")
        summary["timing"] = {"keep": k, "backend": _backend_name(video.device), "seconds": fast,
                             "reference_seconds": ref, "speedup": ref / fast}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_markdown(summary))
    return summary


def _backend_name(device: torch.device) -> str:
    names = vk.available_backends().get("attention_forward", {}).get(device.type, [])
    return names[0] if names else "reference"


def summary_markdown(s: dict) -> str:
    lines = [f"# vft demo: {s['model']} on {s['source'] or 'a clip'}", "",
             f"video {s['video_shape']} -> tokens {s['tokens_shape']} (B, latent frames, tokens per frame); "
             f"{s['sampling']['steps']} sampling steps, guidance {s['sampling']['guidance']} "
             f"{s['sampling']['scale']}", "",
             "| K (tokens per latent frame) | tokens in clip | PSNR (dB) | SSIM | detokenize (s) |",
             "| --- | --- | --- | --- | --- |"]
    frames = s["tokens_shape"][1]
    for k, r in s["per_k"].items():
        lines.append(f"| {k} | {int(k) * frames} | {r['psnr_db']:.2f} | {r['ssim']:.3f} | {r['detokenize_s']:.2f} |")
    u = s["usage"]
    lines += ["", f"Codebook usage: {u['distinct']} distinct tokens of {u['tokens']} (perplexity "
              f"{u['perplexity']:.1f}). Tokenize: {s['tokenize_s']:.3f} s."]
    if "timing" in s:
        t = s["timing"]
        lines.append(f"Tokenize + detokenize at K={t['keep']}: {t['seconds']:.2f} s on `{t['backend']}`, "
                     f"{t['reference_seconds']:.2f} s on `reference` ({t['speedup']:.2f}x).")
    return "\n".join(lines) + "\n"


def print_summary(s: dict, out: str) -> None:
    print(f"{'K':>4} {'PSNR dB':>8} {'SSIM':>6} {'detok s':>8}")
    for k, r in s["per_k"].items():
        print(f"{k:>4} {r['psnr_db']:>8.2f} {r['ssim']:>6.3f} {r['detokenize_s']:>8.2f}")
    u = s["usage"]
    print(f"codebook usage: {u['distinct']} distinct tokens of {u['tokens']} (perplexity {u['perplexity']:.1f})")
    if "timing" in s:
        t = s["timing"]
        print(f"tokenize + detokenize (K={t['keep']}): {t['seconds']:.2f} s on {t['backend']} vs "
              f"{t['reference_seconds']:.2f} s on reference ({t['speedup']:.2f}x)")
    print("wrote " + ", ".join(os.path.join(out, f) for f in OUTPUT_FILES))
