"""Adaptive token budgets against the best fixed K: ``python -m benchmarks.eval_adaptive``.

Held-out clips of mixed complexity, made from the synthetic generator without new knobs:

* ``static``: the first frame of a clip, repeated;
* ``slow``: a clip as generated (calm background);
* ``fast``: every third frame of a 3x longer clip (3x the motion per frame);
* ``cluttered``: the busy background (``DETAILED_WAVES``);
* ``cut``: the first half of one clip, then the second half of another.

For each clip the quality at every K in 1..R is measured once (one tokenization; the
clip's PSNR and each latent frame's PSNR). Policies are compared at equal mean PSNR over
the clips, by the mean tokens per latent frame they spend:

* ``fixed``: one K for every clip: the smallest K whose mean PSNR reaches the target;
* ``oracle-clip``: a K per clip, the allocation that minimises the mean tokens at that mean
  PSNR: for a sweep of lambda each clip takes argmax_K PSNR(K) - lambda K (the trade-off
  form of ``vft.adaptive.search_keep``, exact on the measured curves), and the cheapest
  lambda whose mean PSNR reaches the target is taken;
* ``oracle-frame``: the same per latent frame, on each frame's PSNR measured with every
  frame at that K; the chosen per-frame keeps are then decoded and the *decoded* PSNR is
  what counts (a frame's quality also depends on earlier frames' tokens, so the curves are
  only the guide).

The saving is ``1 - tokens(oracle) / tokens(fixed)``. Writes ``eval_adaptive.csv`` / ``.json``
/ ``.png`` into ``--out``. The learned router of issue #13 is not built yet, so it has no row.
"""
from __future__ import annotations

import argparse
import csv
import json
import os

import torch
from tqdm.auto import tqdm

from vft import checkpoint as ckpt
from vft.data import DETAILED_WAVES, synthetic_video, to_model_range
from vft.data import HELDOUT_SEED
from vft.metrics import psnr
from vft.pretrained import load_pretrained

KINDS = ("static", "slow", "fast", "cluttered", "cut")


