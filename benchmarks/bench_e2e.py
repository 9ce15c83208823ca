"""End-to-end benchmark of the tiny VideoFlexTok: tokenize, detokenize (25 steps, APG) and
one training step on a batch of clips, once per backend (provider = backend name, forced
with ``vk.use_backend``); baseline "reference". The weights are random: speed does not
depend on them."""
from __future__ import annotations

import torch

import vft_kernels as vk
from vft.config import preset, tiny_train_config
from vft.data import SyntheticVideos
from vft.model import VideoFlexTok
from vft.train import draw, make_optimizer

from .common import Case, Context, train_step_fn

OPS = ("fsq_forward", "fsq_decode", "attention_forward", "attention_backward", "flow_step")


def backends(device: torch.device) -> list[str]:
    """Backends that run every op the model needs on ``device`` (Triton's CPU interpreter
    is a test tool, not a provider)."""
    table = vk.available_backends()
    names = [b for b in table[OPS[0]].get(device.type, []) if all(b in table[op].get(device.type, []) for op in OPS)]
    if "reference" not in names:
        names.append("reference")
    return [b for b in names if not (b == "triton" and device.type == "cpu")]


def _forced(name, fn):
    def run():
        with vk.use_backend(name):
            return fn()
    return run


def cases(ctx: Context) -> list[Case]:
    cfg = preset("tiny")
    batch = 2 if ctx.quick else 4
    steps = 25
    torch.manual_seed(0)
    model = VideoFlexTok(cfg).to(ctx.device).eval()
    data = SyntheticVideos(cfg.frames, cfg.height, cfg.width, seed=7)
    video = torch.stack([data[i] for i in range(batch)]).to(ctx.device)
    tokens = model.tokenize(video)
    tcfg = tiny_train_config(batch_size=batch)
    inputs = {k: v.to(ctx.device) for k, v in draw(cfg, tcfg, batch, torch.Generator().manual_seed(0)).items()}
    train_model = VideoFlexTok(cfg).to(ctx.device).train()
    opt = make_optimizer(train_model, tcfg)

    train_step = train_step_fn(train_model, opt, video, inputs)

    shape = f"B={batch} {cfg.frames}x{cfg.height}x{cfg.width} T'={cfg.latent_frames} P={cfg.patches} R={cfg.registers}"
    out = []
    for name in backends(ctx.device):
        out += [
            Case("e2e", "tokenize", shape, "float32", name, _forced(name, lambda: model.tokenize(video))),
            Case("e2e", f"detokenize {steps} steps apg", shape, "float32", name,
                 _forced(name, lambda: model.detokenize(tokens, steps=steps, guidance="apg", scale=1.5))),
            Case("e2e", "train step", shape, "float32", name, _forced(name, train_step)),
        ]
    return out


if __name__ == "__main__":
    import torch.utils.benchmark as tb

    ctx = Context(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"), quick=True)
    results = {}
    for case in cases(ctx):
        m = tb.Timer(stmt="fn()", globals={"fn": case.fn}).blocked_autorange(min_run_time=1.0)
        results[(case.name, case.provider)] = m.median
        print(f"{case.name:<28} {case.provider:<10} {m.median * 1e3:10.1f} ms")
    for (name, provider), t in results.items():
        if provider != "reference":
            print(f"{name:<28} {provider}: {results[(name, 'reference')] / t:.2f}x vs reference")
