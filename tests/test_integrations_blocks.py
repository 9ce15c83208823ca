"""Whole official trunks on vft ops (``patch(model, blocks=True)``, vft_kernels.integrations.blocks).

Checked against the official code itself (../shared/third_party, tiny sizes, random weights):
every trunk output, padding rows included, under the docs/spec.md §4 rule against the official
float64 run, for each block class (FlexBlock in the encoder, FlexBlockAdaLN in the decoder),
each mask mode, adaLN expansion 1 and 2, keeps that differ per sample, the unconditional pass
(null condition: every register row identical) and runs of mask tokens past keep (computed once:
``_run_lengths``); gradients through patched blocks against the official blocks; the patch
lifecycle, threads, deep copies, and the steady path's host reads.
"""
import contextlib
import copy
import math
import importlib
import os
import random
import sys
import threading

import numpy as np
import pytest
import torch

from vft_kernels.testing import assert_matches_reference

from benchmarks.bench_integrations import INSTALL, official_on_path

official_on_path()

V, F = "videoflextok", "flextok"

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile",
                                        "ignore:.*non-tuple sequence for multidimensional indexing")


def _tiny(package, **kwargs):
    for module in ("model.layers.transformer_blocks", "model.preprocessors.flex_seq_packing",
                   "flow_matching.pipelines"):
        pytest.importorskip(f"{package}.{module}", reason=f"the official {package} code (../shared/third_party) or "
                            f"one of its dependencies is missing ({INSTALL})")
    from benchmarks.bench_integrations import build_tiny_official
    return build_tiny_official(package, **kwargs)


def _integration(package):
    return importlib.import_module(f"vft_kernels.integrations.{package}")


def _cast_time_embedding_hook(module, args, out):
    out["dec_t_emb"] = out["dec_t_emb"].double()
    return out


def _float64_twin(model):
    model64 = copy.deepcopy(model).double()
    model64.decoder.module_dict["dec_time_emb"].float().register_forward_hook(_cast_time_embedding_hook)
    return model64


def _trunk_outputs(model, latents, quants, keep, dtype, uncond=False):
    """The encoder and decoder trunks' whole outputs [1, N, W] (padding rows included) for one
    encode and one decoder call (conditional, or the unconditional pass of guidance)."""
    got = {}
    hooks = [model.encoder.module_dict["enc_trunk"].register_forward_hook(
                 lambda m, a, out: got.__setitem__("enc", out["enc_packed_out"].clone())),
             model.decoder.module_dict["dec_trunk"].register_forward_hook(
                 lambda m, a, out: got.__setitem__("dec", out["dec_packed_out"].clone()))]
    try:
        latents = [x.to(dtype) for x in latents]
        with torch.no_grad():
            model.encode(latents)
            data = {"quants": [q.to(dtype).clone() for q in quants], "noised_latents": list(latents),
                    "timesteps": torch.full((len(latents),), 0.7, device=model.device)}
            if keep is not None:
                data["eval_keep_k"] = list(keep)
            if uncond:
                data["eval_dropout_mask"] = [True] * len(latents)
            model.decoder(data)
    finally:
        for h in hooks:
            h.remove()
    return got["enc"], got["dec"]


# (package, encoder mode, decoder mode, latent sizes, registers, keep, adaLN expansion); the video
# interleave packer supports only per-subsequence modulations (expansion 2), FlexTok's both
CASES = [
    (V, "time_block_causal_last", "time_block_causal", [(3, 8, 8), (3, 8, 8)], 8, [2, 5], 2),
    (V, "time_block_causal_last", "time_block_causal", [(2, 8, 6)] * 3, 8, [8, 3, 1], 2),
    (V, "full", "causal", [(2, 4, 4), (2, 4, 4)], 4, [1, 4], 2),
    (V, "time_block_causal", "full", [(2, 4, 6)] * 2, 6, [3, 3], 2),
    (F, "causal_last", "full", [(8, 8), (8, 8), (8, 8)], 8, [2, 4, 8], 2),
    (F, "causal_last", "full", [(6, 6)] * 2, 4, None, 1),
]


