"""The CPU capability (ISA variant) of the C++ kernels: selection, caps, errors, info, what the
compiled objects contain, and that nothing runs when vft_kernels._C loads. Results per
capability: test_cpu_variants.py."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from vft_kernels import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_c = pytest.mark.skipif(_ext.C is None, reason=f"vft_kernels._C did not load: {_ext.load_error}")


def _child(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, **env))


@needs_c
def test_loading_runs_no_matrix_product():
    # oneDNN logs every brgemm it runs (ONEDNN_VERBOSE=all): none may run before the first
    # attention call (the tile-product probe is lazy), and the call itself does run them.
    code = ("import vft_kernels._C\nprint('LOADED', flush=True)\nimport torch, vft_kernels as vk\n"
            "q = torch.randn(1, 1, 70, 16)\n"
            "with vk.use_backend('cpu'):\n"
            "    vk.register_attention(q, q, q, vk.RegisterLayout(1, 70, 0, 'full'))\n"
            "print('CALLED', flush=True)\n")
    proc = _child(code, ONEDNN_VERBOSE="all")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    loaded = lines.index("LOADED")
    assert not [ln for ln in lines[:loaded] if "brgemm" in ln], "a brgemm ran while _C loaded"
    if any("brgemm" in ln for ln in lines):  # torch's brgemm runs here: it was used, after loading
        assert [ln for ln in lines[loaded:] if "brgemm" in ln]


def _capabilities():
    import vft_kernels as vk

    return vk.cpu_capabilities()


@needs_c
def test_capability_api_switches_this_thread_only():
    import threading

    import vft_kernels as vk

    caps = _capabilities()
    assert caps["supported"][0] == "baseline" and caps["default"] in caps["supported"]
    assert vk.cpu_capability() == caps["default"]
    for cap in caps["supported"]:
        with vk.use_cpu_capability(cap) as got:
            assert got == cap and vk.cpu_capability() == cap
            seen = []
            t = threading.Thread(target=lambda: seen.append(vk.cpu_capability()))
            t.start()
            t.join()
            assert seen == [caps["default"]]  # another thread keeps the process-wide level
            with vk.use_cpu_capability("baseline"):  # nests
                assert vk.cpu_capability() == "baseline"
                assert vk.cpu_capabilities()["variant"] == "baseline"
            assert vk.cpu_capability() == cap
        assert vk.cpu_capability() == caps["default"]
    with pytest.raises(ValueError, match="not a CPU capability.*supports baseline"):
        with vk.use_cpu_capability("avx9"):
            pass
    unsupported = [c for c in ("avx2", "avx512", "avx512_bf16", "amx") if c not in caps["supported"]]
    for cap in unsupported:
        with pytest.raises(ValueError, match=f"{cap}: this CPU does not support it; it supports baseline"):
            with vk.use_cpu_capability(cap):
                pass
    assert vk.cpu_capability() == caps["default"]


@needs_c
@pytest.mark.parametrize("value", ["avx9", "AVX2 ", "amx"])
def test_bad_VFT_CPU_CAPABILITY_is_a_clear_error(value):
    if value == "amx" and "amx" in _capabilities()["supported"]:
        pytest.skip("this CPU has AMX")
    code = ("import torch, vft_kernels as vk\n"
            "vk.flow_step(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.5)\n")
    proc = _child(code, VFT_CPU_CAPABILITY=value)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: ") and f"VFT_CPU_CAPABILITY={value}" in last, proc.stderr[-2000:]
    assert "supports baseline" in last


@needs_c
def test_VFT_CPU_CAPABILITY_caps_the_level_and_info_names_it():
    for cap in _capabilities()["supported"]:
        proc = _child("import vft_kernels as vk\nprint(vk.cpu_capability())\n", VFT_CPU_CAPABILITY=cap)
        assert proc.returncode == 0 and proc.stdout.split() == [cap], proc.stderr[-2000:]
    caps = _capabilities()
    proc = _child("from vft_kernels import info\ninfo.main()\n", VFT_CPU_CAPABILITY="baseline")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CPU capability: baseline" in proc.stdout and "runs the baseline variant" in proc.stdout
    assert "capped by VFT_CPU_CAPABILITY=baseline" in proc.stdout
    assert "CPU kernel variants compiled: " + ", ".join(caps["compiled"]).split(",")[0] in proc.stdout
    proc = _child("from vft_kernels import info\ninfo.main()\n")
    assert f"CPU capability: {caps['default']}" in proc.stdout, proc.stdout
    assert f"runs the {caps['variant']} variant" in proc.stdout


# --- what the compiled objects contain --------------------------------------------------

def _objects(unit):
    found = sorted(pathlib.Path(ROOT, "build").glob(f"temp*/**/cpu_{unit}.o"))
    if not found:
        pytest.skip(f"no build/temp*/**/cpu_{unit}.o here (an installed package); built from another tree?")
    return found


def _functions(obj):
    """{function name: [instruction lines]} of an object or library (objdump -d, demangled)."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(obj)], capture_output=True, text=True,
                          check=True).stdout
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
        elif cur is not None and re.match(r"^\s+[0-9a-f]+:\t", line):
            cur.append(line.split("\t", 1)[1].strip())
    return funcs


