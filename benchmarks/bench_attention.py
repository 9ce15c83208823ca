"""Register attention benchmark cases (docs/spec.md §2): vft backends against PyTorch SDPA,
compiled FlexAttention and, on CUDA, flash-attn and xformers; forward and forward+backward.

Baseline of every case: SDPA with its fastest valid boolean mask, built once outside the
timing: the shared [N, N] mask (broadcast over batch and heads) when all samples keep the
same number of registers, else the per-sample [B, 1, N, N] mask; the provider's name says
which ("sdpa(shared [N,N] mask)" / "sdpa(per-sample mask)").

GPU baselines are what a user would run without vft: the cheapest dense computation that
covers the mask, so they compute more pairs than allowed and not the same result.
``flash_attn_func`` attends all N tokens without a mask; ``flash_attn_varlen_func`` and
xformers' ``memory_efficient_attention`` with a ``BlockDiagonalMask`` attend, per sample,
its kept tokens (every patch and the first ``keep`` registers of each block) without the
block-causal / register mask among them. Their inputs are put into their layout
(transposed, packed) once, outside the timing. They are timed only on CUDA and when
importable (the ``bench-gpu`` extra); otherwise each gives a skipped case with the
reason. flash-attn has no float32 kernels, so on CUDA every case also runs in bfloat16; on
the CPU the bfloat16 cases (full runs) add ``cpu(float32 inputs)``, the same kernel on float32
copies, so that the bf16 path's gain (AMX tile products where the CPU has AMX-BF16) is a
same-run ratio.

Shapes: FlexTok-like image (B=4, H=12, T=1, P=256, R=256, D=64; keep all, 32, 1 and
per-sample powers of two) and VideoFlexTok-like video (B=2, H=12, T=5, P=256, R=32 and
R=256, ``block_causal_last``; and R=32 with a different keep per latent frame, the per-block
keep of adaptive token budgets). ``flops`` counts only the allowed (query, key) pairs, for
every provider: 4 * D * pairs * H forward, 2.5x that for forward+backward. Quick mode:
the image shape with keep=32, forward only.

Run through the harness (``python -m benchmarks.run --ops attention``) or standalone:
``python -m benchmarks.bench_attention [--quick]`` (CPU, torch.utils.benchmark medians).
"""
from __future__ import annotations

import functools
import importlib
import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import vft_kernels as vk
from vft_kernels.layout import RegisterLayout, Tile
from vft_kernels.reference import attention as ref

from .common import Case, Context

SDPA_SHARED = "sdpa(shared [N,N] mask)"
SDPA_PER_SAMPLE = "sdpa(per-sample mask)"
FLASH_DENSE = "flash-attn(all tokens, no mask)"
FLASH_VARLEN = "flash-attn varlen(kept tokens, no mask)"
XFORMERS = "xformers(BlockDiagonalMask, kept tokens)"
CPU_FP32_INPUTS = "cpu(float32 inputs)"


