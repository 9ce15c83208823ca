"""Checkpoints: safetensors + JSON only (never pickle).

A checkpoint is a folder::

    config.json            {"model": ModelConfig, "train": TrainConfig}
    model.safetensors      weights
    ema.safetensors        EMA weights (if training kept them)
    optimizer.safetensors  optimizer tensors, keyed "<param index>.<name>"
    optimizer.json         optimizer param groups and non-tensor state
    state.json             step, world size, rank checksums

A save is atomic as a set: the new files are written into ``<folder>/.incoming/``, its
``state.json`` last (the marker that the set is complete), and only then moved over the old
ones (``os.replace`` per file). A crash while writing leaves the old checkpoint untouched
(the incomplete ``.incoming`` is discarded on the next read or save); a crash while moving
is finished (rolled forward) by the next read or save, so weights, optimizer, EMA and step
always come from the same save.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig, TrainConfig


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or made for a different model config."""


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _atomic_tensors(path: str, tensors: dict) -> None:
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


INCOMING = ".incoming"
SET_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "config.json")


def recover(path: str) -> None:
    """Finish or discard an interrupted save in ``path`` (see the module doc)."""
    tmp = os.path.join(path, INCOMING)
    if not os.path.isdir(tmp):
        return
    marker = os.path.join(tmp, "state.json")
    if os.path.isfile(marker):  # the new set is complete: move it in, state.json last
        with open(marker) as fh:
            files = json.load(fh).get("files", [])
        for name in SET_FILES:
            src, dst = os.path.join(tmp, name), os.path.join(path, name)
            if os.path.isfile(src):
                os.replace(src, dst)
            elif name not in files and os.path.isfile(dst):
                os.remove(dst)  # e.g. an old EMA file that the new set does not have
        os.replace(marker, os.path.join(path, "state.json"))
    shutil.rmtree(tmp, ignore_errors=True)


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, prefix + k + ".")
        elif va != vb:
            out.append(f"{prefix}{k}: checkpoint {va!r} vs requested {vb!r}")
    return out


def read_config(path: str) -> tuple[ModelConfig, Optional[TrainConfig]]:
    recover(path)
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise CheckpointError(f"{path} is not a vft checkpoint: {f} not found")
    with open(f) as fh:
        d = json.load(fh)
    return ModelConfig.from_dict(d["model"]), (TrainConfig.from_dict(d["train"]) if d.get("train") else None)


def check_config(path: str, cfg: ModelConfig) -> None:
    """Raise CheckpointError naming every differing key when the checkpoint at ``path`` was
    made for a different model config than ``cfg``."""
    saved, _ = read_config(path)
    diff = config_diff(saved.to_dict(), cfg.to_dict())
    if diff:
        raise CheckpointError(f"checkpoint {path} was made for a different model config: " + "; ".join(diff))


def save(path: str, model: torch.nn.Module, cfg: ModelConfig, train_cfg: Optional[TrainConfig] = None,
         step: int = 0, optimizer: Optional[torch.optim.Optimizer] = None, ema: Optional[dict] = None,
         extra_state: Optional[dict] = None) -> None:
    os.makedirs(path, exist_ok=True)
    recover(path)
    final, path = path, os.path.join(path, INCOMING)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    files = ["model.safetensors", "config.json"]
    _atomic_tensors(os.path.join(path, "model.safetensors"), model.state_dict())
    if ema is not None:
        _atomic_tensors(os.path.join(path, "ema.safetensors"), ema)
        files.append("ema.safetensors")
    if optimizer is not None:
        sd = optimizer.state_dict()
        tensors, scalars = {}, {}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{pid}.{k}"] = v
                else:
                    scalars.setdefault(str(pid), {})[k] = v
        _atomic_tensors(os.path.join(path, "optimizer.safetensors"), tensors)
        _atomic_json(os.path.join(path, "optimizer.json"), {"param_groups": sd["param_groups"], "scalars": scalars})
        files += ["optimizer.safetensors", "optimizer.json"]
    _atomic_json(os.path.join(path, "config.json"),
                 {"model": cfg.to_dict(), "train": train_cfg.to_dict() if train_cfg else None})
    _atomic_json(os.path.join(path, "state.json"), dict(step=step, files=files, **(extra_state or {})))  # marker
    recover(final)


def load_weights(path: str, model: torch.nn.Module, use_ema: bool = True) -> str:
    """Load weights into ``model`` (whose config must match the checkpoint's); EMA weights
    when present and ``use_ema``. Returns the file used."""
    check_config(path, model.cfg)
    f = os.path.join(path, "ema.safetensors")
    if not (use_ema and os.path.isfile(f)):
        f = os.path.join(path, "model.safetensors")
    if not os.path.isfile(f):
        raise CheckpointError(f"checkpoint {path} has no weights ({f} not found)")
    state = load_file(f, device=str(next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {f} does not fit the model: missing {sorted(missing)}, "
                              f"unexpected {sorted(unexpected)}")
    return f


def load_optimizer(path: str, optimizer: torch.optim.Optimizer) -> None:
    recover(path)
    with open(os.path.join(path, "optimizer.json")) as fh:
        meta = json.load(fh)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    state: dict = {}
    for key, v in tensors.items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def read_state(path: str) -> dict:
    recover(path)
    f = os.path.join(path, "state.json")
    if not os.path.isfile(f):
        raise CheckpointError(f"{path} is not a vft checkpoint: {f} not found")
    with open(f) as fh:
        return json.load(fh)


def load_model(path: str, device: str = "cpu", use_ema: bool = True, vae=None):
    """Build the model recorded in the checkpoint at ``path`` and load its weights."""
    from .model import VideoFlexTok

    cfg, _ = read_config(path)
    model = VideoFlexTok(cfg, vae).to(device)
    load_weights(path, model, use_ema)
    return model.eval()