@pytest.mark.parametrize("package,enc_mode,dec_mode,sizes,registers,keep,expansion", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-x{c[6]}" for c in CASES])
def test_patched_trunks_match_official(package, enc_mode, dec_mode, sizes, registers, keep, expansion):
    from benchmarks.bench_integrations import sample_latents
    integration = _integration(package)
    model = _tiny(package, enc_mode=enc_mode, dec_mode=dec_mode, registers=registers, adaln_expansion=expansion)
    model64 = _float64_twin(model)
    latents = sample_latents(package, sizes)
    with torch.no_grad():
        quants = [model.regularizer.indices_to_embedding(t) for t in model.tokenize(latents)]
    refs = {u: (_trunk_outputs(model, latents, quants, keep, torch.float32, u),
                _trunk_outputs(model64, latents, quants, keep, torch.float64, u)) for u in (False, True)}
    with integration.patched(model) as handle:
        summary = handle.summary()
        assert "blocks: 2 of 2 trunk(s) patched" in summary
        assert "enc_trunk: 2 x FlexBlock on vft ops" in summary and "dec_trunk: 2 x FlexBlockAdaLN on vft ops" in summary
        for uncond in (False, True):
            got = _trunk_outputs(model, latents, quants, keep, torch.float32, uncond)
            (ref32_enc, ref32_dec), (ref64_enc, ref64_dec) = refs[uncond]
            assert got[0].shape == ref32_enc.shape and got[1].shape == ref32_dec.shape  # padding rows kept
            assert_matches_reference(f"encoder trunk (uncond={uncond})", got[0], ref64_enc, ref32_enc, torch.float32)
            assert_matches_reference(f"decoder trunk (uncond={uncond})", got[1], ref64_dec, ref32_dec, torch.float32)
        lines = handle.summary()
        assert "trunk calls so far: 4 on vft blocks" in lines and "ran the official blocks" not in lines
        # The unconditional pass: every register row of a group is the null condition, computed once
        # where the mask treats a group's tokens alike (not under a token-causal mask).
        assert ("identical register rows computed once" in lines) == (dec_mode != "causal")
        # The encoder's padding rows (one fill value, no keys) go through the plain blocks as one
        # row (patches of 2x2 latent pixels, 1 frame; sequences padded to a multiple of 128).
        real = sum(math.prod(s[:-2]) * (s[-2] // 2) * (s[-1] // 2) + registers * (s[0] if package == V else 1)
                   for s in sizes)
        n_pad = refs[False][0][0].shape[1] - real
        assert n_pad == -real % 128
        assert ("padding rows computed as one" in lines) == (n_pad > 1), (n_pad, lines)


@pytest.mark.parametrize("package", [V, F])
def test_padded_hidden_width_matches_official(package):
    """Width 128: the official GatedMlp's hidden width int(2/3 * 4 * 128) = 341 is padded to 352
    (zero gate/up rows, zero down columns) in the cached weights; the trunks still match the
    official ones within the rule."""
    from benchmarks.bench_integrations import sample_latents
    integration = _integration(package)
    model = _tiny(package, dim=128, head_dim=32, registers=4)
    model64 = _float64_twin(model)
    sizes = [(2, 4, 4)] * 2 if package == V else [(4, 4)] * 2
    latents = sample_latents(package, sizes)
    with torch.no_grad():
        quants = [model.regularizer.indices_to_embedding(t) for t in model.tokenize(latents)]
    ref32 = _trunk_outputs(model, latents, quants, None, torch.float32)
    ref64 = _trunk_outputs(model64, latents, quants, None, torch.float64)
    with integration.patched(model):
        got = _trunk_outputs(model, latents, quants, None, torch.float32)
        runner = vars(model.decoder.module_dict["dec_trunk"])["forward"].__func__._vft_runner
        per_block, _ = runner.weights.get(torch.float32)
        assert model.decoder.module_dict["dec_trunk"].blocks[0].mlp.fc1.out_features == 341
        assert per_block[0]["gate_up"].shape == (704, 128) and per_block[0]["down"].shape == (128, 352)
    assert_matches_reference("encoder trunk, padded MLP", got[0], ref64[0], ref32[0], torch.float32)
    assert_matches_reference("decoder trunk, padded MLP", got[1], ref64[1], ref32[1], torch.float32)


def test_mask_token_runs_are_computed_once_and_match():
    """Conditional pass with keep < R in every sample: the mask tokens past the largest keep form
    a run in every group; the compressed trunk matches the official one, and an uncompressed
    patched trunk matches too (the same numbers within the rule)."""
    from benchmarks.bench_integrations import sample_latents
    integration = _integration(V)
    model = _tiny(V, registers=8)
    model64 = _float64_twin(model)
    sizes, keep = [(3, 8, 8)] * 2, [2, 5]
    latents = sample_latents(V, sizes)
    with torch.no_grad():
        quants = [model.regularizer.indices_to_embedding(t) for t in model.tokenize(latents)]
    ref32 = _trunk_outputs(model, latents, quants, keep, torch.float32)
    ref64 = _trunk_outputs(model64, latents, quants, keep, torch.float64)
    with integration.patched(model) as handle:
        got = _trunk_outputs(model, latents, quants, keep, torch.float32)
        # 3 frames per sample; runs of 8 - 2 = 6 and 8 - 5 = 3 mask tokens (each sample its own
        # segment): 5 and 2 rows saved per group
        assert "(21 identical register rows computed once)" in handle.summary()
        runner = vars(model.decoder.module_dict["dec_trunk"])["forward"].__func__._vft_runner
        runner.compress = False
        plain = _trunk_outputs(model, latents, quants, keep, torch.float32)
    assert_matches_reference("decoder trunk, runs computed once", got[1], ref64[1], ref32[1], torch.float32)
    assert_matches_reference("decoder trunk, every row computed", plain[1], ref64[1], ref32[1], torch.float32)


def test_no_runs_where_registers_are_causal():
    """The encoder's registers attend causally among themselves (block_causal_last): equal rows
    there do not stay equal, so nothing is compressed even when the input rows are equal."""
    from vft_kernels.integrations import blocks
    from vft_kernels.integrations.official_attention import _Plan
    runner = blocks._Trunk.__new__(blocks._Trunk)
    runner.compress = True
    h = torch.zeros(1, 2, 7, 4)  # every row equal
    causal = _Plan(__import__("vft_kernels").RegisterLayout(2, 3, 4, "block_causal_last"), (0, 14), 14)
    symmetric = _Plan(__import__("vft_kernels").RegisterLayout(2, 7, 0, "block_causal"), (0, 14), 14)
    assert runner._run_lengths(h, 3, causal) == [0]
    assert runner._run_lengths(h, 3, symmetric) == [4]
    h[0, 1, 4] = 1.0  # one group's run now ends after 2 rows
    assert runner._run_lengths(h, 3, symmetric) == [2]
    h2 = torch.zeros(2, 2, 7, 4)
    h2[1, 0, 5] = 1.0  # the second sample's runs: 1 and 4 rows
    assert runner._run_lengths(h2, 3, symmetric) == [4, 1]


def test_backward_through_patched_blocks_matches_official_blocks(monkeypatch):
    """Training: gradients of a loss through the patched trunks (per-call concatenated weights,
    fused ops with their own backward) against the official blocks (with their attention on
    vk.register_attention, whose backward is tested elsewhere: FlexAttention has none on CPU),
    both in float64 (the attention layers' patch is let through float64, which runs the
    reference backend)."""
    from benchmarks.bench_integrations import sample_latents
    integration = _integration(V)
    attention = importlib.import_module("vft_kernels.integrations.official_attention")
    monkeypatch.setattr(attention, "_ATTN_DTYPES", attention._ATTN_DTYPES + (torch.float64,))
    model = _tiny(V, registers=4).double()
    model.decoder.module_dict["dec_time_emb"].float().register_forward_hook(_cast_time_embedding_hook)
    latents = [x.double() for x in sample_latents(V, [(2, 4, 4)] * 2)]
    quants = [q.double() for q in (torch.rand(1, 2, 4, 6) * 2 - 1, torch.rand(1, 2, 4, 6) * 2 - 1)]
    model.train()

    def grads(blocks):
        model.zero_grad()
        torch.manual_seed(0)  # training mode: nested dropout and null-condition dropout draw keeps
        random.seed(0)
        np.random.seed(0)
        with integration.patched(model, fsq=False, guidance=False, blocks=blocks) as handle:
            enc = model.encode(latents)["enc_registers_out"]
            data = {"quants": [q.clone() for q in quants], "noised_latents": list(latents),
                    "timesteps": torch.full((2,), 0.4, dtype=torch.float64)}
            vel = model.decoder(data)["velocity"]
            g = torch.Generator().manual_seed(5)
            loss = sum((e * torch.randn(e.shape, generator=g, dtype=e.dtype)).sum() for e in enc) + \
                sum((v * torch.randn(v.shape, generator=g, dtype=v.dtype)).sum() for v in vel)
            loss.backward()
            summary = handle.summary()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, summary

    want, _ = grads(False)
    got, summary = grads(True)
    assert "trunk calls so far: 2 on vft blocks" in summary
    assert set(got) == set(want) and len(got) > 20
    for name in want:
        # The official Fp32LayerNorm normalises in float32 even in a float64 model: the two agree
        # to float32 rounding (the vft ops keep float64), not to float64's
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=2e-5, atol=2e-5 * scale, msg=name)


def test_unpatch_twice_copies_and_threads():
    from benchmarks.bench_integrations import sample_latents
    integration = _integration(V)
    model = _tiny(V, registers=4)
    latents = sample_latents(V, [(2, 8, 8)] * 2)
    with torch.no_grad():
        quants = [model.regularizer.indices_to_embedding(t) for t in model.tokenize(latents)]
    ref = _trunk_outputs(model, latents, quants, [1, 3], torch.float32)
    handle = integration.patch(model)
    trunk = model.decoder.module_dict["dec_trunk"]
    assert "forward" in vars(trunk)
    with pytest.raises(ValueError, match="already patched with"):
        integration.patch(model, blocks=False)
    with pytest.raises(TypeError, match="cannot deep-copy an object patched by"):
        copy.deepcopy(model)
    with pytest.raises(TypeError, match="cannot deep-copy"):
        copy.deepcopy(trunk)  # a patched part alone, too
    one = _trunk_outputs(model, latents, quants, [1, 3], torch.float32)
    results, errors = [None] * 4, []

    def work(i):
        try:
            results[i] = _trunk_outputs(model, latents, quants, [1, 3], torch.float32)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in results:
        assert torch.equal(r[0], one[0]) and torch.equal(r[1], one[1])
    assert "ran the official blocks" not in handle.summary()
    handle.unpatch()
    assert "forward" not in vars(trunk) and "_vft_patched_by" not in vars(trunk)
    again = _trunk_outputs(model, latents, quants, [1, 3], torch.float32)
    assert torch.equal(again[0], ref[0]) and torch.equal(again[1], ref[1])  # bit-identical once unpatched
    twin = copy.deepcopy(model)  # unpatched: copies again, and the copy patches on its own
    with integration.patched(twin) as h2:
        assert "blocks: 2 of 2 trunk(s) patched" in h2.summary()
    assert "forward" not in vars(model.decoder.module_dict["dec_trunk"])


def test_weights_cache_follows_weight_changes():
    """The concatenated QKV / gate-up / modulation weights are rebuilt when a weight changes in
    place (version counter) or is replaced (data pointer)."""
    from benchmarks.bench_integrations import sample_latents
    integration = _integration(V)
    model = _tiny(V, registers=4)
    latents = sample_latents(V, [(2, 4, 4)])
    with torch.no_grad():
        quants = [model.regularizer.indices_to_embedding(t) for t in model.tokenize(latents)]
    with integration.patched(model):
        before = _trunk_outputs(model, latents, quants, None, torch.float32)
        blk = model.decoder.module_dict["dec_trunk"].blocks[1]
        with torch.no_grad():
            blk.attn.wk.weight.mul_(1.5)  # in place
            blk.mlp.fc3.weight = torch.nn.Parameter(blk.mlp.fc3.weight * 0.5)  # replaced
            blk.adaLN_modulation[1].bias.add_(0.1)
        after = _trunk_outputs(model, latents, quants, None, torch.float32)
    official = _trunk_outputs(model, latents, quants, None, torch.float32)
    assert not torch.allclose(after[1], before[1])
    torch.testing.assert_close(after[1], official[1], rtol=1e-5, atol=1e-5)


def test_steady_path_reads_nothing_back(monkeypatch):
    """A guided detokenize, after a first call: no tensor is read back to the host (.tolist(),
    .item(), bool(), int()) by vft code, with the run-finding of identical rows off (it reads
    its comparison back, so it runs on the CPU only, where that is not a device sync). Offsets
    and the default keep are cached on the device. (The official code's own reads, e.g. its
    timestep embedder's ``assert torch.all(t <= max)``, are not counted.)"""
    integration = _integration(V)
    model = _tiny(V, registers=4)
    from benchmarks.bench_integrations import sample_latents
    sizes = [(2, 4, 4)] * 2
    latents = sample_latents(V, sizes)
    with torch.no_grad():
        tokens = model.tokenize(latents)
    with integration.patched(model) as handle:
        for m in model.modules():
            f = vars(m).get("forward")
            if hasattr(getattr(f, "__func__", None), "_vft_runner"):
                f.__func__._vft_runner.compress = False
        model.detokenize(tokens, sizes, steps=2)  # first call: plans, caches
        reads = []

        def spy(real, name):
            def read(self, *a):
                caller = sys._getframe(1).f_code.co_filename
                if os.sep + "vft_kernels" + os.sep in caller:
                    reads.append(f"{name} in {os.path.basename(caller)}")
                return real(self, *a)
            return read

        for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, spy(getattr(torch.Tensor, name), name))
        model.detokenize(tokens, sizes, steps=2)
        monkeypatch.undo()
        assert "ran the official blocks" not in handle.summary()
    assert reads == [], f"host reads on the steady path: {reads}"


