"""The user-facing docs: the README's two commands come first and stay true, the README
stays short, links resolve, citations of the spec point at sections that exist, the spec
ships in the source package, and user docs carry no issue numbers or commit ids."""
import os
import pathlib
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
USER_DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"] + sorted((ROOT / "docs").glob("*.md"))
GENERATED = {ROOT / "docs" / "performance.md"}  # benchmarks.report's output: runs are named by commit
# Files owned by others that still cite the old, unshipped SPEC.md (to be changed there).
SPEC_MD_PENDING: tuple = ()


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands_and_stays_short():
    text = _readme()
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines"
    first_block = re.search(r"```(\w*)\n(.*?)```", text, flags=re.S)
    assert first_block.group(1) == "bash"
    commands = [ln.split("#")[0].strip() for ln in first_block.group(2).splitlines()]
    assert commands == ["make demo", "make test"]
    assert text.index("make demo") < text.index("\n## ")  # before any section
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: ", makefile, flags=re.M) and re.search(r"^test: ", makefile, flags=re.M)
    assert "## Official models" in text


def test_links_in_the_docs_resolve():
    broken = []
    for doc in USER_DOCS + [ROOT / "docs" / "experiments" / "README.md"]:
        if not doc.exists():
            continue
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"\w+://", target):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, "broken links: " + ", ".join(broken)


def test_user_docs_have_no_issue_numbers_or_commit_ids():
    commits = set(subprocess.run(["git", "log", "--format=%h", "-n", "2000"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.split())
    found = []
    for doc in USER_DOCS:
        if doc in GENERATED or not doc.exists():
            continue
        text = doc.read_text()
        found += [f"{doc.name}: {m}" for m in re.findall(r"(?i)\bissue\s*#?\d+|(?<![\w&])#\d+\b", text)]
        found += [f"{doc.name}: commit {w}" for w in re.findall(r"\b[0-9a-f]{7,12}\b", text) if w in commits]
    assert not found, "; ".join(found)


def _spec_sections() -> set:
    return {int(n) for n in re.findall(r"^## (\d+)\.", (ROOT / "docs" / "spec.md").read_text(), flags=re.M)}


def _tracked_text_files():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [f for f in files if f.endswith((".py", ".md", ".cpp", ".h", ".cu", ".sh", ".toml", ".in"))]


def test_spec_citations_point_at_existing_sections():
    sections = _spec_sections()
    assert sections == {0, 1, 2, 3, 4, 5}
    bad = []
    for f in _tracked_text_files():
        text = (ROOT / f).read_text(errors="replace")
        bad += [f"{f}: §{n}" for n in re.findall(r"docs/spec\.md §(\d+)", text) if int(n) not in sections]
        if "SPEC.md" in text and not f.startswith(SPEC_MD_PENDING) and f != "tests/test_docs.py":
            bad.append(f"{f}: cites SPEC.md, a file outside the repository")
    assert not bad, "; ".join(bad)


def test_the_spec_ships_in_the_sdist(tmp_path):
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, VFT_SKIP_CUDA="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for doc in ("docs/spec.md", "docs/spec_block_ops.md", "docs/spec_per_block_keep.md", "README.md"):
        assert doc in names, f"{doc} missing from the sdist"


@pytest.mark.parametrize("doc", ["spec_block_ops.md", "spec_per_block_keep.md"])
def test_the_spec_links_its_extensions(doc):
    assert f"({doc})" in (ROOT / "docs" / "spec.md").read_text()
