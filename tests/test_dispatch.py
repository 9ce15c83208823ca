"""Backend registry and selection (DESIGN.md, Backends): available_backends, use_backend,
VFT_BACKEND, quiet fallback, loud forced failures, output poisoning, `python -m vft_kernels.info`."""
import os
import subprocess
import sys
import types

import pytest
import torch

import vft_kernels as vk
from vft_kernels import dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _automatic(monkeypatch):
    monkeypatch.delenv("VFT_BACKEND", raising=False)
    with vk.use_backend(None):
        yield


def test_available_backends_structure():
    table = vk.available_backends()
    assert set(table) == set(dispatch.OPS)
    for op, per_device in table.items():
        assert "cpu" in per_device
        assert set(per_device) <= {"cpu", "cuda"}
        assert ("cuda" in per_device) == torch.cuda.is_available()
        for dev, names in per_device.items():
            assert isinstance(names, list) and names, (op, dev)
            assert names[-1] == "reference", (op, dev, names)
            order = dispatch.PRIORITY[dev]
            assert names == sorted(names, key=order.index), (op, dev, names)  # priority order
            assert len(set(names)) == len(names)
            for name in names:  # each listed backend really loads
                assert dispatch.explain(op, dev)[order.index(name)] == (name, None)


def test_use_backend_function_and_context_manager():
    assert dispatch.forced_backend() is None
    vk.use_backend("reference")
    try:
        assert dispatch.forced_backend() == "reference"
        with vk.use_backend(None):
            assert dispatch.forced_backend() is None
            with vk.use_backend("reference") as cm:
                assert cm is not None and dispatch.forced_backend() == "reference"
            assert dispatch.forced_backend() is None
        assert dispatch.forced_backend() == "reference"
        with pytest.raises(RuntimeError):
            with vk.use_backend(None):
                raise RuntimeError("boom")
        assert dispatch.forced_backend() == "reference"  # restored on exceptions too
    finally:
        vk.use_backend(None)
    assert dispatch.forced_backend() is None


def test_env_var_forces_and_use_backend_overrides(monkeypatch):
    monkeypatch.setenv("VFT_BACKEND", "reference")
    assert dispatch.forced_backend() == "reference"
    name, _ = dispatch.select("fsq_forward", torch.device("cpu"), torch.randn(2, 3), (3, 3, 3), 1e-3, torch.float32)
    assert name == "reference"
    with vk.use_backend("reference"):
        assert dispatch.forced_backend() == "reference"
    monkeypatch.setenv("VFT_BACKEND", "cuda")
    with vk.use_backend("reference"):  # the explicit choice wins over the environment
        vk.fsq_quantize(torch.randn(2, 3), (3, 3, 3))
    monkeypatch.setenv("VFT_BACKEND", "")
    assert dispatch.forced_backend() is None


def test_forced_reference_runs_every_op():
    layout = vk.RegisterLayout(2, 3, 1)
    q, k, v = (torch.randn(1, 1, layout.seq_len, 4, requires_grad=True) for _ in range(3))
    z = torch.randn(5, 3, requires_grad=True)
    x = torch.randn(2, 1, 2, 3)
    with vk.use_backend("reference"):
        codes, idx = vk.fsq_quantize(z, (3, 4, 5))
        codes.sum().backward()
        vk.fsq_indices_to_codes(idx, (3, 4, 5))
        vk.register_attention(q, k, v, layout).sum().backward()
        vk.flow_step(x, x, 0.5, 0.25, x, "apg", 2.0)
        vk.flow_heun_step(x, x, x, 0.5, 0.25)
    assert z.grad is not None and q.grad is not None
    for op in dispatch.OPS:
        assert dispatch._try(op, "reference", torch.device("cpu"), (), {})[1] is None


@pytest.fixture
def fake_backend(monkeypatch):
    """A `cpu` fsq_forward kernel that supports only float16 and counts its calls."""
    mod = types.ModuleType("vft_fake_backend")
    mod.calls = 0

    def fsq_forward(z, levels, eps, codes_dtype):
        mod.calls += 1
        from vft_kernels.reference.fsq import fsq_forward as ref
        return ref(z, levels, eps, codes_dtype)

    def supports_fsq_forward(z, levels, eps, codes_dtype):
        return None if z.dtype == torch.float16 else f"dtype {z.dtype} not supported"

    mod.fsq_forward, mod.supports_fsq_forward = fsq_forward, supports_fsq_forward
    monkeypatch.setitem(sys.modules, "vft_fake_backend", mod)
    monkeypatch.setitem(dispatch._REGISTRY, ("fsq_forward", "cpu"),
                        dispatch._Entry("vft_fake_backend:fsq_forward", ("cpu",),
                                        "vft_fake_backend:supports_fsq_forward"))
    monkeypatch.setattr(dispatch, "backend_status", lambda b: None if b in ("reference", "cpu") else "off")
    return mod


