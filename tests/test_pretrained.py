"""The shipped tokenizer (``vft.load_pretrained("tiny")``): it loads offline, also from an
installed copy of the package, and its tokens carry the clip coarse to fine: held-out clips
reconstruct above a floor, quality rises with the token count on every clip, own tokens
beat another clip's by a wide margin, and tokens are diverse (issue #10)."""
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
# README "Results": the 24 dB goal of issue #10 is not reached yet). The first shipped model
# scored 12.7 dB at K = 8 with no rise over K = 1; the collapsed one 8.5 dB with one token.
PSNR_FULL_K_FLOOR = 14.5  # at K = R = 16; measured 15.98 (K = 1: 12.07)
RISE_MEAN_DB = 2.5  # mean PSNR(K = 16) - PSNR(K = 1) over the clips; measured 3.91
RISE_EACH_DB = 1.0  # ...and on every clip; measured min 2.84
OWN_VS_OTHER_TOKENS_DB = 4.0  # own tokens beat another clip's tokens by this much on average (measured 7.77)
DISTINCT_FLOOR = 150  # of the 2 x 256 held-out tokens at K = 1 and 16 (measured 284)


@pytest.fixture(scope="module")
def model():
    return vft.load_pretrained("tiny")


def test_loads_offline_in_eval_mode(model):
    assert not model.training and model.cfg.name == "tiny"
    info = pretrained_info("tiny")
    assert "vft train --preset tiny" in info["provenance"]["command"] and info["provenance"]["steps"] > 1000
    size = os.path.getsize(os.path.join(ROOT, "vft", "pretrained", "tiny", "model.safetensors"))
    assert size <= 20 * 2 ** 20
    with pytest.raises(ValueError, match="available: \\['tiny'\\]"):
        vft.load_pretrained("huge")
    assert PRETRAINED == ("tiny",)


def test_reconstructions_carry_the_clip_coarse_to_fine(model):
    """Held-out clips reconstruct above a floor at K = R, better than at K = 1 on every clip,
    their own tokens clearly better than another clip's; tokens are diverse across clips."""
    R = model.cfg.registers
    clips = heldout_clips(model.cfg, 8, "synthetic")
    res = evaluate(model, clips, [1, R], steps=10, progress=False)
    assert res["per_k"][R]["psnr"] >= PSNR_FULL_K_FLOOR, res["per_k"]
    rise = [b - a for a, b in zip(res["per_k"][1]["psnr_per_clip"], res["per_k"][R]["psnr_per_clip"])]
    assert sum(rise) / len(rise) >= RISE_MEAN_DB and min(rise) >= RISE_EACH_DB, rise
    tokens = model.tokenize(clips)
    other = model.detokenize(tokens.roll(1, 0), steps=10)
    own_minus_other = [p - psnr(o, c) for p, o, c in zip(res["per_k"][R]["psnr_per_clip"], other, clips)]
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
