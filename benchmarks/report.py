"""Markdown tables from the cumulative benchmark results:
``python -m benchmarks.report [--csv benchmarks/results/all.csv] [--out docs/performance.md]``.

For each op and device (type and name) it takes the latest run that timed the op there
(the latest full run; a ``--quick`` run only where the device has no full one) and lists
each case (name, shape, dtype) with its providers: median (q20-q80), the ratio against
the case's baseline from the same run (baseline median / median; > 1 is faster than the
baseline), and skipped or failed providers with the reason. Where the file holds several
runs of the same kind (full / quick) of that commit on that device, a column gives the
spread of each ratio over them (min-max and the number of runs).

It ends with the performance targets (``TARGETS``), each evaluated over the full CPU runs
of the latest commit that measured it: the median of the same-run ratios, their min and
max, met or missed. ``--readme`` also rewrites the README's results table (the targets
with a ``readme`` label: speed-ups and the CPU they were measured on), between its
generated-results markers, so the README's numbers come from the file too.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass
from typing import Optional

from .run import ROOT, _fmt, _rounds, default_all_csv, round_ratio

DEFAULT_OUT = os.path.join(ROOT, "docs", "performance.md")


def read_rows(path: str) -> list[dict[str, str]]:
    """The rows of a results CSV (all.csv / results.csv), values as text."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _float(text: Optional[str]) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _device(row: dict[str, str]) -> str:
    """The table a row belongs to: device type and name, and the CPU capability vft's kernels
    ran at (a run with --cpu-capability a,b gives one table per capability, each with its own
    baselines, so the ratios and their spread are never mixed across capabilities)."""
    dev = f"{row['device']} ({row['device_name']})" if row.get("device_name") else row.get("device", "")
    cap = row.get("cpu_capability") or ""
    return f"{dev}, vft kernels at {cap}" if cap else dev


