"""Packed (varlen) bf16 register attention forwards on the CPU: the kernel's bf16 tile
products against the float32 products that packed bf16 calls took before (the same
kernel with the ``attention_cpu_bf16_brgemm`` switch off: the baseline of each group),
and the kernel on float32 copies, timed interleaved in the same run by the harness
(``benchmarks.run.run_cases``); the rows are appended to ``benchmarks/results/all.csv`` as op
``attention_packed`` (its own section of ``python -m benchmarks.report``).

    python -m benchmarks.bench_packed_bf16 [--rounds 5] [--no-append]

Needs a CPU with AVX-512 BF16 or AMX-BF16 for the bf16-products row (elsewhere that row
is recorded as skipped, with the reason).
"""
from __future__ import annotations

import argparse
import sys

import torch

import vft_kernels as vk
from vft_kernels._ext import C
from vft_kernels.layout import RegisterLayout

from . import run as harness
from .bench_attention import CPU_FP32_INPUTS
from .common import Case, Context

BF16_PRODUCTS = "cpu"
OLD_PATH = "cpu(bf16, float32 products)"
NAME = "forward (packed)"

# (label, P, R, blocks per sample, keep per sample): a VideoFlexTok-like packed batch of
# clips of different lengths, and a FlexTok-like batch of images with per-sample keeps.
SHAPES = [
    ("packed video H=12 D=64 P=256 R=32 blocks 5/3/2/4 keep 32/8/32/16", 256, 32, [5, 3, 2, 4], [32, 8, 32, 16]),
    ("packed image H=12 D=64 P=256 R=256 x4 keep 256/32/64/1", 256, 256, [1, 1, 1, 1], [256, 32, 64, 1]),
]


def _call(layout, keep, cu, q, k, v, bf16_products: bool):
    def fn():
        C.attention_cpu_bf16_brgemm(bf16_products)
        with vk.use_backend("cpu"):
            return vk.register_attention(q, k, v, layout, keep=keep, cu_seqlens=cu)
    return fn


def cases(ctx: Context) -> list[Case]:
    if ctx.device.type != "cpu":
        raise ValueError(f"bench_packed_bf16 times the CPU kernel; got device {ctx.device}")
    isa = C.attention_cpu_bf16_isa()
    out = []
    for label, P, R, blocks, keeps in SHAPES:
        layout = RegisterLayout(max(blocks), P, R, "block_causal_last")
        cu_list = [0]
        for T in blocks:
            cu_list.append(cu_list[-1] + T * (P + R))
        cu = torch.tensor(cu_list, dtype=torch.int32)
        keep = torch.tensor(keeps, dtype=torch.int32)
        g = torch.Generator().manual_seed(0)
        q32, k32, v32 = (torch.randn(1, 12, cu_list[-1], 64, generator=g) for _ in range(3))
        q16, k16, v16 = (t.bfloat16() for t in (q32, k32, v32))
        base = dict(op="attention_packed", name=NAME, shape=f"{label} (N={cu_list[-1]})", dtype="bfloat16", baseline=OLD_PATH)
        out.append(Case(provider=BF16_PRODUCTS, fn=_call(layout, keep, cu, q16, k16, v16, True) if isa else None,
                        skipped=None if isa else "no AMX-BF16 / AVX-512 BF16 on this CPU", **base))
        out.append(Case(provider=OLD_PATH, fn=_call(layout, keep, cu, q16, k16, v16, False), **base))
        out.append(Case(provider=CPU_FP32_INPUTS, fn=_call(layout, keep, cu, q32, k32, v32, False), **base))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape")
    p.add_argument("--min-run-time", type=float, default=5.0, help="seconds of timing per case, all rounds")
    p.add_argument("--all-csv", default=harness.default_all_csv())
    p.add_argument("--no-append", action="store_true", help="do not append the rows to --all-csv")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    ctx = Context(device=torch.device("cpu"))
    harness.measure_ceilings(ctx, min(args.min_run_time, 0.5))
    meta = harness.run_metadata(ctx, quick=False)
    previous = C.attention_cpu_bf16_brgemm(False)
    try:
        rows = harness.run_cases(cases(ctx), ctx, args.min_run_time, verbose=False, rounds=args.rounds)
    finally:
        C.attention_cpu_bf16_brgemm(previous)
    print(f"{meta['device_name']}, {meta['threads']} threads, commit {meta['commit']}, {args.rounds} rounds")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = {r["provider"]: r for r in rows if r["shape"] == shape}
        print(f"{shape}:")
        for provider, r in group.items():
            t = f"{r['median_ms']:8.2f} ms" if "median_ms" in r else f"skipped: {r.get('skipped', r.get('error'))}"
            print(f"  {provider:30s} {t}")
        fast = group[BF16_PRODUCTS]
        if "median_ms" in fast:
            for other in (OLD_PATH, CPU_FP32_INPUTS):
                ratios = [o / b for o, b in zip(harness._rounds(group[other]), harness._rounds(fast))]
                print(f"  bf16 products vs {other}: {harness.round_ratio(harness._rounds(group[other]), harness._rounds(fast)):.2f}x"
                      f" [{min(ratios):.2f}, {max(ratios):.2f}] over rounds")
    if not args.no_append:
        harness.append_results(rows, args.all_csv, meta)
        print(f"appended {len(rows)} rows to {args.all_csv}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
