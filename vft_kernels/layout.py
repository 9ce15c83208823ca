"""RegisterLayout: the token layout and mask semantics of register attention (SPEC.md §2).

A sample is ``T`` time blocks of ``P`` patches followed by ``R`` registers, interleaved
``[patches_0 | registers_0 | patches_1 | registers_1 | ...]``; ``N = T * (P + R)``. With
nested dropout, sample ``b`` keeps registers ``r < keep[b]`` of every block.

Besides the dense forms for tests (``materialize``, ``mask_mod``) this module holds the
analytic tile classification kernels use to skip work (``classify_tile``, ``key_range``,
``query_range``): O(1) integer arithmetic on token indices, no mask tensor. The Triton
and C++ kernels implement the same formulas; ``tests/test_layout.py`` checks these
against ``materialize`` on random layouts and tiles.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch

MODES = ("full", "block_causal", "block_causal_last")


class Tile(enum.IntEnum):
    """How a (query tile, key tile) pair is masked: skip it, mask inside it, or not at all."""

    MASKED = 0
    PARTIAL = 1
    FULL = 2


@dataclass(frozen=True)
class RegisterLayout:
    blocks: int
    patches: int
    registers: int
    mode: str = "block_causal_last"

    def __post_init__(self):
        for name, value, low in (("blocks", self.blocks, 1), ("patches", self.patches, 1),
                                 ("registers", self.registers, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"RegisterLayout: {name} must be an int >= {low}, got {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"RegisterLayout: mode must be one of {MODES}, got {self.mode!r}")

    # ----------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        """S = P + R tokens per time block."""
        return self.patches + self.registers

    @property
    def seq_len(self) -> int:
        """N = T * (P + R)."""
        return self.blocks * self.block_size

    def __repr__(self):
        return (f"RegisterLayout(T={self.blocks}, P={self.patches}, R={self.registers}, "
                f"mode={self.mode!r}, N={self.seq_len})")

    # ----------------------------------------------------------------------------------
    # Dense semantics

    def allowed(self, i, k, keep):
        """Elementwise mask: may query ``i`` attend to key ``k`` in a sample keeping ``keep``
        registers per block? Works on broadcastable integer tensors (used by materialize and
        mask_mod, so both share this one definition)."""
        S, P = self.block_size, self.patches
        ti, ji = i // S, i % S
        tk, jk = k // S, k % S
        kept = (ji < P + keep) & (jk < P + keep)
        if self.mode == "full":
            return kept
        if self.mode == "block_causal":
            return kept & (tk <= ti)
        same_block_ok = (jk < P) | ((ji >= P) & (jk <= ji))
        return kept & ((tk < ti) | ((tk == ti) & same_block_ok))

    def _keep_tensor(self, keep, device, batch: Optional[int] = None):
        if keep is None:
            return torch.full((batch or 1,), self.registers, dtype=torch.int64, device=device)
        if isinstance(keep, int):
            return torch.full((batch or 1,), keep, dtype=torch.int64, device=device)
        return keep.to(device=device, dtype=torch.int64).reshape(-1)

    def materialize(self, keep=None, device=None) -> torch.Tensor:
        """Dense boolean mask [B, N, N] (B = len(keep), 1 when keep is None). For tests."""
        keep = self._keep_tensor(keep, device)
        n = torch.arange(self.seq_len, device=keep.device)
        return self.allowed(n[None, :, None], n[None, None, :], keep[:, None, None])

    def mask_mod(self, keep=None):
        """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for this layout and ``keep``
        (int tensor [B], an int, or None for all registers)."""
        keep_t = keep if isinstance(keep, torch.Tensor) else None
        keep_i = self.registers if keep is None else keep

        def mask_mod(b, h, q_idx, kv_idx):
            kb = keep_t[b] if keep_t is not None else keep_i
            return self.allowed(q_idx, kv_idx, kb)

        return mask_mod

    def allowed_pairs(self, keep: int) -> int:
        """Number of allowed (query, key) pairs in one sample keeping ``keep`` registers."""
        T, P = self.blocks, self.patches
        n = P + keep  # kept tokens per block
        if self.mode == "full":
            return (T * n) ** 2
        if self.mode == "block_causal":
            return n * n * T * (T + 1) // 2
        own_block = P * P + keep * P + keep * (keep + 1) // 2
        return n * n * T * (T - 1) // 2 + T * own_block

    def density(self, keep=None) -> float:
        """Fraction of allowed pairs over B * N * N (keep: None, an int or a [B] tensor)."""
        if keep is None:
            keeps = [self.registers]
        elif isinstance(keep, int):
            keeps = [keep]
        else:
            keeps = [int(x) for x in keep.reshape(-1).tolist()]
        return sum(self.allowed_pairs(k) for k in keeps) / (len(keeps) * self.seq_len ** 2)

    # ----------------------------------------------------------------------------------
    # Analytic tile classification (half-open token ranges, one sample with ``keep``)

    def _first_kept(self, lo: int, hi: int, keep: int) -> Optional[int]:
        S, P = self.block_size, self.patches
        x = lo
        if x % S >= P + keep:  # in the dropped tail of its block: jump to the next block
            x = (x // S + 1) * S
        return x if x < hi else None

    def _last_kept(self, lo: int, hi: int, keep: int) -> Optional[int]:
        S, P = self.block_size, self.patches
        x = hi - 1
        if x % S >= P + keep:  # back to the last kept token of this block
            x = (x // S) * S + P + keep - 1
        return x if x >= lo else None

    def _has_dropped(self, lo: int, hi: int, keep: int) -> bool:
        S, P = self.block_size, self.patches
        if keep >= self.registers:
            return False
        first = lo if lo % S >= P + keep else (lo // S) * S + P + keep
        return first < hi

    def classify_tile(self, q0: int, q1: int, k0: int, k1: int, keep: int) -> Tile:
        """Classify queries [q0, q1) x keys [k0, k1) of a sample keeping ``keep`` registers.

        FULL: every pair allowed (no dropped token in either range). MASKED: no pair
        allowed (dropped queries count as attending nothing). PARTIAL otherwise."""
        S, P = self.block_size, self.patches
        i = self._last_kept(q0, q1, keep)   # kept query with the latest block / position
        k = self._first_kept(k0, k1, keep)  # kept key with the earliest block / position
        if i is None or k is None:
            return Tile.MASKED
        ti, tk = i // S, k // S
        if self.mode == "block_causal" and tk > ti:
            return Tile.MASKED
        if self.mode == "block_causal_last":
            # Earlier-block pairs exist iff tk < ti; otherwise only block ti == tk can hold
            # an allowed pair: a patch key, or a register key at or before the query.
            if tk > ti or (tk == ti and not (k % S < P or i % S >= k % S)):
                return Tile.MASKED
        if self._has_dropped(q0, q1, keep) or self._has_dropped(k0, k1, keep):
            return Tile.PARTIAL
        if self.mode == "full":
            return Tile.FULL
        tq_min, tk_max = q0 // S, (k1 - 1) // S
        if tk_max < tq_min:
            return Tile.FULL
        if tk_max > tq_min:
            return Tile.PARTIAL
        if self.mode == "block_causal":
            return Tile.FULL
        # Same block: all keys are patches, or the first query is a register at or after
        # every key of that block.
        jk_max, jq_min = (k1 - 1) % S, q0 % S
        return Tile.FULL if jk_max < P or jq_min >= jk_max else Tile.PARTIAL

    def key_range(self, q0: int, q1: int, keep: int) -> tuple[int, int]:
        """Smallest [k_lo, k_hi) holding every key allowed for some query in [q0, q1)
        (empty (0, 0) when no query there is kept). k_lo is always 0: patch 0 is visible
        to every kept query."""
        S, P = self.block_size, self.patches
        i = self._last_kept(q0, q1, keep)
        if i is None:
            return 0, 0
        t, j = i // S, i % S
        if self.mode == "full":
            return 0, (self.blocks - 1) * S + P + keep
        if self.mode == "block_causal":
            return 0, t * S + P + keep
        return 0, t * S + (P if j < P else j + 1)

    def query_range(self, k0: int, k1: int, keep: int) -> tuple[int, int]:
        """Smallest [q_lo, q_hi) holding every query that attends some key in [k0, k1)
        (empty (0, 0) when no key there is kept). For the backward pass over key tiles."""
        S, P = self.block_size, self.patches
        k = self._first_kept(k0, k1, keep)
        if k is None:
            return 0, 0
        t, j = k // S, k % S
        q_hi = (self.blocks - 1) * S + P + keep  # one past the last kept query
        if self.mode == "full":
            return 0, q_hi
        if self.mode == "block_causal":
            return t * S, q_hi
        return t * S + (0 if j < P else j), q_hi
