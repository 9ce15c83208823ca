"""RegisterLayout: the token layout and mask semantics of register attention (docs/spec.md §2).

A sample is ``T`` time blocks of ``P`` patches followed by ``R`` registers, interleaved
``[patches_0 | registers_0 | patches_1 | registers_1 | ...]``; ``N = T * (P + R)``. With
nested dropout, sample ``b`` keeps registers ``r < keep[b]`` of every block (``keep`` [B]),
or ``r < keep[b, t]`` of block ``t`` (per-block ``keep`` [B, T]).

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

    def allowed(self, i, k, keep, keep_k=None):
        """Elementwise mask: may query ``i`` attend to key ``k``? ``keep`` is the number of
        registers kept in the query's block, ``keep_k`` in the key's block (default: the
        same, i.e. one keep per sample). Works on broadcastable integer tensors (used by
        materialize and mask_mod, so both share this one definition)."""
        S, P = self.block_size, self.patches
        ti, ji = i // S, i % S
        tk, jk = k // S, k % S
        kept = (ji < P + keep) & (jk < P + (keep if keep_k is None else keep_k))
        if self.mode == "full":
            return kept
        if self.mode == "block_causal":
            return kept & (tk <= ti)
        same_block_ok = (jk < P) | ((ji >= P) & (jk <= ji))
        return kept & ((tk < ti) | ((tk == ti) & same_block_ok))

    def _keep_tensor(self, keep, device, batch: Optional[int] = None):
        """keep (None, an int, a [B] or a per-block [B, T] tensor) -> int64 [B, T] on device."""
        if keep is None or isinstance(keep, int):
            value = self.registers if keep is None else keep
            return torch.full((batch or 1, self.blocks), value, dtype=torch.int64, device=device)
        keep = keep.to(device=device, dtype=torch.int64)
        if keep.dim() == 2:
            if keep.shape[1] != self.blocks:
                raise ValueError(f"RegisterLayout: a per-block keep must be [B, T = {self.blocks}], got "
                                 f"{tuple(keep.shape)}")
            return keep
        keep = keep.reshape(-1)
        return keep[:, None].expand(keep.shape[0], self.blocks)

    def materialize(self, keep=None, device=None) -> torch.Tensor:
        """Dense boolean mask [B, N, N] (B = len(keep), 1 when keep is None; keep may be
        per block, [B, T]). For tests."""
        keep = self._keep_tensor(keep, device)
        n = torch.arange(self.seq_len, device=keep.device)
        per_token = keep[:, n // self.block_size]  # [B, N]: keep of each token's block
        return self.allowed(n[None, :, None], n[None, None, :], per_token[:, :, None], per_token[:, None, :])

    def mask_mod(self, keep=None):
        """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for this layout and ``keep``
        (int tensor [B] or per-block [B, T], an int, or None for all registers)."""
        if isinstance(keep, torch.Tensor) and keep.dim() == 2:
            S = self.block_size

            def mask_mod(b, h, q_idx, kv_idx):
                return self.allowed(q_idx, kv_idx, keep[b, q_idx // S], keep[b, kv_idx // S])

            return mask_mod
        keep_t = keep if isinstance(keep, torch.Tensor) else None
        keep_i = self.registers if keep is None else keep

        def mask_mod(b, h, q_idx, kv_idx):
            kb = keep_t[b] if keep_t is not None else keep_i
            return self.allowed(q_idx, kv_idx, kb)

        return mask_mod

    def allowed_pairs(self, keep) -> int:
        """Number of allowed (query, key) pairs in one sample keeping ``keep`` registers (an
        int, or a sequence of T ints: one per block)."""
        T, P = self.blocks, self.patches
        keeps = [keep] * T if isinstance(keep, int) else [int(x) for x in keep]
        n = [P + k for k in keeps]  # kept tokens per block
        if self.mode == "full":
            return sum(n) ** 2
        earlier = 0  # kept keys in the blocks before t
        total = 0
        for t in range(T):
            if self.mode == "block_causal":
                total += n[t] * (earlier + n[t])
            else:
                k = keeps[t]
                total += n[t] * earlier + P * P + k * P + k * (k + 1) // 2
            earlier += n[t]
        return total

    def density(self, keep=None) -> float:
        """Fraction of allowed pairs over B * N * N (keep: None, an int, a [B] or a
        per-block [B, T] tensor)."""
        if keep is None:
            keeps = [self.registers]
        elif isinstance(keep, int):
            keeps = [keep]
        elif keep.dim() == 2:
            keeps = [row for row in keep.tolist()]
        else:
            keeps = [int(x) for x in keep.reshape(-1).tolist()]
        return sum(self.allowed_pairs(k) for k in keeps) / (len(keeps) * self.seq_len ** 2)

    # ----------------------------------------------------------------------------------
    # Analytic tile classification (half-open token ranges of one sample). ``keep`` is the
    # sample's keep: an int (every block) or a sequence of T ints (per block). Since P >= 1
    # every block's patches are kept, so the first / last kept token of a range depends only
    # on the keep of the block holding its first / last token.

    def _kb(self, keep, t: int) -> int:
        """Registers kept in block t."""
        return keep if isinstance(keep, int) else int(keep[t])

    def _first_kept(self, lo: int, hi: int, keep) -> Optional[int]:
        S, P = self.block_size, self.patches
        x = lo
        if x % S >= P + self._kb(keep, x // S):  # in the dropped tail of its block: next block
            x = (x // S + 1) * S
        return x if x < hi else None

    def _last_kept(self, lo: int, hi: int, keep) -> Optional[int]:
        S, P = self.block_size, self.patches
        x = hi - 1
        kb = self._kb(keep, x // S)
        if x % S >= P + kb:  # back to the last kept token of this block
            x = (x // S) * S + P + kb - 1
        return x if x >= lo else None

    def _has_dropped(self, lo: int, hi: int, keep) -> bool:
        S, P = self.block_size, self.patches
        for t in range(lo // S, (hi - 1) // S + 1):
            kb = self._kb(keep, t)
            if kb < self.registers and max(lo, t * S + P + kb) < min(hi, (t + 1) * S):
                return True
        return False

    def classify_tile(self, q0: int, q1: int, k0: int, k1: int, keep) -> Tile:
        """Classify queries [q0, q1) x keys [k0, k1) of a sample keeping ``keep`` registers
        (an int, or one int per block).

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

    def key_range(self, q0: int, q1: int, keep) -> tuple[int, int]:
        """Smallest [k_lo, k_hi) holding every key allowed for some query in [q0, q1)
        (empty (0, 0) when no query there is kept). k_lo is always 0: patch 0 is visible
        to every kept query."""
        S, P = self.block_size, self.patches
        i = self._last_kept(q0, q1, keep)
        if i is None:
            return 0, 0
        t, j = i // S, i % S
        if self.mode == "full":
            return 0, (self.blocks - 1) * S + P + self._kb(keep, self.blocks - 1)
        if self.mode == "block_causal":
            return 0, t * S + P + self._kb(keep, t)
        return 0, t * S + (P if j < P else j + 1)

    def query_range(self, k0: int, k1: int, keep) -> tuple[int, int]:
        """Smallest [q_lo, q_hi) holding every query that attends some key in [k0, k1)
        (empty (0, 0) when no key there is kept). For the backward pass over key tiles."""
        S, P = self.block_size, self.patches
        k = self._first_kept(k0, k1, keep)
        if k is None:
            return 0, 0
        t, j = k // S, k % S
        q_hi = (self.blocks - 1) * S + P + self._kb(keep, self.blocks - 1)  # one past the last kept query
        if self.mode == "full":
            return 0, q_hi
        if self.mode == "block_causal":
            return t * S, q_hi
        return t * S + (0 if j < P else j), q_hi
