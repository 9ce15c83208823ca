"""Reconstruction quality by token count: ``python -m benchmarks.eval_tokens``.

Tokenizes N held-out clips once with a tokenizer (the shipped ``tiny`` model by default),
reconstructs each from the first K tokens per latent frame for K = 1, 2, 4, ..., R, and
reports mean PSNR / SSIM per K with 95 % confidence intervals (Student t over clips),
plus codebook usage of the held-out tokens. Writes ``eval_tokens.csv``, ``eval_tokens.json``
and ``eval_tokens.png`` into ``--out``.

    python -m benchmarks.eval_tokens --clips 32                 # held-out synthetic clips
    python -m benchmarks.eval_tokens --source photo             # held-out photo pans / zooms
    python -m benchmarks.eval_tokens --source synthetic-detailed  # the busier wave background
    python -m benchmarks.eval_tokens --videos DIR               # a folder of real videos
    python -m benchmarks.eval_tokens --checkpoint ckpt/         # a trained checkpoint instead
    python -m benchmarks.eval_tokens --mixed --compare results/eval_tokens/eval_tokens.json --out other/

``--mixed`` adds a row ``mixed``: every latent frame of every clip decoded from its own K, drawn
uniformly from the same values (a fixed draw, the same for every model of that size), which
is what adaptive budgets decode. ``--compare`` prints the paired difference against another
run's JSON on the same clips (this run minus that one, per K: mean and 95 % CI over clips).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from vft import checkpoint as ckpt
from vft.data import DETAILED_WAVES, WAVE_CYCLES, MixedVideos, list_videos
from vft.demo import write_quality_png
from vft.metrics import codebook_usage, mean_ci, psnr, ssim
from vft.pretrained import load_pretrained
from vft.train import keep_values

SOURCES = {"synthetic": (1.0, 0.0, 0.0), "photo": (0.0, 1.0, 0.0), "mixed": (0.7, 0.3, 0.0),
           "synthetic-detailed": (1.0, 0.0, 0.0)}


def heldout_clips(cfg, n: int, source: str = "synthetic") -> torch.Tensor:
    """n held-out clips [n, 3, T, H, W] of the model's chunk size (seeds / photos never trained on)."""
    waves = DETAILED_WAVES if source == "synthetic-detailed" else WAVE_CYCLES
    ds = MixedVideos(cfg.frames, cfg.height, cfg.width, weights=SOURCES[source], heldout=True, wave_cycles=waves)
    return torch.stack([ds[i] for i in range(n)])


def folder_clips(cfg, folder: str, n: int) -> torch.Tensor:
    """The first chunk of up to n videos of a folder, resized / centre-cropped to the model's size."""
    from vft.cli import load_clip

    clips = []
    for path in list_videos(folder)[:n]:
        video, _ = load_clip(path, cfg)
        if video.shape[2] < cfg.frames:
            print(f"skipping {path}: {video.shape[2]} frames < {cfg.frames}", file=sys.stderr)
            continue
        clips.append(video[0, :, :cfg.frames])
    if not clips:
        raise ValueError(f"no usable videos (>= {cfg.frames} frames) under {folder}")
    return torch.stack(clips)


MIXED_SEED = 1234


def mixed_keeps(values, clips: int, frames: int) -> torch.Tensor:
    """Per-frame keeps [clips, frames], each drawn uniformly from ``values`` (fixed seed)."""
    g = torch.Generator().manual_seed(MIXED_SEED)
    vals = torch.as_tensor(list(values), dtype=torch.int64)
    return vals[torch.randint(len(vals), (clips, frames), generator=g)]


def paired_difference(res: dict, other: dict) -> dict:
    """Per K (as in both results): mean and 95 % CI half-width over clips of ``res``'s PSNR
    minus ``other``'s, clip by clip (the two runs must have scored the same clips)."""
    if res["clips"] != other["clips"] or res.get("data") != other.get("data"):
        raise ValueError(f"compare: the runs scored different clips ({res['clips']} {res.get('data')!r} vs "
                         f"{other['clips']} {other.get('data')!r})")
    out = {}
    for k, r in res["per_k"].items():
        o = other["per_k"].get(k)
        if o is not None:
            out[k] = mean_ci([a - b for a, b in zip(r["psnr_per_clip"], o["psnr_per_clip"])])
    return out


