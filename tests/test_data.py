"""Synthetic videos, video file I/O (PyAV) and datasets, including bad files."""
import pytest
import torch

from vft.data import (SyntheticVideos, VideoFolder, VideoReadError, from_model_range, read_video, resize_crop,
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
