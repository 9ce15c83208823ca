"""Benchmark harness: ``python -m benchmarks.run [--ops fsq,attention,flow,e2e] [--quick]``.

Measures the machine's copy bandwidth and matmul rate once, then times every case of
every ``benchmarks/bench_<op>.py`` module (median with 20/80 quantiles:
``torch.utils.benchmark`` on CPU, ``triton.testing.do_bench`` on GPU), and reports per
case the speedup against its group's baseline (the reference, same run) and the
achieved GB/s / GFLOP/s as a fraction of the measured ceilings. Cases a module marks as
skipped (e.g. GPU-only libraries on CPU) get a row with the reason instead of a time.
Writes ``results.csv``, ``results.md`` and one PNG per op into ``--out``, prints the
table, and appends the rows with the run's metadata (versions, git commit, date,
ceilings) to the cumulative ``benchmarks/results/all.csv`` (``--all-csv`` or
``$VFT_BENCH_ALL_CSV`` elsewhere, ``--no-append`` not at all); ``python -m
benchmarks.report`` turns that file into Markdown tables.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import uuid

import torch

import vft_kernels as vk

from .common import Case, Context

OPS = ("fsq", "flow", "attention", "block", "e2e", "integrations")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_CSV = os.path.join(ROOT, "benchmarks", "results", "all.csv")


def default_all_csv() -> str:
    """The cumulative results file: ``$VFT_BENCH_ALL_CSV`` if set, else benchmarks/results/all.csv."""
    return os.environ.get("VFT_BENCH_ALL_CSV") or ALL_CSV


# --------------------------------------------------------------------------------------
# Timing


def _sample_times(fn, device: torch.device, min_run_time: float, warm_up: bool = True) -> list[float]:
    """Seconds per call of ``fn``, one value per timed block (CPU: torch.utils.benchmark's
    blocked_autorange; CUDA: triton's do_bench quantiles 0.2 / 0.5 / 0.8)."""
    if device.type == "cuda":
        import triton.testing

        qs = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], rep=int(min_run_time * 1000))
        return [q / 1e3 for q in qs]
    from torch.utils import benchmark

    if warm_up:
        fn()  # compilation, caches: outside the measurement
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return list(timer.blocked_autorange(min_run_time=min_run_time).times)


def _summary(times: list[float]) -> tuple[float, float, float]:
    times = sorted(times)
    if len(times) >= 5:
        q = statistics.quantiles(times, n=10)
        return statistics.median(times), q[1], q[7]
    return statistics.median(times), times[0], times[-1]


def time_fn(fn, device: torch.device, min_run_time: float) -> tuple[float, float, float]:
    """(median, q20, q80) seconds per call of ``fn``."""
    return _summary(_sample_times(fn, device, min_run_time))


def measure_ceilings(ctx: Context, min_run_time: float) -> None:
    """Copy bandwidth (read + write bytes of a large copy) and dense matmul rate."""
    dev = ctx.device
    n = (64 if dev.type == "cpu" else 256) * 2**20 // 4  # 64 MB (CPU) / 256 MB (GPU) of float32
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    t, _, _ = time_fn(lambda: dst.copy_(src), dev, min_run_time)
    ctx.copy_gbps = 2 * src.numel() * 4 / t / 1e9
    m = 1024 if dev.type == "cpu" else 8192
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    a = torch.randn(m, m, device=dev, dtype=dtype)
    b = torch.randn(m, m, device=dev, dtype=dtype)
    t, _, _ = time_fn(lambda: torch.mm(a, b), dev, min_run_time)
    ctx.matmul_gflops = 2 * m**3 / t / 1e9
    ctx.matmul_dtype = str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------
# Running


def load_cases(op: str, ctx: Context) -> list[Case]:
    try:
        mod = importlib.import_module(f"benchmarks.bench_{op}")
    except ModuleNotFoundError as e:
        if e.name == f"benchmarks.bench_{op}":
            print(f"[{op}] no benchmarks/bench_{op}.py yet; skipped", file=sys.stderr)
            return []
        raise
    return mod.cases(ctx)