def _by_run(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """run id -> its rows, runs in the order they first appear in the file."""
    runs: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    return runs


def _latest(runs: dict[str, list[dict[str, str]]]) -> str:
    """The latest full run (by date, then position in the file), else the latest quick run."""
    order = {run: i for i, run in enumerate(runs)}
    return max(runs, key=lambda run: (runs[run][0]["quick"] != "True", runs[run][0]["date"], order[run]))


def _result(r: dict[str, str]) -> list[str]:
    """[median (q20-q80) ms, ratio against the baseline] of one row; empty when not timed."""
    med, speedup = _float(r.get("median_ms")), _float(r.get("speedup"))
    if med is None:
        return ["", ""]
    timing = f"{_fmt(med)} ({_fmt(float(r['q20_ms']))}-{_fmt(float(r['q80_ms']))})"
    if speedup is None:
        return [timing, ""]
    return [timing, "baseline" if r["provider"] == r["baseline"] else f"{speedup:.2f}x"]


def _provider(r: dict[str, str]) -> str:
    """The provider, with the CPU capability its vft kernels ran at when the row says (runs with
    --cpu-capability time each capability in turn)."""
    cap = r.get("cpu_capability") or ""
    return f"{r['provider']} @{cap}" if cap and r.get("multi_cap") else r["provider"]


def device_table(rows: list[dict[str, str]]) -> list[str]:
    """Markdown lines for the rows of one op on one device (module doc)."""
    for run_rows in _by_run(rows).values():
        multi = len({r.get("cpu_capability") or "" for r in run_rows}) > 1
        for r in run_rows:
            r["multi_cap"] = "1" if multi else ""
    runs = _by_run(rows)
    latest = runs[_latest(runs)]
    head = latest[0]
    same = [run for run, rs in runs.items()
            if head["commit"] != "unknown" and rs[0]["commit"] == head["commit"] and rs[0]["quick"] == head["quick"]]
    ratios: dict[tuple, list[float]] = {}
    for run in same:
        for r in runs[run]:
            if _float(r.get("speedup")) is not None:
                ratios.setdefault((r["name"], r["shape"], r["dtype"], _provider(r)), []).append(float(r["speedup"]))
    spread = len(same) >= 2
    lines = [f"Run {head['date']} (commit {head['commit']}{', quick' if head['quick'] == 'True' else ''}), "
             f"torch {head['torch']}, triton {head['triton']}, vft {head['vft']}, {head['threads']} threads; "
             f"ceilings measured in that run: copy {head['copy_GB/s']} GB/s, matmul {head['matmul_GFLOP/s']} "
             f"GFLOP/s ({head['matmul_dtype']})."
             + (f" Ratio spread over the {len(same)} runs of this commit here." if spread else ""),
             ""]
    cols = ["case", "dtype", "provider", "median ms (q20-q80)", "ratio vs baseline"]
    cols += ["ratio min-max (runs)"] if spread else []
    cols += ["note"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    groups: dict[tuple, list[dict[str, str]]] = {}
    for r in latest:
        groups.setdefault((r["name"], r["shape"], r["dtype"], r.get("cpu_capability") if r["multi_cap"] else ""),
                          []).append(r)
    for group, members in groups.items():
        for i, r in enumerate(members):
            cells = [f"{r['name']}, {r['shape']}" if i == 0 else "", r["dtype"], _provider(r)] + _result(r)
            if spread:
                vals = ratios.get(group[:3] + (_provider(r),), []) if r["provider"] != r["baseline"] else []
                cells.append(f"{min(vals):.2f}-{max(vals):.2f}x ({len(vals)})" if len(vals) >= 2 else "")
            cells.append(f"skipped: {r['skipped']}" if r.get("skipped") else
                         f"error: {r['error']}" if r.get("error") else "")
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def render(rows: list[dict[str, str]], source: str) -> str:
    """The Markdown document: one section per op (in file order), one table per device."""
    lines = ["# Benchmark results", "",
             f"Generated by `python -m benchmarks.report` from `{source}` ({len(rows)} rows, "
             f"{len(_by_run(rows))} runs); regenerate it rather than editing it. Each table is the latest "
             "run of an op on one device (the latest full run; a `--quick` run, small shapes and short "
             "timing, only where there is no full one). ratio = the case's baseline median / the "
             "provider's median, both from that run (> 1: faster than the baseline). Where the file holds "
             "several runs of the same commit on the device, \"ratio min-max\" is the spread of the ratio "
             "over them.", ""]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [f"## {op}", ""]
        op_rows = [r for r in rows if r["op"] == op]
        for device in sorted({_device(r) for r in op_rows}):
            lines += [f"### {op} on {device}", ""]
            lines += device_table([r for r in op_rows if _device(r) == device]) + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The performance targets, evaluated from the results file (docs/performance.md, README).

@dataclass
class Target:
    """One performance target: ``provider``'s rate against ``against`` (median(against) /
    median(provider) from the same run; > 1: provider faster), or with ``metric`` "matmul
    on executed tiles" the provider's GFLOP/s x (executed / allowed pairs) / the run's matmul
    rate. ``goal`` None: a reported number without a goal."""
    what: str
    op: str
    name: str
    dtype: str
    shape: str  # substring of the case's shape
    provider: str
    against: str = ""
    goal: Optional[float] = None
    metric: str = "ratio"
    keep: str = ""  # exact value of the attention rows' keep column, when set
    goal_amx: Optional[float] = None  # the goal on CPUs with AMX-BF16 (device_name says amx_bf16)
    readme: str = ""  # "what | compared with": the row in the README's results table; empty: not there


ATTN = "image B=4 H=12 T=1 P=256 R=256 D=64"
SDPA = "sdpa(shared [N,N] mask)"
TARGETS = [
    Target("register attention fwd, image keep=32, vs SDPA's best mask", "attention", "forward", "float32", ATTN,
           "cpu", SDPA, 3.0, keep="keep=32",
           readme="register attention forward, image, 32 of 256 registers kept | PyTorch SDPA, dense mask"),
    Target("same, vs compiled FlexAttention (kernel alone, mask prebuilt)", "attention", "forward", "float32", ATTN,
           "cpu", "flex(compiled)", 2.0, keep="keep=32",
           readme="same | compiled FlexAttention, block mask prebuilt"),
    Target("same, fwd+bwd, vs SDPA's best mask", "attention", "forward+backward", "float32", ATTN, "cpu", SDPA,
           2.5, keep="keep=32", readme="same, forward + backward | PyTorch SDPA, dense mask"),
    Target("attention fwd rate on executed tiles (image keep=32), share of the same-run matmul rate",
           "attention", "forward", "float32", ATTN, "cpu", goal=0.70, metric="matmul on executed tiles",
           keep="keep=32"),
    Target("APG step through the API, [4,16,5,32,32], vs torch.compile(reference)", "flow",
           "apg step (momentum, threshold)", "float32", "4x16x5x32x32", "cpu", "compile(reference)", 2.0,
           readme="flow step with APG guidance, [4, 16, 5, 32, 32] | `torch.compile` of the eager step"),
    Target("APG step, [2,16,21,32,32], vs torch.compile(reference)", "flow", "apg step (momentum, threshold)",
           "float32", "2x16x21x32x32", "cpu", "compile(reference)", 2.0),
    Target("APG step, [8,16,32,32], vs torch.compile(reference)", "flow", "apg step (momentum, threshold)",
           "float32", "8x16x32x32", "cpu", "compile(reference)", 2.0),
    Target("CFG step through the API, [4,16,5,32,32], vs eager", "flow", "cfg step", "float32", "4x16x5x32x32",
           "cpu", "reference", 3.0),
    Target("same, vs torch.compile(reference)", "flow", "cfg step", "float32", "4x16x5x32x32", "cpu",
           "compile(reference)", 1.5,
           readme="flow step with CFG guidance, [4, 16, 5, 32, 32] | `torch.compile` of the eager step"),
    Target("CFG step, [2,16,21,32,32], vs eager / vs compile", "flow", "cfg step", "float32", "2x16x21x32x32",
           "cpu", "reference", 3.0),
    Target("", "flow", "cfg step", "float32", "2x16x21x32x32", "cpu", "compile(reference)", 1.5),
    Target("CFG step, [8,16,32,32], vs eager / vs compile", "flow", "cfg step", "float32", "8x16x32x32", "cpu",
           "reference", 3.0),
    Target("", "flow", "cfg step", "float32", "8x16x32x32", "cpu", "compile(reference)", 1.5),
    Target("CFG's traffic floor (torch.addcmul, same 3 reads + 1 write) vs compile, [4,16,5,32,32]", "flow",
           "cfg step", "float32", "4x16x5x32x32", "same traffic: torch.addcmul(out=)", "compile(reference)"),
    Target("same floor, [2,16,21,32,32]", "flow", "cfg step", "float32", "2x16x21x32x32",
           "same traffic: torch.addcmul(out=)", "compile(reference)"),
    Target("CFG kernel alone vs that floor, [2,16,21,32,32]", "flow", "cfg step", "float32", "2x16x21x32x32",
           "cpu (kernel only)", "same traffic: torch.addcmul(out=)"),
    Target("FSQ fwd+bwd, 4M tokens, vs eager", "fsq", "forward+backward", "float32", "4M", "cpu", "reference",
           15.0, readme="FSQ forward + backward, 4M tokens x 6 dims | eager PyTorch"),
    Target("same, the allocate-and-touch floor of its outputs vs eager (the most any fresh-output op can reach)",
           "fsq", "forward+backward", "float32", "4M", "outputs: allocate + touch", "reference"),
    Target("same, with the allocator of vft's CPU outputs (huge pages where the OS allows)",
           "fsq", "forward+backward", "float32", "4M", "outputs: allocate + touch (vft allocator)", "reference"),
    Target("FSQ fwd+bwd, 4M tokens, bf16 (codes and grads bf16) vs the same op on float32", "fsq",
           "forward+backward", "bfloat16", "4M", "cpu", "cpu(float32 inputs)", 1.5,
           readme="same in bfloat16 | the same op in float32"),
    Target("FSQ fwd, 4M tokens, bf16 vs float32", "fsq", "forward", "bfloat16", "4M", "cpu", "cpu(float32 inputs)",
           1.5),
    Target("register attention fwd, image keep=32, bf16 vs the same kernel on float32 (goal 1.5x; 2x with AMX)",
           "attention", "forward", "bfloat16", ATTN, "cpu", "cpu(float32 inputs)", 1.5, keep="keep=32", goal_amx=2.0,
           readme="register attention forward (as above) in bfloat16 | the same op in float32"),
]


def _pick(rows: list[dict[str, str]], t: Target, provider: str) -> Optional[dict[str, str]]:
    for r in rows:
        if (r["op"] == t.op and r["name"] == t.name and r["dtype"] == t.dtype and t.shape in r["shape"]
                and r["provider"] == provider and (not t.keep or r.get("keep") == t.keep)
                and _float(r.get("median_ms")) is not None):
            return r
    return None


def _value(rows: list[dict[str, str]], t: Target) -> Optional[float]:
    """The target's number in one run's rows, or None when that run lacks them."""
    r = _pick(rows, t, t.provider)
    if r is None:
        return None
    if t.metric == "matmul on executed tiles":
        rate, ceiling = _float(r.get("GFLOP/s")), _float(r.get("matmul_GFLOP/s"))
        waste = _float(r.get("executed/allowed pairs"))
        return None if None in (rate, ceiling, waste) or not ceiling else rate * waste / ceiling
    a = _pick(rows, t, t.against)
    if a is None:
        return None
    ra, rr = _rounds(a), _rounds(r)
    if len(ra) == len(rr) > 1:  # interleaved rounds: the median of the same-round ratios
        return round_ratio(ra, rr)
    return float(a["median_ms"]) / float(r["median_ms"])


CAPABILITIES = ("", "baseline", "avx2", "avx512", "avx512_bf16", "amx")  # vft's CPU levels, lowest first


def _target_runs(rows: list[dict[str, str]], t: Target, device: str,
                 cap: Optional[str] = None) -> list[tuple[float, dict[str, str]]]:
    """(value, first row) of each full run on ``device`` (type) of the latest commit that
    measured the target, at the CPU capability ``cap`` of vft's kernels (default: the highest
    any such row recorded, so runs capped lower never mix with the native ones)."""
    rows = [r for r in rows if r["device"] == device and r["quick"] != "True" and r["op"] == t.op]
    caps = {r.get("cpu_capability") or "" for r in rows}
    if cap is None:
        cap = max(caps, key=lambda c: CAPABILITIES.index(c) if c in CAPABILITIES else -1, default="")
    runs = _by_run([r for r in rows if (r.get("cpu_capability") or "") == cap])
    measured = {run: v for run, rs in runs.items() if (v := _value(rs, t)) is not None}
    if not measured:
        return []
    latest = max(measured, key=lambda run: (runs[run][0]["date"], list(runs).index(run)))
    commit = runs[latest][0]["commit"]
    return [(v, runs[run][0]) for run, v in measured.items() if runs[run][0]["commit"] == commit]


def target_values(rows: list[dict[str, str]], t: Target, device: str = "cpu") -> tuple[list[float], str]:
    """The target's values over the full runs of the latest commit that measured it on
    ``device`` (type), and that commit."""
    measured = _target_runs(rows, t, device)
    return [v for v, _ in measured], (measured[0][1]["commit"] if measured else "")


def _median(vals: list[float]) -> float:
    vals = sorted(vals)
    return vals[len(vals) // 2] if len(vals) % 2 else 0.5 * (vals[len(vals) // 2 - 1] + vals[len(vals) // 2])


def readme_table(rows: list[dict[str, str]], device: str = "cpu") -> list[str]:
    """Markdown lines for the README: a sentence naming the machine(s) of the runs used, then
    every target with a ``readme`` label: what, against what, and the speed-up (the median of
    the same-run ratios over the runs, with their min and max)."""
    lines = ["| op and case | compared with | speed-up of vft: median [min, max] over runs | same, vft and torch at "
             "AVX2 |", "|---|---|---|---|"]
    machines: dict[str, None] = {}

    def cell(measured):
        if not measured:
            return "not measured"
        vals = [v for v, _ in measured]
        for _, head in measured:
            machine = head["device_name"] or head["device"]
            machines[f"{machine}, {head['threads']} threads, torch {head['torch']}"] = None
        return f"{_median(vals):.2f}x [{min(vals):.2f}x, {max(vals):.2f}x] over {len(vals)}"

    for t in TARGETS:
        if not t.readme:
            continue
        what, against = (c.strip() for c in t.readme.split("|"))
        lines.append(f"| {what} | {against} | {cell(_target_runs(rows, t, device))} | "
                     f"{cell(_target_runs(rows, t, device, cap='avx2'))} |")
    where = "; ".join(machines) or "no runs recorded"
    return [f"Measured on: {where} (`benchmarks/results/all.csv`).", ""] + lines


def _amx_runs(rows: list[dict[str, str]], t: Target, device: str, commit: str) -> bool:
    """Whether the target's runs at ``commit`` ran on a CPU with AMX-BF16 (its device_name says so)."""
    return any(r["device"] == device and r["commit"] == commit and r["op"] == t.op
               and "amx_bf16" in r.get("device_name", "") for r in rows)


def targets_table(rows: list[dict[str, str]], device: str = "cpu") -> list[str]:
    """Markdown lines: every target with its median over runs [min, max], the goal and met /
    missed."""
    lines = ["| target | measured: median [min, max] (runs, commit) | goal | status |", "|---|---|---|---|"]
    for t in TARGETS:
        vals, commit = target_values(rows, t, device)
        unit = "" if t.metric == "matmul on executed tiles" else "x"
        fmt = (lambda v: f"{100 * v:.0f} %") if not unit else (lambda v: f"{v:.2f}x")
        goal_value = t.goal
        if t.goal_amx is not None and vals and _amx_runs(rows, t, device, commit):
            goal_value = t.goal_amx
        goal = "" if goal_value is None else fmt(goal_value)
        if not vals:
            lines.append(f"| {_cell(t.what)} | no full run recorded | {goal} | not measured |")
            continue
        vals.sort()
        med = _median(vals)
        status = "" if goal_value is None else ("met" if med >= goal_value else "**missed**")
        lines.append(f"| {_cell(t.what) or '(same case)'} | {fmt(med)} [{fmt(vals[0])}, {fmt(vals[-1])}] "
                     f"({len(vals)}, {commit}) | {goal} | {status} |")
    return lines


BEGIN = "<!-- results: generated by `python -m benchmarks.report --readme`; edit benchmarks/report.py, not this -->"
END = "<!-- end of generated results -->"


def update_readme(path: str, rows: list[dict[str, str]]) -> bool:
    """Replaces the README block between BEGIN and END with the results table; False when
    the README has no such block."""
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n\n" + "\n".join(readme_table(rows)) + "\n\n" + END + tail)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Markdown tables from the cumulative benchmark results")
    p.add_argument("--csv", default=default_all_csv(), help="results CSV (default: benchmarks/results/all.csv)")
    p.add_argument("--out", default=DEFAULT_OUT, help="Markdown file to write (default: docs/performance.md)")
    p.add_argument("--readme", nargs="?", const=os.path.join(ROOT, "README.md"), default=None,
                   help="also rewrite the generated results table in this README (default path: the repo's)")
    args = p.parse_args(argv)
    if not os.path.exists(args.csv):
        print(f"no results at {args.csv}: run `python -m benchmarks.run` first", file=sys.stderr)
        return 1
    rows = read_rows(args.csv)
    if not rows:
        print(f"{args.csv} has no rows", file=sys.stderr)
        return 1
    csv_path = os.path.abspath(args.csv)
    source = os.path.relpath(csv_path, ROOT) if csv_path.startswith(ROOT + os.sep) else args.csv
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(render(rows, source) + "\n## Targets (CPU)\n\n" + "\n".join(targets_table(rows)) + "\n")
    print(f"wrote {args.out} ({len(rows)} rows of {args.csv})")
    if args.readme:
        if not update_readme(args.readme, rows):
            print(f"{args.readme} has no generated-results block; left it unchanged", file=sys.stderr)
            return 1
        print(f"updated the results table in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
