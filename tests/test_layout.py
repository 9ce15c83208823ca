"""RegisterLayout (docs/spec.md §2): the dense forms against the spec's words, and the analytic
tile classification / key and query ranges against the dense mask on random layouts."""
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vft_kernels import RegisterLayout, Tile

MODES = ("full", "block_causal", "block_causal_last")


@functools.lru_cache(maxsize=None)
def spec_mask(T, P, R, mode, keep):
    """bool [N, N] for one sample, straight from the words of docs/spec.md §2 (independent of layout.py);
    keep: an int, or a tuple of T ints (per block)."""
    S = P + R
    N = T * S
    kb = (lambda t: keep) if isinstance(keep, int) else (lambda t: keep[t])
    rows = []
    for i in range(N):
        row = []
        for k in range(N):
            ti, ji, tk, jk = i // S, i % S, k // S, k % S
            if (ji >= P and ji - P >= kb(ti)) or (jk >= P and jk - P >= kb(tk)):
                row.append(False)  # dropped query or key
            elif mode == "full":
                row.append(True)
            elif mode == "block_causal":
                row.append(tk <= ti)
            else:
                row.append(tk < ti or (tk == ti and (jk < P or (ji >= P and jk <= ji))))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(N, N)


@st.composite
def layouts(draw):
    T = draw(st.integers(1, 4))
    P = draw(st.integers(1, 5))
    R = draw(st.integers(0, 4))
    mode = draw(st.sampled_from(MODES))
    if draw(st.booleans()):  # one keep per sample
        keep = draw(st.integers(0, R))
    else:  # per block
        keep = tuple(draw(st.lists(st.integers(0, R), min_size=T, max_size=T)))
    return T, P, R, mode, keep


@st.composite
def layout_and_tiles(draw):
    T, P, R, mode, keep = draw(layouts())
    N = T * (P + R)
    q0 = draw(st.integers(0, N - 1))
    q1 = draw(st.integers(q0 + 1, N))
    k0 = draw(st.integers(0, N - 1))
    k1 = draw(st.integers(k0 + 1, N))
    return T, P, R, mode, keep, q0, q1, k0, k1


@settings(max_examples=300, deadline=None)
@given(layout_and_tiles())
def test_classify_tile_is_exact(args):
    T, P, R, mode, keep, q0, q1, k0, k1 = args
    layout = RegisterLayout(T, P, R, mode)
    sub = spec_mask(T, P, R, mode, keep)[q0:q1, k0:k1]
    want = Tile.MASKED if not bool(sub.any()) else Tile.FULL if bool(sub.all()) else Tile.PARTIAL
    assert layout.classify_tile(q0, q1, k0, k1, keep) == want, (layout, keep, (q0, q1, k0, k1), sub.int())


def _tight(allowed_1d):
    idx = allowed_1d.nonzero().reshape(-1)
    return (0, 0) if idx.numel() == 0 else (int(idx[0]), int(idx[-1]) + 1)


@settings(max_examples=300, deadline=None)
@given(layout_and_tiles())
def test_key_and_query_ranges_are_tightest(args):
    T, P, R, mode, keep, q0, q1, k0, k1 = args
    layout = RegisterLayout(T, P, R, mode)
    mask = spec_mask(T, P, R, mode, keep)
    assert layout.key_range(q0, q1, keep) == _tight(mask[q0:q1].any(0)), (layout, keep, q0, q1)
    assert layout.query_range(k0, k1, keep) == _tight(mask[:, k0:k1].any(1)), (layout, keep, k0, k1)


def _check_dense_forms(layout, keeps):
    """materialize, mask_mod (on broadcast index tensors, as FlexAttention evaluates it),
    allowed_pairs and density against the spec-words mask, for a keep per sample (ints) or
    per block (tuples); returns the keep tensor and the wanted [B, N, N] mask."""
    T, P, R, mode = layout.blocks, layout.patches, layout.registers, layout.mode
    keep = torch.tensor(keeps, dtype=torch.int32)
    want = torch.stack([spec_mask(T, P, R, mode, k) for k in keeps])
    got = layout.materialize(keep)
    assert got.dtype == torch.bool and torch.equal(got, want)
    N = layout.seq_len
    b = torch.arange(len(keeps))[:, None, None]
    n = torch.arange(N)
    mm = layout.mask_mod(keep)(b, torch.zeros((), dtype=torch.int64), n[None, :, None], n[None, None, :])
    assert torch.equal(mm.expand(len(keeps), N, N), want)
    for k in keeps:
        assert layout.allowed_pairs(k) == int(spec_mask(T, P, R, mode, k).sum())
    assert layout.density(keep) == pytest.approx(want.double().mean().item(), rel=1e-12)
    return keep, want