def round_ratio(base_rounds: list[float], rounds: list[float]) -> float:
    """The median over rounds of base / provider, each ratio from one round (interleaved
    timings of the two, so slow drifts of the machine cancel)."""
    return statistics.median(b / r for b, r in zip(base_rounds, rounds))


def run_cases(cases: list[Case], ctx: Context, min_run_time: float, verbose=True, rounds: int = 1) -> list[dict]:
    """Times every case. Cases of one group (op, name, shape, dtype: the providers compared
    with each other) are timed interleaved: ``rounds`` rounds, each timing every provider of
    the group for ``min_run_time / rounds`` seconds. A row's median and quantiles pool all
    of its timed blocks; ``round_ms`` keeps each round's median, and ``speedup`` is the
    median over rounds of the same-round ratio against the group's baseline."""
    rows, samples = [], {}
    groups: dict[tuple, list[int]] = {}
    for i, case in enumerate(cases):
        rows.append({"op": case.op, "name": case.name, "shape": case.shape, "dtype": case.dtype,
                     "provider": case.provider, "baseline": case.baseline, **case.extra})
        if case.skipped is not None:
            rows[i]["skipped"] = case.skipped
        groups.setdefault((case.op, case.name, case.shape, case.dtype), []).append(i)
    for members in groups.values():
        for rnd in range(rounds):
            for i in members:
                case, row = cases[i], rows[i]
                if case.skipped is not None or "error" in row:
                    continue
                try:
                    times = _sample_times(case.fn, ctx.device, min_run_time / rounds, warm_up=rnd == 0)
                except Exception as e:  # noqa: BLE001 - one failing case must not stop the run
                    row["error"] = f"{type(e).__name__}: {e}"
                    if verbose:
                        traceback.print_exc()
                    continue
                samples.setdefault(i, []).append(times)
        for i in members:
            row, case = rows[i], cases[i]
            if i in samples and "error" not in row:
                med, q20, q80 = _summary([t for times in samples[i] for t in times])
                row.update(median_ms=med * 1e3, q20_ms=q20 * 1e3, q80_ms=q80 * 1e3,
                           round_ms=";".join(f"{statistics.median(times) * 1e3:.6g}" for times in samples[i]))
                if case.bytes:
                    row["GB/s"] = case.bytes / med / 1e9
                    row["%copy"] = 100 * row["GB/s"] / ctx.copy_gbps
                if case.flops:
                    row["GFLOP/s"] = case.flops / med / 1e9
                    row["%matmul"] = 100 * row["GFLOP/s"] / ctx.matmul_gflops
            if verbose:
                if "median_ms" in row:
                    t = f"{row['median_ms']:.3f} ms"
                else:
                    t = f"skipped: {row['skipped']}" if "skipped" in row else row["error"][:80]
                print(f"  {case.op:9s} {case.name:22s} {case.shape:28s} {case.dtype:9s} {case.provider:40s} {t}",
                      file=sys.stderr, flush=True)
    # speedup of each case against its group's baseline provider, measured in this run
    for members in groups.values():
        group = [rows[i] for i in members]
        for r in group:
            base = next((b for b in group if b["provider"] == r["baseline"] and "median_ms" in b), None)
            if base is not None and "median_ms" in r:
                r["speedup"] = round_ratio(_rounds(base), _rounds(r))
    return rows


def _rounds(row: dict) -> list[float]:
    """A row's per-round medians (ms); its median alone for rows without them."""
    text = row.get("round_ms")
    return [float(x) for x in str(text).split(";")] if text not in (None, "") else [float(row["median_ms"])]


# --------------------------------------------------------------------------------------
# Output

# Run metadata, the same on every row of a run (results.csv, all.csv).
META_COLUMNS = ["date", "run", "commit", "device", "device_name", "threads", "quick", "torch", "triton", "vft",
                "copy_GB/s", "matmul_GFLOP/s", "matmul_dtype"]
