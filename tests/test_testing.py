"""The docs/spec.md §4 comparison helpers themselves: they must accept what the rule accepts and
reject what it rejects (a helper that always passes would make every kernel test vacuous)."""
import math

import pytest
import torch

from vft_kernels import testing
from vft_kernels.reference import fsq as rf


def test_tolerance_floor():
    assert testing.tolerance_floor(torch.float32) == 1e-6
    assert testing.tolerance_floor(torch.float32, 10_000) == 1e-6
    assert testing.tolerance_floor(torch.float16, 16) == pytest.approx(4e-3)
    assert testing.tolerance_floor(torch.bfloat16, 100) == pytest.approx(1e-2)
    assert testing.tolerance_floor(torch.bfloat16) == pytest.approx(1e-3)


def test_error_bound_is_two_times_reference_error_plus_floor():
    ref64 = torch.randn(4, 5, dtype=torch.float64)
    ref_lowp = ref64 + 1e-3  # the reference in the input dtype is off by 1e-3
    ok = ref64.clone()
    ok[1, 2] += 2e-3 + 0.9e-6
    testing.assert_matches_reference("ok", ok, ref64, ref_lowp, torch.float32)
    bad = ref64.clone()
    bad[3, 4] -= 2e-3 + 1.1e-6  # beyond 2 * 1e-3 + 1e-6
    with pytest.raises(AssertionError, match=r"\[3, 4\]"):
        testing.assert_matches_reference("bad", bad, ref64, ref_lowp, torch.float32)


def test_floor_scales_with_reduction_length():
    ref64 = torch.randn(8, dtype=torch.float64)
    out = ref64 + 3e-3
    testing.assert_matches_reference("x", out, ref64, ref64, torch.float16, reduction_len=16)  # floor 4e-3
    with pytest.raises(AssertionError):
        testing.assert_matches_reference("x", out, ref64, ref64, torch.float16, reduction_len=4)  # floor 2e-3


def test_nan_and_inf_placement():
    ref64 = torch.tensor([1.0, math.nan, -math.inf, 2.0], dtype=torch.float64)
    testing.assert_matches_reference("x", ref64.clone(), ref64, ref64, torch.float32)
    for bad in ([1.0, 0.0, -math.inf, 2.0],        # missing NaN
                [1.0, math.nan, -math.inf, math.nan],  # unexpected NaN (unwritten output)
                [1.0, math.nan, 0.0, 2.0],         # -inf (dropped row lse) not reproduced
                [1.0, math.nan, math.inf, 2.0]):   # wrong sign of infinity
        with pytest.raises(AssertionError):
            testing.assert_matches_reference("x", torch.tensor(bad), ref64, ref64, torch.float32)
    with pytest.raises(AssertionError, match="shape"):
        testing.assert_matches_reference("x", ref64[:3], ref64, ref64, torch.float32)


def test_max_error_ignores_nonfinite_reference_positions():
    a = torch.tensor([1.0, 5.0, -math.inf])
    b = torch.tensor([1.5, math.nan, -math.inf])
    assert testing.max_error(a, b) == 0.5
    assert testing.max_error(torch.empty(0), torch.empty(0)) == 0.0


def test_noncontiguous():
    t = torch.randn(3, 4, 5)
    nc = testing.noncontiguous(t)
    assert not nc.is_contiguous() and nc.shape == t.shape and torch.equal(nc, t)


def _tie_z(L, eps, k):
    """float64 z whose float64 `bounded` is k + 0.5 up to ~1e-12."""
    half_l = (L - 1) * (1 + eps) / 2
    offset = 0.5 if L % 2 == 0 else 0.0
    return math.atanh((k + 0.5 + offset) / half_l) - math.atanh(offset / half_l)


def test_fsq_boundary_tokens():
    levels = (4, 5)
    z = torch.tensor([[_tie_z(4, 1e-3, 0), 0.0], [0.1, -0.2], [0.3, _tie_z(5, 1e-3, -2) + 3e-6]],
                     dtype=torch.float64)
    assert testing.fsq_boundary_tokens(z, levels).tolist() == [True, False, True]
    far = torch.tensor([[0.1, _tie_z(5, 1e-3, 1) + 1e-3]], dtype=torch.float64)
    assert testing.fsq_boundary_tokens(far, levels).tolist() == [False]


def test_assert_fsq_matches():
    levels = (4, 5)
    z = torch.tensor([[_tie_z(4, 1e-3, 0), 0.1], [0.4, -0.9], [-1.2, 0.7]], dtype=torch.float64).float()
    codes, idx = rf.fsq_forward(z, levels)
    assert testing.assert_fsq_matches(codes, idx, codes, idx, z, levels) == 1  # one boundary token

    # boundary token 0: the other neighbour (q = 0 <-> 1 in dim 0), consistent index: accepted
    q0 = round(float(codes[0, 0]) * 2)
    other = 1 - q0 if q0 in (0, 1) else q0
    c2, i2 = codes.clone(), idx.clone()
    c2[0, 0] = other / 2
    i2[0] = idx[0] + (other - q0)
    assert testing.assert_fsq_matches(c2, i2, codes, idx, z, levels) == 1

    # boundary token whose codes do not decode from its index: rejected
    c3 = codes.clone()
    c3[0, 0] = other / 2
    with pytest.raises(AssertionError):
        testing.assert_fsq_matches(c3, idx, codes, idx, z, levels)
    # boundary token with an out-of-range index: rejected
    i4 = idx.clone()
    i4[0] = 20
    with pytest.raises(AssertionError):
        testing.assert_fsq_matches(codes, i4, codes, idx, z, levels)
    # any difference on a token away from the boundary: rejected
    c5, i5 = codes.clone(), idx.clone()
    c5[1, 1] += 0.5
    with pytest.raises(AssertionError, match=r"token \[1\]"):
        testing.assert_fsq_matches(c5, i5, codes, idx, z, levels)
    i5[2] += 1
    with pytest.raises(AssertionError, match=r"token \[2\]"):
        testing.assert_fsq_matches(codes, i5, codes, idx, z, levels)
    with pytest.raises(AssertionError, match="dtype"):
        testing.assert_fsq_matches(codes, idx.long(), codes, idx, z, levels)


def test_stable_seed_is_the_same_in_every_process():
    """Seeds that parametrised tests derive from their parameters must not depend on
    PYTHONHASHSEED (Python's string hash), or a failure cannot be reproduced."""
    import os
    import subprocess
    import sys

    code = "from vft_kernels.testing import stable_seed; print(stable_seed('fused', True, (3, 5, 3)))"
    seen = set()
    for hash_seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        seen.add(int(r.stdout))
    assert seen == {testing.stable_seed("fused", True, (3, 5, 3))}
    assert 0 <= testing.stable_seed("x") < 2**16 and testing.stable_seed("fused", True) != testing.stable_seed(
        "fused", False)


def test_no_test_seeds_with_the_builtin_hash():
    """No test calls the builtin hash(): its value for strings changes from process to process."""
    import ast
    import pathlib

    calls = []
    for path in sorted(pathlib.Path(__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hash":
                calls.append(f"{path.name}:{node.lineno}")
    assert not calls, "hash() in tests: " + ", ".join(calls)
