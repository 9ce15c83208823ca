"""vft: a VideoFlexTok video tokenizer built only on vft_kernels ops.

    from vft import VideoFlexTok, preset
    model = VideoFlexTok(preset("tiny"))
    tokens = model.tokenize(video)            # [B, T', R] int32
    video_hat = model.detokenize(tokens, keep=4)
"""
from .config import ModelConfig, TrainConfig, preset, PRESETS
from .model import VideoFlexTok

__all__ = ["ModelConfig", "PRESETS", "TrainConfig", "VideoFlexTok", "preset"]
