"""Configuration dataclasses and presets of the VideoFlexTok model layer.

A :class:`ModelConfig` fixes everything that determines the weights (so a checkpoint
records it in ``config.json`` and refuses to load into a different one); a
:class:`TrainConfig` holds the optimisation settings. Presets:

* ``micro``: a 2-layer toy for tests and smoke runs.
* ``tiny``: pixel space (space-time-to-depth 2x2x2), 8 frames of 32x32 RGB, width 128,
  4 + 4 layers, 16 registers per latent frame, FSQ (8,5,5,5), x-prediction with a linear
  path (see ``ModelConfig.linear_path``). Trains on a 2-core CPU.
* ``videoflextok_k600``: 17-frame 128x128 chunks through a frozen 4x8x8 16-channel video
  VAE, 2x2 patches, 256 registers per latent frame, FSQ (8,8,8,5,5,5), 18-layer encoder
  and 18-layer decoder at width 1152.
* ``videoflextok_d18_d28``: as above at 256x256 with an 18-layer encoder at width 1152
  and a 28-layer decoder at width 1792.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

DROPOUT_MODES = ("mask_token", "drop")
KEEP_VALUES = ("pow2", "uniform")  # the keep counts drawn from: {1, 2, 4, ..., R} or 1..R
# "<values>": one keep per sample (all its latent frames); "<values>_frame": one per latent
# frame, drawn independently; "<values>_mixed": per frame for a share keep_frame_prob of the
# samples, per sample for the rest (vft.train.frame_keeps).
KEEP_SAMPLING = KEEP_VALUES + tuple(f"{v}_{m}" for m in ("frame", "mixed") for v in KEEP_VALUES)
FSQ_NORMS = ("none", "batch")
PREDICTIONS = ("x", "v")
COMPRESSORS = ("pixel", "vae")


@dataclass
class CompressorConfig:
    """The latent space the tokenizer works in.

    kind "pixel": lossless space-time-to-depth of the RGB video by (temporal_factor,
    spatial_factor, spatial_factor); latent channels = 3 * tf * sf * sf; frames must be a
    multiple of tf. kind "vae": a frozen video VAE (plugged in at run time) with
    ``latent_channels`` channels and a causal first frame: T frames -> 1 + (T - 1) / tf
    latent frames."""

    kind: str = "pixel"
    temporal_factor: int = 2
    spatial_factor: int = 4
    latent_channels: int = 0  # derived for "pixel"
    scale: float = 1.0  # latents are multiplied by this after encoding (VAE normalisation)

    def __post_init__(self):
        if self.kind not in COMPRESSORS:
            raise ValueError(f"compressor kind must be one of {COMPRESSORS}, got {self.kind!r}")
        if self.kind == "pixel":
            self.latent_channels = 3 * self.temporal_factor * self.spatial_factor ** 2
        if self.latent_channels < 1:
            raise ValueError(f"compressor latent_channels must be >= 1, got {self.latent_channels}")

    def latent_frames(self, frames: int) -> int:
        if self.kind == "vae":
            return 1 + (frames - 1) // self.temporal_factor
        return frames // self.temporal_factor


@dataclass
class TransformerConfig:
    width: int
    depth: int
    head_dim: int = 64
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = ratio * width (2/3 of a 4x GELU MLP), rounded up to 64

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return 64 * math.ceil(self.mlp_ratio * self.width / 64)

    def check(self, name: str):
        if self.width % self.head_dim:
            raise ValueError(f"{name}: width {self.width} must be a multiple of head_dim {self.head_dim}")
        if self.depth < 1:
            raise ValueError(f"{name}: depth must be >= 1, got {self.depth}")


@dataclass
class ModelConfig:
    name: str
    frames: int  # frames per chunk
    height: int
    width: int
    compressor: CompressorConfig
    encoder: TransformerConfig
    decoder: TransformerConfig
    patch_size: int = 2
    registers: int = 256  # R registers (tokens) per latent frame
    fsq_levels: tuple = (8, 8, 8, 5, 5, 5)
    dropout_mode: str = "mask_token"
    fsq_norm: str = "batch"  # "batch": normalise the FSQ input per dim (vft.model.FSQInputNorm); "none"
    prediction: str = "v"  # what the decoder's head outputs: "v" velocity, "x" clean latents (velocity derived)
    chunk_overlap: int = 1  # latent frames shared by consecutive chunks of a long video
    # A linear path around both transformers (vft.model.LinearPath): a per-frame linear map
    # latent frame -> FSQ input added to the encoder's, and codes -> clean latent frame added
    # to the decoder's x-prediction. Needs prediction "x".
    linear_path: bool = False

    def __post_init__(self):
        if isinstance(self.compressor, dict):
            self.compressor = CompressorConfig(**self.compressor)
        if isinstance(self.encoder, dict):
            self.encoder = TransformerConfig(**self.encoder)
        if isinstance(self.decoder, dict):
            self.decoder = TransformerConfig(**self.decoder)
        self.fsq_levels = tuple(self.fsq_levels)
        self.encoder.check("encoder")
        self.decoder.check("decoder")
        if self.dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}, got {self.dropout_mode!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.linear_path and self.prediction != "x":
            raise ValueError(f"linear_path needs prediction 'x' (the path predicts clean latents), got "
                             f"prediction {self.prediction!r}")
        if self.fsq_norm not in FSQ_NORMS:
            raise ValueError(f"fsq_norm must be one of {FSQ_NORMS}, got {self.fsq_norm!r}")
        c = self.compressor
        if c.kind == "pixel" and self.frames % c.temporal_factor:
            raise ValueError(f"frames ({self.frames}) must be a multiple of the temporal factor {c.temporal_factor}")
        if c.kind == "vae" and (self.frames - 1) % c.temporal_factor:
            raise ValueError(f"frames ({self.frames}) must be 1 + a multiple of the VAE's temporal factor "
                             f"{c.temporal_factor}")
        for n in ("height", "width"):
            if getattr(self, n) % (c.spatial_factor * self.patch_size):
                raise ValueError(f"{n} ({getattr(self, n)}) must be a multiple of spatial_factor * patch_size = "
                                 f"{c.spatial_factor * self.patch_size}")
        if self.decoder.width < self.patch_dim:
            # The decoder maps noisy patches to velocities (near-identity on the noise at t ~ 1):
            # a token narrower than a patch is a rank bottleneck that caps what it can learn.
            raise ValueError(f"decoder width ({self.decoder.width}) must be >= the patch dimension "
                             f"latent_channels * patch_size**2 = {self.patch_dim}")
        if self.registers < 1:
            raise ValueError(f"registers must be >= 1, got {self.registers}")
        if not 0 <= self.chunk_overlap < self.latent_frames:
            raise ValueError(f"chunk_overlap must be in [0, {self.latent_frames}), got {self.chunk_overlap}")

    # Derived sizes -----------------------------------------------------------------
    @property
    def latent_frames(self) -> int:
        """T': latent frames (= register blocks) per chunk."""
        return self.compressor.latent_frames(self.frames)

    @property
    def latent_hw(self) -> tuple[int, int]:
        s = self.compressor.spatial_factor
        return self.height // s, self.width // s

    @property
    def patches(self) -> int:
        """P: patch tokens per latent frame."""
        h, w = self.latent_hw
        return (h // self.patch_size) * (w // self.patch_size)

    @property
    def patch_dim(self) -> int:
        return self.compressor.latent_channels * self.patch_size ** 2

    @property
    def frame_dim(self) -> int:
        """Numbers in one latent frame: C * H' * W'."""
        h, w = self.latent_hw
        return self.compressor.latent_channels * h * w

    @property
    def fsq_dim(self) -> int:
        return len(self.fsq_levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)

    # JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fsq_levels"] = list(self.fsq_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)

    def replace(self, **overrides) -> "ModelConfig":
        """A copy with dotted overrides, e.g. ``replace(**{"encoder.depth": 2})``."""
        return ModelConfig.from_dict(apply_overrides(self.to_dict(), overrides))


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 8  # per process
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the last step
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = False
    keep_sampling: str = "pow2"  # one of KEEP_SAMPLING: per sample, per latent frame, or a mix of both
    keep_frame_prob: float = 0.5  # "*_mixed" keep sampling: share of samples with a keep per latent frame
    null_prob: float = 0.1  # probability of the null condition (classifier-free guidance)
    prefix_prob: float = 0.25  # probability of a clean-prefix (continuation) sample
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    uniform_t_prob: float = 0.0  # probability that a sample's flow time is drawn from U(0, 1) instead
    loss_t_min: float = 0.0  # > 0: weight the velocity error by max(t, loss_t_min)^2 (= clean-estimate error)
    linear_loss: float = 1.0  # linear_path models: weight of the linear path's own clean-latent MSE
    seed: int = 0
    data: str = "synthetic"  # "synthetic", "mixed" (vft.data.MixedVideos) or a folder of videos
    data_mix: tuple = (0.6, 0.25, 0.15)  # "mixed": weights of synthetic, photo and real clips
    data_fps: float = 0.0  # resample folder videos to this rate (0: keep the file's rate)
    workers: int = 0  # DataLoader worker processes loading clips (0: on the main thread); batches are the same
    log_every: int = 10
    ckpt_every: int = 500

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.data_mix = tuple(self.data_mix)
        if self.keep_sampling not in KEEP_SAMPLING:
            raise ValueError(f"keep_sampling must be one of {KEEP_SAMPLING}, got {self.keep_sampling!r}")
        if not self.linear_loss >= 0:
            raise ValueError(f"linear_loss must be >= 0, got {self.linear_loss}")
        for n in ("null_prob", "prefix_prob", "uniform_t_prob", "loss_t_min", "keep_frame_prob"):
            if not 0 <= getattr(self, n) <= 1:
                raise ValueError(f"{n} must be in [0, 1], got {getattr(self, n)}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {self.workers!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["data_mix"] = list(self.data_mix)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**d)


def apply_overrides(d: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys ("encoder.depth") in a nested dict; unknown keys are an error."""
    d = json.loads(json.dumps(d))
    for key, value in overrides.items():
        node, parts = d, key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"unknown config key {key!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"unknown config key {key!r}; valid keys here: {sorted(node)}")
        node[parts[-1]] = value
    return d


def parse_override(text: str) -> tuple[str, Any]:
    """``"encoder.depth=2"`` -> ("encoder.depth", 2); values are parsed as JSON when possible."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ValueError(f"override must look like key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny", frames=8, height=32, width=32,
        compressor=CompressorConfig(kind="pixel", temporal_factor=2, spatial_factor=2),
        encoder=TransformerConfig(width=128, depth=4), decoder=TransformerConfig(width=128, depth=4),
        patch_size=2, registers=16, fsq_levels=(8, 5, 5, 5), dropout_mode="mask_token", chunk_overlap=1,
        prediction="x", linear_path=True)


def _micro() -> ModelConfig:
    """The smallest sensible model: for tests and smoke runs (seconds per step on a CPU)."""
    return ModelConfig(
        name="micro", frames=4, height=16, width=16,
        compressor=CompressorConfig(kind="pixel", temporal_factor=1, spatial_factor=2),
        encoder=TransformerConfig(width=64, depth=1, head_dim=32),
        decoder=TransformerConfig(width=64, depth=1, head_dim=32),
        patch_size=2, registers=4, fsq_levels=(8, 5, 5, 5), dropout_mode="mask_token", chunk_overlap=1)


def _vae() -> CompressorConfig:
    return CompressorConfig(kind="vae", temporal_factor=4, spatial_factor=8, latent_channels=16)


def _k600() -> ModelConfig:
    return ModelConfig(
        name="videoflextok_k600", frames=17, height=128, width=128, compressor=_vae(),
        encoder=TransformerConfig(width=1152, depth=18), decoder=TransformerConfig(width=1152, depth=18),
        patch_size=2, registers=256, fsq_levels=(8, 8, 8, 5, 5, 5), chunk_overlap=1)


def _d18_d28() -> ModelConfig:
    return ModelConfig(
        name="videoflextok_d18_d28", frames=17, height=256, width=256, compressor=_vae(),
        encoder=TransformerConfig(width=1152, depth=18), decoder=TransformerConfig(width=1792, depth=28),
        patch_size=2, registers=256, fsq_levels=(8, 8, 8, 5, 5, 5), chunk_overlap=1)


PRESETS = {"micro": _micro, "tiny": _tiny, "videoflextok_k600": _k600, "videoflextok_d18_d28": _d18_d28}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def tiny_train_config(**kw) -> TrainConfig:
    """Training settings that suit the tiny preset on a CPU.

    Flow times: logit-normal with mean 1.5 (median t = 0.82) for 75 % of the samples, so
    most steps are at high noise, where the velocity can only be predicted from the tokens
    (with the usual mean 0.0 the decoder learned to denoise from the noisy patches alone
    and ignored its tokens; docs/experiments/README.md), and U(0, 1) for 25 %, so the low-noise end that
    removes the last noise when sampling is trained too.

    With x-prediction the velocity error is weighted by max(t, 0.2)^2 (the clean-estimate
    error, capped at 25x the velocity error's weight near t = 0), and a linear-path model
    adds its linear path's own clean error (``linear_loss``)."""
    base = dict(steps=2000, batch_size=8, lr=2e-3, warmup_steps=200, ema_decay=0.999, logit_normal_mean=1.5,
                uniform_t_prob=0.25, loss_t_min=0.2, linear_loss=1.0)
    base.update(kw)
    return TrainConfig(**base)

