"""`vft train --init CHECKPOINT`: a new run that starts from another run's weights (not a
resume: fresh step counter and optimizer), through the CLI's main function.

Run A trains the micro preset for 2 steps with ``--ema-decay 0`` (so its EMA weights, which
--init loads, are its trained weights). Run B starts from A with ``--lr 0`` for one step:
AdamW with a zero learning rate leaves every parameter exactly where it started, so B's
saved parameters are its starting point and must equal A's bit for bit."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from vft.cli import main
from vft.config import preset
from vft.model import VideoFlexTok

COMMON = ["--preset", "micro", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("init") / "a")
    assert main(["train", *COMMON, "--out", out, "--steps", "2", "--ema-decay", "0", "--warmup-steps", "1"]) == 0
    return out


def _params(path, file):
    names = {n for n, _ in VideoFlexTok(preset("micro")).named_parameters()}
    state = load_file(os.path.join(path, file))
    assert names <= set(state), f"{file} lacks parameters {sorted(names - set(state))[:5]}"
    return {n: state[n] for n in names}


def test_init_starts_from_the_checkpoint_weights(run_a, tmp_path, capsys):
    a = _params(run_a, "ema.safetensors")
    # --ema-decay 0: A's EMA is its trained weights, and training moved them off the seed's init.
    assert all(torch.equal(a[n], w) for n, w in _params(run_a, "model.safetensors").items())
    torch.manual_seed(0)  # the seed both runs construct their model with
    fresh = dict(VideoFlexTok(preset("micro")).named_parameters())
    moved = [n for n in a if not torch.equal(a[n], fresh[n].detach())]
    assert len(moved) > len(a) // 2, "run A's weights are still its initial weights: the check below proves nothing"

    b = str(tmp_path / "b")
    assert main(["train", *COMMON, "--out", b, "--init", run_a, "--steps", "1", "--lr", "0"]) == 0
    assert "trained to step 1" in capsys.readouterr().out
    got = _params(b, "model.safetensors")
    differ = [n for n in a if not torch.equal(got[n], a[n])]
    assert not differ, f"run B did not start from run A's weights: {differ[:5]}"
    state = json.load(open(os.path.join(b, "state.json")))
    assert state["step"] == 1, "--init must start a new run at step 0, not resume A's step count"
    assert json.load(open(os.path.join(b, "config.json")))["train"]["lr"] == 0  # B's own settings


@pytest.mark.parametrize("what", ["missing", "not_a_checkpoint", "file"])
def test_bad_init_path_is_a_clear_error(run_a, tmp_path, capsys, what):
    bad = {"missing": str(tmp_path / "nope"), "not_a_checkpoint": str(tmp_path),
           "file": os.path.join(run_a, "model.safetensors")}[what]
    out = str(tmp_path / "b")
    assert main(["train", *COMMON, "--out", out, "--init", bad, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "vft train: error:" in err and "not a vft checkpoint" in err and bad in err, err
    assert "Traceback" not in err
    assert not os.path.exists(out), "a failed --init must not leave an output folder behind"


def test_init_from_a_different_config_is_a_clear_error(run_a, tmp_path, capsys):
    out = str(tmp_path / "b")
    assert main(["train", *COMMON, "--set", "decoder.depth=2", "--out", out, "--init", run_a, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "different model config" in err and "decoder.depth" in err, err
    assert not os.path.exists(out)
