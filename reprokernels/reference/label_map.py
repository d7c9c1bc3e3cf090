"""Reference of the output interface: label mapping and the statistics its estimators use.

``label_map``: out[b, t] = reduce_j f(logits)[b, mapping[t, j]] for an index mapping (-1 entries skipped;
"mean" divides by the number of real entries, a target with none gives 0), or f(logits) @ W for a dense
(K_src, K_tgt) mapping, where f is the identity, softmax or log-softmax over the K_src source classes.
This file is the specification every kernel is tested against.
"""

from __future__ import annotations

import torch

INPUTS = ("logits", "probs", "log_probs")
REDUCES = ("mean", "sum")


def transform(logits: torch.Tensor, input: str) -> torch.Tensor:
    if input == "probs":
        return torch.softmax(logits, dim=-1)
    if input == "log_probs":
        return torch.log_softmax(logits, dim=-1)
    return logits


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits, else float32: the logits set it and a dense mapping of any float dtype is
    rounded into it (the kernels compute in float32 whatever the mapping's dtype)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def out_dtype(logits: torch.Tensor, input: str) -> torch.dtype:
    """float32 for probabilities and log-probabilities (float64 stays float64), else the logits' dtype."""
    if input == "logits" or logits.dtype == torch.float64:
        return logits.dtype
    return torch.float32


def index_weights(mapping: torch.Tensor, reduce: str, dtype: torch.dtype) -> torch.Tensor:
    """(K_tgt, m) weight of each entry: 0 for -1 entries, 1 for sum, 1/count for mean (0 if count is 0)."""
    valid = (mapping >= 0).to(dtype)
    if reduce == "sum":
        return valid
    count = valid.sum(dim=1, keepdim=True)
    return torch.where(count > 0, valid / count.clamp(min=1), torch.zeros_like(valid))


def label_map(logits: torch.Tensor, mapping: torch.Tensor, reduce: str, input: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, K_src); mapping (K_tgt, m) long or (K_src, K_tgt) float -> (out (B, K_tgt), lse).

    lse is the (B, 2) float32 (max, log sum exp(x - max)) of each row for probs/log_probs (kept for the
    backward; its sum is the log-sum-exp), else empty.
    Differentiable in logits and a dense mapping.
    """
    out = label_map_values(logits, mapping, reduce, input)
    if input == "logits":
        return out, logits.new_empty((0,), dtype=torch.float32)
    x = logits.float()
    mx = x.max(dim=-1).values if x.shape[0] else x.new_empty((0,))
    return out, torch.stack([mx, torch.logsumexp(x - mx.unsqueeze(-1), dim=-1)], dim=-1)


def label_map_values(logits: torch.Tensor, mapping: torch.Tensor, reduce: str, input: str) -> torch.Tensor:
    """The output of ``label_map`` alone (plain differentiable PyTorch)."""
    cdt = _compute_dtype(logits)
    f = transform(logits.to(cdt), input)
    if mapping.is_floating_point():
        out = f @ mapping.to(cdt)
    else:
        w = index_weights(mapping, reduce, cdt)
        gathered = f[:, mapping.long().clamp(min=0)]  # (B, K_tgt, m); -1 entries get weight 0
        out = torch.where(w > 0, gathered * w, 0).sum(dim=-1)  # (a -inf log-prob times 0 is not NaN)
    return out.to(out_dtype(logits, input))


def label_map_backward(grad: torch.Tensor, logits: torch.Tensor, mapping: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, reduce: str, input: str, need_logits: bool, need_mapping: bool
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d logits, d mapping) of ``label_map``, each None when not needed (d mapping only for dense mappings).

    Written out so it runs inside the registered op. With c = d out / d f (c = grad @ W^T, or grad scattered
    through the index weights): logits: c; probs: p * (c - sum_k p_k c_k); log_probs: c - p * sum_k c_k.
    """
    cdt = _compute_dtype(logits)
    x, g = logits.to(cdt), grad.to(cdt)
    dense = mapping.is_floating_point()
    dx = dw = None
    if need_logits:
        if dense:
            c = g @ mapping.to(cdt).T
        else:
            w = index_weights(mapping, reduce, cdt)
            c = torch.zeros_like(x)
            contrib = (g.unsqueeze(-1) * w).reshape(x.shape[0], w.numel())  # (B, K_tgt * m)
            c.index_add_(1, mapping.long().clamp(min=0).reshape(-1), contrib)
        if input == "probs":
            p = torch.softmax(x, dim=-1)
            c = p * (c - (p * c).sum(dim=-1, keepdim=True))
        elif input == "log_probs":
            p = torch.softmax(x, dim=-1)
            c = c - p * c.sum(dim=-1, keepdim=True)
        dx = c.to(logits.dtype)
    if need_mapping and dense:
        dw = (transform(x, input).T @ g).to(mapping.dtype)
    return dx, dw
