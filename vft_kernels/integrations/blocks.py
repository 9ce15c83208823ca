"""Whole transformer trunks of the official FlexTok / VideoFlexTok models on vft ops.

The official trunk (``model.trunks.transformers.FlexTransformer``) runs, per block, separate
``wq`` / ``wk`` / ``wv`` / ``proj`` linears, ``Fp32LayerNorm`` (no affine, float32 statistics),
QK normalisation (the same LayerNorm over each head vector), ``GatedMlp``
(``fc2(silu(fc1 x) * fc3 x)``) and, in ``FlexBlockAdaLN``, an adaLN modulation
``SiLU -> Linear(D, n 6 D)`` expanded to every token (``[1, N, 6 D]`` per block) by the
packer's ``adaLN_packing_fn``. A patched trunk runs the same arithmetic as:

* the modulations of all blocks in one matmul on ``SiLU(adaLN_emb)`` ([B, depth, n, 6, D]),
  read per (sample, token kind) by the fused norms: nothing of size [N, 6 D] is built;
* ``vk.modulated_layer_norm`` and ``vk.gated_residual_norm`` (the gated residual fused with the
  next norm, across blocks) over the packed sequence viewed as [B, T, P + R, D];
* one QKV projection on concatenated weights, ``vk.qk_layer_norm`` (split into heads + the
  per-head LayerNorm of q and k in one pass), ``vk.register_attention``
  on the packer's plan (``cu_seqlens``), the output projection;
* one gate/up projection on concatenated ``fc1`` / ``fc3`` weights and ``vk.swiglu`` fused with
  ``fc2``.

Concatenated weights are cached per trunk and rebuilt when a source tensor changes (its data
pointer or version counter); when gradients are wanted they are concatenated per call
(differentiable). Official quirks kept: the chunk order ``gate_msa, gate_mlp, shift_msa,
scale_msa, shift_mlp, scale_mlp``, each norm's own eps, the attention scale of the layer
(8 / head_dim under muP), padding rows (adaLN blocks leave them unchanged, as the official
zero modulation does; plain blocks give them what the official code does: zero attention, then
the MLP, without running the attention's projections on them).

A trunk is patched only when every block is an official ``FlexBlock`` / ``FlexBlockAdaLN`` of
the known form (``GatedMlp`` with SiLU, non-affine ``Fp32LayerNorm`` norms, FlexAttention
self-attention); a call runs the official forward (counted, with the reason) unless its
mask comes from a patched packer with one layout for all samples, every sample has the same
number of time blocks, and there is no ``score_mod``, ``rope_forward``, intermediate-layer
output, active drop-path or dropout."""
from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
import types
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import (RegisterLayout, gated_residual, gated_residual_norm, modulated_layer_norm, qk_layer_norm,
                register_attention, swiglu)
from . import CallStats, PatchHandle

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # float64: the reference ops


class TrunkStats(CallStats):
    """Per-call counts of one handle's patched trunks, the rows that runs saved, and the
    per-shape choices between the vft and the official blocks."""

    def __init__(self):
        super().__init__("trunk", "on vft blocks", "ran the official blocks")
        self.rows_saved = 0
        self.pad_rows_saved = 0
        self.choices: dict = {}  # call shape -> what was chosen and why (the measured times)

    def note(self) -> str:
        out = f" ({self.rows_saved} identical register rows computed once)" if self.rows_saved else ""
        return out + (f" ({self.pad_rows_saved} padding rows computed as one)" if self.pad_rows_saved else "")

    def lines(self) -> list[str]:
        out = super().lines()
        for shape, text in list(self.choices.items()):
            out.append(f"  trunk call shape {shape}: {text}")
        return out


# --------------------------------------------------------------------------------------
# Per-shape choice: the vft blocks or the official ones, whichever measured faster

# Timed calls per path before a shape's choice is made (after one untimed warm-up call of
# each); tests of the vft blocks' numbers set TUNE = False (always the vft blocks).
TUNE = True
TUNE_CALLS = 3
_clock = time.perf_counter


