"""A lightweight token-budget router: predicts, in one pass, each latent frame's
PSNR at every token count K = 1..R, and picks per-frame K from it for a quality target or a
token budget, without the decodes that ``vft.adaptive.search_keep`` runs.

Features per latent frame (cheap, from one tokenization):

* with a linear-path model (``ModelConfig.linear_path``): the PSNR of the linear path's
  reconstruction from the first K codes, for every K (one small matmul per K, no decoder);
* the frame's pixel standard deviation, its mean absolute difference to the previous
  pixel frame (motion; 0 for the first) and its mean absolute spatial gradient (detail).

* from the tokenization: whether it is the first latent frame, and the share of its tokens
  equal to the previous latent frame's (``STATS``; older routers list the ones they use).

A small MLP maps them to R PSNRs, non-decreasing in K by construction (a base plus
cumulative softplus increments). Labels are the PSNR of each latent frame when the clip is
decoded with every frame at K (the decoder's sampling is part of what is learned: a router
is trained for one decoding setting, stored with it). A model ships one router per setting
(``routers/<setting>/``, a ``RouterSet``); ``vft.pretrained.resolve_router`` / ``load_router(name,
sampling)`` give the one for the setting asked for (default: ``DEFAULT_SAMPLING``, what
``vft detokenize`` decodes with) or an error. Margins are calibrated per target on held-out
frames (``calibrate_margins``).

    from vft.pretrained import load_router
    router = load_router("tiny")                       # for 25 APG steps (the default decoding)
    router = load_router("tiny", {"steps": 1, "guidance": "none"})   # for 1-step decoding
    keep = router.keep_for_target(model, video, 16.0)  # [B, T'] smallest K predicted >= 16 dB + margin
    keep = router.keep_for_budget(model, video, 24)    # [B, T'] at most 24 tokens per clip
    keep = router.keep_for_lambda(model, video, 0.2)   # [B, T'] argmax PSNR(K) - 0.2 K per frame

Weights: safetensors + JSON (``save`` / ``load``). ``vft train-router`` trains one for a model.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import vft_kernels as vk

from .adaptive import allocate_budget, frame_quality_by_k, pixel_frames
from .metrics import psnr

STATS = ("std", "motion", "detail", "first", "token_repeat")  # what new routers use
_PIXEL_STATS = ("std", "motion", "detail")

# The decoding setting ``vft detokenize`` (and ``VideoFlexTok.detokenize``) uses by default.
DEFAULT_SAMPLING = {"steps": 25, "guidance": "apg", "scale": 1.5}
# Other detokenize keywords a router's labels assume at these values (seed 0, Euler, no shift).
_FIXED_SAMPLING = {"solver": "euler", "seed": 0, "shift": 1.0}


@torch.no_grad()
def frame_features(model, video: torch.Tensor, tokens: Optional[torch.Tensor] = None,
                   stats=STATS) -> torch.Tensor:
    """Router features [B, T', F] of ``video`` [B, 3, T, H, W] (float32; F = R + len(stats)
    for a linear-path model, else len(stats)). ``stats``, in order, any of: ``std`` (pixel
    standard deviation), ``motion`` (mean |difference| to the previous pixel frame),
    ``detail`` (mean |spatial gradient|), ``first`` (1 for the first latent frame, which
    has no earlier frame to lean on) and ``token_repeat`` (the share of the frame's tokens
    equal to the previous latent frame's, from the encoder's tokens)."""
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(f"router: unknown features {unknown}; known: {list(STATS)}")
    cfg = model.cfg
    if tokens is None:
        tokens = model.tokenize(video)
    B, T = tokens.shape[:2]
    feats = []
    dec = model.decoder
    if getattr(dec, "linear_out", None) is not None:
        codes = vk.fsq_indices_to_codes(tokens, cfg.fsq_levels)
        Hl, Wl = cfg.latent_hw
        lin_q = torch.zeros(B, T, cfg.registers)
        for k in range(1, cfg.registers + 1):
            lat = dec.linear_x0(codes, torch.full((B,), k, dtype=torch.int64, device=tokens.device))
            lat = lat.reshape(B, T, -1, Hl, Wl).transpose(1, 2)  # [B, C, T', H', W']
            rec = model.compressor.decode(lat.to(video.dtype)).clamp(-1, 1)
            for t in range(T):
                f = list(pixel_frames(cfg, t))
                for b in range(B):
                    lin_q[b, t, k - 1] = min(psnr(rec[b][:, f], video[b][:, f]), 60.0)
        feats.append(lin_q)
    pix = torch.zeros(B, T, len(_PIXEL_STATS))
    v = video.float()
    for t in range(T):
        f = list(pixel_frames(cfg, t))
        clip = v[:, :, f]  # [B, 3, tf, H, W]
        prev = torch.cat([v[:, :, f[0] - 1:f[0]], clip[:, :, :-1]], dim=2) if f[0] > 0 else \
            torch.cat([clip[:, :, :1], clip[:, :, :-1]], dim=2)
        pix[:, t, 0] = clip.flatten(1).std(dim=1).cpu()
        pix[:, t, 1] = (clip - prev).abs().flatten(1).mean(dim=1).cpu()
        gx = (clip[..., 1:] - clip[..., :-1]).abs().flatten(1).mean(dim=1)
        gy = (clip[..., 1:, :] - clip[..., :-1, :]).abs().flatten(1).mean(dim=1)
        pix[:, t, 2] = (gx + gy).cpu()
    tok = tokens.cpu()
    first = torch.zeros(B, T)
    first[:, 0] = 1.0
    repeat = torch.zeros(B, T)
    repeat[:, 1:] = (tok[:, 1:] == tok[:, :-1]).float().mean(-1)
    named = {"std": pix[..., 0], "motion": pix[..., 1], "detail": pix[..., 2], "first": first,
             "token_repeat": repeat}
    feats.append(torch.stack([named[s] for s in stats], dim=-1))
    return torch.cat(feats, dim=-1)


def setting(sampling: Optional[dict] = None, **overrides) -> dict:
    """A decoding setting in normal form: {"steps", "guidance"} plus "scale" when guided,
    missing keys from DEFAULT_SAMPLING (the default of ``vft detokenize``)."""
    s = {**DEFAULT_SAMPLING, **(sampling or {}), **{k: v for k, v in overrides.items() if v is not None}}
    out = {"steps": int(s["steps"]), "guidance": str(s["guidance"])}
    if out["guidance"] != "none":
        out["scale"] = float(s["scale"])
    return out


def setting_key(sampling: Optional[dict]) -> str:
    """A folder name for a decoding setting: ``steps1_none``, ``steps25_apg_scale1.5``."""
    s = setting(sampling)
    return f"steps{s['steps']}_{s['guidance']}" + (f"_scale{s['scale']:g}" if "scale" in s else "")


def split_sampling(sampling: dict, who: str = "router") -> dict:
    """The router-relevant part (steps, guidance, scale) of detokenize keywords; the others
    must be at the values a router's labels assume (solver euler, seed 0, shift 1)."""
    unknown = sorted(set(sampling) - set(DEFAULT_SAMPLING) - set(_FIXED_SAMPLING))
    if unknown:
        raise ValueError(f"{who}: unknown decoding keywords {unknown}")
    odd = {k: v for k, v in sampling.items() if k in _FIXED_SAMPLING and v is not None and v != _FIXED_SAMPLING[k]}
    if odd:
        raise ValueError(f"{who}: routers predict quality for {_FIXED_SAMPLING} decodes, got {odd}")
    return {k: v for k, v in sampling.items() if k in DEFAULT_SAMPLING and v is not None}


