"""The ``vft`` command line: tokenize, detokenize, reconstruct, train, info, demo.

    vft demo --out demo_out                      # shipped tiny model on a held-out clip, K = 1, 2, 4, 8
    vft demo --video clip.mp4 --out demo_out     # the same on any video file
    vft train --preset tiny --out ckpt --steps 2000
    vft tokenize clip.mp4 --checkpoint ckpt --out tokens.safetensors
    vft detokenize tokens.safetensors --checkpoint ckpt --keep 4 --out clip_k4.mp4
    vft reconstruct clip.mp4 --checkpoint ckpt --keep 1,2,4,8 --out recon/
    vft info --preset videoflextok_k600

Every command takes ``--backend`` (reference, cpu, triton, cuda; default: automatic).
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
from .config import PRESETS, ModelConfig, TrainConfig, parse_override, preset, tiny_train_config
from .data import HELDOUT_SEED, VideoReadError, from_model_range, read_video, resize_crop, synthetic_video, \
    to_model_range, write_video
from .demo import print_summary, reconstruct_report
from .model import VideoFlexTok
from .pretrained import load_pretrained
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


def save_tokens(path: str, tokens: torch.Tensor, cfg: ModelConfig, fps: float,
                keep: Optional[torch.Tensor] = None, extra: Optional[dict] = None) -> None:
    """tokens int [B, T', R] (and optionally a per-latent-frame keep [B, T']) -> safetensors."""
    from safetensors.torch import save_file

    tensors = {"tokens": tokens.to(torch.int32).contiguous().cpu()}
    if keep is not None:
        tensors["keep"] = keep.to(torch.int32).contiguous().cpu()
    meta = {"config": cfg.name, "registers": str(cfg.registers), "fps": str(fps)}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    save_file(tensors, path, metadata=meta)


def load_tokens(path: str) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokens file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            if "tokens" not in f.keys():
                raise ValueError(f"{path} has no 'tokens' tensor (keys: {list(f.keys())})")
            meta = dict(f.metadata() or {})
            if "keep" in f.keys():  # per-latent-frame token counts (vft tokenize --target-psnr)
                meta["keep"] = f.get_tensor("keep").long()
            return f.get_tensor("tokens"), meta
    except Exception as e:  # safetensors raises its own error types for malformed files
        if isinstance(e, ValueError) and "tokens" in str(e):
            raise
        raise ValueError(f"cannot read tokens file {path}: {e}") from None


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
            forced = dispatch.forced_backend()
            chosen = forced or (names[0] if names else "none")
            if forced and forced not in names:
                chosen += " (forced, cannot run here)"
            print(f"  {op:<20} {dev:<5} available: {', '.join(names) or '-':<24} runs: {chosen}")
    names = args.preset or ([] if args.checkpoint else list(PRESETS))
    cfgs = [preset(n) for n in names]
    if args.checkpoint:
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
                                              "linear_loss",
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


def _tokenize_routed(args, model, video, fps) -> int:
    """tokenize with per-latent-frame token counts from the learned router (one pass, no decodes)."""
    from .pretrained import load_router

    if not args.router:
        raise ValueError("--budget needs --router (tiny, or a router folder)")
    if args.target_psnr is not None and args.budget is not None:
        raise ValueError("give --target-psnr or --budget, not both")
    router = load_router(args.router)
    tokens = model.tokenize(video)
    if args.budget is not None:
        keep = router.keep_for_budget(model, video, args.budget, tokens)
        what = {"budget": args.budget}
    else:
        keep = router.keep_for_target(model, video, args.target_psnr, tokens)
        what = {"target_psnr": args.target_psnr}
    sampling = router.sampling or {}
    save_tokens(args.out, tokens, model.cfg, fps, keep=keep,
                extra={**what, "policy": "router", "router": args.router, "router_sampling": json.dumps(sampling)})
    print(f"tokens {tuple(tokens.shape)} (B, latent frames, registers), keep per latent frame (router) "
          f"{keep[0].tolist()} ({int(keep[0].sum())} tokens, mean {float(keep[0].double().mean()):.2f} of "
          f"{model.cfg.registers}) -> {args.out}")
    if sampling:
        print(f"note: the router predicts quality for decoding with {sampling}: `vft detokenize --steps "
              f"{sampling.get('steps')} --guidance {sampling.get('guidance')}` (other settings give other PSNRs)")
    return 0


def cmd_tokenize(args) -> int:
    model = ckpt.load_model(args.checkpoint, str(_device(args.device)))
    video, fps = load_clip(args.video, model.cfg, args.fps)
    video = video.to(_device(args.device))
    if args.budget is not None or (args.target_psnr is not None and args.router):
        return _tokenize_routed(args, model, video, fps)
    if args.target_psnr is None:
        tokens = model.tokenize(video)
        save_tokens(args.out, tokens, model.cfg, fps)
        print(f"tokens {tuple(tokens.shape)} (B, latent frames, registers) -> {args.out}")
        return 0
    from .adaptive import search_keep

    res = search_keep(model, video, target=args.target_psnr, granularity=args.granularity, steps=args.search_steps)
    tokens, keep = res["tokens"], res["keep"]
    save_tokens(args.out, tokens, model.cfg, fps, keep=keep,
                extra={"target_psnr": args.target_psnr, "granularity": args.granularity, "psnr": float(res["quality"][0]),
                       "search_steps": args.search_steps})
    print(f"tokens {tuple(tokens.shape)} (B, latent frames, registers), keep per latent frame "
          f"{keep[0].tolist()} (mean {float(res['mean_tokens'][0]):.2f} of {model.cfg.registers}), "
          f"PSNR {float(res['quality'][0]):.2f} dB >= {args.target_psnr} -> {args.out}")
    return 0


def cmd_detokenize(args) -> int:
    device = _device(args.device)
    model = ckpt.load_model(args.checkpoint, str(device))
    tokens, meta = load_tokens(args.tokens)
    if meta.get("config") and meta["config"] != model.cfg.name:
        raise ValueError(f"tokens in {args.tokens} were made by config {meta['config']!r}, the checkpoint is "
                         f"{model.cfg.name!r}")
    if args.keep is not None:
        keep = _parse_keeps(args.keep, model.cfg.registers)[0]
    else:  # the per-frame counts stored by `vft tokenize --target-psnr`, if any
        keep = meta["keep"].to(device) if "keep" in meta else None
    video = model.detokenize(tokens.to(device), keep=keep, **_sampling_kwargs(args))
    fps = args.fps or float(meta.get("fps", 8))
    write_video(args.out, from_model_range(video[0]), fps)
    print(f"video {tuple(video.shape)} -> {args.out}")
    return 0


def cmd_reconstruct(args) -> int:
    device = _device(args.device)
    model = ckpt.load_model(args.checkpoint, str(device))
    video, fps = load_clip(args.video, model.cfg, args.fps)
    keeps = _parse_keeps(args.keep, model.cfg.registers)
    summary = reconstruct_report(model, video.to(device), keeps, args.out, fps, _sampling_kwargs(args),
                                 compare_reference=False, progress=not args.no_progress, source=args.video)
    print_summary(summary, args.out)
    return 0


def cmd_export(args) -> int:
    from .pretrained import export

    print(f"packaged {args.checkpoint} as pretrained {args.name!r} in {export(args.checkpoint, args.name, args.command)}")
    return 0


def cmd_demo(args) -> int:
    t_start = time.time()
    device = _device(args.device)
    if args.checkpoint:
        model = ckpt.load_model(args.checkpoint, str(device))
        name = args.checkpoint
    else:
        model = load_pretrained("tiny", str(device))
        name = "the shipped tiny model (vft.load_pretrained('tiny'))"
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


def _add_common(p):
    p.add_argument("--backend", choices=["reference", "cpu", "triton", "cuda"], default=None,
                   help="force one vft_kernels backend (default: the fastest available)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _add_sampling(p, keep_default: Optional[str]):
    p.add_argument("--keep", default=keep_default,
                   help="tokens per latent frame to decode from" + (" (comma list)" if keep_default else ""))
    p.add_argument("--steps", type=int, default=25, help="flow sampling steps")
    p.add_argument("--guidance", choices=["none", "cfg", "apg"], default="apg")
    p.add_argument("--scale", type=float, default=1.5, help="guidance scale")
    p.add_argument("--solver", choices=["euler", "heun"], default="euler")
    p.add_argument("--shift", type=float, default=1.0, help="time-grid shift")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vft", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="backends and parameter counts of presets / a checkpoint")
    _add_common(p)
    p.add_argument("--preset", action="append", choices=sorted(PRESETS))
    p.add_argument("--checkpoint")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("train", help="train a tokenizer (use torchrun for several processes)")
    _add_common(p)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
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
        p.add_argument(f"--{name}", type=typ)
    p.add_argument("--keep-sampling", choices=["pow2", "uniform"])
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--max-seconds", type=float, help="stop (with a checkpoint) after this wall time")
    p.add_argument("--init", help="start from the weights of this checkpoint (same config)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("tokenize", help="video file -> tokens (.safetensors)")
    _add_common(p)
    p.add_argument("video")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fps", type=float, default=None)
    p.add_argument("--target-psnr", type=float, default=None,
                   help="also store the fewest tokens per latent frame (or per --granularity) whose reconstruction "
                   "reaches this PSNR (vft.adaptive.search_keep; `vft detokenize` then uses them)")
    p.add_argument("--router", default=None, help="pick the per-frame token counts with a learned router instead "
                   "of searching by decoding: 'tiny' (shipped with the tiny model) or a router folder (vft.router)")
    p.add_argument("--budget", type=int, default=None, help="with --router: at most this many tokens per clip, "
                   "spread over the latent frames where the router predicts they help most")
    p.add_argument("--granularity", choices=["clip", "chunk", "frame"], default="frame")
    p.add_argument("--search-steps", type=int, default=25, help="sampling steps of the search's reconstructions "
                   "(APG, scale 1.5: detokenize's defaults)")
    p.set_defaults(fn=cmd_tokenize)

    p = sub.add_parser("detokenize", help="tokens (.safetensors) -> video file")
    _add_common(p)
    p.add_argument("tokens")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    _add_sampling(p, None)
    p.set_defaults(fn=cmd_detokenize)

    p = sub.add_parser("reconstruct", help="video -> tokens -> videos at several token counts (mp4 + PNG grid)")
    _add_common(p)
    p.add_argument("video")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true")
    _add_sampling(p, "1,2,4,8")
    p.set_defaults(fn=cmd_reconstruct)

    p = sub.add_parser("export", help="package a training checkpoint as a shipped pretrained model (developers)")
    p.add_argument("checkpoint")
    p.add_argument("--name", default="tiny")
    p.add_argument("--command", required=True, help="the exact training command, recorded in config.json")
    _add_common(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("demo", help="the shipped tiny tokenizer on a held-out clip (or --video): tokenize once, "
                       "reconstruct from K = 1, 2, 4, ... tokens, write mp4 / PNG / JSON / Markdown")
    _add_common(p)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--video", help="a video file (any size, frame rate, length) instead of the held-out clip")
    p.add_argument("--max-frames", type=int, default=32, help="use at most this many frames of --video")
    p.add_argument("--checkpoint", help="a trained checkpoint folder instead of the shipped model")
    p.add_argument("--no-timing", action="store_true", help="skip the fastest-backend vs reference timing")
    p.add_argument("--no-progress", action="store_true")
    _add_sampling(p, None)
    p.set_defaults(fn=cmd_demo)
    return parser


_MODEL_COMMANDS = ("train", "tokenize", "detokenize", "reconstruct", "demo")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
        with vk.use_backend(args.backend):
            return args.fn(args)
    except (ValueError, FileNotFoundError, vk.BackendUnavailableError, RuntimeError) as e:
        print(f"vft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
