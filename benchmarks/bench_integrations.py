"""The official VideoFlexTok / FlexTok models, unpatched vs patched by vft_kernels.integrations.

``python -m benchmarks.bench_integrations [--package videoflextok,flextok] [--reps 5] [--steps 4]``

Builds a small model of each official package from its own public classes (the code in
``../shared/third_party``: random weights, nothing downloaded; see ``build_tiny_official``),
then times, end to end, ``tokenize`` (encoder + FSQ) and ``detokenize`` (the official flow
sampler, ``--steps`` Euler steps with APG guidance, i.e. two decoder passes per step) on
three samples packed in one sequence (padded to a multiple of 128), once unpatched (the official code as
shipped: ``torch.compile``'d FlexAttention and compiled block-mask creation) and once under
``vft_kernels.integrations.<package>.patch(model)`` (FSQ, attention and guidance on vft).
The two are timed in interleaved repetitions (unpatched, patched, unpatched, ...) after one
warm-up call each (which holds the official code's compilation: it is reported separately as
``first_call_s``); the median per variant and the ratio unpatched / patched are printed and
written to ``results/integrations.csv`` (``--out``). ``--eager-flex`` times the official code
with its FlexAttention left uncompiled instead (what the tests compare against).

The model is small so that the default run takes a few minutes on a 2-core CPU, most of it
the official code's one-off compilation; on a GPU pass ``--batch``/``--frames`` larger.
``cases(ctx)`` offers the same timings to the harness (``benchmarks/run.py``).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import math
import os
import statistics
import sys
import time
import warnings
from typing import Optional

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIRD_PARTY = {"videoflextok": "videoflextok-4fd72ec", "flextok": "flextok-87d00cc"}


def official_path(package: str) -> str:
    """Folder of the official ``package`` snapshot (put on sys.path by ``import_official``)."""
    return os.path.normpath(os.path.join(ROOT, "..", "shared", "third_party", THIRD_PARTY[package]))


INSTALL = "pip install -r requirements-integrations.txt"  # what the official code imports


def official_on_path() -> None:
    """Put every official snapshot that is present on sys.path (so ``import videoflextok`` works)."""
    for package in THIRD_PARTY:
        path = official_path(package)
        if os.path.isdir(path) and path not in sys.path:
            sys.path.insert(0, path)


def import_official(package: str) -> dict:
    """The official modules the tiny models are built from (ImportError if the snapshot or
    one of its dependencies is missing)."""
    path = official_path(package)
    if not os.path.isdir(path):
        raise ImportError(f"the official {package} code is not at {path}")
    if path not in sys.path:
        sys.path.insert(0, path)
    names = {
        "attention": "model.layers.attention",
        "packing": "model.preprocessors.flex_seq_packing",
        "patching": "model.preprocessors.patching",
        "registers": "model.preprocessors.registers",
        "dropout": "model.preprocessors.token_dropout",
        "linear": "model.preprocessors.linear",
        "nullcond": "model.preprocessors.nullcond",
        "time": "model.preprocessors.time_embedding",
        "trunks": "model.trunks.transformers",
        "heads": "model.postprocessors.heads",
        "unpacking": "model.postprocessors.seq_unpacking",
        "posembs": "model.utils.posembs",
        "dict_ops": "model.utils.dict_ops",
        "wrappers": "model.utils.wrappers",
        "fsq": "regularizers.quantize_fsq",
        "pipelines": "flow_matching.pipelines",
    }
    return {k: importlib.import_module(f"{package}.{v}") for k, v in names.items()}


LEVELS = (8, 8, 8, 5, 5, 5)


class TinyOfficial(nn.Module):
    """An official encoder + FSQ + flow decoder + sampler, wired as the official wrappers do
    (data dicts between ``SequentialModuleDictWrapper`` stages)."""

    def __init__(self, package: str, encoder: nn.Module, regularizer: nn.Module, decoder: nn.Module, pipeline,
                 channels: int):
        super().__init__()
        self.package = package
        self.encoder, self.regularizer, self.decoder = encoder, regularizer, decoder
        self.pipeline = pipeline
        self.channels = channels

    @property
    def video(self) -> bool:
        return self.package == "videoflextok"

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    def encode(self, latents: list) -> dict:
        """Encoder output data dict (registers out under ``enc_registers_out``) for a list of
        VAE latents, each [1, C, T, H, W] (video) or [1, C, H, W] (images)."""
        return self.encoder({"vae_latents": list(latents)})

    def tokenize(self, latents: list) -> list:
        return self.regularizer(self.encode(latents))["tokens"]

    def decode_step(self, quants: list, noised: list, t: float, keep: Optional[list] = None) -> list:
        """One decoder call (the flow model): velocities for noised latents at time ``t``."""
        data = {"quants": [q.clone() for q in quants], "noised_latents": list(noised),
                "timesteps": torch.full((len(noised),), float(t), device=self.device)}
        if keep is not None:
            data["eval_keep_k"] = list(keep)
        return self.decoder(data)["velocity"]

    def detokenize(self, tokens: list, sizes: list, steps: int = 4, guidance_scale: float = 1.5,
                   seed: int = 0, keep: Optional[list] = None, apg: bool = True) -> list:
        """Latents sampled by the official pipeline from token ids (sizes: (T, H, W) or (H, W));
        guidance APG (``apg``; the official video sampler shares one momentum buffer across the
        batch, so APG needs equal sizes there) or CFG."""
        quants = [self.regularizer.indices_to_embedding(t) for t in tokens]
        data = {"quants": quants}
        if keep is not None:
            data["eval_keep_k"] = list(keep)
        g = torch.Generator(device=self.device).manual_seed(seed)
        if self.video:
            out = self.pipeline(data, generator=g, timesteps=steps, video_sizes=[list(s) for s in sizes],
                                verbose=False, guidance_scale=guidance_scale, perform_norm_guidance=apg)
        else:
            data["noise"] = [torch.randn((1, self.channels) + tuple(s), generator=g, device=self.device) for s in sizes]
            out = self.pipeline(data, generator=g, timesteps=steps, vae_image_sizes=[tuple(s) for s in sizes],
                                verbose=False, guidance_scale=guidance_scale, perform_norm_guidance=apg)
        return out["velocity"]


def _randomize(model: nn.Module, seed: int) -> None:
    """Random weights everywhere the official init leaves zeros (adaLN gates, zero-init heads),
    so that every attention layer influences the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() >= 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def build_tiny_official(package: str, enc_mode: Optional[str] = None, dec_mode: Optional[str] = None, dim: int = 64,
                        head_dim: int = 16, depth: int = 2, registers: int = 4, channels: int = 4,
                        compile_block_mask: bool = False, eager_flex: bool = True, seed: int = 0,
                        adaln_expansion: int = 2) -> TinyOfficial:
    """A small official model of ``package`` ("videoflextok": interleaved video packer, encoder
    ``time_block_causal_last`` and decoder ``time_block_causal`` by default; "flextok": encoder
    ``causal_last``, decoder ``full``), in eval mode. Patches of 2x2 latent pixels (1 frame),
    ``registers`` registers per frame (video) or image, sequences padded to multiples of 128.

    ``eager_flex``: replace each attention layer's ``torch.compile(flex_attention)`` by the
    plain ``flex_attention`` (same function; skips Inductor's compilation per shape, about
    10 s each on a small CPU). ``compile_block_mask`` is the packers' own option.
    ``adaln_expansion``: 2 (the released models: separate decoder modulations for patches and
    registers) or 1 (one per sample)."""
    mods = import_official(package)
    video = package == "videoflextok"
    enc_mode = enc_mode or ("time_block_causal_last" if video else "causal_last")
    dec_mode = dec_mode or ("time_block_causal" if video else "full")
    torch.manual_seed(seed)
    D, C = dim, channels
    d = mods["dict_ops"]
    patch = [1, 2, 2] if video else [2, 2]
    Packer = mods["packing"].BlockWiseSequenceInterleavePacker if video else mods["packing"].BlockWiseSequencePacker
    Unpacker = mods["unpacking"].SequenceInterleavedUnpacker if video else mods["unpacking"].SequenceUnpacker
    posemb = dict(max_sizes=[8, 8, 8], posemb_type="learnable_sum") if video else dict(max_sizes=[8, 8])

    def registers_module():
        if video:
            return mods["registers"].RegistersTemporal2D("enc_patches", "enc_register_sizes", "enc_registers", dim=D,
                                                         t_max=8, n_min=registers, n_max=registers)
        return mods["registers"].Registers1D("enc_patches", "enc_register_sizes", "enc_registers", dim=D,
                                             n_min=registers, n_max=registers)

    trunk = dict(dim=D, depth=depth, head_dim=head_dim)
    encoder = mods["wrappers"].SequentialModuleDictWrapper({
        "enc_channels_last": d.PerSampleOp("vae_latents", "enc_latents", d.channels_first_to_last),
        "enc_patch_emb": mods["patching"].PatchEmbedder("enc_latents", "enc_patches", "enc_n_patches", patch, C, D,
                                                        flatten_patches=False),
        "enc_posemb": mods["posembs"].PositionalEmbeddingAdder("enc_patches", "enc_patches", D, **posemb),
        "enc_registers": registers_module(),
        "enc_packer": Packer(["enc_patches", "enc_registers"], "enc_packed", "enc_block_mask", "enc_inner_ps",
                             "enc_outer_ps", mask_mode=enc_mode, pad_to_multiple=128,
                             compile_block_mask=compile_block_mask),
        "enc_trunk": mods["trunks"].FlexTransformer("enc_packed", "enc_packed_out",
                                                    block_mask_read_key="enc_block_mask", **trunk),
        "enc_unpacker": Unpacker("enc_packed_out", ["enc_patches_out", "enc_registers_out"], "enc_inner_ps",
                                 "enc_outer_ps"),
        "enc_to_fsq": mods["heads"].LinearHead("enc_registers_out", "fsq_latents", D, len(LEVELS),
                                               use_mup_readout=False, weight_init_style="xavier"),
    })
    regularizer = mods["fsq"].FSQ("fsq_latents", "quants", "tokens", list(LEVELS))
    dropout = (mods["dropout"].TemporalMaskedNestedDropout if video else mods["dropout"].MaskedNestedDropout)(
        "dec_registers", D, eval_keep_k_read_key="eval_keep_k")
    decoder = mods["wrappers"].SequentialModuleDictWrapper({
        "dec_channels_last": d.PerSampleOp("noised_latents", "dec_latents", d.channels_first_to_last),
        "dec_patch_emb": mods["patching"].PatchEmbedder("dec_latents", "dec_patches", "dec_n_patches", patch, C, D,
                                                        flatten_patches=False),
        "dec_posemb": mods["posembs"].PositionalEmbeddingAdder("dec_patches", "dec_patches", D, **posemb),
        "dec_quants_proj": mods["linear"].LinearLayer("quants", "dec_registers", len(LEVELS), D),
        "dec_nested_dropout": dropout,
        "dec_nullcond": mods["nullcond"].LearnedNullCond("dec_registers", D,
                                                         eval_drop_flag_read_key="eval_dropout_mask"),
        "dec_time_emb": mods["time"].TimestepEmbedder("timesteps", "dec_t_emb", D, max_timestep=1.0),
        "dec_packer": Packer(["dec_patches", "dec_registers"], "dec_packed", "dec_block_mask", "dec_inner_ps",
                             "dec_outer_ps", mask_mode=dec_mode, pad_to_multiple=128,
                             emb_packing_fn_write_key="dec_emb_packing_fn", per_subseq_embs=adaln_expansion == 2,
                             compile_block_mask=compile_block_mask),
        "dec_trunk": mods["trunks"].FlexTransformer("dec_packed", "dec_packed_out",
                                                    block_mask_read_key="dec_block_mask",
                                                    adaLN_emb_read_key="dec_t_emb",
                                                    adaLN_packing_fn_read_key="dec_emb_packing_fn",
                                                    adaLN_expansion=adaln_expansion,
                                                    **trunk),
        "dec_unpacker": Unpacker("dec_packed_out", ["dec_patches_out", "dec_registers_out"], "dec_inner_ps",
                                 "dec_outer_ps"),
        "dec_head": mods["heads"].ToPatchesLinearHead("dec_patches_out", "dec_velocity", D, C, patch,
                                                      use_mup_readout=False, weight_init_style="xavier"),
        "dec_channels_first": d.PerSampleOp("dec_velocity", "velocity", d.channels_last_to_first),
    })
    keys = dict(latents_read_key="quants", timesteps_read_key="timesteps", reconst_write_key="velocity",
                out_channels=C)
    if video:
        pipeline = mods["pipelines"].VideoMinRFPipeline(model=decoder, noised_videos_read_key="noised_latents", **keys)
    else:
        pipeline = mods["pipelines"].MinRFPipeline(model=decoder, noise_read_key="noise",
                                                   noised_images_read_key="noised_latents", **keys)
    model = TinyOfficial(package, encoder, regularizer, decoder, pipeline, C).eval()
    _randomize(model, seed + 1)
    if eager_flex:
        from torch.nn.attention.flex_attention import flex_attention
        for m in model.modules():
            if isinstance(m, mods["attention"].FlexAttention) and "flex_attention" in vars(m):
                m.flex_attention = flex_attention
    return model


