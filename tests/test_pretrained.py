"""The shipped tokenizer (``vft.load_pretrained("tiny")``): it loads offline, also from an
installed copy of the package, and its tokens carry the clip: held-out clips reconstruct
above a floor, clearly better from their own tokens than from another clip's, with distinct
tokens across clips (issue #10)."""
import os
import subprocess
import sys

import pytest

import vft
from benchmarks.eval_tokens import evaluate, heldout_clips
from vft.metrics import psnr
from vft.pretrained import PRETRAINED, pretrained_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Floors for 8 held-out synthetic clips, 10 APG steps, measured on the shipped weights (see
# README "Results": the quality goals of issue #10 are not reached yet). The old model
# scored 8.5 dB at every K with one distinct token.
PSNR_FULL_K_FLOOR = 11.5  # measured 12.69 (K = 1: 12.87)
OWN_VS_OTHER_TOKENS_DB = 1.5  # own tokens beat another clip's tokens by this much on average (measured 2.72)
DISTINCT_FLOOR = 64  # of the 256 held-out tokens (measured 102)


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


def test_reconstructions_carry_the_clip(model):
    """Held-out clips reconstruct above a floor, their own tokens clearly better than another
    clip's tokens; tokens are diverse across clips. (Quality rising with K is not asserted:
    on held-out synthetic clips the shipped model does not show it yet, see README.)"""
    clips = heldout_clips(model.cfg, 8, "synthetic")
    res = evaluate(model, clips, [1, 8], steps=10, progress=False)
    assert res["per_k"][8]["psnr"] >= PSNR_FULL_K_FLOOR, res["per_k"]
    tokens = model.tokenize(clips)
    other = model.detokenize(tokens.roll(1, 0), steps=10)
    own_minus_other = [p - psnr(o, c) for p, o, c in zip(res["per_k"][8]["psnr_per_clip"], other, clips)]
    assert sum(own_minus_other) / len(own_minus_other) >= OWN_VS_OTHER_TOKENS_DB, own_minus_other
    assert res["usage"]["distinct"] >= DISTINCT_FLOOR, res["usage"]
    assert len({tuple(t.reshape(-1).tolist()) for t in tokens}) == 8  # every clip its own token sequence


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
