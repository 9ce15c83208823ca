"""vft.adaptive.search_keep (and the budget modes of choose_keep) on stub models whose quality as a function of the
token count is known exactly (monotone, non-monotone, and frame-causal), and on a real
micro model."""
import itertools
import math
import types

import pytest
import torch

from vft.adaptive import allocate_budget, search_keep
from vft.budget import choose_keep
from vft.config import preset
from vft.metrics import psnr
from vft.model import VideoFlexTok


class Stub:
    """Reconstruction = video + a constant error per latent frame chosen so that frame t's
    PSNR is ``curve[keep_t] - causal * (R - keep_{t-1})`` (temporal factor 1)."""

    def __init__(self, curve, causal=0.0, frames=4):
        self.curve, self.causal = curve, causal
        R = len(curve) - 1
        self.cfg = types.SimpleNamespace(registers=R, latent_frames=frames, chunk_overlap=1,
                                         compressor=types.SimpleNamespace(kind="pixel", temporal_factor=1))
        self.video = None
        self.calls = 0

    chunks = VideoFlexTok.chunks

    def frame_psnr(self, keep_row, t):
        prev = self.cfg.registers if t == 0 else int(keep_row[t - 1])
        return self.curve[int(keep_row[t])] - self.causal * (self.cfg.registers - prev)

    def tokenize(self, video):
        self.video = video
        return torch.zeros(video.shape[0], video.shape[2], self.cfg.registers, dtype=torch.int32)

    def detokenize(self, tokens, keep=None, **kw):
        self.calls += 1
        B, T = tokens.shape[:2]
        keep = torch.as_tensor(keep)
        keep = keep if keep.dim() == 2 else keep.reshape(-1)[:, None].expand(B, T)
        out = torch.empty(B, 3, T, 4, 4, dtype=torch.float64)
        for b in range(B):
            for t in range(T):
                delta = 2 * 10 ** (-self.frame_psnr(keep[b], t) / 20)
                out[b, :, t] = delta
        return out


def _video(B=1, T=4):
    return torch.zeros(B, 3, T, 4, 4, dtype=torch.float64)


def _group_psnr(stub, video, keep_row, frames):
    """PSNR over ``frames`` of the stub's decode with per-frame keep ``keep_row`` [T]."""
    rec = stub.detokenize(stub.tokenize(video[:1]), keep=keep_row[None].clone())[0]
    return psnr(rec[:, frames], video[0][:, frames])


def _assert_smallest_per_group(stub, video, res, groups, target):
    """Every latent frame is in exactly one group with one K; decoding each group at its K
    reaches ``target`` over the group's frames, and at K - 1 (earlier groups at their
    answers) it does not: the K found is the smallest."""
    row = res["keep"][0]
    assert sorted(t for g in groups for t in g) == list(range(len(row)))
    for g in groups:
        k = int(row[g[0]])
        assert all(int(row[t]) == k for t in g), (g, row.tolist())
        assert _group_psnr(stub, video, row, g) >= target - 1e-9, (g, k)
        if k > 1:
            smaller = row.clone()
            smaller[g] = k - 1
            assert _group_psnr(stub, video, smaller, g) < target, (g, k)


MONO = [None, 10.0, 13.0, 15.0, 16.5, 17.5, 18.2, 18.8, 19.3, 19.7, 20.0, 20.2, 20.4, 20.5, 20.6, 20.7, 20.8]


@pytest.mark.parametrize("target", [9.0, 13.0, 15.1, 18.8, 20.75, 20.8])
def test_clip_search_finds_the_smallest_k(target):
    stub = Stub(MONO)
    res = search_keep(stub, _video(2), target=target)
    want = next(k for k in range(1, 17) if MONO[k] >= target)
    assert res["keep"].tolist() == [[want] * 4] * 2
    assert res["quality"].tolist() == pytest.approx([MONO[want]] * 2, abs=1e-9)
    assert res["mean_tokens"].tolist() == [want, want]
    # bisection: about log2(R) + 1 evaluations per clip (+ K - 1 verified, + the final decode)
    assert res["evaluations"] <= 2 * (math.ceil(math.log2(16)) + 3)


