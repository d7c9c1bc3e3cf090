"""The GPU-readiness gate's rules (tools/aot_rules.py) on synthetic findings: each rule fires, a clean report
passes. The audit itself (tools/aot_audit.py, run by .ci/run) compiles the real kernels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import aot_rules


def _rec(syncs=None, launches=(("_k", (200, 1, 1)),), wave=True, launcher="triton", error=None) -> dict:
    rec = dict(op="op", name="case", wave=wave, launcher=launcher,
               phases={"fwd": dict(syncs=dict(syncs or {}), launches=list(launches))})
    if error:
        rec["error"] = error
    return rec


def _res(**kw) -> dict:
    base = dict(kernel="_k", config="B=64 w4s3", dtype="16bit", arch=90, regs=64, spill=0, smem=0, dots=0,
                mma="-")
    return {**base, **kw}


def test_clean_report_passes() -> None:
    assert aot_rules.violations([_rec()], [_rec(launcher="cuda")], [_res(), _res(arch=80)]) == []


@pytest.mark.parametrize("result, expected", [
    (_res(error="CompilationError: boom"), "compile error: CompilationError: boom"),
    (_res(smem=300_000, dots=1, mma="wgmma"), "shared memory 300000 B > 232448 B"),
    (_res(arch=80, smem=170_000, dots=1, mma="mma.sync"), "shared memory 170000 B > 166912 B"),
    (_res(smem=120_000), "no room for 2 CTAs/SM"),
    (_res(spill=28), "28 B of register spills in a 16-bit kernel"),
    (_res(dots=2, mma="FMA"), "dot on FMA units"),
    (_res(dtype="fp32", spill=512), "512 B of register spills > budget 0 B"),
])
def test_each_kernel_rule_fires(result: dict, expected: str) -> None:
    bad = aot_rules.violations([], [], [result])
    assert len(bad) == 1 and expected in bad[0], bad


def test_fp32_spill_within_its_budget_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(aot_rules.FP32_SPILL_BUDGET, "_k", 1024)
    assert aot_rules.violations([], [], [_res(dtype="fp32", spill=1000, dots=1, mma="FMA")]) == []
    assert aot_rules.violations([], [], [_res(dtype="fp32", spill=1100, dots=1, mma="FMA")])


def test_host_syncs_fail_for_both_launchers() -> None:
    bad = aot_rules.violations([_rec(syncs={"Tensor.tolist()": 2})], [_rec(launcher="cuda", syncs={"nonzero": 1})],
                               [])
    assert any("2 host sync(s): Tensor.tolist()" in b for b in bad)
    assert any("[cuda launcher] fwd: 1 host sync(s): nonzero" in b for b in bad)


def test_grid_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    small = _rec(launches=[("_k", (8, 1, 1))])
    assert any("8 programs < 132" in b for b in aot_rules.violations([small], [], []))
    assert aot_rules.violations([_rec(launches=[("_k", (8, 1, 1))], wave=False)], [], []) == []
    monkeypatch.setitem(aot_rules.SMALL_BY_DESIGN, "_k", (8, "a fixed-order reduction of 8 partials"))
    assert aot_rules.violations([small], [], []) == []
    monkeypatch.setitem(aot_rules.SMALL_BY_DESIGN, "_k", (9, "at least 9 programs"))
    assert any("8 programs" in b for b in aot_rules.violations([small], [], []))
    too_tall = _rec(launches=[("_k", (4, 70_000, 1))], wave=False)
    assert any("past CUDA's limits" in b for b in aot_rules.violations([too_tall], [], []))


def test_a_failing_op_is_a_violation() -> None:
    bad = aot_rules.violations([_rec(error="RuntimeError: x")], [], [])
    assert bad == ["op/case: the op failed: RuntimeError: x"]


def test_small_ops_are_exempt_from_the_wave_rule() -> None:
    small = _rec(launches=[("_k", (8, 1, 1))])
    small["phases"]["fwd"]["op_bytes"] = aot_rules.SMALL_OP_BYTES - 1
    assert aot_rules.violations([small], [], []) == []
    small["phases"]["fwd"]["op_bytes"] = aot_rules.SMALL_OP_BYTES
    assert aot_rules.violations([small], [], [])