def test_automatic_selection_and_quiet_fallback(fake_backend):
    vk.fsq_quantize(torch.randn(3, 2).half(), (3, 3))
    assert fake_backend.calls == 1                  # the first backend in priority order that fits
    vk.fsq_quantize(torch.randn(3, 2), (3, 3))      # float32: unsupported -> reference, quietly
    assert fake_backend.calls == 1
    assert dispatch.select("fsq_forward", torch.device("cpu"), torch.randn(1, 2), (3, 3), 1e-3, None)[0] == "reference"


def test_forced_backend_that_does_not_support_the_call(fake_backend):
    with vk.use_backend("cpu"):
        vk.fsq_quantize(torch.randn(3, 2).half(), (3, 3))
        assert fake_backend.calls == 1
        with pytest.raises(vk.BackendUnavailableError) as e:
            vk.fsq_quantize(torch.randn(3, 2), (3, 3))
    assert "'cpu'" in str(e.value) and "dtype torch.float32 not supported" in str(e.value)


def test_unloadable_backend_falls_back_and_forced_reports(monkeypatch):
    from vft_kernels.ops import flow as flow_ops

    monkeypatch.setitem(dispatch._REGISTRY, ("flow_heun_step", "cpu"),
                        dispatch._Entry("vft_no_such_module:flow_heun_step", ("cpu",)))
    monkeypatch.setattr(dispatch, "backend_status", lambda b: None if b in ("reference", "cpu") else "off")
    # the registry's path (the C++ fast path, which needs _C itself, is tested in test_flow_kernels.py)
    monkeypatch.setattr(flow_ops, "_FAST_HEUN", None)
    x = torch.randn(2, 1, 2, 2)
    torch.testing.assert_close(vk.flow_heun_step(x, x, x, 1.0, 0.5), x * 0.5)
    assert "cpu" not in vk.available_backends()["flow_heun_step"]["cpu"]
    with vk.use_backend("cpu"):
        with pytest.raises(vk.BackendUnavailableError) as e:
            vk.flow_heun_step(x, x, x, 1.0, 0.5)
    assert "vft_no_such_module" in str(e.value) and "could not be loaded" in str(e.value)


def test_nothing_fits_lists_every_reason(monkeypatch):
    monkeypatch.setattr(dispatch, "PRIORITY", {"cpu": ("cpu",)})
    monkeypatch.setattr(dispatch, "backend_status", lambda b: f"{b} switched off for the test")
    with pytest.raises(vk.BackendUnavailableError) as e:
        dispatch.select("fsq_decode", torch.device("cpu"), torch.zeros(2, dtype=torch.int32), (3,))
    assert "cpu: cpu switched off for the test" in str(e.value)


def test_poison_outputs():
    with dispatch.poison_outputs(True):
        f = dispatch.new_output((3, 4), torch.float16, "cpu")
        i = dispatch.new_output((5,), torch.int32, "cpu")
        assert f.dtype == torch.float16 and f.shape == (3, 4) and bool(torch.isnan(f).all())
        assert i.dtype == torch.int32 and bool((i == dispatch.INT_POISON).all())
        assert dispatch.INT_POISON < -1  # neither a valid FSQ index nor the NaN-row marker -1
        with dispatch.poison_outputs(False):
            assert not dispatch.poisoning()
            assert dispatch.new_output((2,), torch.float32, "cpu").shape == (2,)
        assert dispatch.poisoning()
    # the conftest fixture keeps tests poisoned
    assert dispatch.poisoning()


