"""FSQ benchmark cases: forward and forward+backward, tokens x 6 dims, levels (8,8,8,5,5,5).

Providers: the eager reference (baseline), torch.compile of the reference, the vft kernel
backends of the device (cpu; triton and cuda on GPU), and vector_quantize_pytorch's FSQ
when it is installed; "cpu (kernel only)" (and cuda) is the kernel writing into warm,
preallocated outputs. "outputs: allocate + touch" is the floor a fresh-output op cannot
beat with torch's allocator (what eager and compiled code pay): it allocates what the op
returns (codes and indices; for forward+backward also grad_z) with ``torch.empty`` and
writes every byte once, nothing else. "outputs: allocate + touch (vft allocator)" is the
same with the allocator vft's CPU kernels use for their outputs (``dispatch.empty_output``:
32 MiB and larger on transparent huge pages where the OS allows), the floor of the cpu
rows. bfloat16 cases keep codes (and the
gradients) in bfloat16, as a bf16 model does (``out_dtype=z.dtype``); each has a "cpu(float32
inputs)" row, the same op on float32 copies, so the bf16 gain is a same-run ratio.
bytes (for GB/s): forward reads z and writes codes and indices (int32); forward+backward
also reads the upstream gradient and z and writes grad_z.
"""
from __future__ import annotations

import functools

import torch

import vft_kernels as vk
from vft_kernels import dispatch
from vft_kernels.reference import fsq as ref

from .common import Case, Context

LEVELS = (8, 8, 8, 5, 5, 5)
TOKENS = {"16K": 16 * 1024, "256K": 256 * 1024, "4M": 4 * 1024 * 1024}


@functools.lru_cache(maxsize=1)
def _compiled_reference():
    # One specialisation per (shape, dtype, grad mode): 12 in the full run, more than
    # dynamo's default recompile limit (8), after which it would silently run eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(ref.fsq_forward, dynamic=False)


def _vqp_fsq(device):
    try:
        from vector_quantize_pytorch import FSQ
    except ImportError:
        return None
    return FSQ(list(LEVELS)).to(device)


def _codes_dtype(z):
    return None if z.dtype == torch.float32 else z.dtype


def _providers(ctx: Context):
    """name -> callable(z) -> (codes, indices); codes in z's dtype."""
    out = {
        "reference": lambda z: ref.fsq_forward(z, LEVELS, codes_dtype=_codes_dtype(z)),
        "compile(reference)": lambda z: _compiled_reference()(z, LEVELS, codes_dtype=_codes_dtype(z)),
    }
    for backend in dispatch.PRIORITY.get(ctx.device.type, ()):
        if backend == "reference" or dispatch.backend_status(backend) is not None:
            continue
        probe = (torch.empty(1, 6, device=ctx.device), LEVELS, 1e-3, torch.float32)
        if dispatch._try("fsq_forward", backend, ctx.device, probe, {})[0] is None:
            continue

        def run(z, backend=backend):
            with vk.use_backend(backend):
                return vk.fsq_quantize(z, LEVELS, out_dtype=_codes_dtype(z))

        out[backend] = run
    if not ctx.quick:
        fsq = _vqp_fsq(ctx.device)
        if fsq is not None:
            out["vector_quantize_pytorch.FSQ"] = lambda z: fsq(z.unsqueeze(0))
    return out


def _forward_case(fn, z):
    def call():
        with torch.no_grad():
            return fn(z)

    return call


def _floor_case(z, backward: bool, empty=torch.empty):
    """Allocate the op's fresh outputs with ``empty(shape, dtype=, device=)`` and write each
    once (``fill_``): what any op that returns new tensors pays before computing anything
    (on CPU mostly first-touch page faults at 4M tokens)."""
    def call():
        outs = [empty(z.shape, dtype=z.dtype, device=z.device),
                empty(z.shape[:-1], dtype=ref.index_dtype(LEVELS), device=z.device)]
        if backward:
            outs.append(empty(z.shape, dtype=z.dtype, device=z.device))
        for t in outs:
            t.fill_(1)
        return outs

    return call


def _kernel_only_case(z):
    """The C++ kernel writing into outputs allocated (and touched) once: no first-touch page
    faults of fresh outputs, which dominate at 4M tokens on CPU."""
    from vft_kernels.cpp.fsq import fsq_forward_into

    codes = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    indices = torch.zeros(z.shape[:-1], dtype=ref.index_dtype(LEVELS), device=z.device)
    codes.zero_()
    return lambda: fsq_forward_into(z, LEVELS, 1e-3, codes, indices)


def _forward_backward_case(fn, z, g):
    leaf = z.detach().clone().requires_grad_()

    def call():
        leaf.grad = None
        codes = fn(leaf)[0]
        codes.backward(g.reshape(codes.shape).to(codes.dtype))
        return leaf.grad

    return call


def cases(ctx: Context) -> list[Case]:
    shapes = ["16K", "256K"] if ctx.quick else list(TOKENS)
    dtypes = [torch.float32] if ctx.quick else [torch.float32, torch.bfloat16]
    out = []
    providers = _providers(ctx)
    for shape in shapes:
        n = TOKENS[shape]
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(0)
            z = (torch.randn(n, len(LEVELS), generator=gen) * 2).to(ctx.device, dtype)
            g = torch.randn(n, len(LEVELS), generator=gen).to(ctx.device)
            e = z.element_size()
            fwd_bytes = 2 * z.numel() * e + n * 4  # codes in z's dtype
            bwd_bytes = fwd_bytes + 3 * z.numel() * e
            label = f"{shape} x {len(LEVELS)}"
            dt = str(dtype).replace("torch.", "")
            for name, fn in providers.items():
                out.append(Case("fsq", "forward", label, dt, name, _forward_case(fn, z), bytes=fwd_bytes))
                out.append(Case("fsq", "forward+backward", label, dt, name,
                                _forward_backward_case(fn, z, g.to(dtype)), bytes=bwd_bytes))
                if name in ("cpu", "cuda"):
                    out.append(Case("fsq", "forward", label, dt, f"{name} (kernel only)", _kernel_only_case(z),
                                    bytes=fwd_bytes))
                    if dtype != torch.float32:  # the same op on float32 copies: the bf16 gain
                        z32, label32 = z.float(), f"{name}(float32 inputs)"
                        out.append(Case("fsq", "forward", label, dt, label32, _forward_case(fn, z32),
                                        bytes=fwd_bytes))
                        out.append(Case("fsq", "forward+backward", label, dt, label32,
                                        _forward_backward_case(fn, z32, g), bytes=bwd_bytes))
            out.append(Case("fsq", "forward", label, dt, "outputs: allocate + touch", _floor_case(z, False),
                            bytes=fwd_bytes))
            out.append(Case("fsq", "forward+backward", label, dt, "outputs: allocate + touch",
                            _floor_case(z, True), bytes=bwd_bytes))
            if z.device.type == "cpu":
                for name, bwd, nbytes in (("forward", False, fwd_bytes), ("forward+backward", True, bwd_bytes)):
                    out.append(Case("fsq", name, label, dt, "outputs: allocate + touch (vft allocator)",
                                    _floor_case(z, bwd, dispatch.empty_output), bytes=nbytes))
    return out
