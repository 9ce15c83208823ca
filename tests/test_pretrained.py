"""The shipped tokenizer (``vft.load_pretrained("tiny")``): it loads offline, also from an
installed copy of the package, and it tokenizes: held-out clips reconstruct well at full K,
clearly better than at K = 1, with distinct tokens across clips (issue #10)."""
import os
import subprocess
import sys

import pytest
import torch

import vft
from benchmarks.eval_tokens import evaluate, heldout_clips
from vft.pretrained import PRETRAINED, pretrained_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Floors for 8 held-out synthetic clips, 10 APG steps (measured on the shipped weights:
# see README "Results"); a tokenizer whose tokens carry no information scores ~10 dB at
# every K.
PSNR_FULL_K_FLOOR = 20.0
GAIN_FULL_VS_ONE_DB = 3.0


@pytest.fixture(scope="module")
def model():
    return vft.load_pretrained("tiny")


def test_loads_offline_in_eval_mode(model):
    assert not model.training and model.cfg.name == "tiny"
    info = pretrained_info("tiny")
    assert info["provenance"]["command"].startswith("vft train") and info["provenance"]["steps"] > 1000
    size = os.path.getsize(os.path.join(ROOT, "vft", "pretrained", "tiny", "model.safetensors"))
    assert size <= 20 * 2 ** 20
    with pytest.raises(ValueError, match="available: \\['tiny'\\]"):
        vft.load_pretrained("huge")
    assert PRETRAINED == ("tiny",)


def test_reconstruction_quality_rises_with_tokens(model):
    clips = heldout_clips(model.cfg, 8, "synthetic")
    res = evaluate(model, clips, [1, 8], steps=10, progress=False)
    full, one = res["per_k"][8]["psnr"], res["per_k"][1]["psnr"]
    assert full >= PSNR_FULL_K_FLOOR, res["per_k"]
    assert full - one >= GAIN_FULL_VS_ONE_DB, (one, full)
    # distinct tokens across clips: 8 clips x 4 latent frames x 8 tokens = 256 tokens
    assert res["usage"]["distinct"] >= 64, res["usage"]
    tokens = model.tokenize(clips)
    assert len({tuple(t.reshape(-1).tolist()) for t in tokens}) == 8  # every clip its own token sequence


def test_tokens_drive_the_reconstruction(model):
    """Swapping the tokens of two clips swaps what is reconstructed."""
    clips = heldout_clips(model.cfg, 2, "synthetic")
    tokens = model.tokenize(clips)
    rec = model.detokenize(tokens.flip(0), steps=10)
    same = ((rec - clips.flip(0)) ** 2).mean(dim=(1, 2, 3, 4))
    other = ((rec - clips) ** 2).mean(dim=(1, 2, 3, 4))
    assert (same < 0.5 * other).all(), (same, other)


def test_weights_travel_with_an_installed_copy(tmp_path):
    """``setup.py build_py`` copies what a wheel holds (modules + package data); the copy
    loads the shipped weights from another directory, offline."""
    dest = tmp_path / "site"
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(dest)], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, VFT_SKIP_CUDA="1"))
    assert r.returncode == 0, r.stderr
    assert (dest / "vft" / "pretrained" / "tiny" / "model.safetensors").is_file()
    code = ("import vft, sys; m = vft.load_pretrained('tiny'); "
            "assert vft.__file__.startswith(sys.argv[1]), vft.__file__; print(m.cfg.name)")
    env = dict(os.environ, PYTHONPATH=str(dest), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code, str(dest)], cwd=str(tmp_path), capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0 and r.stdout.strip() == "tiny", r.stderr