def _shapes(quick: bool):
    """(label, B, H, D, layout, keep list: an int per sample, or per block a list per sample)."""
    image = RegisterLayout(1, 256, 256, "block_causal_last")
    if quick:
        return [("image", 4, 12, 64, image, [32] * 4)]
    shapes = [("image", 4, 12, 64, image, keep) for keep in ([256] * 4, [32] * 4, [1] * 4, [1, 8, 64, 256])]
    for R in (32, 256):
        video = RegisterLayout(5, 256, R, "block_causal_last")
        shapes += [("video", 2, 12, 64, video, [R] * 2), ("video", 2, 12, 64, video, [R, R // 4])]
    # Per-frame token budgets (vft.adaptive / vft.router): a keep per latent frame, the same
    # 60 % of the registers on average as the [R, R // 4] case of R = 32 above.
    video = RegisterLayout(5, 256, 32, "block_causal_last")
    shapes.append(("video", 2, 12, 64, video, [[32, 8, 16, 4, 32], [4, 4, 32, 8, 16]]))
    return shapes


def sdpa_mask(layout: RegisterLayout, keep: torch.Tensor) -> tuple[str, torch.Tensor]:
    """SDPA's fastest valid boolean mask for ``keep`` (int [B], or per block [B, T]) and the
    provider name saying which it is: the shared [N, N] mask when every sample keeps the
    same registers, else the per-sample [B, 1, N, N] mask."""
    if bool((keep == keep[0]).all()):
        return SDPA_SHARED, layout.materialize(keep[:1])[0]
    return SDPA_PER_SAMPLE, layout.materialize(keep)[:, None]


def _unchanged(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class Provider:
    """How one provider computes a case: ``fn(q, k, v)`` on inputs that ``prepare`` turned
    from [B, H, N, D] into its own layout (once, outside the timing), or why it is skipped."""

    fn: Optional[Callable] = None
    prepare: Callable[[torch.Tensor], torch.Tensor] = _unchanged
    no_backward: Optional[str] = None  # why forward+backward is not timed
    skipped: Optional[str] = None  # why nothing is timed


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_providers(ctx: Context, layout: RegisterLayout, keep: torch.Tensor, scale: float) -> dict[str, Provider]:
    """Compiled FlexAttention with the layout's mask_mod, with and without building the
    block mask in the timed call (keep changes every training step, so a training loop
    rebuilds it each call; the variant without the build shows the kernel alone)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:
        why = f"FlexAttention is not importable ({e})"
        return {"flex(compiled)+mask build": Provider(skipped=why), "flex(compiled)": Provider(skipped=why)}
    flex = _compiled_flex()
    B, N = keep.shape[0], layout.seq_len

    def block_mask():
        return create_block_mask(layout.mask_mod(keep), B, None, N, N, device=ctx.device)

    fixed = block_mask()
    no_backward = "FlexAttention has no CPU backward" if ctx.device.type == "cpu" else None
    return {
        "flex(compiled)+mask build": Provider(lambda q, k, v: flex(q, k, v, block_mask=block_mask(), scale=scale),
                                              no_backward=no_backward),
        "flex(compiled)": Provider(lambda q, k, v: flex(q, k, v, block_mask=fixed, scale=scale),
                                   no_backward=no_backward),
    }


def _unavailable(ctx: Context, library: str, module: str) -> Optional[str]:
    """Why the GPU library ``library`` (imported as ``module``) cannot be timed here, or None."""
    if ctx.device.type != "cuda":
        return f"{library} needs CUDA; this run is on {ctx.device.type}"
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{library} is not importable ({e}); install the bench-gpu extra"
    return None


def _kept_tokens(layout: RegisterLayout, keep, device: torch.device) -> torch.Tensor:
    """Indices of the tokens a sample keeping ``keep`` registers per block (an int, or a list
    of one per block) has: every patch and the first ``keep`` registers of each block."""
    n = torch.arange(layout.seq_len, device=device)
    per_token = torch.tensor(keep, device=device)[n // layout.block_size] if isinstance(keep, list) else keep
    return (n % layout.block_size < layout.patches + per_token).nonzero().flatten()


def _pack(t: torch.Tensor, index: list[torch.Tensor]) -> torch.Tensor:
    """[B, H, N, D] -> [sum of kept tokens, H, D]: sample b's tokens ``index[b]``, samples
    concatenated (the packed layout of flash-attn varlen and xformers' BlockDiagonalMask)."""
    return torch.cat([t[b, :, i].transpose(0, 1) for b, i in enumerate(index)]).contiguous()


def _gpu_providers(ctx: Context, layout: RegisterLayout, keep: torch.Tensor, scale: float,
                   dtype: torch.dtype) -> dict[str, Provider]:
    """flash-attn and xformers on the cheapest dense superset of the mask (module doc)."""
    index = [_kept_tokens(layout, n, ctx.device) for n in keep.tolist()]
    lengths = [len(i) for i in index]
    out = {}
    why = _unavailable(ctx, "flash-attn", "flash_attn")
    if why is None and dtype == torch.float32:
        why = "flash-attn has no float32 kernels (fp16 / bf16 only)"
    if why is not None:
        out[FLASH_DENSE] = out[FLASH_VARLEN] = Provider(skipped=why)
    else:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=ctx.device)
        longest = max(lengths)
        out[FLASH_DENSE] = Provider(lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=scale),
                                    prepare=lambda t: t.transpose(1, 2).contiguous())
        out[FLASH_VARLEN] = Provider(
            lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scale),
            prepare=lambda t: _pack(t, index))
    why = _unavailable(ctx, "xformers", "xformers.ops")
    if why is not None:
        out[XFORMERS] = Provider(skipped=why)
    else:
        from xformers.ops import memory_efficient_attention
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        bias = BlockDiagonalMask.from_seqlens(lengths, device=ctx.device)
        out[XFORMERS] = Provider(lambda q, k, v: memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale),
                                 prepare=lambda t: _pack(t, index)[None])
    return out


def _providers(ctx: Context, layout: RegisterLayout, keep: torch.Tensor, scale: float,
               dtype: torch.dtype) -> tuple[str, dict[str, Provider]]:
    """(baseline name, name -> Provider); the baseline comes first."""
    baseline, mask = sdpa_mask(layout, keep)

    def backend(name):
        def run(q, k, v):
            with vk.use_backend(name):
                return vk.register_attention(q, k, v, layout, keep=keep, scale=scale)
        return run

    providers = {
        baseline: Provider(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)),
        "reference": Provider(lambda q, k, v: ref.attention_forward(q, k, v, layout, keep, scale)[0]),
    }
    vft_backend = "cpu" if ctx.device.type == "cpu" else "triton"
    providers[vft_backend] = Provider(backend(vft_backend))
    if ctx.device.type == "cpu" and dtype == torch.bfloat16:
        # The same kernel on float32 copies of the inputs: the bf16 path's gain in this case.
        providers[CPU_FP32_INPUTS] = Provider(backend("cpu"), prepare=lambda t: t.float())
    providers.update(_flex_providers(ctx, layout, keep, scale))
    providers.update(_gpu_providers(ctx, layout, keep, scale, dtype))
    return baseline, providers


