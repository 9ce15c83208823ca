"""Per-sample against per-frame keep sampling on a small model: ``python -m benchmarks.keep_sampling``.

Trains the ``micro`` preset (by default with the tiny preset's x-prediction and linear path)
once per ``--modes`` entry with the same seed, so the runs share every random draw but the
keeps (``vft.train.draw``), and scores each on 64 held-out clips with fixed flow times and
noise, at four keeps: random per-frame keeps (``mixed``), (R, 1, 1, ...) (``front``: the
first latent frame full, the rest one token), all 1 and all R. ``front`` against the mean of
the all-R and all-1 losses shows whether the decoder leans on an earlier frame's tokens.
``--static`` trains and scores on static clips (the first frame repeated), where leaning on
the first frame pays most. docs/training.md has the results.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from vft import checkpoint as ckpt
from vft import train as vt
from vft.config import KEEP_SAMPLING, parse_override, preset, tiny_train_config
from vft.data import HELDOUT_SEED, SyntheticVideos
from vft.model import VideoFlexTok


class StaticClips(torch.utils.data.Dataset):
    """Clips of ``base`` with their first frame repeated."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        v = self.base[i]
        return v[:, :1].expand_as(v).contiguous()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="uniform,uniform_frame,uniform_mixed", help="comma list of keep samplings")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--static", action="store_true", help="train and score on static clips")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="model config override (default: prediction=x and linear_path=true)")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in KEEP_SAMPLING]
    if bad:
        p.error(f"unknown keep sampling {bad}; expected some of {KEEP_SAMPLING}")
    overrides = dict(parse_override(s) for s in (args.set or ["prediction=x", "linear_path=true"]))
    cfg = preset("micro").replace(**overrides)

    def dataset(seed):
        clips = SyntheticVideos(cfg.frames, cfg.height, cfg.width, seed=seed)
        return StaticClips(clips) if args.static else clips


    def tcfg(mode):
        return tiny_train_config(steps=args.steps, batch_size=8, lr=3e-3, warmup_steps=20, log_every=1000,
                                 ckpt_every=10 ** 9, ema_decay=0.9, prefix_prob=0.0, keep_sampling=mode, seed=args.seed)

    n, T, R = 64, cfg.latent_frames, cfg.registers
    held_out = dataset(123)
    video = torch.stack([held_out[HELDOUT_SEED + i] for i in range(n)])
    inputs = vt.draw(cfg, tcfg("uniform"), n, torch.Generator().manual_seed(7))
    front = torch.ones(n, T, dtype=torch.int64)
    front[:, 0] = R
    keeps = {"mixed": torch.randint(1, R + 1, (n, T), generator=torch.Generator().manual_seed(11)), "front": front,
             "all_1": torch.ones(n, T, dtype=torch.int64), f"all_{R}": torch.full((n, T), R)}
    results = []
    for mode in modes:
        t0, out = time.time(), tempfile.mkdtemp(prefix="keep_sampling_")
        make_dataset = vt.make_dataset
        vt.make_dataset = lambda cfg, tc: dataset(tc.seed)  # this benchmark's clips, for this run only
        try:
            vt.train(cfg, tcfg(mode), out, progress=False)
        finally:
            vt.make_dataset = make_dataset
        model = VideoFlexTok(cfg)
        ckpt.load_weights(out, model, use_ema=False)
        model.eval()
        with torch.no_grad():
            loss = {k: float(model(video, **{**inputs, "keep": keep}, loss_t_min=tcfg(mode).loss_t_min))
                    for k, keep in keeps.items()}
        no_lean = (loss[f"all_{R}"] + (T - 1) * loss["all_1"]) / T  # front's loss if no frame used another's tokens
        results.append({"mode": mode, **loss, "front_if_no_leaning": no_lean, "seconds": round(time.time() - t0, 1)})
        print(json.dumps(results[-1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
