"""VAECompressor and VideoFlexTok.attach_vae with a small stand-in VAE: a micro-sized model
in a ``vae`` latent space (causal first frame, T -> 1 + (T - 1) / tf latent frames).

Checked: the latent / video shapes and the latent scale, that the VAE is really what
encodes and decodes, that it stays frozen (no gradients, eval mode, not trained, not in
the checkpoint) through a training step, tokenize / detokenize shapes (one chunk and a
chunked long video), and clear errors for a missing VAE, a VAE returning the wrong shape
or no tensor, and a VAE given to a pixel-space model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vft.config import preset
from vft.model import VideoFlexTok

TF, SF, CHANNELS, SCALE = 2, 4, 4, 0.5


class StandInVAE(nn.Module):
    """Keeps frames 0, tf, 2 tf, ... (causal first frame), averages sf x sf pixels, 1x1x1
    convolutions in and out. Records the mode and grad state it was called in."""

    def __init__(self, channels=CHANNELS, tf=TF, sf=SF):
        super().__init__()
        self.tf, self.sf = tf, sf
        self.enc = nn.Conv3d(3, channels, 1)
        self.dec = nn.Conv3d(channels, 3, 1)
        self.calls = []

    def encode(self, video):
        self.calls.append(("encode", self.training, torch.is_grad_enabled()))
        x = F.avg_pool3d(video[:, :, ::self.tf], (1, self.sf, self.sf))
        return self.enc(x)

    def decode(self, z):
        self.calls.append(("decode", self.training, torch.is_grad_enabled()))
        x = self.dec(z).repeat_interleave(self.tf, dim=2)[:, :, :1 + (z.shape[2] - 1) * self.tf]
        return torch.tanh(x.repeat_interleave(self.sf, dim=3).repeat_interleave(self.sf, dim=4))


def _cfg():
    """micro, but 5 frames of 16x16 through a 2x4x4 VAE with 4 channels: 3 latent frames of
    4x4 (4 patches of 2x2)."""
    return preset("micro").replace(frames=5, compressor=dict(kind="vae", temporal_factor=TF, spatial_factor=SF,
                                                             latent_channels=CHANNELS, scale=SCALE))


def _model(vae=None):
    torch.manual_seed(1)
    m = VideoFlexTok(_cfg())
    with torch.no_grad():  # leave adaLN-zero's identity start so the decoder depends on its inputs
        for name, p in m.decoder.named_parameters():
            if "modulation" in name or name.startswith("head"):
                p.normal_(0, 0.05)
    if vae is not None:
        m.attach_vae(vae)
    return m


def _video(B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((B, 3, T, 16, 16), generator=g) * 2 - 1


def test_config_and_shapes():
    cfg = _cfg()
    assert (cfg.latent_frames, cfg.latent_hw, cfg.patches, cfg.compressor.latent_channels) == (3, (4, 4), 4, 4)
    vae = StandInVAE()
    model = _model(vae)
    comp = model.compressor
    assert comp.latent_shape(5, 16, 16) == (CHANNELS, 3, 4, 4) and comp.latent_shape(9, 8, 24) == (CHANNELS, 5, 2, 6)
    assert comp.frames_for(3) == 5 and comp.frames_for(1) == 1
    video = _video()
    z = comp.encode(video)
    assert z.shape == (2, CHANNELS, 3, 4, 4) and not z.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(z, vae.encode(video) * SCALE, rtol=0, atol=0)  # scaled after encoding
        rec = comp.decode(z)
        assert rec.shape == video.shape
        torch.testing.assert_close(rec, vae.decode(z / SCALE), rtol=0, atol=0)  # unscaled before decoding
    for frames in (4, 6, 0):
        with pytest.raises(ValueError, match=r"needs 1 \+ 2k frames"):
            comp.encode(_video(T=frames) if frames else torch.zeros(1, 3, 0, 16, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        comp.encode(torch.zeros(1, 3, 5, 16, 18))


def test_vae_stays_frozen_through_a_training_step():
    vae = StandInVAE()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    model = _model(vae)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    # Outside the module tree: not trained, not saved, not switched to train mode.
    ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in ids for p in vae.parameters())
    assert not any(k.startswith("compressor.") for k in model.state_dict())
    model.train()
    assert not vae.training
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    B, cfg = 2, model.cfg
    g = torch.Generator().manual_seed(3)
    noise = torch.randn((B, CHANNELS, cfg.latent_frames) + cfg.latent_hw, generator=g)
    loss = model(_video(B), t=torch.tensor([0.3, 0.8]), prefix_len=torch.tensor([0, 1]), noise=noise,
                 keep=torch.tensor([4, 2]), null=torch.tensor([False, True]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in vae.parameters())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(bool(gr.abs().sum() > 0) for gr in grads)
    assert any(bool(p.grad.abs().sum() > 0) for p in model.encoder.parameters() if p.grad is not None), \
        "no gradient reached the encoder through the VAE latents"
    opt.step()
    for k, v in vae.state_dict().items():
        assert torch.equal(v, before[k]), f"VAE weight {k} changed"
    assert vae.calls == [("encode", False, False)]


def test_tokenize_detokenize_round_trip_shapes():
    vae = StandInVAE()
    model = _model(vae).eval()
    video = _video()
    tokens = model.tokenize(video)
    assert tokens.shape == (2, 3, 4) and tokens.dtype == torch.int32
    assert int(tokens.min()) >= 0 and int(tokens.max()) < model.cfg.codebook_size
    with torch.no_grad():
        want = model.encode_latents(vae.encode(video) * SCALE)[1]
    assert torch.equal(tokens, want), "tokenize did not go through the VAE and its scale"
    kw = dict(steps=2, guidance="cfg", scale=2.0)
    out = model.detokenize(tokens, keep=2, **kw)
    assert out.shape == video.shape and out.dtype == torch.float32
    assert float(out.abs().max()) <= 1
    lat = model.detokenize_latents(tokens, keep=2, **kw)
    assert lat.shape == (2, CHANNELS, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(out, vae.decode(lat / SCALE).clamp(-1, 1), rtol=0, atol=0)
    # Longer than one chunk: 9 frames -> 5 latent frames in overlapping 3-frame chunks -> 9 frames.
    long = _video(1, 9, seed=4)
    tokens = model.tokenize(long)
    assert tokens.shape == (1, 5, 4)
    assert model.detokenize(tokens[:, :, :1], steps=1, guidance="none").shape == long.shape
    assert all(not training and not grad for _, training, grad in vae.calls)


def test_missing_vae_is_a_clear_error():
    model = _model().eval()  # a vae-latent config without a VAE
    video = _video()
    with pytest.raises(RuntimeError, match=r"no VAE was attached.*attach_vae"):
        model.tokenize(video)
    with pytest.raises(RuntimeError, match="no VAE was attached"):
        model.detokenize(torch.zeros(1, 3, 4, dtype=torch.int32), steps=1, guidance="none")
    model.train()
    noise = torch.randn(2, CHANNELS, 3, 4, 4)
    with pytest.raises(RuntimeError, match="no VAE was attached"):
        model(video, t=torch.rand(2), prefix_len=torch.zeros(2, dtype=torch.long), noise=noise,
              keep=torch.tensor([4, 4]), null=torch.zeros(2, dtype=torch.bool))
    model.attach_vae(StandInVAE())  # attaching later fixes it
    assert model.eval().tokenize(video).shape == (2, 3, 4)


class _WrongChannels(StandInVAE):
    def encode(self, video):
        return super().encode(video)[:, :2]


class _NonCausalDecode(StandInVAE):
    def decode(self, z):  # tf frames per latent frame (no causal first frame): 6 instead of 5
        return super().decode(z).repeat_interleave(2, dim=2)[:, :, :z.shape[2] * self.tf]


class _Distribution(StandInVAE):
    def encode(self, video):
        return {"latent_dist": super().encode(video)}


def test_wrong_vae_outputs_are_clear_errors():
    video = _video()
    with pytest.raises(ValueError, match=r"VAE encode returned \(2, 2, 3, 4, 4\), expected \(2, 4, 3, 4, 4\)"):
        _model(_WrongChannels()).tokenize(video)
    with pytest.raises(TypeError, match="VAE encode must return a tensor.*got dict.*adapter"):
        _model(_Distribution()).tokenize(video)
    model = _model(_NonCausalDecode()).eval()
    tokens = model.tokenize(video)
    with pytest.raises(ValueError, match=r"VAE decode returned \(2, 3, 6, 16, 16\), expected \(2, 3, 5, 16, 16\)"):
        model.detokenize(tokens, steps=1, guidance="none")
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, T', H', W'\], got \(2, 3, 3, 4, 4\)"):
        model.compressor.decode(torch.zeros(2, 3, 3, 4, 4))


def test_pixel_model_refuses_a_vae():
    model = VideoFlexTok(preset("micro"))
    with pytest.raises(ValueError, match="pixel space.*takes no VAE, got StandInVAE"):
        model.attach_vae(StandInVAE())
    with pytest.raises(ValueError, match="takes no VAE"):
        VideoFlexTok(preset("micro"), StandInVAE())