def sample_latents(package: str, sizes: list, channels: int = 4, seed: int = 0, device="cpu") -> list:
    """Random VAE latents [1, C, *size] for each size ((T, H, W) or (H, W))."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((1, channels) + tuple(s), generator=g).to(device) for s in sizes]


# --------------------------------------------------------------------------------------
# Timing

DEFAULT_SIZES = {  # latent sizes of the samples packed in one call
    # equal sizes: the official time_block_causal_last mask (the encoder's) needs them
    "videoflextok": [(3, 8, 8), (3, 8, 8), (3, 8, 8)],
    # images of different sizes in one causal_last call would fall back to FlexAttention
    "flextok": [(8, 8), (8, 8), (8, 8)],
}


# Model sizes: "tiny" (seconds; the tests' size) and "medium", the size the integration issue
# asks for (width 256, 4 layers, 64 registers per frame / image, 3 latent frames of 8x8 patches).
MODELS = {
    "tiny": dict(dim=64, depth=2, head_dim=16, registers=4, sizes=DEFAULT_SIZES),
    "medium": dict(dim=256, depth=4, head_dim=64, registers=64,
                   sizes={"videoflextok": [(3, 16, 16)] * 2, "flextok": [(16, 16)] * 2}),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _workloads(model: TinyOfficial, sizes: list, steps: int, coarse_keep: Optional[int] = None):
    """tokenize, detokenize from all tokens and, with ``coarse_keep``, detokenize from the first
    ``coarse_keep`` tokens per frame / image (the coarse-to-fine use: a prefix of the tokens)."""
    latents = sample_latents(model.package, sizes, model.channels, device=model.device)
    with torch.no_grad():
        tokens = model.tokenize(latents)

    def tokenize():
        with torch.no_grad():
            return model.tokenize(latents)

    def detokenize(keep=None):
        with torch.no_grad():
            return model.detokenize(tokens, sizes, steps=steps, keep=keep)

    loads = {"tokenize": tokenize, f"detokenize {steps} steps apg": detokenize}
    if coarse_keep:
        loads[f"detokenize {steps} steps apg keep {coarse_keep}"] = \
            lambda: detokenize([coarse_keep] * len(sizes))
    return loads


VARIANTS = {  # name -> patch() options (None: the official model as shipped)
    "official": None,
    "vft": {},  # the default patch: FSQ, attention, guidance and whole blocks
    "vft-attention": {"blocks": False},  # the blocks left official (the drop-in before whole-block patching)
    "vft-bf16": {"dtype": torch.bfloat16},  # blocks in bf16 where the hardware has it
}


def isa_note() -> str:
    """The capability levels this process runs at: ATen's, oneDNN's and MKL's caps (set to
    emulate an AVX2-only CPU on a bigger one) and vft's CPU kernels' (where it reports one)."""
    parts = [f"aten {torch.backends.cpu.get_cpu_capability()}"]
    for var in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "VFT_CPU_CAPABILITY", "VFT_CPU_ARCH"):
        if os.environ.get(var):
            parts.append(f"{var}={os.environ[var]}")
    try:
        import vft_kernels as vk
        if hasattr(vk, "cpu_capability"):
            parts.append(f"vft {vk.cpu_capability()}")
    except Exception:  # noqa: BLE001 - informational only
        pass
    return ", ".join(parts)


def _psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float((x.double() - ref.double()).pow(2).mean())
    span = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * math.log10(span * span / mse)


def measure(package: str, reps: int, steps: int, sizes: Optional[list] = None, eager_flex: bool = False,
            device: str = "cpu", verbose: bool = True, model_size: str = "tiny", variants=("official", "vft"),
            overrides: Optional[dict] = None, workloads=None) -> list[dict]:
    """Rows (one per workload and patched variant) of medians against the official model as
    shipped, in interleaved repetitions. Every variant is its own model instance built with the
    same seed (same weights), patched once, so no variant disturbs another's compiled code."""
    integration = importlib.import_module(f"vft_kernels.integrations.{package}")
    spec = dict(MODELS[model_size])
    spec.update(overrides or {})
    sizes = sizes or spec.pop("sizes")[package]
    spec.pop("sizes", None)
    dev = torch.device(device)
    models, handles = {}, {}
    for v in variants:
        models[v] = build_tiny_official(package, eager_flex=eager_flex, compile_block_mask=not eager_flex,
                                        **spec).to(dev)
        if VARIANTS[v] is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                handles[v] = integration.patch(models[v], **VARIANTS[v])
            if any("no native bf16" in str(w.message) for w in caught):
                handles[v] = None  # bf16 not available here: the variant would time float32 again
                models.pop(v)
    variants = [v for v in variants if v in models]
    coarse = spec["registers"] // 4 if model_size == "medium" and spec.get("registers", 0) >= 8 else None
    loads = {v: _workloads(models[v], sizes, steps, coarse) for v in variants}
    names = [n for n in loads[variants[0]] if workloads is None or n in workloads]
    rows = []
    for name in names:
        times = {v: [] for v in variants}
        first, outs = {}, {}
        for v in variants:  # warm-up: the official code's compilation, vft's caches
            t0 = time.perf_counter()
            outs[v] = loads[v][name]()
            _sync(dev)
            first[v] = time.perf_counter() - t0
            loads[v][name]()  # a second call: Dynamo may compile again on the second call of a shape
            # patch(blocks=True) times vft against official blocks on the first 2 x (TUNE_CALLS + 1)
            # calls of a shape (one trunk call per tokenize, one per guided step)
            for _ in range(10 if v != "official" and (name == "tokenize" or steps < 8) else 0):
                loads[v][name]()
        for _ in range(reps):
            for v in variants:
                _sync(dev)
                t0 = time.perf_counter()
                loads[v][name]()
                _sync(dev)
                times[v].append(time.perf_counter() - t0)
        base = times["official"]
        for v in variants[1:]:
            per_rep = sorted(b / t for b, t in zip(base, times[v]))  # same-round ratios
            ref, got = outs["official"], outs[v]
            if name == "tokenize":
                agree = float(sum((a == b).sum() for a, b in zip(ref, got)) / sum(a.numel() for a in ref))
                quality = f"tokens equal {100 * agree:.2f} %"
            else:
                quality = "PSNR vs official {:.1f} dB, max |diff| {:.2e}".format(
                    min(_psnr(g, r) for g, r in zip(got, ref)),
                    max(float((g.float() - r.float()).abs().max()) for g, r in zip(got, ref)))
            row = {"package": package, "model": model_size, **spec, "workload": name, "variant": v,
                   "samples": len(sizes), "sizes": " ".join("x".join(map(str, s)) for s in sizes),
                   "official_flex_attention": "eager" if eager_flex else "torch.compile", "reps": reps,
                   "official_ms": statistics.median(base) * 1e3, "patched_ms": statistics.median(times[v]) * 1e3,
                   "ratio": statistics.median(base) / statistics.median(times[v]),
                   "ratio_min": per_rep[0], "ratio_max": per_rep[-1],
                   "official_first_call_s": first["official"], "patched_first_call_s": first[v],
                   "quality": quality,
                   "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
                   "isa": isa_note() if dev.type == "cpu" else "",
                   "threads": torch.get_num_threads(), "torch": torch.__version__}
            rows.append(row)
            if verbose:
                print(f"{package:12s} {name:26s} {v:14s} official {row['official_ms']:9.1f} ms  "
                      f"{v} {row['patched_ms']:9.1f} ms  ratio {row['ratio']:5.2f}x "
                      f"[{row['ratio_min']:.2f}-{row['ratio_max']:.2f}]  first call {first['official']:.1f} s / "
                      f"{first[v]:.1f} s; {quality}", flush=True)
    for v, h in handles.items():
        if h is not None and verbose:
            print("   " + "\n   ".join(line for line in h.summary().splitlines() if "so far" in line))
    return rows