TILE = 64  # the CPU kernel's query and key tile (csrc/cpu/attention.cpp kBlockM / kBlockN)


def _executed_pairs(layout: RegisterLayout, keep: list) -> int:
    """(query, key) pairs in the 64 x 64 tiles a tile-skipping kernel executes (every tile
    that is not fully masked), summed over samples: executed / allowed pairs is the tile
    waste, and GFLOP/s x that ratio is the rate on executed tiles."""
    N = layout.seq_len
    total = 0
    for kp in keep:
        for q0 in range(0, N, TILE):
            q1 = min(q0 + TILE, N)
            for k0 in range(0, N, TILE):
                k1 = min(k0 + TILE, N)
                if layout.classify_tile(q0, q1, k0, k1, kp) != Tile.MASKED:
                    total += (q1 - q0) * (k1 - k0)
    return total


def cases(ctx: Context) -> list[Case]:
    # bf16 on the CPU too (AMX tile products where the CPU has them), except in quick runs.
    dtypes = (torch.float32,) if ctx.device.type == "cpu" and ctx.quick else (torch.float32, torch.bfloat16)
    out = []
    for label, B, H, D, layout, keep in _shapes(ctx.quick):
        for dtype in dtypes:
            out += _shape_cases(ctx, label, B, H, D, layout, keep, dtype)
    return out


