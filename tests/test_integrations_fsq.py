"""Drop-in integrations (vft_kernels.integrations) against the code they patch:
vector_quantize_pytorch.FSQ and the official FlexTok / VideoFlexTok FSQ and sampler guidance.

FSQ codes and tokens must be bit-identical to the original's (docs/spec.md §4: tokens within 1e-5 of
a rounding boundary excused), sampler outputs within the §4 tolerance of the original run in
float64, and patches per instance, reversible, state-dict neutral. The official modules are
built from their constructors with tiny sizes and random weights (the flow decoder is a small
stand-in); nothing is downloaded. Tests skip, saying why, when an optional package is missing
(pip install -r requirements-integrations.txt; the official code lives in ../shared/third_party).
"""
import importlib
import random

import pytest
import torch
from torch import nn

from vft_kernels.testing import assert_matches_reference, fsq_boundary_tokens

from benchmarks.bench_integrations import INSTALL, official_on_path

official_on_path()  # the pinned official code in ../shared/third_party, when present

PACKAGES = ["videoflextok", "flextok"]


def _vqp():
    return pytest.importorskip("vector_quantize_pytorch",
                               reason=f"vector-quantize-pytorch is not installed ({INSTALL})")


def _official(package, module):
    return pytest.importorskip(f"{package}.{module}", reason=f"the official {package} code (../shared/third_party) "
                               f"or one of its dependencies is missing ({INSTALL})")


def _integration(package):
    return importlib.import_module(f"vft_kernels.integrations.{package}")


def _count_calls(monkeypatch, module, name):
    """Count the calls ``module`` makes to its global ``name`` (a vk op), still running it."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


# --------------------------------------------------------------------------------------
# vector_quantize_pytorch.FSQ


def _vqp_tokens(fsq, z):
    """The quantizer input [b, n, c, d] that fsq(z) quantizes (to find rounding-boundary tokens)."""
    if z.ndim >= 4 or fsq.channel_first:
        z = z.movedim(1, -1)
    z = z.reshape(z.shape[0], -1, z.shape[-1])
    with torch.no_grad():
        zq = fsq.project_in(z)
    return zq.reshape(zq.shape[0], zq.shape[1], fsq.num_codebooks, -1)


def _channel_last_rows(fsq, t, like):
    """Output ``t`` (laid out like input ``like``) as rows [b, n, ...] of the quantizer's tokens."""
    if like.ndim >= 4 or fsq.channel_first:
        t = t.movedim(1, -1)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _assert_vqp_same(fsq, z, ref, got):
    """Outputs and indices identical except at rounding-boundary tokens (docs/spec.md §4)."""
    (out0, idx0), (out1, idx1) = ref, got
    levels = fsq._levels.tolist()
    near = fsq_boundary_tokens(_vqp_tokens(fsq, z), levels).any(-1)  # [b, n]
    assert int(near.sum()) <= 2, f"{int(near.sum())} tokens at a rounding boundary"
    assert out1.shape == out0.shape and out1.dtype == out0.dtype
    o0, o1 = _channel_last_rows(fsq, out0, z), _channel_last_rows(fsq, out1, z)
    assert torch.equal(o0[~near], o1[~near])
    if idx0 is None:
        assert idx1 is None
        return
    assert idx1.shape == idx0.shape and idx1.dtype == idx0.dtype
    i0 = idx0.reshape(near.shape + (-1,))
    i1 = idx1.reshape(near.shape + (-1,))
    assert torch.equal(i0[~near], i1[~near])


