"""Label-mapping estimators: turn a (K_src, K_tgt) statistic D (from :func:`reprokernels.label_histogram`) into a
mapping :func:`reprokernels.label_map` applies.

- :func:`greedy_label_mapping`: the one-to-one (FLM/ILM) or many-to-one (BAR-style, m sources per target)
  greedy assignment of ILM-VP: take the global maximum, assign, retire.
- :func:`bayesian_label_mapping`: BLM/BLM+'s probabilistic matrix ω.

Plain PyTorch on D's device (no kernels: these run once per epoch on a K_src x K_tgt matrix).
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from .._validation import check_tensor


def _check_statistic(D: object, name: str = "D") -> torch.Tensor:
    D = check_tensor(D, name)
    if D.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (K_src, K_tgt) statistic, got shape {tuple(D.shape)}")
    if D.is_complex() or D.dtype == torch.bool:
        raise TypeError(f"{name}: expected a real (float or integer) tensor, got {D.dtype}")
    return D


def greedy_label_mapping(D: torch.Tensor, m: int = 1) -> torch.Tensor:
    """Greedy assignment of source classes to target classes from a joint statistic.

    Repeatedly takes the global maximum D[s, t] among the remaining entries (ties: first in row-major order,
    i.e. the smallest s, then the smallest t), assigns source s to target t, retires row s (a source serves
    one target), and retires column t once it has m sources. Exactly the loop of ILM-VP's FLM/ILM for m = 1.

    Args:
        D: (K_src, K_tgt) real statistic, finite (e.g. counts or probability mass from ``label_histogram``).
        m: sources per target (1: one-to-one; > 1: many-to-one, BAR's multi-label mapping). K_tgt * m must
            not exceed K_src.

    Returns:
        LongTensor on D's device: (K_tgt,) for m = 1, else (K_tgt, m) with each target's sources in the order
        they were picked (descending statistic). An all-zero D gives [0, 1, ..., K_tgt - 1] (for m = 1).

    Algorithm: the K_tgt * m picks depend on each other, so they run on the host (D is read in place when it
    is a float32/float64 CPU tensor, else copied once; the result goes back to D's device) rather than as
    K_tgt * m rounds of device launches and syncs. One vectorised pass gives every row its best column; a heap
    orders the rows by (best value, row), the row-major tie order. Retiring a column leaves the rows that
    pointed at it with a stale key, an upper bound of their true one; a stale row is re-evaluated (its best
    among the active columns) only when it reaches the top, with the stale rows tied with it a doubling batch
    at a time, so the heap's top, once valid, is the exact greedy pick. Typical statistics (random, sparse
    counts, all zeros) cost one pass over D plus O(K_tgt * m * log K_src): K_src = 32,157 x K_tgt = 397 takes
    tens of milliseconds on a CPU, m = 81 as well. The adversarial case, many *identical* non-zero rows (every
    row ranks the targets in the same order with equal values), re-evaluates all of them at every pick:
    O(K_src * K_tgt) per pick, seconds at that size.
    """
    D = _check_statistic(D)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m: expected an int >= 1 (sources per target), got {m!r}")
    K_src, K_tgt = D.shape
    if K_tgt * m > K_src:
        raise ValueError(f"D: {K_tgt} target classes x m={m} sources each need {K_tgt * m} distinct source classes, "
                         f"but D has only K_src={K_src} rows")
    shape = (K_tgt,) if m == 1 else (K_tgt, m)
    if K_tgt == 0:
        return torch.empty(shape, dtype=torch.long, device=D.device)
    # float32/float64 compare exactly as they are; integers and half types go to float64 (exact below 2**53)
    wdt = D.dtype if D.dtype in (torch.float32, torch.float64) else torch.float64
    W = D.detach().to("cpu", wdt).numpy()  # read only: no copy for a float32/float64 CPU tensor
    if not np.isfinite(W).all():
        raise ValueError("D: expected finite values (no NaN or inf)")
    rows = np.arange(K_src)
    best_col = W.argmax(axis=1)  # first maximal column of every row
    heap = list(zip((-W[rows, best_col]).tolist(), rows.tolist(), best_col.tolist(), strict=True))
    heapq.heapify(heap)  # (-value, row, col): the smallest key is the largest value, then the smallest row
    retired = [False] * K_tgt
    retired_mask = np.zeros(K_tgt, dtype=bool)
    filled = [0] * K_tgt
    result = [[0] * m for _ in range(K_tgt)]
    for _ in range(K_tgt * m):
        batch = 8
        while retired[(top := heap[0])[2]]:
            # the top row's column was retired: re-evaluate it and the stale rows tied with it
            key, stale, valid = top[0], [], []
            while heap and heap[0][0] == key and len(stale) < batch:
                e = heapq.heappop(heap)
                (stale if retired[e[2]] else valid).append(e)
            idx = np.fromiter((e[1] for e in stale), dtype=np.int64, count=len(stale))
            sub = W[idx]
            sub[:, retired_mask] = -np.inf
            cols = sub.argmax(axis=1)
            for e in valid:
                heapq.heappush(heap, e)
            for r, c, v in zip(idx.tolist(), cols.tolist(), (-sub[np.arange(len(idx)), cols]).tolist(), strict=True):
                heapq.heappush(heap, (v, r, c))
            batch *= 2
        _, r, c = heapq.heappop(heap)  # the source row leaves the heap: retired
        result[c][filled[c]] = r
        filled[c] += 1
        if filled[c] == m:
            retired[c] = retired_mask[c] = True
    return torch.tensor(result, dtype=torch.long).reshape(shape).to(D.device)


def bayesian_label_mapping(D: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """BLM's probabilistic mapping: ω̃ = D / (rowsum(D) + lam), then each column normalised to sum 1.

    ω̃[s, t] estimates P(y_T = t | y_S = s) with Laplace smoothing lam (BLM: counts of argmax predictions;
    BLM+: top-k probability mass); normalising the columns turns it into weights over source classes for
    each target, applied to the logits as ``logits @ ω`` (:func:`reprokernels.label_map` with a dense mapping).

    Args:
        D: (K_src, K_tgt) non-negative statistic (float or integer).
        lam: Laplace smoothing >= 0.

    Returns:
        (K_src, K_tgt) float32 (float64 for a float64 D) on D's device. 0/0 is 0: a source row with no mass
        (and lam = 0) gives a zero row, a target column with no mass gives a zero column, never NaN.
        Computed in float64.
    """
    D = _check_statistic(D)
    lam = float(lam)
    if not lam >= 0.0:
        raise ValueError(f"lam: expected a Laplace smoothing >= 0, got {lam!r}")
    Dd = D.detach().to(torch.float64)
    if Dd.numel() and not torch.compiler.is_compiling() and not bool((Dd >= 0).all()):
        raise ValueError("D: expected a non-negative statistic (counts or probability mass), got negative or NaN "
                         "entries")
    den = Dd.sum(dim=1, keepdim=True) + lam
    w = torch.where(den > 0, Dd / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(Dd))
    col = w.sum(dim=0, keepdim=True)
    w = torch.where(col > 0, w / torch.where(col > 0, col, torch.ones_like(col)), torch.zeros_like(w))
    return w.to(torch.float64 if D.dtype == torch.float64 else torch.float32)