def test_non_monotone_curve():
    curve = [None, 10.0, 12.0, 11.0, 11.2, 11.4, 13.0, 14.0, 15.0]
    stub = Stub(curve)
    exact = search_keep(stub, _video(), target=11.5, exact=True)
    assert exact["keep"][0].tolist() == [2] * 4  # the smallest K with quality >= 11.5
    fast = search_keep(stub, _video(), target=11.5)
    k = int(fast["keep"][0, 0])  # bisection's answer is verified: meets the target, K - 1 misses
    assert curve[k] >= 11.5 and curve[k - 1] < 11.5


def test_frame_search_accounts_for_earlier_frames():
    """Frame t's quality drops when frame t - 1 keeps fewer tokens; the per-frame search fixes
    earlier frames first, so every frame meets the target and each K is minimal given them."""
    stub = Stub(MONO, causal=0.3)
    res = search_keep(stub, _video(), target=17.0, granularity="frame")
    row = res["keep"][0]
    for t in range(4):
        assert stub.frame_psnr(row, t) >= 17.0
        smaller = row.clone()
        smaller[t] -= 1
        assert stub.frame_psnr(smaller, t) < 17.0
    assert row.tolist() != [row[0].item()] * 4  # later frames need more than frame 0
    assert res["mean_tokens"][0] < 16
    clip = search_keep(stub, _video(), target=17.0)  # the clip's PSNR (all frames' MSE) meets it
    assert clip["quality"][0] >= 17.0 and len(set(clip["keep"][0].tolist())) == 1


def test_chunk_search_is_constant_per_chunk():
    stub = Stub(MONO, causal=0.3)
    res = search_keep(stub, _video(T=10), target=17.0, granularity="chunk")
    row = res["keep"][0].tolist()
    assert [(s, n) for s, n in stub.chunks(10)] == [(0, 0), (3, 4), (6, 7)]
    assert len(set(row[0:4])) == 1 and len(set(row[4:7])) == 1 and len(set(row[7:10])) == 1
    _assert_smallest_per_group(stub, _video(T=10), res, [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]], 17.0)
    assert row != [row[0]] * 10  # the chunks' frames depend on the previous chunk's K: they differ


@pytest.mark.parametrize("granularity", ["clip", "frame"])
def test_every_group_gets_the_smallest_k_by_decoding(granularity):
    stub = Stub(MONO, causal=0.3)
    res = search_keep(stub, _video(), target=17.0, granularity=granularity)
    groups = [[0, 1, 2, 3]] if granularity == "clip" else [[t] for t in range(4)]
    _assert_smallest_per_group(stub, _video(), res, groups, 17.0)


def test_tradeoff_form_matches_brute_force():
    stub = Stub(MONO)
    for lam in (0.0, 0.25, 0.65, 2.5):  # no ties between neighbouring K
        res = search_keep(stub, _video(), lam=lam)
        want = max(range(1, 17), key=lambda k: (MONO[k] - lam * k, -k))
        assert res["keep"][0].tolist() == [want] * 4, lam


def test_bad_targets_are_clear_errors():
    stub = Stub(MONO)
    with pytest.raises(ValueError, match=r"unreachable for clip 0, latent frames 0..3: all R = 16 tokens give 20.8"):
        search_keep(stub, _video(), target=25.0)
    for bad in (-1.0, float("nan"), float("inf"), "20", True):
        with pytest.raises(ValueError, match="target must be"):
            search_keep(stub, _video(), target=bad)
    with pytest.raises(ValueError, match="exactly one of target"):
        search_keep(stub, _video())
    with pytest.raises(ValueError, match="exactly one of target"):
        search_keep(stub, _video(), target=10.0, lam=0.1)
    with pytest.raises(ValueError, match="granularity must be one of"):
        search_keep(stub, _video(), target=10.0, granularity="scene")
    with pytest.raises(ValueError, match="metric must be one of"):
        search_keep(stub, _video(), target=10.0, metric="lpips")
    with pytest.raises(ValueError, match="SSIM target must be <= 1"):
        search_keep(stub, _video(), target=20.0, metric="ssim")
    with pytest.raises(ValueError, match=r"video must be a float tensor \[B, 3, T, H, W\]"):
        search_keep(stub, torch.zeros(3, 4, 4, 4), target=10.0)


