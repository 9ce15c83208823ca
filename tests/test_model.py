"""The VideoFlexTok model layer: shapes, determinism, gradients, nested dropout, chunking,
bad inputs, backends and preset sizes. Uses the 'micro' preset (seconds on a CPU)."""
import pytest
import torch

import vft_kernels as vk
from vft.compressor import PixelCompressor
from vft.config import CompressorConfig, preset, tiny_train_config
from vft.model import VideoFlexTok
from vft.train import draw


def _video(B=2, T=4, H=16, W=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((B, 3, T, H, W), generator=g) * 2 - 1


def _model(mode="mask_token", **over):
    cfg = preset("micro").replace(dropout_mode=mode, **over)
    torch.manual_seed(1)
    m = VideoFlexTok(cfg)
    # Leave adaLN-zero's identity start: with zero gates/head nothing would depend on the
    # tokens and most gradients would be zero, so these tests could not fail.
    with torch.no_grad():
        for name, p in m.decoder.named_parameters():
            if "modulation" in name or name.startswith("head"):
                p.normal_(0, 0.05)
        m.encoder.to_fsq.weight.normal_(0, 0.05)  # zero-initialised under linear_path
    return m.eval()


LINEAR = dict(prediction="x", linear_path=True)


def test_pixel_compressor_exact_inverse_and_shape():
    c = PixelCompressor(CompressorConfig(kind="pixel", temporal_factor=2, spatial_factor=4))
    v = _video(2, 6, 8, 12)
    z = c.encode(v)
    assert z.shape == (2, 96, 3, 2, 3)
    assert torch.equal(c.decode(z), v)
    with pytest.raises(ValueError, match="multiple of 2"):
        c.encode(_video(1, 5, 8, 8))


def test_shapes_dtypes_and_token_range():
    m = _model()
    cfg = m.cfg
    v = _video()
    lat = m.compressor.encode(v)
    codes, idx = m.encoder(lat)
    T = cfg.latent_frames
    assert codes.shape == (2, T, cfg.registers, 4) and codes.dtype == torch.float32
    assert idx.shape == (2, T, cfg.registers) and idx.dtype == torch.int32
    assert codes.abs().max() <= 1
    tokens = m.tokenize(v)
    assert torch.equal(tokens, idx)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < cfg.codebook_size
    # the codes are exactly what the FSQ op decodes from the indices
    assert torch.equal(vk.fsq_indices_to_codes(idx, cfg.fsq_levels), codes)
    keep = torch.tensor([1, 4])
    vel = m.decoder(lat, torch.full((2, T), 0.5), codes, keep)
    assert vel.shape == lat.shape and vel.dtype == torch.float32 and torch.isfinite(vel).all()
    out = m.detokenize(tokens, keep=2, steps=3)
    assert out.shape == v.shape and out.dtype == torch.float32
    assert out.abs().max() <= 1


def test_same_seed_same_output():
    m = _model()
    tokens = m.tokenize(_video())
    a = m.detokenize(tokens, keep=3, steps=3, seed=5)
    b = m.detokenize(tokens, keep=3, steps=3, seed=5)
    c = m.detokenize(tokens, keep=3, steps=3, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(m.tokenize(_video()), tokens)


def test_fsq_input_norm_batch_stats_in_training_running_stats_in_tokenize():
    m = _model()
    norm = m.encoder.fsq_norm
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2)
    v = _video(B=4)
    m.train()  # tokenize ignores the module mode: running statistics, nothing updated
    stats = norm.running_mean.clone(), norm.running_var.clone()
    tokens = m.tokenize(v)
    assert torch.equal(tokens[1:2], m.tokenize(v[1:2]))  # independent of the batch it is in
    assert torch.equal(norm.running_mean, stats[0]) and torch.equal(norm.running_var, stats[1])
    lat = m.compressor.encode(v)
    z = m.encoder.pre_quant(lat, batch_stats=True).reshape(-1, m.cfg.fsq_dim)  # training: batch statistics
    torch.testing.assert_close(z.mean(0), torch.zeros(m.cfg.fsq_dim), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(m.cfg.fsq_dim), atol=1e-3, rtol=0)
    assert not torch.equal(norm.running_mean, stats[0])  # ... and updates the running ones
    raw = m.encoder.raw_z(lat)
    expect = (raw - norm.running_mean) / (norm.running_var + norm.eps).sqrt()
    torch.testing.assert_close(m.encoder.pre_quant(lat), expect)


@pytest.mark.parametrize("solver,guidance", [("euler", "none"), ("euler", "cfg"), ("heun", "apg")])
def test_solvers_and_guidance_run(solver, guidance):
    m = _model()
    tokens = m.tokenize(_video(1))
    out = m.detokenize(tokens, steps=2, solver=solver, guidance=guidance, scale=2.0, apg_momentum=-0.5)
    assert torch.isfinite(out).all()
    ref = m.detokenize(tokens, steps=2, solver=solver, guidance="none")
    assert (guidance == "none") == torch.equal(out, ref)


@pytest.mark.parametrize("linear", [False, True], ids=["", "linear_path"])
@pytest.mark.parametrize("mode", ["mask_token", "drop"])
def test_gradients_reach_every_parameter(mode, linear):
    m = _model(mode, **(LINEAR if linear else {})).train()
    cfg = m.cfg
    inputs = draw(cfg, tiny_train_config(null_prob=0.5, prefix_prob=0.5), 4, torch.Generator().manual_seed(3))
    inputs["keep"] = torch.tensor([1, 2, 4, 3])
    inputs["null"] = torch.tensor([True, False, False, False])
    loss = m(_video(4), **inputs)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("linear", [False, True], ids=["", "linear_path"])
@pytest.mark.parametrize("mode", ["mask_token", "drop"])
def test_decoder_ignores_dropped_tokens(mode, linear):
    m = _model(mode, **(LINEAR if linear else {}))
    lat = m.compressor.encode(_video())
    codes, _ = m.encoder(lat)
    t = torch.full((2, lat.shape[2]), 0.7)
    keep = torch.tensor([1, 3])
    other = codes.clone()
    other[0, :, 1:] = -codes[0, :, 1:]
    other[1, :, 3:] = -codes[1, :, 3:] + 0.25
    a = m.decoder(lat, t, codes, keep)
    b = m.decoder(lat, t, other, keep)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # ...while the kept tokens do matter
    c = m.decoder(lat, t, -codes, keep)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("linear", [False, True], ids=["", "linear_path"])
def test_drop_mode_keep_equals_truncation(linear):
    """With `drop`, a decoder given keep=K equals one given only the first K tokens."""
    m = _model("drop", **(LINEAR if linear else {}))
    lat = m.compressor.encode(_video())
    codes, tokens = m.encoder(lat)
    t = torch.full((2, lat.shape[2]), 0.4)
    R = m.cfg.registers
    for K in (1, 2, R):
        full = m.decoder(lat, t, codes, torch.full((2,), K))
        short = m.decoder(lat, t, codes[:, :, :K].contiguous(), torch.full((2,), K))
        torch.testing.assert_close(full, short, rtol=1e-5, atol=1e-5)
    # the public API: detokenize(tokens, keep=K) == detokenize(tokens[..., :K])
    a = m.detokenize(tokens, keep=2, steps=2)
    b = m.detokenize(tokens[:, :, :2], steps=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mask_token_mode_uses_mask_token_for_dropped():
    m = _model("mask_token")
    lat = m.compressor.encode(_video(1))
    codes, _ = m.encoder(lat)
    t = torch.full((1, lat.shape[2]), 0.5)
    a = m.decoder(lat, t, codes, torch.tensor([2]))
    delta = torch.randn_like(m.decoder.mask_token)  # not constant: LayerNorm removes a constant shift
    with torch.no_grad():
        m.decoder.mask_token.add_(delta)
    b = m.decoder(lat, t, codes, torch.tensor([2]))
    c = m.decoder(lat, t, codes, torch.tensor([4]))  # nothing dropped: mask token unused
    with torch.no_grad():
        m.decoder.mask_token.sub_(delta)
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(c, m.decoder(lat, t, codes, torch.tensor([4])), rtol=0, atol=0)


def test_linear_path_needs_x_prediction():
    with pytest.raises(ValueError, match="linear_path needs prediction 'x'"):
        preset("micro").replace(linear_path=True)


def test_linear_path_starts_as_a_linear_autoencoder():
    """A fresh linear_path model: the transformers' parts start at zero (zero to_fsq and
    adaLN-zero head), so the FSQ input is the linear code of the frame and the clean estimate
    at t = 1 is the linear decoding of the kept codes, the rest read from linear_mask."""
    torch.manual_seed(0)
    m = VideoFlexTok(preset("micro").replace(**LINEAR)).eval()
    with torch.no_grad():
        m.decoder.linear_mask.normal_()
    cfg, lat = m.cfg, m.compressor.encode(_video())
    B, C, T, H, W = lat.shape
    frames = lat.transpose(1, 2).reshape(B, T, -1)
    z = m.encoder.linear_in(frames).reshape(B, T, cfg.registers, cfg.fsq_dim)
    torch.testing.assert_close(m.encoder.raw_z(lat), z)
    codes, _ = m.encoder(lat)
    noise = torch.randn_like(lat)
    keep = torch.tensor([1, 3])
    x0_hat = noise - m.decoder(noise, torch.ones(B, T), codes, keep)
    R = cfg.registers
    expect = codes.clone()
    for b in range(B):
        expect[b, :, int(keep[b]):] = m.decoder.linear_mask[int(keep[b]):]
    lin = m.decoder.linear_out(expect.reshape(B, T, R * cfg.fsq_dim))
    torch.testing.assert_close(x0_hat, lin.reshape(B, T, C, H, W).transpose(1, 2), rtol=1e-5, atol=1e-5)
    # the null condition reads linear_mask everywhere, as keep = 0 does
    null = m.decoder.linear_x0(codes, keep, torch.tensor([True, False]))
    torch.testing.assert_close(null[0], m.decoder.linear_x0(codes, torch.tensor([0, 0]))[0])
    torch.testing.assert_close(null[1], lin[1])


def test_linear_loss_is_the_linear_paths_clean_error():
    """forward(linear_loss=w) = flow loss + w * MSE of the linear path's clean estimate over
    the non-prefix frames of the samples with codes; flow_loss in the stats excludes it."""
    m = _model(**LINEAR).train()
    cfg = m.cfg
    inputs = draw(cfg, tiny_train_config(), 4, torch.Generator().manual_seed(5))
    inputs["prefix_len"] = torch.tensor([0, 1, 0, 2])
    inputs["null"] = torch.tensor([False, False, True, False])
    video = _video(4)
    torch.manual_seed(0)
    base = m(video, **inputs, linear_loss=0.0)
    torch.manual_seed(0)
    total, stats = m(video, **inputs, linear_loss=2.5, return_stats=True)
    torch.testing.assert_close(stats["flow_loss"], base.detach())
    x0 = m.compressor.encode(video)
    codes, _ = vk.fsq_quantize(m.encoder.pre_quant(x0, batch_stats=True), cfg.fsq_levels)
    lin = m.decoder.linear_x0(codes, inputs["keep"])  # [B, T, C H W]
    B, C, T, H, W = x0.shape
    err = (lin - x0.transpose(1, 2).reshape(B, T, -1)).square().mean(-1)
    rows = [err[b, int(inputs["prefix_len"][b]):] for b in (0, 1, 3)]
    want = base + 2.5 * torch.cat(rows).mean()
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)


def test_encoder_is_causal_in_time():
    """Encoder outputs of a latent frame never depend on later frames (block-causal attention)."""
    m = _model()
    z = []
    m.encoder.to_fsq.register_forward_hook(lambda mod, inp, out: z.append(out.detach()))
    v = _video(1, 4)
    w = v.clone()
    w[:, :, 1:] = -w[:, :, 1:]  # change latent frames 1.. (temporal factor 1)
    m.tokenize(v)
    m.tokenize(w)
    a, b = z
    assert torch.equal(a[:, 0], b[:, 0])
    assert (a[:, 1] - b[:, 1]).abs().max() > 1e-3


def test_chunked_processing_of_long_video():
    m = _model()
    Tc = m.cfg.latent_frames  # 4 latent frames (= 4 frames) per chunk, overlap 1
    v = _video(1, 10)
    tokens = m.tokenize(v)
    assert tokens.shape == (1, 10, m.cfg.registers)
    assert m.chunks(10) == [(0, 0), (3, 4), (6, 7)]
    # the first chunk's tokens are those of the first chunk alone
    assert torch.equal(tokens[:, :Tc], m.tokenize(v[:, :, :4]))
    # later chunks see the overlap as context: frame 4's tokens come from chunk [3, 7)
    lat = m.compressor.encode(v)
    assert torch.equal(tokens[:, 4:7], m.encoder(lat[:, :, 3:7])[1][:, 1:])
    out = m.detokenize(tokens, keep=4, steps=2)
    assert out.shape == v.shape and torch.isfinite(out).all()
    # continuation: each chunk's prefix is the previous chunk's output, so the first
    # chunk alone decodes to the same frames
    head = m.detokenize(tokens[:, :Tc], keep=4, steps=2)
    torch.testing.assert_close(out[:, :, :4], head, rtol=0, atol=0)


@pytest.mark.parametrize("linear", [False, True], ids=["", "linear_path"])
def test_per_frame_keep(linear):
    """keep [B, T'] (mask_token mode): equal rows give keep [B]'s output; a frame's velocity
    depends only on the keeps of itself and earlier frames (block-causal decoder); long
    videos slice it per chunk."""
    m = _model("mask_token", **(LINEAR if linear else {}))
    lat = m.compressor.encode(_video())
    codes, tokens = m.encoder(lat)
    T = lat.shape[2]
    t = torch.full((2, T), 0.6)
    same = m.decoder(lat, t, codes, torch.tensor([2, 3]))
    torch.testing.assert_close(m.decoder(lat, t, codes, torch.tensor([[2] * T, [3] * T])), same, rtol=0, atol=0)
    a = m.decoder(lat, t, codes, torch.tensor([[1, 2, 3, 4], [4, 4, 1, 2]]))
    b = m.decoder(lat, t, codes, torch.tensor([[1, 2, 1, 1], [4, 4, 4, 4]]))
    torch.testing.assert_close(a[0, :, :2], b[0, :, :2], rtol=0, atol=0)  # frames 0-1 share keeps
    torch.testing.assert_close(a[1, :, :2], b[1, :, :2], rtol=0, atol=0)
    assert (a[0, :, 2] - b[0, :, 2]).abs().max() > 1e-4 and (a[1, :, 2] - b[1, :, 2]).abs().max() > 1e-4
    # through detokenize, also across chunks of a long video
    v = _video(1, 10)
    tok = m.tokenize(v)
    per_frame = torch.tensor([[1, 2, 3, 4, 4, 3, 2, 1, 2, 3]])
    out = m.detokenize(tok, keep=per_frame, steps=2)
    assert out.shape == v.shape and torch.isfinite(out).all()
    torch.testing.assert_close(m.detokenize(tok, keep=torch.full((1, 10), 3), steps=2),
                               m.detokenize(tok, keep=3, steps=2), rtol=0, atol=0)
    head = m.detokenize(tok[:, :4], keep=per_frame[:, :4], steps=2)  # the first chunk alone
    torch.testing.assert_close(out[:, :, :4], head, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"keep must be an int tensor \[B\] or \[B, T'\] = \(1, 10\)"):
        m.detokenize(tok, keep=torch.ones(1, 9, dtype=torch.long), steps=2)


def test_per_frame_keep_in_drop_mode():
    """A ``drop`` model takes a per-frame keep [B, T'] as the attention kernels' per-block
    keep: equal values give the per-sample result, frames before the first differing keep
    are unchanged (block-causal decoder), later ones change, and the CPU kernels agree with
    the reference backend (docs/spec.md §4 bound, velocity of a whole decoder)."""
    m = _model("drop")
    lat = m.compressor.encode(_video())
    codes, _ = m.encoder(lat)
    t = torch.full((2, lat.shape[2]), 0.6)
    torch.testing.assert_close(m.decoder(lat, t, codes, torch.tensor([[2] * 4, [3] * 4])),
                               m.decoder(lat, t, codes, torch.tensor([2, 3])), rtol=0, atol=0)
    keep = torch.tensor([[1, 2, 3, 4], [4, 4, 1, 2]])
    a = m.decoder(lat, t, codes, keep)
    b = m.decoder(lat, t, codes, torch.tensor([[1, 2, 1, 1], [4, 4, 4, 4]]))
    for i in range(2):
        torch.testing.assert_close(a[i, :, :2], b[i, :, :2], rtol=0, atol=0)
        assert (a[i, :, 2] - b[i, :, 2]).abs().max() > 1e-4
    with vk.use_backend("reference"):
        want = m.decoder(lat, t, codes, keep)
    with vk.use_backend("cpu"):
        got = m.decoder(lat, t, codes, keep)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    tok = m.tokenize(_video(1))
    out = m.detokenize(tok, keep=torch.tensor([[1, 4, 2, 3]]), steps=2)
    assert torch.isfinite(out).all()


def test_bad_inputs_are_clear_errors():
    m = _model()
    R, n = m.cfg.registers, m.cfg.codebook_size
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels.*got 4"):
        m.tokenize(torch.zeros(1, 4, 4, 16, 16))
    with pytest.raises(ValueError, match="16x16"):
        m.tokenize(torch.zeros(1, 3, 4, 32, 16))
    with pytest.raises(ValueError, match="float"):
        m.tokenize(torch.zeros(1, 3, 4, 16, 16, dtype=torch.uint8))
    tokens = m.tokenize(_video(1))
    with pytest.raises(ValueError, match=f"K <= R = {R}"):
        m.detokenize(torch.zeros(1, 2, R + 1, dtype=torch.int32), steps=1)
    with pytest.raises(ValueError, match="shape"):
        m.detokenize(torch.zeros(1, 2, dtype=torch.int32), steps=1)
    with pytest.raises(ValueError, match=f"\\[0, {n}\\).*got {n}"):
        m.detokenize(torch.full((1, 2, R), n, dtype=torch.int32), steps=1)
    with pytest.raises(ValueError, match="got -3"):
        m.detokenize(torch.full((1, 2, R), -3, dtype=torch.int32), steps=1)
    with pytest.raises(ValueError, match="int tensor"):
        m.detokenize(tokens.float(), steps=1)
    with pytest.raises(ValueError, match=f"keep must be in \\[0, R={R}\\], got {R + 1}"):
        m.detokenize(tokens, keep=R + 1, steps=1)
    with pytest.raises(ValueError, match="got -1"):
        m.detokenize(tokens, keep=-1, steps=1)
    with pytest.raises(ValueError, match="steps"):
        m.detokenize(tokens, steps=0)
    with pytest.raises(ValueError, match="guidance"):
        m.detokenize(tokens, steps=1, guidance="bogus")


def test_backends_reference_and_cpu_agree():
    table = vk.available_backends()
    missing = [op for op in ("fsq_forward", "fsq_decode", "attention_forward", "flow_step")
               if "cpu" not in table[op]["cpu"]]
    if missing:
        pytest.skip(f"cpu backend unavailable for {missing} (vft_kernels._C not built with those kernels)")
    m = _model()
    v = _video()
    with vk.use_backend("reference"):
        tok_ref = m.tokenize(v)
        out_ref = m.detokenize(tok_ref, keep=3, steps=3)
    with vk.use_backend("cpu"):
        tok_cpu = m.tokenize(v)
        out_cpu = m.detokenize(tok_ref, keep=3, steps=3)
    # attention round-off may move an encoder output across an FSQ rounding boundary
    assert (tok_ref != tok_cpu).float().mean() <= 0.02
    torch.testing.assert_close(out_cpu, out_ref, rtol=0, atol=1e-4)


def test_preset_parameter_counts_on_meta():
    counts = {}
    for name in ("videoflextok_k600", "videoflextok_d18_d28"):
        with torch.device("meta"):
            counts[name] = VideoFlexTok(preset(name)).parameter_counts()
    # paper: ~570M (K600) and ~1.3B (256px), adaLN excluded
    assert 0.55e9 < counts["videoflextok_k600"]["total_excluding_adaln"] < 0.60e9
    assert 1.25e9 < counts["videoflextok_d18_d28"]["total_excluding_adaln"] < 1.45e9
    assert counts["videoflextok_k600"]["encoder"] == counts["videoflextok_d18_d28"]["encoder"]


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sampler_with_exact_velocity_recovers_data(solver):
    """With the exact velocity of the straight path from x0 to the noise, v = noise - x0,
    the sampler lands on x0 (checks the time grid, the sign convention and the prefix)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((2, 3, 5, 4, 4), generator=g)
    noise = torch.randn((2, 3, 5, 4, 4), generator=g)
    out = vk.flow_sample(lambda x, t: noise - x0, noise, steps=4, solver=solver, shift=2.0,
                 prefix=x0[:, :, :2], prefix_len=2)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