def _shape_cases(ctx: Context, label: str, B: int, H: int, D: int, layout: RegisterLayout, keep: list[int],
                 dtype: torch.dtype) -> list[Case]:
    N = layout.seq_len
    keep_t = torch.tensor(keep, dtype=torch.int32, device=ctx.device)
    scale = D ** -0.5
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, N, D, device=ctx.device, dtype=dtype, generator=gen) for _ in range(4))
    pairs = sum(layout.allowed_pairs(x) for x in keep)
    flops = 4.0 * D * pairs * H
    if isinstance(keep[0], list):  # per block
        keep_s = "keep per frame=" + "/".join(",".join(map(str, row)) for row in keep)
    else:
        keep_s = f"keep={keep[0]}" if len(set(keep)) == 1 else "keep=" + "/".join(map(str, keep))
    shape = (f"{label} B={B} H={H} T={layout.blocks} P={layout.patches} R={layout.registers} "
             f"D={D} N={N} {layout.mode} {keep_s}")
    extra = {"density": round(layout.density(keep_t.cpu()), 4), "keep": keep_s,
             "executed/allowed pairs": round(_executed_pairs(layout, keep) / pairs, 4)}
    dtype_s = str(dtype).replace("torch.", "")
    baseline, providers = _providers(ctx, layout, keep_t, scale, dtype)
    out = []
    for name, p in providers.items():
        def case(what, fn, skipped=None, work=flops):
            return Case("attention", what, shape, dtype_s, name, fn, baseline=baseline, flops=work,
                        extra=dict(extra), skipped=skipped)

        if p.skipped is not None:
            out.append(case("forward", None, p.skipped))
            if not ctx.quick:
                out.append(case("forward+backward", None, p.skipped, 2.5 * flops))
            continue
        qp, kp, vp, doutp = (p.prepare(t) for t in (q, k, v, dout))
        out.append(case("forward", functools.partial(_forward, p.fn, qp, kp, vp)))
        if ctx.quick:
            continue
        if p.no_backward is not None:
            out.append(case("forward+backward", None, p.no_backward, 2.5 * flops))
            continue
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (qp, kp, vp))
        out.append(case("forward+backward", functools.partial(_forward_backward, p.fn, qg, kg, vg, doutp),
                        work=2.5 * flops))
    return out


def _forward(fn, q, k, v):
    with torch.no_grad():
        return fn(q, k, v)


def _forward_backward(fn, q, k, v, dout):
    return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)


def _main():
    """Standalone CPU run: median of each case, ratio to the baseline, GFLOP/s against a
    1024^3 float32 matmul timed right before each case (the machine may be shared)."""
    import argparse

    import torch.utils.benchmark as tbench

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--shapes", choices=("image", "video", "all"), default="all")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "all"), default="all")
    parser.add_argument("--providers", default="",
                        help="semicolon-separated provider names to time (default: all), e.g. "
                             "'cpu;cpu(float32 inputs);sdpa(shared [N,N] mask);sdpa(per-sample mask)'")
    parser.add_argument("--forward-only", action="store_true")
    args = parser.parse_args()
    wanted = [p for p in args.providers.split(";") if p]

    def median(fn):
        fn()  # warm-up (and compilation)
        # num_threads: torch.utils.benchmark.Timer runs on 1 thread unless told otherwise
        return tbench.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=args.min_run_time).median

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)

    def matmul_rate():
        return 2 * 1024 ** 3 / median(lambda: a @ b) / 1e9

    ctx = Context(torch.device("cpu"), quick=args.quick, matmul_gflops=matmul_rate())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    times = {}
    for c in cases(ctx):
        if args.shapes != "all" and not c.shape.startswith(args.shapes):
            continue
        if (args.dtype != "all" and c.dtype != args.dtype) or (wanted and c.provider not in wanted) \
                or (args.forward_only and c.name != "forward"):
            continue
        if c.skipped is not None:
            print(f"{c.name:17s} {c.shape:80s} {c.provider:42s} skipped: {c.skipped}", flush=True)
            continue
        mm_rate = matmul_rate()
        t = median(c.fn)
        times[(c.name, c.shape, c.dtype, c.provider)] = t
        base = times.get((c.name, c.shape, c.dtype, c.baseline))
        ratio = f"{base / t:5.2f}x" if base else "   - "
        print(f"{c.name:17s} {c.dtype:9s} {c.shape:80s} {c.provider:42s} {t * 1e3:9.2f} ms  vs sdpa {ratio}  "
              f"{c.flops / t / 1e9:6.1f} GFLOP/s ({c.flops / t / 1e9 / mm_rate:4.0%} of mm)  "
              f"(mm {mm_rate:.0f})  density {c.extra['density']}", flush=True)


if __name__ == "__main__":
    _main()
