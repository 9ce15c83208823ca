"""Register attention benchmark cases (SPEC.md §2): vft backends against SDPA with a dense
boolean mask and compiled FlexAttention, forward and forward+backward.

Shapes: FlexTok-like image (B=4, H=12, T=1, P=256, R=256, D=64; keep all, 32, 1 and
per-sample powers of two) and VideoFlexTok-like video (B=2, H=12, T=5, P=256, R=32 and
R=256, ``block_causal_last``). ``flops`` counts only the allowed (query, key) pairs:
4 * D * pairs * H forward, 2.5x that for forward+backward. Quick mode: the image shape
with keep=32, forward only.

Run through the harness (``python -m benchmarks.run --ops attention``) or standalone:
``python -m benchmarks.bench_attention [--quick]`` (CPU, torch.utils.benchmark medians).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import vft_kernels as vk
from vft_kernels.layout import RegisterLayout
from vft_kernels.reference import attention as ref

from .common import Case, Context

BASELINE = "sdpa(dense mask)"


def _shapes(quick: bool):
    """(label, B, H, D, layout, keep list)."""
    image = RegisterLayout(1, 256, 256, "block_causal_last")
    if quick:
        return [("image", 4, 12, 64, image, [32] * 4)]
    shapes = [("image", 4, 12, 64, image, keep) for keep in ([256] * 4, [32] * 4, [1] * 4, [1, 8, 64, 256])]
    for R in (32, 256):
        video = RegisterLayout(5, 256, R, "block_causal_last")
        shapes += [("video", 2, 12, 64, video, [R] * 2), ("video", 2, 12, 64, video, [R, R // 4])]
    return shapes


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _providers(ctx: Context, layout, keep_t, scale):
    """name -> (q, k, v) -> out, plus whether it has a backward."""
    mask = layout.materialize(keep_t, ctx.device)[:, None]  # built once: SDPA's best case
    B, N = keep_t.shape[0], layout.seq_len

    def backend(name):
        def run(q, k, v):
            with vk.use_backend(name):
                return vk.register_attention(q, k, v, layout, keep=keep_t, scale=scale)
        return run

    providers = {
        BASELINE: (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), True),
        "reference": (lambda q, k, v: ref.attention_forward(q, k, v, layout, keep_t, scale)[0], True),
    }
    if ctx.device.type == "cpu":
        providers["cpu"] = (backend("cpu"), True)
    else:
        providers["triton"] = (backend("triton"), True)
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError:
        return providers
    flex = _compiled_flex()

    def block_mask():
        return create_block_mask(layout.mask_mod(keep_t), B, None, N, N, device=ctx.device)

    fixed = block_mask()
    # keep changes every training step, so the block mask is rebuilt in every call; the
    # variant without the build shows the kernel alone. No CPU backward for FlexAttention.
    has_bwd = ctx.device.type != "cpu"
    providers["flex(compiled)+mask build"] = (lambda q, k, v: flex(q, k, v, block_mask=block_mask(), scale=scale),
                                              has_bwd)
    providers["flex(compiled)"] = (lambda q, k, v: flex(q, k, v, block_mask=fixed, scale=scale), has_bwd)
    return providers


def cases(ctx: Context) -> list[Case]:
    out = []
    dtype = torch.float32
    for label, B, H, D, layout, keep in _shapes(ctx.quick):
        N = layout.seq_len
        keep_t = torch.tensor(keep, dtype=torch.int32, device=ctx.device)
        scale = D ** -0.5
        gen = torch.Generator(device=ctx.device).manual_seed(0)
        q, k, v, dout = (torch.randn(B, H, N, D, device=ctx.device, dtype=dtype, generator=gen) for _ in range(4))
        pairs = sum(layout.allowed_pairs(x) for x in keep)
        flops = 4.0 * D * pairs * H
        keep_s = f"keep={keep[0]}" if len(set(keep)) == 1 else "keep=" + "/".join(map(str, keep))
        shape = (f"{label} B={B} H={H} T={layout.blocks} P={layout.patches} R={layout.registers} "
                 f"D={D} N={N} {layout.mode} {keep_s}")
        extra = {"density": round(layout.density(keep_t.cpu()), 4), "keep": keep_s}
        for provider, (fn, has_bwd) in _providers(ctx, layout, keep_t, scale).items():
            out.append(Case("attention", "forward", shape, "float32", provider,
                            functools.partial(_forward, fn, q, k, v), baseline=BASELINE, flops=flops,
                            extra=dict(extra)))
            if has_bwd and not ctx.quick:
                qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
                out.append(Case("attention", "forward+backward", shape, "float32", provider,
                                functools.partial(_forward_backward, fn, qg, kg, vg, dout), baseline=BASELINE,
                                flops=2.5 * flops, extra=dict(extra)))
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
    args = parser.parse_args()

    def median(fn):
        fn()  # warm-up (and compilation)
        return tbench.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=args.min_run_time).median

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)

    def matmul_rate():
        return 2 * 1024 ** 3 / median(lambda: a @ b) / 1e9

    ctx = Context(torch.device("cpu"), quick=args.quick, matmul_gflops=matmul_rate())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    times = {}
    for c in cases(ctx):
        if args.shapes != "all" and not c.shape.startswith(args.shapes):
            continue
        mm_rate = matmul_rate()
        t = median(c.fn)
        times[(c.name, c.shape, c.provider)] = t
        base = times.get((c.name, c.shape, c.baseline))
        ratio = f"{base / t:5.2f}x" if base else "   - "
        print(f"{c.name:17s} {c.shape:80s} {c.provider:26s} {t * 1e3:9.2f} ms  vs sdpa {ratio}  "
              f"{c.flops / t / 1e9:6.1f} GFLOP/s ({c.flops / t / 1e9 / mm_rate:4.0%} of mm)  "
              f"(mm {mm_rate:.0f})  density {c.extra['density']}", flush=True)


if __name__ == "__main__":
    _main()
