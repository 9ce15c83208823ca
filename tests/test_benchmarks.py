"""The benchmark harness keeps honest baselines and its results as data: SDPA's mask forms
agree with the reference, GPU-only providers are recorded as skipped with the reason,
every run appends to a cumulative CSV (never the repo's in tests), and
``benchmarks.report`` turns that CSV into Markdown tables."""
import csv
import os
import subprocess
import sys

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_attention as ba
from benchmarks import report
from benchmarks import run as harness
from benchmarks.common import Case, Context
from vft_kernels import RegisterLayout
from vft_kernels.reference import attention as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = Context(torch.device("cpu"), quick=True, copy_gbps=10.0, matmul_gflops=100.0, matmul_dtype="float32")


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


# --------------------------------------------------------------------------------------
# SDPA's best mask form and the GPU baselines' dense superset


@pytest.mark.parametrize("keep", [[2, 2, 2], [0, 2, 4], [[2, 0], [4, 1], [1, 3]]])
def test_sdpa_mask_forms_match_the_reference(keep):
    layout = RegisterLayout(2, 8, 4, "block_causal_last")
    B, H, N, D = len(keep), 2, layout.seq_len, 8
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    keep_t = torch.tensor(keep, dtype=torch.int32)
    expected = ref.attention_forward(q, k, v, layout, keep_t, D ** -0.5)[0]
    name, mask = ba.sdpa_mask(layout, keep_t)
    forms = {name: mask}
    if len(set(map(str, keep))) == 1:
        assert name == ba.SDPA_SHARED and mask.shape == (N, N)
        forms[ba.SDPA_PER_SAMPLE] = layout.materialize(keep_t)[:, None]
    else:
        assert name == ba.SDPA_PER_SAMPLE and mask.shape == (B, 1, N, N)
    for form, m in forms.items():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=D ** -0.5)
        assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5), form


def test_kept_tokens_cover_the_mask_and_pack_per_sample():
    """The flash-attn varlen / xformers baselines attend each sample's kept tokens densely:
    a superset of the mask (no allowed pair outside them), packed sample after sample."""
    layout = RegisterLayout(3, 4, 4, "block_causal_last")
    keep = [[0] * 3, [1] * 3, [4] * 3, [4, 0, 2]]  # the last one per block
    mask = layout.materialize(torch.tensor(keep))
    index = [ba._kept_tokens(layout, row if b == 3 else row[0], torch.device("cpu")) for b, row in enumerate(keep)]
    for b, idx in enumerate(index):
        assert len(idx) == sum(layout.patches + x for x in keep[b])
        inside = torch.zeros(layout.seq_len, dtype=torch.bool)
        inside[idx] = True
        assert not mask[b][~inside].any() and not mask[b][:, ~inside].any()
    t = torch.randn(len(keep), 2, layout.seq_len, 5)
    packed = ba._pack(t, index)
    assert packed.shape == (sum(len(i) for i in index), 2, 5)
    start = len(index[0])
    assert torch.equal(packed[start:start + len(index[1])], t[1, :, index[1]].transpose(0, 1))


# --------------------------------------------------------------------------------------
# Skipped providers


def test_gpu_providers_are_skipped_on_cpu_with_the_reason():
    layout = RegisterLayout(1, 8, 4, "block_causal_last")
    providers = ba._gpu_providers(CPU, layout, torch.tensor([4, 2]), 0.5, torch.float32)
    assert set(providers) == {ba.FLASH_DENSE, ba.FLASH_VARLEN, ba.XFORMERS}
    for name, p in providers.items():
        assert p.fn is None and "needs CUDA; this run is on cpu" in p.skipped, name
    cuda = Context(torch.device("cuda"))
    assert "is not importable" in ba._unavailable(cuda, "nothing", "vft_no_such_module")


def test_harness_records_skipped_cases(capsys):
    cases = [c for c in ba.cases(CPU) if c.skipped is not None]
    assert {c.provider for c in cases} == {ba.FLASH_DENSE, ba.FLASH_VARLEN, ba.XFORMERS}
    rows = harness.run_cases(cases, CPU, 0.01)
    assert len(rows) == len(cases)
    for row in rows:
        assert "median_ms" not in row and "speedup" not in row and "needs CUDA" in row["skipped"]
        assert row["baseline"] == ba.SDPA_SHARED
    assert capsys.readouterr().err.count("skipped: ") == len(cases)
    assert "| skipped |" in harness.markdown(rows, "header")


# --------------------------------------------------------------------------------------
# all.csv


def _meta(run, commit="abc1234", device="cpu", date="2030-01-01T00:00:00Z", quick=False):
    meta = dict.fromkeys(harness.META_COLUMNS, "x")
    meta.update(run=run, commit=commit, device=device, device_name=f"{device} box", date=date, quick=quick)
    return meta


