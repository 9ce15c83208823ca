"""The C++ entry points (vft_kernels._C) do not trust their caller.

Every CPU binding is called once the way the Python layer calls it (arguments recorded by
spies around the bindings during real op calls), then again with one tensor argument
broken at a time:

* ``meta``: on another device (no storage: a kernel that reads it would crash);
* ``dtype``: float64 for a float tensor, float32 for an integer one;
* ``short``: one row fewer along dim 0;
* ``strided``: the same values, not contiguous;
* ``negative`` / ``overflow`` (the sizes list of ``empty_cpu``): an entry of -1 / sizes whose
  product overflows int64.

All but ``strided`` must raise ValueError naming the argument's problem; ``strided`` must
raise ValueError or give exactly the valid call's outputs. The flow ops' fast paths
(``flow_step_fast``, ``flow_heun_step_fast``) instead decline every broken call: it returns None, runs nothing,
and the Python layer's checks take over. The calls run in a child
process, so a crash (what these checks exist to prevent) fails the test with the call
that crashed instead of killing pytest.
"""
import json
import os
import subprocess
import sys

import pytest

from vft_kernels import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import json, sys
import torch
import vft_kernels as vk
from vft_kernels import _ext
from vft_kernels.cpp import attention as catt, block as cblock, flow as cflow, fsq as cfsq

torch.manual_seed(0)
calls = []  # (name, fn, args)


def spy(name, fn):
    def wrapper(*args):
        calls.append((name, fn, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)))
        return fn(*args)
    return wrapper


f, b, dec = cfsq._KERNELS["cpu"]
cfsq._KERNELS["cpu"] = (spy("fsq_forward_cpu", f), spy("fsq_backward_cpu", b), spy("fsq_decode_cpu", dec))
s, h = cflow._KERNELS["cpu"]
cflow._KERNELS["cpu"] = (spy("flow_step_cpu", s), spy("flow_heun_step_cpu", h))
from vft_kernels.ops import flow as fops


def fast_spy(name, real):  # the op layer's fast paths: recorded when they ran a step
    def wrapper(*args):
        saved = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        res = real(*args)
        if res is not None:
            calls.append((name, real, saved))
        return res
    return wrapper


fops._FAST = fast_spy("flow_step_fast", fops._fast_entry())
fops._FAST_HEUN = fast_spy("flow_heun_step_fast", fops._fast_heun_entry())
catt._forward_cpu = spy("attention_forward_cpu", catt._forward_cpu)
catt._backward_cpu = spy("attention_backward_cpu", catt._backward_cpu)
cblock._norm_fwd = spy("block_norm_forward_cpu", cblock._norm_fwd)
cblock._norm_bwd = spy("block_norm_backward_cpu", cblock._norm_bwd)
cblock._swiglu_fwd = spy("swiglu_forward_cpu", cblock._swiglu_fwd)
cblock._swiglu_bwd = spy("swiglu_backward_cpu", cblock._swiglu_bwd)
cblock._qk_fwd = spy("qk_norm_forward_cpu", cblock._qk_fwd)
cblock._qk_bwd = spy("qk_norm_backward_cpu", cblock._qk_bwd)
_ext.C.empty_cpu = spy("empty_cpu", _ext.C.empty_cpu)

with vk.use_backend("cpu"):
    z = (torch.randn(5, 7, 4) * 2).requires_grad_()
    codes, idx = vk.fsq_quantize(z, (8, 5, 5, 5))
    codes.backward(torch.randn_like(codes))
    vk.fsq_indices_to_codes(idx, (8, 5, 5, 5))
    layout = vk.RegisterLayout(3, 5, 2, "block_causal_last")
    q, k, v = (torch.randn(2, 2, layout.seq_len, 16, requires_grad=True) for _ in range(3))
    out = vk.register_attention(q, k, v, layout, keep=torch.tensor([1, 2]))
    out.backward(torch.randn_like(out))
    cu = [0, 14, 21]
    qp, kp, vp = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))
    outp = vk.register_attention(qp, kp, vp, vk.RegisterLayout(2, 5, 2, "block_causal"), keep=torch.tensor([2, 1]),
                                 cu_seqlens=cu)
    outp.backward(torch.randn_like(outp))
    x = torch.randn(3, 4, 3, 5, 5)
    buf = torch.zeros_like(x)
    t, tn = torch.full((3,), 0.8), torch.full((3,), 0.6)
    # a strided velocity: the checked path (flow_step_cpu); the cfg call below takes the fast path
    vc = torch.randn(3, 4, 3, 5, 5).transpose(3, 4)
    vk.flow_step(x, vc, t, tn, v_uncond=torch.randn_like(x), guidance="apg", scale=2.0,
                 apg_momentum=0.5, momentum=buf, prefix=torch.randn(3, 4, 1, 5, 5), prefix_len=1)
    vk.flow_step(x, torch.randn_like(x), t, tn, v_uncond=torch.randn_like(x), guidance="cfg", scale=2.0)
    vk.flow_heun_step(x, torch.randn_like(x), torch.randn_like(x), t, tn)  # the fast path
    vk.flow_heun_step(x, vc, torch.randn_like(x), t, tn)  # strided v1: the checked path
    # block ops: K = 2 modulations (patch / register rows), every input differentiable
    lay = vk.RegisterLayout(2, 3, 2, "block_causal_last")
    xb = torch.randn(2, 2, 5, 8, requires_grad=True)
    gate, scale, shift = (torch.randn(2, 2, 2, 8, requires_grad=True) for _ in range(3))
    hb = torch.randn(2, 2, 5, 8, requires_grad=True)
    x_new, yb = vk.gated_residual_norm(xb, gate, hb, lay, scale=scale, shift=shift)
    (x_new * torch.randn_like(x_new)).sum().add((yb * torch.randn_like(yb)).sum()).backward()
    gu = torch.randn(3, 4, 12, requires_grad=True)
    sw = vk.swiglu(gu)
    sw.backward(torch.randn_like(sw))
    qkv = torch.randn(2, 5, 3 * 2 * 8, requires_grad=True)
    qw, kw = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    qn = vk.qk_rms_norm(qkv, 2, qw, kw)
    sum((t * torch.randn_like(t)).sum() for t in qn).backward()
