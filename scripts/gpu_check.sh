#!/usr/bin/env bash
# The GPU check a maintainer runs on a CUDA machine, in one command:
#
#     bash scripts/gpu_check.sh [REPORT]        # default report: results/gpu_check/report.md
#
# It builds the extension (with the CUDA kernels), runs the GPU test suite (tests/gpu:
# compiled Triton and the CUDA C++ kernels against the reference), and the quick
# benchmarks on the device, and writes one Markdown report. It fails loudly -- it never
# skips -- when CUDA is expected but missing: no device, a CPU-only torch, an extension
# built without CUDA kernels, or Triton left in interpreter mode.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=results/gpu_check
REPORT=${1:-$OUTDIR/report.md}
mkdir -p "$OUTDIR" "$(dirname "$REPORT")"
PY=.venv/bin/python
export PYTHONPATH=$PWD
export TRITON_INTERPRET=0 VFT_REQUIRE_CUDA=1 FORCE_CUDA=1

fail() { echo "gpu_check: FAILED: $*" | tee -a "$REPORT" >&2; exit 1; }

{
  echo "# vft GPU check"
  echo
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
} > "$REPORT"

if [ "${VFT_GPU_CHECK_SKIP_BUILD:-0}" != 1 ]; then  # set by the test of this script only
  make build >"$OUTDIR/build.log" 2>&1 || fail "make build (see $OUTDIR/build.log)"
fi

"$PY" - >>"$REPORT" 2>&1 <<'PYEOF' || fail "CUDA is expected but not usable here (details above in the report)"
import sys, torch
from vft_kernels import _ext
problems = []
if torch.version.cuda is None:
    problems.append(f"torch {torch.__version__} is a CPU-only build")
if not torch.cuda.is_available():
    problems.append("torch.cuda.is_available() is False (no device, or a driver problem)")
if _ext.C is None:
    problems.append(f"vft_kernels._C did not load: {_ext.load_error}")
elif not _ext.C.build_info().get("with_cuda"):
    problems.append("vft_kernels._C was built without CUDA kernels: " + _ext.C.build_info().get("cuda_reason", ""))
print("## Machine\n")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"* device {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
print()
for p in problems:
    print(f"* PROBLEM: {p}")
sys.exit(1 if problems else 0)
PYEOF

{ echo "## Backends"; echo; echo '```'; "$PY" -m vft_kernels.info 2>&1; echo '```'; echo; } >>"$REPORT"

echo "## GPU tests (tests/gpu)" >>"$REPORT"
echo >>"$REPORT"
"$PY" -m pytest -q -rfEs tests/gpu >"$OUTDIR/tests.log" 2>&1
tests_rc=$?
{ echo '```'; tail -n 40 "$OUTDIR/tests.log"; echo '```'; echo; } >>"$REPORT"
if grep -qE "[0-9]+ skipped" "$OUTDIR/tests.log"; then
  fail "GPU tests were skipped on a machine where they must run (see $OUTDIR/tests.log)"
fi
[ "$tests_rc" -eq 0 ] || fail "GPU tests (exit $tests_rc, see $OUTDIR/tests.log)"

echo "## Quick benchmarks (cuda)" >>"$REPORT"
echo >>"$REPORT"
"$PY" -m benchmarks.run --quick --device cuda --ops fsq,flow,attention --out "$OUTDIR/bench" \
  >"$OUTDIR/bench.log" 2>&1 || fail "benchmarks (see $OUTDIR/bench.log)"
[ -f "$OUTDIR/bench/results.md" ] && cat "$OUTDIR/bench/results.md" >>"$REPORT"

echo "gpu_check: OK, report in $REPORT"