VQP_CASES = [  # (constructor kwargs, input shape)
    (dict(levels=[8, 5, 5, 5]), (3, 37, 4)),
    (dict(levels=[8, 8, 8, 5, 5, 5], dim=13), (2, 29, 13)),  # projections
    (dict(levels=[7, 5, 5, 5, 5], dim=9, num_codebooks=3), (2, 17, 9)),  # several codebooks
    (dict(levels=[8, 5, 5, 5], channel_first=True), (2, 4, 23)),
    (dict(levels=[8, 6, 5], dim=7, num_codebooks=2), (2, 7, 5, 3)),  # image [b, D, h, w]
    (dict(levels=[8, 5, 5, 5], dim=6), (1, 6, 3, 4, 5)),  # video [b, D, t, h, w]
    (dict(levels=[5, 5, 3], return_indices=False), (2, 11, 3)),
    (dict(levels=[8, 5, 5, 5], num_codebooks=2, keep_num_codebooks_dim=True, dim=8), (1, 1, 8)),
]


@pytest.mark.parametrize("kwargs,shape", VQP_CASES, ids=[str(i) for i in range(len(VQP_CASES))])
def test_vqp_patched_matches_original(kwargs, shape, monkeypatch):
    from vft_kernels.integrations import vector_quantize_pytorch as integration
    fsq = _vqp().FSQ(**kwargs)
    z = torch.randn(shape) * 2
    ref = fsq(z)
    ref_codes = fsq.indices_to_codes(ref[1]) if ref[1] is not None else None
    with integration.patched(fsq) as handle:
        assert "patched: forward -> vk.fsq_quantize" in handle.summary()
        quantize_calls = _count_calls(monkeypatch, integration, "fsq_quantize")  # (after patch's probe)
        decode_calls = _count_calls(monkeypatch, integration, "fsq_indices_to_codes")
        got = fsq(z)
        _assert_vqp_same(fsq, z, ref, got)
        assert len(quantize_calls) == 1
        if ref_codes is not None:
            assert torch.equal(fsq.indices_to_codes(ref[1]), ref_codes)
            assert len(decode_calls) == 1
    # unpatched on exit: the original methods and outputs, exactly
    assert "forward" not in vars(fsq) and "indices_to_codes" not in vars(fsq)
    out, idx = fsq(z)
    assert torch.equal(out, ref[0]) and (idx is None or torch.equal(idx, ref[1]))


def test_vqp_gradients_and_bf16_input():
    from vft_kernels.integrations import vector_quantize_pytorch as integration
    FSQ = _vqp().FSQ
    fsq, plain = FSQ(levels=[8, 5, 5, 5], dim=5), FSQ(levels=[8, 5, 5, 5])
    z, zb = torch.randn(2, 19, 5) * 2, (torch.randn(3, 7, 4) * 2).bfloat16()
    z0, z1 = z.clone().requires_grad_(), z.clone().requires_grad_()
    out0, idx0 = fsq(z0)
    out0.square().sum().backward()
    ref_b = plain(zb)
    with integration.patched(fsq), integration.patched(plain):
        out1, idx1 = fsq(z1)
        out1.square().sum().backward()
        got_b = plain(zb)  # quantized in float32, codes returned in bfloat16
    _assert_vqp_same(fsq, z, (out0.detach(), idx0), (out1.detach(), idx1))
    torch.testing.assert_close(z1.grad, z0.grad, rtol=1e-5, atol=1e-6)
    assert got_b[0].dtype == torch.bfloat16
    _assert_vqp_same(plain, zb.float(), ref_b, got_b)


VQP_UNCOVERED = [  # (constructor kwargs, text the summary must contain)
    (dict(levels=[8, 5, 5, 5], preserve_symmetry=True), "preserve_symmetry=True"),
    (dict(levels=[2, 5, 5], preserve_symmetry=True, noise_dropout=0.5), "noise_dropout=0.5"),
    (dict(levels=[8, 5, 5, 5], bound_hard_clamp=True), "bound_hard_clamp=True"),
    (dict(levels=[5, 5, 5], orthogonal_rotation=True), "orthogonal_rotation=True"),
    (dict(levels=[8, 5, 5, 5], scale=2.0), "scale=2.0"),
    # > 2**24 codes (return_indices is switched on after construction: no 200 MB implicit codebook)
    (dict(levels=[256, 256, 257], return_indices=False), "2**24"),
]


