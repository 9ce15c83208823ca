"""Attention of the official FlexTok / VideoFlexTok models on vk.register_attention
(vft_kernels.integrations.videoflextok / .flextok, ``patch(model, attention=True)``).

The official sequence packers build a FlexAttention BlockMask per call from their mask mode
and packed shapes; patched, they hand the layout (offsets of the packed samples, P, R, mode)
to the patched attention layers instead, which call vk.register_attention (cu_seqlens).
Checked against the official code itself (../shared/third_party, built from its constructors
with tiny sizes and random weights; nothing downloaded): outputs within the docs/spec.md §4
tolerance of the official float64 run, padded rows exactly 0, fallbacks bit-identical to the
original call and reported, patches per instance, reversible, state-dict neutral.

The official layers call ``torch.compile(flex_attention)``; on CPU that costs Inductor a C++
compilation per sequence length (about 40 s cold, 2 s with build/inductor_cache warm). The
tests give the layers the plain ``flex_attention`` instead (the same function, unfused) and
build block masks eagerly (``compile_block_mask=False``), except the one test marked slow that
runs the official code as shipped. Everything runs under no_grad: FlexAttention has no CPU
backward.
"""
import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

from vft_kernels.testing import assert_matches_reference

from benchmarks.bench_integrations import INSTALL, official_on_path

official_on_path()  # the pinned official code in ../shared/third_party, when present

V, F = "videoflextok", "flextok"
IL, SEQ = "BlockWiseSequenceInterleavePacker", "BlockWiseSequencePacker"

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile",
                                        "ignore:.*non-tuple sequence for multidimensional indexing")


def _official(package, module):
    return pytest.importorskip(f"{package}.{module}", reason=f"the official {package} code (../shared/third_party) "
                               f"or one of its dependencies is missing ({INSTALL})")


def _integration(package):
    return importlib.import_module(f"vft_kernels.integrations.{package}")


def _tiny(package, **kwargs):
    for module in ("model.layers.attention", "model.preprocessors.flex_seq_packing", "flow_matching.pipelines"):
        _official(package, module)
    from benchmarks.bench_integrations import build_tiny_official
    return build_tiny_official(package, **kwargs)


def _eager_flex(layer):
    from torch.nn.attention.flex_attention import flex_attention
    layer.flex_attention = flex_attention  # the official compiled call, uncompiled (see the module doc)
    return layer


# --------------------------------------------------------------------------------------
# One packer + one official attention layer


class Holder(nn.Module):
    """A packer and the module reading its mask: a one-block official trunk (the packer's
    every consumer is patched: no BlockMask is built) or a bare attention layer (no trunk
    reads the mask key: the packer keeps building its BlockMask and the layer looks the
    layout up)."""

    def __init__(self, packer, consumer):
        super().__init__()
        self.packer, self.consumer = packer, consumer

    @property
    def layer(self):
        return self.consumer if not hasattr(self.consumer, "blocks") else self.consumer.blocks[0].attn


def _packer_setup(package, packer_name, mode, consumer, dim=32, config=None, **packer_kwargs):
    packing = _official(package, "model.preprocessors.flex_seq_packing")
    attention = _official(package, "model.layers.attention")
    trunks = _official(package, "model.trunks.transformers")
    if config is not None:
        packer_kwargs["cross_timestep_attention_config"] = config
    packer = getattr(packing, packer_name)(["patches", "registers"], "packed", "mask", "inner_ps", "outer_ps",
                                           mask_mode=mode, pad_to_multiple=128, compile_block_mask=False,
                                           **packer_kwargs)
    if consumer == "trunk":
        layer_holder = trunks.FlexTransformer("packed", "out", dim=dim, depth=1, head_dim=16, qk_norm=False,
                                              block_mask_read_key="mask")
    else:
        layer_holder = attention.FlexSelfAttention(dim, num_heads=2, qk_norm=False)
    model = Holder(packer, layer_holder).eval()
    _eager_flex(model.layer)
    return model


