"""``reprokernels demo --text`` in its reduced CI mode: the "text" section of summary.json is there and sane."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import torch

from reprokernels.__main__ import main as cli_main
from reprokernels.demo.text import TinyConfig, TinyTransformer


def test_demo_text_quick(tmp_path, capsys):
    rc = cli_main(["demo", "--text", "--epochs", "1", "--quick", "--seed", "0", "--device", "cpu", "--no-progress",
                   "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "prompt tuning" in printed and "prefix tuning" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "methods" in summary  # the digits demo still runs alongside
    t = summary["text"]
    assert t["config"]["quick"] is True and t["config"]["target_task"] == "reverse"
    assert t["source"]["copy_acc"] > 0.9  # the backbone learned its source task
    assert t["frozen_on_target"]["acc"] < 0.3  # without the instruction the frozen model does not reverse
    assert t["frozen_parameters"] == sum(p.numel() for p in TinyTransformer(TinyConfig()).parameters())
    assert set(t["methods"]) == {"prompt", "prefix"}
    for m in t["methods"].values():
        for key in ("loss_before", "loss_after"):
            assert math.isfinite(m[key]), key
        assert 0.0 <= m["acc_before"] <= 1.0 and 0.0 <= m["acc_after"] <= 1.0
        assert m["trainable"] > 0
        st = m["step_time_ms"]
        assert st["peft_style"] > 0 and st["reprokernels"] > 0
    assert t["methods"]["prompt"]["trainable"] == t["config"]["prompt_tokens"] * t["config"]["d_model"]
    # "improved" is decided on accuracy: a margin over both the frozen model and chance, never on loss alone
    chance, frozen = t["config"]["chance_acc"], t["frozen_on_target"]["acc"]
    assert abs(chance - 1 / 13) < 1e-9
    for kind, m in t["methods"].items():
        assert m["improved"] == (m["acc_after"] >= max(frozen, chance) + t["config"]["improved_margin"]), kind
        assert m["acc_after"] >= 0.5, (kind, m["acc_after"])  # both methods learn the task, even in --quick
    assert t["all_improved"] is True
    assert f"chance {chance:.3f}" in printed or f"{chance:>8.3f}" in printed
    if any(m["step_time_ms"]["speedup"] <= 0.95 for m in t["methods"].values()):
        assert "SLOWER" in printed and "reprokernels is slower here:" in printed


def test_prefix_paths_agree():
    """The PEFT-style eager path (expand + cat + masked SDPA) and prefix_attention give the same logits."""
    torch.manual_seed(0)
    model = TinyTransformer(TinyConfig()).eval()
    prefixes = [(torch.randn(2, 3, 16), torch.randn(2, 3, 16)) for _ in range(2)]
    ids = torch.randint(0, 16, (4, 7))
    with torch.no_grad():
        fused = model(ids, prefix_kv=prefixes)
        model.attn_impl = "eager"
        eager = model(ids, prefix_kv=prefixes)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
