"""The model layer's modules import each other without cycles, counting the imports inside
functions too (a cycle hidden in a function still ties two modules into one unit that can
only be understood, tested and changed together)."""
import ast
import pathlib

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
