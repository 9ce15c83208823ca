"""Budget modes: per-latent-frame token counts for a quality target, a token budget per clip
or a rate (mean tokens per frame), by decoding (``vft.adaptive``) or predicted by a router
(``vft.router``, the shipped ones through ``vft.pretrained``); ``vft tokenize`` runs this.

    from vft.budget import choose_keep
    res = choose_keep(model, video, rate=2.5, router="tiny")   # res["keep"]: [B, T'] counts
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .adaptive import _check_budget, _check_video, allocate_budget, frame_quality_by_k, search_keep
from .pretrained import resolve_router
from .router import KeepRouter, RouterSet


MODES = ("target_psnr", "budget", "rate")


@torch.no_grad()
def choose_keep(model, video: torch.Tensor, target_psnr: Optional[float] = None, budget: Optional[int] = None,
                rate: Optional[float] = None, router=None, granularity: Optional[str] = None,
                **sampling) -> dict:
    """Per-latent-frame token counts of ``video`` [B, 3, T, H, W] in [-1, 1] under one budget
    mode (docs/adaptive.md has the table of what each guarantees):

    * ``target_psnr`` (dB): without a router, ``search_keep`` by decoding (``granularity``
      "frame" by default): every latent frame (or clip / chunk) reaches it. With a router:
      the smallest K predicted to reach it plus the router's margin, per frame.
    * ``budget``: at most this many tokens per clip (an int >= T', one per latent frame).
    * ``rate``: at most this many tokens per latent frame on average (>= 1, <= R), i.e.
      a budget of floor(rate * T') tokens per clip.

    A budget or rate is spent by ``allocate_budget`` on the router's predicted curves, or
    without a router on curves measured by decoding the clip at every K (R decodes).
    router: a ``vft.router.KeepRouter``, a ``RouterSet`` or a name / folder
    (``vft.pretrained.load_router``); ``sampling`` (steps, guidance, scale; missing ones from
    ``vft detokenize``'s default, 25 APG steps at scale 1.5) is the decoding setting the counts
    are chosen for: a set's router for that setting is used, and a KeepRouter trained for
    another setting is an error. Without a router, sampling: ``detokenize`` keywords of the
    decodes.

    Returns {"tokens" int32 [B, T', R], "keep" int64 [B, T'], "mode", "policy" ("search",
    "measured" or "router"), "evaluations" (decodes run)}, with a router "router" (the
    KeepRouter used) and, from the search, "quality" [B]."""
    given = {n: v for n, v in zip(MODES, (target_psnr, budget, rate)) if v is not None}
    if len(given) != 1:
        raise ValueError(f"choose_keep: give exactly one of target_psnr, budget and rate, got "
                         f"{given or 'none'}")
    (mode, value), = given.items()
    if granularity is not None and (mode != "target_psnr" or router is not None):
        raise ValueError(f"choose_keep: granularity applies to a target_psnr search without a router, got "
                         f"granularity={granularity!r} with {mode}" + (" and a router" if router is not None else ""))
    if router is not None:
        if isinstance(router, (str, KeepRouter, RouterSet)):
            router = resolve_router(router, sampling)  # the router for this decoding setting, or an error
        elif sampling:
            raise ValueError(f"choose_keep: a router predicts quality for the decoding setting it was trained for "
                             f"({getattr(router, 'sampling', None)}); decoding settings {sorted(sampling)} apply only "
                             "to a vft.router.KeepRouter or RouterSet")
    if mode == "target_psnr" and router is None:
        res = search_keep(model, video, target=value, granularity=granularity or "frame", **sampling)
        return {"tokens": res["tokens"], "keep": res["keep"], "mode": mode, "policy": "search",
                "quality": res["quality"], "evaluations": res["evaluations"]}
    _check_video(video, "choose_keep")
    R = model.cfg.registers
    if mode == "rate" and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 1 <= rate <= R):
        raise ValueError(f"choose_keep: rate (mean tokens per latent frame) must be a number in [1, R = {R}], "
                         f"got {rate!r}")
    tokens = model.tokenize(video)
    T = tokens.shape[1]
    if mode == "target_psnr":
        keep = router.keep_for_target(model, video, value, tokens)
        return {"tokens": tokens, "keep": keep, "mode": mode, "policy": "router", "evaluations": 0, "router": router}
    clip_budget = budget if mode == "budget" else math.floor(rate * T + 1e-9)
    _check_budget(clip_budget, T, "choose_keep")  # before the decodes
    if router is not None:
        curves, policy, evaluations = router.predict(model, video, tokens), "router", 0
    else:
        curves, policy, evaluations = frame_quality_by_k(model, video, tokens, **sampling), "measured", R
    keep = allocate_budget(curves, clip_budget, who="choose_keep")
    res = {"tokens": tokens, "keep": keep, "mode": mode, "policy": policy, "evaluations": evaluations}
    if router is not None:
        res["router"] = router
    return res