def _inputs(interleaved, sizes, registers, frames, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (1, frames) if interleaved else (1,)
    patches = [torch.randn(lead + tuple(s) + (dim,), generator=g) for s in sizes]
    regs = [torch.randn(lead + (registers, dim), generator=g) for _ in sizes]
    return patches, regs


def _attend(model, inputs, dtype=torch.float32, score_mod=None):
    """(attention output [1, N, D], packer data dict) of the model's layer on the packed inputs."""
    patches, regs = inputs
    data = model.packer({"patches": [x.to(dtype) for x in patches], "registers": [x.to(dtype) for x in regs]})
    with torch.no_grad():
        out = model.layer(data["packed"], score_mod=score_mod, block_mask=data["mask"])
    return out, data


PACKER_CASES = [  # (package, packer, mask mode, spatial sizes per sample, registers, frames)
    (V, IL, "full", [(4, 4), (2, 6), (2, 2)], 3, 2),
    (V, IL, "causal", [(4, 4), (2, 6), (2, 2)], 3, 2),
    # one RegisterLayout per call: time_block_causal maps when every sample has the same tokens
    # per time block (the official time_block_causal_last mask even requires it)
    (V, IL, "time_block_causal", [(4, 4), (4, 4), (4, 4)], 3, 2),
    (V, IL, "time_block_causal_last", [(4, 4)] * 3, 4, 3),
    (V, IL, "flexible_time_block_causal_last", [(4, 4)] * 2, 4, 3),
    (V, SEQ, "causal_last", [(4, 4)] * 3, 4, None),
    (F, SEQ, "full", [(4, 4), (2, 6), (2, 2)], 4, None),
    (F, SEQ, "full", [(8, 8), (7, 8)], 4, None),  # exactly 128 tokens: no padding
    (F, SEQ, "causal", [(4, 4), (2, 6), (2, 2)], 4, None),
    (F, SEQ, "causal_last", [(4, 4)] * 3, 4, None),
]
ALL_FULL = dict(prefix2prefix="full", prefix2nonprefix="full", nonprefix2prefix="full", nonprefix2nonprefix="full")


@pytest.mark.parametrize("consumer", ["trunk", "layer"])
@pytest.mark.parametrize("package,packer_name,mode,sizes,registers,frames", PACKER_CASES,
                         ids=[f"{p}-{m}-{len(s)}x" + "_".join(f"{a}{b}" for a, b in s)
                              for p, _, m, s, _, _ in PACKER_CASES])
def test_packer_and_layer_match_official(package, packer_name, mode, sizes, registers, frames, consumer):
    integration = _integration(package)
    config = ALL_FULL if mode.startswith("flexible") else None
    model = _packer_setup(package, packer_name, mode, consumer, config=config)
    model64 = copy.deepcopy(model).double()
    inputs = _inputs(packer_name == IL, sizes, registers, frames)
    ref32, data = _attend(model, inputs)
    ref64, _ = _attend(model64, inputs, torch.float64)
    n = sum(x.numel() for x in data["outer_ps"])
    N = data["packed"].shape[1]
    assert N % 128 == 0 and n <= N
    with integration.patched(model, fsq=False, guidance=False, blocks=False) as handle:
        out, pdata = _attend(model, inputs)
        summary = handle.summary()
    mask = pdata["mask"]
    if consumer == "trunk":  # every consumer patched: no BlockMask was built
        assert type(mask).__name__ == "VftBlockMask" and mask._mask is None
        assert "BlockMask built only if a layer falls back" in summary
    else:
        assert type(mask).__name__ == "BlockMask" and "BlockMask still built" in summary
    assert "attention: 1 of 1 FlexAttention layer(s) patched" in summary
    assert "attention: 1 of 1 sequence packer(s) patched" in summary
    assert "attention calls so far: 1 on vk.register_attention" in summary and "fell back" not in summary
    assert_matches_reference(f"{package} {mode}", out, ref64, ref32, torch.float32)
    assert torch.equal(out[:, n:], torch.zeros_like(out[:, n:]))  # padded rows: 0, as FlexAttention gives
    assert torch.equal(ref32[:, n:], torch.zeros_like(ref32[:, n:]))
    out_again, _ = _attend(model, inputs)  # unpatched on exit: the original, exactly
    assert torch.equal(out_again, ref32)


def test_vft_block_mask_stands_in_for_the_block_mask():
    """The lazy mask: layout and offsets as Python ints, the official BlockMask on demand
    (attribute access builds it), and it survives the deep copies the samplers make."""
    integration = _integration("videoflextok")
    model = _packer_setup(V, IL, "time_block_causal_last", "trunk")
    inputs = _inputs(True, [(4, 4)] * 3, 4, 3)
    _, official = _attend(model, inputs)
    with integration.patched(model, blocks=False):
        _, data = _attend(model, inputs)
    mask = data["mask"]
    layout = mask.plan.layout
    assert (layout.blocks, layout.patches, layout.registers, layout.mode) == (3, 16, 4, "block_causal_last")
    assert mask.plan.cu_seqlens == (0, 60, 120, 180) and mask.plan.seq_len == 256
    assert all(type(x) is int for x in mask.plan.cu_seqlens)
    clone = copy.deepcopy(mask)
    assert clone.plan == mask.plan and clone._mask is None
    assert mask.shape == official["mask"].shape and mask._mask is not None  # built on demand
    assert torch.equal(mask.to_dense(), official["mask"].to_dense())
    assert "BlockMask built" in repr(mask) and "not built" in repr(clone)


def _dense_flex(q, k, v, score_mod=None, block_mask=None, scale=None):
    """FlexAttention's function with a dense mask (create_mask of the BlockMask's mask_mod),
    differentiable on CPU; rows without keys give 0."""
    from torch.nn.attention.flex_attention import create_mask
    allowed = create_mask(block_mask.mask_mod, None, None, q.shape[2], k.shape[2], device=q.device)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return p @ v


def test_patched_attention_backward_matches_dense_reference():
    """Training through a patched layer: gradients of the inputs and of the q / k / v
    projections (FlexAttention has no CPU backward: the reference is its dense form)."""
    integration = _integration("videoflextok")
    model = _packer_setup(V, IL, "time_block_causal_last", "trunk")
    inputs = _inputs(True, [(4, 4)] * 2, 4, 2)
    w = torch.randn(1, 256, 32, dtype=torch.float64)

    def grads(m, dtype):
        data = m.packer({"patches": [x.to(dtype) for x in inputs[0]], "registers": [x.to(dtype) for x in inputs[1]]})
        x = data["packed"].detach().requires_grad_()
        m.zero_grad()
        (m.layer(x, block_mask=data["mask"]) * w.to(dtype)[:, : x.shape[1]]).sum().backward()
        return [x.grad] + [getattr(m.layer, n).weight.grad for n in ("wq", "wk", "wv")]

    refs = []
    for dtype in (torch.float64, torch.float32):
        dense = copy.deepcopy(model).to(dtype)
        dense.layer.flex_attention = _dense_flex
        refs.append(grads(dense, dtype))
    with integration.patched(model, blocks=False) as handle:
        got = grads(model, torch.float32)
        assert "attention calls so far: 1 on vk.register_attention" in handle.summary()
    for name, g, r64, r32 in zip(("x", "wq", "wk", "wv"), got, *refs):
        assert_matches_reference(f"grad {name}", g, r64, r32, torch.float32)


def test_plans_of_the_mask_modes():
    """The layouts the patch derives from the packed shapes (white-box)."""
    vf = importlib.import_module("vft_kernels.integrations.official_attention")
    S = torch.Size
    inner = [[S([4, 4]), S([3])], [S([2, 6]), S([3])]]  # per time block: 16 + 3 and 12 + 3 tokens
    outer = [S([2 * 19]), S([2 * 15])]
    plan = vf._plan_packed("time_block_causal", True, inner, outer, 128)
    assert plan.layout is None and "differ in (patches, registers)" in plan.reason  # 19 vs 15 tokens per block
    plan = vf._plan_packed("full", True, inner, outer, 128)
    assert plan.cu_seqlens == (0, 38, 68) and plan.seq_len == 128
    assert (plan.layout.blocks, plan.layout.patches, plan.layout.registers, plan.layout.mode) == (38, 1, 0, "full")
    same = [[S([4, 4]), S([3])]] * 2
    plan = vf._plan_packed("time_block_causal_last", True, same, [S([38])] * 2, 128)
    assert (plan.layout.blocks, plan.layout.patches, plan.layout.registers, plan.layout.mode) == \
        (2, 16, 3, "block_causal_last")
    plan = vf._plan_packed("causal_last", False, [[S([4, 4]), S([4])]] * 2, [S([20])] * 2, 128)
    assert (plan.layout.blocks, plan.layout.patches, plan.layout.registers) == (1, 16, 4)
    plan = vf._plan_packed("causal_last", False, [[S([8])]], [S([8])], 128)  # no prefix: token-causal
    assert (plan.layout.patches, plan.layout.registers, plan.layout.mode) == (1, 7, "block_causal_last")
    plan = vf._plan_packed("flexible_time_block_causal_last", True, same, [S([38])] * 2, 128,
                           dict(ALL_FULL, nonprefix2nonprefix="causal"))
    assert plan.layout is None and "only the all-'full' config" in plan.reason


# --------------------------------------------------------------------------------------
# Fallbacks: reported, and exactly the original call


@pytest.mark.parametrize("package,packer_name,mode,frames,forms", [
    (F, SEQ, "causal_last", None, "(12, 4), (16, 4)"),  # P = 16 and 12 patches
    (V, IL, "time_block_causal", 2, "(15, 0), (19, 0)"),  # 19 and 15 tokens per time block
])
def test_samples_without_a_shared_layout_fall_back_exactly(package, packer_name, mode, frames, forms):
    integration = _integration(package)
    model = _packer_setup(package, packer_name, mode, "trunk")
    inputs = _inputs(packer_name == IL, [(4, 4), (2, 6)], 3 if frames else 4, frames)
    ref, _ = _attend(model, inputs)
    with integration.patched(model, blocks=False) as handle:
        out, data = _attend(model, inputs)
        assert data["mask"].plan.layout is None and data["mask"]._mask is not None  # built for the fallback
        assert ("1 fell back to FlexAttention (the samples of one call differ in (patches, registers) per block: "
                f"{forms}: 1)") in handle.summary()
    assert torch.equal(out, ref)


def test_score_mod_and_foreign_masks_fall_back_exactly():
    integration = _integration("videoflextok")
    model = _packer_setup(V, IL, "time_block_causal", "layer")
    other = _packer_setup(V, IL, "full", "layer")  # an unpatched packer: a plain BlockMask
    inputs = _inputs(True, [(4, 4), (4, 4)], 3, 2)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + 0.01 * (q_idx - kv_idx)

    ref, _ = _attend(model, inputs, score_mod=score_mod)
    _, foreign = _attend(other, inputs)
    with torch.no_grad():
        ref_foreign = model.layer(foreign["packed"], block_mask=foreign["mask"])
    with integration.patched(model, blocks=False) as handle:
        out, _ = _attend(model, inputs, score_mod=score_mod)
        with torch.no_grad():
            out_foreign = model.layer(foreign["packed"], block_mask=foreign["mask"])
        summary = handle.summary()
    assert torch.equal(out, ref) and torch.equal(out_foreign, ref_foreign)
    assert "score_mod given: 1" in summary and "mask not from a patched packer: 1" in summary


def test_unmapped_packers_and_layers_are_reported():
    integration = _integration("videoflextok")
    packing = _official(V, "model.preprocessors.flex_seq_packing")
    attention = _official(V, "model.layers.attention")
    config = dict(ALL_FULL, nonprefix2nonprefix="causal")
    model = _packer_setup(V, IL, "flexible_time_block_causal_last", "trunk", config=config)
    model.cross_packer = packing.BlockWiseSequencePackerWithCrossAttention(
        ["a"], ["c"], "packed_x", "ctx", "sa_mask", "xa_mask", "inner_x", "outer_x", pad_to_multiple=128,
        compile_block_mask=False)
    model.cross = attention.FlexCrossAttention(32, num_heads=2)
    inputs = _inputs(True, [(4, 4)] * 2, 4, 2)
    ref, _ = _attend(model, inputs)
    with integration.patched(model, blocks=False) as handle:
        out, data = _attend(model, inputs)
        summary = handle.summary()
        assert "forward" not in vars(model.packer) and type(data["mask"]).__name__ == "BlockMask"
    assert torch.equal(out, ref)
    assert "attention: 1 of 2 FlexAttention layer(s) patched" in summary
    assert "1 not patched: cross-attention" in summary
    assert "attention: 0 of 2 sequence packer(s) patched" in summary
    assert "(BlockWiseSequencePackerWithCrossAttention): not patched, cross-attention packer" in summary
    assert "only the all-'full' config has a register-attention equivalent" in summary
    assert "mask not from a patched packer: 1" in summary


def test_flextok_materialized_mask_packer_is_reported():
    integration = _integration("flextok")
    model = _packer_setup(F, SEQ, "full", "trunk", return_materialized_mask=True)
    with integration.patched(model, blocks=False) as handle:
        assert "dense mask for scaled_dot_product_attention (return_materialized_mask=True)" in handle.summary()
        assert "forward" not in vars(model.packer)


# --------------------------------------------------------------------------------------
# Whole tiny official models (encoder, decoder, sampler)


MODEL_CASES = [  # (package, encoder mask mode, decoder mask mode, latent sizes)
    (V, "time_block_causal_last", "time_block_causal", [(3, 8, 8), (3, 8, 8)]),
    (V, "full", "causal", [(2, 8, 8), (2, 4, 6), (2, 2, 2)]),
    (F, "causal_last", "full", [(8, 8), (8, 8), (8, 8)]),
]


def _cast_time_embedding_hook(module, args, out):
    # The official TimestepEmbedder feeds float32 to its MLP whatever the weights: it stays a
    # float32 module and its output is cast to float64 for the float64 reference run.
    out["dec_t_emb"] = out["dec_t_emb"].double()
    return out


def _float64_twin(model):
    """A float64 copy of an official model for docs/spec.md §4 references (the time embedding stays
    float32, as the official code runs it, and is cast on the way out)."""
    model64 = copy.deepcopy(model).double()
    model64.decoder.module_dict["dec_time_emb"].float().register_forward_hook(_cast_time_embedding_hook)
    return model64


def _assert_outputs_match(name, got, ref64, ref32):
    """Every sample's encoder and decoder output under the docs/spec.md §4 rule (float32 run)."""
    for what, o, r64, r32 in (("encoder", got[0], ref64[0], ref32[0]), ("decoder", got[1], ref64[1], ref32[1])):
        for i, (oi, r64i, r32i) in enumerate(zip(o, r64, r32)):
            assert_matches_reference(f"{name} {what} sample {i}", oi, r64i, r32i, torch.float32)


def _model_outputs(model, latents, quants, keep, dtype):
    latents = [x.to(dtype) for x in latents]
    with torch.no_grad():
        enc = model.encode(latents)["enc_registers_out"]
        dec = model.decode_step([q.to(dtype) for q in quants], latents, 0.7, keep=keep)
    return enc, dec


@pytest.mark.parametrize("package,enc_mode,dec_mode,sizes", MODEL_CASES,
                         ids=[f"{p}-{e}-{d}" for p, e, d, _ in MODEL_CASES])
def test_whole_model_matches_official(package, enc_mode, dec_mode, sizes):
    from benchmarks.bench_integrations import sample_latents
    integration = _integration(package)
    model = _tiny(package, enc_mode=enc_mode, dec_mode=dec_mode)
    model64 = _float64_twin(model)
    latents = sample_latents(package, sizes)
    with torch.no_grad():
        tokens = model.tokenize(latents)
        quants = [model.regularizer.indices_to_embedding(t) for t in tokens]
    keep = [2, 4, 1][: len(sizes)]  # nested dropout: mask tokens past keep (not an attention mask)
    ref32 = _model_outputs(model, latents, quants, keep, torch.float32)
    ref64 = _model_outputs(model64, latents, quants, keep, torch.float64)
    apg = len(set(sizes)) == 1  # the official video sampler's APG shares one momentum buffer: equal sizes
    ref_video = model.detokenize(tokens, sizes, steps=1, apg=apg)
    keys = list(model.state_dict())
    handle = integration.patch(model, blocks=False)  # the attention path (whole blocks: test_integrations_blocks)
    try:
        summary = handle.summary()
        assert "attention: 4 of 4 FlexAttention layer(s) patched" in summary
        assert "attention: 2 of 2 sequence packer(s) patched" in summary
        assert f"mask_mode {enc_mode!r}" in summary and f"mask_mode {dec_mode!r}" in summary
        assert integration.patch(model, blocks=False) is handle  # patching twice alike: the same handle
        assert list(model.state_dict()) == keys
        got = _model_outputs(model, latents, quants, keep, torch.float32)
        _assert_outputs_match(package, got, ref64, ref32)
        video = model.detokenize(tokens, sizes, steps=1, apg=apg)  # sampler: FSQ, attention and guidance patched
        for v, r in zip(video, ref_video):
            torch.testing.assert_close(v, r, rtol=1e-4, atol=1e-4)
        assert "fell back" not in handle.summary()
        # 4 layers: encode (2) + decode_step (2) + 1 step x 2 (the cond and uncond passes run as
        # one call on twice the samples)
        assert "attention calls so far: 6 on vk.register_attention" in handle.summary()
    finally:
        handle.unpatch()
    # unpatched: the official outputs, bit for bit
    again = _model_outputs(model, latents, quants, keep, torch.float32)
    for o, r in zip(again[0] + again[1], ref32[0] + ref32[1]):
        assert torch.equal(o, r)
    assert list(model.state_dict()) == keys and "[unpatched]" in handle.summary()


def test_samples_frames_and_keep_change_without_repatching():
    from benchmarks.bench_integrations import sample_latents
    integration = _integration("videoflextok")
    model = _tiny("videoflextok")
    model64 = _float64_twin(model)
    calls = [  # (sizes, keep): number of samples, frames and keep change from call to call
        ([(2, 8, 8), (2, 8, 8)], [4, 1]),
        ([(3, 4, 4)] * 3, [2, 3, 4]),
        ([(1, 8, 6)], [1]),
    ]
    refs, cases = [], []
    for i, (sizes, keep) in enumerate(calls):
        latents = sample_latents("videoflextok", sizes, seed=i)
        with torch.no_grad():
            quants = [model.regularizer.indices_to_embedding(t) for t in model.tokenize(latents)]
        cases.append((latents, quants, keep))
        refs.append((_model_outputs(model64, latents, quants, keep, torch.float64),
                     _model_outputs(model, latents, quants, keep, torch.float32)))
    with integration.patched(model, blocks=False) as handle:
        for i, ((latents, quants, keep), (ref64, ref32)) in enumerate(zip(cases, refs)):
            got = _model_outputs(model, latents, quants, keep, torch.float32)
            _assert_outputs_match(f"call {i}", got, ref64, ref32)
        assert f"attention calls so far: {4 * len(calls)} on vk.register_attention" in handle.summary()


@pytest.mark.slow
def test_official_compiled_model_as_shipped_never_compiles_when_patched():
    """The official code as shipped (torch.compile'd FlexAttention, compiled block-mask
    creation) against the patched model, whose calls with new shapes compile nothing.
    Cost: about 45 s on 2 CPU cores with a cold Inductor cache (build/inductor_cache), a few
    seconds warm; the unpatched model compiles once, the block mask is built eagerly here."""
    from torch._dynamo.utils import counters

    from benchmarks.bench_integrations import sample_latents
    integration = _integration("videoflextok")
    model = _tiny("videoflextok", eager_flex=False, compile_block_mask=False)
    latents = sample_latents("videoflextok", [(2, 4, 4)] * 2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.encode(latents)["enc_registers_out"]  # compiles (Inductor, C++)
    model.encoder.module_dict["enc_packer"].compile_block_mask = True  # as shipped (never built below)
    graphs = counters["stats"]["unique_graphs"]
    with integration.patched(model, blocks=False) as handle:
        with torch.no_grad():
            got = model.encode(latents)["enc_registers_out"]
            for i, sizes in enumerate([[(3, 4, 4)] * 3, [(1, 8, 8)], [(4, 2, 6)] * 2]):
                model.encode(sample_latents("videoflextok", sizes, seed=i))
        assert "fell back" not in handle.summary()
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled for the new shapes
    for o, r in zip(got, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=2e-6)


# --------------------------------------------------------------------------------------
# Patch lifecycle


@pytest.mark.parametrize("package", [V, F])
def test_attention_patch_lifecycle(package):
    integration = _integration(package)
    model, other = _tiny(package), _tiny(package)
    packer = model.encoder.module_dict["enc_packer"]
    layer = model.encoder.module_dict["enc_trunk"].blocks[0].attn
    original_flex, original_create = layer.flex_attention, packer.create_block_mask
    handle = integration.patch(model, fsq=False, guidance=False)  # attention (and blocks) only
    assert integration.patch(model, fsq=False, guidance=False) is handle
    with integration.patched(model, fsq=False, guidance=False) as inner:
        assert inner is handle
    with pytest.raises(ValueError, match="already patched with .*unpatch\\(\\) it before patching with"):
        integration.patch(model)  # other options: an error, not the old patch silently
    assert handle.active and layer.flex_attention is not original_flex and "forward" in vars(packer)
    other_layer = other.encoder.module_dict["enc_trunk"].blocks[0].attn  # per instance
    assert "forward" not in vars(other.encoder.module_dict["enc_packer"])
    assert other_layer.flex_attention is not layer.flex_attention
    assert "fsq: not requested" in handle.summary() and "guidance: not requested" in handle.summary()
    handle.unpatch()
    handle.unpatch()  # idempotent
    assert layer.flex_attention is original_flex and packer.create_block_mask is original_create
    assert "forward" not in vars(packer)
    with integration.patched(model, attention=False) as h:
        assert "attention: not requested" in h.summary() and layer.flex_attention is original_flex
        assert "blocks: not patched (they run on the attention plan: needs attention=True)" in h.summary()
    with pytest.raises(ValueError, match="nothing to patch with fsq=False, guidance=False and attention=False"):
        integration.patch(model, fsq=False, guidance=False, attention=False)
    with pytest.raises(ValueError, match=r"found nothing to patch in Linear: expected .*FlexAttention"):
        integration.patch(nn.Linear(3, 3))
