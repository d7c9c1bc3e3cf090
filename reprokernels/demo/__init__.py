"""``reprokernels demo``: an end-to-end reprogramming run on real data (see :mod:`reprokernels.demo.digits`).

``reprokernels demo [--seed N] [--device D] [--backend B] [--epochs E] [--quick] [--out DIR]`` runs the digits
demo; ``--text`` adds the prompt/prefix-tuning demo on a tiny transformer (see :mod:`reprokernels.demo.text`).
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .digits import main as digits_main

    return digits_main(argv)
