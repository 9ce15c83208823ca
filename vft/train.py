"""Training: rectified flow with nested dropout, AdamW, EMA, DDP, resumable checkpoints.

Per step and sample: flow time ``t = sigmoid(N(mean, std))`` (logit-normal; with
probability ``uniform_t_prob`` ``t ~ U(0, 1)`` instead), noise,
keep count (``pow2``: uniform over {1, 2, 4, ..., R}; ``uniform``: uniform over [1, R];
one per sample, or with the ``_frame`` / ``_mixed`` modes one per latent frame, see
:func:`frame_keeps`),
null condition with probability ``null_prob``, and with probability ``prefix_prob`` a
clean prefix of 1..T'-1 latent frames (so the decoder learns the continuation used for
long videos). All draws come from a generator seeded by (seed, step, rank) and the data
of step s are the clips ``s * world * B + rank * B + i`` (:class:`StepBatchSampler`; loaded
by ``TrainConfig.workers`` DataLoader worker processes), so a resumed run continues
exactly where it stopped.

Launch with ``torchrun --nproc_per_node N -m vft.cli train ...`` for DDP (gloo on CPU,
nccl on GPU).
"""
from __future__ import annotations

import csv
import math
import multiprocessing
import os
import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import ModelConfig, TrainConfig
from .data import MixedVideos, SyntheticVideos, VideoFolder
from .model import VideoFlexTok


def keep_values(registers: int, mode: str) -> torch.Tensor:
    """The keep counts that ``mode`` (a ``TrainConfig.keep_sampling``) samples from (uniformly)."""
    if mode.split("_")[0] == "pow2":
        vals = sorted({min(2 ** i, registers) for i in range(registers.bit_length() + 1)})
        return torch.tensor(vals)
    return torch.arange(1, registers + 1)


def frame_keeps(sample_keep: torch.Tensor, registers: int, frames: int, tcfg: TrainConfig,
                gen: torch.Generator) -> torch.Tensor:
    """Per-latent-frame keep counts int64 [B, frames] of the per-frame modes of
    ``tcfg.keep_sampling``, from a step's per-sample draw ``sample_keep`` [B]: ``*_frame``
    draws every latent frame independently (uniform over ``keep_values``); ``*_mixed`` does
    so for a share ``keep_frame_prob`` of the samples and gives the others their per-sample
    count on every frame (uniform budgets, what most decodes use, stay in the training mix)."""
    vals = keep_values(registers, tcfg.keep_sampling)
    batch = sample_keep.shape[0]
    per_frame = vals[torch.randint(0, len(vals), (batch, frames), generator=gen)]
    if tcfg.keep_sampling.endswith("_frame"):
        return per_frame
    use_frame = torch.rand(batch, 1, generator=gen) < tcfg.keep_frame_prob
    return torch.where(use_frame, per_frame, sample_keep[:, None].expand(batch, frames))


def draw(cfg: ModelConfig, tcfg: TrainConfig, batch: int, gen: torch.Generator) -> dict:
    """The random inputs of one training step (CPU tensors): t, prefix_len, noise, keep ([batch],
    or [batch, T'] in the per-frame modes, see :func:`frame_keeps`), null. The per-frame
    modes draw their keeps after everything else, so a step's other draws (and the
    per-sample keep that ``*_mixed`` uses) are those of the per-sample mode."""
    T = cfg.latent_frames
    C, (h, w) = cfg.compressor.latent_channels, cfg.latent_hw
    u = torch.randn(batch, generator=gen) * tcfg.logit_normal_std + tcfg.logit_normal_mean
    uniform = torch.rand(batch, generator=gen)
    use_uniform = torch.rand(batch, generator=gen) < tcfg.uniform_t_prob
    vals = keep_values(cfg.registers, tcfg.keep_sampling)
    with_prefix = torch.rand(batch, generator=gen) < tcfg.prefix_prob
    prefix = torch.randint(1, max(T, 2), (batch,), generator=gen) if T > 1 else torch.zeros(batch, dtype=torch.long)
    out = dict(
        t=torch.where(use_uniform, uniform, torch.sigmoid(u)),
        prefix_len=torch.where(with_prefix, prefix, 0),
        noise=torch.randn((batch, C, T, h, w), generator=gen),
        keep=vals[torch.randint(0, len(vals), (batch,), generator=gen)],
        null=torch.rand(batch, generator=gen) < tcfg.null_prob,
    )
    if "_" in tcfg.keep_sampling:
        out["keep"] = frame_keeps(out["keep"], cfg.registers, T, tcfg, gen)
    return out


