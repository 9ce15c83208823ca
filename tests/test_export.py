"""torch.export of the custom ops (test_compile.py covers torch.compile).

Small modules calling vk.fsq_quantize / fsq_indices_to_codes, vk.register_attention,
vk.flow_step (APG with its in-place momentum state, CFG, prefix frames) and
vk.flow_heun_step are exported with a dynamic batch dimension (non-strict and strict),
then run at another batch size and compared with eager (bitwise: the same backend runs).
Also checked: the ops stay opaque nodes of the graph whose fake kernels give the real
outputs' dtypes, the momentum mutation survives functionalization (run_decompositions),
value checks inside the ops still run in the exported program, and save / load."""
import io

import pytest
import torch
from torch.export import Dim, export

import vft_kernels as vk

LEVELS = (8, 5, 5, 5)
LAYOUT = vk.RegisterLayout(2, 5, 3, "block_causal_last")  # N = 16
BATCH = Dim("batch", min=1, max=64)


class Quantize(torch.nn.Module):
    def forward(self, z):
        codes, indices = vk.fsq_quantize(z, LEVELS)
        return codes * 2, indices, vk.fsq_indices_to_codes(indices, LEVELS)


class Attention(torch.nn.Module):
    def forward(self, q, k, v, keep):
        out, lse = vk.register_attention(q, k, v, LAYOUT, keep=keep, return_lse=True)
        return out, lse


class ApgStep(torch.nn.Module):
    def forward(self, x, vc, vu, t, tn, momentum):
        return vk.flow_step(x, vc, t, tn, vu, "apg", scale=3.0, apg_eta=0.2, apg_norm_threshold=2.0,
                            apg_momentum=-0.5, momentum=momentum)


class CfgPrefixStep(torch.nn.Module):
    def forward(self, x, vc, vu, prefix):
        return vk.flow_step(x, vc, 0.75, 0.5, vu, "cfg", scale=2.5, prefix=prefix, prefix_len=1)


class HeunStep(torch.nn.Module):
    def forward(self, x, v1, v2, t, tn):
        return vk.flow_heun_step(x, v1, v2, t, tn)


def _times(B):
    t = torch.rand(B) * 0.5 + 0.5
    return t, t - 0.25


def _inputs(name, B):
    """Example inputs for batch size B (random, non-zero)."""
    if name == "fsq":
        return (torch.randn(B, 7, 4) * 2,)
    if name == "attention":
        q, k, v = (torch.randn(B, 2, LAYOUT.seq_len, 8) for _ in range(3))
        return q, k, v, torch.randint(0, LAYOUT.registers + 1, (B,), dtype=torch.int32)
    shape = (B, 3, 4, 5, 2)
    if name == "apg":
        return tuple(torch.randn(shape) for _ in range(3)) + _times(B) + (torch.randn(shape),)
    if name == "cfg_prefix":
        return tuple(torch.randn(shape) for _ in range(3)) + (torch.randn(B, 3, 1, 5, 2),)
    return tuple(torch.randn(shape) for _ in range(3)) + _times(B)


CASES = {  # name: (module, op names that must appear in the graph)
    "fsq": (Quantize, ("fsq_quantize", "fsq_indices_to_codes")),
    "attention": (Attention, ("register_attention",)),
    "apg": (ApgStep, ("flow_step",)),
    "cfg_prefix": (CfgPrefixStep, ("flow_step",)),
    "heun": (HeunStep, ("flow_heun_step",)),
}


def _export(name, strict=False):
    module_cls, _ = CASES[name]
    example = _inputs(name, 3)
    return export(module_cls(), example, dynamic_shapes=[{0: BATCH}] * len(example), strict=strict)


def _vft_nodes(ep):
    return [n for n in ep.graph.nodes if n.op == "call_function" and str(n.target).startswith("vft.")]


def _clone(args):
    return tuple(a.clone() for a in args)


def _flat(out):
    return out if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("name", list(CASES))
def test_export_dynamic_batch_matches_eager(name, strict):
    module_cls, ops = CASES[name]
    ep = _export(name, strict)
    nodes = _vft_nodes(ep)
    assert sorted({str(n.target).split(".")[1] for n in nodes}) == sorted(ops), ep.graph
    exported = ep.module()
    for B in (5, 1):  # neither is the traced batch size 3
        args = _inputs(name, B)
        a_eager, a_exported = _clone(args), _clone(args)
        want = _flat(module_cls()(*a_eager))
        got = _flat(exported(*a_exported))
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape and g.dtype == w.dtype, f"output {i}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
            assert torch.equal(g, w), f"output {i} differs from eager at batch {B}"
        for i, (g, w) in enumerate(zip(a_exported, a_eager)):  # in-place state (APG momentum) updated alike
            assert torch.equal(g, w), f"input {i} after the call differs from eager"
    if name == "apg":
        assert not torch.equal(a_exported[-1], args[-1]), "the momentum state was not updated in place"


@pytest.mark.parametrize("name", ["fsq", "attention"])
def test_fake_kernels_give_the_real_output_dtypes_and_symbolic_batch(name):
    """The exported graph's metadata (from the register_fake kernels) agrees with the real
    outputs: dtype (int32 indices, float32 lse), rank and a symbolic batch dimension."""
    module_cls, _ = CASES[name]
    ep = _export(name)
    (out_node,) = [n for n in ep.graph.nodes if n.op == "output"]
    metas = [a.meta["val"] for a in out_node.args[0]]
    real = _flat(module_cls()(*_inputs(name, 2)))
    for meta, r in zip(metas, real):
        assert meta.dtype == r.dtype and meta.dim() == r.dim()
        assert isinstance(meta.shape[0], torch.SymInt), f"batch dim specialised to {meta.shape[0]}"
        assert tuple(meta.shape[1:]) == tuple(r.shape[1:])


def test_momentum_mutation_survives_run_decompositions():
    ep = _export("apg").run_decompositions()
    sig = ep.graph_signature
    mutated = set(sig.user_inputs_to_mutate.values())
    assert mutated == {"momentum"}, f"mutated inputs {mutated}"
    args = _inputs("apg", 4)
    a_eager, a_exported = _clone(args), _clone(args)
    assert torch.equal(ep.module()(*a_exported), ApgStep()(*a_eager))
    assert torch.equal(a_exported[-1], a_eager[-1]) and not torch.equal(a_exported[-1], args[-1])


def test_value_checks_run_inside_the_exported_program():
    attention = _export("attention").module()
    q, k, v, _ = _inputs("attention", 2)
    with pytest.raises(ValueError, match=r"keep values must be in \[0, R=3\], got 4"):
        attention(q, k, v, torch.tensor([1, 4], dtype=torch.int32))
    heun = _export("heun").module()
    x, v1, v2, t, _ = _inputs("heun", 2)
    with pytest.raises(ValueError, match="t_next must be < t"):
        heun(x, v1, v2, t, t + 0.1)


@pytest.mark.parametrize("name", ["fsq", "attention", "apg"])
def test_save_and_load(name):
    buf = io.BytesIO()
    torch.export.save(_export(name), buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    args = _inputs(name, 2)
    a_eager, a_loaded = _clone(args), _clone(args)
    for g, w in zip(_flat(loaded(*a_loaded)), _flat(CASES[name][0]()(*a_eager))):
        assert torch.equal(g, w)
    assert all(torch.equal(g, w) for g, w in zip(a_loaded, a_eager))
