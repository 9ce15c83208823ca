"""How often a router's calibrated margin gets a frame to its target:
``python -m benchmarks.router_coverage``.

For each shipped router of the tiny model (one per decoding setting) and a few PSNR targets,
``keep_for_target`` picks each latent frame's K on held-out clips (``mixed_clips`` with
``--real``: held-out seeds, photographs and ``bikes.mp4``), the clips are decoded with those
per-frame counts in the router's setting, and the share of latent frames whose decoded PSNR
reaches the target is printed with the margin and the mean K (docs/adaptive.md).
"""
from __future__ import annotations

import argparse

from vft.adaptive import mixed_clips, pixel_frames
from vft.metrics import psnr
from vft.pretrained import load_pretrained, load_router

SETTINGS = (({"steps": 1, "guidance": "none"}, 2, (14.0, 15.0, 16.0)),
            ({"steps": 25, "guidance": "apg", "scale": 1.5}, 1, (12.0, 13.0, 14.0)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="a shipped model's name (its routers/<setting>/ folders)")
    args = p.parse_args(argv)
    model = load_pretrained(args.model)
    for sampling, per_kind, targets in SETTINGS:
        clips, _ = mixed_clips(model.cfg, per_kind, real=True)
        tokens = model.tokenize(clips)
        router = load_router(args.model, sampling)
        for t in targets:
            keep = router.keep_for_target(model, clips, t, tokens)
            rec = model.detokenize(tokens, keep=keep, **sampling)
            met = [psnr(rec[b][:, list(pixel_frames(model.cfg, f))], clips[b][:, list(pixel_frames(model.cfg, f))]) >= t
                   for b in range(len(clips)) for f in range(keep.shape[1])]
            print(sampling, f"target {t}: margin {router.margin_for(t):.2f} dB, {sum(met)}/{len(met)} frames = "
                  f"{sum(met) / len(met):.0%} reach it, mean K {float(keep.double().mean()):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
