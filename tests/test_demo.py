"""``reprokernels demo`` in its reduced CI mode (``--epochs 1 --quick``): files written, figures sane."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from reprokernels.__main__ import main as cli_main
from reprokernels.demo.digits import CANVAS, METHODS, NATIVE, SourceCNN, report


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = cli_main(["demo", "--epochs", "1", "--quick", "--seed", "0", "--device", "cpu", "--no-progress",
                   "--out", str(out)])
    return rc, out


def test_demo_writes_files_and_sane_figures(demo_run, capsys):
    rc, out = demo_run
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["config"]["epochs"] == 1 and summary["config"]["quick"] is True

    methods = summary["methods"]
    assert set(methods) == set(METHODS)
    for name, r in methods.items():
        for key in ("acc_mapping_alone", "acc_init", "acc_final"):
            assert 0.0 <= r[key] <= 1.0, (name, key)
        assert len(r["train_loss"]) == 1 and len(r["test_acc"]) == 2
    best = methods[summary["best_method"]]
    assert best["acc_final"] == max(r["acc_final"] for r in methods.values())
    assert best["acc_final"] > best["acc_mapping_alone"]
    assert best["acc_final"] > best["acc_init"]
    assert summary["source"]["test_acc"] > 0.9
    assert summary["chance_acc"] == 0.2
    for name, r in methods.items():  # "improved": an accuracy margin over the mapping alone and over chance
        want = r["acc_final"] >= max(r["acc_mapping_alone"], 0.2) + summary["improved_margin"]
        assert r["improved"] == want, name
    assert "chance 0.200" in report(summary)

    p = summary["parameters"]
    assert p["trainable"] == CANVAS * CANVAS  # δ (1, 16, 16); the 5x5 mappings are buffers, not parameters
    assert p["trainable_active"] == CANVAS * CANVAS - NATIVE * NATIVE
    assert p["frozen"] == sum(t.numel() for t in SourceCNN().parameters())
    assert p["checkpoint_keys"] == ["input_prompt.delta", "label_mapping.mapping", "label_mapping.num_updates"]

    t = summary["step_time"]
    assert t["reference"]["status"] == "ok" and t["reference"]["ms"] > 0
    assert t["triton"]["status"] == "needs a GPU" and t["cuda"]["status"] == "needs a GPU"


def test_demo_is_deterministic(demo_run, tmp_path):
    _, out = demo_run
    rc = cli_main(["demo", "--epochs", "1", "--quick", "--seed", "0", "--device", "cpu", "--no-progress",
                   "--out", str(tmp_path)])
    assert rc == 0
    a = json.loads((out / "summary.json").read_text())
    b = json.loads((tmp_path / "summary.json").read_text())
    for key in ("methods", "parameters", "source"):
        if key == "source":
            a[key].pop("train_seconds"), b[key].pop("train_seconds")
        assert a[key] == b[key], key


def test_demo_bad_backend_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli_main(["demo", "--device", "cpu", "--backend", "cuda", "--quick", "--out", str(tmp_path)]) == 2
    assert "--backend cuda" in capsys.readouterr().err
