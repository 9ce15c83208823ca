"""Transformer-block ops (issue #14): each fused op against the unfused reference and
torch.compile of it (forward + backward, harness cases), and the model-level targets
(``python -m benchmarks.bench_block --targets``): a training step of ``tiny`` and of a
wider variant (width 256) on the fastest backend vs the reference backend and vs
torch.compile of the reference model, detokenize (25 APG steps), and the activation memory
a training step holds for its backward (bytes of the tensors autograd saves, counted once
per storage: what the fused ops cut), repeated in interleaved rounds for medians and spread.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

import vft_kernels as vk
from vft_kernels.reference import block as ref

from .common import Case, Context, train_step_fn

# the tiny decoder's block activations: B = 8 clips, T' = 4 latent frames of 64 patches + 16 registers
B, T, P, R, W = 8, 4, 64, 16, 128


def _fastest(device: torch.device) -> list[str]:
    table = vk.available_backends()
    ops = ("block_norm_forward", "block_norm_backward", "swiglu_forward", "qk_norm_forward")
    names = [b for b in table[ops[0]].get(device.type, []) if all(b in table[o].get(device.type, []) for o in ops)]
    return [b for b in names if b != "reference" and not (b == "triton" and device.type == "cpu")]


def _fwd_bwd(fn, inputs, provider):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def run():
        with vk.use_backend(None if provider == "compile(reference)" else provider):
            outs = fn(*leaves)
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for leaf in leaves:
            leaf.grad = None
    return run


def _op_fns(layout):
    return {
        "gated_residual_norm": (lambda x, g, h, s, b: vk.gated_residual_norm(x, g, h, layout, scale=s, shift=b,
                                                                             eps=1e-5),
                                lambda x, g, h, s, b: ref.gated_residual_norm(x, g, h, s, b, P, 1e-5)),
        "modulated_layer_norm": (lambda x, s, b: vk.modulated_layer_norm(x, layout, scale=s, shift=b, eps=1e-5),
                                 lambda x, s, b: ref.modulated_layer_norm(x, s, b, P, 1e-5)),
        "swiglu": (vk.swiglu, ref.swiglu),
        "qk_rms_norm": (lambda q, a, b: vk.qk_rms_norm(q, 2, a, b), lambda q, a, b: ref.qk_rms_norm(q, 2, a, b, 1e-6)),
    }


def cases(ctx: Context) -> list[Case]:
    dev = ctx.device
    S = P + R
    layout = vk.RegisterLayout(T, P, R, "block_causal")
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    x, h = rnd(B, T, S, W), rnd(B, T, S, W)
    mod = [rnd(B, T, 2, W) for _ in range(3)]
    inputs = {
        "gated_residual_norm": (x, mod[0], h, mod[1], mod[2]),
        "modulated_layer_norm": (x, mod[1], mod[2]),
        "swiglu": (rnd(B, T * S, 2 * 384),),
        "qk_rms_norm": (rnd(B, T * S, 3 * W), rnd(64), rnd(64)),
    }
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    out = []
    for name, (fused, unfused) in _op_fns(layout).items():
        shape = f"B={B} T={T} S={S} W={W}" if name != "swiglu" else f"{B * T * S} x 2*384"
        args = inputs[name]
        nbytes = sum(t.numel() * t.element_size() for t in args)
        out.append(Case("block", f"{name} fwd+bwd", shape, "float32", "reference",
                        _fwd_bwd(lambda *a, f=unfused: f(*a), args, "reference"), bytes=3 * nbytes))
        if ctx.quick:
            out.append(Case("block", f"{name} fwd+bwd", shape, "float32", "compile(reference)", None,
                            skipped="--quick: no torch.compile"))
        else:
            out.append(Case("block", f"{name} fwd+bwd", shape, "float32", "compile(reference)",
                            _fwd_bwd(torch.compile(unfused, dynamic=False), args, "compile(reference)"),
                            bytes=3 * nbytes))
        for provider in _fastest(dev):
            out.append(Case("block", f"{name} fwd+bwd", shape, "float32", provider,
                            _fwd_bwd(fused, args, provider), bytes=3 * nbytes))
    return out


# --------------------------------------------------------------------------------------
# Model-level targets


def _model_setup(width: int, batch: int, device):
    from vft.config import TransformerConfig, preset, tiny_train_config
    from vft.data import SyntheticVideos
    from vft.model import VideoFlexTok
    from vft.train import draw, make_optimizer

    cfg = preset("tiny")
    if width != cfg.decoder.width:
        cfg = dataclasses.replace(cfg, name=f"tiny-w{width}", encoder=TransformerConfig(width, cfg.encoder.depth),
                                  decoder=TransformerConfig(width, cfg.decoder.depth))
    data = SyntheticVideos(cfg.frames, cfg.height, cfg.width, seed=7)
    video = torch.stack([data[i] for i in range(batch)]).to(device)
    tcfg = tiny_train_config(batch_size=batch)
    inputs = {k: v.to(device) for k, v in draw(cfg, tcfg, batch, torch.Generator().manual_seed(0)).items()}
    torch.manual_seed(0)
    model = VideoFlexTok(cfg).to(device).train()
    opt = make_optimizer(model, tcfg)
    return cfg, model, opt, video, inputs


def saved_activation_bytes(model, video, inputs) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one training loss
    (the activation memory a step holds at the end of its forward; parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device.type != "meta":
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(video, **inputs)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def targets(rounds: int, reps: int, batch: int, widths, compile_ref: bool, out_dir: str) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fast = _fastest(device)[0]
    results: dict = {"device": str(device), "fastest": fast, "batch": batch, "rounds": rounds, "cases": {}}
    setups = {w: _model_setup(w, batch, device) for w in widths}
    runs = {}
    for w, (cfg, model, opt, video, inputs) in setups.items():
        step = train_step_fn(model, opt, video, inputs)
        for backend in (fast, "reference"):
            runs[(f"train step {cfg.name}", backend)] = (lambda b=backend, s=step: _with(b, s))
        if compile_ref:
            compiled = torch.compile(model, dynamic=False)
            cstep = train_step_fn(compiled, opt, video, inputs)
            runs[(f"train step {cfg.name}", "compile(reference)")] = (lambda s=cstep: _with("reference", s))
        for backend in (fast, "reference"):
            with vk.use_backend(backend):
                results["cases"][f"saved activations {cfg.name} MB ({backend})"] = \
                    saved_activation_bytes(model, video, inputs) / 2**20
    cfg, model, _, video, _ = setups[widths[0]]
    model.eval()
    with torch.no_grad():
        tokens = model.tokenize(video)
    for backend in (fast, "reference"):
        runs[(f"detokenize 25 apg {cfg.name}", backend)] = (
            lambda b=backend: _with(b, lambda: model.detokenize(tokens, steps=25, guidance="apg", scale=1.5)))
    times: dict = {k: [] for k in runs}
    for r in range(rounds):  # interleaved rounds: drift on a noisy machine hits every provider alike
        for key, fn in runs.items():
            times[key].append(_time(fn, reps))
            print(f"round {r + 1}/{rounds} {key[0]:<34} {key[1]:<20} {times[key][-1] * 1e3:9.1f} ms",
                  file=sys.stderr, flush=True)
    for (name, provider), ts in times.items():
        results["cases"][f"{name} ms ({provider})"] = {"median": statistics.median(ts) * 1e3,
                                                       "min": min(ts) * 1e3, "max": max(ts) * 1e3}
    for (name, provider), ts in times.items():
        if provider == fast:
            for base in ("reference", "compile(reference)"):
                if (name, base) in times:
                    ratios = [b / f for b, f in zip(times[(name, base)], ts)]
                    results["cases"][f"{name} speedup vs {base}"] = {
                        "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    for w in widths:
        name = setups[w][0].name
        a, b = (results["cases"][f"saved activations {name} MB ({p})"] for p in (fast, "reference"))
        results["cases"][f"saved activations {name} reduction %"] = 100 * (1 - a / b)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "block_targets.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def _with(backend, fn):
    with vk.use_backend(backend):
        return fn()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", action="store_true", help="the model-level targets (default: the per-op cases)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5, help="timed calls per round (median taken)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--widths", default="128,256", help="decoder/encoder widths of the tiny variants")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference model) baseline")
    p.add_argument("--out", default="results/block")
    args = p.parse_args(argv)
    if not args.targets:
        from .run import main as run_main
        run_main(["--ops", "block", "--out", args.out])
        return
    res = targets(args.rounds, args.reps, args.batch, [int(w) for w in args.widths.split(",")],
                  not args.no_compile, args.out)
    for k, v in res["cases"].items():
        if isinstance(v, dict):
            print(f"{k:<62} median {v['median']:9.2f}  [{v['min']:.2f}, {v['max']:.2f}]")
        else:
            print(f"{k:<62} {v:9.2f}")


if __name__ == "__main__":
    main()