def _cpu_name() -> str:
    from .run import cpu_name
    return cpu_name()


# The grid of the "never slower" check: one factor at a time around the medium model, both
# packages, guided sampling with 1 step (25-step rows: the medium model's main table).
GRID_BASE = dict(dim=256, depth=4, head_dim=64, registers=64, frames=3, batch=2)
GRID_STEPS = [dict(dim=128), dict(dim=512), dict(depth=2), dict(depth=8), dict(registers=16),
              dict(registers=256), dict(frames=1), dict(frames=8), dict(batch=1), dict(batch=4)]


def grid(packages, reps: int, steps: int, device: str, variants, cells=None) -> list[dict]:
    """``cells``: names such as "base", "dim=128" (default: every cell). Every cell compiles the
    official FlexAttention for new shapes in this one process: Dynamo's recompile limit (8 by
    default) would otherwise send later cells' official model to uncompiled FlexAttention."""
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    rows = []
    for package in packages:
        for change in [{}] + GRID_STEPS:
            name = ", ".join(f"{k}={v}" for k, v in change.items()) or "base"
            if cells is not None and name not in cells:
                continue
            cell = dict(GRID_BASE, **change)
            if package == "flextok" and "frames" in change:
                continue  # images: no frames
            frames, batch = cell.pop("frames"), cell.pop("batch")
            size = (frames, 16, 16) if package == "videoflextok" else (16, 16)
            print(f"-- {package} cell {change or 'base'}", flush=True)
            got = measure(package, reps, steps, sizes=[size] * batch, device=device, model_size="medium",
                          variants=variants, overrides=cell,
                          workloads=("tokenize", f"detokenize {steps} steps apg"))
            for r in got:
                r["cell"] = name
            rows += got
    return rows


