"""LabelMapping: every method fits and maps as its paper does, the streaming fit API, state_dict, ILM's
per-epoch update, errors, and a tiny end-to-end run that recovers a planted label permutation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reprokernels as rk
from reprokernels.nn import LabelMapping
from reprokernels.nn.label_mapping import METHODS
from tests.utils import assert_close

K_SRC, K_TGT = 40, 6


def _batches(n: int = 3, B: int = 25, seed: int = 0, K: int = K_SRC, T: int = K_TGT):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, K, generator=g), torch.randint(0, T, (B,), generator=g)) for _ in range(n)]


def _cat(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_fits_and_maps(method):
    batches = _batches()
    x, y = _cat(batches)
    lm = LabelMapping(K_SRC, K_TGT, method, **({"m": 2} if method == "bar" else {}))
    assert lm.fit(batches) is lm
    out = lm(x)
    assert out.shape == (x.shape[0], K_TGT)
    counts = torch.bincount(x.argmax(1) * K_TGT + y, minlength=K_SRC * K_TGT).view(K_SRC, K_TGT).float()
    if method in ("flm", "ilm"):
        assert torch.equal(lm.mapping, rk.greedy_label_mapping(counts))
        assert torch.equal(out, x[:, lm.mapping])
    elif method == "bar":
        assert lm.input == "probs" and lm.mapping.shape == (K_TGT, 2)
        assert torch.equal(lm.mapping, rk.greedy_label_mapping(counts, m=2))
        assert_close(out, torch.softmax(x, -1)[:, lm.mapping].mean(-1))
    elif method == "blm":
        assert_close(lm.mapping, rk.bayesian_label_mapping(counts, 1.0))
        assert_close(out, x @ lm.mapping)
    elif method == "blm+":
        assert lm.topk == max(1, int(0.15 * K_TGT))
        D = rk.label_histogram(x, y, K_SRC, K_TGT, weight="prob", topk=lm.topk, backend="reference")
        assert_close(lm.mapping, rk.bayesian_label_mapping(D, 1.0), rtol=1e-5, atol=1e-6)
        assert_close(out, x @ lm.mapping, rtol=1e-5, atol=1e-5)
    elif method == "random":
        assert torch.equal(lm.mapping, LabelMapping(K_SRC, K_TGT, "random").mapping)  # fit changes nothing
        assert lm.mapping.unique().numel() == K_TGT
        assert torch.equal(out, x[:, lm.mapping])
    else:  # linear: a learnable layer, trained by gradient
        assert lm.statistics is None
        # the linear method's mapping is the layer's weight, (K_src, K_tgt): out = logits @ mapping + bias
        assert torch.equal(lm.mapping, lm.linear.weight.detach().t()) and not lm.mapping.requires_grad
        assert_close(out, F.linear(x, lm.linear.weight, lm.linear.bias))
        out.sum().backward()
        assert lm.linear.weight.grad is not None and lm.linear.weight.grad.shape == (K_TGT, K_SRC)


def test_streaming_accumulate_equals_fit_and_accepts_predictions():
    batches = _batches()
    a = LabelMapping(K_SRC, K_TGT, "ilm").fit(batches)
    b = LabelMapping(K_SRC, K_TGT, "ilm")
    b.reset_statistics()
    for x, y in batches:
        b.accumulate(x.argmax(-1), y)  # count methods take predictions as well
    b.update()
    assert torch.equal(a.statistics, b.statistics) and torch.equal(a.mapping, b.mapping)
    assert float(a.statistics.sum()) == 75


def test_fit_resets_the_statistics_update_keeps_them():
    lm = LabelMapping(K_SRC, K_TGT, "blm")
    lm.fit(_batches(seed=1))
    first = lm.statistics.clone()
    lm.fit(_batches(seed=1))
    assert torch.equal(lm.statistics, first)  # not doubled
    lm.update()
    assert torch.equal(lm.statistics, first)


def test_initial_mappings_before_any_update():
    x = torch.randn(5, K_SRC)
    for method in ("flm", "ilm", "blm", "blm+"):
        assert torch.equal(LabelMapping(K_SRC, K_TGT, method)(x), x[:, :K_TGT])  # greedy of an all-zero D
    bar = LabelMapping(K_SRC, K_TGT, "bar", m=3)
    assert torch.equal(bar.mapping, torch.arange(18).view(6, 3))
    assert LabelMapping(K_SRC, K_TGT, "bar").m == min(10, K_SRC // K_TGT)
    r1, r2 = LabelMapping(K_SRC, K_TGT, "random", seed=3), LabelMapping(K_SRC, K_TGT, "random", seed=4)
    assert torch.equal(r1.mapping, LabelMapping(K_SRC, K_TGT, "random", seed=3).mapping)
    assert not torch.equal(r1.mapping, r2.mapping)
    assert LabelMapping(K_SRC, K_TGT, "random", m=4).mapping.unique().numel() == 24


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip(method):
    lm = LabelMapping(K_SRC, K_TGT, method, seed=7).fit(_batches(seed=2))
    fresh = LabelMapping(K_SRC, K_TGT, method, seed=8)
    sd = lm.state_dict()
    assert "statistics" not in sd
    if method != "linear":
        assert "mapping" in sd and "num_updates" in sd
    fresh.load_state_dict(sd)
    x = torch.randn(4, K_SRC)
    assert torch.equal(fresh(x), lm(x))
    assert int(fresh.num_updates) == int(lm.num_updates)


def _planted(perm: torch.Tensor, n: int = 240, seed: int = 0, K: int = K_SRC, T: int = K_TGT, noise: float = 0.5):
    """A frozen linear 'model' whose source class perm[t] fires on inputs of target class t."""
    g = torch.Generator().manual_seed(seed)
    feat = 16
    protos = torch.randn(T, feat, generator=g)
    W = 0.1 * torch.randn(feat, K, generator=g)
    W[:, perm] = 2.0 * protos.T
    y = torch.randint(0, T, (n,), generator=g)
    x = protos[y] + noise * torch.randn(n, feat, generator=g)
    return x, y, W


def test_ilm_update_each_epoch_follows_the_statistics():
    perm_a, perm_b = torch.arange(K_TGT) * 2, torch.arange(K_TGT) * 3 + 1
    ilm, flm = LabelMapping(K_SRC, K_TGT, "ilm"), LabelMapping(K_SRC, K_TGT, "flm")
    seen = []
    for epoch, perm in enumerate((perm_a, perm_b)):  # the model "changes" between epochs (e.g. the prompt)
        x, y, W = _planted(perm, seed=epoch)
        batches = [(x[i:i + 60] @ W, y[i:i + 60]) for i in range(0, x.shape[0], 60)]
        for lm in (ilm, flm):
            if lm.should_update():
                lm.fit(batches)
        seen.append(ilm.mapping.clone())
    assert torch.equal(seen[0], perm_a) and torch.equal(seen[1], perm_b)
    assert torch.equal(flm.mapping, perm_a) and int(flm.num_updates) == 1  # FLM: once
    assert int(ilm.num_updates) == 2 and ilm.should_update() and not flm.should_update()
    assert not LabelMapping(K_SRC, K_TGT, "random").should_update()
    assert not LabelMapping(K_SRC, K_TGT, "linear").should_update()


def test_end_to_end_flm_recovers_a_planted_permutation():
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(K_SRC, generator=g)[:K_TGT]
    x, y, W = _planted(perm, n=600, seed=5)
    model = torch.nn.Linear(16, K_SRC, bias=False).requires_grad_(False)  # frozen
    model.weight.copy_(W.T)
    lm = LabelMapping(K_SRC, K_TGT, "flm")
    lm.fit((model(x[i:i + 128]), y[i:i + 128]) for i in range(0, 600, 128))
    assert torch.equal(lm.mapping, perm)
    acc = (lm(model(x)).argmax(-1) == y).float().mean()
    assert acc > 0.9, acc
    # BLM on the same statistics puts (almost) all of each target's weight on its planted source
    blm = LabelMapping(K_SRC, K_TGT, "blm").fit([(model(x), y)])
    assert torch.equal(blm.mapping.argmax(0), perm)
    assert (blm(model(x)).argmax(-1) == y).float().mean() > 0.9


def test_linear_method_trains():
    x, y, W = _planted(torch.arange(K_TGT), seed=9)
    logits = x @ W
    lm = LabelMapping(K_SRC, K_TGT, "linear")
    opt = torch.optim.SGD(lm.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(lm(logits), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_forward_keeps_leading_dims_and_half_precision():
    lm = LabelMapping(K_SRC, K_TGT, "blm").fit(_batches())
    x = torch.randn(2, 3, K_SRC)
    assert lm(x).shape == (2, 3, K_TGT)
    assert lm(x.half()).dtype == torch.float16
    assert LabelMapping(K_SRC, K_TGT, "bar", m=2)(x.half()).dtype == torch.float32  # probabilities


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((K_SRC, K_TGT, "xlm"), {}, ValueError, "method: expected one of 'flm', 'ilm'"),
        ((5, 6, "flm"), {}, ValueError, r"num_target: method='flm' maps m=1 .* K_tgt \* m <= num_source=5"),
        ((12, 6, "bar"), dict(m=3), ValueError, r"num_target: method='bar' maps m=3"),
        ((0, 6, "flm"), {}, ValueError, "num_source: expected an int >= 1"),
        ((K_SRC, K_TGT, "blm"), dict(m=2), ValueError, "m: only used by the index methods"),
        ((K_SRC, K_TGT, "flm"), dict(m=0), ValueError, "m: expected an int >= 1"),
        ((K_SRC, K_TGT, "flm"), dict(topk=3), ValueError, "topk: only used by method='blm\\+'"),
        ((K_SRC, K_TGT, "blm+"), dict(topk=0), ValueError, "topk: expected an int >= 1"),
        ((K_SRC, K_TGT, "blm"), dict(lam=-1.0), ValueError, "lam: expected a Laplace smoothing >= 0"),
        ((K_SRC, K_TGT, "flm"), dict(input="softmax"), ValueError, "input: expected one of"),
        ((K_SRC, K_TGT, "flm"), dict(reduce="max"), ValueError, "reduce: expected one of"),
        ((K_SRC, K_TGT, "flm"), dict(backend="fast"), ValueError, "backend: expected one of"),
    ],
)
def test_constructor_errors(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        LabelMapping(*args, **kwargs)


def test_runtime_errors():
    lm = LabelMapping(K_SRC, K_TGT, "ilm")
    with pytest.raises(ValueError, match=r"logits: expected a \(..., K_src=40\) tensor, got \(3, 41\)"):
        lm(torch.randn(3, 41))
    with pytest.raises(RuntimeError, match="update: no statistics yet"):
        lm.update()
    with pytest.raises(ValueError, match=r"targets: expected values in \[0, 5\], got 6"):
        lm.accumulate(torch.randn(2, K_SRC), torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="weight='prob' needs float logits"):
        LabelMapping(K_SRC, K_TGT, "blm+").accumulate(torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert "method='bar', m=2, reduce='mean', input='probs'" in repr(LabelMapping(K_SRC, K_TGT, "bar", m=2))