def _vex(insn):  # any AVX / AVX-512 instruction (VEX / EVEX encoded: v-prefixed mnemonics)
    return insn.startswith("v") or "%ymm" in insn or "%zmm" in insn


def _avx512(insn):
    return "%zmm" in insn or re.search(r"\{%k[0-7]\}|\{1to\d+\}|%k[0-7]\b", insn) is not None


@needs_c
def test_baseline_objects_hold_no_avx_and_avx2_none_of_avx512():
    from vft_kernels import _C

    arch = _C.build_info().get("cpu_arch")
    if arch != "x86-64-v2":
        pytest.skip(f"the baseline was built with -march={arch!r} (VFT_CPU_ARCH), not the portable x86-64-v2")
    base = {}
    for obj in _objects("baseline"):
        base.update(_functions(obj))
    assert len(base) > 100, "the baseline object looks empty"
    bad = {f: [i for i in insns if _vex(i)][:3] for f, insns in base.items() if any(_vex(i) for i in insns)}
    assert not bad, f"baseline (x86-64-v2) code with AVX instructions: {dict(list(bad.items())[:5])}"
    if "avx2" in _capabilities()["compiled"]:
        avx2 = {}
        for obj in _objects("avx2"):
            avx2.update(_functions(obj))
        assert any("%ymm" in i for insns in avx2.values() for i in insns), "the avx2 object has no 256-bit code"
        bad = {f: [i for i in insns if _avx512(i)][:3] for f, insns in avx2.items() if any(_avx512(i) for i in insns)}
        assert not bad, f"avx2 (x86-64-v3) code with AVX-512 instructions: {dict(list(bad.items())[:5])}"
    if "avx512" in _capabilities()["compiled"]:
        avx512 = {}
        for obj in _objects("avx512"):
            avx512.update(_functions(obj))
        assert any("%zmm" in i for insns in avx512.values() for i in insns), "the avx512 object has no 512-bit code"


@needs_c
def test_variant_code_runs_nothing_at_load():
    # The variants' static initialisers (if the headers leave any) run when the library loads,
    # on any CPU: they may hold no AVX instruction.
    for unit in [v for v in _capabilities()["compiled"] if v != "baseline"]:
        for obj in _objects(unit):
            inits = {f: insns for f, insns in _functions(obj).items() if f.startswith("_GLOBAL__sub_I")}
            bad = {f: [i for i in insns if _vex(i)] for f, insns in inits.items() if any(_vex(i) for i in insns)}
            assert not bad, f"{unit}: static initialisers with AVX instructions: {bad}"


@needs_c
def test_only_variant_code_holds_avx512_in_the_library():
    # Inline functions of shared headers that several variants instantiate are kept from the
    # first object linked (setup.py links the baseline first); vft's own helpers are in the
    # variants' namespaces. So 512-bit code in the library is the avx512 variant's own, and no
    # lower variant can reach it by name.
    from vft_kernels import _C

    if "avx512" not in _capabilities()["compiled"]:
        pytest.skip("no avx512 variant in this build")
    funcs = _functions(_C.__file__)
    wide = [f for f, insns in funcs.items() if any(_avx512(i) for i in insns)]
    assert wide, "no AVX-512 code in the library"
    # GCC's clones ("[clone .constprop.0]") are local to their object: only its code calls them
    stray = [f for f in wide if "isa_avx512" not in f and "[clone ." not in f]
    assert not stray, f"AVX-512 code outside the avx512 variant: {stray[:10]}"