@pytest.mark.parametrize("kwargs,reason", VQP_UNCOVERED, ids=[r for _, r in VQP_UNCOVERED])
def test_vqp_uncovered_configs_fall_back(kwargs, reason):
    from vft_kernels.integrations import vector_quantize_pytorch as integration
    fsq = _vqp().FSQ(**kwargs)
    fsq.return_indices = True
    z = torch.randn(2, 9, len(kwargs["levels"]))
    torch.manual_seed(5)  # noise_dropout draws random numbers (training mode)
    ref = fsq(z)
    with integration.patched(fsq) as handle:
        assert "not patched, every call runs the original" in handle.summary() and reason in handle.summary()
        assert "forward" not in vars(fsq)
        torch.manual_seed(5)
        out, idx = fsq(z)
        assert torch.equal(out, ref[0]) and torch.equal(idx, ref[1])


def test_vqp_probe_rejects_another_bound_formula():
    from vft_kernels.integrations import vector_quantize_pytorch as integration
    fsq = _vqp().FSQ(levels=[8, 5, 5, 5])

    def quantize_one_minus_eps(z, eps=1e-3):  # a "(1 - eps)" bound: not docs/spec.md §1
        L = fsq._levels
        half_l = (L - 1) * (1 - eps) / 2
        offset = torch.where(L % 2 == 0, 0.5, 0.0)
        return ((z + (offset / half_l).atanh()).tanh() * half_l - offset).round() / (L // 2)

    fsq.quantize = quantize_one_minus_eps
    with integration.patched(fsq) as handle:
        assert "differ from docs/spec.md §1 on a probe" in handle.summary()
        assert "forward" not in vars(fsq)


def test_vqp_per_call_fallbacks(monkeypatch):
    from vft_kernels.integrations import vector_quantize_pytorch as integration
    fsq = _vqp().FSQ(levels=[8, 5, 5, 5])
    z64 = torch.randn(2, 13, 4, dtype=torch.float64)
    bad = torch.tensor([[0, 5, 1000, -1, 999]])  # 1000 and -1 are out of range: the original wraps them
    ref64, ref_bad = fsq(z64), fsq.indices_to_codes(bad)
    with integration.patched(fsq):
        calls = _count_calls(monkeypatch, integration, "fsq_quantize")
        decode_calls = _count_calls(monkeypatch, integration, "fsq_indices_to_codes")
        out, idx = fsq(z64)  # float64 quantization: not the float32 kernels
        assert torch.equal(out, ref64[0]) and torch.equal(idx, ref64[1]) and not calls
        assert torch.equal(fsq.indices_to_codes(bad), ref_bad) and not decode_calls
        with pytest.raises(AssertionError, match="expected dimension of 4"):  # the original's own error
            fsq(torch.randn(2, 13, 5))


def test_vqp_state_dict_twice_and_errors():
    from vft_kernels.integrations import vector_quantize_pytorch as integration
    FSQ = _vqp().FSQ
    fsq, other = FSQ(levels=[8, 5, 5, 5], dim=7), FSQ(levels=[8, 5, 5, 5], dim=7)
    keys = list(fsq.state_dict())
    z = torch.randn(3, 11, 7)
    handle = integration.patch(fsq)
    assert integration.patch(fsq) is handle and repr(handle) == handle.summary()
    assert list(fsq.state_dict()) == keys
    other.load_state_dict(fsq.state_dict())  # saved while patched -> unpatched
    _assert_vqp_same(fsq, z, other(z), fsq(z))
    fresh = FSQ(levels=[8, 5, 5, 5], dim=7)
    fsq.load_state_dict(fresh.state_dict())  # unpatched -> patched
    _assert_vqp_same(fsq, z, fresh(z), fsq(z))
    handle.unpatch()
    handle.unpatch()  # idempotent
    assert "[unpatched]" in handle.summary() and integration.patch(fsq) is not handle
    integration.patch(fsq).unpatch()
    with pytest.raises(TypeError, match="expected a vector_quantize_pytorch.FSQ instance, got torch.nn.*Linear"):
        integration.patch(nn.Linear(3, 3))


# --------------------------------------------------------------------------------------
# Official FSQ (regularizers/quantize_fsq.py of each package)


class Tokenizer(nn.Module):
    """An nn.Module holding official parts, as the official wrappers do (tiny sizes)."""

    def __init__(self, package, levels=(8, 8, 8, 5, 5, 5), pipeline=None, **fsq_kwargs):
        super().__init__()
        fsq_mod = _official(package, "regularizers.quantize_fsq")
        self.encoder = nn.Linear(5, len(levels))
        self.regularizer = fsq_mod.FSQ("latents", "quants", "tokens", list(levels), **fsq_kwargs)
        self.decoder = FakeFlowDecoder(3)
        if pipeline is not None:
            self.pipeline = pipeline(model=self.decoder)


def _fsq_outputs(fsq, z, z_list, tokens):
    torch.manual_seed(1)
    quant, tok = fsq.forward_z(z)
    listed = fsq({"latents": z_list})
    after = torch.randn(4)  # the global RNG stream after the quantizer ran
    return quant, tok, listed["quants"], listed["tokens"], fsq.indices_to_embedding(tokens), after


@pytest.mark.parametrize("package", PACKAGES)
def test_official_fsq_matches_original(package, monkeypatch):
    integration = _integration(package)
    model = Tokenizer(package).eval()
    fsq = model.regularizer
    levels = fsq._levels.tolist()
    z = torch.randn(2, 37, 6) * 2
    z_list = [torch.randn(1, 13, 6) * 2, torch.randn(1, 6, 6) * 2]
    tokens = torch.randint(0, fsq.codebook_size, (1, 19))
    ref, ref_bf16 = _fsq_outputs(fsq, z, z_list, tokens), fsq.forward_z(z.bfloat16())
    quantize_calls = _count_calls(monkeypatch, importlib.import_module("vft_kernels.integrations.official_fsq"), "fsq_quantize")  # shared code
    with integration.patched(model, guidance=False) as handle:
        assert "fsq: 1 of 1 official FSQ module(s) patched" in handle.summary()
        got, got_bf16 = _fsq_outputs(fsq, z, z_list, tokens), fsq.forward_z(z.bfloat16())
    # the patch-time probe, forward_z(z), the list (flextok packs it into one call), forward_z(bf16)
    assert len(quantize_calls) == 1 + 1 + (1 if package == "flextok" else 2) + 1
    cases = [(z, ref[:2], got[:2]), (z.bfloat16().float(), ref_bf16, got_bf16)]
    cases += [(zi, (ref[2][i], ref[3][i]), (got[2][i], got[3][i])) for i, zi in enumerate(z_list)]
    for inputs, (q0, t0), (q1, t1) in cases:
        near = fsq_boundary_tokens(inputs, levels)
        assert int(near.sum()) <= 2
        assert t1.dtype == t0.dtype == torch.int64 and q1.dtype == q0.dtype == torch.float32
        assert torch.equal(q1[~near], q0[~near]) and torch.equal(t1[~near], t0[~near])
    assert torch.equal(got[4], ref[4])  # indices_to_embedding
    assert torch.equal(got[5], ref[5])  # same random numbers drawn afterwards
    assert "forward_z" not in vars(fsq) and "indices_to_embedding" not in vars(fsq)
    assert torch.equal(fsq.forward_z(z)[1], ref[1])


@pytest.mark.parametrize("package", PACKAGES)
def test_official_fsq_training_randomness_falls_back(package, monkeypatch):
    integration = _integration(package)
    model = Tokenizer(package, drop_quant_p=0.5, corrupt_tokens_p=0.3, apply_corrupt_tokens_p=1.0).train()
    fsq = model.regularizer
    z = torch.randn(4, 21, 6)
    bad_tokens = torch.tensor([[0, fsq.codebook_size, -1]])

    def run():
        torch.manual_seed(3)
        random.seed(3)
        return fsq.forward_z(z), fsq.indices_to_embedding(bad_tokens)

    (q0, t0), e0 = run()
    calls = _count_calls(monkeypatch, importlib.import_module("vft_kernels.integrations.official_fsq"), "fsq_quantize")  # shared code
    with integration.patched(model):
        calls.clear()  # the patch-time probe (it leaves the random stream alone: checked below)
        (q1, t1), e1 = run()
        assert not calls  # dropout / corruption: the original ran
        assert torch.equal(q1, q0) and torch.equal(t1, t0) and torch.equal(e1, e0)
        fsq.drop_quant_p = fsq.corrupt_tokens_p = 0.0  # training without randomness: the kernel
        (q2, t2), _ = run()
        assert len(calls) == 1
    (q3, t3), _ = run()  # the original, training without randomness
    near = fsq_boundary_tokens(z, fsq._levels.tolist())
    assert torch.equal(q2[~near], q3[~near]) and torch.equal(t2[~near], t3[~near])


@pytest.mark.parametrize("package", PACKAGES)
def test_official_fsq_inexact_levels_not_patched(package):
    integration = _integration(package)
    model = Tokenizer(package, levels=(27, 5, 8))
    fsq = model.regularizer
    # The original's token arithmetic is wrong for one code of L = 27 (so the kernel would differ).
    assert not torch.equal(fsq.codes_to_indices(fsq.implicit_codebook), torch.arange(fsq.codebook_size))
    with integration.patched(model) as handle:
        assert "fsq: 0 of 1 official FSQ module(s) patched" in handle.summary()
        assert "levels [27]" in handle.summary() and "forward_z" not in vars(fsq)


# --------------------------------------------------------------------------------------
# Sampler guidance (flow_matching/pipelines.py + cfg_utils.py)


class FakeFlowDecoder(nn.Module):
    """Stands in for the official flow decoder (same data-dict protocol and ``device``): the
    velocity is a smooth function of the noised latents and the time, computed in their dtype;
    the unconditional pass (``eval_dropout_mask``) gives a different one."""

    def __init__(self, channels):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels) * 0.3)

    @property
    def device(self):
        return self.gain.device

    def forward(self, data_dict):
        uncond = data_dict.get("eval_dropout_mask")
        out = []
        for j, x in enumerate(data_dict["x_t"]):
            shape = (1, -1) + (1,) * (x.ndim - 2)
            a, b = self.gain.to(x.dtype).view(shape), self.bias.to(x.dtype).view(shape)
            v = torch.tanh(a * x + b) - data_dict["t"][j].to(x.dtype) * x
            if uncond is not None and uncond[j]:
                v = 0.5 * v + 0.3 * torch.sin(x)
            out.append(v)
        data_dict["v"] = out
        return data_dict


