"""The ``vft`` command line: tokenize, detokenize, reconstruct, train, info, demo.

    vft demo --out demo_out                      # synthetic clip -> train tiny -> reconstruct
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
import math
import os
import sys
import time
from typing import Optional

import torch

import vft_kernels as vk

from . import checkpoint as ckpt
from .config import PRESETS, ModelConfig, TrainConfig, parse_override, preset, tiny_train_config
from .data import (VideoReadError, from_model_range, read_video, resize_crop, synthetic_video, to_model_range,
                   write_video)
from .model import VideoFlexTok


# ------------------------------------------------------------------------------------
# Helpers


def _device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_clip(path: str, cfg: ModelConfig, fps: Optional[float] = None) -> tuple[torch.Tensor, float]:
    """Read a video file for ``cfg``: scaled/centre-cropped to its size, cut to a frame count
    the compressor accepts. Returns (float [1, 3, T, H, W] in [-1, 1], fps)."""
    frames, rate = read_video(path, fps)
    c = cfg.compressor
    usable = (frames.shape[0] // c.temporal_factor) * c.temporal_factor if c.kind == "pixel" else \
        1 + ((frames.shape[0] - 1) // c.temporal_factor) * c.temporal_factor
    if usable < 1:
        raise VideoReadError(f"video file {path} has {frames.shape[0]} frames; the model needs at least "
                             f"{c.temporal_factor}")
    frames = resize_crop(frames[:usable], cfg.height, cfg.width)
    return to_model_range(frames)[None], rate


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1]."""
    mse = float(((a.float() - b.float()) / 2).square().mean())
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


def save_tokens(path: str, tokens: torch.Tensor, cfg: ModelConfig, fps: float) -> None:
    from safetensors.torch import save_file

    save_file({"tokens": tokens.to(torch.int32).contiguous().cpu()}, path,
              metadata={"config": cfg.name, "registers": str(cfg.registers), "fps": str(fps)})


def load_tokens(path: str) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokens file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            if "tokens" not in f.keys():
                raise ValueError(f"{path} has no 'tokens' tensor (keys: {list(f.keys())})")
            return f.get_tensor("tokens"), f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for malformed files
        if isinstance(e, ValueError) and "tokens" in str(e):
            raise
        raise ValueError(f"cannot read tokens file {path}: {e}") from None


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


def write_side_by_side(path: str, videos: list[torch.Tensor], fps: float) -> None:
    """One mp4 with the videos ([3, T, H, W] in [-1, 1]) side by side."""
    write_video(path, from_model_range(torch.cat(videos, dim=3)), fps)


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


def _reconstruct_and_write(model: VideoFlexTok, video: torch.Tensor, keeps: list[int], out: str, fps: float,
                           sampling: dict) -> dict:
    os.makedirs(out, exist_ok=True)
    tokens = model.tokenize(video)
    rows, report = [("original", video[0])], {"tokens_shape": list(tokens.shape), "keep": {}}
    recons = []
    for k in keeps:
        t0 = time.time()
        rec = model.detokenize(tokens, keep=k, **sampling)
        recons.append(rec[0])
        rows.append((f"{k} tok/frame", rec[0]))
        report["keep"][k] = {"psnr_db": round(psnr(rec, video), 2), "seconds": round(time.time() - t0, 2)}
        print(f"  keep={k:>4} tokens/latent frame: PSNR {report['keep'][k]['psnr_db']:.2f} dB "
              f"({report['keep'][k]['seconds']:.1f} s)")
    write_side_by_side(os.path.join(out, "reconstruction.mp4"), [video[0]] + recons, fps)
    write_grid_png(os.path.join(out, "grid.png"), rows)
    save_tokens(os.path.join(out, "tokens.safetensors"), tokens, model.cfg, fps)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


# ------------------------------------------------------------------------------------
# Commands


def cmd_info(args) -> int:
    from vft_kernels import dispatch

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
                                              "keep_sampling", "data", "warmup_steps")
                 if getattr(args, k) is not None}
    if args.bf16:
        overrides["bf16"] = True
    if args.fps:
        overrides["data_fps"] = args.fps
    tcfg = TrainConfig.from_dict({**base.to_dict(), **overrides})
    if args.resume and os.path.isfile(os.path.join(args.out, "config.json")):
        ckpt.check_config(args.out, cfg)
    result = train(cfg, tcfg, args.out, resume=args.resume, progress=not args.no_progress, init_from=args.init)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {result['step']}, loss {result['loss']:.4f}; checkpoint in {args.out}")
    return 0


def cmd_tokenize(args) -> int:
    model = ckpt.load_model(args.checkpoint, str(_device(args.device)))
    video, fps = load_clip(args.video, model.cfg, args.fps)
    tokens = model.tokenize(video.to(_device(args.device)))
    save_tokens(args.out, tokens, model.cfg, fps)
    print(f"tokens {tuple(tokens.shape)} (B, latent frames, registers) -> {args.out}")
    return 0


