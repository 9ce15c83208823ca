"""Adaptive token budgets against the best fixed K: ``python -m benchmarks.eval_adaptive``.

Held-out clips of mixed complexity, made from the synthetic generator without new knobs:

* ``static``: the first frame of a clip, repeated;
* ``slow``: a clip as generated (calm background);
* ``fast``: every third frame of a 3x longer clip (3x the motion per frame);
* ``cluttered``: the busy background (``DETAILED_WAVES``);
* ``cut``: the first half of one clip, then the second half of another.

For each clip the quality at every K in 1..R is measured once (one tokenization). For each
target PSNR the policies are compared by the mean tokens per latent frame they spend:

* ``fixed``: the smallest single K whose mean PSNR over the clips reaches the target;
* ``oracle-clip``: per clip, the smallest K whose PSNR reaches the target (R where none does);
* ``oracle-frame``: ``vft.adaptive.search_keep(granularity="frame")`` per clip (R per frame
  for clips it cannot bring to the target).

The oracles meet the target clip by clip, so their mean PSNR is at least the fixed K's
mean target; the saving is ``1 - tokens(oracle) / tokens(fixed)``. Writes
``eval_adaptive.csv`` / ``.json`` / ``.png`` into ``--out``. The learned router of issue #13
is not built yet, so it has no row.
"""
from __future__ import annotations

import argparse
import csv
import json
import os

import torch
from tqdm.auto import tqdm

from vft import checkpoint as ckpt
from vft.adaptive import search_keep
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


def evaluate(model, clips, kinds, targets, sampling, progress=True) -> dict:
    R = model.cfg.registers
    tokens = model.tokenize(clips)
    curves = []  # [clip][K - 1] PSNR
    for i in tqdm(range(len(clips)), desc="quality by K", disable=not progress):
        curves.append([psnr(model.detokenize(tokens[i:i + 1], keep=k, **sampling)[0], clips[i])
                       for k in range(1, R + 1)])
    curves_t = torch.tensor(curves, dtype=torch.float64)  # [n, R]
    mean_by_k = curves_t.mean(0)
    rows = []
    for target in targets:
        ok = (mean_by_k >= target).nonzero()
        fixed_k = int(ok[0]) + 1 if len(ok) else None
        clip_k = []
        for c in curves:
            reach = [k for k in range(1, R + 1) if c[k - 1] >= target]
            clip_k.append(reach[0] if reach else R)
        frame_k, frame_q = [], []
        for i in range(len(clips)):
            if max(curves[i]) < target:  # unreachable for this clip: all tokens
                frame_k.append(float(R))
                frame_q.append(curves[i][R - 1])
                continue
            try:
                res = search_keep(model, clips[i:i + 1], target=target, granularity="frame", **sampling)
                frame_k.append(float(res["mean_tokens"][0]))
                frame_q.append(float(res["quality"][0]))
            except ValueError:  # a frame cannot reach it although the clip can
                frame_k.append(float(R))
                frame_q.append(curves[i][R - 1])
        row = {"target_psnr": target,
               "fixed_k": fixed_k, "fixed_psnr": float(mean_by_k[fixed_k - 1]) if fixed_k else float("nan"),
               "oracle_clip_tokens": sum(clip_k) / len(clip_k),
               "oracle_clip_psnr": sum(curves[i][k - 1] for i, k in enumerate(clip_k)) / len(clip_k),
               "oracle_frame_tokens": sum(frame_k) / len(frame_k), "oracle_frame_psnr": sum(frame_q) / len(frame_q)}
        for name in ("oracle_clip", "oracle_frame"):
            row[f"{name}_saving"] = 1 - row[f"{name}_tokens"] / fixed_k if fixed_k else float("nan")
        rows.append(row)
    per_kind = {k: [sum(curves[i][j] for i in range(len(kinds)) if kinds[i] == k) / kinds.count(k)
                    for j in range(R)] for k in KINDS if k in kinds}
    return {"rows": rows, "mean_psnr_by_k": mean_by_k.tolist(), "psnr_by_k_per_kind": per_kind,
            "clips": len(clips), "kinds": kinds}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curve = result["mean_psnr_by_k"]
    ax.plot(range(1, len(curve) + 1), curve, "o-", label="fixed K (mean PSNR)")
    rows = result["rows"]
    ax.plot([r["oracle_clip_tokens"] for r in rows], [r["oracle_clip_psnr"] for r in rows], "s-", label="oracle, per clip")
    ax.plot([r["oracle_frame_tokens"] for r in rows], [r["oracle_frame_psnr"] for r in rows], "^-",
            label="oracle, per latent frame")
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
