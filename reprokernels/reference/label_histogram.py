"""Reference of ``label_histogram``: the joint (source prediction, target label) statistic of FLM/ILM/BAR/BLM/BLM+.

The statistic D is (K_src, K_tgt) float32; sample b with target y_b adds to column y_b:

- ``weight="count"``: 1 at row ``argmax_s logits[b, s]`` (or at row ``preds[b]`` when integer predictions are
  given). argmax follows ``torch.argmax``: the first maximal index, and a NaN counts as the maximum (the first
  NaN wins).
- ``weight="prob"``: ``softmax(logits[b])[s]`` at every row s among the top-k logits of the row (all rows when
  ``topk`` is 0/None or >= K_src). Top-k is by logit value (the same order as by probability); ties at the k-th
  value keep the lowest source indices first, i.e. the first k entries of a *stable* descending sort. This
  makes the kept set well defined where ``torch.topk`` leaves the choice among ties to the implementation.

Counts are exact integers in float32 up to 2**24 = 16,777,216 per cell (beyond that float32 cannot add 1).
Probability mass is summed in float64 here and stored as float32. This file is the specification every kernel
is tested against.
"""

from __future__ import annotations

import torch

WEIGHTS = ("count", "prob")


def effective_topk(topk: int | None, num_source: int) -> int:
    """0 (keep every class) for None or a k >= K_src, else k."""
    return 0 if topk is None or topk <= 0 or topk >= num_source else int(topk)


def topk_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K_src) bool: the top-k entries of each row, ties at the k-th value broken by lowest index.

    The same set as the first k of ``torch.sort(logits, descending=True, stable=True)``, in O(K_src): every
    entry above the k-th largest value (which is unique, whatever ``torch.topk`` picks among ties), then the
    entries equal to it in source order until there are k.
    """
    kth = torch.topk(logits, k, dim=-1).values[:, k - 1:]
    above = logits > kth
    tie = logits == kth
    quota = k - above.sum(dim=-1, keepdim=True)
    return above | (tie & (tie.cumsum(dim=-1) <= quota))


def label_histogram(logits_or_preds: torch.Tensor, targets: torch.Tensor, num_source: int, num_target: int,
                    topk: int | None, weight: str) -> torch.Tensor:
    """(K_src, K_tgt) float32 joint statistic D[s, t] of one batch.

    logits_or_preds: (B, K_src) float logits, or (B,) integer predictions (``weight="count"`` only).
    targets: (B,) integer target labels in [0, K_tgt).
    """
    dev = targets.device
    y = targets.reshape(-1).long()
    if weight == "count":
        if logits_or_preds.is_floating_point():
            preds = logits_or_preds.reshape(-1, num_source).argmax(dim=-1)
        else:
            preds = logits_or_preds.reshape(-1)
        D = torch.zeros(num_source * num_target, dtype=torch.float32, device=dev)
        D.index_add_(0, preds.long() * num_target + y, torch.ones(y.shape[0], dtype=torch.float32, device=dev))
        return D.view(num_source, num_target)
    x = logits_or_preds.reshape(-1, num_source)
    p = torch.softmax(x.double(), dim=-1)
    k = effective_topk(topk, num_source)
    if k:
        p = torch.where(topk_mask(x, k), p, torch.zeros_like(p))
    D64 = torch.zeros(num_source, num_target, dtype=torch.float64, device=dev)
    D64.index_add_(1, y, p.T)
    return D64.to(torch.float32)


def label_histogram_accumulate(out: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, topk: int,
                               weight: str) -> None:
    """The op's backend interface: ``out += label_histogram(x, targets, ...)`` in place (out is the only write)."""
    if targets.numel() == 0:
        return
    out.add_(label_histogram(x, targets, out.shape[0], out.shape[1], topk, weight))