def test_bf16_mode_runs_the_decoder_in_bf16_where_native():
    """patch(dtype=torch.bfloat16): the decoder trunk runs in bf16 (within the rule against the
    official model run in bf16, both measured against float64); the encoder keeps float32, so
    tokens do not change. Without native bf16: a warning, and float32 everywhere."""
    from benchmarks.bench_integrations import sample_latents
    from vft_kernels.integrations.blocks import _native_bf16_cpu
    integration = _integration(V)
    model = _tiny(V, registers=8)
    latents = sample_latents(V, [(3, 8, 8)] * 2)
    with torch.no_grad():
        quants = [model.regularizer.indices_to_embedding(t) for t in model.tokenize(latents)]
    import vft_kernels as vk
    below = [c for c in ("avx2", "baseline") if c in vk.cpu_capabilities().get("supported", ())]
    for capped in ([None] if not _native_bf16_cpu() else []) + below[:1]:  # without native bf16
        with vk.use_cpu_capability(capped) if capped else contextlib.nullcontext():
            with pytest.warns(RuntimeWarning, match="no native bf16"):
                handle = integration.patch(model, dtype=torch.bfloat16)
        assert "kept the model's dtype" in handle.summary()
        handle.unpatch()
    if not _native_bf16_cpu():
        return
    ref32 = _trunk_outputs(model, latents, quants, [3, 6], torch.float32)
    ref64 = _trunk_outputs(_float64_twin(model), latents, quants, [3, 6], torch.float64)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    model16.decoder.module_dict["dec_time_emb"].float()  # the official embedder runs in float32
    model16.decoder.module_dict["dec_time_emb"].register_forward_hook(
        lambda m, a, out: out.__setitem__("dec_t_emb", out["dec_t_emb"].to(torch.bfloat16)) or out)
    ref16 = _trunk_outputs(model16, latents, quants, [3, 6], torch.bfloat16)
    with integration.patched(model, dtype=torch.bfloat16) as handle:
        summary = handle.summary()
        assert "dec_trunk: 2 x FlexBlockAdaLN on vft ops; in bf16" in summary
        assert "enc_trunk: 2 x FlexBlock on vft ops; in the model's dtype" in summary
        got = _trunk_outputs(model, latents, quants, [3, 6], torch.float32)
    assert got[1].dtype == torch.float32
    assert torch.equal(got[0], _trunk_outputs(model, latents, quants, [3, 6], torch.float32)[0]) or \
        torch.allclose(got[0], ref32[0], rtol=1e-5, atol=1e-5)  # encoder: float32
    assert not torch.allclose(got[1], ref32[1], rtol=1e-5, atol=1e-5), "the decoder did not run in bf16"
    assert_matches_reference("decoder trunk in bf16", got[1].to(torch.bfloat16), ref64[1], ref16[1], torch.bfloat16)


