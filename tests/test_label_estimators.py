"""greedy_label_mapping and bayesian_label_mapping: the issue's exact cases, a brute-force greedy as the oracle,
0/0 = 0, errors, and the size of a CLIP SUN397 statistic (32,157 x 397)."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reprokernels as rk
from tests.utils import assert_close


def _brute_greedy(D: torch.Tensor, m: int = 1) -> torch.Tensor:
    """The definition, literally: scan every remaining entry in row-major order for the strict maximum."""
    K, T = D.shape
    vals = D.double().tolist()
    picks: list[list[int]] = [[] for _ in range(T)]
    rows: set[int] = set()
    cols: set[int] = set()
    for _ in range(T * m):
        best = None
        for s in range(K):
            if s in rows:
                continue
            for t in range(T):
                if t not in cols and (best is None or vals[s][t] > vals[best[0]][best[1]]):
                    best = (s, t)
        s, t = best
        picks[t].append(s)
        rows.add(s)
        if len(picks[t]) == m:
            cols.add(t)
    out = torch.tensor(picks, dtype=torch.long)
    return out[:, 0] if m == 1 else out


# ---------------------------------------------------------------- greedy: exact cases


def test_greedy_issue_example():
    D = torch.tensor([[5.0, 7, 0], [4, 6, 0], [0, 0, 1], [0, 0, 3]])
    got = rk.greedy_label_mapping(D)
    assert got.dtype == torch.long and got.shape == (3,)
    assert got.tolist() == [1, 0, 3]


@pytest.mark.parametrize(("K", "T"), [(1, 1), (6, 4), (1000, 10)])
def test_greedy_all_zero_is_identity(K, T):
    assert torch.equal(rk.greedy_label_mapping(torch.zeros(K, T)), torch.arange(T))


def test_greedy_many_to_one_issue_example():
    D = torch.tensor([[5.0, 1], [4, 3], [0, 2], [3, 0], [0, 0]])
    got = rk.greedy_label_mapping(D, m=2)
    assert got.shape == (2, 2)
    assert set(got[0].tolist()) == {0, 1} and set(got[1].tolist()) == {2, 3}
    assert got.tolist() == [[0, 1], [2, 3]]  # in pick order


def test_greedy_ties_are_first_in_row_major_order():
    D = torch.tensor([[1.0, 3, 3], [3, 3, 0], [3, 0, 3]])
    assert rk.greedy_label_mapping(D).tolist() == [1, 0, 2]  # (0,1), then (1,0), then (2,2)
    assert rk.greedy_label_mapping(D.T.contiguous()).tolist() == [1, 0, 2]


def test_greedy_accepts_integer_and_half_statistics_and_keeps_device():
    D = torch.tensor([[5, 7, 0], [4, 6, 0], [0, 0, 1], [0, 0, 3]])
    for d in (D, D.to(torch.float16), D.to(torch.bfloat16), D.double(), D.float().T.contiguous().T):
        got = rk.greedy_label_mapping(d)
        assert got.tolist() == [1, 0, 3] and got.device == d.device


@settings(max_examples=60)
@given(data=st.data())
def test_greedy_matches_the_brute_force_definition(data):
    K = data.draw(st.integers(1, 12))
    T = data.draw(st.integers(1, K))
    m = data.draw(st.integers(1, K // T))
    hi = data.draw(st.sampled_from([1, 2, 3, 50]))  # few distinct values: many ties
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    D = torch.randint(0, hi, (K, T), generator=g).float()
    if data.draw(st.booleans()):
        D = D - 1.5  # negative statistics are fine for the greedy
    assert torch.equal(rk.greedy_label_mapping(D, m=m), _brute_greedy(D, m))


@pytest.mark.parametrize("m", [1, 2])
def test_greedy_matches_brute_force_when_rows_rank_targets_alike(m):
    """Rank-one and identical-row statistics (every row's best target is the same): the stale-head paths."""
    g = torch.Generator().manual_seed(3)
    for D in (torch.rand(40, 1, generator=g) * torch.rand(1, 9, generator=g),
              torch.rand(1, 9, generator=g).expand(40, 9).contiguous(),
              torch.randint(0, 3, (40, 1), generator=g).float() * torch.randint(0, 3, (1, 9), generator=g).float()):
        assert torch.equal(rk.greedy_label_mapping(D, m=m), _brute_greedy(D, m))


def test_greedy_is_a_valid_assignment_on_random_statistics():
    D = torch.rand(500, 40)
    for m in (1, 3, 12):
        got = rk.greedy_label_mapping(D, m=m).reshape(40, m)
        assert got.unique().numel() == 40 * m  # every source serves one target
        assert bool((got >= 0).all()) and bool((got < 500).all())


@pytest.mark.parametrize(("kind", "m"), [("random", 1), ("zeros", 1), ("sparse counts", 1), ("rank one", 1),
                                         ("identical rows", 1), ("random", 81), ("sparse counts", 81)])
def test_greedy_clip_sun397_size_completes(kind, m):
    """K_src = 32,157 x K_tgt = 397 (CLIP SUN397: 81 templates x 397 classes). Timed, not asserted."""
    K, T = 32_157, 397
    g = torch.Generator().manual_seed(0)
    if kind == "random":
        D = torch.rand(K, T, generator=g)
    elif kind == "zeros":
        D = torch.zeros(K, T)
    elif kind == "rank one":  # predictions independent of the labels: every row ranks the targets alike
        D = torch.rand(K, 1, generator=g) * torch.rand(1, T, generator=g)
    elif kind == "identical rows":
        D = torch.rand(1, T, generator=g).expand(K, T).contiguous()
    else:  # counts of 50,000 argmax predictions landing on 2,000 source classes: mostly zero, many ties
        preds, y = torch.randint(0, 2000, (50_000,), generator=g), torch.randint(0, T, (50_000,), generator=g)
        D = torch.bincount(preds * T + y, minlength=K * T).view(K, T).float()
    t0 = time.perf_counter()
    got = rk.greedy_label_mapping(D, m=m)
    print(f"greedy_label_mapping {K}x{T} {kind} m={m}: {time.perf_counter() - t0:.3f} s")
    got = got.reshape(T, m)
    assert got.unique().numel() == T * m
    if kind == "zeros":
        assert torch.equal(got.reshape(-1), torch.arange(T * m))


# ---------------------------------------------------------------- greedy: errors


@pytest.mark.parametrize(
    ("D", "m", "error", "message"),
    [
        (torch.zeros(3, 4), 1, ValueError, r"D: 4 target classes x m=1 .* only K_src=3 rows"),
        (torch.zeros(5, 2), 3, ValueError, r"D: 2 target classes x m=3 sources each need 6"),
        (torch.zeros(5, 2), 0, ValueError, "m: expected an int >= 1"),
        (torch.zeros(5, 2), True, ValueError, "m: expected an int >= 1"),
        (torch.zeros(5), 1, ValueError, r"D: expected a 2-D \(K_src, K_tgt\) statistic, got shape \(5,\)"),
        (torch.tensor([[1.0, float("nan")], [0, 0]]), 1, ValueError, "D: expected finite values"),
        (torch.tensor([[1.0, float("inf")], [0, 0]]), 1, ValueError, "D: expected finite values"),
        (torch.zeros(2, 2, dtype=torch.bool), 1, TypeError, "D: expected a real"),
        ([[1.0]], 1, TypeError, "D: expected a torch.Tensor"),
    ],
)
def test_greedy_errors(D, m, error, message):
    with pytest.raises(error, match=message):
        rk.greedy_label_mapping(D, m=m)


# ---------------------------------------------------------------- bayesian


def test_bayesian_formula():
    D = torch.tensor([[2.0, 0, 0], [1, 1, 0], [0, 3, 1]])
    lam = 0.5
    w = D / (D.sum(1, keepdim=True) + lam)
    w = w / w.sum(0, keepdim=True)
    got = rk.bayesian_label_mapping(D, lam)
    assert got.dtype == torch.float32 and got.shape == (3, 3)
    assert_close(got, w)
    assert_close(got.sum(0), torch.ones(3))


def test_bayesian_zero_over_zero_is_zero_never_nan():
    D = torch.tensor([[2.0, 0, 0], [0, 0, 0], [1, 0, 3]])  # an empty source row and an empty target column
    for lam in (0.0, 1.0):
        got = rk.bayesian_label_mapping(D, lam)
        assert not bool(got.isnan().any())
        assert torch.equal(got[:, 1], torch.zeros(3)) and torch.equal(got[1], torch.zeros(3))
        assert_close(got[:, [0, 2]].sum(0), torch.ones(2))
    assert torch.equal(rk.bayesian_label_mapping(torch.zeros(4, 3), lam=0.0), torch.zeros(4, 3))


def test_bayesian_dtypes_and_device():
    D = torch.randint(0, 5, (6, 3))
    assert rk.bayesian_label_mapping(D).dtype == torch.float32
    assert rk.bayesian_label_mapping(D.double()).dtype == torch.float64
    assert_close(rk.bayesian_label_mapping(D.half()), rk.bayesian_label_mapping(D.float()))


def test_bayesian_of_a_histogram_end_to_end():
    """BLM: counts -> omega; BLM+: top-k mass -> omega (the estimator takes label_histogram's output as is)."""
    x, y = torch.randn(40, 12), torch.randint(0, 3, (40,))
    for weight, k in (("count", None), ("prob", 2)):
        D = rk.label_histogram(x, y, 12, 3, weight=weight, topk=k)
        w = rk.bayesian_label_mapping(D)
        assert w.shape == (12, 3) and not bool(w.isnan().any())
        assert_close(w.sum(0), torch.ones(3))


@pytest.mark.parametrize(
    ("D", "lam", "error", "message"),
    [
        (torch.tensor([[1.0, -1.0]]), 1.0, ValueError, "D: expected a non-negative statistic"),
        (torch.tensor([[1.0, float("nan")]]), 1.0, ValueError, "D: expected a non-negative statistic"),
        (torch.ones(2, 2), -0.5, ValueError, "lam: expected a Laplace smoothing >= 0"),
        (torch.ones(2, 2, 2), 1.0, ValueError, "D: expected a 2-D"),
    ],
)
def test_bayesian_errors(D, lam, error, message):
    with pytest.raises(error, match=message):
        rk.bayesian_label_mapping(D, lam)
