"""The one place benchmark shapes live. Each op's script reads its entry; `quick` shapes keep CPU runs short."""

from __future__ import annotations

SHAPES: dict[str, dict[str, list[dict]]] = {}