def profile(package: str, steps: int, device: str) -> None:
    """torch.profiler self-time shares of one detokenize, official vs patched (medium model)."""
    from torch.profiler import profile as tprofile
    integration = importlib.import_module(f"vft_kernels.integrations.{package}")
    spec = dict(MODELS["medium"])
    sizes = spec.pop("sizes")[package]
    for variant in ("official", "vft"):
        model = build_tiny_official(package, compile_block_mask=True, eager_flex=False, **spec).to(device)
        if variant == "vft":
            integration.patch(model)
        fn = _workloads(model, sizes, steps)[f"detokenize {steps} steps apg"]
        fn()
        with tprofile() as prof:
            fn()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"{package} {variant}: detokenize {steps} steps, self CPU time {total / 1e3:.0f} ms")
        for e in events[:12]:
            print(f"   {e.key:40s} {e.self_cpu_time_total / 1e3:9.1f} ms  {100 * e.self_cpu_time_total / total:5.1f} %")


def cases(ctx):
    """Harness cases (benchmarks/run.py): each workload on the official model as shipped
    (baseline) and on an identical copy patched once (not per call: patching costs a few ms).
    Quick runs use the tiny model, full runs the medium one (25 APG steps)."""
    from .common import Case

    size = "tiny" if ctx.quick else "medium"
    steps = 2 if ctx.quick else 25
    out = []
    for package in THIRD_PARTY:
        spec = dict(MODELS[size])
        sizes = spec.pop("sizes")[package][:2]
        try:
            integration = importlib.import_module(f"vft_kernels.integrations.{package}")
            official = build_tiny_official(package, eager_flex=False, compile_block_mask=True, **spec).to(ctx.device)
            patched = build_tiny_official(package, eager_flex=False, compile_block_mask=True, **spec).to(ctx.device)
        except ImportError as e:
            print(f"[integrations] {package}: {e}; skipped", file=sys.stderr)
            continue
        integration.patch(patched)  # same seed, same weights; the copy stays patched
        shape = f"{size} model, {len(sizes)} samples " + " ".join("x".join(map(str, s)) for s in sizes)
        plain, fast = _workloads(official, sizes, steps), _workloads(patched, sizes, steps)
        for name in plain:
            out += [Case("integrations", f"{package} {name}", shape, "float32", "official", plain[name],
                         baseline="official"),
                    Case("integrations", f"{package} {name}", shape, "float32", "official+vft", fast[name],
                         baseline="official")]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", default="videoflextok,flextok", help="comma-separated subset of videoflextok,flextok")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions per variant (median reported)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps of detokenize (default: 4 for the tiny "
                   "model, 25 for medium; 1 in --grid)")
    p.add_argument("--model", choices=tuple(MODELS), default="tiny",
                   help="model size: tiny (seconds) or medium (width 256, 4 layers, 64 registers; minutes)")
    p.add_argument("--variants", default="official,vft,vft-attention,vft-bf16",
                   help=f"comma-separated, first must be official: {', '.join(VARIANTS)} (vft-bf16 is skipped "
                   "where bf16 is not native)")
    p.add_argument("--grid", action="store_true", help="the never-slower grid (one factor at a time around the "
                   "medium model, both packages, --steps 1 unless given)")
    p.add_argument("--cells", default=None, help="with --grid: comma-separated cells to run, e.g. "
                   "base,dim=128,registers=16 (default: all)")
    p.add_argument("--profile", action="store_true", help="torch.profiler self-time breakdown of one detokenize, "
                   "official vs patched (medium model), instead of timings")
    p.add_argument("--eager-flex", action="store_true",
                   help="official FlexAttention uncompiled (and block masks built eagerly) instead of as shipped")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="folder for integrations.csv")
    args = p.parse_args(argv)
    packages = [x for x in args.package.split(",") if x]
    variants = [v for v in args.variants.split(",") if v]
    if variants[0] != "official" or any(v not in VARIANTS for v in variants):
        p.error(f"--variants: official first, then any of {', '.join(VARIANTS)}; got {args.variants}")
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else _cpu_name()}; "
          f"{isa_note() if args.device == 'cpu' else ''}; threads {torch.get_num_threads()}", flush=True)
    if args.profile:
        for package in packages:
            profile(package, args.steps or 4, args.device)
        return 0
    rows = []
    try:
        if args.grid:
            rows = grid(packages, args.reps, args.steps or 1, args.device, variants,
                        cells=args.cells.split(",") if args.cells else None)
        else:
            for package in packages:
                steps = args.steps or (25 if args.model == "medium" else 4)
                rows += measure(package, args.reps, steps, eager_flex=args.eager_flex, device=args.device,
                                model_size=args.model, variants=variants)
    except ImportError as e:
        print(f"{e}; skipped", file=sys.stderr)
    if not rows:
        return 1
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "integrations_grid.csv" if args.grid else "integrations.csv")
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
