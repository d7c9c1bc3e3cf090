"""Reference of ``label_histogram``: the joint (source prediction, target label) statistic of FLM/ILM/BLM/BLM+."""

from __future__ import annotations

import torch


def label_histogram(logits_or_preds: torch.Tensor, targets: torch.Tensor, num_source: int, num_target: int,
                    topk: int | None, weight: str) -> torch.Tensor:
    """(K_src, K_tgt) float32 joint statistic D[s, t] over the batch.

    ``weight="count"``: D[argmax_b, y_b] += 1 (predictions given as a (B,) LongTensor are used as they are);
    ``weight="prob"``: D[s, y_b] += softmax(logits_b)[s] for s among the top-k (all classes when topk is None).
    """
    D = torch.zeros(num_source, num_target, dtype=torch.float32, device=targets.device)
    if weight == "count":
        preds = logits_or_preds if not logits_or_preds.is_floating_point() else logits_or_preds.argmax(dim=-1)
        D.view(-1).index_add_(0, preds.long() * num_target + targets.long(),
                              torch.ones(preds.shape[0], dtype=torch.float32, device=targets.device))
        return D
    p = torch.softmax(logits_or_preds.double(), dim=-1)
    if topk is not None and topk < num_source:
        vals, idx = p.topk(topk, dim=-1)
        p = torch.zeros_like(p).scatter_(1, idx, vals)
    D64 = torch.zeros(num_source, num_target, dtype=torch.float64, device=targets.device)
    D64.index_add_(1, targets.long(), p.T)
    return D64.to(torch.float32)