def test_real_model_per_frame_answer_reproduces(token_sensitive):
    """On a (random) micro model: the per-frame keeps decode to the reported quality, and
    every frame meets a target that every frame reaches with all R tokens."""
    torch.manual_seed(0)
    m = token_sensitive(VideoFlexTok(preset("micro")).eval())
    video = torch.rand(1, 3, 4, 16, 16) * 2 - 1
    kw = dict(steps=2, guidance="none")
    tok = m.tokenize(video)
    full = m.detokenize(tok, keep=4, **kw)
    target = min(psnr(full[:, :, t], video[:, :, t]) for t in range(4)) - 0.05
    res = search_keep(m, video, target=target, granularity="frame", **kw)
    rec = m.detokenize(res["tokens"], keep=res["keep"], **kw)
    assert res["quality"][0].item() == pytest.approx(psnr(rec, video), abs=1e-6)
    for t, q in enumerate(res["group_quality"][0]):
        assert q >= target and 1 <= res["keep"][0, t] <= 4


def test_shipped_model_per_frame_search_returns_the_smallest_k():
    """On the shipped tiny model (1-step decoding, a held-out clip): every latent frame's K
    meets the target and K - 1 misses it, both checked by decoding, for every frame."""
    from vft.adaptive import mixed_clips, pixel_frames
    from vft.pretrained import load_pretrained

    model = load_pretrained("tiny")
    kw = dict(steps=1, guidance="none")
    video = mixed_clips(model.cfg, 1)[0][1:2]  # a "slow" held-out clip
    T = model.cfg.latent_frames
    full = model.detokenize(model.tokenize(video), **kw)
    frames = [list(pixel_frames(model.cfg, t)) for t in range(T)]
    target = min(16.0, min(psnr(full[:, :, f], video[:, :, f]) for f in frames) - 0.1)
    res = search_keep(model, video, target=target, granularity="frame", **kw)
    row = res["keep"][0]
    rec = model.detokenize(res["tokens"], keep=res["keep"], **kw)
    for t, f in enumerate(frames):
        assert psnr(rec[:, :, f], video[:, :, f]) >= target, (t, row.tolist())
        if row[t] > 1:  # later frames keep their answers: they do not change frame t's decode (block-causal)
            smaller = res["keep"].clone()
            smaller[0, t] -= 1
            fewer = model.detokenize(res["tokens"], keep=smaller, **kw)
            assert psnr(fewer[:, :, f], video[:, :, f]) < target, (t, row.tolist())
    assert (row > 1).sum() >= 2 and (row < model.cfg.registers).all(), row.tolist()  # the K - 1 checks ran


def _mse_curve(gains):
    """PSNR curve [R] whose MSE starts at 1 and falls by ``gains`` (decreasing: convex MSE)."""
    mse = 1.0 - torch.tensor([0.0] + list(itertools.accumulate(gains)), dtype=torch.float64)
    return -10 * mse.log10()


def test_allocate_budget_matches_brute_force():
    """On convex MSE curves the greedy allocation minimises the clip's MSE exactly (checked
    against every allocation), spends exactly the budget and gives each frame >= 1 token."""
    gen = torch.Generator().manual_seed(3)
    T, R = 3, 5
    for trial in range(6):
        gains = torch.rand(T, R - 1, generator=gen).sort(dim=1, descending=True).values * 0.2
        curves = torch.stack([_mse_curve(g.tolist()) for g in gains])[None]  # [1, T, R]
        mse = 10 ** (-curves[0] / 10)
        for budget in (T, T + 1, 7, 11, T * R, T * R + 4):
            keep = allocate_budget(curves, budget)[0]
            assert int(keep.sum()) == min(budget, T * R) and int(keep.min()) >= 1
            best = min(sum(float(mse[t, k[t] - 1]) for t in range(T))
                       for k in itertools.product(range(1, R + 1), repeat=T) if sum(k) == min(budget, T * R))
            got = sum(float(mse[t, keep[t] - 1]) for t in range(T))
            assert got == pytest.approx(best, abs=1e-12), (trial, budget, keep.tolist())
    with pytest.raises(ValueError, match=r"budget must be an int >= T' = 3"):
        allocate_budget(curves, 2)


class FakeRouter:
    """A router whose predicted curves are given (vft.router.KeepRouter's interface)."""

    sampling = {"steps": 1, "guidance": "none"}

    def __init__(self, curves):
        self.curves = curves

    def predict(self, model, video, tokens=None):
        return self.curves.expand(video.shape[0], *self.curves.shape[1:])

    def keep_for_target(self, model, video, target, tokens=None):
        ok = self.predict(model, video) >= target
        return (ok.float().argmax(-1) + 1).to(torch.int64)