@pytest.mark.parametrize("package,sizes,keep", [(V, [(3, 8, 8)] * 2, [3, 8]), (V, [(2, 4, 6)] * 3, None),
                                                (F, [(8, 8)] * 2, [2, 8])])
def test_guided_steps_pack_both_passes_in_one_call(package, sizes, keep):
    """A guided step runs the conditional and the unconditional pass as one decoder call on
    twice the samples; the trunk splits them into segments by their runs of identical register
    rows (mask tokens past keep; the null condition), so one call mixes compressed and full
    samples. The sampled latents match the official sampler's (two calls per step)."""
    from benchmarks.bench_integrations import sample_latents
    integration = _integration(package)
    model = _tiny(package, registers=8)
    latents = sample_latents(package, sizes)
    with torch.no_grad():
        tokens = model.tokenize(latents)
        want = model.detokenize(tokens, sizes, steps=3, keep=keep)
    calls = []
    hook = model.decoder.register_forward_pre_hook(lambda m, args: calls.append(len(args[0]["eval_dropout_mask"])))
    try:
        with integration.patched(model) as handle, torch.no_grad():
            got = model.detokenize(tokens, sizes, steps=3, keep=keep)
            summary = handle.summary()
    finally:
        hook.remove()
    assert calls == [2 * len(sizes)] * 3, calls  # one call per step, cond + uncond samples
    assert "ran the official blocks" not in summary
    T = sizes[0][0] if package == V else 1
    # per step: each unconditional sample 8 - 1 rows per group; each conditional one 8 - keep - 1
    saved = sum(7 + (max(8 - k - 1, 0) if 8 - k >= 2 else 0) for k in (keep or [8] * len(sizes))) * T * 3
    assert f"({saved} identical register rows computed once)" in summary, summary
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_torch_compile_of_a_patched_decoder_has_no_graph_break_in_vft():
    """torch.compile of a patched model, cold and after an eager call: Dynamo traces the
    patched trunk's blocks into one graph (the vft ops appear in it) and breaks nowhere in vft
    code (the official wrapper's own ``torch.compiler.disable``d modules break where they do
    unpatched); the compiled decoder gives the eager patched decoder's velocities."""
    from benchmarks.bench_integrations import sample_latents
    integration = _integration(V)
    model = _tiny(V, registers=4)
    sizes = [(2, 4, 4)] * 2
    latents = sample_latents(V, sizes)
    with torch.no_grad():
        quants = [model.regularizer.indices_to_embedding(t) for t in model.tokenize(latents)]

    def decode(noised):
        data = {"quants": [q.clone() for q in quants], "noised_latents": list(noised),
                "timesteps": torch.full((len(noised),), 0.5)}
        return model.decoder(data)["velocity"]

    def check(when):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(decode)(latents)
        in_vft = [(b.reason.splitlines()[0], f.filename, f.lineno) for b in explained.break_reasons
                  for f in b.user_stack if os.sep + "vft_kernels" + os.sep in f.filename]
        assert in_vft == [], (when, in_vft)
        code = "\n".join(g.code for g in explained.graphs)
        for op in ("vft.block_norm", "vft.qk_layer_norm", "vft.register_attention", "vft.swiglu"):
            assert op in code, (when, op)

    try:
        with integration.patched(model), torch.no_grad():
            check("cold")
            eager = decode(latents)
            check("after an eager call (weights, plans and probes cached)")
            torch._dynamo.reset()
            compiled = torch.compile(decode, backend="aot_eager")(latents)
        for c, e in zip(compiled, eager):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.tune_blocks
