"""Flow step benchmarks: one step per guidance mode against the eager reference and
torch.compile(reference), for a VideoFlexTok chunk latent, a long video latent and an
image latent (fp32). ``bytes`` counts the tensors that must be read and written once.

``python -m benchmarks.bench_flow [--quick]`` times the cases on their own (median of
torch.utils.benchmark); ``python -m benchmarks.run --ops flow`` runs them in the harness.
"""
from __future__ import annotations

import argparse

import torch

import vft_kernels as vk
from vft_kernels import dispatch
from vft_kernels.reference import flow as ref

from .common import Case, Context

SHAPES = ((4, 16, 5, 32, 32), (2, 16, 21, 32, 32), (8, 16, 32, 32))
MODES = {
    # name: (flow_step options, tensors read + written per element)
    "none step": (dict(guidance="none"), 3),
    "cfg step": (dict(guidance="cfg", scale=3.0), 4),
    "apg step (momentum, threshold)": (dict(guidance="apg", scale=3.0, apg_eta=0.0, apg_norm_threshold=2.5,
                                            apg_momentum=-0.5), 6),
}


SAME_TRAFFIC = "same traffic: torch.addcmul(out=)"


def _kernel_backends(device):
    return [b for b in dispatch.PRIORITY[device.type] if b != "reference"
            and dispatch.backend_status(b) is None and dispatch._REGISTRY[("flow_step", b)].load() is None]


def _shape_cases(shape, dev, compiled) -> list[Case]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x, vc, vu = (torch.randn(shape, generator=g).to(dev) for _ in range(3))
    t = torch.full((shape[0],), 0.6, device=dev)
    tn = torch.full((shape[0],), 0.5, device=dev)
    dst = torch.empty_like(x)
    out = []
    for name, (kw, streams) in MODES.items():
        args = dict(kw, v_uncond=None if kw["guidance"] == "none" else vu)

        def case(provider, fn, name=name, streams=streams):
            return Case("flow", name, "x".join(map(str, shape)), "float32", provider, fn,
                        bytes=streams * x.numel() * x.element_size())

        def state(kw=kw):  # each provider its own APG momentum state
            return torch.zeros_like(x) if kw.get("apg_momentum") else None

        out.append(case("reference", lambda a=args, m=state(): ref.flow_step(x, vc, t, tn, momentum=m, **a)))
        out.append(case("compile(reference)", lambda a=args, m=state(): compiled(x, vc, t, tn, momentum=m, **a)))
        for backend in _kernel_backends(dev):
            def run(b=backend, a=args, m=state()):
                with vk.use_backend(b):
                    return vk.flow_step(x, vc, t, tn, momentum=m, out=dst, **a)

            out.append(case(backend, run))
            # The backend function alone (no torch.library / argument-check layer): shows
            # how much of a step is the op layer's fixed cost.
            m = state()
            fn = dispatch._REGISTRY[("flow_step", backend)]._fn
            call = (dst, x, vc, args["v_uncond"], t, tn, kw["guidance"], kw.get("scale", 1.0), kw.get("apg_eta", 0.0),
                    kw.get("apg_norm_threshold", 0.0), kw.get("apg_momentum", 0.0), m, 3, None, 0)
            out.append(case(f"{backend} (kernel only)", lambda fn=fn, call=call: fn(*call)))
        if kw["guidance"] == "cfg":
            # The same bytes moved by one stock ATen op (3 tensors read, 1 written): what a
            # step with the CFG step's traffic costs on this memory hierarchy, so the most any
            # kernel writing a separate output can reach against the other providers.
            out.append(case(SAME_TRAFFIC, lambda: torch.addcmul(x, vc, vu, out=dst)))
    return out


def cases(ctx: Context) -> list[Case]:
    # One compiled graph per (shape, guidance): more than dynamo's default 8 per function.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    compiled = torch.compile(ref.flow_step, dynamic=False)
    shapes = SHAPES[:1] if ctx.quick else SHAPES
    return [c for shape in shapes for c in _shape_cases(shape, ctx.device, compiled)]


