"""vft: a VideoFlexTok video tokenizer built only on vft_kernels ops.

    import vft
    model = vft.load_pretrained("tiny")       # trained weights shipped in the package
    tokens = model.tokenize(video)            # [B, T', R] int32
    video_hat = model.detokenize(tokens, keep=4)
"""
from .config import ModelConfig, TrainConfig, preset, PRESETS
from .model import VideoFlexTok
from .pretrained import PRETRAINED, load_pretrained

__all__ = ["ModelConfig", "PRESETS", "PRETRAINED", "TrainConfig", "VideoFlexTok", "load_pretrained", "preset"]
