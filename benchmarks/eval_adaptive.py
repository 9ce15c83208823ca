"""Adaptive token budgets against the best fixed K: ``python -m benchmarks.eval_adaptive``.

Held-out clips of mixed complexity, made from the synthetic generator without new knobs:

* ``static``: the first frame of a clip, repeated;
* ``slow``: a clip as generated (calm background);
* ``fast``: every third frame of a 3x longer clip (3x the motion per frame);
* ``cluttered``: the busy background (``DETAILED_WAVES``);
* ``cut``: the first half of one clip, then the second half of another.

Per content kind it also reports what each K is worth: the mean PSNR gain from K - 1 to K
tokens in every latent frame (``db_per_token``, also for the first latent frame and the later
ones), and each policy's mean saving at the kind's own fixed-K PSNRs (``by_kind`` in the
JSON; the right panel of the figure).

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

The saving is ``1 - tokens(oracle) / tokens(fixed)``. ``by_fixed_k`` in the JSON gives the
same without rounding: for every fixed K, the tokens each policy needs for that K's own mean
PSNR, linear between the policy's frontier points. Writes ``eval_adaptive.csv`` / ``.json``
/ ``.png`` into ``--out``.

With ``--router`` the learned router (``vft.router``) is a third policy: the oracle-frame
rule (argmax_K PSNR(K) - lambda K per latent frame) on the router's *predicted* curves (one
prediction per clip, no decodes), its keeps decoded, and the cheapest lambda whose decoded
mean PSNR reaches the target taken (the same equal-mean-PSNR rule as the oracles; columns
``router_*``). Also reported: the
router's time per clip against one decode.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Optional

import torch
from tqdm.auto import tqdm

from vft import checkpoint as ckpt
from vft.adaptive import KINDS, REAL_KINDS, mixed_clips  # noqa: F401 (mixed_clips is re-exported for callers)
from vft.metrics import psnr
from vft.pretrained import load_pretrained

# 0, 40 values log-spaced over 0.01 .. 5 dB per token, and "one token per frame"
LAMBDAS = (0.0,) + tuple(0.01 * 500 ** (i / 39) for i in range(40)) + (1e9,)


def decode(model, tokens, keep, sampling, batch: int, memo: Optional[dict] = None) -> torch.Tensor:
    """``model.detokenize`` of ``tokens`` [n, T', R] with ``keep`` (an int or [n, T']),
    ``batch`` clips per call (the sampler's noise depends on the batch; larger batches run
    faster on a CPU). ``memo`` keeps results by keep (lambdas often repeat one; decoding is
    deterministic)."""
    key = None
    if memo is not None and not isinstance(keep, int):
        key = keep.cpu().numpy().tobytes()
        if key in memo:
            return memo[key]
    out = []
    for i in range(0, len(tokens), batch):
        k = keep if isinstance(keep, int) else keep[i:i + batch]
        out.append(model.detokenize(tokens[i:i + batch], keep=k, **sampling))
    out = torch.cat(out)
    if key is not None:
        memo[key] = out
    return out


def router_frontier(model, router, clips, tokens, sampling, lambdas=LAMBDAS, batch: int = 1) -> tuple[list, float]:
    """(per-clip points (tokens per latent frame [n], decoded PSNR [n], lambda), seconds of
    one router call per clip): each latent frame takes argmax_K predicted PSNR(K) - lambda K
    on the router's predicted curves (the oracle-frame rule without its R decodes per clip),
    for each lambda of LAMBDAS; the keeps are then decoded and measured."""
    import time

    t0 = time.perf_counter()
    pred = router.predict(model, clips, tokens)  # [n, T, R], one pass
    per_clip = (time.perf_counter() - t0) / len(clips)
    points, memo = [], {}
    for lam in lambdas:
        keep = router.keep_for_lambda(model, clips, lam, pred=pred)
        rec = decode(model, tokens, keep, sampling, batch, memo)
        got = [psnr(rec[i], clips[i]) for i in range(len(clips))]
        points.append((keep.double().mean(1), torch.tensor(got, dtype=torch.float64), lam))
    return points, per_clip, pred


def lambda_grid(n: int) -> tuple:
    """0, ``n - 2`` values log-spaced over 0.01 .. 5 dB per token, and 1e9 (LAMBDAS for n = 42)."""
    if n < 3:
        raise ValueError(f"need at least 3 lambdas, got {n}")
    return (0.0,) + tuple(0.01 * 500 ** (i / (n - 3)) for i in range(n - 2)) + (1e9,)


def mean_points(clip_points, idx) -> list:
    """Frontier points (mean tokens, mean PSNR, lambda) over the clips ``idx`` of per-clip points."""
    return [(float(tok[idx].mean()), float(q[idx].mean()), lam) for tok, q, lam in clip_points]


def token_worth(frame_q: torch.Tensor) -> dict:
    """What the K-th token of a latent frame adds, from frame PSNRs [n, R, T'] decoded with
    every frame at K: mean dB gain from K - 1 to K (K = 2..R) over all frames, over the
    first latent frame and over the later ones (which the block-causal decoder can predict
    in part from earlier frames)."""
    gain = frame_q[:, 1:] - frame_q[:, :-1]  # [n, R - 1, T']
    out = {"db_per_token": gain.mean((0, 2)).tolist(), "db_per_token_first_frame": gain[:, :, 0].mean(0).tolist()}
    if gain.shape[2] > 1:
        out["db_per_token_later_frames"] = gain[:, :, 1:].mean((0, 2)).tolist()
    return out


def mean_inner_saving(rows: list, name: str, registers: int) -> float:
    """Mean saving of policy ``name`` at the fixed Ks' own PSNRs, K = 2 .. R - 1 (NaN rows skipped)."""
    vals = [r[f"{name}_saving"] for r in rows if 1 < r["fixed_k"] < registers and r[f"{name}_saving"] == r[f"{name}_saving"]]
    return sum(vals) / len(vals) if vals else float("nan")


def pareto(points) -> tuple[list, list]:
    """(tokens, psnr) of the points no other point beats with fewer or equal tokens, by tokens."""
    toks, best, top = [], [], -float("inf")
    for t, q, *_ in sorted(points):
        if q > top:
            toks.append(t)
            best.append(q)
            top = q
    return toks, best


def tokens_at(points, target: float) -> float:
    """Mean tokens a policy needs for mean PSNR ``target``, linear between its frontier points
    (reachable by giving part of the clips one lambda and the rest the next); NaN if none reaches it."""
    toks, qs = pareto(points)
    if not qs or target > qs[-1]:
        return float("nan")
    if target <= qs[0]:
        return toks[0]
    j = next(i for i in range(1, len(qs)) if qs[i] >= target)
    w = (target - qs[j - 1]) / (qs[j] - qs[j - 1])
    return toks[j - 1] + w * (toks[j] - toks[j - 1])


def savings_at_fixed_k(mean_by_k: list, frontier: dict) -> list:
    """For every fixed K: its mean PSNR as the target, and each adaptive policy's tokens (on
    its interpolated frontier) and saving 1 - tokens / K at that PSNR. Unlike the table at
    round targets, no policy is rounded up to an integer K."""
    rows = []
    for k, q in enumerate(mean_by_k, start=1):
        row = {"fixed_k": k, "psnr": q}
        for name, points in frontier.items():
            need = tokens_at(points, q)
            row[f"{name}_tokens"], row[f"{name}_saving"] = need, 1 - need / k
        rows.append(row)
    return rows


# -- offline scoring on labels (no decoding) --------------------------------------------------
OFFLINE_LAMBDAS = (0.0,) + tuple(0.005 * 2000 ** (i / 199) for i in range(200)) + (1e9,)


def clip_psnr_from_frames(frame_psnr: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Clip PSNR [...] from its latent frames' PSNRs [..., T'] through their MSEs (a frame's MSE
    is 10^(-PSNR / 10) on the same peak; ``weights`` [T']: pixel frames per latent frame, equal by
    default). Exact for the clip decoded as the frames were (same keep); with the frames'
    PSNRs taken from uniform-K decodes it ignores how one frame's K changes the others'."""
    mse = torch.pow(10.0, -frame_psnr.double() / 10)
    w = torch.ones(frame_psnr.shape[-1], dtype=torch.float64) if weights is None else weights.double()
    return -10 * torch.log10((mse * w).sum(-1) / w.sum())


def offline_frontier(labels: torch.Tensor, pred: torch.Tensor, lambdas=OFFLINE_LAMBDAS,
                     weights: Optional[torch.Tensor] = None) -> list:
    """Per-clip points (tokens per latent frame [n], clip PSNR [n], lambda) of the lambda rule
    (each latent frame takes argmax_K pred(K) - lambda K) on predicted curves ``pred`` [n, T', R],
    scored on ``labels`` [n, T', R] (each frame's PSNR decoded with every frame at K) as the
    truth: a frame at K counts labels[..., K - 1], the clip its frames' mean MSE."""
    R = labels.shape[-1]
    ks = torch.arange(1, R + 1, dtype=torch.float64)
    y, p = labels.double(), pred.double()
    points = []
    for lam in lambdas:
        k = (p - lam * ks).argmax(-1)  # [n, T'], K - 1
        q = clip_psnr_from_frames(y.gather(-1, k[..., None])[..., 0], weights)
        points.append(((k + 1).double().mean(-1), q, lam))
    return points


def offline_savings(labels: torch.Tensor, preds: dict, lambdas=OFFLINE_LAMBDAS,
                    weights: Optional[torch.Tensor] = None) -> dict:
    """Savings against the best fixed K at equal mean PSNR, without decoding: ``labels`` [n, T', R]
    are the truth (uniform-K decodes), each entry of ``preds`` (name -> predicted curves
    [n, T', R]) is a policy (the lambda rule per latent frame on those curves; the labels
    themselves give the per-frame oracle), ``oracle_clip`` (a K per clip, exact on the clip
    curves) is added. As eval_adaptive's ``by_fixed_k``: for every fixed K its mean PSNR is the
    target, each policy's tokens are interpolated along its frontier; ``saving`` is the mean
    over K = 2 .. R - 1. Returns {"fixed_psnr_by_k", "saving": {name: mean}, "by_fixed_k": rows}."""
    n, T, R = labels.shape
    ks = torch.arange(1, R + 1, dtype=torch.float64)
    clip_q = clip_psnr_from_frames(labels.double().transpose(1, 2), weights)  # [n, R]
    mean_by_k = clip_q.mean(0).tolist()
    idx = list(range(n))
    frontier = {}
    clip_pts = []
    for lam in lambdas:
        kc = (clip_q - lam * ks).argmax(1)
        clip_pts.append(((kc + 1).double(), clip_q.gather(1, kc[:, None])[:, 0], lam))
    frontier["oracle_clip"] = mean_points(clip_pts, idx)
    for name, pred in preds.items():
        if pred.shape != labels.shape:
            raise ValueError(f"offline_savings: {name} has shape {tuple(pred.shape)}, labels {tuple(labels.shape)}")
        frontier[name] = mean_points(offline_frontier(labels, pred, lambdas, weights), idx)
    rows = savings_at_fixed_k(mean_by_k, frontier)
    return {"fixed_psnr_by_k": mean_by_k, "saving": {name: mean_inner_saving(rows, name, R) for name in frontier},
            "by_fixed_k": rows}


def measure_curves(model, clips, tokens, sampling, batch: int = 1, progress: bool = True):
    """(clip PSNR [n, R], latent-frame PSNR [n, R, T']) of ``clips`` decoded with every frame at K."""
    from vft.adaptive import pixel_frames

    R, T = model.cfg.registers, tokens.shape[1]
    clip_q = torch.zeros(len(clips), R, dtype=torch.float64)  # [n, K - 1]
    frame_q = torch.zeros(len(clips), R, T, dtype=torch.float64)
    for k in tqdm(range(1, R + 1), desc="quality by K", disable=not progress):
        recs = decode(model, tokens, k, sampling, batch)
        for i in range(len(clips)):
            rec = recs[i]
            clip_q[i, k - 1] = psnr(rec, clips[i])
            for t in range(T):
                f = list(pixel_frames(model.cfg, t))
                frame_q[i, k - 1, t] = psnr(rec[:, f], clips[i][:, f])
    return clip_q, frame_q


def other_seed(model, clips, tokens, sampling, seed: int, clip_q, frame_q, pred=None, lambdas=LAMBDAS,
               batch: int = 1, progress: bool = True) -> dict:
    """Every policy chooses as on the seed-0 decodes (the oracles' Ks from the seed-0 curves
    ``clip_q`` [n, R] / ``frame_q`` [n, R, T'], the router's from its predictions ``pred``) and is
    scored on decodes with sampler seed ``seed``, the fixed Ks included: what the choices are
    worth when they cannot fit the sampler's noise of the decodes they are scored on."""
    R = clip_q.shape[1]
    score = {**sampling, "seed": int(seed)}
    clip_q2, _ = measure_curves(model, clips, tokens, score, batch, progress)
    ks = torch.arange(1, R + 1, dtype=torch.float64)
    points: dict = {"clip": [], "frame": []}
    if pred is not None:
        points["router"] = []
    memo: dict = {}
    for lam in lambdas:
        kc = (clip_q - lam * ks).argmax(1) + 1
        points["clip"].append((kc.double(), clip_q2.gather(1, (kc - 1)[:, None])[:, 0], lam))
        keeps = {"frame": (frame_q - lam * ks[None, :, None]).argmax(1) + 1}
        if pred is not None:
            keeps["router"] = ((pred.double() - lam * ks).argmax(-1) + 1).to(torch.int64)
        for name, kf in keeps.items():
            rec = decode(model, tokens, kf, score, batch, memo)
            got = [psnr(rec[i], clips[i]) for i in range(len(clips))]
            points[name].append((kf.double().mean(1), torch.tensor(got, dtype=torch.float64), lam))
    frontier = {name: mean_points(pts, list(range(len(clips)))) for name, pts in points.items()}
    rows = savings_at_fixed_k(clip_q2.mean(0).tolist(), frontier)
    return {"seed": int(seed), "mean_psnr_by_k": clip_q2.mean(0).tolist(), "frontier": frontier, "by_fixed_k": rows,
            "saving": {name: mean_inner_saving(rows, name, R) for name in frontier}}


def evaluate(model, clips, kinds, targets, sampling, progress=True, router=None, lambdas=LAMBDAS,
             batch: int = 1, score_seed: Optional[int] = None) -> dict:
    """The comparison (module docstring); with ``score_seed``, also ``other_seed``'s (key
    ``other_seed`` of the result)."""
    R = model.cfg.registers
    tokens = model.tokenize(clips)
    clip_q, frame_q = measure_curves(model, clips, tokens, sampling, batch, progress)
    ks = torch.arange(1, R + 1, dtype=torch.float64)
    memo: dict = {}
    clip_points = {"clip": [], "frame": []}  # per policy, per lambda: (tokens [n], PSNR [n], lambda)
    for lam in lambdas:
        kc = (clip_q - lam * ks).argmax(1) + 1  # [n]
        clip_points["clip"].append((kc.double(), clip_q.gather(1, (kc - 1)[:, None])[:, 0], lam))
        kf = (frame_q - lam * ks[None, :, None]).argmax(1) + 1  # [n, T]
        rec = decode(model, tokens, kf, sampling, batch, memo)
        got = [psnr(rec[i], clips[i]) for i in range(len(clips))]
        clip_points["frame"].append((kf.double().mean(1), torch.tensor(got, dtype=torch.float64), lam))
    timing: dict = {}
    pred = None
    if router is not None:
        import time

        clip_points["router"], timing["router_s_per_clip"], pred = router_frontier(model, router, clips, tokens,
                                                                                   sampling, lambdas, batch)
        # |predicted - decoded| PSNR per latent frame and K (decoded with every frame at K)
        err = (pred.double().transpose(1, 2) - frame_q).abs()  # [n, R, T']
        timing["router_error_db"] = {"mean": float(err.mean()), "max": float(err.max()),
                                     "p95": float(torch.quantile(err.flatten(), 0.95)),
                                     "by_kind": {kd: float(err[[i for i in range(len(kinds)) if kinds[i] == kd]].mean())
                                                 for kd in dict.fromkeys(kinds)}}
        t0 = time.perf_counter()
        for i in range(len(clips)):
            model.detokenize(tokens[i:i + 1], **sampling)
        timing["decode_s_per_clip"] = (time.perf_counter() - t0) / len(clips)
    frontier = {name: mean_points(pts, list(range(len(clips)))) for name, pts in clip_points.items()}
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
            key = "router" if name == "router" else f"oracle_{name}"
            row[f"{key}_tokens"], row[f"{key}_psnr"], row[f"{key}_lambda"] = best
            row[f"{key}_saving"] = 1 - best[0] / fixed_k if fixed_k and reach else float("nan")
        rows.append(row)
    by_fixed_k = savings_at_fixed_k(mean_by_k.tolist(), frontier)
    per_kind, by_kind = {}, {}
    for kind in (k for k in KINDS + REAL_KINDS if k in kinds):
        idx = [i for i in range(len(kinds)) if kinds[i] == kind]
        per_kind[kind] = clip_q[idx].mean(0).tolist()
        kind_frontier = {name: mean_points(pts, idx) for name, pts in clip_points.items()}
        kind_rows = savings_at_fixed_k(per_kind[kind], kind_frontier)
        by_kind[kind] = {"clips": len(idx), "psnr_by_k": per_kind[kind], **token_worth(frame_q[idx]),
                         "frontier": kind_frontier,
                         **{f"{name}_saving": mean_inner_saving(kind_rows, name, R) for name in kind_frontier}}
    extra = {}
    if score_seed is not None:
        extra["other_seed"] = other_seed(model, clips, tokens, sampling, score_seed, clip_q, frame_q, pred, lambdas,
                                         batch, progress)
    return {"rows": rows, "mean_psnr_by_k": mean_by_k.tolist(), "psnr_by_k_per_kind": per_kind, "by_kind": by_kind,
            **token_worth(frame_q), "frontier": frontier, "by_fixed_k": by_fixed_k, "clips": len(clips),
            "kinds": kinds, **timing, **extra}


def plot(result: dict, path: str) -> None:
    """One figure: left, mean PSNR against mean tokens per latent frame for fixed K, the
    oracles and the router; right, per content kind, the dB the K-th token of a latent frame
    adds (what each K is worth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, worth) = plt.subplots(1, 2, figsize=(11, 4.2))
    curve = result["mean_psnr_by_k"]
    ax.plot(range(1, len(curve) + 1), curve, "o-", label="fixed K")
    for name, marker in (("clip", "s-"), ("frame", "^-"), ("router", "x-")):
        if name not in result["frontier"]:
            continue
        toks, qs = pareto(result["frontier"][name])
        label = "router, a K per frame" if name == "router" else f"oracle, a K per {name}"
        ax.plot(toks, qs, marker, label=label + " (lambda sweep)", markersize=4)
    ax.set_xlabel("mean tokens per latent frame")
    ax.set_ylabel("mean PSNR (dB)")
    ax.set_title(f"{result['clips']} held-out clips, all kinds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for kind, info in result.get("by_kind", {}).items():
        gains = info["db_per_token"]
        label = f"{kind} (saves {info['frame_saving']:.0%} oracle" + \
            (f", {info['router_saving']:.0%} router)" if "router_saving" in info else ")")
        worth.plot(range(2, len(gains) + 2), gains, "o-", markersize=3, label=label)
    worth.axhline(0, color="grey", lw=0.8)
    worth.set_xscale("log", base=2)
    worth.set_xlabel("K: the K-th token of every latent frame")
    worth.set_ylabel("PSNR gain from K - 1 to K tokens (dB)")
    worth.set_title("what each token is worth, per content kind")
    worth.grid(alpha=0.3)
    worth.legend(fontsize=8, loc="upper right")
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
    p.add_argument("--real", action="store_true", help="also held-out photo pans and windows of the held-out "
                   "real video (kinds photo and real)")
    p.add_argument("--router", default=None, help="also evaluate a learned router: 'tiny' (shipped) or a folder; "
                   "the one for --steps / --guidance / --scale is used (an error if it has none)")
    p.add_argument("--lambdas", type=int, default=len(LAMBDAS), help="lambdas of the oracle / router sweeps "
                   "(each costs a decode per clip and policy; default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="clips per decode (faster on a CPU; the sampler's noise "
                   "depends on the batch; default: %(default)s)")
    p.add_argument("--score-seed", type=int, default=None, help="also score every policy, choosing as on the "
                   "seed-0 decodes, on decodes with this sampler seed (the fixed Ks too; key other_seed of the JSON): "
                   "whether the oracles' choices fit the sampler's noise (costs R + 2 x lambdas more decodes)")
    p.add_argument("--out", default="results/eval_adaptive")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    model = ckpt.load_model(args.checkpoint) if args.checkpoint else load_pretrained("tiny")
    model.eval()
    clips, kinds = mixed_clips(model.cfg, args.per_kind, real=args.real)
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    sampling = dict(steps=args.steps, guidance=args.guidance, scale=args.scale)
    router = None
    if args.router:
        from vft.pretrained import load_router

        router = load_router(args.router, sampling)  # the router for this decoding setting, or an error
    result = evaluate(model, clips, kinds, targets, sampling, progress=not args.no_progress, router=router,
                      lambdas=lambda_grid(args.lambdas), batch=args.batch, score_seed=args.score_seed)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval_adaptive.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "eval_adaptive.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
        w.writeheader()
        w.writerows(result["rows"])
    plot(result, os.path.join(args.out, "eval_adaptive.png"))
    print(f"{len(clips)} clips ({args.per_kind} per kind: {', '.join(dict.fromkeys(kinds))}), {args.steps} "
          f"{args.guidance} steps")
    head = f"{'target':>7} {'fixed K':>8} {'its PSNR':>9} {'oracle/clip':>12} {'saving':>7} {'oracle/frame':>13} {'saving':>7}"
    print(head + (f" {'router':>7} {'saving':>7}" if router is not None else ""))
    for r in result["rows"]:
        line = (f"{r['target_psnr']:7.2f} {str(r['fixed_k']):>8} {r['fixed_psnr']:9.2f} {r['oracle_clip_tokens']:12.2f} "
                f"{r['oracle_clip_saving']:7.1%} {r['oracle_frame_tokens']:13.2f} {r['oracle_frame_saving']:7.1%}")
        if router is not None:
            line += f" {r['router_tokens']:7.2f} {r['router_saving']:7.1%}"
        print(line)
    R = model.cfg.registers
    print("at each fixed K's own mean PSNR (K = 2 .. R - 1), mean saving on the interpolated frontiers: " + ", ".join(
        f"{name} {mean_inner_saving(result['by_fixed_k'], name, R):.1%}" for name in result["frontier"]))
    spans = [(2, 2), (3, 4), (5, 8), (9, 16), (17, 64), (65, R)]
    spans = [(a, min(b, R)) for a, b in spans if a <= R]
    names = list(result["frontier"])
    print(f"per kind: PSNR at K = 1 and R, mean dB per added token (all frames | first | later frames) for K in "
          + ", ".join(f"{a}-{b}" if a < b else f"{a}" for a, b in spans) + "; saving per policy")
    for kind, info in result["by_kind"].items():
        def span_mean(gains):
            return " ".join(f"{sum(gains[a - 2:b - 1]) / (b - a + 1):5.2f}" for a, b in spans)
        later = info.get("db_per_token_later_frames", info["db_per_token"])
        print(f"  {kind:>9}: {info['psnr_by_k'][0]:5.2f} -> {info['psnr_by_k'][-1]:5.2f} dB | "
              f"{span_mean(info['db_per_token'])} | {span_mean(info['db_per_token_first_frame'])} | "
              f"{span_mean(later)} | " + ", ".join(f"{n} {info[f'{n}_saving']:.1%}" for n in names))
    if "other_seed" in result:
        o = result["other_seed"]
        print(f"choices as on seed 0, every policy scored on decodes with seed {o['seed']}: mean saving (K = 2 .. R - 1) "
              + ", ".join(f"{name} {v:.1%}" for name, v in o["saving"].items()))
    if router is not None:
        print(f"router: {result['router_s_per_clip'] * 1e3:.1f} ms per clip vs one decode "
              f"{result['decode_s_per_clip'] * 1e3:.1f} ms")
        e = result["router_error_db"]
        print(f"router |predicted - decoded| PSNR per latent frame and K: mean {e['mean']:.2f} dB, 95th percentile "
              f"{e['p95']:.2f} dB, max {e['max']:.2f} dB; mean by kind: "
              + ", ".join(f"{k} {v:.2f}" for k, v in e["by_kind"].items()))
    print(f"-> {args.out}/eval_adaptive.csv, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