COLUMNS = ["op", "name", "shape", "dtype", "provider", "cpu_capability", "median_ms", "q20_ms", "q80_ms", "speedup", "baseline",
           "GB/s", "%copy", "GFLOP/s", "%matmul"]
NOTE_COLUMNS = ["skipped", "error"]


def column_order(keys) -> list[str]:
    """The stable column order of results.csv and all.csv: META_COLUMNS and COLUMNS (always
    present), the op-specific columns in ``keys`` sorted by name, then NOTE_COLUMNS."""
    fixed = META_COLUMNS + COLUMNS + NOTE_COLUMNS
    return META_COLUMNS + COLUMNS + sorted(set(keys) - set(fixed)) + NOTE_COLUMNS


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of this checkout, or "unknown" outside a git checkout."""
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cpu_name() -> str:
    """The CPU's model name and its bf16 matrix instructions, e.g. "AMD EPYC (avx512_bf16)":
    the bf16 targets differ between CPUs with AMX-BF16 and with AVX-512 BF16 only."""
    info: dict[str, str] = {}
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags":
                    flags = set(value.split())
                    break  # the first processor's entry is enough
                info.setdefault(key, value.strip())
    except OSError:
        pass
    model = info.get("model name") or platform.processor() or platform.machine()
    details = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info and "model" in info else []
    details += [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{model} ({', '.join(details)})" if details else model


def run_metadata(ctx: Context, quick: bool) -> dict:
    """The META_COLUMNS of this run; ``run`` tells apart runs started in the same second."""
    import vft_kernels

    if ctx.device.type == "cuda":
        name = torch.cuda.get_device_name(ctx.device)
    else:
        name = cpu_name()
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run": uuid.uuid4().hex[:8],
            "commit": git_commit(), "device": ctx.device.type, "device_name": name,
            "threads": torch.get_num_threads(), "quick": quick, "torch": torch.__version__,
            "triton": _dist_version("triton"), "vft": vft_kernels.__version__,
            "copy_GB/s": round(ctx.copy_gbps, 2), "matmul_GFLOP/s": round(ctx.matmul_gflops, 1),
            "matmul_dtype": ctx.matmul_dtype}


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown(rows: list[dict], header: str) -> str:
    extra = sorted({k for r in rows for k in r} - set(COLUMNS) - set(NOTE_COLUMNS))
    cols = COLUMNS + extra + [c for c in NOTE_COLUMNS if any(c in r for r in rows)]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: str, meta: dict) -> None:
    """This run's rows, each with the run's ``meta``, as a new CSV ``path``."""
    records = [{**meta, **r} for r in rows]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=column_order({k for r in records for k in r}), lineterminator="\n")
        w.writeheader()
        w.writerows(records)


def append_results(rows: list[dict], path: str, meta: dict) -> None:
    """Appends this run's rows, each with the run's ``meta``, to the cumulative CSV ``path``.

    A new (or empty) file gets the header first. If the file's header already has every
    column of the new rows they are appended under it, in its order; otherwise the file is
    rewritten with the union of the columns (column_order), the old rows keeping their
    values and leaving the new columns empty."""
    records = [{**meta, **r} for r in rows]
    keys = {k for r in records for k in r}
    header = None
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
    if header is not None and keys <= set(header):
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=header, lineterminator="\n").writerows(records)
        return
    old = []
    if header is not None:
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=column_order(keys | set(header or ())), lineterminator="\n")
        w.writeheader()
        w.writerows(old + records)
    os.replace(tmp, path)


def plot(rows: list[dict], out_dir: str) -> list[str]:
    """One PNG per op: median time per group, a bar per provider (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    paths = []
    for op in sorted({r["op"] for r in rows}):
        sub = [r for r in rows if r["op"] == op and "median_ms" in r]
        if not sub:
            continue
        groups = list(dict.fromkeys(f"{r['name']}\n{r['shape']}\n{r['dtype']}" for r in sub))
        providers = list(dict.fromkeys(r["provider"] for r in sub))
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.5))
        width = 0.8 / len(providers)
        for j, p in enumerate(providers):
            xs, ys = [], []
            for i, g in enumerate(groups):
                hit = [r for r in sub if r["provider"] == p and f"{r['name']}\n{r['shape']}\n{r['dtype']}" == g]
                if hit:
                    xs.append(i + j * width)
                    ys.append(hit[0]["median_ms"])
            ax.bar(xs, ys, width, label=p)
        ax.set_yscale("log")
        ax.set_ylabel("median time [ms] (log)")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_title(f"vft {op}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def cpu_capabilities_to_run(spec):
    """--cpu-capability -> the levels to run in turn ([None]: the one chosen at load)."""
    if spec in (None, ""):
        return [None]
    supported = vk.cpu_capabilities()["supported"]
    if spec == "all":
        return list(supported)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in supported]
    if bad:
        raise ValueError(f"--cpu-capability {spec}: {bad} not supported by this CPU (it supports "
                         f"{', '.join(supported)})")
    return names