def evaluate(model, clips: torch.Tensor, keeps, steps: int = 25, guidance: str = "apg", scale: float = 1.5,
             batch: int = 8, progress: bool = True) -> dict:
    """Per-K PSNR / SSIM of every clip, their means with 95 % CIs, and held-out codebook usage.
    A K of ``"mixed"`` decodes each latent frame with its own K (``mixed_keeps`` over the
    integer Ks given)."""
    cfg = model.cfg
    tokens = torch.cat([model.tokenize(clips[i:i + batch]) for i in range(0, len(clips), batch)])
    ints = [k for k in keeps if k != "mixed"]
    mixed = mixed_keeps(ints, len(clips), tokens.shape[1]) if "mixed" in keeps else None
    per_k = {}
    bar = tqdm(total=len(keeps) * len(clips), desc="eval_tokens", disable=not progress)
    for k in keeps:
        ps, ss = [], []
        for i in range(0, len(clips), batch):
            keep = mixed[i:i + batch] if k == "mixed" else k
            rec = model.detokenize(tokens[i:i + batch], keep=keep, steps=steps, guidance=guidance, scale=scale)
            for a, b in zip(rec, clips[i:i + batch]):
                ps.append(psnr(a, b))
                ss.append(ssim(a, b))
            bar.update(len(rec))
        (pm, pci), (sm, sci) = mean_ci(ps), mean_ci(ss)
        per_k[k] = {"psnr": pm, "psnr_ci95": pci, "ssim": sm, "ssim_ci95": sci, "psnr_per_clip": ps,
                    "ssim_per_clip": ss}
    bar.close()
    return {"keeps": list(keeps), "per_k": per_k, "usage": codebook_usage(tokens, cfg.codebook_size),
            "clips": len(clips), "tokens_shape": list(tokens.shape)}


def plot(result: dict, path: str, title: str) -> None:
    ks, per_k = [k for k in result["keeps"] if k != "mixed"], result["per_k"]
    write_quality_png(path, ks, [per_k[k]["psnr"] for k in ks], [per_k[k]["ssim"] for k in ks], title,
                      [per_k[k]["psnr_ci95"] for k in ks], [per_k[k]["ssim_ci95"] for k in ks])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a vft checkpoint folder (default: the shipped tiny model)")
    p.add_argument("--clips", type=int, default=32, help="held-out clips (or at most this many videos)")
    p.add_argument("--source", choices=sorted(SOURCES), default="synthetic")
    p.add_argument("--videos", help="a folder of real videos instead of the held-out clips")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", choices=["none", "cfg", "apg"], default="apg")
    p.add_argument("--scale", type=float, default=1.5)
    p.add_argument("--out", default="results/eval_tokens")
    p.add_argument("--mixed", action="store_true", help="also score per-frame keeps drawn from the Ks (row 'mixed')")
    p.add_argument("--compare", help="another run's eval_tokens.json (same clips): print the paired difference")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    model = ckpt.load_model(args.checkpoint) if args.checkpoint else load_pretrained("tiny")
    cfg = model.cfg
    clips = folder_clips(cfg, args.videos, args.clips) if args.videos else heldout_clips(cfg, args.clips, args.source)
    keeps = keep_values(cfg.registers, "pow2").tolist() + (["mixed"] if args.mixed else [])
    t0 = time.time()
    res = evaluate(model, clips, keeps, args.steps, args.guidance, args.scale, progress=not args.no_progress)
    res.update(model=args.checkpoint or "pretrained:tiny", data=args.videos or f"held-out {args.source}",
               steps=args.steps, guidance=args.guidance, scale=args.scale, seconds=round(time.time() - t0, 1))
    os.makedirs(args.out, exist_ok=True)
    if args.compare:
        with open(args.compare) as f:
            other = json.load(f)
        res["paired_vs"] = {"run": args.compare, "model": other.get("model"),
                            "psnr_diff": {str(k): v for k, v in paired_difference(
                                {**res, "per_k": {str(k): v for k, v in res["per_k"].items()}}, other).items()}}
    with open(os.path.join(args.out, "eval_tokens.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(args.out, "eval_tokens.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k", "psnr", "psnr_ci95", "ssim", "ssim_ci95", "clips"])
        for k in keeps:
            r = res["per_k"][k]
            w.writerow([k, f"{r['psnr']:.3f}", f"{r['psnr_ci95']:.3f}", f"{r['ssim']:.4f}", f"{r['ssim_ci95']:.4f}",
                        res["clips"]])
    plot(res, os.path.join(args.out, "eval_tokens.png"),
         f"{res['model']} on {res['clips']} {res['data']} clips ({args.steps} steps, {args.guidance} {args.scale})")
    u = res["usage"]
    print(f"{res['model']}: {res['clips']} clips ({res['data']}), {args.steps} steps {args.guidance} {args.scale}")
    print(f"{'K':>4} {'PSNR dB':>16} {'SSIM':>16}")
    for k in keeps:
        r = res["per_k"][k]
        print(f"{k:>4} {r['psnr']:>8.2f} ± {r['psnr_ci95']:<5.2f} {r['ssim']:>8.3f} ± {r['ssim_ci95']:.3f}")
    print(f"codebook usage: {u['distinct']} distinct of {cfg.codebook_size} ({u['tokens']} tokens), perplexity "
          f"{u['perplexity']:.1f}; wrote {args.out}/eval_tokens.csv, .json, .png")
    if args.compare:
        print(f"paired PSNR difference, this run minus {args.compare} ({res['paired_vs']['model']}):")
        for k, (m, ci) in res["paired_vs"]["psnr_diff"].items():
            print(f"{k:>6} {m:+.2f} ± {ci:.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