# a kernel output of >= 32 MiB comes from empty_cpu
vk.fsq_quantize(torch.randn(1 << 21, 4), (8, 5, 5, 5))

names = sorted({c[0] for c in calls})
want = sys.argv[1].split(",")
missing = sorted(set(want) - set(names))
if missing:
    print(json.dumps({"missing": missing, "recorded": names}), flush=True)
    sys.exit(3)


def clone_args(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def strided(t):
    big = torch.empty(t.shape + (2,), dtype=t.dtype)
    big[..., 0] = t
    return big[..., 0]


def broken(t, how):
    if how == "meta":
        return t.to("meta")
    if how == "dtype":
        return t.double() if t.dtype.is_floating_point else t.float()
    if how == "short":
        return t[:-1].clone() if t.dim() >= 1 and t.shape[0] >= 1 else None
    if how == "strided":
        return strided(t) if t.numel() > 1 else None


def broken_sizes(a, how):
    if how == "negative":
        return [-1] + list(a[1:])
    if how == "overflow":
        return [1 << 62] + [max(int(n), 4) for n in a[1:]] if len(a) >= 2 else [1 << 62, 4]


report = []
seen = set()
for name, fn, args in calls:
    if name in seen:  # the first call of each binding (the packed attention call is its second)
        continue
    seen.add(name)
    ok_args = clone_args(args)
    fn(*ok_args)  # the valid call succeeds
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            hows, make = ("meta", "dtype", "short", "strided"), broken
        elif name == "empty_cpu" and isinstance(a, list):  # the sizes of an allocation
            hows, make = ("negative", "overflow"), broken_sizes
        else:
            continue
        for how in hows:
            bad = clone_args(args)
            bad[i] = make(a, how)
            if bad[i] is None:
                continue
            print(f"CALL {name} arg {i} {how}", flush=True)  # last line before a crash
            try:
                got = fn(*bad)
                res = "returned"
                if name.endswith("_fast"):  # declines (None) instead of raising
                    res = "returned-None" if got is None else "returned-tensor"
                elif how == "strided":
                    same = all(not isinstance(x, torch.Tensor) or torch.equal(x.nan_to_num(), y.nan_to_num())
                               for x, y in zip(bad, ok_args))
                    res = "returned-same" if same else "returned-different"
            except ValueError as e:
                res = "ValueError: " + str(e).splitlines()[0][:200]
            except Exception as e:  # noqa: BLE001 - reported and judged by the parent
                res = f"{type(e).__name__}: " + str(e).splitlines()[0][:200]
            report.append({"binding": name, "arg": i, "how": how, "result": res})
print("REPORT " + json.dumps(report), flush=True)
'''

BINDINGS = ["fsq_forward_cpu", "fsq_backward_cpu", "fsq_decode_cpu", "attention_forward_cpu",
            "attention_backward_cpu", "flow_step_cpu", "flow_heun_step_cpu", "flow_step_fast",
            "flow_heun_step_fast", "block_norm_forward_cpu", "block_norm_backward_cpu", "swiglu_forward_cpu",
            "swiglu_backward_cpu", "qk_norm_forward_cpu", "qk_norm_backward_cpu", "empty_cpu"]


@pytest.mark.skipif(_ext.C is None, reason=f"vft_kernels._C did not load: {_ext.load_error}")
def test_every_cpu_binding_rejects_broken_arguments_without_crashing():
    proc = subprocess.run([sys.executable, "-c", CHILD, ",".join(BINDINGS)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0:
        last = [ln for ln in lines if ln.startswith("CALL ")][-1:] or lines[-1:]
        raise AssertionError(f"child exited with {proc.returncode} (negative = killed by a signal) at {last}:\n"
                             f"{proc.stderr[-3000:]}")
    report = json.loads(lines[-1][len("REPORT "):])
    assert {r["binding"] for r in report} == set(BINDINGS)
    bad = []
    for r in report:
        res = r["result"]
        if r["binding"].endswith("_fast"):  # never raises: declines every broken call
            if res != "returned-None":
                bad.append(r)
        elif r["how"] == "strided":
            if not (res.startswith("ValueError") or res == "returned-same"):
                bad.append(r)
        elif not res.startswith("ValueError"):
            bad.append(r)
    assert not bad, "bindings that accepted or mishandled a broken argument:\n" + "\n".join(map(json.dumps, bad))