@pytest.mark.parametrize("official_faster", [True, False])
def test_per_shape_choice_keeps_the_faster_blocks(monkeypatch, official_faster):
    """patch(blocks=True) on the CPU: the first calls of a call shape alternate between the vft
    and the official blocks (one untimed call each, then TUNE_CALLS timed ones); later calls of
    that shape run the faster, and print(handle) says which with the times. The clock is faked
    so that the test decides which is faster. blocks="always" never runs the official blocks."""
    from vft_kernels.integrations import blocks
    integration = _integration(V)
    model = _tiny(V, registers=4)
    from benchmarks.bench_integrations import sample_latents
    latents = sample_latents(V, [(2, 4, 4)] * 2)
    with torch.no_grad():
        quants = [model.regularizer.indices_to_embedding(t) for t in model.tokenize(latents)]
        want = model.decode_step(quants, latents, 0.5)
    now = [0.0]
    monkeypatch.setattr(blocks, "_clock", lambda: now[0])
    real_run, real_official = blocks._Trunk.run, None
    slow, fast = 2.0, 1.0

    def vft_run(self, *a):
        now[0] += fast if not official_faster else slow
        return real_run(self, *a)

    monkeypatch.setattr(blocks._Trunk, "run", vft_run)
    with integration.patched(model) as handle, torch.no_grad():
        runner = vars(model.decoder.module_dict["dec_trunk"])["forward"].__func__._vft_runner
        official = runner.official_forward

        def timed_official(d):
            now[0] += slow if not official_faster else fast
            return official(d)

        runner.official_forward = timed_official
        n_trial = 2 * (blocks.TUNE_CALLS + 1)
        for _ in range(n_trial + 3):
            got = model.decode_step(quants, latents, 0.5)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        summary = handle.summary()
    # the decoder trunk: TUNE_CALLS + 1 calls of each path, then 3 of the faster one
    line = next(x for x in summary.splitlines() if "trunk calls so far" in x)
    if official_faster:
        assert f"measured faster at this call shape: 3" in line, line
        assert "official blocks (faster at this shape): 1000.00 ms on vft blocks vs 2000.00 ms" not in summary
        assert "dec_trunk [1, " in summary and "official blocks (faster at this shape): 2000.00 ms on vft blocks " \
            "vs 1000.00 ms official" in summary, summary
    else:
        assert "measured faster" not in line, line
        assert "vft blocks: 1000.00 ms on vft blocks vs 2000.00 ms official" in summary, summary
    with integration.patched(model, blocks="always") as handle, torch.no_grad():
        for _ in range(n_trial):
            model.decode_step(quants, latents, 0.5)
        assert "ran the official blocks" not in handle.summary() and "no per-shape choice" in handle.summary()
    with pytest.raises(ValueError, match="blocks must be True"):
        integration.patch(model, blocks="sometimes")