def test_info_prints_backend_table():
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("VFT_BACKEND", None)
    res = subprocess.run([sys.executable, "-m", "vft_kernels.info"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"torch       {torch.__version__}" in out
    assert "_C" in out and "automatic" in out
    for op in dispatch.OPS:
        assert f"  {op}" in out, op
        rows = [line.split() for line in out.splitlines() if line.split()[:3] == [op, "cpu", "->"]]
        assert len(rows) == 1 and rows[0][3] == vk.available_backends()[op]["cpu"][0], (op, rows)


def test_info_report_shows_forced_backend(monkeypatch):
    from vft_kernels import info

    monkeypatch.setenv("VFT_BACKEND", "reference")
    assert "forced: reference" in info.report()


def test_backward_runs_under_the_forward_dispatch_state_on_another_thread():
    """autograd may run an op's backward on its own thread (CUDA's device threads), where the
    thread-local use_backend / poison_outputs are unset: the backward must still use the
    forward's forced backend (recorded in the autograd context)."""
    import threading

    import vft_kernels as vk

    calls = []
    entry = dispatch._REGISTRY[("attention_backward", "reference")]
    fsq_entry = dispatch._REGISTRY[("fsq_backward", "reference")]
    entry.load(), fsq_entry.load()
    original, fsq_original = entry._fn, fsq_entry._fn

    def spy(*args, **kwargs):
        calls.append(("attention", dispatch.forced_backend(), dispatch.poisoning()))
        return original(*args, **kwargs)

    def fsq_spy(*args, **kwargs):
        calls.append(("fsq", dispatch.forced_backend(), dispatch.poisoning()))
        return fsq_original(*args, **kwargs)

    layout = vk.RegisterLayout(2, 3, 2)
    q, k, v = (torch.randn(2, 1, layout.seq_len, 8, requires_grad=True) for _ in range(3))
    z = torch.randn(4, 3, requires_grad=True)
    entry._fn, fsq_entry._fn = spy, fsq_spy
    try:
        with vk.use_backend("reference"), dispatch.poison_outputs(False):
            out = vk.register_attention(q, k, v, layout)
            codes, _ = vk.fsq_quantize(z, (5, 5, 5))
        errors = []

        def run():  # a thread with no use_backend of its own, as autograd's device threads
            try:
                torch.autograd.grad((out.sum(), codes.sum()), (q, z))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        t.join()
    finally:
        entry._fn, fsq_entry._fn = original, fsq_original
    assert not errors, errors
    assert sorted(calls) == [("attention", "reference", False), ("fsq", "reference", False)], calls


def test_memoised_selection_follows_the_forced_backend(monkeypatch):
    """flow_step memoises its backend choice per dtype / shape; forcing another backend
    afterwards (use_backend) still takes effect, and float times give the same step as
    tensor times."""
    from vft_kernels.ops import flow as flow_ops

    if dispatch.backend_status("cpu") is not None:
        pytest.skip("cpu backend not built")
    calls = {}
    for backend in ("reference", "cpu"):
        entry = dispatch._REGISTRY[("flow_step", backend)]
        assert entry.load() is None
        real = entry._fn

        def spy(*args, _real=real, _name=backend):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args)

        monkeypatch.setattr(entry, "_fn", spy)
    monkeypatch.setattr(dispatch, "_SELECTED", {})  # forget choices memoised before the spies
    # the checked path's memo (the C++ fast path, which runs eager CPU calls without it, is
    # tested in test_flow_kernels.py)
    monkeypatch.setattr(flow_ops, "_FAST", None)
    x, v = torch.randn(3, 2, 5, 2), torch.randn(3, 2, 5, 2)
    a = vk.flow_step(x, v, 0.75, 0.5)
    a2 = vk.flow_step(x, v, 0.75, 0.5)
    with vk.use_backend("reference"):
        b = vk.flow_step(x, v, torch.full((3,), 0.75), torch.full((3,), 0.5))
    assert calls == {"cpu": 2, "reference": 1}
    torch.testing.assert_close(a, b)
    assert torch.equal(a, a2)
    for i in range(2 * flow_ops._MAX_TIMES):  # the float-time memo stays bounded
        flow_ops._float_times(i / 7, 3, x.device, x)
    assert len(flow_ops._TIMES) <= flow_ops._MAX_TIMES
    assert torch.equal(flow_ops._float_times(0.75, 3, x.device, x), torch.full((3,), 0.75))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # tracing: nothing fake may enter the memo
        flow_ops._float_times(0.3125, 3, x.device, mode.from_tensor(x))
    assert (0.3125, 3, x.device) not in flow_ops._TIMES


def test_block_ops_share_the_dispatch_memo(monkeypatch):
    """The transformer-block ops select their backend through dispatch's one memo: forgetting
    it (as the tests above do before installing spies) makes the next block call select again."""
    x, scale, shift = torch.randn(2, 1, 5, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    first = vk.modulated_layer_norm(x, scale=scale, shift=shift, layout=3)  # memoised now
    selected = []
    real = dispatch.select

    def spy(op, device, *args, **kwargs):
        selected.append(op)
        return real(op, device, *args, **kwargs)

    monkeypatch.setattr(dispatch, "select", spy)
    monkeypatch.setattr(dispatch, "_SELECTED", {})
    again = vk.modulated_layer_norm(x, scale=scale, shift=shift, layout=3)
    assert selected == ["block_norm_forward"]
    vk.modulated_layer_norm(x, scale=scale, shift=shift, layout=3)
    assert selected == ["block_norm_forward"]  # and memoised again
    assert torch.equal(first, again)


def test_the_huge_page_threshold_comes_from_the_extension(monkeypatch):
    """empty_output puts CPU outputs on _C.empty_cpu from the size the extension reports
    (vft::kHugeMinBytes in alloc.h), not from a second copy of the number in Python."""
    from vft_kernels import _ext

    calls = []

    class FakeC:
        @staticmethod
        def huge_pages():
            return {"mode": "madvise", "used": True, "min_bytes": 1 << 20}

        @staticmethod
        def empty_cpu(shape, dtype):
            calls.append((tuple(shape), dtype))
            return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(_ext, "C", FakeC)
    assert dispatch.huge_min_bytes() == 1 << 20
    dispatch.empty_output((1 << 18,), torch.float32, "cpu")  # exactly 1 MiB
    dispatch.empty_output(((1 << 18) - 1,), torch.float32, "cpu")  # one element less
    assert calls == [((1 << 18,), torch.float32)]
    monkeypatch.setattr(_ext, "C", None)  # no extension: torch.empty for every size
    assert dispatch.huge_min_bytes() == float("inf")
    assert dispatch.empty_output((1 << 24,), torch.float32, "cpu").shape == (1 << 24,)
    assert len(calls) == 1
