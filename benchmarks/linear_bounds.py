"""What a linear code can reach on the synthetic clips: ``python -m benchmarks.linear_bounds``.

A yardstick for the tokenizer (issue #10). Per latent frame (2 frames of H x W RGB, the
pixel compressor's temporal factor), it reports the held-out PSNR of

* the best linear code with ``d`` numbers per latent frame (PCA on training clips, for
  each ``--dims``; a tokenizer with R registers of an n-dimensional FSQ carries R * n
  numbers per latent frame, quantised), and
* a linear autoencoder (``frame -> d -> frame``, Adam, fresh clips every step, batch 8 clips
  like ``vft train``) after each 100 steps, i.e. how fast the simplest model learns it,
* with ``--fsq RxLEVELS`` (e.g. ``16x8,5,5,5``), the tokenizer's own kind of code made linear:
  ``frame -> R registers x n dims -> FSQ (per-dim batch norm, vk.fsq_quantize) -> frame``,
  with nested dropout (registers past a keep drawn from {1, 2, 4, ..., R} read a learned
  mask code), trained on a pool of training clips; held-out PSNR at each keep,
* with ``--conv RxLEVELS``, the same code with a convolutional encoder and decoder
  (``ConvCoder``, ~0.5 M parameters at the default width): a nonlinear model of the same
  code size, to tell a bound of the code from a bound of the linear maps,

for the calm default background (``WAVE_CYCLES``) and the busy one of the first runs
(``DETAILED_WAVES``), next to the per-clip mean-colour baseline.

    python -m benchmarks.linear_bounds                     # 32x32, PCA on 3,000 clips, AE 1,000 steps
    python -m benchmarks.linear_bounds --ae-steps 0        # PCA only (about 20 s)
    python -m benchmarks.linear_bounds --ae-steps 0 --fsq 16x8,5,5,5 --fsq 64x8,8,8,5,5,5
    python -m benchmarks.linear_bounds --ae-steps 0 --dims 64 --backgrounds calm --conv 16x8,5,5,5
"""
from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm

from vft.data import DETAILED_WAVES, HELDOUT_SEED, WAVE_CYCLES, synthetic_video, to_model_range

BACKGROUNDS = {"calm": WAVE_CYCLES, "detailed": DETAILED_WAVES}


def latent_frames(seed0: int, n: int, size: int, waves) -> torch.Tensor:
    """n clips of 8 frames -> [4 n, 6 size^2]: one row per latent frame (2 frames), in [-1, 1]."""
    v = torch.stack([to_model_range(synthetic_video(seed0 + i, 8, size, size, waves)) for i in range(n)])
    return v.reshape(n, 3, 4, 2, size, size).permute(0, 2, 1, 3, 4, 5).reshape(n * 4, -1)


