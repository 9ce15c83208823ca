"""Pretrained tokenizers shipped inside the package (safetensors + JSON, no download).

    import vft
    model = vft.load_pretrained("tiny")          # eval mode, EMA weights, CPU
    tokens = model.tokenize(video)               # video float [B, 3, 8k, 32, 32] in [-1, 1]

Each entry is a folder ``vft/pretrained/<name>/`` holding ``config.json`` (model config,
training config, provenance) and ``model.safetensors`` (the EMA weights), read through
``importlib.resources`` so it works from a checkout and from an installed wheel.
"""
from __future__ import annotations

from typing import Optional

import json
import os
from importlib import resources

import torch
from safetensors.torch import load_file

from .config import ModelConfig

PRETRAINED = ("tiny",)


def pretrained_dir(name: str):
    """The packaged folder of pretrained model ``name`` (a Traversable)."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {list(PRETRAINED)}")
    folder = resources.files("vft") / "pretrained" / name
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"pretrained weights for {name!r} are missing from this installation "
                                f"({folder}/model.safetensors); reinstall vft (pip install .)")
    return folder


def pretrained_info(name: str = "tiny") -> dict:
    """The JSON metadata of a pretrained model: ``model`` config, ``train`` config, ``provenance``."""
    return json.loads((pretrained_dir(name) / "config.json").read_text())


def load_pretrained(name: str = "tiny", device: str = "cpu") -> "torch.nn.Module":
    """Build pretrained model ``name`` with its shipped (EMA) weights, in eval mode, offline."""
    from .model import VideoFlexTok

    info = pretrained_info(name)
    model = VideoFlexTok(ModelConfig.from_dict(info["model"]))
    with resources.as_file(pretrained_dir(name) / "model.safetensors") as path:
        state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"pretrained {name!r} does not fit its config: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
    return model.to(device).eval()


def load_model(name_or_folder: str = "tiny", device: str = "cpu") -> "torch.nn.Module":
    """A shipped pretrained model by name (one of ``PRETRAINED``), or the model in a
    checkpoint folder (``vft train --out``) or an exported folder (:func:`export`), with its
    EMA weights when it has them, in eval mode. A shipped name wins over a folder of the same
    name in the working directory: write ``./tiny`` for the folder."""
    from . import checkpoint as ckpt

    if not isinstance(name_or_folder, str) or not name_or_folder:
        raise ValueError(f"expected a shipped model name {list(PRETRAINED)} or a checkpoint folder, "
                         f"got {name_or_folder!r}")
    if name_or_folder in PRETRAINED:
        return load_pretrained(name_or_folder, device)
    if not os.path.isdir(name_or_folder):
        raise FileNotFoundError(f"{name_or_folder!r} is neither a shipped model ({', '.join(PRETRAINED)}) nor a "
                                "checkpoint folder")
    return ckpt.load_model(name_or_folder, device)


def export(checkpoint: str, out: str, name: str, command: str, calibration_clips: int = 256) -> str:
    """Package a training checkpoint as a pretrained model folder ``out`` (created; files in
    it are replaced): its EMA weights with the FSQ input norm's statistics recalibrated for
    them on ``calibration_clips`` training clips, the configs, the training log and
    ``command`` (how the run was made). The folder loads with :func:`load_model` (and
    ``vft ... --checkpoint out``); to ship it, copy it to ``vft/pretrained/<name>/`` in a
    source checkout and add ``name`` to ``PRETRAINED``. Returns ``out``."""
    import shutil

    from safetensors.torch import save_file

    from . import checkpoint as ckpt
    from .train import make_dataset, recalibrate_fsq_norm

    if not isinstance(out, str) or not out:
        raise ValueError(f"export needs an output folder, got {out!r}")
    if calibration_clips < 16 or calibration_clips % 16:
        raise ValueError(f"calibration_clips must be a positive multiple of 16, got {calibration_clips}")
    model = ckpt.load_model(checkpoint, use_ema=True)
    cfg, tcfg = ckpt.read_config(checkpoint)
    data = make_dataset(cfg, tcfg)
    batches = [torch.stack([data[i + j] for j in range(16)]) for i in range(0, calibration_clips, 16)]
    recalibrate_fsq_norm(model, batches)
    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"name": name, "weights": "ema"})
    step = ckpt.read_state(checkpoint)["step"]
    info = {"model": cfg.to_dict(), "train": tcfg.to_dict() if tcfg else None,
            "provenance": {"command": command, "steps": step, "weights": "EMA (decay "
                           f"{tcfg.ema_decay if tcfg else '?'}), FSQ input norm recalibrated on "
                           f"{calibration_clips} training clips", "log": "train_log.csv"}}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(info, f, indent=2)
    log = os.path.join(checkpoint, "log.csv")
    if os.path.isfile(log):
        shutil.copyfile(log, os.path.join(out, "train_log.csv"))
    return out


def load_router(name: str = "tiny", sampling: Optional[dict] = None):
    """The token-budget router (``vft.router``) for decoding with ``sampling`` (steps /
    guidance / scale; missing ones from the default of ``vft detokenize``, 25 APG steps at
    scale 1.5): of pretrained model ``name`` (its ``routers/<setting>/`` folders) or of a
    router folder (``routers/<setting>/`` subfolders, or one ``router.json`` +
    ``router.safetensors``). A ValueError when there is none for that setting; ``sampling``
    None with a single-router folder returns it whatever its setting."""
    from .router import KeepRouter, RouterSet, load_routers

    if name in PRETRAINED:
        with resources.as_file(pretrained_dir(name)) as folder:
            found = load_routers(str(folder))
    else:
        found = load_routers(name)
    if isinstance(found, RouterSet):
        return found.select(sampling)
    if sampling is not None:
        assert isinstance(found, KeepRouter)
        found.check_setting(sampling)
    return found


def resolve_router(router, sampling: Optional[dict] = None):
    """The KeepRouter for the decoding setting ``sampling`` (steps / guidance / scale; missing
    ones from DEFAULT_SAMPLING, the default of ``vft detokenize``): ``router`` is a
    KeepRouter (it must have been trained for that setting), a RouterSet (its router for the
    setting) or a name / folder for ``vft.pretrained.load_router``."""
    if isinstance(router, str):
        return load_router(router, sampling)
    from .router import KeepRouter, RouterSet

    if isinstance(router, RouterSet):
        return router.select(sampling)
    if isinstance(router, KeepRouter):
        router.check_setting(sampling)
    return router