def test_choose_keep_modes():
    stub = Stub(MONO)
    T, R = 4, 16
    res = choose_keep(stub, _video(2), target_psnr=17.0)  # search, a K per frame: every frame meets it
    want = search_keep(Stub(MONO), _video(2), target=17.0, granularity="frame")
    assert res["policy"] == "search" and torch.equal(res["keep"], want["keep"])
    for t in range(T):
        assert stub.frame_psnr(res["keep"][0], t) >= 17.0
    stub.calls = 0
    res = choose_keep(stub, _video(2), budget=22)  # measured curves: R decodes, then the allocation
    assert res["policy"] == "measured" and res["evaluations"] == R == stub.calls
    assert res["keep"].sum(1).tolist() == [22, 22] and res["keep"].shape == (2, T)
    res = choose_keep(stub, _video(), rate=2.5)  # floor(2.5 x 4) = 10 tokens per clip
    assert int(res["keep"].sum()) == 10 and res["mode"] == "rate"
    steep = torch.stack([_mse_curve([0.3, 0.2] + [0.0] * 13), _mse_curve([0.01] * 15)] * 2)[None]  # [1, 4, 16]
    stub.calls = 0
    res = choose_keep(stub, _video(), budget=8, router=FakeRouter(steep.float()))
    assert stub.calls == 0 and res["policy"] == "router"
    assert res["keep"][0].tolist() == [3, 1, 3, 1]  # the steep frames get the tokens, up to their knee
    res = choose_keep(stub, _video(), target_psnr=float(steep[0, 0, 1]), router=FakeRouter(steep.float()))
    assert res["keep"][0].tolist()[0] == 2 and stub.calls == 0


def test_choose_keep_errors():
    stub = Stub(MONO)
    router = FakeRouter(torch.zeros(1, 4, 16))
    cases = [
        (dict(), "exactly one of target_psnr, budget and rate"),
        (dict(target_psnr=17.0, budget=8), "exactly one of target_psnr, budget and rate"),
        (dict(budget=8, rate=2.0), "exactly one of target_psnr, budget and rate"),
        (dict(budget=8, granularity="clip"), "granularity applies to a target_psnr search without a router"),
        (dict(target_psnr=17.0, granularity="clip", router=router), "granularity applies"),
        (dict(budget=8, router=router, steps=25), "a router predicts quality for the decoding setting"),
        (dict(rate=0.5), r"rate \(mean tokens per latent frame\) must be a number in \[1, R = 16\]"),
        (dict(rate=17), r"must be a number in \[1, R = 16\]"),
        (dict(rate=True), "must be a number"),
        (dict(budget=3), r"budget must be an int >= T' = 4 tokens per clip"),
        (dict(budget=8.0), "budget must be an int"),
    ]
    with pytest.raises(ValueError, match=r"choose_keep: video must be a float tensor \[B, 3, T, H, W\]"):
        choose_keep(stub, torch.zeros(3, 4, 4, 4), budget=8)
    for kw, match in cases:
        stub.calls = 0
        with pytest.raises(ValueError, match=match):
            choose_keep(stub, _video(), **kw)
        assert stub.calls == 0, kw  # refused before any decode


def test_mixed_clips_with_real_content_keep_the_held_out_sources_apart():
    from vft.adaptive import REAL_KINDS, KINDS, mixed_clips
    from vft.config import preset
    from vft.data import HELDOUT_PHOTOS, HELDOUT_SEED, HELDOUT_VIDEO, TRAIN_PHOTOS, TRAIN_VIDEOS, photo_video, \
        real_video_clip, to_model_range

    cfg = preset("tiny")
    T, H, W = cfg.frames, cfg.height, cfg.width
    for seed, photos, videos in ((HELDOUT_SEED + 50_000, HELDOUT_PHOTOS, (HELDOUT_VIDEO,)), (5000, TRAIN_PHOTOS,
                                                                                             TRAIN_VIDEOS)):
        clips, kinds = mixed_clips(cfg, 1, seed=seed, real=True)
        assert kinds == list(KINDS + REAL_KINDS) and clips.shape == (7, 3, T, H, W)
        assert torch.equal(clips[5], to_model_range(photo_video(seed + 4, T, H, W, photos)).contiguous())
        assert torch.equal(clips[6], to_model_range(real_video_clip(seed + 5, T, H, W, videos)).contiguous())
    assert len(mixed_clips(cfg, 1)[1]) == len(KINDS)  # without real: the synthetic kinds only
