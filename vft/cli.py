"""The ``vft`` command line: tokenize, detokenize, reconstruct, train, info, demo.

    vft demo --out demo_out                      # shipped tiny model on a held-out clip, K = 1, 2, 4, 8
    vft demo --video clip.mp4 --out demo_out     # the same on any video file
    vft train --preset tiny --out ckpt --steps 2000
    vft tokenize clip.mp4 --out tokens.safetensors           # the shipped tiny model by default
    vft tokenize clip.mp4 --rate 4 --out tokens.safetensors  # + per-frame counts, 4 per latent frame on average
    vft detokenize tokens.safetensors --keep 4 --out clip_k4.mp4
    vft reconstruct clip.mp4 --checkpoint ckpt --keep 1,2,4,8 --out recon/   # a trained checkpoint folder
    vft info --preset videoflextok_k600
    vft train-router --out my_router                         # the token-budget router of a model
    vft export ckpt --out my_model --command "vft train ..."  # package a checkpoint as a model folder

Every command takes ``--backend`` (reference, cpu, triton, cuda; default: automatic).
``--checkpoint`` takes a shipped model's name (``tiny``, the default) or a folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import torch

import vft_kernels as vk
from vft_kernels import dispatch

from . import checkpoint as ckpt
from .config import KEEP_SAMPLING, PRESETS, ModelConfig, TrainConfig, parse_override, preset, tiny_train_config
from .data import HELDOUT_SEED, VideoReadError, from_model_range, read_video, resize_crop, synthetic_video, \
    to_model_range, write_video
from .demo import print_summary, reconstruct_report
from .model import VideoFlexTok
from .pretrained import PRETRAINED, load_model, pretrained_info
from .router import DEFAULT_SAMPLING
from .tokenfile import load_tokens, save_tokens
from .train import keep_values

SAMPLE_SEED = HELDOUT_SEED + 7  # the demo's held-out clip (never trained on)


def sample_clip(cfg: ModelConfig, frames: int) -> torch.Tensor:
    """The demo's held-out sample clip for ``cfg``: uint8 [frames, H, W, 3]."""
    return synthetic_video(SAMPLE_SEED, frames, cfg.height, cfg.width)


# ------------------------------------------------------------------------------------
# Helpers