def _row(provider, speedup, median=1.0, op="attention", name="forward", shape="B=1 N=8", baseline="sdpa", **extra):
    return {"op": op, "name": name, "shape": shape, "dtype": "float32", "provider": provider, "baseline": baseline,
            "median_ms": median, "q20_ms": 0.9 * median, "q80_ms": 1.1 * median, "speedup": speedup, **extra}


def test_append_results_header_once_and_union_of_columns(tmp_path):
    path = str(tmp_path / "results" / "all.csv")
    rows = [_row("sdpa", 1.0), {**_row("cpu", None), "skipped": "not here"}]
    harness.append_results(rows, path, _meta("r1"))
    harness.append_results(rows, path, _meta("r2"))
    lines = _read(path)
    header = lines[0]
    assert header == harness.column_order(header)
    assert header[:len(harness.META_COLUMNS)] == harness.META_COLUMNS
    assert header[-2:] == harness.NOTE_COLUMNS
    assert len(lines) == 5 and sum(line == header for line in lines) == 1
    # A new column rewrites the file with the union; old rows keep their values.
    harness.append_results([_row("sdpa", 1.0, density=0.5)], path, _meta("r3"))
    lines = _read(path)
    assert len(lines) == 6 and lines[0] == harness.column_order(set(header) | {"density"})
    got = report.read_rows(path)
    assert [r["run"] for r in got] == ["r1", "r1", "r2", "r2", "r3"]
    assert [r["density"] for r in got] == ["", "", "", "", "0.5"]
    assert got[1]["skipped"] == "not here" and got[1]["median_ms"] == "1.0"


def test_main_appends_unless_no_append(tmp_path, monkeypatch, capsys):
    def fake_ceilings(ctx, min_run_time):
        ctx.copy_gbps, ctx.matmul_gflops, ctx.matmul_dtype = 10.0, 100.0, "float32"

    def fake_cases(op, ctx):
        return [Case(op, "forward", "8", "float32", "reference", lambda: None),
                Case(op, "forward", "8", "float32", "gpu lib", None, skipped="needs CUDA")]

    monkeypatch.setattr(harness, "measure_ceilings", fake_ceilings)
    monkeypatch.setattr(harness, "load_cases", fake_cases)
    all_csv = tmp_path / "all.csv"
    args = ["--ops", "fsq", "--device", "cpu", "--min-run-time", "0.01", "--out", str(tmp_path / "out"),
            "--all-csv", str(all_csv)]
    assert harness.main(args + ["--no-append"]) == 0
    assert not all_csv.exists()
    assert harness.main(args) == 0
    rows = report.read_rows(str(all_csv))
    assert [(r["provider"], r["skipped"]) for r in rows] == [("reference", ""), ("gpu lib", "needs CUDA")]
    assert rows[0]["copy_GB/s"] == "10.0" and rows[0]["speedup"] == "1.0"
    assert "needs CUDA" in capsys.readouterr().out