LOG_COLUMNS = ["step", "loss", "lr", "grad_norm", "clips_per_s", "elapsed_s", "distinct_tokens", "perplexity",
               "z_mean", "z_std", "loss_shuffled", "reliance"]
TELEMETRY_COLUMNS = LOG_COLUMNS[6:]


class CollapseWarning(UserWarning):
    """Training telemetry says the tokenizer is collapsing (few distinct tokens)."""


class Telemetry:
    """Per logging window: token histogram (distinct tokens, perplexity), mean / std of the
    FSQ input z, and the decoder's reliance on the tokens: ``loss_shuffled / loss - 1``,
    where loss_shuffled is the velocity loss with the codes rolled across the batch
    (measured on the window's last step; ~0 when the decoder ignores its tokens)."""

    def __init__(self, codebook: int, device):
        self.hist = torch.zeros(codebook, dtype=torch.float64, device=device)
        self.moments = torch.zeros(5, dtype=torch.float64, device=device)  # n, sum z, sum z^2, loss, shuffled

    def add(self, stats: dict, loss: torch.Tensor) -> None:
        tok = stats["tokens"].reshape(-1).long()
        self.hist += torch.bincount(tok[tok >= 0], minlength=self.hist.numel()).to(self.hist)
        z = stats["z"].double()
        self.moments[:3] += torch.stack([torch.tensor(float(z.numel()), dtype=torch.float64, device=z.device),
                                         z.sum(), z.square().sum()])
        if "shuffled_loss" in stats:
            self.moments[3] = float(stats.get("flow_loss", loss).detach())
            self.moments[4] = float(stats["shuffled_loss"])

    def summary(self, world: int = 1) -> dict:
        hist, m = self.hist.clone(), self.moments.clone()
        if world > 1:
            dist.all_reduce(hist)
            dist.all_reduce(m)
            m[3:] /= world
        p = hist / hist.sum().clamp(min=1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        n = float(m[0]) or 1.0
        mean = float(m[1]) / n
        var = max(float(m[2]) / n - mean * mean, 0.0)
        return {"distinct_tokens": float((hist > 0).sum()), "perplexity": float(entropy.exp()),
                "tokens_seen": float(hist.sum()), "z_mean": mean, "z_std": math.sqrt(var),
                "loss_shuffled": float(m[4]), "reliance": float(m[4] / m[3] - 1) if m[3] > 0 else float("nan")}


def collapse_warning(tele: dict, codebook: int) -> str:
    """A message when the window's token usage has collapsed, else ''."""
    floor = max(2.0, 0.02 * min(codebook, tele["tokens_seen"]))
    if tele["distinct_tokens"] < floor:
        return (f"codebook usage collapsed: {tele['distinct_tokens']:.0f} distinct tokens (perplexity "
                f"{tele['perplexity']:.1f}) of {codebook} in the last {tele['tokens_seen']:.0f} tokens "
                f"(floor {floor:.0f}); FSQ input z mean {tele['z_mean']:+.2f}, std {tele['z_std']:.2f}")
    return ""


def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    span = max(1, tcfg.steps - tcfg.warmup_steps)
    progress = min(1.0, (step - tcfg.warmup_steps) / span)
    return tcfg.lr * (tcfg.min_lr_ratio + (1 - tcfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices of linear layers only (not norms, biases, tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_embedding = name.endswith(("registers", "register_pos", "null_token", "mask_token"))
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tcfg.lr, betas=tcfg.betas)


class StepBatchSampler(torch.utils.data.Sampler):
    """The clip indices of training steps ``start .. stop - 1`` on ``rank`` of ``world``: step s
    takes clips ``(s * world + rank) * batch_size + i`` for i < batch_size, so the batches
    depend only on the step (a resumed run continues with exactly the batches it would
    have had) and the ranks split every step's ``world * batch_size`` clips."""

    def __init__(self, batch_size: int, start: int, stop: int, rank: int = 0, world: int = 1):
        if batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world, got {batch_size}, {rank}, {world}")
        self.batch_size, self.start, self.stop, self.rank, self.world = batch_size, start, stop, rank, world

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            base = (step * self.world + self.rank) * self.batch_size
            yield list(range(base, base + self.batch_size))


LOADER_TIMEOUT_S = 600.0  # seconds one batch may take in a worker before the loader raises


def make_loader(data, tcfg: TrainConfig, start: int, stop: Optional[int] = None, rank: int = 0, world: int = 1,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Batches [B, 3, T, H, W] of steps ``start .. stop - 1`` (default: to ``tcfg.steps``),
    loaded by ``tcfg.workers`` worker processes (0: on the calling thread). Every dataset
    here draws its randomness from generators seeded by the clip index, so the batches are
    the same with any number of workers; the loader's own seed (worker base seeds) comes
    from ``tcfg.seed``, not from the global RNG, which training does not disturb."""
    sampler = StepBatchSampler(tcfg.batch_size, start, tcfg.steps if stop is None else stop, rank, world)
    workers = {}
    if tcfg.workers > 0:
        # Workers start from a clean single-threaded server process, never by fork() of this
        # one: by the time training starts, this process runs OpenMP, PyAV and (after
        # torch.compile) inductor threads, and a child forked while one of them holds a lock
        # can deadlock. A worker that stops answering is an error after LOADER_TIMEOUT_S.
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        workers = dict(multiprocessing_context=multiprocessing.get_context(method), timeout=LOADER_TIMEOUT_S)
    return torch.utils.data.DataLoader(
        data, batch_sampler=sampler, num_workers=tcfg.workers, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(tcfg.seed * 1_000_003 + rank), **workers)


def make_dataset(cfg: ModelConfig, tcfg: TrainConfig):
    if tcfg.data == "synthetic":
        return SyntheticVideos(cfg.frames, cfg.height, cfg.width, seed=tcfg.seed)
    if tcfg.data == "mixed":
        return MixedVideos(cfg.frames, cfg.height, cfg.width, weights=tcfg.data_mix, seed=tcfg.seed)
    return VideoFolder(tcfg.data, cfg.frames, cfg.height, cfg.width, fps=tcfg.data_fps or None,
                       length=1 << 30, seed=tcfg.seed)


def _distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def param_checksum(model: torch.nn.Module) -> float:
    """A float64 fingerprint of all weights (equal across DDP ranks when in sync)."""
    with torch.no_grad():
        return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(model.parameters())))


def train(cfg: ModelConfig, tcfg: TrainConfig, out: str, resume: bool = False, progress: bool = True,
          init_from: Optional[str] = None, max_seconds: Optional[float] = None) -> dict:
    """Train ``cfg`` with ``tcfg`` and write checkpoints to ``out`` (see vft.checkpoint).

    resume: continue from the checkpoint in ``out`` (its model config must equal ``cfg``).
    max_seconds: stop (and checkpoint) after the first step that ends past this wall time
    (rank 0's clock decides, so DDP ranks stop together).
    Returns {"step", "loss", "checksums"} (loss: mean of the last logging interval)."""
    rank, world, device = _distributed()
    torch.manual_seed(tcfg.seed)  # same initial weights on every rank
    model = VideoFlexTok(cfg).to(device)
    opt = make_optimizer(model, tcfg)
    start = 0
    if os.path.isdir(out):
        ckpt.recover(out)  # finish or discard an interrupted save
    if resume and os.path.isfile(os.path.join(out, "state.json")):
        saved_world = int(ckpt.read_state(out).get("world_size", 1))
        if saved_world != world:
            raise ckpt.CheckpointError(
                f"checkpoint {out} was written by a run with world size {saved_world}, resuming with {world}: the "
                f"data order (clips (step * world + rank) * batch + i) and the per-rank random draws depend on it, "
                f"so the run would not continue where it stopped. Resume with WORLD_SIZE={saved_world}, or start a "
                f"new run from these weights with --init {out}")
        ckpt.load_weights(out, model, use_ema=False)
        ckpt.load_optimizer(out, opt)
        start = ckpt.read_state(out)["step"]
    elif init_from:
        ckpt.load_weights(init_from, model, use_ema=True)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    if resume and os.path.isfile(os.path.join(out, "ema.safetensors")):
        from safetensors.torch import load_file
        ema = {k: v.to(device) for k, v in load_file(os.path.join(out, "ema.safetensors")).items()}
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    data = make_dataset(cfg, tcfg)
    log_path = os.path.join(out, "log.csv")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        new_log = not (resume and os.path.isfile(log_path))
        log_file = open(log_path, "w" if new_log else "a", newline="")
        log = csv.writer(log_file)
        if new_log:
            log.writerow(LOG_COLUMNS)
    bar = tqdm(total=tcfg.steps, initial=start, desc="train", disable=not (progress and rank == 0))
    B = tcfg.batch_size
    loss_sum, n_loss, last_loss, t_log, t0 = 0.0, 0, float("nan"), time.time(), time.time()
    window = Telemetry(cfg.codebook_size, device)
    model.train()
    done = start
    pin = device.type == "cuda"
    batches = iter(make_loader(data, tcfg, start, tcfg.steps, rank, world, pin_memory=pin)) \
        if tcfg.steps > start else iter(())
    for step in range(start, tcfg.steps):
        video = next(batches).to(device, non_blocking=pin)  # clips (step * world + rank) * B + i
        gen = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + step * 1009 + rank)
        inputs = {k: v.to(device) for k, v in draw(cfg, tcfg, B, gen).items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tcfg)
        log_step = (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.bf16):
            loss, stats = ddp(video, **inputs, return_stats=True, shuffled_loss=log_step, loss_t_min=tcfg.loss_t_min,
                                linear_loss=tcfg.linear_loss)
        window.add(stats, loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip))
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].lerp_(v.float(), 1 - tcfg.ema_decay)
        loss_sum += float(loss.detach())
        n_loss += 1
        bar.update(1)
        done = step + 1
        if log_step:
            totals = torch.tensor([loss_sum, n_loss], dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(totals)
            last_loss = float(totals[0] / totals[1])
            tele = window.summary(world)
            now = time.time()
            if rank == 0:
                rate = n_loss * B * world / max(now - t_log, 1e-9)
                log.writerow([done, f"{last_loss:.6f}", f"{lr_at(step, tcfg):.3e}", f"{grad_norm:.4f}",
                              f"{rate:.2f}", f"{now - t0:.1f}"] + [f"{tele[k]:.4g}" for k in TELEMETRY_COLUMNS])
                log_file.flush()
                bar.set_postfix(loss=f"{last_loss:.4f}", tok=f"{tele['distinct_tokens']:.0f}",
                                ppl=f"{tele['perplexity']:.0f}", rely=f"{tele['reliance']:.2f}",
                                z=f"{tele['z_mean']:+.2f}/{tele['z_std']:.2f}", clips_s=f"{rate:.1f}")
                warning = collapse_warning(tele, cfg.codebook_size)
                if warning:
                    msg = f"step {done}: {warning}"
                    bar.write("WARNING: " + msg)
                    warnings.warn(msg, CollapseWarning, stacklevel=2)
            loss_sum, n_loss, t_log = 0.0, 0, now
            window = Telemetry(cfg.codebook_size, device)
        stop = torch.tensor([max_seconds is not None and time.time() - t0 > max_seconds], device=device)
        if world > 1:
            dist.broadcast(stop, 0)
        if done % tcfg.ckpt_every == 0 or done == tcfg.steps or bool(stop):
            _save(out, model, cfg, tcfg, done, opt, ema, rank, world)
        if bool(stop):
            break
    del batches  # stops the loader's worker processes
    bar.close()
    checksums = _gather_checksums(model, world, device)
    if rank == 0:
        log_file.close()
        state = ckpt.read_state(out) if os.path.isfile(os.path.join(out, "state.json")) else {"step": start}
        state.update(rank_checksums=checksums, ranks_in_sync=len(set(checksums)) == 1)
        ckpt._atomic_json(os.path.join(out, "state.json"), state)
    if world > 1:
        dist.barrier()
    return {"step": done if tcfg.steps > start else start, "loss": last_loss, "checksums": checksums}


@torch.no_grad()
def recalibrate_fsq_norm(model: VideoFlexTok, clips) -> None:
    """Set the FSQ input norm's running statistics to the exact mean / variance of the
    encoder's features over ``clips`` (an iterable of video batches [B, 3, T, H, W]), e.g.
    after loading EMA weights, whose averaged running statistics only approximate them."""
    norm = model.encoder.fsq_norm
    if norm is None:
        return
    zs = [model.encoder.raw_z(model.compressor.encode(v)).reshape(-1, model.cfg.fsq_dim) for v in clips]
    z = torch.cat(zs).double()
    norm.running_mean.copy_(z.mean(0))
    norm.running_var.copy_(z.var(0))


def _save(out, model, cfg, tcfg, step, opt, ema, rank, world):
    if rank == 0:
        ckpt.save(out, model, cfg, tcfg, step, opt, ema, {"world_size": world})
    if world > 1:
        dist.barrier()


def _gather_checksums(model, world, device) -> list[float]:
    mine = param_checksum(model)
    if world == 1:
        return [mine]
    t = torch.tensor([mine], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [float(x) for x in out]