CONTEXTS = ("none", "clip_mean")  # what a router sees of the clip's other latent frames
# How the MLP's output [..., R] becomes a curve: "softplus" (base + cumulative softplus
# increments; routers before "residual") or "residual" (the running maximum over K of the
# linear path's PSNR feature plus the output: the MLP learns the decoder's difference to the
# linear path; needs a linear-path model's features).
HEADS = ("softplus", "residual")


class KeepRouter(nn.Module):
    """features [..., F] -> predicted PSNR [..., R], non-decreasing in K.

    ``context``: ``"none"`` (each latent frame on its own features; routers before it) or
    ``"clip_mean"`` (also the mean of the normalised features over the clip's latent frames,
    so features must be [..., T', F]: a whole clip). ``members``: an ensemble of that many
    MLPs (seeds) whose curves are averaged (1: one MLP, ``net``; the others are ``extra``).
    ``head``: ``HEADS``; with ``"residual"`` the first R features must be the linear path's
    PSNR at K = 1..R (``frame_features`` of a linear-path model)."""

    def __init__(self, registers: int, features: int, hidden: int = 64, sampling: Optional[dict] = None,
                 stats=_PIXEL_STATS, calibration: Optional[dict] = None, context: str = "none", members: int = 1,
                 head: str = "softplus"):
        super().__init__()
        if context not in CONTEXTS:
            raise ValueError(f"router: unknown context {context!r}; known: {list(CONTEXTS)}")
        if head not in HEADS:
            raise ValueError(f"router: unknown head {head!r}; known: {list(HEADS)}")
        if head == "residual" and features != registers + len(tuple(stats)):
            raise ValueError(f"router: the residual head needs the linear path's PSNR at every K among the features "
                             f"({registers} + {len(tuple(stats))}), got {features} features (a model without a linear path?)")
        if int(members) < 1:
            raise ValueError(f"router: members must be >= 1, got {members}")
        self.registers, self.features, self.hidden = registers, features, hidden
        self.context, self.members, self.head = context, int(members), head
        self.sampling = dict(sampling or {})
        self.stats = tuple(stats)
        # {"coverage": q, "targets": [...], "margins": [...]}: per target PSNR, the margin (dB)
        # with which a fraction q of held-out frames reached it (``calibrate_margins``).
        self.calibration = dict(calibration or {})
        self.net = self._mlp()
        if self.members > 1:
            self.extra = nn.ModuleList(self._mlp() for _ in range(self.members - 1))
        self.register_buffer("feat_mean", torch.zeros(features))
        self.register_buffer("feat_std", torch.ones(features))
        self.register_buffer("margin", torch.zeros(()))  # dB added to a target without a calibration table

    def _mlp(self) -> nn.Module:
        width = self.features * (2 if self.context == "clip_mean" else 1)
        mlp = nn.Sequential(nn.Linear(width, self.hidden), nn.SiLU(), nn.Linear(self.hidden, self.hidden), nn.SiLU(),
                            nn.Linear(self.hidden, self.registers))
        if self.head == "residual":  # start from the linear path's curve itself
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)
        return mlp

    def nets(self) -> list:
        """The ensemble's MLPs (``net`` first)."""
        return [self.net] + (list(self.extra) if self.members > 1 else [])

    def inputs(self, feats: torch.Tensor) -> torch.Tensor:
        """The MLPs' input: normalised features (and with ``clip_mean`` context their mean over
        the clip's latent frames, dimension -2)."""
        x = (feats - self.feat_mean) / self.feat_std
        if self.context == "clip_mean":
            if x.dim() < 2:
                raise ValueError("router: a clip-context router needs features of whole clips [..., T', F]")
            x = torch.cat([x, x.mean(-2, keepdim=True).expand_as(x)], dim=-1)
        return x

    def curve(self, h: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """An MLP output [..., R] as a curve non-decreasing in K (``head``): base + cumulative
        softplus increments, or the running maximum of the linear path's PSNR (``feats``'
        first R) plus the output."""
        if self.head == "residual":
            return torch.cummax(feats[..., :self.registers] + h, dim=-1).values
        return h[..., :1] + torch.cat([torch.zeros_like(h[..., :1]), F.softplus(h[..., 1:]).cumsum(-1)], dim=-1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.inputs(feats)
        curves = [self.curve(net(x), feats) for net in self.nets()]
        return curves[0] if len(curves) == 1 else torch.stack(curves).mean(0)

    def setting(self) -> dict:
        """The decoding setting this router predicts for (normal form of ``sampling``)."""
        return setting(self.sampling)

    def check_setting(self, sampling: Optional[dict] = None) -> dict:
        """The decoding setting asked for (``sampling``'s steps / guidance / scale over
        DEFAULT_SAMPLING); a ValueError when this router was trained for another."""
        want = setting(split_sampling(sampling or {}))
        if want != self.setting():
            raise ValueError(f"router: trained for decoding with {self.setting()}, asked for {want}; give the "
                             "router's setting (e.g. steps/guidance) or a router trained for this one "
                             "(vft train-router --steps ... --guidance ...)")
        return want

    def margin_for(self, target: float) -> float:
        """The margin (dB) added to ``target``: the calibration table's, linearly interpolated
        (its end values outside it), else the scalar ``margin``."""
        cal = self.calibration
        if not cal.get("targets"):
            return float(self.margin)
        ts, ms = cal["targets"], cal["margins"]
        if target <= ts[0]:
            return float(ms[0])
        if target >= ts[-1]:
            return float(ms[-1])
        i = next(i for i in range(1, len(ts)) if ts[i] >= target)
        w = (target - ts[i - 1]) / (ts[i] - ts[i - 1])
        return float(ms[i - 1] + w * (ms[i] - ms[i - 1]))

    @torch.no_grad()
    def predict(self, model, video: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predicted PSNR [B, T', R] for ``video`` (one tokenization, no decoding)."""
        if model.cfg.registers != self.registers:
            raise ValueError(f"router: trained for R = {self.registers} registers, the model has {model.cfg.registers}")
        feats = frame_features(model, video, tokens, self.stats)
        if feats.shape[-1] != self.features:
            raise ValueError(f"router: expects {self.features} features per frame, this model gives {feats.shape[-1]} "
                             "(a router trained for a linear-path model needs one)")
        return self(feats)

    @torch.no_grad()
    def keep_for_target(self, model, video: torch.Tensor, target: float, tokens: Optional[torch.Tensor] = None,
                        margin: Optional[float] = None) -> torch.Tensor:
        """Per-frame K [B, T']: the smallest K whose predicted PSNR reaches target + margin
        (R where none does); the margin is calibrated per target (``margin_for``)."""
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target < 0:
            raise ValueError(f"router: target must be a finite PSNR >= 0 (dB), got {target!r}")
        pred = self.predict(model, video, tokens)
        m = self.margin_for(target) if margin is None else float(margin)
        return keep_from_prediction(pred, target + m)

    @torch.no_grad()
    def keep_for_lambda(self, model, video: torch.Tensor, lam: float, tokens: Optional[torch.Tensor] = None,
                        pred: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-frame K [B, T']: argmax_K predicted PSNR(K) - lam * K (the trade-off form of
        ``search_keep``, on predicted curves; ``pred`` reuses a ``predict`` result)."""
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"router: lam must be a finite number >= 0, got {lam!r}")
        if pred is None:
            pred = self.predict(model, video, tokens)
        ks = torch.arange(1, pred.shape[-1] + 1, dtype=torch.float64)
        return ((pred.double() - lam * ks).argmax(-1) + 1).to(torch.int64)

    @torch.no_grad()
    def keep_for_budget(self, model, video: torch.Tensor, budget: int,
                        tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-frame K [B, T'] spending at most ``budget`` tokens per clip (at least one per
        frame): ``vft.adaptive.allocate_budget`` on the predicted curves."""
        return allocate_budget(self.predict(model, video, tokens), budget, who="router")

    # -- persistence (safetensors + JSON) --------------------------------------------
    def config(self) -> dict:
        return {"registers": self.registers, "features": self.features, "hidden": self.hidden,
                "sampling": self.sampling, "stats": list(self.stats), "calibration": self.calibration,
                "context": self.context, "members": self.members, "head": self.head}

    def save(self, folder: str, extra: Optional[dict] = None) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(folder, "router.safetensors"))
        with open(os.path.join(folder, "router.json"), "w") as f:
            json.dump({**self.config(), **(extra or {})}, f, indent=2)

    @classmethod
    def load(cls, folder: str) -> "KeepRouter":
        from safetensors.torch import load_file

        json_path, weights = os.path.join(folder, "router.json"), os.path.join(folder, "router.safetensors")
        if not (os.path.exists(json_path) and os.path.exists(weights)):
            raise FileNotFoundError(f"router: no router.json + router.safetensors in {folder!r}")
        with open(json_path) as f:
            cfg = json.load(f)
        router = cls(cfg["registers"], cfg["features"], cfg["hidden"], cfg.get("sampling"),
                     cfg.get("stats", _PIXEL_STATS), cfg.get("calibration"), cfg.get("context", "none"),
                     cfg.get("members", 1), cfg.get("head", "softplus"))
        router.load_state_dict(load_file(weights))
        return router.eval()


def keep_from_prediction(pred: torch.Tensor, level: float) -> torch.Tensor:
    """Per-frame K [..]: the smallest K with ``pred[..., K - 1] >= level`` (R where none)."""
    ok = pred >= level
    R = pred.shape[-1]
    first = torch.where(ok.any(-1), ok.float().argmax(-1), torch.full(ok.shape[:-1], R - 1, device=pred.device))
    return (first + 1).to(torch.int64)


def calibrate_margins(pred: torch.Tensor, labels: torch.Tensor, targets, coverage: float = 0.8,
                      grid=None, min_frames: int = 20) -> dict:
    """Per target PSNR, the smallest margin m (dB) such that, picking each frame's K as the
    smallest with predicted PSNR >= target + m, at least ``coverage`` of the frames whose
    target is reachable (label at R >= target) reach it (label at that K >= target).
    pred, labels: [N, T', R] of frames the router was not fitted on. A target that fewer
    than ``min_frames`` frames can reach, or that every margin of the grid meets, gets the
    margin of the nearest target that is neither. Returns the table {"coverage", "targets",
    "margins", "frames"} for ``KeepRouter.calibration``."""
    grid = torch.arange(-3.0, 8.0001, 0.05) if grid is None else torch.as_tensor(grid, dtype=torch.float32)
    p, y = pred.reshape(-1, pred.shape[-1]).float(), labels.reshape(-1, labels.shape[-1]).float()
    margins, counts = [], []
    for t in targets:
        reach = y[:, -1] >= t
        counts.append(int(reach.sum()))
        if not bool(reach.any()):
            margins.append(margins[-1] if margins else 0.0)
            continue
        pr, yr = p[reach], y[reach]
        m_ok = float(grid[-1])
        for m in grid.tolist():
            k = keep_from_prediction(pr, t + m)
            met = yr.gather(1, (k - 1)[:, None])[:, 0] >= t
            if float(met.float().mean()) >= coverage:
                m_ok = m
                break
        margins.append(round(m_ok, 3))
    # Too few frames say nothing, and a margin at the grid's low end only says that every
    # frame reaches the target whatever K it gets: both take the nearest informative margin.
    ok = [i for i, n in enumerate(counts) if n >= min_frames and margins[i] > float(grid[0])]
    if ok:
        margins = [margins[min(ok, key=lambda j: abs(j - i))] for i in range(len(margins))]
    return {"coverage": coverage, "targets": [float(t) for t in targets], "margins": margins, "frames": counts}


def prediction_errors(pred: torch.Tensor, labels: torch.Tensor) -> dict:
    """|predicted - decoded| PSNR (dB) over frames and K: mean, 95th percentile and max."""
    e = (pred - labels).abs().flatten().float()
    return {"mean": float(e.mean()), "p95": float(torch.quantile(e, 0.95)), "max": float(e.max())}


def train_router(feats: torch.Tensor, quality: torch.Tensor, steps: int = 3000, lr: float = 3e-3, hidden: int = 64,
                 seed: int = 0, sampling: Optional[dict] = None, margin_quantile: float = 0.8,
                 log: Optional[list] = None, stats=STATS, weight_decay: float = 0.0,
                 init: Optional[KeepRouter] = None, increment_weight: float = 0.0, context: str = "none",
                 members: int = 1, head: str = "softplus") -> KeepRouter:
    """Fit a router to features [N, T', F] and labels [N, T', R] (full-batch AdamW on the
    squared PSNR error, plus ``increment_weight`` times the squared error of the increments
    PSNR(K) - PSNR(K - 1), on which the lambda and budget rules turn). ``context``: see
    ``KeepRouter`` (``clip_mean`` needs whole clips, [N, T', F]). ``members``: an ensemble of
    that many MLPs, each fitted alone from seed ``seed + i``. ``head``: ``HEADS``. The scalar margin is the
    ``margin_quantile`` of (label - prediction) shortfalls on these frames;
    ``calibrate_margins`` on held-out frames replaces it by a per-target table. ``init``:
    start from this router's weights, feature scaling, context, members and head (same features;
    e.g. a router of another decoding setting, which has seen more clips)."""
    x, y = feats.float(), quality.float()
    if x.dim() == 2:
        x, y = x[:, None], y[:, None]
    F_, R = x.shape[-1], y.shape[-1]
    if init is not None:
        if (init.features, init.registers, tuple(init.stats)) != (F_, R, tuple(stats)):
            raise ValueError(f"router: init has {init.features} features {list(init.stats)} for R = "
                             f"{init.registers}, the data {F_} {list(stats)} for R = {R}")
        hidden, context, members, head = init.hidden, init.context, init.members, init.head
    torch.manual_seed(seed)
    router = KeepRouter(R, F_, hidden, sampling, stats, context=context, members=members, head=head)
    if init is not None:
        router.load_state_dict(init.state_dict())
    else:
        flat = x.reshape(-1, F_)
        router.feat_mean.copy_(flat.mean(0))
        router.feat_std.copy_(flat.std(0).clamp(min=1e-4))
    with torch.no_grad():
        inp = router.inputs(x)
    for i, net in enumerate(router.nets()):
        torch.manual_seed(seed + i)
        if init is None and i > 0:  # a fresh initialisation per member (member 0 keeps the seed's)
            for m in net:
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
            if head == "residual":
                nn.init.zeros_(net[-1].weight)
                nn.init.zeros_(net[-1].bias)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for step in range(steps):
            pred = router.curve(net(inp), x)
            loss = (pred - y).square().mean()
            if increment_weight:
                loss = loss + increment_weight * (pred.diff(dim=-1) - y.diff(dim=-1)).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log is not None and i == 0 and (step % 100 == 0 or step == steps - 1):
                log.append({"step": step, "mse_db2": loss.item()})
    with torch.no_grad():
        shortfall = (router(x) - y).flatten()
        router.margin.fill_(float(torch.quantile(shortfall, margin_quantile)))
    return router.eval()


def collect(model, clips: torch.Tensor, sampling: dict, batch: int = 10, progress: bool = True,
            stats=STATS):
    """(features [N, T', F], labels [N, T', R]) of ``clips``, in batches."""
    from tqdm.auto import tqdm

    feats, labels = [], []
    for i in tqdm(range(0, len(clips), batch), desc="router labels", disable=not progress):
        video = clips[i:i + batch]
        tokens = model.tokenize(video)
        feats.append(frame_features(model, video, tokens, stats))
        labels.append(frame_quality_by_k(model, video, tokens, **sampling))
    return torch.cat(feats), torch.cat(labels)


def model_fingerprint(model) -> str:
    """A short hash of a model's weights (label caches are only valid for the same weights)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def collect_groups(model, seeds, sampling: dict, real: bool = True, cache: Optional[str] = None,
                   progress: bool = True, stats=STATS, device=None, chunk: int = 4):
    """Features and labels of ``mixed_clips`` groups (one clip of every kind per seed, in
    ``vft.adaptive.KINDS`` + ``REAL_KINDS`` order): (features [N, T', F], labels [N, T', R],
    kinds, group index per clip). ``chunk`` groups are decoded together (one decode per K;
    larger batches run faster on a CPU, and the sampler's noise depends on the batch, so a
    chunk is fixed by its seeds). With ``cache`` (a folder), each chunk's labels are kept in
    ``<cache>/<model hash>/<setting>/<first seed>x<groups>.safetensors`` and read back
    instead of decoded: an interrupted run resumes where it stopped, a longer one reuses them."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from .adaptive import mixed_clips

    sampling = {**split_sampling(sampling), **{k: v for k, v in sampling.items() if k not in DEFAULT_SAMPLING}}
    folder = None
    if cache:
        folder = os.path.join(cache, model_fingerprint(model), setting_key(sampling) + ("_real" if real else ""))
        os.makedirs(folder, exist_ok=True)
    seeds = list(seeds)
    feats, labels, kinds, groups = [], [], [], []
    bar = tqdm(total=len(seeds), desc=f"router labels {setting_key(sampling)}", disable=not progress)
    for c in range(0, len(seeds), chunk):
        part = seeds[c:c + chunk]
        clips, k = zip(*(mixed_clips(model.cfg, 1, seed=s, real=real) for s in part))
        clips = torch.cat(clips)
        if device is not None:
            clips = clips.to(device)
        tokens = model.tokenize(clips)
        path = os.path.join(folder, f"{part[0]}x{len(part)}.safetensors") if folder else None
        if path and os.path.exists(path):
            lab = load_file(path)["labels"]
        else:
            lab = frame_quality_by_k(model, clips, tokens, **sampling)
            if path:
                save_file({"labels": lab.contiguous()}, path + ".tmp",
                          metadata={"sampling": json.dumps(sampling), "seeds": json.dumps(part)})
                os.replace(path + ".tmp", path)
        feats.append(frame_features(model, clips, tokens, stats))
        labels.append(lab)
        for g, kk in enumerate(k):
            kinds += kk
            groups += [c + g] * len(kk)
        bar.update(len(part))
    bar.close()
    return torch.cat(feats), torch.cat(labels), kinds, torch.tensor(groups)


class RouterSet:
    """Routers of one model, one per decoding setting (a folder ``routers/<setting>/``);
    ``select`` picks the one trained for the setting asked for."""

    def __init__(self, routers: dict, source: str = ""):
        self.routers = dict(routers)  # setting_key -> KeepRouter
        self.source = source

    def settings(self) -> list:
        return [r.setting() for r in self.routers.values()]

    def select(self, sampling: Optional[dict] = None) -> KeepRouter:
        want = setting(split_sampling(sampling or {}))
        router = self.routers.get(setting_key(want))
        if router is None:
            raise ValueError(f"router: {self.source or 'this router set'} has no router for decoding with {want} "
                             f"(it has {self.settings()}); decode with one of those settings or train one "
                             "(vft train-router --steps ... --guidance ...)")
        return router


def load_routers(folder: str):
    """A router folder: ``router.json`` + ``router.safetensors`` (one KeepRouter) or
    ``routers/<setting>/`` subfolders (a RouterSet)."""
    sub = os.path.join(folder, "routers")
    if os.path.isdir(sub):
        routers = {}
        for name in sorted(os.listdir(sub)):
            if os.path.exists(os.path.join(sub, name, "router.json")):
                r = KeepRouter.load(os.path.join(sub, name))
                routers[setting_key(r.sampling)] = r
        if routers:
            return RouterSet(routers, folder)
    return KeepRouter.load(folder)