KEYS = dict(target_sizes_read_key="sizes", latents_read_key="quants", timesteps_read_key="t",
            reconst_write_key="v", out_channels=3)


def _pipeline_factory(package, name):
    mod = _official(package, "flow_matching.pipelines")
    cls = getattr(mod, name)
    if name == "VideoMinRFPipeline":
        return lambda model: cls(model=model, noised_videos_read_key="x_t", cond_vae_latents_key="cond", **KEYS)
    return lambda model: cls(model=model, noise_read_key="noise", noised_images_read_key="x_t", **KEYS)


GUIDANCE_CASES = [  # (package, pipeline, latent shapes, call kwargs)
    ("videoflextok", "VideoMinRFPipeline", [(1, 3, 3, 6, 5)] * 2, dict(guidance_scale=3.0)),
    ("videoflextok", "VideoMinRFPipeline", [(1, 3, 3, 6, 5)] * 2,  # APG, shared momentum, callable scale
     dict(guidance_scale=lambda t: 1.0 + 2.0 * t, perform_norm_guidance=True, momentum=0.5, eta=0.3,
          norm_threshold=0.6)),
    ("videoflextok", "VideoMinRFPipeline", [(1, 3, 4, 5, 7)], dict(guidance_scale=1.0)),  # no guidance
    ("videoflextok", "MinRFPipeline", [(1, 3, 6, 5)] * 2, dict(guidance_scale=2.5, perform_norm_guidance=True)),
    ("flextok", "MinRFPipeline", [(1, 3, 6, 5), (1, 3, 4, 7)], dict(guidance_scale=2.5, perform_norm_guidance=True)),
    ("flextok", "MinRFPipeline", [(1, 3, 6, 5), (1, 3, 4, 7)], dict(guidance_scale=4.0)),
]


