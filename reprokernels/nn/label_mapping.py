"""Output-space reprogramming: :class:`LabelMapping`, every published way of turning the frozen model's K_src
source-class outputs into the task's K_tgt target classes, as one module.

Its forward is one call of :func:`reprokernels.label_map`; its estimators run on statistics that
:func:`reprokernels.label_histogram` accumulates batch by batch on the device, and the mapping is computed by
:func:`reprokernels.greedy_label_mapping` or :func:`reprokernels.bayesian_label_mapping`.

==========  ==================  ============  =======================  ==============  ===================  ======
method      mapping (buffer)    applied to    statistic (accumulate)   estimator       recomputed           paper
==========  ==================  ============  =======================  ==============  ===================  ======
``random``  (K_tgt,) / (K, m)   logits        none                     seeded perm.    never                RLM
``flm``     (K_tgt,) long       logits        argmax counts            greedy, m = 1   once (before train)  FLM
``ilm``     (K_tgt,) long       logits        argmax counts            greedy, m = 1   every epoch          ILM-VP
``bar``     (K_tgt, m) long     probs, mean   argmax counts            greedy, m       once                 BAR
``blm``     (K_src, K_tgt) f32  logits        argmax counts            bayesian, lam   every epoch          BLM
``blm+``    (K_src, K_tgt) f32  logits        top-k prob. mass         bayesian, lam   every epoch          BLM+
``linear``  nn.Linear weights   logits        none                     gradient        (trained)            FM
==========  ==================  ============  =======================  ==============  ===================  ======

Choices, following the papers and their code:

- FLM / ILM (Chen et al., "Understanding and Improving Visual Prompting: A Label-Mapping Perspective", CVPR
  2023): D = counts of (argmax source prediction, target label) over the training set with the current
  prompt; greedy one-to-one assignment (global maximum first); the mapped logits ``logits[:, mapping]`` go to
  the cross-entropy. FLM computes it once before training, ILM before every epoch.
- BAR (Tsai et al., "Transfer Learning without Knowing", ICML 2020): multi-label mapping, m source labels
  per target, the target's score is the *mean of the m source probabilities* (``input="probs"``,
  ``reduce="mean"``). BAR fixes the assignment before training; here ``"bar"`` picks it by frequency (greedy
  many-to-one on argmax counts, once), and ``method="random", m=m, input="probs"`` gives a random
  assignment. Default m: ``min(10, K_src // K_tgt)`` (a choice of this library). The output is a probability:
  train with ``F.nll_loss(out.clamp_min(1e-12).log(), y)``.
- BLM / BLM+ (Cai et al., "Bayesian-guided Label Mapping for Visual Reprogramming", NeurIPS 2024): ω =
  columns-normalised D / (rowsum(D) + lam), recomputed every epoch and applied to the raw logits
  (``logits @ ω``, as their ``label_mapping_calculation``). BLM's D counts argmax predictions; BLM+'s D sums
  the softmax probabilities of each sample's top-k source classes, ``topk = max(1, int(0.15 * K_tgt))`` by
  default. lam = 1 by default for both.
- random (RLM): a seeded random one-to-one mapping (``torch.randperm(K_src)[:K_tgt]``), or random
  many-to-one with m > 1; never re-estimated.
- linear: a learnable ``nn.Linear(K_src, K_tgt)`` on the logits (a fully connected output layer), through
  ``label_map`` with its weight as a dense mapping, plus the bias. ``.mapping`` is then that weight as a
  detached (K_src, K_tgt) view (``out = logits @ mapping + linear.bias``), so code reading the learned mapping
  works for every method; ``fit``/``accumulate``/``update`` do nothing.

Before the first :meth:`LabelMapping.update` the mapping is what the estimator gives on an all-zero statistic:
``[0, 1, ..., K_tgt - 1]`` (``arange(K_tgt * m).view(K_tgt, m)`` for BAR), and for BLM/BLM+ the one-hot matrix
of that assignment (so the untrained module maps source t to target t, never an all-zero output).

Streaming fit: ``reset_statistics()``, then ``accumulate(logits, targets)`` per batch (the (K_src, K_tgt)
float32 statistic lives on the logits' device, outside ``state_dict``), then ``update()``; ``fit(batches)``
does all three. A training loop asks :meth:`LabelMapping.should_update` at the start of each epoch (True for
ILM/BLM/BLM+ every epoch, for FLM/BAR until their first update, never for random/linear). For random and linear
``accumulate``/``update`` do nothing, so one loop serves every method.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._backend import BACKENDS
from ..ops.label_estimators import bayesian_label_mapping, greedy_label_mapping
from ..ops.label_histogram import label_histogram
from ..ops.label_map import label_map
from ..reference.label_map import INPUTS, REDUCES

__all__ = ["METHODS", "LabelMapping"]

METHODS = ("flm", "ilm", "random", "bar", "blm", "blm+", "linear")
# method -> (mapping kind, default input, statistic weight, recomputed every epoch)
_SPEC: dict[str, tuple[str, str, str | None, bool]] = {
    "flm": ("index", "logits", "count", False),
    "ilm": ("index", "logits", "count", True),
    "random": ("index", "logits", None, False),
    "bar": ("index", "probs", "count", False),
    "blm": ("dense", "logits", "count", True),
    "blm+": ("dense", "logits", "prob", True),
    "linear": ("linear", "logits", None, False),
}


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


class LabelMapping(nn.Module):
    """Map a frozen model's (..., K_src) outputs to (..., K_tgt) task outputs (see the module docstring).

    Args:
        num_source: K_src, the frozen model's classes (or vocabulary / prompt columns).
        num_target: K_tgt, the task's classes.
        method: "flm" | "ilm" | "random" | "bar" | "blm" | "blm+" | "linear".
        m: sources per target for "flm"/"ilm"/"bar"/"random" (default 1; "bar": ``min(10, K_src // K_tgt)``).
            K_tgt * m <= K_src.
        topk: "blm+" only: probabilities kept per sample (default ``max(1, int(0.15 * K_tgt))``).
        lam: "blm"/"blm+" only: Laplace smoothing of the Bayesian estimate (default 1).
        input: "logits" | "probs" | "log_probs": what the mapping is applied to (default per method: probs for
            "bar", logits otherwise).
        reduce: "mean" | "sum" over the m sources of a target (index mappings).
        seed: seed of the "random" permutation.
        backend: backend of every op call.

    Buffers: ``mapping`` (persistent: saved in ``state_dict``; long (K_tgt,) or (K_tgt, m), or float32
    (K_src, K_tgt)), ``num_updates`` (persistent, how many times ``update`` ran) and ``statistics``
    (non-persistent, the running (K_src, K_tgt) statistic, None until the first ``accumulate``).
    """

    mapping: torch.Tensor | None
    statistics: torch.Tensor | None
    num_updates: torch.Tensor

    def __init__(self, num_source: int, num_target: int, method: str = "flm", *, m: int | None = None,
                 topk: int | None = None, lam: float = 1.0, input: str | None = None, reduce: str = "mean",
                 seed: int = 0, backend: str = "auto") -> None:
        super().__init__()
        K_src, K_tgt = _positive_int(num_source, "num_source"), _positive_int(num_target, "num_target")
        if method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        kind, default_input, weight, per_epoch = _SPEC[method]
        if input is not None and input not in INPUTS:
            raise ValueError(f"input: expected one of {', '.join(map(repr, INPUTS))}, got {input!r}")
        if reduce not in REDUCES:
            raise ValueError(f"reduce: expected one of {', '.join(map(repr, REDUCES))}, got {reduce!r}")
        if kind == "index":
            m = (max(1, min(10, K_src // K_tgt)) if method == "bar" else 1) if m is None else _positive_int(m, "m")
            if K_tgt * m > K_src:
                raise ValueError(f"num_target: method={method!r} maps m={m} distinct source classes to each of the "
                                 f"{K_tgt} targets, which needs K_tgt * m <= num_source={K_src}")
        elif m not in (None, 1):
            raise ValueError(f"m: only used by the index methods (flm, ilm, random, bar), got m={m!r} with "
                             f"method={method!r}")
        else:
            m = 1
        if method == "blm+":
            topk = max(1, int(0.15 * K_tgt)) if topk is None else _positive_int(topk, "topk")
        elif topk is not None:
            raise ValueError(f"topk: only used by method='blm+', got topk={topk!r} with method={method!r}")
        lam = float(lam)
        if not lam >= 0.0:
            raise ValueError(f"lam: expected a Laplace smoothing >= 0, got {lam!r}")

        self.num_source, self.num_target, self.method = K_src, K_tgt, method
        self.m, self.topk, self.lam = m, topk, lam
        self.input = input if input is not None else default_input
        self.reduce = reduce
        self.seed = seed
        self.backend = backend
        self.kind, self.weight, self.refit_every_epoch = kind, weight, per_epoch

        self.linear: nn.Linear | None = None
        if kind == "linear":
            # no ``mapping`` buffer: ``self.mapping`` is the layer's (K_src, K_tgt) weight (see __getattr__), so
            # code that reads the learned mapping after fitting works for every method
            self.linear = nn.Linear(K_src, K_tgt)
        elif kind == "dense":
            omega = torch.zeros(K_src, K_tgt)
            omega[torch.arange(K_tgt), torch.arange(K_tgt)] = 1.0
            self.register_buffer("mapping", omega)
        elif method == "random":
            g = torch.Generator().manual_seed(seed)
            perm = torch.randperm(K_src, generator=g)[:K_tgt * m]
            self.register_buffer("mapping", perm if m == 1 else perm.view(K_tgt, m))
        else:
            idx = torch.arange(K_tgt * m)
            self.register_buffer("mapping", idx if m == 1 else idx.view(K_tgt, m))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("statistics", None, persistent=False)

    # ------------------------------------------------------------------ mapping

    def __getattr__(self, name: str) -> Any:
        if name == "mapping" and "linear" in self.__dict__.get("_modules", {}):
            linear = self._modules["linear"]
            if linear is not None:
                # the linear method's mapping: out = logits @ mapping + linear.bias (a detached view of the
                # layer's weight, always current; train the layer itself)
                return linear.weight.detach().t()
        return super().__getattr__(name)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K_src) -> (..., K_tgt); float32 for input probs/log_probs, else the logits' dtype."""
        if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] != self.num_source:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"logits: expected a (..., K_src={self.num_source}) tensor, got {shape}")
        if self.linear is not None:
            out = label_map(logits, self.linear.weight.t(), input=self.input, backend=self.backend)
            return out + self.linear.bias.to(out.dtype)
        return label_map(logits, self.mapping, reduce=self.reduce, input=self.input, backend=self.backend)

    # ------------------------------------------------------------------ streaming fit

    @property
    def needs_statistics(self) -> bool:
        return self.weight is not None

    def should_update(self) -> bool:
        """Whether a training loop should re-estimate the mapping before this epoch: every epoch for ILM, BLM
        and BLM+; until the first update for FLM and BAR; never for random and linear."""
        if not self.needs_statistics:
            return False
        return self.refit_every_epoch or int(self.num_updates) == 0

    def reset_statistics(self) -> None:
        """Zero the running statistic (kept allocated, on its device)."""
        if self.statistics is not None:
            self.statistics.zero_()

    @torch.no_grad()
    def accumulate(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch to the running statistic: (..., K_src) logits (or, for the count methods, integer
        predictions) and their (...) target labels. Nothing to do for random and linear."""
        if not self.needs_statistics:
            return
        dev = logits.device
        if self.statistics is None or self.statistics.device != dev:
            self.statistics = torch.zeros(self.num_source, self.num_target, dtype=torch.float32, device=dev)
        label_histogram(logits, targets, self.num_source, self.num_target,
                        topk=self.topk if self.weight == "prob" else None, weight=self.weight,
                        out=self.statistics, backend=self.backend)

    @torch.no_grad()
    def update(self) -> None:
        """Recompute the mapping from the accumulated statistic (the statistic is kept; ``fit`` resets it
        first). Nothing to do for random and linear."""
        if not self.needs_statistics:
            return
        if self.statistics is None:
            raise RuntimeError(f"update: no statistics yet; call accumulate(logits, targets) (or fit) before "
                               f"updating method={self.method!r}")
        if self.kind == "dense":
            new = bayesian_label_mapping(self.statistics, self.lam)
        else:
            new = greedy_label_mapping(self.statistics, self.m)
        self.mapping.copy_(new.to(self.mapping.device, self.mapping.dtype))
        self.num_updates += 1

    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> LabelMapping:
        """``reset_statistics()``, ``accumulate`` every (logits, targets) batch, ``update()``; returns self."""
        self.reset_statistics()
        for logits, targets in batches:
            self.accumulate(logits, targets)
        self.update()
        return self

    def extra_repr(self) -> str:
        parts = [f"num_source={self.num_source}", f"num_target={self.num_target}", f"method={self.method!r}"]
        if self.kind == "index":
            parts += [f"m={self.m}", f"reduce={self.reduce!r}"]
        if self.topk is not None:
            parts.append(f"topk={self.topk}")
        if self.kind == "dense":
            parts.append(f"lam={self.lam}")
        parts.append(f"input={self.input!r}")
        return ", ".join(parts)