class _Tuner:
    """For ``patch(blocks=True)`` on the CPU: the first calls of each call shape (input shape,
    dtype, packing, thread count) alternate between the vft and the official blocks, one
    untimed call of each and then ``TUNE_CALLS`` timed ones; the faster (by its fastest call)
    runs every later call of that shape, and the summary says which and the times. Where
    overhead dominates (narrow models, few tokens) the official blocks can win. Only calls
    without autograd are timed (a training step runs the vft blocks); the choice can differ
    between machines and runs, with outputs equal within the tolerance rule either way
    (``blocks="always"`` pins the vft blocks)."""

    def __init__(self, stats: TrunkStats, name: str):
        self.stats, self.name = stats, name
        self.state: dict = {}
        self.lock = threading.Lock()

    def next_path(self, sig) -> str:
        with self.lock:
            st = self.state.get(sig)
            if st is None:
                if len(self.state) > 256:
                    self.state.clear()
                st = self.state[sig] = {"runs": {"vft": 0, "official": 0}, "times": {"vft": [], "official": []},
                                        "choice": None}
            if st["choice"] is not None:
                return st["choice"]
            runs = st["runs"]
            return "vft" if runs["vft"] <= runs["official"] else "official"

    def record(self, sig, path: str, seconds: float, shape: str) -> None:
        with self.lock:
            st = self.state.get(sig)
            if st is None or st["choice"] is not None:
                return
            st["runs"][path] += 1
            if st["runs"][path] > 1:  # the first call of each path warms its caches
                st["times"][path].append(seconds)
            t = st["times"]
            if min(len(t["vft"]), len(t["official"])) >= TUNE_CALLS:
                fast_vft, fast_off = min(t["vft"]), min(t["official"])
                st["choice"] = "vft" if fast_vft <= fast_off else "official"
                which = "vft blocks" if st["choice"] == "vft" else "official blocks (faster at this shape)"
                self.stats.choices[f"{self.name} {shape}"] = (
                    f"{which}: {1e3 * fast_vft:.2f} ms on vft blocks vs {1e3 * fast_off:.2f} ms official "
                    f"(fastest of {TUNE_CALLS} timed calls each)")


# --------------------------------------------------------------------------------------
# Which trunks and blocks have the known form


def _plain_norm(norm, ln_cls) -> bool:
    return type(norm) is ln_cls and norm.weight is None and getattr(norm, "bias", None) is None and \
        len(norm.normalized_shape) == 1


def block_reasons(block, classes: dict) -> list[str]:
    """Why ``block`` cannot run on the vft trunk (empty: it can). ``classes``: the official
    FlexBlock, FlexBlockAdaLN, FlexSelfAttention, GatedMlp and Fp32LayerNorm classes."""
    why = []
    kind = type(block)
    if kind not in (classes["FlexBlock"], classes["FlexBlockAdaLN"]):
        return [f"block of class {kind.__name__} (known: FlexBlock, FlexBlockAdaLN)"]
    if "forward" in vars(block):
        why.append("its forward was replaced by other code")
    attn, mlp = block.attn, block.mlp
    if type(attn) is not classes["FlexSelfAttention"] or "forward" in vars(attn):
        why.append(f"attention of class {type(attn).__name__}")
    elif not callable(vars(attn).get("flex_attention")):
        why.append("attention without flex_attention (use_flex_attention=False)")
    else:
        if any(getattr(attn, n).bias is not None for n in ("wq", "wk", "wv")):
            why.append("biased q/k/v projections")
        qn, kn = attn.q_norm, attn.k_norm
        if not ((isinstance(qn, torch.nn.Identity) and isinstance(kn, torch.nn.Identity)) or
                (_plain_norm(qn, classes["Fp32LayerNorm"]) and _plain_norm(kn, classes["Fp32LayerNorm"]))):
            why.append("QK norm other than the non-affine Fp32LayerNorm")
    if type(mlp) is not classes["GatedMlp"] or type(mlp.act) is not torch.nn.SiLU or "forward" in vars(mlp):
        why.append(f"MLP {type(mlp).__name__} (known: GatedMlp with SiLU)")
    elif mlp.fc1.bias is not None or mlp.fc3.bias is not None:
        why.append("biased MLP gate/up projections")
    for name in ("norm1", "norm2"):
        if not _plain_norm(getattr(block, name), classes["Fp32LayerNorm"]):
            why.append(f"{name} is not a non-affine Fp32LayerNorm")
    if kind is classes["FlexBlockAdaLN"]:
        mod = block.adaLN_modulation
        if not (isinstance(mod, torch.nn.Sequential) and len(mod) == 2 and type(mod[0]) is torch.nn.SiLU and
                type(mod[1]) is torch.nn.Linear and mod[1].out_features % (6 * block.dim) == 0):
            why.append("adaLN modulation is not SiLU -> Linear(D, n 6 D)")
    return why


def trunk_reasons(trunk, classes: dict) -> list[str]:
    if type(trunk) is not classes["FlexTransformer"]:
        return [f"{type(trunk).__name__} is not the official FlexTransformer"]
    if "forward" in vars(trunk):
        return ["its forward was replaced by other code"]
    blocks = list(trunk.blocks)
    if not blocks:
        return ["no blocks"]
    kinds = {type(b) for b in blocks}
    if len(kinds) > 1:
        return ["blocks of different classes"]
    if len({(b.attn.num_heads, b.attn.head_dim, b.attn.scale) for b in blocks if hasattr(b, "attn")}) > 1:
        return ["blocks of different head counts, head dims or attention scales"]
    why = []
    for i, b in enumerate(blocks):
        why += [f"block {i}: {r}" for r in block_reasons(b, classes)]
    return why