def cmd_detokenize(args) -> int:
    device = _device(args.device)
    model = ckpt.load_model(args.checkpoint, str(device))
    tokens, meta = load_tokens(args.tokens)
    if meta.get("config") and meta["config"] != model.cfg.name:
        raise ValueError(f"tokens in {args.tokens} were made by config {meta['config']!r}, the checkpoint is "
                         f"{model.cfg.name!r}")
    keep = None if args.keep is None else _parse_keeps(args.keep, model.cfg.registers)[0]
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
    _reconstruct_and_write(model, video.to(device), keeps, args.out, fps, _sampling_kwargs(args))
    print(f"wrote {args.out}/reconstruction.mp4, grid.png, tokens.safetensors, report.json")
    return 0


def cmd_demo(args) -> int:
    from .train import keep_values, train

    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    cfg = preset(args.preset)
    device = _device(args.device)
    frames = cfg.frames + cfg.frames // 2  # longer than one chunk: exercises chunked processing
    print(f"[1/4] synthetic clip: {frames} frames of {cfg.height}x{cfg.width} ({cfg.frames}-frame chunks)")
    clip = synthetic_video(10 ** 6 + args.seed, frames, cfg.height, cfg.width)
    write_video(os.path.join(args.out, "input.mp4"), clip, fps=8)
    if args.checkpoint:
        print(f"[2/4] loading {args.checkpoint}")
        ckpt_dir = args.checkpoint
    else:
        ckpt_dir = os.path.join(args.out, "checkpoint")
        print(f"[2/4] training the {cfg.name} model on synthetic clips for up to {args.train_steps} steps / "
              f"{args.train_seconds:g} s -> {ckpt_dir}")
        tcfg = tiny_train_config(steps=args.train_steps, warmup_steps=min(20, args.train_steps // 4 + 1),
                                 batch_size=args.batch_size, lr=3e-3, ema_decay=0.9, log_every=5,
                                 ckpt_every=args.train_steps)
        res = train(cfg, tcfg, ckpt_dir, progress=not args.no_progress, max_seconds=args.train_seconds)
        print(f"      trained {res['step']} steps, loss {res['loss']:.4f} (log: {ckpt_dir}/log.csv)")
    model = ckpt.load_model(ckpt_dir, str(device))
    video = to_model_range(clip)[None].to(device)
    print(f"[3/4] tokenize: {tuple(video.shape)} -> tokens {tuple(model.tokenize(video).shape)}")
    keeps = _parse_keeps(args.keep, cfg.registers) if args.keep else keep_values(cfg.registers, "pow2").tolist()
    print(f"[4/4] reconstruct at {keeps} tokens per latent frame ({args.steps} steps, {args.guidance})")
    _reconstruct_and_write(model, video, keeps, args.out, 8.0, _sampling_kwargs(args))
    print(f"done in {time.time() - t_start:.0f} s: see {args.out}/grid.png and {args.out}/reconstruction.mp4")
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
    p.add_argument("--data", help="'synthetic' (default) or a folder of videos")
    p.add_argument("--fps", type=float, help="resample folder videos to this frame rate")
    for name, typ in (("steps", int), ("batch-size", int), ("lr", float), ("seed", int), ("log-every", int),
                      ("ckpt-every", int), ("warmup-steps", int)):
        p.add_argument(f"--{name}", type=typ)
    p.add_argument("--keep-sampling", choices=["pow2", "uniform"])
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--init", help="start from the weights of this checkpoint (same config)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("tokenize", help="video file -> tokens (.safetensors)")
    _add_common(p)
    p.add_argument("video")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fps", type=float, default=None)
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
    _add_sampling(p, "1,2,4,8")
    p.set_defaults(fn=cmd_reconstruct)

    p = sub.add_parser("demo", help="end to end on a synthetic clip: train (or load) tiny, tokenize, reconstruct")
    _add_common(p)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--checkpoint", help="use this tiny checkpoint instead of training")
    p.add_argument("--preset", default="micro", choices=["micro", "tiny"],
                   help="model to train from scratch (tiny needs ~1 h of CPU training to be useful)")
    p.add_argument("--train-steps", type=int, default=1000, help="at most this many training steps")
    p.add_argument("--train-seconds", type=float, default=90, help="stop training after this wall time")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")
    _add_sampling(p, None)
    p.set_defaults(fn=cmd_demo, steps=10)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with vk.use_backend(args.backend):
            return args.fn(args)
    except (ValueError, FileNotFoundError, vk.BackendUnavailableError, RuntimeError) as e:
        print(f"vft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