def _sample(model, shapes, noise, dtype, timesteps=3, **kwargs):
    """Run model.pipeline from the given noise (cast to dtype); returns the final latents."""
    noise = [n.to(dtype) for n in noise]
    data = {"quants": [None] * len(shapes), "sizes": [tuple(s[2:]) for s in shapes]}
    if hasattr(model.pipeline, "noised_videos_read_key"):  # VideoMinRFPipeline
        kwargs["noise_list"] = noise
    else:
        data["noise"] = noise
    return model.pipeline(data, timesteps=timesteps, verbose=False, **kwargs)["v"]


@pytest.mark.parametrize("package,name,shapes,kwargs", GUIDANCE_CASES,
                         ids=[f"{p}-{n}-{i}" for i, (p, n, _, _) in enumerate(GUIDANCE_CASES)])
def test_sampler_guidance_matches_original(package, name, shapes, kwargs, monkeypatch):
    integration = _integration(package)
    model = Tokenizer(package, pipeline=_pipeline_factory(package, name))
    noise = [torch.randn(s) for s in shapes]
    ref64 = _sample(model, shapes, noise, torch.float64, **kwargs)
    ref32 = _sample(model, shapes, noise, torch.float32, **kwargs)
    calls = _count_calls(monkeypatch, importlib.import_module("vft_kernels.integrations.official_sampler"), "flow_step")
    with integration.patched(model, fsq=False) as handle:
        assert f"guidance: sampler patched: {name} at .pipeline" in handle.summary()
        got = _sample(model, shapes, noise, torch.float32, **kwargs)
    assert len(calls) == 3 * len(shapes)
    for out, r64, r32 in zip(got, ref64, ref32):
        assert_matches_reference(f"{name} sampler", out, r64, r32, torch.float32)
    # unpatched again: the original's outputs exactly
    assert type(model.pipeline).__name__ == name
    for out, r32 in zip(_sample(model, shapes, noise, torch.float32, **kwargs), ref32):
        assert torch.equal(out, r32)