def _native_bf16_cpu() -> bool:
    """Whether the CPU kernels may use native bf16 products here: the capability vft runs at
    (cpuid, capped by VFT_CPU_CAPABILITY) is AVX512-BF16 or AMX. Without the extension: the
    CPU flags."""
    from .. import cpu_capability
    level = cpu_capability()
    if level is not None:
        return level in ("avx512_bf16", "amx")
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype, device: torch.device):
    """(the dtype the blocks run in, or None for the model's own; a note for the summary).
    bf16 only where the hardware has it (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX);
    elsewhere a RuntimeWarning and the model's dtype."""
    if dtype is None or dtype == torch.float32:
        return None, ""
    if dtype != torch.bfloat16:
        raise ValueError(f"blocks dtype must be None, torch.float32 or torch.bfloat16, got {dtype}")
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else \
        (device.type == "cpu" and _native_bf16_cpu())
    if not native:
        import warnings
        warnings.warn(f"patch(dtype=torch.bfloat16): this {device.type} has no native bf16 arithmetic "
                      "(AVX512-BF16 / AMX on a CPU, at the capability VFT_CPU_CAPABILITY allows); the blocks keep "
                      "the model's dtype", RuntimeWarning, stacklevel=4)
        return None, "; bf16 requested, kept the model's dtype (no native bf16 on this device)"
    return torch.bfloat16, "; in bf16 (norm statistics in float32)"


# --------------------------------------------------------------------------------------
# Cached concatenated weights


class _Weights:
    """The trunk's weights as the vft blocks use them, in the compute dtype: per block the
    concatenated QKV [3W, W] and gate/up [2Hd, W] weights (Hd: the hidden width, padded, see
    ``gate_up_down``), the output and down projections
    (and their biases); all blocks' adaLN modulations [depth n 6 W, W] (+ bias, float32).
    Rebuilt when a source tensor changes (data pointer or version counter)."""

    def __init__(self, trunk):
        self.trunk = trunk
        self.cached = (None, None)  # (key, weights), replaced as one tuple: safe across threads

    def _sources(self):
        out = []
        for b in self.trunk.blocks:
            out += [b.attn.wq.weight, b.attn.wk.weight, b.attn.wv.weight, b.attn.proj.weight, b.attn.proj.bias,
                    b.mlp.fc1.weight, b.mlp.fc3.weight, b.mlp.fc2.weight, b.mlp.fc2.bias]
            if hasattr(b, "adaLN_modulation"):
                out += [b.adaLN_modulation[1].weight, b.adaLN_modulation[1].bias]
        return out

    @staticmethod
    def _build(trunk, dtype):
        def cast(t):
            return None if t is None else t.to(dtype)

        def gate_up_down(mlp):
            # The hidden width padded with zero rows (gate, up) and zero columns (down) to a
            # multiple of 32: silu(0) * 0 = 0 adds nothing, and the gate/up GEMM's N = 2 H then
            # is a multiple of 64 (the official 2/3 * 4 D gives e.g. H = 682, N = 1364, which
            # ran at 129 GFLOPS against 188 at 1408 in MKL's sgemm on an AVX-512 EPYC).
            H = mlp.fc1.out_features
            pad = -H % 32 if H % 32 and -H % 32 <= H // 16 else 0
            fc1, fc3, fc2 = mlp.fc1.weight, mlp.fc3.weight, mlp.fc2.weight
            if pad:
                rows = fc1.new_zeros(pad, fc1.shape[1])
                fc1, fc3 = torch.cat([fc1, rows]), torch.cat([fc3, rows])
                fc2 = torch.cat([fc2, fc2.new_zeros(fc2.shape[0], pad)], dim=1)
            return torch.cat([fc1, fc3]).to(dtype), fc2.to(dtype)

        blocks = list(trunk.blocks)
        per_block = []
        for b in blocks:
            gate_up, down = gate_up_down(b.mlp)
            per_block.append({"qkv": torch.cat([b.attn.wq.weight, b.attn.wk.weight, b.attn.wv.weight]).to(dtype),
                              "proj": cast(b.attn.proj.weight), "proj_bias": cast(b.attn.proj.bias),
                              "gate_up": gate_up, "down": down, "down_bias": cast(b.mlp.fc2.bias)})
        ada = None
        if hasattr(blocks[0], "adaLN_modulation"):
            lins = [b.adaLN_modulation[1] for b in blocks]
            bias = [lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in lins]
            ada = (torch.cat([lin.weight for lin in lins]), torch.cat(bias))
        return per_block, ada

    def get(self, dtype):
        sources = self._sources()
        if torch.compiler.is_compiling() or \
                (torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in sources)):
            # differentiable, or inside a compiled graph (which cannot compare data pointers and
            # must see weight updates): built per call, in the graph
            return self._build(self.trunk, dtype)
        key = (dtype,) + tuple((p.data_ptr(), p._version, p.dtype, p.device) if p is not None else None
                               for p in sources)
        cached_key, value = self.cached
        if key != cached_key:
            with torch.no_grad():
                value = self._build(self.trunk, dtype)
            self.cached = (key, value)
        return value