def _capability(cap):
    return contextlib.nullcontext() if cap is None else vk.use_cpu_capability(cap)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="vft benchmarks (speedups against the reference, same run)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--quick", action="store_true", help="small shapes, short timing (the demo)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="results", help="folder for results.csv / results.md / *.png")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per case")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per group of compared providers (default: 3, quick runs 1)")
    p.add_argument("--all-csv", default=default_all_csv(),
                   help="cumulative CSV the rows are appended to (default: $VFT_BENCH_ALL_CSV, else "
                        "benchmarks/results/all.csv)")
    p.add_argument("--no-append", action="store_true", help="do not append the rows to --all-csv")
    p.add_argument("--cpu-capability", default=None,
                   help="CPU capability of vft's C++ kernels (vft_kernels.use_cpu_capability): baseline, avx2, "
                        "avx512, avx512_bf16 or amx, a comma list, or 'all' (every level this CPU supports), each "
                        "timed in turn in this process with its own baselines; default: the level chosen at load")
    args = p.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"unknown ops {unknown}; expected a subset of {OPS}")
    min_run_time = args.min_run_time or (0.3 if args.quick else 1.0)
    rounds = args.rounds or (1 if args.quick else 3)
    if rounds < 1:
        p.error(f"--rounds must be >= 1, got {rounds}")
    ctx = Context(device=torch.device(args.device), quick=args.quick)
    measure_ceilings(ctx, min_run_time)
    meta = run_metadata(ctx, args.quick)
    header = (f"vft benchmarks on {ctx.device.type} ({meta['device_name']}, {meta['threads']} threads), "
              f"torch {meta['torch']}, triton {meta['triton']}, vft {meta['vft']}, commit {meta['commit']}, "
              f"{meta['date']}{' [quick]' if args.quick else ''}\n\n"
              f"Ceilings measured in this run: copy {ctx.copy_gbps:.1f} GB/s (read+write), "
              f"matmul {ctx.matmul_gflops:.1f} GFLOP/s ({ctx.matmul_dtype}). speedup = baseline median / median.")
    print(header.splitlines()[0], file=sys.stderr)
    try:
        capabilities = cpu_capabilities_to_run(args.cpu_capability)
    except ValueError as e:
        p.error(str(e))
    rows = []
    for op in ops:
        for cap in capabilities:
            with _capability(cap):
                if cap is not None:
                    print(f"[{op}] CPU capability {cap}", file=sys.stderr)
                op_rows = run_cases(load_cases(op, ctx), ctx, min_run_time, rounds=rounds)
                for r in op_rows:  # what the C++ CPU kernels ran as (empty without _C)
                    r["cpu_capability"] = vk.cpu_capability() or ""
            rows += op_rows
    os.makedirs(args.out, exist_ok=True)
    write_csv(rows, os.path.join(args.out, "results.csv"), meta)
    md = markdown(rows, header)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    pngs = plot(rows, args.out)
    print(md)
    print(f"wrote {args.out}/results.csv, {args.out}/results.md" + (", " + ", ".join(pngs) if pngs else ""))
    if not args.no_append:
        append_results(rows, args.all_csv, meta)
        print(f"appended {len(rows)} rows to {args.all_csv}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