def test_sampler_noise_and_prefix_conditioning_follow_the_original():
    integration = _integration("videoflextok")
    model = Tokenizer("videoflextok", pipeline=_pipeline_factory("videoflextok", "VideoMinRFPipeline"))
    cond = [torch.randn(1, 3, 1, 6, 5)]

    def run():
        data = {"quants": [None], "cond": cond}
        generator = torch.Generator().manual_seed(7)  # the noise is drawn inside the pipeline
        return model.pipeline(data, generator=generator, timesteps=4, video_sizes=[(3, 6, 5)], verbose=False,
                              guidance_scale=2.0)["v"][0]

    ref = run()
    with integration.patched(model):
        got = run()
    assert torch.equal(got[:, :, :1], cond[0])  # the clean prefix frames, exactly
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_sampler_cfg_rescaler_falls_back(monkeypatch):
    integration = _integration("videoflextok")
    cfg_utils = _official("videoflextok", "flow_matching.cfg_utils")
    model = Tokenizer("videoflextok", pipeline=_pipeline_factory("videoflextok", "VideoMinRFPipeline"))
    noise = [torch.randn(1, 3, 2, 4, 4)]
    rescaler = cfg_utils.CFGWithRescale(rescale=0.5, channel_wise=False)
    ref = _sample(model, [n.shape for n in noise], noise, torch.float32, guidance_scale=3.0, cfg_rescaler=rescaler)
    calls = _count_calls(monkeypatch, importlib.import_module("vft_kernels.integrations.official_sampler"),
                         "flow_step")
    with integration.patched(model):
        got = _sample(model, [n.shape for n in noise], noise, torch.float32, guidance_scale=3.0,
                      cfg_rescaler=rescaler)
    assert not calls and torch.equal(got[0], ref[0])


