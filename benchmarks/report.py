"""Markdown tables from the cumulative benchmark results:
``python -m benchmarks.report [--csv benchmarks/results/all.csv] [--out docs/performance.md]``.

For each op and device (type and name) it takes the latest run that timed the op there
(the latest full run; a ``--quick`` run only where the device has no full one) and lists
each case (name, shape, dtype) with its providers: median (q20-q80), the ratio against
the case's baseline from the same run (baseline median / median; > 1 is faster than the
baseline), and skipped or failed providers with the reason. Where the file holds several
runs of the same kind (full / quick) of that commit on that device, a column gives the
spread of each ratio over them (min-max and the number of runs).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Optional

from .run import ROOT, _fmt, default_all_csv

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
    return f"{row['device']} ({row['device_name']})" if row.get("device_name") else row.get("device", "")


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


def device_table(rows: list[dict[str, str]]) -> list[str]:
    """Markdown lines for the rows of one op on one device (module doc)."""
    runs = _by_run(rows)
    latest = runs[_latest(runs)]
    head = latest[0]
    same = [run for run, rs in runs.items()
            if head["commit"] != "unknown" and rs[0]["commit"] == head["commit"] and rs[0]["quick"] == head["quick"]]
    ratios: dict[tuple, list[float]] = {}
    for run in same:
        for r in runs[run]:
            if _float(r.get("speedup")) is not None:
                ratios.setdefault((r["name"], r["shape"], r["dtype"], r["provider"]), []).append(float(r["speedup"]))
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
        groups.setdefault((r["name"], r["shape"], r["dtype"]), []).append(r)
    for group, members in groups.items():
        for i, r in enumerate(members):
            cells = [f"{r['name']}, {r['shape']}" if i == 0 else "", r["dtype"], r["provider"]] + _result(r)
            if spread:
                vals = ratios.get(group + (r["provider"],), []) if r["provider"] != r["baseline"] else []
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Markdown tables from the cumulative benchmark results")
    p.add_argument("--csv", default=default_all_csv(), help="results CSV (default: benchmarks/results/all.csv)")
    p.add_argument("--out", default=DEFAULT_OUT, help="Markdown file to write (default: docs/performance.md)")
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
        f.write(render(rows, source))
    print(f"wrote {args.out} ({len(rows)} rows of {args.csv})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