def overhead(repeats: int = 7, calls: int = 2000) -> dict:
    """The op layer's fixed cost per APG step (microseconds, median of ``repeats`` runs of
    ``calls`` calls) on a tiny tensor, where the kernel itself costs almost nothing: the
    public ``vk.flow_step`` with float and with tensor times, one step of the
    ``vk.flow_sample`` loop (its velocity function returns precomputed tensors), and the
    backend function alone. Overhead = a row minus "kernel only"."""
    import statistics
    import time

    from vft_kernels.ops import flow as flow_ops
    from vft_kernels.ops.flow import _LoopStepper

    dev = torch.device("cpu")
    backend = _kernel_backends(dev)[0]
    x, vc, vu = (torch.randn(4, 16, 5, 2, 2) for _ in range(3))
    dst = torch.empty_like(x)
    t, tn = torch.full((4,), 0.6), torch.full((4,), 0.5)
    kw = dict(guidance="apg", scale=3.0)
    fn = dispatch._REGISTRY[("flow_step", backend)]._fn
    step = _LoopStepper(dict(kw, apg_eta=0.0, apg_norm_threshold=0.0, apg_momentum=0.0, reduce_ndim=3,
                             prefix=None, prefix_len=0))
    heun_entry = dispatch._REGISTRY[("flow_heun_step", backend)]
    if heun_entry.load() is not None:
        raise RuntimeError(f"flow_heun_step's {backend} backend does not load: {heun_entry.load()}")
    heun = heun_entry._fn

    def heun_checked():  # the op layer without its C++ fast path (what every call ran before it)
        saved, flow_ops._FAST_HEUN = flow_ops._FAST_HEUN, None
        try:
            vk.flow_heun_step(x, vc, vu, t, tn, out=dst)
        finally:
            flow_ops._FAST_HEUN = saved

    rows = {
        "flow_step, float times": lambda: vk.flow_step(x, vc, 0.6, 0.5, vu, out=dst, **kw),
        "flow_step, tensor times": lambda: vk.flow_step(x, vc, t, tn, vu, out=dst, **kw),
        "flow_sample loop step": lambda: step(x, vc, t, tn, vu, dst),
        f"{backend} kernel only": lambda: fn(dst, x, vc, vu, t, tn, "apg", 3.0, 0.0, 0.0, 0.0, None, 3, None, 0),
        "heun: flow_heun_step, float times": lambda: vk.flow_heun_step(x, vc, vu, 0.6, 0.5, out=dst),
        "heun: flow_heun_step, tensor times": lambda: vk.flow_heun_step(x, vc, vu, t, tn, out=dst),
        "heun: checked path (no fast path), tensor times": heun_checked,
        f"heun: {backend} kernel only": lambda: heun(dst, x, vc, vu, t, tn),
    }
    out = {}
    for name, f in rows.items():
        for _ in range(200):
            f()
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            runs.append((time.perf_counter() - t0) / calls * 1e6)
        out[name] = statistics.median(runs)
    return out


def main(argv=None):
    import torch.utils.benchmark as tb

    p = argparse.ArgumentParser(description="time the flow step cases (median, torch.utils.benchmark)")
    p.add_argument("--quick", action="store_true", help="only the [4, 16, 5, 32, 32] latent")
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--overhead", action="store_true", help="only the op layer's fixed cost per call (us)")
    args = p.parse_args(argv)
    if args.overhead:
        res = overhead()
        for name, us in res.items():  # overhead against the kernel of the same group (apg, heun)
            group = name.split(": ")[0] + ": " if name.startswith("heun: ") else ""
            floor = res[next(k for k in res if k.endswith("kernel only") and k.startswith(group))]
            print(f"{name:48s} {us:8.1f} us  (overhead {us - floor:6.1f} us)")
        return
    ctx = Context(device=torch.device("cpu"), quick=args.quick)
    base = {}
    print(f"{'shape':14s} {'step':32s} {'provider':20s} {'median ms':>10s} {'speedup':>8s} {'GB/s':>7s}")
    for c in cases(ctx):
        for _ in range(3):  # warm-up (and torch.compile)
            c.fn()
        med = tb.Timer("f()", globals={"f": c.fn}).blocked_autorange(min_run_time=args.min_run_time).median
        key = (c.name, c.shape)
        if c.provider == c.baseline:
            base[key] = med
        print(f"{c.shape:14s} {c.name:32s} {c.provider:20s} {med * 1e3:10.3f} {base[key] / med:8.2f} "
              f"{c.bytes / med / 1e9:7.1f}")


if __name__ == "__main__":
    main()