# --------------------------------------------------------------------------------------
# Patch lifecycle of the official integrations


@pytest.mark.parametrize("package", PACKAGES)
def test_official_patch_lifecycle(package):
    integration = _integration(package)
    pipeline = _pipeline_factory(package, "VideoMinRFPipeline" if package == "videoflextok" else "MinRFPipeline")
    model, other = Tokenizer(package, pipeline=pipeline), Tokenizer(package, pipeline=pipeline)
    official_cls, fsq = type(model.pipeline), model.regularizer
    keys = list(model.state_dict())
    handle = integration.patch(model)
    summary = handle.summary()
    assert repr(handle) == summary
    assert "fsq: 1 of 1 official FSQ module(s) patched" in summary
    assert f"guidance: sampler patched: {official_cls.__name__} at .pipeline" in summary
    assert integration.ATTENTION_LINE in summary  # this tokenizer stand-in holds no FlexAttention layer
    assert isinstance(model.pipeline, official_cls) and type(model.pipeline) is not official_cls
    assert type(other.pipeline) is official_cls and "forward_z" not in vars(other.regularizer)  # per instance
    # patching twice is harmless; a context block inside keeps the outer patch
    assert integration.patch(model) is handle
    with integration.patched(model) as inner:
        assert inner is handle
    assert handle.active and "forward_z" in vars(fsq)
    # state dicts: same keys, and they load both ways
    assert list(model.state_dict()) == keys
    other.load_state_dict(model.state_dict())
    model.load_state_dict(Tokenizer(package, pipeline=pipeline).state_dict())
    handle.unpatch()
    assert type(model.pipeline) is official_cls and "forward_z" not in vars(fsq)
    assert "indices_to_embedding" not in vars(fsq) and "[unpatched]" in handle.summary()
    with integration.patched(model, fsq=False, attention=False) as h:
        assert "fsq: not requested" in h.summary() and "attention: not requested" in h.summary()
        assert "forward_z" not in vars(fsq)
    assert type(model.pipeline) is official_cls


def test_official_patch_reports_unpatched_pipelines_and_rejects_bad_input():
    integration = _integration("videoflextok")
    pipelines = _official("videoflextok", "flow_matching.pipelines")
    model = Tokenizer("videoflextok", pipeline=lambda model: pipelines.AnyResPipelineCond(model=model, scheduler=None))
    with integration.patched(model) as handle:
        assert "guidance: AnyResPipelineCond at .pipeline not patched (scheduler-based" in handle.summary()
        assert type(model.pipeline) is pipelines.AnyResPipelineCond
    with pytest.raises(ValueError, match=r"found nothing to patch in Linear: expected instances of "
                                         r"videoflextok\.regularizers\.quantize_fsq\.FSQ or "
                                         r"videoflextok\.flow_matching\.pipelines\.VideoMinRFPipeline"):
        integration.patch(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="expected the official VideoFlexTok model or an nn.Module"):
        integration.patch(object())
    with pytest.raises(ValueError, match="nothing to patch with fsq=False and guidance=False"):
        integration.patch(model, fsq=False, guidance=False)
    # A flextok FSQ is not a videoflextok one (and vice versa).
    _official("flextok", "regularizers.quantize_fsq")
    with pytest.raises(ValueError, match="found nothing to patch"):
        integration.patch(Tokenizer("flextok"), guidance=False)