@settings(max_examples=200, deadline=None)
@given(layouts(), st.lists(st.integers(0, 4), min_size=1, max_size=3))
def test_dense_forms_match_spec(args, raw_keeps):
    T, P, R, mode, _ = args
    layout = RegisterLayout(T, P, R, mode)
    keeps = [k % (R + 1) for k in raw_keeps]
    keep, want = _check_dense_forms(layout, keeps)
    assert layout.density() == pytest.approx(spec_mask(T, P, R, mode, R).double().mean().item(), rel=1e-12)
    assert layout.density(keeps[0]) == pytest.approx(want[0].double().mean().item(), rel=1e-12)
    # keep=None means R (nothing dropped)
    assert torch.equal(layout.materialize(None)[0], spec_mask(T, P, R, mode, R))


@settings(max_examples=150, deadline=None)
@given(layouts(), st.lists(st.lists(st.integers(0, 4), min_size=4, max_size=4), min_size=1, max_size=3))
def test_per_block_dense_forms_match_spec(args, raw_keeps):
    T, P, R, mode, _ = args
    layout = RegisterLayout(T, P, R, mode)
    keep, _ = _check_dense_forms(layout, [tuple(k % (R + 1) for k in row[:T]) for row in raw_keeps])
    # a per-block keep with equal values is the per-sample keep
    assert torch.equal(layout.materialize(keep[:, :1].expand(-1, T)), layout.materialize(keep[:, 0]))


def test_per_block_keep_shape_error():
    with pytest.raises(ValueError, match=r"per-block keep must be \[B, T = 3\]"):
        RegisterLayout(3, 2, 2).materialize(torch.ones(2, 4, dtype=torch.int64))


def test_mask_mod_with_flex_create_mask():
    from torch.nn.attention.flex_attention import create_mask

    layout = RegisterLayout(3, 3, 3, "block_causal_last")
    keep = torch.tensor([3, 0, 2])
    N = layout.seq_len
    mask = create_mask(layout.mask_mod(keep), 3, None, N, N, device="cpu")
    assert torch.equal(mask[:, 0], torch.stack([spec_mask(3, 3, 3, "block_causal_last", k) for k in (3, 0, 2)]))
    int_mask = create_mask(layout.mask_mod(1), 1, None, N, N, device="cpu")
    assert torch.equal(int_mask[0, 0], spec_mask(3, 3, 3, "block_causal_last", 1))
    per_block = torch.tensor([[3, 0, 2], [1, 3, 0]])
    pb_mask = create_mask(layout.mask_mod(per_block), 2, None, N, N, device="cpu")
    assert torch.equal(pb_mask[:, 0], torch.stack([spec_mask(3, 3, 3, "block_causal_last", (3, 0, 2)),
                                                   spec_mask(3, 3, 3, "block_causal_last", (1, 3, 0))]))


def test_whole_sequence_tiles_and_known_values():
    layout = RegisterLayout(2, 2, 2, "block_causal_last")  # N = 8
    assert layout.seq_len == 8 and layout.block_size == 4
    # patches of block 0 vs registers of block 0: patches never see registers
    assert layout.classify_tile(0, 2, 2, 4, 2) == Tile.MASKED
    # registers of block 1 vs everything of block 0: all allowed
    assert layout.classify_tile(6, 8, 0, 4, 2) == Tile.FULL
    # with keep = 0 the register queries are dropped
    assert layout.classify_tile(6, 8, 0, 4, 0) == Tile.MASKED
    assert layout.key_range(0, 2, 2) == (0, 2)
    assert layout.key_range(2, 4, 2) == (0, 4)
    assert layout.key_range(2, 4, 0) == (0, 0)
    assert layout.query_range(6, 8, 1) == (6, 7)
    # block_causal_last, T=1: allowed pairs = P*P + K*P + K(K+1)/2
    assert RegisterLayout(1, 3, 4).allowed_pairs(4) == 9 + 12 + 10


def test_repr():
    r = repr(RegisterLayout(2, 16, 4, "block_causal"))
    for part in ("2", "16", "4", "block_causal", "40"):
        assert part in r, r
    assert len(r) < 100


@pytest.mark.parametrize("kwargs, bad", [
    (dict(blocks=0, patches=3, registers=1), "0"),
    (dict(blocks=2, patches=0, registers=1), "0"),
    (dict(blocks=2, patches=3, registers=-1), "-1"),
    (dict(blocks=2.5, patches=3, registers=1), "2.5"),
    (dict(blocks=2, patches=3, registers=1, mode="causal"), "'causal'"),
    (dict(blocks=True, patches=3, registers=1), "True"),
])
def test_invalid_layouts(kwargs, bad):
    with pytest.raises(ValueError) as e:
        RegisterLayout(**kwargs)
    assert bad in str(e.value), str(e.value)
    name = [k for k, v in kwargs.items() if repr(v) == bad or str(v) == bad][0]
    assert name in str(e.value), str(e.value)
