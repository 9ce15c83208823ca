"""Token files: the tokens of a clip (and optionally its per-latent-frame token counts) as
safetensors, with the model config's name, the register count, the frame rate and any
extra settings as string metadata. ``vft tokenize``, ``vft reconstruct`` and the demo write
them; ``vft detokenize`` reads them."""
from __future__ import annotations

import os
from typing import Optional

import torch


def save_tokens(path: str, tokens: torch.Tensor, cfg, fps: float, keep: Optional[torch.Tensor] = None,
                extra: Optional[dict] = None) -> None:
    """tokens int [B, T', R] (and optionally a per-latent-frame keep int [B, T']) of a model
    with config ``cfg`` -> the safetensors file ``path``."""
    from safetensors.torch import save_file

    tensors = {"tokens": tokens.to(torch.int32).contiguous().cpu()}
    if keep is not None:
        tensors["keep"] = keep.to(torch.int32).contiguous().cpu()
    meta = {"config": cfg.name, "registers": str(cfg.registers), "fps": str(fps)}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    save_file(tensors, path, metadata=meta)


def load_tokens(path: str) -> tuple[torch.Tensor, dict]:
    """(tokens int32 [B, T', R], metadata) of a token file; the metadata holds ``keep`` (int64
    [B, T']) when the file stores per-latent-frame token counts."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokens file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            if "tokens" not in f.keys():
                raise ValueError(f"{path} has no 'tokens' tensor (keys: {list(f.keys())})")
            meta = dict(f.metadata() or {})
            if "keep" in f.keys():  # per-latent-frame token counts (vft tokenize --target-psnr)
                meta["keep"] = f.get_tensor("keep").long()
            return f.get_tensor("tokens"), meta
    except Exception as e:  # safetensors raises its own error types for malformed files
        if isinstance(e, ValueError) and "tokens" in str(e):
            raise
        raise ValueError(f"cannot read tokens file {path}: {e}") from None