def _device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_clip(path: str, cfg: ModelConfig, fps: Optional[float] = None,
              max_frames: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """Read a video file for ``cfg`` (any size, frame rate and length): scaled to cover and
    centre-cropped to its size, at most ``max_frames`` frames, cut to a frame count the
    compressor accepts. Returns (float [1, 3, T, H, W] in [-1, 1], fps)."""
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    frames, rate = read_video(path, fps)
    frames = frames[:max_frames]
    c = cfg.compressor
    usable = (frames.shape[0] // c.temporal_factor) * c.temporal_factor if c.kind == "pixel" else \
        1 + ((frames.shape[0] - 1) // c.temporal_factor) * c.temporal_factor
    if usable < 1:
        raise VideoReadError(f"video file {path} has {frames.shape[0]} frames; the model needs at least "
                             f"{c.temporal_factor}")
    frames = resize_crop(frames[:usable], cfg.height, cfg.width)
    return to_model_range(frames)[None], rate


def _parse_keeps(text: str, registers: int) -> list[int]:
    try:
        keeps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--keep must be comma-separated ints, got {text!r}") from None
    bad = [k for k in keeps if not 0 <= k <= registers]
    if not keeps or bad:
        raise ValueError(f"--keep values must be in [0, R={registers}], got {text!r}")
    return keeps


def _sampling_kwargs(args) -> dict:
    return dict(steps=args.steps, guidance=args.guidance, scale=args.scale, solver=args.solver, seed=args.seed,
                shift=args.shift)


# ------------------------------------------------------------------------------------
# Commands


def cmd_info(args) -> int:
    print(f"vft_kernels {vk.__version__}, torch {torch.__version__}")
    for op, devs in vk.available_backends().items():
        for dev, names in devs.items():
            forced = args.backend or dispatch.forced_backend()
            chosen = forced or (names[0] if names else "none")
            if forced and forced not in names:
                chosen += " (forced, cannot run here)"
            print(f"  {op:<20} {dev:<5} available: {', '.join(names) or '-':<24} runs: {chosen}")
    names = args.preset or ([] if args.checkpoint else list(PRESETS))
    cfgs = [preset(n) for n in names]
    if args.checkpoint in PRETRAINED:
        cfgs.append(ModelConfig.from_dict(pretrained_info(args.checkpoint)["model"]))
    elif args.checkpoint:
        cfgs.append(ckpt.read_config(args.checkpoint)[0])
    for cfg in cfgs:
        with torch.device("meta"):
            counts = VideoFlexTok(cfg).parameter_counts()
        print(f"{cfg.name}: {cfg.frames} frames {cfg.height}x{cfg.width} -> latent "
              f"[{cfg.compressor.latent_channels}, {cfg.latent_frames}, {cfg.latent_hw[0]}, {cfg.latent_hw[1]}], "
              f"P={cfg.patches} patches + R={cfg.registers} registers per latent frame, FSQ {cfg.fsq_levels} "
              f"({cfg.codebook_size} codes)")
        print("  params: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
    return 0


def _model_config(args) -> ModelConfig:
    cfg = preset(args.preset)
    if args.set:
        cfg = cfg.replace(**dict(parse_override(s) for s in args.set))
    return cfg


def cmd_train(args) -> int:
    from .train import train

    cfg = _model_config(args)
    base = tiny_train_config() if cfg.name in ("micro", "tiny") else TrainConfig()
    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed", "log_every", "ckpt_every",
                                              "keep_sampling", "data", "warmup_steps", "logit_normal_mean",
                                              "ema_decay", "null_prob", "prefix_prob", "uniform_t_prob", "loss_t_min",
                                              "linear_loss", "keep_frame_prob",
                                              "workers")
                 if getattr(args, k) is not None}
    if args.bf16:
        overrides["bf16"] = True
    if args.fps:
        overrides["data_fps"] = args.fps
    tcfg = TrainConfig.from_dict({**base.to_dict(), **overrides})
    if args.resume and os.path.isfile(os.path.join(args.out, "config.json")):
        ckpt.check_config(args.out, cfg)
    result = train(cfg, tcfg, args.out, resume=args.resume, progress=not args.no_progress, init_from=args.init,
                   max_seconds=args.max_seconds)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {result['step']}, loss {result['loss']:.4f}; checkpoint in {args.out}")
    return 0


def cmd_tokenize(args) -> int:
    """Tokenize; with --target-psnr, --budget or --rate also store per-latent-frame token
    counts (``vft.budget.choose_keep``), found by decoding or, with --router, predicted."""
    from .budget import choose_keep

    modes = {"--target-psnr": args.target_psnr, "--budget": args.budget, "--rate": args.rate}
    given = [n for n, v in modes.items() if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one of --target-psnr, --budget and --rate, got {' and '.join(given)}")
    for flag, value in (("--router", args.router), ("--granularity", args.granularity),
                        ("--search-steps", args.search_steps)):
        if value is not None and not given:
            raise ValueError(f"{flag} needs --target-psnr, --budget or --rate")
    if args.router and args.search_steps is not None:
        raise ValueError("--search-steps sets the decodes of a search; with --router nothing is decoded (give the "
                         "decoding setting the counts are for with --steps / --guidance / --scale)")
    if args.search_steps is not None and args.steps is not None and args.search_steps != args.steps:
        raise ValueError(f"--search-steps {args.search_steps} and --steps {args.steps} disagree (--search-steps is "
                         "the old name of --steps)")
    for flag, value in (("--steps", args.steps), ("--guidance", args.guidance), ("--scale", args.scale)):
        if value is not None and not given:
            raise ValueError(f"{flag} needs --target-psnr, --budget or --rate (it is the decoding setting the "
                             "per-frame counts are chosen for)")
    model = load_model(args.checkpoint, str(_device(args.device)))
    video, fps = load_clip(args.video, model.cfg, args.fps)
    video = video.to(_device(args.device))
    if not given:
        tokens = model.tokenize(video)
        save_tokens(args.out, tokens, model.cfg, fps)
        print(f"tokens {tuple(tokens.shape)} (B, latent frames, registers) -> {args.out}")
        return 0
    steps = args.steps if args.steps is not None else args.search_steps
    asked = {k: v for k, v in (("steps", steps), ("guidance", args.guidance), ("scale", args.scale)) if v is not None}
    # The decoding setting the counts are for: the flags over detokenize's defaults.
    decode = {**SAMPLING_DEFAULTS, **asked}
    # With --router, choose_keep picks the router trained for this setting (or says there is none).
    res = choose_keep(model, video, target_psnr=args.target_psnr, budget=args.budget, rate=args.rate,
                      router=args.router, granularity=args.granularity, **decode)
    router = res.get("router")
    tokens, keep = res["tokens"], res["keep"]
    extra = {res["mode"]: modes["--" + res["mode"].replace("_", "-")], "policy": res["policy"]}
    if router is not None:
        extra.update(router=args.router, router_sampling=json.dumps(router.setting()))
    else:
        extra.update(search_steps=decode["steps"], search_sampling=json.dumps(decode))
    if args.target_psnr is not None and router is None:
        extra.update(granularity=args.granularity or "frame", psnr=float(res["quality"][0]))
    save_tokens(args.out, tokens, model.cfg, fps, keep=keep, extra=extra)
    line = (f"tokens {tuple(tokens.shape)} (B, latent frames, registers), keep per latent frame {keep[0].tolist()} "
            f"({res['policy']}: {int(keep[0].sum())} tokens, mean {float(keep[0].double().mean()):.2f} of "
            f"{model.cfg.registers})")
    if "quality" in res:
        line += f", PSNR {float(res['quality'][0]):.2f} dB >= {args.target_psnr}"
    print(f"{line} -> {args.out}")
    if router is not None:
        print(f"note: the router predicts quality for decoding with {router.setting()}, which `vft detokenize` uses "
              "for this file unless told otherwise (other settings give other PSNRs)")
    return 0


def cmd_detokenize(args) -> int:
    device = _device(args.device)
    model = load_model(args.checkpoint, str(device))
    tokens, meta = load_tokens(args.tokens)
    if meta.get("config") and meta["config"] != model.cfg.name:
        raise ValueError(f"tokens in {args.tokens} were made by config {meta['config']!r}, the checkpoint is "
                         f"{model.cfg.name!r}")
    if args.keep is not None:
        keep = _parse_keeps(args.keep, model.cfg.registers)[0]
    else:  # the per-frame counts stored by `vft tokenize --target-psnr / --budget / --rate`, if any
        keep = meta["keep"].to(device) if "keep" in meta else None
    stored = _stored_sampling(meta)
    for k, default in SAMPLING_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, stored.get(k, default))
    if stored:
        how = f"{args.steps} step{'s' if args.steps != 1 else ''}, " + (
            "no guidance" if args.guidance == "none" else f"{args.guidance.upper()} guidance at scale {args.scale:g}")
        print(f"decoding with {how}; the token file's counts were chosen for {stored}")
    video = model.detokenize(tokens.to(device), keep=keep, **_sampling_kwargs(args))
    fps = args.fps or float(meta.get("fps", 8))
    write_video(args.out, from_model_range(video[0]), fps)
    print(f"video {tuple(video.shape)} -> {args.out}")
    return 0


def _stored_sampling(meta: dict) -> dict:
    """The decoding setting a token file's per-frame counts were chosen for: the router's
    (``router_sampling``), or that of the search / measured curves (``search_steps`` with
    tokenize's APG at scale 1.5); {} for a file without one."""
    if "router_sampling" in meta:
        return {k: v for k, v in json.loads(meta["router_sampling"]).items() if k in SAMPLING_DEFAULTS}
    if "search_sampling" in meta:
        return {k: v for k, v in json.loads(meta["search_sampling"]).items() if k in SAMPLING_DEFAULTS}
    if "search_steps" in meta:
        return {**SAMPLING_DEFAULTS, "steps": int(meta["search_steps"])}
    return {}


def cmd_reconstruct(args) -> int:
    device = _device(args.device)
    model = load_model(args.checkpoint, str(device))
    video, fps = load_clip(args.video, model.cfg, args.fps)
    keeps = _parse_keeps(args.keep, model.cfg.registers)
    summary = reconstruct_report(model, video.to(device), keeps, args.out, fps, _sampling_kwargs(args),
                                 compare_reference=False, progress=not args.no_progress, source=args.video)
    print_summary(summary, args.out)
    return 0


def cmd_export(args) -> int:
    from .pretrained import export

    folder = export(args.checkpoint, args.out, args.name, args.command, args.calibration_clips)
    print(f"packaged {args.checkpoint} as model {args.name!r} in {folder} (load it with --checkpoint {folder})")
    return 0


def cmd_train_router(args) -> int:
    """Train the token-budget router of a model (``vft.router``) for one decoding setting on
    clips of mixed content (training seeds; with --real also photo pans and windows of the
    training videos), labelled by decoding every clip at every K. The last fifth of the clip
    groups is held out: it calibrates the per-target margins and measures the errors."""
    import csv

    from .router import STATS, calibrate_margins, collect_groups, prediction_errors, setting, setting_key, \
        train_router

    if args.per_kind < 2:
        raise ValueError(f"--per-kind must be >= 2 (one group fits, one calibrates), got {args.per_kind}")
    if not 0 < args.coverage < 1:
        raise ValueError(f"--coverage must be in (0, 1), got {args.coverage}")
    device = _device(args.device)
    model = load_model(args.checkpoint, str(device))
    sampling = setting(steps=args.steps, guidance=args.guidance, scale=args.scale)
    t0 = time.time()
    seeds = [args.seed + 10 * i for i in range(args.per_kind)]
    feats, labels, kinds, groups = collect_groups(model, seeds, sampling, real=args.real, cache=args.cache,
                                                  progress=not args.no_progress, device=device)
    n_val = max(1, len(seeds) // 5) if args.val_groups is None else args.val_groups  # calibration and errors
    if not 1 <= n_val < len(seeds):
        raise ValueError(f"--val-groups must be in [1, --per-kind), got {n_val}")
    fit = groups < len(seeds) - n_val
    log: list = []
    init = None
    if args.init:
        from .router import KeepRouter

        init = KeepRouter.load(args.init)
    router = train_router(feats[fit], labels[fit], steps=args.train_steps, sampling=sampling, log=log,
                          stats=STATS, weight_decay=args.weight_decay, init=init, lr=args.lr,
                          increment_weight=args.increment_weight, context=args.context, members=args.members,
                          hidden=args.hidden, head=args.head)
    with torch.no_grad():
        pred_val, pred_fit = router(feats[~fit]), router(feats[fit])
    targets = [t / 2 for t in range(20, 49)]  # 10 .. 24 dB
    router.calibration = calibrate_margins(pred_val, labels[~fit], targets, args.coverage)
    val, train_err = prediction_errors(pred_val, labels[~fit]), prediction_errors(pred_fit, labels[fit])
    per_kind = {}
    for kind in dict.fromkeys(kinds):
        sel = torch.tensor([k == kind for k in kinds]) & ~fit
        if bool(sel.any()):
            per_kind[kind] = round(float((router(feats[sel]) - labels[sel]).abs().mean().detach()), 4)
    extra = {"command": "vft " + " ".join(args.argv), "checkpoint": args.checkpoint,
             "clips": int(fit.sum()), "validation_clips": int((~fit).sum()), "kinds": list(dict.fromkeys(kinds)),
             "train_mae_db": train_err["mean"], "val_mae_db": val["mean"], "val_error_db": val,
             "val_mae_db_by_kind": per_kind, "margin_db": float(router.margin),
             "seconds": round(time.time() - t0, 1)}
    out = os.path.join(args.out, "routers", setting_key(sampling))
    router.save(out, extra)
    with open(os.path.join(out, "router_train_log.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "mse_db2"])
        w.writeheader()
        w.writerows(log)
    print(f"router for {sampling}: {int(fit.sum())} training clips, mean |error| {train_err['mean']:.2f} dB "
          f"(held out: {val['mean']:.2f} dB mean, {val['p95']:.2f} dB 95th percentile, {val['max']:.2f} dB max, on "
          f"{int((~fit).sum())} clips); margins for {args.coverage:.0%} of frames "
          f"{router.margin_for(14):.2f} / {router.margin_for(16):.2f} / {router.margin_for(18):.2f} dB at "
          f"14 / 16 / 18 dB -> {out}")
    return 0


def cmd_demo(args) -> int:
    t_start = time.time()
    device = _device(args.device)
    model = load_model(args.checkpoint, str(device))
    name = (f"the shipped {args.checkpoint} model (vft.load_pretrained({args.checkpoint!r}))"
            if args.checkpoint in PRETRAINED else args.checkpoint)
    cfg = model.cfg
    if args.video:
        video, fps = load_clip(args.video, cfg, args.fps, max_frames=args.max_frames)
        source = os.path.basename(args.video)
    else:
        frames = cfg.frames + cfg.frames // 2  # longer than one chunk: exercises chunked processing
        video, fps = to_model_range(sample_clip(cfg, frames))[None], 8.0
        source = f"held-out sample clip (synthetic seed {SAMPLE_SEED})"
    print(f"vft demo: {name}; {source}: {video.shape[2]} frames of {cfg.height}x{cfg.width} "
          f"({cfg.frames}-frame chunks)")
    keeps = _parse_keeps(args.keep, cfg.registers) if args.keep else keep_values(cfg.registers, "pow2").tolist()
    summary = reconstruct_report(model, video.to(device), keeps, args.out, fps, _sampling_kwargs(args),
                                 compare_reference=not args.no_timing, progress=not args.no_progress, source=source)
    print_summary(summary, args.out)
    print(f"done in {time.time() - t_start:.0f} s: open {args.out}/grid.png and {args.out}/reconstruction.mp4")
    return 0


# ------------------------------------------------------------------------------------
# Parser


_CHECKPOINT_HELP = ("the model: a shipped model's name ({names}) or a folder made by `vft train` or `vft export` "
                    "(default: %(default)s; write ./NAME for a folder named like a shipped model)")


def _add_common(p):
    p.add_argument("--backend", choices=["reference", "cpu", "triton", "cuda"], default=None,
                   help="force one vft_kernels backend (default: the fastest available)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _add_checkpoint(p):
    p.add_argument("--checkpoint", default="tiny", help=_CHECKPOINT_HELP.format(names=", ".join(PRETRAINED)))


SAMPLING_DEFAULTS = dict(DEFAULT_SAMPLING)  # vft detokenize's decoding setting (VideoFlexTok.detokenize's defaults)


def _add_sampling(p, keep_default: Optional[str], keep_help: str, fps_help: str, stored: bool = False):
    """Decoding options; with ``stored`` (detokenize) --steps, --guidance and --scale default to
    the setting stored in the token file (``_stored_sampling``), else SAMPLING_DEFAULTS."""
    d = {k: None if stored else v for k, v in SAMPLING_DEFAULTS.items()}
    where = "the token file's setting, else " if stored else ""
    p.add_argument("--keep", default=keep_default, help=keep_help)
    p.add_argument("--steps", type=int, default=d["steps"],
                   help=f"flow sampling steps (default: {where}{SAMPLING_DEFAULTS['steps']})")
    p.add_argument("--guidance", choices=["none", "cfg", "apg"], default=d["guidance"],
                   help="classifier-free guidance: none, cfg, or adaptive projected guidance (default: "
                   f"{where}{SAMPLING_DEFAULTS['guidance']})")
    p.add_argument("--scale", type=float, default=d["scale"],
                   help=f"guidance scale (default: {where}{SAMPLING_DEFAULTS['scale']})")
    p.add_argument("--solver", choices=["euler", "heun"], default="euler",
                   help="ODE solver of the flow sampler (default: %(default)s)")
    p.add_argument("--shift", type=float, default=1.0, help="time-grid shift s, t' = s t / (1 + (s - 1) t) "
                   "(default: %(default)s, a uniform grid)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise (default: %(default)s)")
    p.add_argument("--fps", type=float, default=None, help=fps_help)


_TRAIN_HELP = {
    "steps": "optimizer steps", "batch-size": "clips per step (per process)", "lr": "peak learning rate",
    "seed": "seed of the weights and the data order", "log-every": "steps per log line / logging window",
    "ckpt-every": "steps between checkpoints", "warmup-steps": "linear learning-rate warm-up steps",
    "logit-normal-mean": "mean of the logit-normal distribution of the flow time t",
    "ema-decay": "decay of the weights' exponential moving average", "null-prob": "probability of training "
    "with the null condition (for classifier-free guidance)", "prefix-prob": "probability of conditioning on "
    "clean latent frames of the clip's start (video continuation)", "uniform-t-prob": "share of flow times "
    "drawn uniformly instead of logit-normal",
    "loss-t-min": "weight the velocity error by max(t, this)^2 (> 0: closer to the clean-estimate error)",
    "linear-loss": "weight of the linear path's own clean-latent loss (ModelConfig.linear_path)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vft", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="backends and parameter counts of presets / a checkpoint")
    _add_common(p)
    p.add_argument("--preset", action="append", choices=sorted(PRESETS),
                   help="show this preset (repeatable; default: every preset unless --checkpoint is given)")
    p.add_argument("--checkpoint", help=f"also show this model: a shipped name ({', '.join(PRETRAINED)}) or a folder")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("train", help="train a tokenizer (use torchrun for several processes)")
    _add_common(p)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model config (default: %(default)s)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a model config key, "
                   "e.g. encoder.depth=2 (repeatable)")
    p.add_argument("--out", required=True, help="checkpoint folder")
    p.add_argument("--data", help="'synthetic' (default), 'mixed' (synthetic + photo pans/zooms/cuts + bundled "
                   "real clips) or a folder of videos")
    p.add_argument("--fps", type=float, help="resample folder videos to this frame rate")
    p.add_argument("--workers", type=int, help="DataLoader worker processes that load clips (default 0: the main "
                   "process; the batches are the same for any number)")
    for name, typ in (("steps", int), ("batch-size", int), ("lr", float), ("seed", int), ("log-every", int),
                      ("ckpt-every", int), ("warmup-steps", int), ("logit-normal-mean", float),
                      ("ema-decay", float), ("null-prob", float), ("prefix-prob", float),
                      ("uniform-t-prob", float), ("loss-t-min", float), ("linear-loss", float)):
        p.add_argument(f"--{name}", type=typ, help=_TRAIN_HELP[name] + " (default: the preset's training config)")
    p.add_argument("--keep-sampling", choices=KEEP_SAMPLING,
                   help="how nested dropout draws the kept token counts: pow2 / uniform values, one per sample, "
                   "one per latent frame (_frame) or a mix of both (_mixed) (default: the training config's)")
    p.add_argument("--keep-frame-prob", type=float, help="with a _mixed --keep-sampling: share of the samples "
                   "that get a keep per latent frame (default: the training config's, 0.5)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--max-seconds", type=float, help="stop (with a checkpoint) after this wall time")
    p.add_argument("--init", help="start from the weights of this checkpoint (same config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("tokenize", help="video file -> tokens (.safetensors)")
    _add_common(p)
    p.add_argument("video", help="a video file (any size, frame rate and length; scaled and centre-cropped)")
    _add_checkpoint(p)
    p.add_argument("--out", required=True, help="the token file to write (.safetensors)")
    p.add_argument("--fps", type=float, default=None, help="resample the video to this frame rate first")
    p.add_argument("--target-psnr", type=float, default=None,
                   help="also store the fewest tokens per latent frame (or per --granularity) whose reconstruction "
                   "reaches this PSNR (vft.adaptive.search_keep; `vft detokenize` then uses them)")
    p.add_argument("--budget", type=int, default=None, help="also store per-latent-frame token counts that spend at "
                   "most this many tokens per clip where they raise its PSNR most (docs/adaptive.md)")
    p.add_argument("--rate", type=float, default=None, help="as --budget, with a budget of this many tokens per "
                   "latent frame on average (1 to R; floor(rate x latent frames) per clip)")
    p.add_argument("--router", default=None, help="with --target-psnr, --budget or --rate: predict the per-frame "
                   "quality with a learned router instead of decoding: 'tiny' (shipped with the tiny model) or a "
                   "router folder (vft.router)")
    p.add_argument("--granularity", choices=["clip", "chunk", "frame"], default=None,
                   help="with --target-psnr (search): one token count per clip, per chunk or per latent frame "
                   "(default: frame)")
    p.add_argument("--steps", type=int, default=None, help="with --target-psnr, --budget or --rate: the decoding "
                   "setting the counts are chosen for (and stored; `vft detokenize` uses it): sampling steps "
                   f"(default: detokenize's, {SAMPLING_DEFAULTS['steps']}); --router picks the router trained for "
                   "the setting, a search decodes with it")
    p.add_argument("--guidance", choices=["none", "cfg", "apg"], default=None, help="... its guidance (default: "
                   f"{SAMPLING_DEFAULTS['guidance']})")
    p.add_argument("--scale", type=float, default=None, help=f"... its guidance scale (default: "
                   f"{SAMPLING_DEFAULTS['scale']})")
    p.add_argument("--search-steps", type=int, default=None, help="the old name of --steps, for a search or "
                   "measured --budget / --rate curves")
    p.set_defaults(fn=cmd_tokenize)

    p = sub.add_parser("detokenize", help="tokens (.safetensors) -> video file")
    _add_common(p)
    p.add_argument("tokens", help="a token file written by `vft tokenize`")
    _add_checkpoint(p)
    p.add_argument("--out", required=True, help="the video file to write (.mp4)")
    _add_sampling(p, None, "tokens per latent frame to decode from (default: the counts stored in the token file, "
                  "else all)", "frame rate of the written video (default: the one stored in the token file)",
                  stored=True)
    p.set_defaults(fn=cmd_detokenize)

    p = sub.add_parser("reconstruct", help="video -> tokens -> videos at several token counts (mp4 + PNG grid)")
    _add_common(p)
    p.add_argument("video", help="a video file (any size, frame rate and length; scaled and centre-cropped)")
    _add_checkpoint(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_sampling(p, "1,2,4,8", "token counts per latent frame to reconstruct from (comma list; default: "
                  "%(default)s)", "resample the video to this frame rate first (default: its own)")
    p.set_defaults(fn=cmd_reconstruct)

    p = sub.add_parser("export", help="package a training checkpoint as a model folder (EMA weights, FSQ norm "
                       "recalibrated, configs, training log)")
    p.add_argument("checkpoint", help="a checkpoint folder made by `vft train`")
    p.add_argument("--out", required=True, help="the model folder to write (created if missing)")
    p.add_argument("--name", default="tiny", help="the model's name, recorded in its weights (default: %(default)s)")
    p.add_argument("--command", required=True, help="the exact training command, recorded in config.json")
    p.add_argument("--calibration-clips", type=int, default=256, help="training clips that recalibrate the FSQ "
                   "input norm's statistics for the EMA weights (a multiple of 16; default: %(default)s)")
    _add_common(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("train-router", help="train the token-budget router of a model (vft.router) for one decoding "
                       "setting, on clips labelled by decoding them at every token count")
    _add_common(p)
    _add_checkpoint(p)
    p.add_argument("--out", required=True, help="a model or router folder: the router goes to "
                   "OUT/routers/<setting>/ (router.safetensors, router.json, router_train_log.csv)")
    p.add_argument("--per-kind", type=int, default=40, help="clips of each kind (one group of every kind per "
                   "seed); the last fifth of the groups calibrates the margins and measures the errors "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=5000, help="first clip seed (training seeds are < 10**6; default: "
                   "%(default)s)")
    p.add_argument("--real", action="store_true", help="also train on photo pans and windows of real videos (the "
                   "training photographs and videos; the held-out ones stay out)")
    p.add_argument("--steps", type=int, default=1, help="sampling steps of the labels' decodes: the decoding "
                   "setting the router is for (default: %(default)s)")
    p.add_argument("--guidance", choices=["none", "cfg", "apg"], default="none",
                   help="guidance of the labels' decodes (default: %(default)s)")
    p.add_argument("--scale", type=float, default=1.5, help="guidance scale of the labels' decodes (default: "
                   "%(default)s)")
    p.add_argument("--val-groups", type=int, default=None, help="the last this many groups are held out for the "
                   "margins and errors (default: a fifth of --per-kind)")
    p.add_argument("--cache", default=None, help="keep each clip group's labels in this folder and reuse them "
                   "(resumes an interrupted run; e.g. runs/router_labels)")
    p.add_argument("--coverage", type=float, default=0.9, help="share of held-out frames that must reach a target "
                   "with the calibrated margin (default: %(default)s)")
    p.add_argument("--train-steps", type=int, default=3000, help="optimizer steps of the fit (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the fit (default: "
                   "%(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the fit (default: %(default)s)")
    p.add_argument("--init", default=None, help="start the fit from this router folder's weights (router.json + "
                   "router.safetensors; e.g. the model's router for another setting, trained on more clips; its "
                   "--hidden, --context and --members are kept)")
    p.add_argument("--increment-weight", type=float, default=0.0, help="weight of the squared error of the "
                   "increments PSNR(K) - PSNR(K - 1) in the loss, besides the levels' (default: %(default)s)")
    p.add_argument("--context", choices=["none", "clip_mean"], default="none", help="clip_mean: each latent frame "
                   "also sees the mean of its clip's frames' features (default: %(default)s)")
    p.add_argument("--members", type=int, default=1, help="an ensemble of this many MLPs (seeds), curves averaged "
                   "(default: %(default)s)")
    p.add_argument("--head", choices=["softplus", "residual"], default="softplus", help="how the MLP's output "
                   "becomes a non-decreasing curve: softplus increments, or residual: the running maximum of the linear "
                   "path's PSNR plus the output (a linear-path model; default: %(default)s)")
    p.add_argument("--hidden", type=int, default=64, help="width of the MLP's two hidden layers (default: "
                   "%(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train_router)

    p = sub.add_parser("demo", help="the shipped tiny tokenizer on a held-out clip (or --video): tokenize once, "
                       "reconstruct from K = 1, 2, 4, ... tokens, write mp4 / PNG / JSON / Markdown")
    _add_common(p)
    p.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    p.add_argument("--video", help="a video file (any size, frame rate, length) instead of the held-out clip")
    p.add_argument("--max-frames", type=int, default=32, help="use at most this many frames of --video")
    _add_checkpoint(p)
    p.add_argument("--no-timing", action="store_true", help="skip the fastest-backend vs reference timing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_sampling(p, None, "token counts per latent frame to reconstruct from (comma list; default: 1, 2, 4, ... "
                  "up to all)", "resample --video to this frame rate first (default: its own)")
    p.set_defaults(fn=cmd_demo)
    return parser


_MODEL_COMMANDS = ("train", "tokenize", "detokenize", "reconstruct", "demo", "train-router")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.backend is not None and args.command in _MODEL_COMMANDS:
        # Every model command runs all the ops: refuse a backend that lacks one now, with the
        # reason, rather than after loading the model (the cuda backend has no attention).
        device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        problems = dispatch.forced_backend_problems(args.backend, dispatch.OPS, device)
        if problems:
            print(f"vft {args.command}: error: --backend {args.backend} cannot run this command on {device}: "
                  + "; ".join(problems) + ". Leave --backend unset (automatic) or pick a backend that has every op "
                  "(`vft info` lists them).", file=sys.stderr)
            return 2
    try:
        if args.command == "info":  # it only reports: any backend, available on this build or not
            return args.fn(args)
        with vk.use_backend(args.backend):
            return args.fn(args)
    except (ValueError, FileNotFoundError, vk.BackendUnavailableError, RuntimeError) as e:
        print(f"vft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
