"""Router variants by cross-validation over clip groups, scored without decoding:
``python -m benchmarks.router_cv``.

The labels are the cached ones of ``vft train-router`` (training seeds only; eval_adaptive's
held-out clips stay out): ``--groups`` groups of one clip of every kind, each clip's latent
frames decoded at every K with the decoding setting. The groups are split into ``--folds``
folds; each fold's clips are predicted by a router fitted on the other folds, so every clip
gets a prediction from a router that never saw its group. Per variant it prints the mean
|error| of the levels (PSNR at K) and of the increments (PSNR(K) - PSNR(K - 1), what the
lambda and budget rules turn on) and the saving against the best fixed K at equal mean
PSNR (``eval_adaptive.offline_savings``: the labels as the truth, no decoding), next to the
per-frame oracle (the labels as the curves) and a content-blind policy (every latent frame
gets the training folds' mean curve for its position in the clip), which shows how much of
a saving needs the content at all.

With ``--eval-clips N`` each variant is also fitted as ``vft train-router`` fits it (on all
but the last fifth of the groups) and scored the same way on eval_adaptive's held-out clips
(``mixed_clips(cfg, N, real=True)``, labelled here: cheap at 1 step, 50 times dearer at 25),
to compare with ``eval_adaptive``'s decoded numbers.

For a guided setting (``--steps 25``), ``--init-steps1`` starts every fold's fit from a
router of the same variant fitted on all ``--init-groups`` 1-step groups (as the shipped
25-step router starts from the 1-step one).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.eval_adaptive import offline_savings
from vft.adaptive import mixed_clips
from vft.pretrained import load_pretrained
from vft.router import collect, collect_groups, setting, train_router

# name -> train_router keywords (the shipped routers: weight decay 0.05, one MLP per frame)
VARIANTS = {
    "shipped": {"weight_decay": 0.05},
    "incr1": {"weight_decay": 0.05, "increment_weight": 1.0},
    "incr4": {"weight_decay": 0.05, "increment_weight": 4.0},
    "incr16": {"weight_decay": 0.05, "increment_weight": 16.0},
    "context": {"weight_decay": 0.05, "context": "clip_mean"},
    "context_incr4": {"weight_decay": 0.05, "context": "clip_mean", "increment_weight": 4.0},
    "ens5": {"weight_decay": 0.05, "members": 5},
    "ens5_incr4": {"weight_decay": 0.05, "members": 5, "increment_weight": 4.0},
    "ens5_context_incr4": {"weight_decay": 0.05, "members": 5, "context": "clip_mean", "increment_weight": 4.0},
    "wd0.5": {"weight_decay": 0.5},
    "h32": {"weight_decay": 0.05, "hidden": 32},
    "h128": {"weight_decay": 0.05, "hidden": 128},
    "steps1000": {"weight_decay": 0.05, "steps": 1000},
    "residual": {"weight_decay": 0.05, "head": "residual"},
    "residual_incr4": {"weight_decay": 0.05, "head": "residual", "increment_weight": 4.0},
    "residual_ens5": {"weight_decay": 0.05, "head": "residual", "members": 5},
    "residual_context": {"weight_decay": 0.05, "head": "residual", "context": "clip_mean"},
    "residual_wd0.5": {"weight_decay": 0.5, "head": "residual"},
    "residual_h16": {"weight_decay": 0.05, "head": "residual", "hidden": 16},
    "residual_s1000": {"weight_decay": 0.05, "head": "residual", "steps": 1000, "lr": 1e-3},
    "residual_h16_s1000": {"weight_decay": 0.05, "head": "residual", "hidden": 16, "steps": 1000, "lr": 1e-3},
    "residual_ens5_s1000": {"weight_decay": 0.05, "head": "residual", "members": 5, "steps": 1000, "lr": 1e-3},
    "linear": {"linear": True},  # no MLP: the linear path's PSNR curve itself (its cumulative maximum)
}


def blind_curves(labels: torch.Tensor, groups: torch.Tensor, folds: int) -> torch.Tensor:
    """Content-blind predictions [N, T', R]: each clip gets, per latent-frame position, the
    mean curve of the other folds' clips."""
    fold = groups % folds
    out = torch.empty_like(labels)
    for f in range(folds):
        out[fold == f] = labels[fold != f].mean(0)
    return out


def cross_validate(feats, labels, groups, folds: int, init=None, **kw) -> torch.Tensor:
    """Held-out predictions [N, T', R]: each fold (groups % folds) predicted by a router fitted
    on the others. ``init``: a router to start every fold's fit from."""
    if kw.get("linear"):  # no fit: the linear path's PSNR (the first R features), made non-decreasing
        return torch.cummax(feats[..., :labels.shape[-1]], dim=-1).values
    fold = groups % folds
    out = torch.empty_like(labels)
    for f in range(folds):
        router = train_router(feats[fold != f], labels[fold != f], init=init, **kw)
        with torch.no_grad():
            out[fold == f] = router(feats[fold == f])
    return out


def errors(pred: torch.Tensor, labels: torch.Tensor) -> dict:
    """Mean |error| (dB) of the levels and of the increments past K = 4 and overall."""
    d = pred.diff(dim=-1) - labels.diff(dim=-1)
    return {"level": float((pred - labels).abs().mean()), "incr": float(d.abs().mean()),
            "incr_k5+": float(d[..., 3:].abs().mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--guidance", default="none")
    p.add_argument("--scale", type=float, default=1.5)
    p.add_argument("--groups", type=int, default=20, help="cached clip groups (seeds 5000, 5010, ...)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--cache", default="runs/router_labels")
    p.add_argument("--variants", default="shipped,incr4,context,ens5", help="comma-separated names of VARIANTS")
    p.add_argument("--init-steps1", action="store_true", help="start each fit from a 1-step router of the "
                   "same variant fitted on all --init-groups 1-step groups")
    p.add_argument("--init-groups", type=int, default=20)
    p.add_argument("--init-steps", type=int, default=3000, help="optimizer steps of that 1-step fit")
    p.add_argument("--train-steps", type=int, default=None, help="optimizer steps of each fit (default: "
                   "the variant's, else 3000; 1000 with --init-steps1)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3; 1e-3 with --init-steps1)")
    p.add_argument("--eval-clips", type=int, default=0, help="also fit each variant on all but the last fifth of "
                   "the groups and score it on eval_adaptive's held-out clips, this many per kind (0: no)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    model = load_pretrained("tiny").eval()
    sampling = setting(steps=args.steps, guidance=args.guidance, scale=args.scale)
    seeds = [5000 + 10 * i for i in range(args.groups)]
    feats, labels, kinds, groups = collect_groups(model, seeds, sampling, real=True, cache=args.cache, progress=False)
    one = None
    if args.init_steps1:
        s1 = [5000 + 10 * i for i in range(args.init_groups)]
        one = collect_groups(model, s1, {"steps": 1, "guidance": "none"}, real=True, cache=args.cache,
                             progress=False)
    preds = {"oracle_frame": labels, "blind": blind_curves(labels, groups, args.folds)}
    report = {"setting": sampling, "clips": len(labels), "folds": args.folds, "variants": {}}
    held = None
    if args.eval_clips:
        clips, _ = mixed_clips(model.cfg, args.eval_clips, real=True)
        hf, hl = collect(model, clips, sampling, batch=len(clips), progress=False)
        fit = groups < args.groups - max(1, args.groups // 5)
        held = {"fit": fit, "labels": hl, "feats": hf,
                "preds": {"oracle_frame": hl, "blind": labels[fit].mean(0).expand_as(hl).clone()}}
    for name in [v for v in args.variants.split(",") if v]:
        kw = dict(VARIANTS[name])
        t0 = time.time()
        init = None
        if one is not None and not kw.get("linear"):
            init = train_router(one[0], one[1], **{**kw, "steps": args.init_steps})
            kw.pop("hidden", None)
            kw.pop("context", None)
            kw.pop("members", None)
            kw.setdefault("steps", 1000)
            kw.setdefault("lr", 1e-3)
        if args.train_steps is not None:
            kw["steps"] = args.train_steps
        if args.lr is not None:
            kw["lr"] = args.lr
        preds[name] = cross_validate(feats, labels, groups, args.folds, init=init, **kw)
        if held is not None:
            fit = held["fit"]
            if kw.get("linear"):
                held["preds"][name] = cross_validate(held["feats"], held["labels"], None, 1, **kw)
            else:
                router = train_router(feats[fit], labels[fit], init=init, **kw)
                with torch.no_grad():
                    held["preds"][name] = router(held["feats"])
        report["variants"][name] = {"kwargs": kw, **errors(preds[name], labels), "seconds": round(time.time() - t0, 1)}
    scores = offline_savings(labels, preds)
    report["saving"] = scores["saving"]
    print(f"{sampling}: {len(labels)} clips of {args.groups} groups, {args.folds}-fold; offline savings vs the best "
          f"fixed K (K = 2..R-1): oracle per clip {scores['saving']['oracle_clip']:.1%}, oracle per frame "
          f"{scores['saving']['oracle_frame']:.1%}, content-blind {scores['saving']['blind']:.1%}")
    print(f"{'variant':>22} {'saving':>7} {'|err|':>6} {'|incr err|':>10} {'K>=5':>6} {'s':>6}")
    for name, r in report["variants"].items():
        print(f"{name:>22} {scores['saving'][name]:7.1%} {r['level']:6.3f} {r['incr']:10.3f} {r['incr_k5+']:6.3f} "
              f"{r['seconds']:6.1f}", flush=True)
    if held is not None:
        hs = offline_savings(held["labels"], held["preds"])["saving"]
        report["eval_clips_saving"] = hs
        print(f"eval_adaptive's {len(held['labels'])} held-out clips, each variant fitted on groups 0..{int(held['fit'].sum()) // 7 - 1}: "
              + ", ".join(f"{k} {v:.1%}" for k, v in hs.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