def mixed_clips(cfg, per_kind: int, seed: int = HELDOUT_SEED + 50_000) -> tuple[torch.Tensor, list[str]]:
    """``per_kind`` held-out clips of each kind in KINDS: ([n, 3, T, H, W] in [-1, 1], kinds)."""
    T, H, W = cfg.frames, cfg.height, cfg.width
    clips, kinds = [], []
    for i in range(per_kind):
        s = seed + 10 * i
        base = synthetic_video(s, T, H, W)
        clips += [base[:1].expand(T, H, W, 3), base, synthetic_video(s + 1, 3 * T, H, W)[::3],
                  synthetic_video(s + 2, T, H, W, wave_cycles=DETAILED_WAVES),
                  torch.cat([base[:T // 2], synthetic_video(s + 3, T, H, W)[T // 2:]])]
        kinds += list(KINDS)
    return torch.stack([to_model_range(c.contiguous()) for c in clips]), kinds


LAMBDAS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 1e9)


def evaluate(model, clips, kinds, targets, sampling, progress=True) -> dict:
    from vft.adaptive import pixel_frames

    cfg, R = model.cfg, model.cfg.registers
    tokens = model.tokenize(clips)
    T = tokens.shape[1]
    clip_q = torch.zeros(len(clips), R, dtype=torch.float64)  # [n, K - 1]
    frame_q = torch.zeros(len(clips), R, T, dtype=torch.float64)
    for i in tqdm(range(len(clips)), desc="quality by K", disable=not progress):
        for k in range(1, R + 1):
            rec = model.detokenize(tokens[i:i + 1], keep=k, **sampling)[0]
            clip_q[i, k - 1] = psnr(rec, clips[i])
            for t in range(T):
                f = list(pixel_frames(cfg, t))
                frame_q[i, k - 1, t] = psnr(rec[:, f], clips[i][:, f])
    ks = torch.arange(1, R + 1, dtype=torch.float64)
    frontier = {"clip": [], "frame": []}
    for lam in LAMBDAS:
        kc = (clip_q - lam * ks).argmax(1) + 1  # [n]
        frontier["clip"].append((float(kc.double().mean()), float(clip_q.gather(1, (kc - 1)[:, None]).mean()), lam))
        kf = (frame_q - lam * ks[None, :, None]).argmax(1) + 1  # [n, T]
        got = [psnr(model.detokenize(tokens[i:i + 1], keep=kf[i:i + 1], **sampling)[0], clips[i])
               for i in range(len(clips))]
        frontier["frame"].append((float(kf.double().mean()), sum(got) / len(got), lam))
    mean_by_k = clip_q.mean(0)
    rows = []
    for target in targets:
        ok = (mean_by_k >= target).nonzero()
        fixed_k = int(ok[0]) + 1 if len(ok) else None
        row = {"target_psnr": target, "fixed_k": fixed_k,
               "fixed_psnr": float(mean_by_k[fixed_k - 1]) if fixed_k else float("nan")}
        for name, points in frontier.items():
            reach = [p for p in points if p[1] >= target]
            best = min(reach) if reach else (float("nan"), float("nan"), float("nan"))
            row[f"oracle_{name}_tokens"], row[f"oracle_{name}_psnr"], row[f"oracle_{name}_lambda"] = best
            row[f"oracle_{name}_saving"] = 1 - best[0] / fixed_k if fixed_k and reach else float("nan")
        rows.append(row)
    per_kind = {k: clip_q[[i for i in range(len(kinds)) if kinds[i] == k]].mean(0).tolist() for k in KINDS if k in kinds}
    return {"rows": rows, "mean_psnr_by_k": mean_by_k.tolist(), "psnr_by_k_per_kind": per_kind,
            "frontier": frontier, "clips": len(clips), "kinds": kinds}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curve = result["mean_psnr_by_k"]
    ax.plot(range(1, len(curve) + 1), curve, "o-", label="fixed K (mean PSNR)")
    for name, marker in (("clip", "s-"), ("frame", "^-")):
        pts = sorted(result["frontier"][name])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=f"oracle, a K per {name} (lambda sweep)")
    ax.set_xlabel("mean tokens per latent frame")
    ax.set_ylabel("mean PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a vft checkpoint folder (default: the shipped tiny model)")
    p.add_argument("--per-kind", type=int, default=6, help="clips of each kind")
    p.add_argument("--targets", default="14,15,16,17", help="comma-separated target PSNRs (dB)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", choices=["none", "cfg", "apg"], default="apg")
    p.add_argument("--scale", type=float, default=1.5)
    p.add_argument("--out", default="results/eval_adaptive")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    model = ckpt.load_model(args.checkpoint) if args.checkpoint else load_pretrained("tiny")
    model.eval()
    clips, kinds = mixed_clips(model.cfg, args.per_kind)
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    sampling = dict(steps=args.steps, guidance=args.guidance, scale=args.scale)
    result = evaluate(model, clips, kinds, targets, sampling, progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval_adaptive.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "eval_adaptive.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
        w.writeheader()
        w.writerows(result["rows"])
    plot(result, os.path.join(args.out, "eval_adaptive.png"))
    print(f"{len(clips)} clips ({args.per_kind} per kind: {', '.join(KINDS)}), {args.steps} {args.guidance} steps")
    print(f"{'target':>7} {'fixed K':>8} {'its PSNR':>9} {'oracle/clip':>12} {'saving':>7} {'oracle/frame':>13} {'saving':>7}")
    for r in result["rows"]:
        print(f"{r['target_psnr']:7.2f} {str(r['fixed_k']):>8} {r['fixed_psnr']:9.2f} {r['oracle_clip_tokens']:12.2f} "
              f"{r['oracle_clip_saving']:7.1%} {r['oracle_frame_tokens']:13.2f} {r['oracle_frame_saving']:7.1%}")
    print(f"-> {args.out}/eval_adaptive.csv, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
