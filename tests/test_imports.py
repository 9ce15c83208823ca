"""The model layer's modules import each other without cycles, counting the imports inside
functions too (a cycle hidden in a function still ties two modules into one unit that can
only be understood, tested and changed together), and a constant that several modules
need is defined once."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vft"


def _imports(path: pathlib.Path) -> set:
    """The vft modules that the module at ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = f"vft.{node.module}" if node.module else "vft"
            elif node.level == 0:
                base = node.module or ""
            else:
                continue  # outside the package
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("vft.") and (PACKAGE / (name[4:].replace(".", "/") + ".py")).is_file():
                found.add(name)
    return found


def _graph() -> dict:
    return {f"vft.{p.stem}": _imports(p) - {f"vft.{p.stem}"} for p in sorted(PACKAGE.glob("*.py"))
            if p.stem != "__init__"}


def _cycles(graph: dict) -> list:
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert "vft.tokenfile" in _graph()["vft.cli"]  # the scan sees the package's real imports


def test_no_import_cycles_in_the_model_layer():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _assigned_names(path: pathlib.Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


INTEGRATIONS = PACKAGE.parent / "vft_kernels" / "integrations"


PENDING_COPIES: set = set()  # modules still keeping their own copy (none)


@pytest.mark.parametrize("module", [
    pytest.param(p.name, marks=pytest.mark.xfail(strict=True, reason="still defines its own copy: import "
                                                 "MAX_EXACT_CODEBOOK from vft_kernels.ops.fsq"))
    if p.name in PENDING_COPIES else p.name
    for p in sorted(INTEGRATIONS.glob("*.py"))])
def test_the_exact_codebook_bound_is_defined_once(module):
    """The float32-exact codebook bound lives in vft_kernels/ops/fsq.py; the integrations
    import it instead of keeping their own copies."""
    from vft_kernels.ops.fsq import MAX_EXACT_CODEBOOK

    assert MAX_EXACT_CODEBOOK == 2**24
    assert "MAX_EXACT_CODEBOOK" in _assigned_names(PACKAGE.parent / "vft_kernels" / "ops" / "fsq.py")
    copies = {"MAX_EXACT_CODEBOOK", "_MAX_EXACT_CODEBOOK"} & _assigned_names(INTEGRATIONS / module)
    assert not copies, f"{module} defines {copies} again"