def test_run_appends_its_rows_to_the_given_all_csv(tmp_path):
    repo_csv = os.path.join(ROOT, "benchmarks", "results", "all.csv")
    before = os.path.getsize(repo_csv) if os.path.exists(repo_csv) else None
    all_csv = tmp_path / "all.csv"
    # This checks the rows a run writes, not compiled code: without TorchDynamo,
    # compile(reference) runs eagerly instead of compiling for most of a minute (cold cache).
    env = dict(os.environ, PYTHONPATH=ROOT, VFT_BENCH_ALL_CSV=str(tmp_path / "env.csv"), TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--ops", "fsq", "--quick", "--min-run-time",
                           "0.05", "--out", str(tmp_path / "out"), "--all-csv", str(all_csv)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (os.path.getsize(repo_csv) if os.path.exists(repo_csv) else None) == before
    assert not (tmp_path / "env.csv").exists()
    rows = report.read_rows(str(all_csv))
    assert rows == report.read_rows(str(tmp_path / "out" / "results.csv"))
    header = _read(all_csv)[0]
    assert header == harness.column_order(header)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    expected_commit = commit.stdout.strip() if commit.returncode == 0 else "unknown"
    assert {r["run"] for r in rows} == {rows[0]["run"]}
    for r in rows:
        assert r["op"] == "fsq" and r["device"] == "cpu" and r["torch"] == torch.__version__
        assert r["commit"] == expected_commit and r["quick"] == "True" and r["date"]
        assert float(r["copy_GB/s"]) > 0 and float(r["matmul_GFLOP/s"]) > 0
        assert float(r["median_ms"]) > 0 and r["baseline"] == "reference" and float(r["speedup"]) > 0


def test_harness_interleaves_rounds_and_takes_same_round_ratios(monkeypatch):
    """Providers of one group are timed in turn, round after round; a machine that slows
    down between rounds changes every provider's times but not the same-round ratios."""
    from benchmarks.common import Case

    calls = []

    def fake_times(fn, device, min_run_time, warm_up=True):
        name = fn()
        calls.append((name, warm_up))
        rnd = sum(1 for c, _ in calls if c == name)  # 1, 2, 3: the machine slows down
        return [{"base": 2.0, "fast": 0.5}[name] * rnd ** 2] * 3

    monkeypatch.setattr(harness, "_sample_times", fake_times)
    cases = [Case("op", "step", "s", "float32", p, (lambda p=p: p), baseline="base") for p in ("base", "fast")]
    cases.append(Case("op", "other", "s", "float32", "base", lambda: "base", baseline="base"))
    rows = harness.run_cases(cases, CPU, 0.3, verbose=False, rounds=3)
    assert [c for c, _ in calls[:6]] == ["base", "fast"] * 3  # interleaved within the group
    assert [w for _, w in calls[:6]] == [True, True, False, False, False, False]  # warm up once
    fast = rows[1]
    assert fast["round_ms"] == "500;2000;4500" and fast["median_ms"] == pytest.approx(2000.0)
    assert fast["speedup"] == pytest.approx(4.0)  # 2.0 / 0.5 in every round
    assert harness.round_ratio(harness._rounds(rows[0]), harness._rounds(fast)) == pytest.approx(4.0)


# --------------------------------------------------------------------------------------
# report


def test_report_tables_ratios_and_spread(tmp_path):
    path = str(tmp_path / "all.csv")
    harness.append_results([_row("sdpa", 1.0, 4.0), _row("cpu", 2.0, 2.0),
                            {**_row("flash", None), "skipped": "flash-attn needs CUDA; this run is on cpu"}],
                           path, _meta("r1", date="2030-01-01T00:00:00Z"))
    harness.append_results([_row("sdpa", 1.0, 4.0), _row("cpu", 1.5, 2.67)], path,
                           _meta("r2", date="2030-01-02T00:00:00Z"))
    harness.append_results([_row("sdpa", 1.0, 1.0), _row("triton", 3.0, 0.33)], path,
                           _meta("g1", commit="def5678", device="cuda"))
    harness.append_results([_row("reference", 1.0, op="fsq", baseline="reference")], path, _meta("f1"))
    out = tmp_path / "docs" / "performance.md"
    assert report.main(["--csv", path, "--out", str(out)]) == 0
    text = out.read_text()
    attention, fsq = text.split("\n## attention\n")[1].split("\n## fsq\n")
    cpu, cuda = attention.split("### attention on cpu (cpu box)")[1].split("### attention on cuda (cuda box)")
    # latest cpu run (r2) with the spread of the ratio over both runs of its commit
    assert "2030-01-02T00:00:00Z" in cpu and "ratio min-max (runs)" in cpu
    assert "| baseline |  |" in cpu and "| 1.50x | 1.50-2.00x (2) |" in cpu
    assert "| sdpa |" in cpu and "| cpu |" in cpu and "flash" not in cpu  # r1's skipped row is not the latest
    # one run: no spread column
    assert "| triton |" in cuda and "| 3.00x |" in cuda and "min-max" not in cuda
    assert "| reference |" in fsq
    # a skipped provider of the latest run is listed with its reason
    harness.append_results([_row("sdpa", 1.0), {**_row("flash", None), "skipped": "needs CUDA"}], path,
                           _meta("r3", date="2030-01-03T00:00:00Z"))
    assert report.main(["--csv", path, "--out", str(out)]) == 0
    assert "| skipped: needs CUDA |" in out.read_text()


def test_linear_bounds_reports_both_backgrounds(capsys):
    """benchmarks.linear_bounds (the yardstick of README "Results"): PCA bounds rise with
    the numbers per latent frame, beat the mean colour, and the busy background is harder."""
    import re

    from benchmarks import linear_bounds

    assert linear_bounds.main(["--size", "16", "--train-clips", "60", "--heldout-clips", "6", "--dims", "4,24",
                               "--ae-steps", "100"]) == 0
    out = capsys.readouterr().out
    calm, busy = out.split("detailed background")
    assert calm.startswith("calm background") and calm.count("linear autoencoder") == 1

    def numbers(block):
        base = float(re.search(r"mean colour ([\d.]+) dB", block).group(1))
        pca = {int(d): float(v) for d, v in re.findall(r"PCA,\s+(\d+) numbers per latent frame: ([\d.]+) dB", block)}
        return base, pca

    (calm_base, calm_pca), (busy_base, busy_pca) = numbers(calm), numbers(busy)
    assert calm_pca[24] > calm_pca[4] > calm_base - 0.5 and busy_pca[24] > busy_pca[4]
    assert calm_pca[24] > busy_pca[24]


def test_linear_bounds_fsq_autoencoder_rises_with_keep(capsys):
    """--fsq: the quantised nested-dropout linear autoencoder reports PSNR for every keep,
    rising from keep 1 to all registers after a short training; bad specs are refused."""
    import re

    from benchmarks import linear_bounds

    assert linear_bounds.main(["--size", "16", "--train-clips", "80", "--heldout-clips", "6", "--dims", "8",
                               "--ae-steps", "0", "--fsq", "4x8,5,5,5", "--fsq-steps", "300"]) == 0
    calm = capsys.readouterr().out.split("detailed background")[0]
    line = re.search(r"FSQ linear autoencoder, 4 x \(8, 5, 5, 5\).*", calm).group(0)
    curve = {int(k): float(v) for k, v in re.findall(r"(\d+): ([\d.]+)", line.split("by keep:")[1])}
    assert sorted(curve) == [1, 2, 4] and curve[4] > curve[1] + 0.5, curve
    with pytest.raises(SystemExit):
        linear_bounds.main(["--fsq", "16x8,1"])
    assert linear_bounds.parse_fsq("16x8,5,5,5") == (16, (8, 5, 5, 5))


def test_linear_bounds_conv_autoencoder_rises_with_keep(capsys):
    """--conv: the same FSQ nested-dropout code with a convolutional encoder and decoder
    reports PSNR for every keep, rising with keep after a short training; --backgrounds
    picks the backgrounds; sizes the conv stack cannot take and unknown backgrounds are refused."""
    import re

    from benchmarks import linear_bounds

    # 1,000 training clips: with fewer the conv net memorises its pool and never rises.
    assert linear_bounds.main(["--size", "16", "--train-clips", "1000", "--heldout-clips", "6", "--dims", "8",
                               "--ae-steps", "0", "--backgrounds", "calm", "--conv", "4x8,5,5,5",
                               "--conv-steps", "2000", "--conv-width", "16"]) == 0
    out = capsys.readouterr().out
    assert "detailed background" not in out and out.startswith("calm background")
    line = re.search(r"FSQ conv autoencoder \(width 16\), 4 x \(8, 5, 5, 5\).*", out).group(0)
    curve = {int(k): float(v) for k, v in re.findall(r"(\d+): ([\d.]+)", line.split("by keep:")[1])}
    assert sorted(curve) == [1, 2, 4] and curve[4] > curve[1] + 0.2, curve
    for bad in (["--size", "12", "--conv", "4x8,5,5,5"], ["--backgrounds", "calm,noisy"], ["--conv", "4x"]):
        with pytest.raises(SystemExit):
            linear_bounds.main(bad)
    assert "--size divisible by 8" in capsys.readouterr().err


def test_bench_packed_bf16_records_every_provider(tmp_path, capsys):
    """benchmarks.bench_packed_bf16: every shape gets the three providers, timed, with the
    speedup against the old path (float32 products) in the same run where the CPU has bf16
    brgemm (else that row is skipped with the reason); rows are appended to --all-csv with
    the run's metadata; the bf16-products switch is restored."""
    import csv

    from benchmarks import bench_packed_bf16 as bp
    from vft_kernels._ext import C

    before = C.attention_cpu_bf16_brgemm(True)
    C.attention_cpu_bf16_brgemm(before)
    all_csv = tmp_path / "all.csv"
    assert bp.main(["--rounds", "2", "--min-run-time", "0.02", "--all-csv", str(all_csv)]) == 0
    assert C.attention_cpu_bf16_brgemm(before) == before
    out = capsys.readouterr().out
    rows = list(csv.DictReader(all_csv.open()))
    has_bf16 = bool(C.attention_cpu_bf16_isa())
    assert len(rows) == 3 * len(bp.SHAPES) and {(r["op"], r["name"]) for r in rows} == {("attention_packed", bp.NAME)}
    assert all(r["commit"] and r["device"] == "cpu" and r["baseline"] == bp.OLD_PATH for r in rows)
    for label, *_ in bp.SHAPES:
        group = {r["provider"]: r for r in rows if r["shape"].startswith(label)}
        assert set(group) == {bp.BF16_PRODUCTS, bp.OLD_PATH, "cpu(float32 inputs)"}
        assert float(group[bp.OLD_PATH]["median_ms"]) > 0 and float(group[bp.OLD_PATH]["speedup"]) == 1.0
        assert float(group["cpu(float32 inputs)"]["median_ms"]) > 0
        fast = group[bp.BF16_PRODUCTS]
        if has_bf16:
            assert float(fast["median_ms"]) > 0 and float(fast["speedup"]) > 0 and not fast["skipped"]
            assert len(fast["round_ms"].split(";")) == 2
        else:
            assert "no AMX-BF16" in fast["skipped"] and not fast["median_ms"]
    assert out.count("bf16 products vs") == (2 * len(bp.SHAPES) if has_bf16 else 0), out
    with pytest.raises(SystemExit):
        bp.main(["--rounds", "0"])


def test_eval_adaptive_policies_on_a_micro_model(tmp_path, token_sensitive):
    """benchmarks.eval_adaptive: the five clip kinds; fixed K = the smallest K whose mean PSNR
    reaches the target; the per-clip oracle is the cheapest lambda-sweep allocation reaching
    it (lambda = 0 takes each clip's best K, a huge lambda K = 1 everywhere)."""
    from benchmarks import eval_adaptive as ea
    from vft.config import preset
    from vft.model import VideoFlexTok

    torch.manual_seed(0)
    m = token_sensitive(VideoFlexTok(preset("micro")).eval())
    clips, kinds = ea.mixed_clips(m.cfg, 1)
    assert clips.shape == (5, 3, 4, 16, 16) and kinds == list(ea.KINDS)
    assert torch.equal(clips[0, :, 0], clips[0, :, 3])  # static
    sampling = dict(steps=1, guidance="none")
    res = ea.evaluate(m, clips, kinds, [-100.0, 1000.0], sampling, progress=False)
    easy, impossible = res["rows"]
    assert easy["fixed_k"] == 1 and easy["oracle_clip_tokens"] == 1 and easy["oracle_frame_tokens"] == 1
    assert easy["oracle_clip_saving"] == 0
    assert impossible["fixed_k"] is None and math.isnan(impossible["oracle_clip_tokens"])
    huge = [p for p in res["frontier"]["clip"] if p[2] == ea.LAMBDAS[-1]][0]
    assert huge[0] == 1 and huge[1] == pytest.approx(res["mean_psnr_by_k"][0])
    zero = [p for p in res["frontier"]["clip"] if p[2] == 0.0][0]
    assert zero[1] >= max(res["mean_psnr_by_k"]) - 1e-9  # each clip at its best K beats any single K
    # per kind: what each K is worth (the gains telescope to frame PSNR at R minus at K = 1)
    assert list(res["by_kind"]) == list(ea.KINDS)
    R = m.cfg.registers
    for i, (kind, info) in enumerate(res["by_kind"].items()):
        assert info["clips"] == 1 and len(info["db_per_token"]) == R - 1
        rec1, recR = (m.detokenize(m.tokenize(clips[i:i + 1]), keep=k, **sampling)[0] for k in (1, R))
        first = [ea.psnr(r[:, :1], clips[i][:, :1]) for r in (rec1, recR)]
        assert sum(info["db_per_token_first_frame"]) == pytest.approx(first[1] - first[0], abs=1e-4)
        assert {"clip_saving", "frame_saving"} <= set(info) and info["psnr_by_k"] == res["psnr_by_k_per_kind"][kind]
    ea.plot(res, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_bench_block_cases_run_and_fused_ops_save_activation_memory():
    """The per-op cases run (quick: no torch.compile), and the tiny model's training step
    keeps at least 25 % fewer activation bytes for its backward on the fused ops (cpu)
    than the unfused reference backend (33 % measured)."""
    import vft_kernels as vk
    from benchmarks import bench_block
    from benchmarks.common import Context

    cases = bench_block.cases(Context(device=torch.device("cpu"), quick=True))
    providers = {c.provider for c in cases}
    assert {"reference", "cpu", "compile(reference)"} <= providers
    for c in cases:
        if c.fn is not None:
            c.fn()
    cfg, model, _, video, inputs = bench_block._model_setup(128, 2, torch.device("cpu"))
    sizes = {}
    for backend in ("cpu", "reference"):
        with vk.use_backend(backend):
            sizes[backend] = bench_block.saved_activation_bytes(model, video, inputs)
    assert sizes["cpu"] <= 0.75 * sizes["reference"], sizes


def test_eval_adaptive_savings_on_interpolated_frontiers():
    """tokens_at interpolates linearly between Pareto points; savings_at_fixed_k compares at
    each fixed K's own PSNR (known answers)."""
    from benchmarks import eval_adaptive as ea

    pts = [(1.0, 10.0, 9.0), (3.0, 14.0, 0.5), (2.0, 11.0, 1.0), (2.5, 10.5, 2.0)]  # (2.5, 10.5) is dominated
    assert ea.pareto(pts) == ([1.0, 2.0, 3.0], [10.0, 11.0, 14.0])
    assert ea.tokens_at(pts, 9.0) == 1.0 and ea.tokens_at(pts, 12.5) == pytest.approx(2.5)
    assert math.isnan(ea.tokens_at(pts, 14.5))
    rows = ea.savings_at_fixed_k([10.0, 12.5, 14.0], {"p": pts})
    assert [r["p_tokens"] for r in rows] == pytest.approx([1.0, 2.5, 3.0])
    assert [r["p_saving"] for r in rows] == pytest.approx([0.0, 1 - 2.5 / 2, 0.0])


def test_report_targets_over_runs_of_the_latest_commit_and_readme_block(tmp_path):
    """Each target is the median of its same-run ratios over the full runs of the latest
    commit that measured it, with min and max, met or missed against its goal; older
    commits, quick runs and other devices do not count; --readme rewrites only the block
    between the markers, with the README's rows, the CPU they ran on and no commit ids."""
    path = str(tmp_path / "all.csv")
    shape = "4x16x5x32x32"

    def flow_rows(cpu_ms, compile_ms=1.0, eager_ms=2.0):
        kw = dict(op="flow", name="apg step (momentum, threshold)", shape=shape, baseline="reference")
        return [_row("reference", 1.0, eager_ms, **kw), _row("compile(reference)", 1.0, compile_ms, **kw),
                _row("cpu", 1.0, cpu_ms, **kw)]

    harness.append_results(flow_rows(0.1), path, _meta("old", commit="0ld0000", date="2030-01-01T00:00:00Z"))
    for i, ms in enumerate((0.5, 0.4, 0.8)):  # ratios vs compile: 2.0, 2.5, 1.25 -> median 2.0, met
        harness.append_results(flow_rows(ms), path, _meta(f"n{i}", commit="new1234", date=f"2030-01-0{i + 2}T00:00:00Z"))
    harness.append_results(flow_rows(0.01), path, _meta("q", commit="new1234", date="2030-01-09T00:00:00Z", quick=True))
    harness.append_results(flow_rows(0.01), path, _meta("g", commit="new1234", device="cuda"))
    rows = report.read_rows(path)
    apg = next(t for t in report.TARGETS if t.op == "flow" and t.shape == shape and t.name.startswith("apg"))
    vals, commit = report.target_values(rows, apg)
    assert commit == "new1234" and sorted(vals) == pytest.approx([1.25, 2.0, 2.5])
    table = "\n".join(report.targets_table(rows))
    assert "| 2.00x [1.25x, 2.50x] (3, new1234) | 2.00x | met |" in table
    # a newer commit with one run replaces the older commit's runs: now missed
    harness.append_results(flow_rows(1.0), path, _meta("n9", commit="new5678", date="2030-02-01T00:00:00Z"))
    table = "\n".join(report.targets_table(report.read_rows(path)))
    assert "| 1.00x [1.00x, 1.00x] (1, new5678) | 2.00x | **missed** |" in table
    assert "| FSQ fwd+bwd, 4M tokens, vs eager | no full run recorded | 15.00x | not measured |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nstale table\n{report.END}\noutro\n")
    out = tmp_path / "perf.md"
    assert report.main(["--csv", path, "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{report.END}\noutro\n") and "stale" not in text
    assert "Measured on: cpu box, x threads, torch x" in text
    assert ("| flow step with APG guidance, [4, 16, 5, 32, 32] | `torch.compile` of the eager step | "
            "1.00x [1.00x, 1.00x] over 1 |") in text
    assert "| FSQ forward + backward, 4M tokens x 6 dims | eager PyTorch | not measured |" in text
    assert "new5678" not in text and "**missed**" in out.read_text() and "## Targets" in out.read_text()
    readme.write_text("no markers\n")
    assert report.main(["--csv", path, "--out", str(out), "--readme", str(readme)]) == 1
    assert readme.read_text() == "no markers\n"


def test_report_keeps_cpu_capabilities_apart(tmp_path):
    """Runs with vft's kernels capped to AVX2 never mix with the native ones: the README's
    main column takes the highest capability recorded, its AVX2 column the avx2 runs, and
    docs/performance.md gives each capability its own table."""
    path = str(tmp_path / "all.csv")
    kw = dict(op="flow", name="apg step (momentum, threshold)", shape="4x16x5x32x32", baseline="reference")
    for run, cap, cpu_ms in (("nat", "avx512_bf16", 0.25), ("a2", "avx2", 0.5), ("nat2", "avx512_bf16", 0.2)):
        rows = [_row(p, 1.0, ms, cpu_capability=cap, **kw)
                for p, ms in (("reference", 2.0), ("compile(reference)", 1.0), ("cpu", cpu_ms))]
        harness.append_results(rows, path, _meta(run, commit="c0ffee1"))
    rows = report.read_rows(path)
    apg = next(t for t in report.TARGETS if t.op == "flow" and t.shape == kw["shape"] and t.name.startswith("apg"))
    assert sorted(report.target_values(rows, apg)[0]) == pytest.approx([4.0, 5.0])
    assert [v for v, _ in report._target_runs(rows, apg, "cpu", cap="avx2")] == pytest.approx([2.0])
    table = "\n".join(report.readme_table(rows))
    assert "| 4.50x [4.00x, 5.00x] over 2 | 2.00x [2.00x, 2.00x] over 1 |" in table
    md = report.render(rows, path)
    assert "flow on cpu (cpu box), vft kernels at avx2" in md and "flow on cpu (cpu box), vft kernels at avx512_bf16" in md


@pytest.mark.parametrize("cpu, goal, status", [("AMD EPYC (avx512_bf16)", "1.50x", "met"),
                                               ("Intel Xeon (amx_bf16, avx512_bf16)", "2.00x", "**missed**")])
def test_report_bf16_attention_goal_follows_the_cpu(tmp_path, cpu, goal, status):
    """The bf16 attention target is 1.5x the float32 kernel, 2x on CPUs with AMX-BF16 (the
    run's device_name, from benchmarks.run.cpu_name, says which)."""
    path = str(tmp_path / "all.csv")
    t = next(t for t in report.TARGETS if t.op == "attention" and t.dtype == "bfloat16")
    kw = dict(name=t.name, shape=t.shape + " N=1024", keep=t.keep, dtype="bfloat16", baseline="reference")
    rows = [_row("cpu", None, 10.0, **kw), _row("cpu(float32 inputs)", None, 17.0, **kw)]
    meta = _meta("r1", commit="c0ffee1")
    meta["device_name"] = cpu
    harness.append_results(rows, path, meta)
    line = next(ln for ln in report.targets_table(report.read_rows(path)) if ln.startswith(f"| {t.what}"))
    assert f"| 1.70x [1.70x, 1.70x] (1, c0ffee1) | {goal} | {status} |" in line


def test_cpu_name_names_the_bf16_instructions():
    name = harness.cpu_name()
    assert name
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return
    for flag in ("amx_bf16", "avx512_bf16"):
        assert (flag in name) == (f" {flag}" in flags or f"\t{flag}" in flags), (flag, name)


@pytest.mark.parametrize("mode", ["block_causal_last", "block_causal", "full"])
def test_attention_executed_pairs_are_the_unmasked_tiles(mode):
    """bench_attention's tile-waste column: pairs in the 64 x 64 tiles that hold any allowed
    pair, against a count from the dense mask."""
    from benchmarks.bench_attention import TILE, _executed_pairs
    from vft_kernels.layout import RegisterLayout

    layout = RegisterLayout(3, 40, 30, mode)  # N = 210: a partial last tile
    keeps = [30, 1, [5, 30, 0]]
    masks = layout.materialize(torch.tensor([[k] * 3 if isinstance(k, int) else k for k in keeps]))
    want = 0
    N = layout.seq_len
    for m in masks:
        for q0 in range(0, N, TILE):
            for k0 in range(0, N, TILE):
                tile = m[q0:q0 + TILE, k0:k0 + TILE]
                want += tile.numel() if bool(tile.any()) else 0
    assert _executed_pairs(layout, keeps) == want
    allowed = sum(layout.allowed_pairs(k) for k in keeps)
    assert allowed <= want <= len(keeps) * N * N


def test_flow_targets_name_real_cases_and_the_traffic_floor_moves_the_same_bytes():
    """Every flow target of the quick shape names a (step, provider) the flow benchmark
    times, and the CFG traffic-floor row (torch.addcmul into the same output) moves the
    same bytes as the CFG step and computes x + v_cond * v_uncond into that output."""
    from benchmarks import bench_flow
    from benchmarks.common import Context

    cases = bench_flow.cases(Context(device=torch.device("cpu"), quick=True))
    have = {(c.name, c.provider, c.shape) for c in cases}
    flow_targets = [t for t in report.TARGETS if t.op == "flow" and t.shape == "4x16x5x32x32"]
    assert any(t.provider == bench_flow.SAME_TRAFFIC for t in flow_targets)
    for t in flow_targets:
        for provider in (t.provider, t.against):
            assert (t.name, provider, t.shape) in have, (t.what, provider)
    cfg = {c.provider: c for c in cases if c.name == "cfg step"}
    floor = cfg[bench_flow.SAME_TRAFFIC]
    assert floor.bytes == cfg["cpu"].bytes == 4 * 4 * 16 * 5 * 32 * 32 * 4
    got = floor.fn()
    g = torch.Generator(device="cpu").manual_seed(0)
    x, vc, vu = (torch.randn((4, 16, 5, 32, 32), generator=g) for _ in range(3))
    torch.testing.assert_close(got, x + vc * vu)


def test_keep_sampling_benchmark_runs(capsys):
    """benchmarks.keep_sampling: one line per mode, the four keeps scored, and ``front``'s
    no-leaning reference is the frame-weighted mean of the all-R and all-1 losses."""
    import json

    from benchmarks import keep_sampling as ks
    from vft import train as vt

    make_dataset = vt.make_dataset
    assert ks.main(["--steps", "2", "--modes", "uniform,uniform_frame", "--static"]) == 0
    assert vt.make_dataset is make_dataset  # the static clips were for the benchmark's runs only
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rows] == ["uniform", "uniform_frame"]
    for r in rows:
        assert r["front_if_no_leaning"] == pytest.approx((r["all_4"] + 3 * r["all_1"]) / 4)
        assert all(0 < r[k] < 10 for k in ("mixed", "front", "all_1", "all_4"))
    with pytest.raises(SystemExit):
        ks.main(["--modes", "per_frame"])


def test_eval_tokens_mixed_keeps_and_paired_comparison(tmp_path, token_sensitive, capsys):
    """benchmarks.eval_tokens --mixed decodes each latent frame with its own K (a fixed draw,
    checked against decoding with that keep tensor), and --compare prints per-K paired
    differences: a run against itself is exactly 0, against another model its mean is the
    difference of the two means."""
    import json

    from benchmarks import eval_tokens as et
    from vft import checkpoint as ckpt
    from vft.config import preset
    from vft.model import VideoFlexTok

    keeps = et.mixed_keeps([1, 2, 4], 3, 5)
    assert keeps.shape == (3, 5) and set(keeps.unique().tolist()) <= {1, 2, 4}
    assert torch.equal(keeps, et.mixed_keeps([1, 2, 4], 3, 5)) and keeps.unique().numel() > 1
    torch.manual_seed(0)
    m = token_sensitive(VideoFlexTok(preset("micro")).eval())
    clips = et.heldout_clips(m.cfg, 3)
    res = et.evaluate(m, clips, [1, 2, "mixed"], steps=1, guidance="none", progress=False)
    kp = et.mixed_keeps([1, 2], 3, m.cfg.latent_frames)
    rec = m.detokenize(m.tokenize(clips), keep=kp, steps=1, guidance="none")
    assert res["per_k"]["mixed"]["psnr_per_clip"] == pytest.approx([et.psnr(a, b) for a, b in zip(rec, clips)])
    assert res["per_k"]["mixed"]["psnr_per_clip"] != res["per_k"][1]["psnr_per_clip"]
    # the CLI end to end: two models, paired difference
    a, b = tmp_path / "a", tmp_path / "b"
    ckpt.save(str(a), m, m.cfg)
    m2 = token_sensitive(VideoFlexTok(preset("micro")).eval(), seed=1)
    ckpt.save(str(b), m2, m2.cfg)
    common = ["--clips", "3", "--steps", "1", "--guidance", "none", "--mixed", "--no-progress"]
    assert et.main(["--checkpoint", str(a), "--out", str(tmp_path / "ra")] + common) == 0
    assert et.main(["--checkpoint", str(a), "--out", str(tmp_path / "rself"), "--compare",
                    str(tmp_path / "ra" / "eval_tokens.json")] + common) == 0
    self_diff = json.loads((tmp_path / "rself" / "eval_tokens.json").read_text())["paired_vs"]["psnr_diff"]
    assert set(self_diff) >= {"1", "mixed"} and all(v[0] == 0 for v in self_diff.values())
    assert et.main(["--checkpoint", str(b), "--out", str(tmp_path / "rb"), "--compare",
                    str(tmp_path / "ra" / "eval_tokens.json")] + common) == 0
    ra, rb = (json.loads((tmp_path / r / "eval_tokens.json").read_text()) for r in ("ra", "rb"))
    for k in ("1", "mixed"):
        assert rb["paired_vs"]["psnr_diff"][k][0] == pytest.approx(rb["per_k"][k]["psnr"] - ra["per_k"][k]["psnr"])
    assert "paired PSNR difference" in capsys.readouterr().out
    with pytest.raises(ValueError, match="different clips"):
        et.paired_difference(rb, {**ra, "clips": 2})