# --------------------------------------------------------------------------------------
# The vft trunk forward


def _kind_split(packing_fn, n: int, view: tuple, infer: bool, L: int, device):
    """How ``packing_fn`` spreads the modulation rows ``[B n, 6 W]`` over the L packed tokens,
    as (P, rows, view): in the view [B, T, S] of the tokens, the first P tokens of each time
    block take one row and the rest another (n = 2: patches and registers; n = 1: one row),
    ``rows`` [B, T, K] long (K = 2 or 1) giving the row of each (sample, block, kind), which is
    what the fused norms read. With ``infer`` (masks whose plan has no time blocks), T and S
    are read off the rows of the first sample (its first patches, then its first registers).
    Found by packing a probe whose values are the row numbers, so any official packing
    (including the interleave packer's, which repeats the first block's sample order over the
    time blocks) is reproduced as it is; a str says why it does not have this form."""
    B, T, S = view
    probe = torch.arange(B * n, dtype=torch.float32, device=device).view(B, n)
    try:
        got = packing_fn(probe)
    except Exception as e:  # a packing function of another form
        return f"adaLN packing function rejected a probe ({type(e).__name__})"
    if not isinstance(got, torch.Tensor) or got.numel() != L:
        return "adaLN packing function of an unknown form"
    got = got.reshape(-1).float().cpu()
    if infer:  # the period of the first sample's rows: P tokens of one row, then those of another
        first = got[: L // B]
        changes = (first[1:] != first[:-1]).nonzero().flatten().tolist()
        S = changes[1] + 1 if n == 2 and len(changes) >= 2 else first.numel()
        if (L // B) % S:
            return "adaLN packing of a period that does not divide the sample"
        T = (L // B) // S
    got = got.view(B, T, S)
    lead = got[..., :1]
    P = int((got[0, 0] == lead[0, 0]).long().cumprod(0).sum()) if n == 2 else S
    K = 2 if n == 2 and P < S else 1
    rows = torch.cat([lead, got[..., -1:]], dim=-1) if K == 2 else lead
    kind = (torch.arange(S) >= P).long()
    want = rows.gather(-1, kind.expand(B, T, S) if K == 2 else torch.zeros(B, T, S, dtype=torch.long))
    if not torch.equal(got, want) or rows.min() < 0 or rows.max() >= B * n or rows.ne(rows.round()).any():
        return "adaLN packing does not give each (sample, time block, patch / register) group one modulation row"
    return P, rows.long().to(device), (B, T, S)


# Under torch.compile the probe runs eagerly (a graph break on the first call of a shape only:
# its result is cached per packing signature and read from the cache in later traces).
_kind_split_eager = torch.compiler.disable(_kind_split)


class _Trunk:
    """The vft forward of one official FlexTransformer instance."""

    def __init__(self, trunk, plan_of: Callable, stats: TrunkStats, official_forward, compress: bool = True,
                 dtype: Optional[torch.dtype] = None, tune: bool = True, name: str = "trunk"):
        self.trunk = trunk
        self.tuner = _Tuner(stats, name) if tune else None
        self.compress = compress
        self.dtype = dtype  # bf16 mode: linears, attention and the residual stream in this dtype
        self.plan_of = plan_of
        self.stats = stats
        self.official_forward = official_forward
        self.weights = _Weights(trunk)
        self.adaln = hasattr(trunk.blocks[0], "adaLN_modulation")
        self._split: dict = {}  # (packing function code, plan signature) -> patches per block, or a reason

    def prepare(self, x, plan, score_mod, rope_forward, adaLN_emb, packing_fn):
        """Why this call must run the official blocks (a str), or what the vft blocks need
        (a dict: the [B, T, S] view, and for adaLN trunks the (patches, modulation rows) split).
        Nothing is stored on the instance: concurrent calls do not interfere."""
        t = self.trunk
        if plan is None:
            return "mask not from a patched packer"
        if plan.layout is None:
            return plan.reason
        if score_mod is not None or rope_forward is not None:
            return "score_mod / rope_forward given"
        if t.intermediate_layer_write_key is not None:
            return "intermediate layer outputs requested"
        if t.training and any(not isinstance(b.drop_path, torch.nn.Identity) or b.mlp.drop.p > 0 or
                              b.attn.proj_drop.p > 0 for b in t.blocks):
            return "training with drop-path / dropout"
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 1 or x.shape[1] != plan.seq_len:
            return f"input of shape {tuple(getattr(x, 'shape', ()))} is not [1, {plan.seq_len}, D]"
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype}"
        cu, layout = plan.cu_seqlens, plan.layout
        L = layout.blocks * layout.block_size
        if any(b - a != L for a, b in zip(cu, cu[1:])):
            return "samples of different lengths"
        # the fused norms' view [B, T, S, W]; a "full" / "causal" plan's blocks are single
        # tokens, so the time blocks are read off the modulation rows there
        view = (len(cu) - 1, layout.blocks, layout.block_size)
        if not self.adaln:
            return {"view": view}
        if not isinstance(adaLN_emb, torch.Tensor) or adaLN_emb.dim() != 2 or \
                adaLN_emb.shape[0] != len(cu) - 1 or not callable(packing_fn):
            return "adaLN embedding is not [samples, D] with a packing function"
        n = t.blocks[0].adaLN_modulation[1].out_features // (6 * t.blocks[0].dim)
        infer = layout.mode == "full"
        kw = getattr(packing_fn, "keywords", None)
        # a partial of a function: what it packs is in its code and keywords (the packed shapes)
        key = (packing_fn.func.__code__, repr(sorted(kw.items())), cu, layout, n) if \
            isinstance(packing_fn, functools.partial) and hasattr(packing_fn.func, "__code__") and kw else None
        split = self._split.get(key) if key is not None else None
        if split is None:  # a probe read back to the host: outside a compiled graph
            split = _kind_split_eager(packing_fn, n, view, infer, cu[-1], x.device)
            if key is not None:
                if len(self._split) > 64:
                    self._split.clear()
                self._split[key] = split
        if isinstance(split, str):
            return split
        return {"view": split[2], "split": split[:2]}

    def __call__(self, data_dict):
        t = self.trunk
        x = data_dict[t.input_seq_read_key]
        get = (lambda k: data_dict[k] if k is not None else None)
        block_mask, score_mod = get(t.block_mask_read_key), get(t.score_mod_read_key)
        adaLN_emb, packing_fn = get(t.adaLN_emb_read_key), get(t.adaLN_packing_fn_read_key)
        rope_forward = get(t.rope_forward_read_key)
        plan = self.plan_of(block_mask)
        ctx = self.prepare(x, plan, score_mod, rope_forward, adaLN_emb, packing_fn)
        if isinstance(ctx, str):
            self.stats.fallbacks[ctx] += 1
            return self.official_forward(data_dict)
        if self.tuner is None or not TUNE or torch.is_grad_enabled() or x.device.type != "cpu" or \
                torch.compiler.is_compiling():
            self.stats.vft += 1
            data_dict[t.output_seq_write_key] = self.run(x, plan, adaLN_emb, ctx)
            return data_dict
        sig = (tuple(x.shape), x.dtype, plan.cu_seqlens, plan.layout, torch.get_num_threads())
        path = self.tuner.next_path(sig)
        t0 = _clock()
        if path == "official":
            self.stats.fallbacks["measured faster at this call shape" if self.tuner.state[sig]["choice"] else
                                 "timed against the vft blocks on the first calls of a shape"] += 1
            data_dict = self.official_forward(data_dict)
        else:
            self.stats.vft += 1
            data_dict[t.output_seq_write_key] = self.run(x, plan, adaLN_emb, ctx)
        self.tuner.record(sig, path, _clock() - t0, f"{list(x.shape)} {str(x.dtype).replace('torch.', '')}")
        return data_dict

    # -- the blocks ----------------------------------------------------------------------

    def _attention(self, block, y2d, w, segments):
        """Self-attention of one block on normalised tokens y2d [L, W] -> [L, W]: the QKV and
        output projections on all rows at once, the attention per segment (a run of samples
        with one layout, see ``_segments``). A compressed segment's ``aug``: a [3, H, Ls, D + 1]
        buffer whose last column holds, for q, 1 and, for k, log(weight) / scale (v: 0), so
        that key j counts as weight[j] identical keys in the softmax, exactly; the segment's
        q, k, v are written into its first D columns."""
        attn = block.attn
        H, Dh = attn.num_heads, attn.head_dim
        Lr = y2d.shape[0]
        scale = attn.scale if attn.scale is not None else Dh ** -0.5
        qkv = F.linear(y2d, w["qkv"])
        if isinstance(attn.q_norm, torch.nn.Identity):
            q, k, v = (t.unsqueeze(0).permute(0, 2, 1, 3) for t in qkv.view(Lr, 3, H, Dh).unbind(1))
        elif attn.q_norm.eps == attn.k_norm.eps:  # split + per-head LayerNorm of q, k in one op
            q, k, v = qk_layer_norm(qkv.unsqueeze(0), H, eps=attn.q_norm.eps)
        else:
            parts = qkv.view(Lr, 3, H, Dh)
            q = F.layer_norm(parts[:, 0].float(), (Dh,), eps=attn.q_norm.eps).to(y2d.dtype)
            k = F.layer_norm(parts[:, 1].float(), (Dh,), eps=attn.k_norm.eps).to(y2d.dtype)
            q, k, v = (t.unsqueeze(0).permute(0, 2, 1, 3) for t in (q, k, parts[:, 2]))
        outs = []
        for seg in segments:
            a, b = seg.rows
            qs, ks, vs = (t[:, :, a:b] for t in (q, k, v)) if len(segments) > 1 else (q, k, v)
            aug = seg.aug
            if aug is not None:
                if torch.is_grad_enabled():  # autograd keeps q, k, v: new tensors, not the shared buffer
                    qs, ks, vs = (torch.cat([t[0], aug[j, :, :, Dh:]], dim=-1).unsqueeze(0)
                                  for j, t in enumerate((qs, ks, vs)))
                else:
                    for j, t in enumerate((qs, ks, vs)):
                        aug[j, :, :, :Dh].copy_(t[0])
                    qs, ks, vs = (aug[j].unsqueeze(0) for j in range(3))
            out = register_attention(qs, ks, vs, seg.layout, scale=scale, cu_seqlens=seg.cu)[0]  # [H, Ls, D]
            if aug is not None:
                out = out[..., :Dh]
            outs.append(out.permute(1, 0, 2).reshape(b - a, H * Dh))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return F.linear(out, w["proj"], w["proj_bias"])

    @staticmethod
    def _mlp(y, w):
        out = swiglu(F.linear(y, w["gate_up"]), w["down"])
        return out if w["down_bias"] is None else out + w["down_bias"]

    def run(self, x, plan, adaLN_emb, ctx):
        """The trunk on vft ops, in ``self.dtype`` (bf16 mode) or x's dtype; output in x's."""
        dtype = self.dtype if self.dtype is not None else x.dtype
        per_block, ada = self.weights.get(dtype)
        xc = x.to(dtype)
        if self.adaln:
            out = self._run_adaln(xc, plan, adaLN_emb, per_block, ada, ctx)
        else:
            out = self._run_plain(xc, plan, per_block)
        return out.to(x.dtype)

    def _run_plain(self, x, plan, per_block):
        """FlexBlock: x + attn(LN1 x), then + mlp(LN2 x). Padding rows (past the last sample)
        get what the official blocks give them without the attention work: their attention
        output is 0 (FlexAttention's, and vk.register_attention's), so only the projection's
        bias and the MLP apply to them."""
        W, L = x.shape[2], plan.cu_seqlens[-1]
        h, pad = x[0, :L], x[0, L:]
        n_pad = pad.shape[0]
        if n_pad > 1 and not torch.compiler.is_compiling() and torch.equal(pad, pad[:1].expand_as(pad)):
            # The packer's padding rows are all alike (one fill value): they see no keys and go
            # through row-wise ops only, so they stay alike and one of them is computed.
            pad = pad[:1]
            self.stats.pad_rows_saved += n_pad - 1
        whole = [_Segment(0, len(plan.cu_seqlens) - 1, 0, 0, 0, (0, L), plan.layout, plan.cu_seqlens, None)]
        for i, b in enumerate(self.trunk.blocks):
            y = F.layer_norm(h.float(), (W,), eps=b.norm1.eps).to(h.dtype)
            h = h + self._attention(b, y, per_block[i], whole)
            y = F.layer_norm(h.float(), (W,), eps=b.norm2.eps).to(h.dtype)
            h = h + self._mlp(y, per_block[i])
            if pad.shape[0]:
                if per_block[i]["proj_bias"] is not None:
                    pad = pad + per_block[i]["proj_bias"]
                y = F.layer_norm(pad.float(), (W,), eps=b.norm2.eps).to(pad.dtype)
                pad = pad + self._mlp(y, per_block[i])
        return torch.cat([h, pad.expand(n_pad, W)]).unsqueeze(0) if n_pad else h.unsqueeze(0)

    def _run_adaln(self, x, plan, adaLN_emb, per_block, ada, ctx):
        """FlexBlockAdaLN over the real rows viewed as [B, T, S, W]; padding rows unchanged
        (their official modulation is zero, so gate 0). Runs of identical register rows at the
        end of each attention group run as one row (see ``_run_lengths``); samples whose runs
        differ (the conditional and the unconditional half of a guided step packed in one
        call) form segments: the linears run on the rows of all segments at once, the norms
        and the attention per segment."""
        blocks = list(self.trunk.blocks)
        depth, W = len(blocks), x.shape[2]
        B, T, S = ctx["view"]
        P, rows = ctx["split"]
        L = B * T * S
        n = ada[0].shape[0] // (depth * 6 * W)
        # [B, depth, n, 6, W]: every block's modulation of every (sample, kind) in one matmul
        emb = F.silu(adaLN_emb.to(ada[0].dtype))
        mods = F.linear(emb, ada[0], ada[1])
        # [B, T, K, depth, 6, W]: the row of each (sample, block, kind), one small gather
        mods = mods.view(B, depth, n, 6, W).transpose(1, 2).reshape(B * n, depth, 6, W).to(x.dtype)[rows]
        h_all = x[0, :L].view(B, T, S, W)
        shared = rows.shape[-1] == 1  # one modulation row per group: any trailing run qualifies
        segs = self._segments(h_all, P, shared, plan, x)
        hs = []
        for g in segs:
            h = h_all[g.b0:g.b1]
            if g.run >= 2:  # keep S - run rows and one row standing for the run
                h = torch.cat([h[:, :, :S - g.run], h[:, :, S - 1:]], dim=2)
                self.stats.rows_saved += (g.b1 - g.b0) * T * (g.run - 1)
            hs.append(h)
        one = len(segs) == 1

        def chunk(g, i, c):  # [Bs, T, K, W]
            return mods[g.b0:g.b1, :, :, i, c] if not one else mods[:, :, :, i, c]

        def rows2d(ts):  # per-segment [Bs, T, Ss, W] -> [sum Ls, W]
            return ts[0].reshape(-1, W) if one else torch.cat([t.reshape(-1, W) for t in ts])

        def split(t2d, g):  # [sum Ls, W] -> this segment's [Bs, T, Ss, W]
            return t2d[g.rows[0]:g.rows[1]].view(g.b1 - g.b0, T, g.S, W)

        GATE_MSA, GATE_MLP, SHIFT_MSA, SCALE_MSA, SHIFT_MLP, SCALE_MLP = range(6)
        ys = [modulated_layer_norm(h, g.P, scale=chunk(g, 0, SCALE_MSA), shift=chunk(g, 0, SHIFT_MSA),
                                   eps=blocks[0].norm1.eps) for g, h in zip(segs, hs)]
        for i, b in enumerate(blocks):
            a = self._attention(b, rows2d(ys), per_block[i], segs)
            for j, g in enumerate(segs):
                hs[j], ys[j] = gated_residual_norm(hs[j], chunk(g, i, GATE_MSA), split(a, g), g.P,
                                                   scale=chunk(g, i, SCALE_MLP), shift=chunk(g, i, SHIFT_MLP),
                                                   eps=b.norm2.eps)
            m = self._mlp(rows2d(ys), per_block[i])
            for j, g in enumerate(segs):
                if i + 1 < depth:
                    hs[j], ys[j] = gated_residual_norm(hs[j], chunk(g, i, GATE_MLP), split(m, g), g.P,
                                                       scale=chunk(g, i + 1, SCALE_MSA),
                                                       shift=chunk(g, i + 1, SHIFT_MSA), eps=blocks[i + 1].norm1.eps)
                else:
                    hs[j] = gated_residual(hs[j], chunk(g, i, GATE_MLP), split(m, g), g.P)
        for j, g in enumerate(segs):
            if g.run >= 2:  # the run's rows are all equal to the row standing for it
                h = hs[j]
                hs[j] = torch.cat([h[:, :, :-1], h[:, :, -1:].expand(h.shape[0], T, g.run, W)], dim=2)
        h = hs[0] if one else torch.cat(hs)
        if L == x.shape[1]:
            return h.reshape(1, L, W)
        return torch.cat([h.reshape(1, L, W), x[:, L:]], dim=1)

    def _segments(self, h, P: int, shared: bool, plan, x) -> list:
        """The samples of h [B, T, S, W] split into runs of consecutive samples with the same
        run length (``_run_lengths``; below 2: none), each with its compressed group size,
        rows in the concatenation of the segments, attention layout, offsets and, when
        compressed, the augmented q/k/v buffer."""
        B, T, S, W = h.shape
        runs = self._run_lengths(h, 0 if shared else P, plan)
        runs = [r if r >= 2 else 0 for r in runs]
        attn = self.trunk.blocks[0].attn
        H, Dh = attn.num_heads, attn.head_dim
        scale = attn.scale if attn.scale is not None else Dh ** -0.5
        segs, b0, row = [], 0, 0
        while b0 < B:
            b1 = b0 + 1
            while b1 < B and runs[b1] == runs[b0]:
                b1 += 1
            run, Bs = runs[b0], b1 - b0
            if run == 0:
                Ss, Ps, layout = S, (S if shared else P), plan.layout
                aug = None
            else:
                Ss = S - run + 1
                Ps = Ss if shared else P
                layout = RegisterLayout(1, T * Ss, 0, "full") if plan.layout.mode == "full" else \
                    RegisterLayout(T, Ss, 0, "block_causal")
                aug = x.new_empty(3, H, Bs * T * Ss, Dh + 1)
                aug[0, ..., Dh] = 1.0
                aug[1, ..., Dh] = 0.0
                aug[1, :, Ss - 1::Ss, Dh] = math.log(run) / scale  # the last row of every group
                aug[2, ..., Dh] = 0.0
            Ls = Bs * T * Ss
            cu = plan.cu_seqlens if (Bs == B and run == 0) else tuple(range(0, Ls + 1, T * Ss))
            segs.append(_Segment(b0, b1, Ss, Ps, run, (row, row + Ls), layout, cu, aug))
            b0, row = b1, row + Ls
        return segs

    def _run_lengths(self, h, P: int, plan) -> list[int]:
        """Per sample, the number of trailing register rows of every attention group of it (a
        time block; the whole sample for "full" masks) that are bitwise equal to the group's
        last row (the smallest over its groups). Such rows stay equal through every block: they
        take the same modulation row, see the same keys (tokens of one group are symmetric under
        these masks) and run the same row-wise arithmetic; as keys they count once each, which
        one row with a log(run) score offset reproduces. All 0 when the mask is not symmetric
        within groups (registers causal among themselves), on devices other than the CPU
        (finding runs reads the comparison back: a sync), under torch.compile (a graph cannot
        depend on the data), or when disabled."""
        B = h.shape[0]
        if not self.compress or h.device.type != "cpu" or h.shape[2] - P < 2 or torch.compiler.is_compiling() or \
                not (plan.layout.mode == "full" or (plan.layout.mode == "block_causal" and plan.layout.registers == 0)):
            return [0] * B
        regs = h[:, :, P:]
        same = (regs == regs[:, :, -1:]).all(-1)  # [B, T, R]
        trailing = same.flip(-1).to(torch.int32).cumprod(-1).sum(-1)
        return trailing.amin(1).tolist()


@dataclasses.dataclass
class _Segment:
    """Consecutive samples b0 .. b1 - 1 of a trunk call that run with one layout: S tokens per
    group (after compression), the first P of them patches, ``run`` trailing register rows
    computed as one (0: none), their ``rows`` in the concatenated rows of all segments, the
    attention ``layout`` and offsets ``cu``, and the augmented q/k/v buffer of a compressed
    segment (see ``_Trunk._attention``)."""
    b0: int
    b1: int
    S: int
    P: int
    run: int
    rows: tuple
    layout: object
    cu: tuple
    aug: Optional[torch.Tensor]


def patch_trunk(handle: PatchHandle, trunk, plan_of: Callable, stats: TrunkStats, compress: bool = True,
                dtype: Optional[torch.dtype] = None, tune: bool = True, name: str = "trunk") -> None:
    """Give ``trunk`` (an official FlexTransformer of the known form) the vft forward;
    ``compress``: compute runs of identical register rows once; ``dtype``: run the blocks in
    this dtype (None: the input's); ``tune``: per call shape, the vft or the official blocks,
    whichever measured faster on the first calls (``_Tuner``)."""
    official = types.MethodType(type(trunk).forward, trunk)
    from .. import dispatch
    dispatch.preload("block_norm_forward", "block_norm_backward", "swiglu_forward", "swiglu_backward",
                     "qk_norm_forward", "qk_norm_backward", "attention_forward", "attention_backward")
    runner = _Trunk(trunk, plan_of, stats, official, compress, dtype, tune, name)

    def forward(self, data_dict):
        return runner(data_dict)

    forward._vft_original = type(trunk).forward
    forward._vft_runner = runner
    handle.set_instance_attr(trunk, "forward", types.MethodType(forward, trunk))
