"""The `vft` CLI end to end on a small mp4 written by the test (micro preset), the demo,
`info`, and bad inputs (each a clear error and exit status 2, never a traceback)."""
import json
import os

import pytest
import torch

import vft_kernels as vk
from vft_kernels import dispatch
from safetensors.torch import load_file, save_file

from vft.cli import main, sample_clip
from vft.data import read_video, synthetic_video, to_model_range, write_video
from vft.demo import OUTPUT_FILES
from vft.metrics import psnr, ssim
from vft.pretrained import load_pretrained


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro checkpoint (2 steps) and a 6-frame clip: longer than one 4-frame chunk."""
    root = tmp_path_factory.mktemp("cli")
    clip = str(root / "clip.mp4")
    write_video(clip, synthetic_video(9, 6, 24, 20), fps=8)  # resized/cropped to 16x16 on load
    ck = str(root / "ckpt")
    assert main(["train", "--preset", "micro", "--out", ck, "--steps", "2", "--batch-size", "2", "--no-progress",
                 "--backend", "reference"]) == 0
    return root, clip, ck


def test_tokenize_detokenize_reconstruct(trained, capsys):
    root, clip, ck = trained
    tok = str(root / "tokens.safetensors")
    assert main(["tokenize", clip, "--checkpoint", ck, "--out", tok, "--backend", "reference"]) == 0
    tokens = load_file(tok)["tokens"]
    assert tokens.shape == (1, 6, 4) and tokens.dtype == torch.int32  # chunked: 6 latent frames
    out = str(root / "decoded.mp4")
    assert main(["detokenize", tok, "--checkpoint", ck, "--out", out, "--keep", "2", "--steps", "2"]) == 0
    frames, fps = read_video(out)
    assert frames.shape == (6, 16, 16, 3) and fps == pytest.approx(8)
    rec = str(root / "rec")
    assert main(["reconstruct", clip, "--checkpoint", ck, "--out", rec, "--keep", "1,4", "--steps", "2",
                 "--solver", "heun", "--guidance", "cfg"]) == 0
    frames, _ = read_video(os.path.join(rec, "reconstruction.mp4"))
    assert frames.shape == (6, 16, 48, 3)  # original | keep=1 | keep=4 side by side
    assert os.path.getsize(os.path.join(rec, "grid.png")) > 1000
    summary = json.load(open(os.path.join(rec, "summary.json")))
    assert summary["tokens_shape"] == [1, 6, 4] and set(summary["per_k"]) == {"1", "4"}
    assert "codebook usage" in capsys.readouterr().out


def test_tokenize_with_a_target_psnr_stores_per_frame_keep(trained, capsys, monkeypatch, token_sensitive):
    """`vft tokenize --target-psnr` stores the per-latent-frame token counts found by
    search_keep; `vft detokenize` uses them (and --keep overrides them)."""
    import vft.cli as cli

    root, clip, ck = trained
    real_load = cli.ckpt.load_model

    def load_sensitive(*a, **k):  # a 2-step model's zero-initialised head ignores the tokens
        return token_sensitive(real_load(*a, **k))

    monkeypatch.setattr(cli.ckpt, "load_model", load_sensitive)
    tok = str(root / "adaptive.safetensors")
    assert main(["tokenize", clip, "--checkpoint", ck, "--out", tok, "--target-psnr", "1.0", "--search-steps", "2"]) == 0
    data = load_file(tok)
    keep = data["keep"]
    assert keep.shape == (1, 6) and keep.dtype == torch.int32 and (keep == 1).all()  # 1 dB: one token is enough
    assert "keep per latent frame [1, 1, 1, 1, 1, 1]" in capsys.readouterr().out
    import vft.model as vm
    lats, real_detok = [], vm.VideoFlexTok.detokenize_latents

    def spy(self, *args, **kw):  # the sampled latents, before the video codec
        lats.append(real_detok(self, *args, **kw))
        return lats[-1]

    monkeypatch.setattr(vm.VideoFlexTok, "detokenize_latents", spy)
    a, b, c = (str(root / f"{n}.mp4") for n in ("stored", "one", "all"))
    assert main(["detokenize", tok, "--checkpoint", ck, "--out", a, "--steps", "2"]) == 0
    assert main(["detokenize", tok, "--checkpoint", ck, "--out", b, "--steps", "2", "--keep", "1"]) == 0
    assert main(["detokenize", tok, "--checkpoint", ck, "--out", c, "--steps", "2", "--keep", "4"]) == 0
    assert all(os.path.getsize(p) > 100 for p in (a, b, c))
    # The stored keep is what --keep 1 gives, not what --keep 4 gives. Compared on the
    # latents: the mp4s (H.264, crf 12) turn sub-level differences into whole-level ones,
    # and two clean-clone CI runs (2026-12-04) saw the mp4s of a and b differ (cause not
    # found; the latents were equal in every run checked since).
    la, lb, lc = lats
    same, other = (la - lb).abs().max().item(), (la - lc).abs().mean().item()
    assert same <= 1e-6 and other > 1e-4, (same, other)  # measured: 0.0 and 4.0e-4
    assert main(["tokenize", clip, "--checkpoint", ck, "--out", tok, "--target-psnr", "90", "--search-steps", "1"]) == 2
    assert "unreachable" in capsys.readouterr().err


def test_tokenize_with_a_budget_or_a_rate(trained, capsys, monkeypatch, token_sensitive):
    """`vft tokenize --budget N` spends exactly N tokens per clip, `--rate r` floor(r x latent
    frames), on curves measured by decoding (no router); the counts are stored and used."""
    import vft.cli as cli

    root, clip, ck = trained
    real_load = cli.ckpt.load_model
    monkeypatch.setattr(cli.ckpt, "load_model", lambda *a, **k: token_sensitive(real_load(*a, **k)))
    tok = str(root / "budget.safetensors")
    for extra, total in ((["--budget", "10"], 10), (["--rate", "2.5"], 15), (["--rate", "4"], 24)):
        assert main(["tokenize", clip, "--checkpoint", ck, "--out", tok, "--search-steps", "1"] + extra) == 0
        data = load_file(tok)
        assert data["keep"].shape == (1, 6) and int(data["keep"].sum()) == total and int(data["keep"].min()) >= 1
        from safetensors import safe_open

        with safe_open(tok, "pt") as f:
            meta = f.metadata()
        assert meta["policy"] == "measured" and meta["search_steps"] == "1"
        assert float(meta[extra[0][2:]]) == float(extra[1])
        assert f"(measured: {total} tokens" in capsys.readouterr().out
    import vft.model as vm

    calls, real_detokenize = [], vm.VideoFlexTok.detokenize

    def spy(self, tokens, keep=None, **kw):
        calls.append((keep, kw))
        return real_detokenize(self, tokens, keep=keep, **kw)

    monkeypatch.setattr(vm.VideoFlexTok, "detokenize", spy)
    out = str(root / "budget.mp4")
    assert main(["detokenize", tok, "--checkpoint", ck, "--out", out]) == 0  # the setting the counts were chosen for
    assert main(["detokenize", tok, "--checkpoint", ck, "--out", out, "--steps", "2", "--guidance", "none"]) == 0
    (keep, stored), (_, given) = calls
    assert torch.equal(keep.cpu(), data["keep"].long())
    assert (stored["steps"], stored["guidance"], stored["scale"]) == (1, "apg", 1.5)
    assert (given["steps"], given["guidance"], given["scale"]) == (2, "none", 1.5)
    printed = capsys.readouterr().out
    assert "decoding with 1 step, APG guidance at scale 1.5;" in printed
    assert "decoding with 2 steps, no guidance;" in printed
    plain = str(root / "plain.safetensors")  # no per-frame counts: detokenize's own defaults
    assert main(["tokenize", clip, "--checkpoint", ck, "--out", plain]) == 0
    assert main(["detokenize", plain, "--checkpoint", ck, "--out", out]) == 0
    assert calls[-1][1]["steps"] == 25 and calls[-1][1]["guidance"] == "apg"


@pytest.mark.parametrize("extra, message", [
    (["--budget", "10", "--rate", "2"], "give one of --target-psnr, --budget and --rate, got --budget and --rate"),
    (["--target-psnr", "10", "--budget", "10"], "give one of --target-psnr, --budget and --rate"),
    (["--budget", "5"], r"budget must be an int >= T' = 6 tokens per clip"),
    (["--rate", "0.5"], r"rate \(mean tokens per latent frame\) must be a number in \[1, R = 4\]"),
    (["--rate", "4.5"], r"must be a number in \[1, R = 4\]"),
    (["--budget", "10", "--granularity", "clip"], "granularity applies to a target_psnr search without a router"),
    (["--granularity", "clip"], "--granularity needs --target-psnr, --budget or --rate"),
    (["--router", "tiny"], "--router needs --target-psnr, --budget or --rate"),
    (["--rate", "2", "--router", "tiny", "--search-steps", "3"], "with --router nothing is decoded"),
    (["--steps", "3"], "--steps needs --target-psnr, --budget or --rate"),
    (["--rate", "2", "--steps", "3", "--search-steps", "2"], "--search-steps 2 and --steps 3 disagree"),
])
def test_tokenize_bad_budget_combinations_are_clear_errors(trained, capsys, extra, message):
    import re

    root, clip, ck = trained
    assert main(["tokenize", clip, "--checkpoint", ck, "--out", str(root / "bad.safetensors")] + extra) == 2
    assert re.search(message, capsys.readouterr().err)


def test_info_reports_parameter_counts(capsys):
    assert main(["info", "--preset", "videoflextok_k600", "--preset", "micro"]) == 0
    out = capsys.readouterr().out
    assert "videoflextok_k600" in out and "total_excluding_adaln 575.8M" in out
    assert "attention_forward" in out


def _check_demo_outputs(out, keeps, frames, size):
    """Every promised file exists, and the summary's metrics equal a recomputation from the
    written frames (and the mp4 holds the original and every K side by side)."""
    for f in OUTPUT_FILES:
        assert os.path.getsize(os.path.join(out, f)) > 100, f
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [int(k) for k in summary["per_k"]] == keeps
    written = load_file(os.path.join(out, "frames.safetensors"))
    assert written["original"].shape == (frames, size, size, 3)
    for k in keeps:
        a, b = to_model_range(written[f"k{k}"]), to_model_range(written["original"])
        assert summary["per_k"][str(k)]["psnr_db"] == pytest.approx(psnr(a, b), abs=1e-9)
        assert summary["per_k"][str(k)]["ssim"] == pytest.approx(ssim(a, b), abs=1e-9)
    video, _ = read_video(os.path.join(out, "reconstruction.mp4"))
    assert video.shape == (frames, size, size * (1 + len(keeps)), 3)
    md = open(os.path.join(out, "summary.md")).read()
    assert f"{summary['per_k'][str(keeps[-1])]['psnr_db']:.2f}" in md
    return summary


def test_demo_runs_on_the_shipped_model(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--steps", "2", "--keep", "1,8", "--no-progress"]) == 0
    summary = _check_demo_outputs(out, [1, 8], 12, 32)  # 12 frames: one and a half 8-frame chunks
    assert summary["tokens_shape"] == [1, 6, 16]
    assert summary["timing"]["reference_seconds"] > 0 and summary["timing"]["speedup"] > 0
    assert summary["timing"]["backend"] == vk.available_backends()["attention_forward"]["cpu"][0]
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "reference" in printed and "grid.png" in printed
    # the tokens written are the model's tokens of the held-out sample clip
    model = load_pretrained("tiny")
    clip = to_model_range(sample_clip(model.cfg, 12))[None]
    assert torch.equal(load_file(os.path.join(out, "tokens.safetensors"))["tokens"], model.tokenize(clip))


def test_demo_on_a_video_file_of_any_size(tmp_path, capsys):
    clip = str(tmp_path / "odd.mp4")
    write_video(clip, synthetic_video(3, 11, 50, 70), fps=12)  # odd length, not square, not 32x32
    out = str(tmp_path / "demo")
    assert main(["demo", "--video", clip, "--out", out, "--steps", "1", "--keep", "2", "--no-timing",
                 "--no-progress"]) == 0
    summary = _check_demo_outputs(out, [2], 10, 32)  # 11 frames -> 10 (a multiple of the 2-frame latent step)
    assert summary["fps"] == pytest.approx(12) and "timing" not in summary
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 50)
    assert "not a readable video" in _err(capsys, ["demo", "--video", str(junk), "--out", out])
    assert "not found" in _err(capsys, ["demo", "--video", str(tmp_path / "missing.mp4"), "--out", out])


def _err(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_are_clear_errors(trained, tmp_path, capsys):
    root, clip, ck = trained
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"garbage" * 100)
    assert "not a readable video" in _err(capsys, ["tokenize", str(junk), "--checkpoint", ck, "--out", "x"])
    assert "not found" in _err(capsys, ["tokenize", str(tmp_path / "nope.mp4"), "--checkpoint", ck, "--out", "x"])
    bad_tok = str(tmp_path / "bad.safetensors")
    save_file({"tokens": torch.zeros(1, 2, 9, dtype=torch.int32)}, bad_tok)
    assert "K <= R = 4" in _err(capsys, ["detokenize", bad_tok, "--checkpoint", ck, "--out", "x.mp4"])
    save_file({"tokens": torch.full((1, 2, 4), 5000, dtype=torch.int32)}, bad_tok)
    assert "[0, 1000)" in _err(capsys, ["detokenize", bad_tok, "--checkpoint", ck, "--out", "x.mp4"])
    assert "[0, R=4]" in _err(capsys, ["reconstruct", clip, "--checkpoint", ck, "--out", str(tmp_path / "r"),
                                       "--keep", "1,5"])
    err = _err(capsys, ["train", "--preset", "micro", "--set", "decoder.depth=2", "--out", ck, "--resume",
                        "--steps", "3"])
    assert "different model config" in err and "decoder.depth" in err
    assert "not a vft checkpoint" in _err(capsys, ["tokenize", clip, "--checkpoint", str(tmp_path), "--out", "x"])
    assert "unknown config key" in _err(capsys, ["train", "--preset", "micro", "--set", "depth=2", "--out", "x"])


def test_forced_backend_without_every_op_is_refused_up_front(tmp_path, capsys):
    # The cuda backend has no register attention kernel: every model command is refused
    # before any work, naming the op and the reason; the backends that have every op run.
    out = str(tmp_path / "demo")
    for cmd in (["demo", "--out", out], ["train", "--preset", "micro", "--out", out, "--steps", "1"]):
        err = _err(capsys, cmd + ["--backend", "cuda"])
        assert "--backend cuda cannot run this command" in err, err
        if dispatch.backend_status("cuda") is None:  # _C has the CUDA kernels (built with nvcc)
            assert "attention_forward has no cuda kernel (it is implemented by: cpu, reference, triton)" in err, err
        else:
            assert "backend 'cuda' is not available" in err, err
    assert not os.path.exists(out)
    assert main(["demo", "--out", out, "--steps", "1", "--keep", "1", "--no-timing", "--no-progress",
                 "--backend", "cpu"]) == 0
    assert os.path.isfile(os.path.join(out, "summary.json"))
    # `info` only reports, so it accepts any backend.
    assert main(["info", "--preset", "micro", "--backend", "cuda"]) == 0


def test_every_option_has_a_help_line():
    import argparse

    from vft.cli import build_parser

    parser, missing = build_parser(), []
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) >= {"tokenize", "detokenize", "reconstruct", "demo", "train", "train-router", "export"}
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
                missing.append(f"vft {name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "options without a help line: " + ", ".join(missing)


def test_the_shipped_model_is_the_default_and_a_name_or_a_folder_works(trained, tmp_path, capsys):
    """tokenize / detokenize / reconstruct / demo run the shipped `tiny` model without
    --checkpoint; --checkpoint takes a shipped name or a folder; anything else is a clear error."""
    from vft.cli import build_parser

    for argv in (["tokenize", "v.mp4", "--out", "t"], ["detokenize", "t", "--out", "v.mp4"],
                 ["reconstruct", "v.mp4", "--out", "r"], ["demo"], ["train-router", "--out", "r"]):
        assert build_parser().parse_args(argv).checkpoint == "tiny", argv
    clip = str(tmp_path / "clip.mp4")
    write_video(clip, synthetic_video(11, 8, 32, 32), fps=8)
    tok = str(tmp_path / "tokens.safetensors")
    assert main(["tokenize", clip, "--out", tok]) == 0
    tokens = load_file(tok)["tokens"]
    model = load_pretrained("tiny")
    video, _ = read_video(clip)
    assert torch.equal(tokens, model.tokenize(to_model_range(video)[None]))  # the shipped model's tokens
    out = str(tmp_path / "decoded.mp4")
    assert main(["detokenize", tok, "--checkpoint", "tiny", "--out", out, "--steps", "1", "--keep", "2"]) == 0
    assert read_video(out)[0].shape == (8, 32, 32, 3)
    err = _err(capsys, ["tokenize", clip, "--checkpoint", "no_such_model", "--out", tok])
    assert "'no_such_model' is neither a shipped model (tiny) nor a checkpoint folder" in err, err
    _, _, ck = trained  # a folder still works, and a micro checkpoint's tokens are not the tiny model's
    assert "made by config 'tiny'" in _err(capsys, ["detokenize", tok, "--checkpoint", ck, "--out", out])


def test_export_writes_the_folder_it_is_given_and_nothing_into_the_package(trained, tmp_path, capsys):
    """`vft export` (vft.pretrained.export) writes a loadable model folder where it is told,
    and never into the installed package (site-packages may be read-only)."""
    import vft.pretrained as vp

    _, clip, ck = trained
    package = os.path.join(os.path.dirname(os.path.abspath(vp.__file__)), "pretrained")

    def snapshot():
        return sorted((os.path.relpath(os.path.join(d, f), package), os.stat(os.path.join(d, f)).st_mtime_ns)
                      for d, _, files in os.walk(package) for f in files)

    before = snapshot()
    out = str(tmp_path / "exported")
    assert main(["export", ck, "--out", out, "--name", "micro_test", "--command", "vft train ...",
                 "--calibration-clips", "16"]) == 0
    assert snapshot() == before
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "train_log.csv"]
    info = json.load(open(os.path.join(out, "config.json")))
    assert info["provenance"]["command"] == "vft train ..." and info["model"]["name"] == "micro"
    model = vp.load_model(out)
    assert model.cfg.name == "micro" and not model.training
    tok = str(tmp_path / "t.safetensors")  # the folder is a --checkpoint
    assert main(["tokenize", clip, "--checkpoint", out, "--out", tok]) == 0
    assert "calibration_clips must be a positive multiple of 16" in _err(
        capsys, ["export", ck, "--out", out, "--command", "x", "--calibration-clips", "10"])


def test_train_router_command(trained, tmp_path, capsys):
    """`vft train-router` trains a router for one decoding setting, saves it under
    OUT/routers/<setting>/ with per-target margins calibrated on held-out groups, caches the
    labels (a rerun decodes nothing) and reloads; `vft info --checkpoint tiny` reads a shipped model."""
    import vft.router as vr
    from vft.pretrained import load_router

    _, _, ck = trained
    out, cache = str(tmp_path / "router"), str(tmp_path / "cache")
    assert main(["train-router", "--checkpoint", ck, "--per-kind", "2", "--train-steps", "5", "--out", out,
                 "--no-progress", "--backend", "reference", "--cache", cache]) == 0
    assert "5 training clips" in capsys.readouterr().out
    folder = os.path.join(out, "routers", "steps1_none")
    info = json.load(open(os.path.join(folder, "router.json")))
    assert info["kinds"] == ["static", "slow", "fast", "cluttered", "cut"]
    assert info["command"].startswith("vft train-router --checkpoint") and info["validation_clips"] == 5
    assert info["calibration"]["coverage"] == 0.9 and len(info["calibration"]["margins"]) == 29
    assert {"mean", "p95", "max"} <= set(info["val_error_db"])
    real = str(tmp_path / "router_real")
    assert main(["train-router", "--checkpoint", ck, "--per-kind", "2", "--train-steps", "5", "--out", real,
                 "--no-progress", "--real", "--steps", "2", "--guidance", "apg"]) == 0
    assert "7 training clips" in capsys.readouterr().out  # 7 kinds, one group for calibration
    r2 = load_router(real, {"steps": 2, "guidance": "apg"})
    assert r2.setting() == {"steps": 2, "guidance": "apg", "scale": 1.5}
    assert json.load(open(os.path.join(real, "routers", "steps2_apg_scale1.5", "router.json")))["kinds"][-2:] == \
        ["photo", "real"]
    router = load_router(out, {"steps": 1, "guidance": "none"})
    assert router.registers == 4 and router.setting() == {"steps": 1, "guidance": "none"}
    real_quality = vr.frame_quality_by_k
    try:  # the labels come from the cache now
        vr.frame_quality_by_k = None
        assert main(["train-router", "--checkpoint", ck, "--per-kind", "2", "--train-steps", "5", "--out", out,
                     "--no-progress", "--cache", cache]) == 0
        ens = str(tmp_path / "router_ens")  # the fit's options reach router.json
        assert main(["train-router", "--checkpoint", ck, "--per-kind", "2", "--train-steps", "5", "--out", ens,
                     "--no-progress", "--cache", cache, "--members", "2", "--context", "clip_mean",
                     "--increment-weight", "1", "--hidden", "8"]) == 0
        info = json.load(open(os.path.join(ens, "routers", "steps1_none", "router.json")))
        assert (info["members"], info["context"], info["hidden"], info["head"]) == (2, "clip_mean", 8, "softplus")
        assert "--increment-weight 1" in info["command"]
    finally:
        vr.frame_quality_by_k = real_quality
    assert "--per-kind must be >= 2" in _err(capsys, ["train-router", "--checkpoint", ck, "--per-kind", "1",
                                                      "--out", out])
    assert main(["info", "--checkpoint", "tiny"]) == 0
    assert "tiny: 8 frames 32x32" in capsys.readouterr().out