@pytest.mark.parametrize("package", PACKAGES)
def test_official_fsq_out_of_range_ids_wrap_like_the_original_without_a_host_read(package, monkeypatch):
    """indices_to_embedding on any integer ids: the original's digits wrap around (they are
    those of id mod codebook_size); the patch gives the same codes through the kernel, and reads
    nothing back to the host to decide (a device sync per call on a GPU)."""
    integration = _integration(package)
    model = Tokenizer(package)
    fsq = model.regularizer
    n = fsq.codebook_size
    for dtype in (torch.int64, torch.int32):
        ids = torch.tensor([[0, 1, n - 1, n, -1, -n - 7, 3 * n + 5, 2**30 + 3]], dtype=dtype)
        want = fsq.indices_to_embedding(ids)
        with integration.patched(model):
            decode = _count_calls(monkeypatch, importlib.import_module("vft_kernels.integrations.official_fsq"), "fsq_indices_to_codes")
            reads = []
            for name in ("tolist", "item", "__bool__"):
                real = getattr(torch.Tensor, name)
                monkeypatch.setattr(torch.Tensor, name,
                                    lambda self, *a, _real=real, _n=name: reads.append(_n) or _real(self, *a))
            got = fsq.indices_to_embedding(ids)
            monkeypatch.undo()
        assert len(decode) == 1 and not reads, (decode, reads)
        assert torch.equal(got, want), dtype


@pytest.mark.parametrize("package", PACKAGES)
def test_official_fsq_is_trusted_by_behaviour_not_class(package, monkeypatch):
    """The official FSQ class with a changed method (as a new release could have) keeps the
    original code: the patch-time probe compares its outputs with the kernels', and leaves the
    random stream as it was (forward_z draws)."""
    integration = _integration(package)
    model = Tokenizer(package).eval()
    cls = type(model.regularizer)
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    with integration.patched(model, guidance=False) as handle:
        assert "fsq: 1 of 1 official FSQ module(s) patched" in handle.summary()
    assert torch.equal(torch.rand(3), before)  # the probe drew nothing from the global stream
    original_bound = cls.bound
    monkeypatch.setattr(cls, "bound", lambda self, z, *a, **k: original_bound(self, z * 0.5, *a, **k))
    with integration.patched(model, guidance=False) as handle:
        summary = handle.summary()
    assert "fsq: 0 of 1 official FSQ module(s) patched" in summary
    assert "differ from docs/spec.md §1 on a probe" in summary


def test_sampler_loop_is_pinned_to_the_official_source(monkeypatch):
    """The vft loop reproduces one version of the official sampler loop (a hash of its source
    is pinned): a different official loop is reported and left to run as it is."""
    import dataclasses
    integration = _integration("videoflextok")
    model = Tokenizer("videoflextok", pipeline=_pipeline_factory("videoflextok", "VideoMinRFPipeline"))
    with integration.patched(model) as handle:
        assert "guidance: sampler patched: VideoMinRFPipeline" in handle.summary()
    pkg = integration._VIDEOFLEXTOK
    spec = dataclasses.replace(pkg.samplers["VideoMinRFPipeline"], source="0123456789abcdef")
    monkeypatch.setattr(integration, "_VIDEOFLEXTOK",
                        dataclasses.replace(pkg, samplers={**pkg.samplers, "VideoMinRFPipeline": spec}))
    with integration.patched(model) as handle:
        summary = handle.summary()
    assert "VideoMinRFPipeline at .pipeline not patched (its __call__ differs from the version" in summary
    assert "known 0123456789abcdef" in summary
