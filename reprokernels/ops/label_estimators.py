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

from .._validation import _values_unreadable, check_tensor


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
    K_tgt * m rounds of device launches and syncs. Each target column keeps a short candidate list, its
    best rows in greedy order (value descending, then row ascending) from one partial selection, and a heap
    orders the columns by their current head (value, row, column): the row-major tie order. A head whose row
    was taken by another column is stale; it is advanced along its list (K_tgt rows long: enough, since only
    K_tgt rows are ever taken) only when it reaches the top, so the top, once valid, is the exact greedy pick.
    Cost: one pass over D for the candidate lists, then O(log K_tgt) per pick and per stale head: at most
    K_tgt^2 stale heads for m = 1 even when every row ranks the targets alike (a rank-one statistic: a model
    whose predictions ignore the labels), so K_src = 32,157 x K_tgt = 397 stays well under a second whatever
    D is. For m > 1 a heap of source rows keyed by their best active column is used instead (a stale row is
    re-evaluated when it reaches the top, tied stale rows a doubling batch at a time): tens of milliseconds on
    typical statistics at that size with m = 81, but seconds when thousands of rows rank the targets alike.
    """
    D = _check_statistic(D)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m: expected an int >= 1 (sources per target), got {m!r}")
    K_src, K_tgt = D.shape
    if K_tgt * m > K_src:
        raise ValueError(f"D: {K_tgt} target classes x m={m} sources each need {K_tgt * m} distinct source classes, "
                         f"but D has only K_src={K_src} rows")
    shape = (K_tgt,) if m == 1 else (K_tgt, m)
    if K_tgt == 0 or D.device.type == "meta":  # (meta: FSDP2-style construction, a shape without values)
        return torch.empty(shape, dtype=torch.long, device=D.device)
    # float32/float64 compare exactly as they are; integers and half types go to float64 (exact below 2**53)
    wdt = D.dtype if D.dtype in (torch.float32, torch.float64) else torch.float64
    W = D.detach().to("cpu", wdt).numpy()  # read only: no copy for a float32/float64 CPU tensor
    if not np.isfinite(W).all():
        raise ValueError("D: expected finite values (no NaN or inf)")
    # one pick per target: the column heap bounds the stale work by K_tgt^2 whatever D looks like; many picks
    # per target: the row heap, fast on typical statistics (see the docstring for the adversarial case)
    result = _greedy_columns(W, m) if m == 1 else _greedy_rows(W, m)
    return torch.tensor(result, dtype=torch.long).reshape(shape).to(D.device)


def _greedy_rows(W: np.ndarray, m: int) -> list[list[int]]:
    """The greedy picks by a heap of source rows keyed by their best active column (fast for many picks per
    target on typical statistics; re-evaluates every row that ranks the targets alike at each pick)."""
    K_src, K_tgt = W.shape
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
    return result


def _candidates(col: np.ndarray, thr: float, k: int) -> list[int]:
    """The first k of a column's rows in greedy order (value descending, then row ascending: rows tied at
    the k-th largest value ``thr`` are taken from the smallest up, so the row-major tie order is exact)."""
    n = col.shape[0]
    if k < n:
        above = np.flatnonzero(col > thr)
        at = np.flatnonzero(col == thr)[:k - above.size]  # ties at the threshold: the smallest rows first
        rows = np.concatenate([above[np.argsort(-col[above], kind="stable")], at])
    else:
        rows = np.argsort(-col, kind="stable")
    return rows.tolist()


def _greedy_columns(W: np.ndarray, m: int) -> list[list[int]]:
    """The greedy picks of ``greedy_label_mapping`` (see its docstring): result[t] = t's sources in pick order."""
    K_src, K_tgt = W.shape
    # All picks take K_tgt * m rows, so a column can lose at most K_tgt * m - 1 of its candidates to others
    # before its own last pick: lists of K_tgt * m rows never run out.
    k = min(K_src, K_tgt * m)
    Wt = np.ascontiguousarray(W.T)  # one copy so each column is contiguous
    # every column's k-th largest value in one call (torch's top-k is far faster than per-column partitions
    # on tie-heavy counts); which tied rows make the list is decided in _candidates, by row
    thr = torch.topk(torch.from_numpy(Wt), k, dim=1).values[:, -1].numpy()
    cands = [_candidates(Wt[t], float(thr[t]), k) for t in range(K_tgt)]
    ptr = [0] * K_tgt
    taken = np.zeros(K_src, dtype=bool)
    result: list[list[int]] = [[] for _ in range(K_tgt)]
    heap = [(-float(W[c[0], t]), c[0], t) for t, c in enumerate(cands)]
    heapq.heapify(heap)  # (-value, row, column): the smallest key is the greedy pick
    picks = 0
    while picks < K_tgt * m:
        _, r, t = heapq.heappop(heap)
        if not taken[r]:
            taken[r] = True
            result[t].append(r)
            picks += 1
            if len(result[t]) == m:
                continue  # column retired: it leaves the heap
        # advance column t past taken rows (its head was just used, or was stale)
        lst, i = cands[t], ptr[t]
        while taken[lst[i]]:
            i += 1
        ptr[t] = i
        heapq.heappush(heap, (-float(W[lst[i], t]), lst[i], t))
    return result


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
    if Dd.numel() and not _values_unreadable(Dd) and not bool((Dd >= 0).all()):
        raise ValueError("D: expected a non-negative statistic (counts or probability mass), got negative or NaN "
                         "entries")
    den = Dd.sum(dim=1, keepdim=True) + lam
    w = torch.where(den > 0, Dd / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(Dd))
    col = w.sum(dim=0, keepdim=True)
    w = torch.where(col > 0, w / torch.where(col > 0, col, torch.ones_like(col)), torch.zeros_like(w))
    return w.to(torch.float64 if D.dtype == torch.float64 else torch.float32)
