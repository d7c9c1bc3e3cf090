"""``reprokernels bench``: a quick CPU run of one op writes a well-formed CSV; the table; a missing benchmarks/.

The end-to-end test uses ``prefix_attention``: its quick pass is the shortest of the four ops on a 2-core CPU
(two shapes; its one compiled provider, peft-cat+sdpa+compile, compiles once per shape and mode).
It runs the CLI in a subprocess from a temporary working directory (so the benchmarks/ folder is found from the
package's path, not the cwd) with the default --out, so its rows and plots land in ./reprokernels-bench/ of that
directory and benchmarks/results is left untouched.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import Row
from benchmarks.device_limits import DeviceLimits, measure_copy_bandwidth, measure_matmul_rate
from reprokernels import bench

REPO_RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
# what runs on a CPU for prefix_attention (cpu: its decode kernel, on the decode rows only)
TIMED = {"peft-cat+sdpa", "peft-cat+sdpa+compile", "ideal-sdpa", "reference", "composite", "cpu", "auto"}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_bench_quick_cpu_writes_csv(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    res = plots = cwd / "reprokernels-bench"
    before = _snapshot(REPO_RESULTS) if REPO_RESULTS.exists() else {}
    proc = subprocess.run(
        [sys.executable, "-m", "reprokernels", "bench", "--quick", "--ops", "prefix_attention", "--device", "cpu"],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "USDT" not in proc.stderr and "profiler_start" not in proc.stderr, proc.stderr[-2000:]
    assert "peak MB" in out and "no 'peak MB' line" not in out

    # the measured limits are printed, then one side-by-side block per shape/dtype/mode
    assert "measured limits: copy bandwidth" in out and "TFLOP/s (float32" in out
    assert "prefix_attention | train" in out and "prefix_attention | decode" in out
    assert "(speed-up over peft-cat+sdpa)" in out
    for label in ("median ms", "speed-up", "GB/s", "% copy BW", "TFLOP/s", "% matmul (float32)"):
        assert f"  {label}" in out, label
    assert "not run here: " in out and "triton (interpreter: not timed" in out

    # the CSV: the writer's header, numeric medians for the timed providers, a reason for the others
    csv_path = res / "prefix_attention_cpu.csv"
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == [f.name for f in dataclasses.fields(Row)]
        rows = list(reader)
    assert len(rows) == 9 * 2 + 9  # train: 9 providers x (fwd, fwd+bwd); decode: 9 providers x fwd
    assert {(r["op"], r["dtype"]) for r in rows} == {("prefix_attention", "float32")}
    timed = [r for r in rows if r["median_ms"]]
    assert {r["provider"] for r in timed} == TIMED
    for r in timed:
        med, p20, p80 = float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"])
        assert 0 < med < 1e4 and math.isfinite(med) and p20 <= med <= p80, r
        assert float(r["gbps"]) > 0 and int(r["min_bytes"]) > 0, r
        assert "MISMATCH" not in r["note"], r
        assert r["device"].startswith("cpu") and r["git_sha"] and r["timestamp"]
    skipped = [r for r in rows if not r["median_ms"]]
    assert {r["provider"] for r in skipped} == {"triton", "ideal-sdpa", "cuda", "cpu"}  # cpu: decode only
    for r in skipped:
        assert r["note"] and not r["p20_ms"] and not r["gbps"], r
    assert all("GPU" in r["note"] for r in skipped if r["provider"] == "triton")

    # the JSONL twin, the measured limits, the plots
    assert len((res / "prefix_attention_cpu.jsonl").read_text().splitlines()) == len(rows)
    limits = [json.loads(line) for line in (res / "device_limits.jsonl").read_text().splitlines()]
    assert len(limits) == 1 and limits[0]["copy_gbps"] > 0 and limits[0]["matmul_tflops"] > 0
    if importlib.util.find_spec("matplotlib") is not None:
        pngs = sorted(p.name for p in plots.glob("*.png"))
        assert any("time_vs_size" in p for p in pngs) and len(pngs) == 3, pngs  # 2 shapes' bars + time vs size

    # the repository's results are left alone
    assert (_snapshot(REPO_RESULTS) if REPO_RESULTS.exists() else {}) == before


def test_bench_missing_benchmarks_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--benchmarks-dir", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark scripts" in err and "source checkout" in err and "--benchmarks-dir" in err
    with pytest.raises(bench.BenchmarksNotFound):
        bench.locate_benchmarks(tmp_path / "nowhere")
    assert bench.locate_benchmarks() == bench.default_benchmarks_dir()  # this checkout has one


def _row(provider: str, ms: float | None, *, op: str = "visual_prompt", mode: str = "fwd", gbps: float | None = None,
         tflops: float | None = None, note: str = "") -> Row:
    return Row(op=op, shape="s1", dtype="float32", mode=mode, provider=provider, median_ms=ms,
               p20_ms=None if ms is None else ms * 0.9, p80_ms=None if ms is None else ms * 1.1,
               gbps=gbps, tflops=tflops, note=note)


def test_side_by_side_table() -> None:
    limits = DeviceLimits(device="cpu", copy_gbps=20.0, copy_bytes=1, matmul_tflops=0.1, matmul_dtype="float32",
                          matmul_n=1)
    rows = [_row("reference", 4.0, gbps=2.5), _row("eager", 2.0, gbps=5.0), _row("reference+compile", 0.5, gbps=20.0),
            _row("triton", None, note="needs a GPU"), _row("eager", 3.0, mode="fwd+bwd", tflops=0.05)]
    text = bench.side_by_side(rows, limits)
    fwd, bwd = text.split("\n\n")[:2]
    assert fwd.splitlines()[0] == "visual_prompt | s1 | float32 | fwd   (speed-up over eager)"
    lines = {ln.split()[0]: ln.split() for ln in fwd.splitlines()[1:] if ln.strip()}
    assert lines["reference"] == ["reference", "eager", "reference+compile"]  # the header: providers as columns
    speed = next(ln for ln in fwd.splitlines() if ln.strip().startswith("speed-up")).split()[1:]
    assert speed == ["0.50x", "1.00x", "4.00x"]
    pct = next(ln for ln in fwd.splitlines() if "% copy BW" in ln).split()[3:]
    assert pct == ["12.5", "25.0", "100.0"]
    assert "not run here: triton (needs a GPU)" in fwd and "TFLOP/s" not in fwd
    assert "% matmul (float32)" in bwd and "50.0" in bwd


def test_baseline_choice() -> None:
    assert bench.baseline_of(["reference", "peft-eager", "triton"]) == "peft-eager"
    assert bench.baseline_of(["composite", "peft-cat+sdpa", "reference"]) == "peft-cat+sdpa"
    assert bench.baseline_of(["reference+compile", "reference"]) == "reference"  # no user-code baseline timed
    assert bench.baseline_of(["triton"]) is None


def test_device_limits_measured_small() -> None:
    gbps, nbytes = measure_copy_bandwidth("cpu", quick=True, nbytes=8 << 20)
    tflops, n, dtype = measure_matmul_rate("cpu", quick=True, n=128)
    assert gbps > 0 and nbytes == 8 << 20 and tflops > 0 and n == 128 and str(dtype) == "torch.float32"


def test_every_bench_script_is_an_op_script():
    """`reprokernels bench` runs every benchmarks/bench_<op>.py as `run(device, quick=...)`: a script of another
    shape under that name breaks the whole command (other benchmark scripts take other names)."""
    import importlib
    import inspect

    from benchmarks.run import available_ops

    for op in available_ops():
        params = inspect.signature(importlib.import_module(f"benchmarks.bench_{op}").run).parameters
        assert "quick" in params and next(iter(params)) in ("device", "dev"), (op, list(params))
