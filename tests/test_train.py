"""Training: loss goes down, keep sampling, checkpoints round trip / resume exactly, a
different config is refused, bf16 autocast, and a 2-process torchrun (gloo) run stays
in sync."""
import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vft import checkpoint as ckpt
from vft.config import preset, tiny_train_config
from vft.data import SyntheticVideos
from vft.model import VideoFlexTok
from vft.train import LOG_COLUMNS, collapse_warning, draw, keep_values, lr_at, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tcfg(**kw):
    base = dict(steps=4, batch_size=2, lr=3e-3, warmup_steps=1, log_every=1, ckpt_every=100, ema_decay=0.9)
    base.update(kw)
    return tiny_train_config(**base)


def _fixed_loss(model, cfg, tcfg):
    """Loss on a fixed batch with fixed random draws (so before/after compare fairly)."""
    data = SyntheticVideos(cfg.frames, cfg.height, cfg.width, seed=123)
    video = torch.stack([data[i] for i in range(8)])
    inputs = draw(cfg, tcfg, 8, torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float(model(video, **inputs, loss_t_min=tcfg.loss_t_min))


def test_keep_sampling_values():
    assert keep_values(8, "pow2").tolist() == [1, 2, 4, 8]
    assert keep_values(6, "pow2").tolist() == [1, 2, 4, 6]
    assert keep_values(5, "uniform").tolist() == [1, 2, 3, 4, 5]
    cfg = preset("micro")
    d = draw(cfg, _tcfg(keep_sampling="uniform"), 64, torch.Generator().manual_seed(0))
    assert set(d["keep"].tolist()) == {1, 2, 3, 4}
    assert ((d["t"] > 0) & (d["t"] < 1)).all()
    assert d["null"].any() and not d["null"].all()
    assert (d["prefix_len"] < cfg.latent_frames).all() and (d["prefix_len"] > 0).any()


def test_per_frame_keep_sampling_varies_across_frames_and_is_seeded():
    cfg = preset("micro")
    T, R = cfg.latent_frames, cfg.registers

    def keeps(mode, seed=0, **kw):
        return draw(cfg, _tcfg(keep_sampling=mode, **kw), 256, torch.Generator().manual_seed(seed))

    per_sample, per_frame = keeps("uniform"), keeps("uniform_frame")
    assert per_sample["keep"].shape == (256,) and per_frame["keep"].shape == (256, T)
    assert set(per_frame["keep"].unique().tolist()) == set(range(1, R + 1))
    varied = (per_frame["keep"] != per_frame["keep"][:, :1]).any(1)  # samples whose frames differ
    assert varied.float().mean() > 0.9  # independent draws: 1 - 4 / 4^4 of the samples differ
    for k in ("t", "prefix_len", "noise", "null"):  # per-frame keeps are drawn last: the rest is unchanged
        assert torch.equal(per_sample[k], per_frame[k]), k
    again = keeps("uniform_frame")
    assert all(torch.equal(per_frame[k], again[k]) for k in per_frame)  # a seed gives the same draws
    assert not torch.equal(per_frame["keep"], keeps("uniform_frame", seed=1)["keep"])
    pow2 = keeps("pow2_frame")["keep"]
    assert set(pow2.unique().tolist()) == set(keep_values(R, "pow2").tolist())
    mixed = keeps("pow2_mixed", keep_frame_prob=0.5)["keep"]
    share = float((mixed != mixed[:, :1]).any(1).float().mean())
    assert 0.35 < share < 0.62, share  # half per frame (of which 1 - 3 / 3^4 differ), half one keep per sample
    constant = keeps("uniform_mixed", keep_frame_prob=0.0)["keep"]
    assert constant.shape == (256, T) and torch.equal(constant[:, 0], per_sample["keep"])  # the per-sample draws
    assert bool((constant == constant[:, :1]).all())
    with pytest.raises(ValueError, match="keep_sampling must be one of"):
        _tcfg(keep_sampling="frame")
    with pytest.raises(ValueError, match="keep_frame_prob must be in"):
        _tcfg(keep_sampling="pow2_mixed", keep_frame_prob=1.5)


def test_training_passes_a_keep_per_frame_and_is_deterministic(tmp_path, monkeypatch):
    cfg = preset("micro")
    seen = []
    real_forward = VideoFlexTok.forward

    def spy(self, video, *args, keep, **kw):
        seen.append(keep.clone())
        return real_forward(self, video, *args, keep=keep, **kw)

    monkeypatch.setattr(VideoFlexTok, "forward", spy)
    runs = [train(cfg, _tcfg(steps=3, keep_sampling="uniform_frame"), str(tmp_path / n), progress=False)
            for n in ("a", "b")]
    assert runs[0]["checksums"] == runs[1]["checksums"]
    steps = seen[:3]
    assert all(k.shape == (2, cfg.latent_frames) for k in steps)
    assert any(bool((k != k[:, :1]).any()) for k in steps)
    assert all(torch.equal(a, b) for a, b in zip(seen[:3], seen[3:6]))


def test_lr_schedule():
    t = _tcfg(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(99, t) == pytest.approx(0.1, abs=1e-3)


def test_training_reduces_loss(tmp_path):
    cfg = preset("micro")
    tcfg = _tcfg(steps=60, batch_size=4, prefix_prob=0.0)
    torch.manual_seed(tcfg.seed)
    before = _fixed_loss(VideoFlexTok(cfg), cfg, tcfg)
    train(cfg, tcfg, str(tmp_path), progress=False)
    model = VideoFlexTok(cfg)
    ckpt.load_weights(str(tmp_path), model, use_ema=False)
    after = _fixed_loss(model, cfg, tcfg)
    assert after < 0.95 * before, (before, after)  # x-prediction starts at the mean-image loss, not ~1.3
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].split(",") == LOG_COLUMNS
    assert len(rows) == 61


def test_training_makes_tokens_informative(tmp_path):
    """Issue #10: a short micro run (fixed seed) must give tokens the decoder relies on and
    that use the codebook. On the old training (FSQ input not normalised, flow times
    logit-normal(0, 1)) the decoder ignored its tokens: held-out loss with shuffled codes
    was within 3 % of the loss with the true codes (0.666 vs 0.651)."""
    cfg = preset("micro")
    tcfg = _tcfg(steps=300, batch_size=8, warmup_steps=20, lr=2e-3, log_every=25, prefix_prob=0.0)
    train(cfg, tcfg, str(tmp_path), progress=False)
    model = VideoFlexTok(cfg)
    ckpt.load_weights(str(tmp_path), model, use_ema=False)
    data = SyntheticVideos(cfg.frames, cfg.height, cfg.width, seed=10 ** 6)  # held-out seeds
    video = torch.stack([data[i] for i in range(16)])
    inputs = draw(cfg, tcfg, 16, torch.Generator().manual_seed(1))
    inputs["null"][:] = False
    with torch.no_grad():
        model.train()
        loss, stats = model(video, **inputs, return_stats=True, shuffled_loss=True, loss_t_min=tcfg.loss_t_min)
        tokens = model.eval().tokenize(video)
    assert float(stats["shuffled_loss"]) > 1.25 * float(loss), (float(loss), float(stats["shuffled_loss"]))
    # 256 held-out tokens: at least 30 distinct codes (the collapsed model had 1)
    assert tokens.unique().numel() >= 30, tokens.unique().numel()
    log = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert all(float(r["distinct_tokens"]) >= 20 for r in log)  # no window collapsed
    assert abs(float(log[-1]["z_mean"])) < 0.1 and abs(float(log[-1]["z_std"]) - 1) < 0.1  # FSQ input normalised
    assert max(float(r["reliance"]) for r in log[-4:]) > 0.2


def test_collapse_warning():
    tele = {"distinct_tokens": 1.0, "perplexity": 1.0, "tokens_seen": 6400.0, "z_mean": -3.5, "z_std": 0.5}
    assert "collapsed: 1 distinct tokens" in collapse_warning(tele, 1000)
    assert collapse_warning(dict(tele, distinct_tokens=400.0, perplexity=200.0), 1000) == ""


def test_bf16_autocast_step(tmp_path):
    res = train(preset("micro"), _tcfg(steps=2, bf16=True), str(tmp_path), progress=False)
    assert torch.isfinite(torch.tensor(res["loss"]))


@pytest.mark.parametrize("keep_sampling", ["pow2", "pow2_mixed"])
def test_checkpoint_resume_is_exact(tmp_path, keep_sampling):
    cfg = preset("micro")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(cfg, _tcfg(steps=4, keep_sampling=keep_sampling), str(straight), progress=False)
    train(cfg, _tcfg(steps=2, keep_sampling=keep_sampling), str(split), progress=False)
    assert ckpt.read_state(str(split))["step"] == 2
    train(cfg, _tcfg(steps=4, keep_sampling=keep_sampling), str(split), resume=True, progress=False)
    assert ckpt.read_state(str(split))["step"] == 4
    for name in ("model", "ema", "optimizer"):
        a = load_file(str(straight / f"{name}.safetensors"))
        b = load_file(str(split / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=f"{name}:{k}")
    assert json.loads((split / "optimizer.json").read_text()) == json.loads((straight / "optimizer.json").read_text())
    # the resumed log continues the first one
    assert len((split / "log.csv").read_text().splitlines()) == 5
    # load_model gives the EMA weights
    m = ckpt.load_model(str(split))
    ema = load_file(str(split / "ema.safetensors"))
    torch.testing.assert_close(m.state_dict()["decoder.head.weight"], ema["decoder.head.weight"])


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_checkpoint_is_atomic_as_a_set(tmp_path, monkeypatch):
    """A crash while a save writes its files leaves the previous checkpoint whole; a crash
    while it moves them into place is finished by the next read (weights, optimizer, EMA and
    step always come from one save)."""
    cfg, out = preset("micro"), str(tmp_path / "run")
    train(cfg, _tcfg(steps=2, ckpt_every=2), out, progress=False)
    old = _weights(out)
    model = VideoFlexTok(cfg)  # different weights than the trained ones
    real_save = ckpt.save_file
    calls = []

    def failing_save(tensors, filename, *a, **k):  # dies on the second file of the set
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(OSError, match="injected"):
        ckpt.save(out, model, cfg, _tcfg(), step=99, optimizer=opt, ema=dict(model.state_dict()))
    monkeypatch.setattr(ckpt, "save_file", real_save)
    assert ckpt.read_state(out)["step"] == 2  # the old set, whole
    for k, v in _weights(out).items():
        assert torch.equal(v, old[k]), k
    assert not os.path.exists(os.path.join(out, ckpt.INCOMING))

    # Crash while moving the new set in: the first os.replace lands, then the process dies.
    real_replace, moved = os.replace, []

    def dying_replace(src, dst):
        if ckpt.INCOMING in str(src) and ckpt.INCOMING not in str(dst):  # moving the set into place
            if moved:
                raise KeyboardInterrupt("killed (injected)")
            moved.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(out, model, cfg, _tcfg(), step=99, optimizer=opt, ema=dict(model.state_dict()))
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert os.path.isdir(os.path.join(out, ckpt.INCOMING))  # a half-moved set on disk
    assert ckpt.read_state(out)["step"] == 99  # the read finished the move
    new = model.state_dict()
    for k, v in _weights(out).items():
        assert torch.equal(v, new[k]), k
    ema = load_file(os.path.join(out, "ema.safetensors"))
    assert torch.equal(ema["decoder.head.weight"], new["decoder.head.weight"])


def test_resume_with_another_world_size_is_refused(tmp_path):
    cfg, out = preset("micro"), str(tmp_path / "run")
    train(cfg, _tcfg(steps=2, ckpt_every=2), out, progress=False)
    state = ckpt.read_state(out)
    state["world_size"] = 2
    (tmp_path / "run" / "state.json").write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match="world size 2, resuming with 1"):
        train(cfg, _tcfg(steps=4), out, resume=True, progress=False)


def test_checkpoint_from_other_config_is_refused(tmp_path):
    cfg = preset("micro")
    train(cfg, _tcfg(steps=1), str(tmp_path), progress=False)
    other = cfg.replace(**{"decoder.depth": 2, "registers": 2})
    with pytest.raises(ckpt.CheckpointError, match="decoder.depth: checkpoint 1 vs requested 2"):
        ckpt.load_weights(str(tmp_path), VideoFlexTok(other))
    with pytest.raises(ckpt.CheckpointError, match="registers"):
        train(other, _tcfg(steps=2), str(tmp_path), resume=True, progress=False)
    with pytest.raises(ckpt.CheckpointError, match="not a vft checkpoint"):
        ckpt.load_model(str(tmp_path / "missing"))
    # pickle is never used
    assert not any(f.endswith((".pt", ".pth", ".pkl", ".bin")) for f in os.listdir(tmp_path))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_stay_in_sync(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "vft.cli", "train", "--preset", "micro", "--out", str(out),
           "--steps", "3", "--batch-size", "1", "--log-every", "1", "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    state = json.loads((out / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    assert len(state["rank_checksums"]) == 2
    assert state["rank_checksums"][0] == state["rank_checksums"][1]
    assert state["ranks_in_sync"] is True
    # the two ranks trained on different clips: the result differs from one process alone
    single = tmp_path / "single"
    train(preset("micro"), tiny_train_config(steps=3, batch_size=1, log_every=1), str(single), progress=False)
    assert ckpt.read_state(str(single))["rank_checksums"][0] != state["rank_checksums"][0]


def test_recalibrate_fsq_norm_sets_exact_statistics():
    from vft.train import recalibrate_fsq_norm

    cfg = preset("micro")
    model = VideoFlexTok(cfg)
    data = SyntheticVideos(cfg.frames, cfg.height, cfg.width, seed=5)
    batches = [torch.stack([data[i + j] for j in range(4)]) for i in (0, 4)]
    recalibrate_fsq_norm(model, batches)
    with torch.no_grad():
        z = torch.cat([model.encoder.raw_z(model.compressor.encode(b)).reshape(-1, cfg.fsq_dim) for b in batches])
    torch.testing.assert_close(model.encoder.fsq_norm.running_mean, z.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.encoder.fsq_norm.running_var, z.var(0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------
# Data loading: DataLoader batches (0 / 2 worker processes) = the main-thread loop


def _gop_mp4_folder(folder, files=3, frames=40, gop=8):
    """Small H.264 mp4s (keyframe every ``gop`` frames, B-frames) of different sizes."""
    import av

    from vft.data import synthetic_video

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        clip = synthetic_video(50 + k, frames + 8 * k, 24 + 8 * k, 40)
        with av.open(str(folder / f"v{k}.mp4"), mode="w") as c:
            s = c.add_stream("libx264", rate=8)
            s.width, s.height, s.pix_fmt = 40, 24 + 8 * k, "yuv420p"
            s.options = {"crf": "18", "g": str(gop), "keyint_min": str(gop)}
            for f in clip.numpy():
                for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    return str(folder)


def _old_batches(data, B, start, stop, rank=0, world=1):
    """The training loop's data before the DataLoader: one clip after the other."""
    return [torch.stack([data[(step * world + rank) * B + i] for i in range(B)]) for step in range(start, stop)]


def test_step_batch_sampler_indices():
    from vft.train import StepBatchSampler

    s = StepBatchSampler(3, start=2, stop=5, rank=1, world=2)
    assert len(s) == 3
    assert list(s) == [[15, 16, 17], [21, 22, 23], [27, 28, 29]]  # (step * 2 + 1) * 3 + i
    assert list(StepBatchSampler(2, 0, 2)) == [[0, 1], [2, 3]]
    assert list(StepBatchSampler(2, 4, 4)) == []
    with pytest.raises(ValueError, match="rank"):
        StepBatchSampler(2, 0, 2, rank=2, world=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_equal_main_thread_loop(tmp_path, workers):
    """make_loader's batches are bitwise the old loop's, for the synthetic, mixed and
    video-folder datasets (seeking decode, resampled to 6 fps), from a resume step, on
    rank 1 of 2."""
    from vft.data import MixedVideos, VideoFolder
    from vft.train import make_loader

    folder = _gop_mp4_folder(tmp_path / "videos")
    tcfg = _tcfg(batch_size=3, workers=workers, seed=4)
    datasets = [
        (SyntheticVideos(4, 16, 16, seed=4), SyntheticVideos(4, 16, 16, seed=4)),
        (MixedVideos(4, 16, 16, weights=(0.4, 0.4, 0.2), seed=4),
         MixedVideos(4, 16, 16, weights=(0.4, 0.4, 0.2), seed=4)),
        (VideoFolder(folder, 4, 16, 16, fps=6, length=1 << 30, seed=4),
         VideoFolder(folder, 4, 16, 16, fps=6, length=1 << 30, seed=4, seek=False)),  # the old full decode
    ]
    for new, old in datasets:
        for start, stop, rank, world in ((0, 3, 0, 1), (5, 8, 1, 2)):
            got = list(make_loader(new, tcfg, start, stop, rank, world))
            want = _old_batches(old, 3, start, stop, rank, world)
            assert len(got) == len(want) == stop - start
            for step, (a, b) in enumerate(zip(got, want), start):
                assert a.dtype == b.dtype and torch.equal(a, b), (type(new).__name__, step, rank)
    used = [i for start, stop, rank, world in ((0, 3, 0, 1), (5, 8, 1, 2)) for step in range(start, stop)
            for i in range((step * world + rank) * 3, (step * world + rank) * 3 + 3)]
    assert {datasets[1][0].source(i) for i in used} == {"synthetic", "photo", "real"}  # all three sources ran


def test_training_batches_with_workers_are_the_old_ones(tmp_path, monkeypatch):
    """train() on a folder of mp4s: the clips the model sees at every step, and the weights
    it ends with, are the same with 0 and 2 loader workers and equal the old loop's (full
    decode, main thread), also when the run is resumed."""
    import vft.train as train_mod
    from vft.data import VideoFolder

    seen = []

    class Recording(VideoFlexTok):
        def forward(self, video, *a, **k):
            seen.append(video.detach().clone())
            return super().forward(video, *a, **k)

    monkeypatch.setattr(train_mod, "VideoFlexTok", Recording)
    cfg = preset("micro")
    folder = _gop_mp4_folder(tmp_path / "videos")
    old = _old_batches(VideoFolder(folder, 4, 16, 16, length=1 << 30, seed=0, seek=False), 2, 0, 4)
    runs = {}
    for workers in (0, 2):
        seen.clear()
        out = str(tmp_path / f"w{workers}")
        train(cfg, _tcfg(steps=4, batch_size=2, data=folder, workers=workers, log_every=2), out, progress=False)
        assert len(seen) == 4
        for step, (a, b) in enumerate(zip(seen, old)):
            assert torch.equal(a, b), (workers, step)
        runs[workers] = _weights(out)
    for k, v in runs[0].items():
        assert torch.equal(v, runs[2][k]), k
    seen.clear()
    out = str(tmp_path / "resumed")
    train(cfg, _tcfg(steps=2, batch_size=2, data=folder, workers=2, log_every=2), out, progress=False)
    train(cfg, _tcfg(steps=4, batch_size=2, data=folder, workers=2, log_every=2), out, resume=True, progress=False)
    assert len(seen) == 4
    for step, (a, b) in enumerate(zip(seen, old)):
        assert torch.equal(a, b), ("resumed", step)


def test_workers_config_and_cli_flag(tmp_path):
    from vft.cli import build_parser
    from vft.config import TrainConfig

    t = TrainConfig(workers=2)
    assert TrainConfig.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    old = t.to_dict()
    del old["workers"]  # checkpoints written before the field existed
    assert TrainConfig.from_dict(old).workers == 0
    with pytest.raises(ValueError, match="workers"):
        TrainConfig(workers=-1)
    args = build_parser().parse_args(["train", "--out", str(tmp_path), "--workers", "3"])
    assert args.workers == 3
    assert build_parser().parse_args(["train", "--out", str(tmp_path)]).workers is None


def test_fine_tune_command_starts_from_init_and_resumes_exactly(tmp_path):
    """The documented fine-tune (docs/training.md): `vft train --init A --resume` starts from
    A's weights in a fresh folder; interrupted (here by --max-seconds 0: one step, then a
    checkpoint) and run again with the same command, it continues to the same weights as an
    uninterrupted run, with the per-frame keep sampling it was started with."""
    from vft.cli import main

    base = str(tmp_path / "base")
    common = ["--preset", "micro", "--batch-size", "2", "--log-every", "1", "--no-progress"]
    assert main(["train", "--out", base, "--steps", "2", "--seed", "1"] + common) == 0  # weights unlike seed 0's
    tune = ["--init", base, "--steps", "3", "--keep-sampling", "pow2_mixed", "--keep-frame-prob", "0.7",
            "--lr", "1e-3", "--resume"] + common
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert main(["train", "--out", straight] + tune) == 0
    assert main(["train", "--out", split, "--max-seconds", "0"] + tune) == 0
    assert ckpt.read_state(split)["step"] == 1
    assert main(["train", "--out", split] + tune) == 0
    assert ckpt.read_state(split)["step"] == 3
    saved = json.loads((tmp_path / "split" / "config.json").read_text())["train"]
    assert saved["keep_sampling"] == "pow2_mixed" and saved["keep_frame_prob"] == 0.7
    a, b, init = _weights(straight), _weights(split), load_file(os.path.join(base, "ema.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    torch.manual_seed(0)  # the weights a run with seed 0 starts from without --init
    fresh = VideoFlexTok(preset("micro")).state_dict()
    start = str(tmp_path / "one")  # one step from the init is closer to it than to seed 0's initial weights
    assert main(["train", "--out", start, "--max-seconds", "0"] + tune) == 0
    one = _weights(start)

    def dist(x):
        return sum(float((one[k] - x[k]).abs().sum()) for k in one if one[k].is_floating_point())

    assert dist(init) < 0.1 * dist(fresh), (dist(init), dist(fresh))