def psnr_rows(rec: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over rows of the PSNR in [0, 1] units (values are in [-1, 1])."""
    mse = ((rec - ref) / 2).square().mean(dim=1)
    return float((10 * torch.log10(1 / mse)).mean())


def pca_bounds(train: torch.Tensor, held: torch.Tensor, dims) -> dict[int, float]:
    mean = train.mean(dim=0)
    _, _, V = torch.pca_lowrank(train - mean, q=max(dims), center=False, niter=3)
    return {d: psnr_rows((held - mean) @ V[:, :d] @ V[:, :d].T + mean, held) for d in dims}


def linear_ae_curve(size: int, waves, held: torch.Tensor, d: int, steps: int, lr: float) -> dict[int, float]:
    torch.manual_seed(0)
    n = held.shape[1]
    enc, dec = torch.nn.Linear(n, d), torch.nn.Linear(d, n)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=lr)
    curve = {}
    for step in range(steps + 1):
        if step % 100 == 0:
            with torch.no_grad():
                curve[step] = psnr_rows(dec(enc(held)), held)
        if step == steps:
            break
        x = latent_frames(step * 8, 8, size, waves)
        loss = (dec(enc(x)) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curve


def parse_fsq(spec: str) -> tuple[int, tuple[int, ...]]:
    """``"16x8,5,5,5"`` -> (16, (8, 5, 5, 5))."""
    regs, sep, levels = spec.partition("x")
    try:
        out = int(regs), tuple(int(v) for v in levels.split(","))
    except ValueError:
        out = None
    if not sep or out is None or out[0] < 1 or min(out[1]) < 2:
        raise ValueError(f"--fsq must look like REGISTERSxL1,L2,... (e.g. 16x8,5,5,5), got {spec!r}")
    return out


class ConvCoder(torch.nn.Module):
    """A small convolutional encoder or decoder of latent-frame rows (``--conv``).

    encoder: row [N, 6 S^2] -> image [N, 6, S, S] -> three stride-2 stages (width w, 2w,
    2w; 3x3 conv then 4x4 stride-2 conv, SiLU) -> S/8 x S/8 x 2w -> Linear -> ``out``
    numbers; decoder: the mirror image, from ``out`` numbers back to a row."""

    def __init__(self, size: int, numbers: int, width: int, decoder: bool):
        super().__init__()
        if size % 8:
            raise ValueError(f"--conv needs --size divisible by 8, got {size}")
        nn, w, s8 = torch.nn, width, size // 8
        self.size, self.decoder = size, decoder
        if not decoder:
            self.net = nn.Sequential(
                nn.Conv2d(6, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 4, 2, 1), nn.SiLU(),
                nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * w, 2 * w, 4, 2, 1), nn.SiLU(),
                nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * w, 2 * w, 4, 2, 1), nn.SiLU(),
                nn.Flatten(), nn.Linear(2 * w * s8 * s8, numbers))
        else:
            self.net = nn.Sequential(
                nn.Linear(numbers, 2 * w * s8 * s8), nn.SiLU(), nn.Unflatten(1, (2 * w, s8, s8)),
                nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.ConvTranspose2d(2 * w, 2 * w, 4, 2, 1), nn.SiLU(),
                nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.SiLU(),
                nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.ConvTranspose2d(w, w, 4, 2, 1), nn.SiLU(),
                nn.Conv2d(w, 6, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Rows are (channel, frame, y, x)-ordered (see latent_frames): 6 image channels.
        if self.decoder:
            return self.net(x).reshape(x.shape[0], -1)
        return self.net(x.reshape(-1, 6, self.size, self.size))


def fsq_curve(train: torch.Tensor, held: torch.Tensor, registers: int, levels, steps: int,
              enc: torch.nn.Module, dec: torch.nn.Module, lr: float = 2e-3, batch: int = 32) -> dict[int, float]:
    """Held-out PSNR per keep of an FSQ-quantised nested-dropout autoencoder ``enc``/``dec``
    (rows -> registers * len(levels) numbers -> rows), trained ``steps`` steps."""
    import vft_kernels as vk

    d = len(levels)
    mask = torch.nn.Parameter(torch.zeros(registers, d))
    norm = torch.nn.BatchNorm1d(d, affine=False)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters(), mask], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr / 10)
    keeps = torch.tensor([1 << i for i in range(registers.bit_length()) if 1 << i <= registers])

    def run(x, keep):
        z = norm(enc(x).reshape(-1, d)).reshape(-1, registers, d)
        codes, _ = vk.fsq_quantize(z.contiguous(), levels)
        kept = torch.arange(registers)[None, :, None] < keep[:, None, None]
        return dec(torch.where(kept, codes, mask).reshape(-1, registers * d))

    gen = torch.Generator().manual_seed(1)
    for _ in tqdm(range(steps), desc=f"{registers} x {levels}", leave=False, disable=None):
        x = train[torch.randint(0, train.shape[0], (batch,), generator=gen)]
        keep = keeps[torch.randint(0, len(keeps), (batch,), generator=gen)]
        loss = (run(x, keep) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    norm.eval()
    with torch.no_grad():
        return {int(k): psnr_rows(run(held, torch.full((held.shape[0],), int(k))), held) for k in keeps}


def fsq_linear_curve(train: torch.Tensor, held: torch.Tensor, registers: int, levels, steps: int) -> dict[int, float]:
    """``--fsq``: the tokenizer's kind of code with a linear encoder and decoder."""
    torch.manual_seed(0)
    n, m = train.shape[1], registers * len(levels)
    return fsq_curve(train, held, registers, levels, steps, torch.nn.Linear(n, m), torch.nn.Linear(m, n))


def fsq_conv_curve(train: torch.Tensor, held: torch.Tensor, size: int, registers: int, levels, steps: int,
                   width: int) -> dict[int, float]:
    """``--conv``: the same code with a convolutional encoder and decoder (ConvCoder)."""
    torch.manual_seed(0)
    m = registers * len(levels)
    return fsq_curve(train, held, registers, levels, steps, ConvCoder(size, m, width, decoder=False),
                     ConvCoder(size, m, width, decoder=True))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=32, help="frame height = width")
    p.add_argument("--train-clips", type=int, default=3000, help="clips for PCA")
    p.add_argument("--heldout-clips", type=int, default=200)
    p.add_argument("--dims", default="8,16,32,64,128", help="numbers per latent frame for PCA")
    p.add_argument("--ae-dim", type=int, default=32)
    p.add_argument("--ae-steps", type=int, default=1000)
    p.add_argument("--ae-lr", type=float, default=3e-3)
    p.add_argument("--fsq", action="append", default=[], metavar="RxLEVELS",
                   help="also train an FSQ-quantised nested-dropout linear autoencoder with R registers of "
                        "these levels (repeatable), e.g. 16x8,5,5,5")
    p.add_argument("--fsq-steps", type=int, default=3000)
    p.add_argument("--conv", action="append", default=[], metavar="RxLEVELS",
                   help="also train the same FSQ nested-dropout code with a convolutional encoder and "
                        "decoder (repeatable): a nonlinear model of the same code size")
    p.add_argument("--conv-steps", type=int, default=10000)
    p.add_argument("--conv-width", type=int, default=32, help="channels of the first conv stage")
    p.add_argument("--backgrounds", default="calm,detailed", help="comma-separated subset of calm,detailed")
    args = p.parse_args(argv)
    try:
        fsq_codes = [parse_fsq(s) for s in args.fsq]
        conv_codes = [parse_fsq(s) for s in args.conv]
    except ValueError as e:
        p.error(str(e))
    if conv_codes and args.size % 8:
        p.error(f"--conv needs --size divisible by 8, got {args.size}")
    backgrounds = args.backgrounds.split(",")
    if not backgrounds or set(backgrounds) - set(BACKGROUNDS):
        p.error(f"--backgrounds must be a comma-separated subset of {sorted(BACKGROUNDS)}, got {args.backgrounds!r}")
    dims = [int(d) for d in args.dims.split(",")]
    if min(dims) < 1 or max(dims) > 6 * args.size ** 2:
        p.error(f"--dims must be in [1, {6 * args.size ** 2}], got {dims}")
    for name in backgrounds:
        waves = BACKGROUNDS[name]
        train = latent_frames(0, args.train_clips, args.size, waves)
        held = latent_frames(HELDOUT_SEED, args.heldout_clips, args.size, waves)
        clips = held.reshape(args.heldout_clips, 4, 3, 2, -1).transpose(1, 2).reshape(args.heldout_clips, 3, -1)
        base = clips.mean(dim=2, keepdim=True).expand_as(clips).reshape(args.heldout_clips, -1)
        print(f"{name} background {waves} cycles/frame, {args.size}x{args.size}: "
              f"mean colour {psnr_rows(base, clips.reshape(args.heldout_clips, -1)):.2f} dB")
        for d, v in pca_bounds(train, held, dims).items():
            print(f"  PCA, {d:4d} numbers per latent frame: {v:.2f} dB")
        if args.ae_steps:
            curve = linear_ae_curve(args.size, waves, held, args.ae_dim, args.ae_steps, args.ae_lr)
            print(f"  linear autoencoder ({args.ae_dim} numbers, lr {args.ae_lr}): "
                  + ", ".join(f"{s}: {v:.2f}" for s, v in curve.items()))
        for regs, levels in fsq_codes:
            curve = fsq_linear_curve(train, held, regs, levels, args.fsq_steps)
            print(f"  FSQ linear autoencoder, {regs} x {levels} ({regs * len(levels)} numbers, "
                  f"{args.fsq_steps} steps), PSNR by keep: " + ", ".join(f"{k}: {v:.2f}" for k, v in curve.items()))
        for regs, levels in conv_codes:
            curve = fsq_conv_curve(train, held, args.size, regs, levels, args.conv_steps, args.conv_width)
            print(f"  FSQ conv autoencoder (width {args.conv_width}), {regs} x {levels} ({regs * len(levels)} numbers, "
                  f"{args.conv_steps} steps), PSNR by keep: " + ", ".join(f"{k}: {v:.2f}" for k, v in curve.items()))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
