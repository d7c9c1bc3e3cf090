"""label_map: the reference's semantics, the Triton kernels against it, registration, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reprokernels as rk
from reprokernels.reference.label_map import INPUTS, REDUCES, transform
from tests.utils import as_layout, assert_close, grads_match_compiled, tolerances, traffic_counter

triton_backends = ["triton"] if rk._backend.triton_installed() else []
BACKENDS = ["reference", *triton_backends]


def _grad_like(t: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)).to(t.dtype)


def _run(backend, logits, mapping, **kw):
    x = logits.detach().clone().requires_grad_(True)
    w = mapping.detach().clone().requires_grad_(True) if mapping.is_floating_point() else mapping
    out = rk.label_map(x, w, backend=backend, **kw)
    out.backward(_grad_like(out))
    return out, x.grad, (w.grad if mapping.is_floating_point() else None)


def _compare(got, want, dtype=torch.float32, scale=4.0):
    for name, a, e in zip(("out", "dlogits", "dmapping")[:len(want)], got, want, strict=True):
        if e is None:
            assert a is None, name
            continue
        assert_close(a, e, dtype=dtype, scale=scale, name=name)


# ---------------------------------------------------------------- semantics


def test_one_to_one_is_column_selection():
    x = torch.randn(4, 10)
    out = rk.label_map(x, torch.tensor([7, 2, 2]), backend="reference")
    assert torch.equal(out, x[:, [7, 2, 2]])


def test_many_to_one_mean_skips_missing_entries():
    x = torch.arange(12.0).view(2, 6)
    mapping = torch.tensor([[0, 1, -1], [5, -1, -1], [-1, -1, -1], [3, 3, 4]])
    out = rk.label_map(x, mapping, backend="reference")
    assert_close(out[0], torch.tensor([0.5, 5.0, 0.0, (3 + 3 + 4) / 3]))
    out = rk.label_map(x, mapping, reduce="sum", backend="reference")
    assert out[1].tolist() == [6 + 7, 11.0, 0.0, 9 + 9 + 10]


def test_probs_and_log_probs_and_dense():
    x = torch.randn(3, 9, dtype=torch.float64)
    p = torch.softmax(x, -1)
    assert_close(rk.label_map(x, torch.tensor([[1, 4]]), input="probs"), (p[:, 1:2] + p[:, 4:5]) / 2)
    assert_close(rk.label_map(x, torch.tensor([6]), input="log_probs"), torch.log_softmax(x, -1)[:, 6:7])
    w = torch.rand(9, 4, dtype=torch.float64)
    assert_close(rk.label_map(x, w, input="probs"), p @ w)
    assert rk.label_map(x.float(), w.float(), input="probs").dtype == torch.float32
    assert rk.label_map(x.half(), torch.tensor([1]), input="probs").dtype == torch.float32
    assert rk.label_map(x.half(), torch.tensor([1])).dtype == torch.float16


def test_leading_dims_are_flattened_and_restored():
    x = torch.randn(2, 3, 11)
    out = rk.label_map(x, torch.tensor([[1, 2], [3, -1]]))
    assert out.shape == (2, 3, 2)
    assert_close(out, rk.label_map(x.reshape(6, 11), torch.tensor([[1, 2], [3, -1]])).reshape(2, 3, 2))


@pytest.mark.parametrize("input", INPUTS)
def test_reference_gradcheck_float64(input):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    for mapping in (torch.tensor([[0, 3, -1], [3, 3, 6]]), torch.tensor([2, 5])):
        assert torch.autograd.gradcheck(lambda x, m=mapping: rk.label_map(x, m, input=input), (x,))
    w = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rk.label_map(x, w, input=input), (x, w))


# ---------------------------------------------------------------- Triton against the reference


@st.composite
def configs(draw):
    B = draw(st.integers(0, 5))
    K = draw(st.sampled_from([1, 2, 7, 33, 257, 1000, 3001]))
    T = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["one", "many", "dense"]))
    m = draw(st.integers(1, 5))
    return dict(B=B, K=K, T=T, kind=kind, m=m, input=draw(st.sampled_from(INPUTS)),
                reduce=draw(st.sampled_from(REDUCES)), layout=draw(st.sampled_from(["contiguous", "transposed"])),
                scale=draw(st.sampled_from([1.0, 30.0])))


def _mapping(cfg, g):
    K, T = cfg["K"], cfg["T"]
    if cfg["kind"] == "one":
        return torch.randint(0, K, (T,), generator=g)
    if cfg["kind"] == "many":
        m = torch.randint(-1, K, (T, cfg["m"]), generator=g)
        return m
    return torch.rand(K, T, generator=g)


@pytest.mark.parametrize("backend", triton_backends)
@settings(max_examples=40)
@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_triton_matches_reference(backend, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    x = as_layout(torch.randn(cfg["B"], cfg["K"], generator=g) * cfg["scale"], cfg["layout"])
    mapping = _mapping(cfg, g)
    kw = dict(input=cfg["input"], reduce=cfg["reduce"])
    _compare(_run(backend, x, mapping, **kw), _run("reference", x, mapping, **kw))


@pytest.mark.parametrize("backend", triton_backends)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("input", INPUTS)
def test_half_precision_logits(backend, dtype, input):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 500, generator=g) * 4).to(dtype)
    for mapping in (torch.randint(-1, 500, (10, 3), generator=g), torch.rand(500, 10, generator=g)):
        want = _run("reference", x.float(), mapping.float() if mapping.is_floating_point() else mapping,
                    input=input)
        got = _run(backend, x, mapping, input=input)
        assert got[1].dtype == dtype
        _compare(got[:2], (want[0].to(got[0].dtype), want[1]), dtype=dtype, scale=4.0)
        if mapping.is_floating_point():
            _assert_dot_close(got[2], want[2], transform(x.double(), input), _grad_like(got[0]), dtype)


def _assert_dot_close(got, want, f, g, dtype, scale=4.0):
    """d mapping = f^T @ g with 16-bit operands (tensor cores): the error scales with sum_b |f| |g|, not with the
    (possibly cancelling) result."""
    rtol, atol = tolerances(dtype, scale)
    bound = atol + rtol * (f.abs().T @ g.double().abs())
    err = (got.double() - want.double()).abs()
    assert got.dtype == torch.float32 and bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("input", ["probs", "log_probs"])
def test_extreme_logits_do_not_overflow(backend, input):
    x = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-3e4, -3e4 + 1, -3e4 + 2, -float("inf")]])
    out, dx, _ = _run(backend, x, torch.tensor([[0, 2], [1, 3]]), input=input)
    assert torch.isfinite(dx).all()
    assert torch.isfinite(out[:, 0]).all()
    ref = torch.softmax(x.double(), -1) if input == "probs" else torch.log_softmax(x.double(), -1)
    want = (ref[:, [0, 1]] + ref[:, [2, 3]]) / 2
    assert_close(out, want.float(), equal_nan=True)


@pytest.mark.parametrize("backend", triton_backends)
def test_vocabulary_sized_rows(backend):
    """A 50,000-way vocabulary mapped to 4 classes of 3 label words, through log-softmax."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50_000, generator=g) * 5
    mapping = torch.randint(0, 50_000, (4, 3), generator=g)
    _compare(_run(backend, x, mapping, input="log_probs"), _run("reference", x, mapping, input="log_probs"))


@pytest.mark.parametrize("backend", triton_backends)
def test_dense_mapping_gradient_is_deterministic(backend):
    x, w = torch.randn(70, 40), torch.rand(40, 5)
    a = _run(backend, x, w, input="probs")[2]
    b = _run(backend, x, w, input="probs")[2]
    assert torch.equal(a, b)


def test_empty_batch():
    for backend in BACKENDS:
        for mapping in (torch.tensor([1, 2]), torch.rand(5, 2)):
            out, dx, dw = _run(backend, torch.randn(0, 5), mapping, input="probs")
            assert out.shape == (0, 2) and dx.shape == (0, 5)
            if dw is not None:
                assert torch.equal(dw, torch.zeros(5, 2))


# ---------------------------------------------------------------- the GPU-fit paths, forced at small sizes


@pytest.fixture
def split_everything(monkeypatch):
    """Thresholds that split every path at test sizes: row statistics over 16-column chunks, the dense forward's
    K_src and d mapping's batch over 32-long chunks, 2-target blocks in the index forward, 32-column blocks in
    the index backward."""
    from reprokernels.triton import label_map as tlm

    for name, value in dict(STATS_MAX_BLOCK=16, STATS_MIN_CHUNK=16, STATS_TARGET_PROGRAMS=10**6,
                            DENSE_MIN_CHUNK=16, DENSE_TARGET_PROGRAMS=10**6, INDEX_TARGET_PROGRAMS=10**6,
                            INDEX_BWD_BLOCK_K=32, INDEX_BWD_BLOCK_E=4).items():
        monkeypatch.setattr(tlm, name, value)
    return tlm


def _repeats_mapping(K: int, T: int, m: int, g: torch.Generator) -> torch.Tensor:
    """-1 entries, a source repeated inside a target and across targets, and one column read by many entries
    (more than a step of the backward's accumulation)."""
    mp = torch.randint(-1, K, (T, m), generator=g)
    mp[0, 1] = mp[0, 0] = mp[1, 0] = 5
    mp[2:, -1] = K - 1
    return mp


@pytest.mark.parametrize("backend", triton_backends)
@pytest.mark.parametrize("input", INPUTS)
@pytest.mark.parametrize("kind", ["one", "many", "dense"])
def test_split_paths_match_reference(backend, split_everything, input, kind):
    g = torch.Generator().manual_seed(3)
    B, K, T = 37, 203, 9
    x = as_layout(torch.randn(B, K, generator=g) * 3, "transposed")
    mapping = {"one": torch.randint(0, K, (T,), generator=g), "many": _repeats_mapping(K, T, 5, g),
               "dense": torch.rand(K, T, generator=g)}[kind]
    tlm = split_everything
    assert tlm.stats_splits(B, K, tlm._block_k(K))[0] > 1
    if kind == "dense":
        assert tlm.reduction_splits(1, K, 16)[0] > 1 and tlm.reduction_splits(1, B, 16)[0] > 1
    for reduce in REDUCES if kind == "many" else ("mean",):
        kw = dict(input=input, reduce=reduce)
        _compare(_run(backend, x, mapping, **kw), _run("reference", x, mapping, **kw))


@pytest.mark.parametrize("backend", triton_backends)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("input", INPUTS)
def test_split_paths_mixed_precision(backend, split_everything, dtype, input):
    """16-bit logits with a float32 dense map (BLM / BLM+), every path split; an fp32 reference, tolerances of
    the logits' dtype (the dense dots take 16-bit operands: the d mapping bound scales with sum |f| |g|)."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(21, 150, generator=g) * 3).to(dtype)
    for mapping in (_repeats_mapping(150, 7, 3, g), torch.rand(150, 7, generator=g)):
        want = _run("reference", x.float(), mapping, input=input)
        got = _run(backend, x, mapping, input=input)
        assert got[1].dtype == dtype
        _compare(got[:2], (want[0].to(got[0].dtype), want[1]), dtype=dtype, scale=4.0)
        if mapping.is_floating_point():
            assert got[2].dtype == torch.float32
            _assert_dot_close(got[2], want[2], transform(x.double(), input), _grad_like(got[0]), dtype)


@pytest.mark.parametrize("backend", triton_backends)
@pytest.mark.parametrize("split", [False, True])
def test_every_path_is_bitwise_deterministic(backend, split, request):
    if split:
        request.getfixturevalue("split_everything")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, 70, generator=g)
    for mapping in (_repeats_mapping(70, 6, 4, g), torch.rand(70, 6, generator=g)):
        for input in INPUTS:
            a = _run(backend, x, mapping, input=input)
            b = _run(backend, x, mapping, input=input)
            for u, v in zip(a, b, strict=True):
                assert (u is None and v is None) or torch.equal(u, v)


@pytest.mark.parametrize("backend", triton_backends)
def test_index_backward_many_entries_on_one_column(backend, split_everything):
    """50 entries read column 7 (several accumulation steps inside one column block), the others spread out."""
    x = torch.randn(3, 40)
    mapping = torch.full((10, 5), 7)
    mapping[::3, 1] = torch.arange(4) * 11
    for reduce in REDUCES:
        _compare(_run(backend, x, mapping, reduce=reduce, input="probs"),
                 _run("reference", x, mapping, reduce=reduce, input="probs"))


@pytest.mark.parametrize("backend", triton_backends)
def test_empty_and_all_missing_mappings(backend):
    x = torch.randn(3, 7)
    for mapping, T in ((torch.zeros(0, dtype=torch.long), 0), (torch.full((2, 3), -1), 2)):
        for input in INPUTS:
            out, dx, _ = _run(backend, x, mapping, input=input)
            assert out.shape == (3, T) and torch.equal(out, torch.zeros(3, T))
            assert torch.equal(dx, torch.zeros(3, 7))


@pytest.mark.parametrize("backend", triton_backends)
def test_out_of_range_indices_are_never_read(backend):
    """The kernels mask sources outside [0, K) (on CUDA the range check is a device-side assert that fails the
    stream, so the launchers must be safe on bad values): targets with valid sources are still exact."""
    from reprokernels.triton import label_map as tlm

    x = torch.randn(4, 50)
    good = torch.tensor([[3, 9], [49, -1]])
    bad = torch.cat([good, torch.tensor([[10**9, -7], [50, 2**40]])])
    for input in INPUTS:
        out, lse = tlm.label_map(x, bad, "mean", input)
        want, _ = tlm.label_map(x, good, "mean", input)
        assert torch.equal(out[:, :2], want)
        g = torch.zeros_like(out)
        g[:, :2] = 1.0
        dx, _ = tlm.label_map_backward(g, x, bad, out, lse, "mean", input, True, False)
        dx_good, _ = tlm.label_map_backward(g[:, :2].contiguous(), x, good, want, lse, "mean", input, True, False)
        assert torch.equal(dx, dx_good)


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = torch.randn(4, 33)
    for mapping in (torch.tensor([[1, 5, -1], [0, 0, 32]]), torch.rand(33, 3)):
        for input in INPUTS:
            torch.library.opcheck(torch.ops.reprokernels.label_map_fwd, (x, mapping, "mean", input, backend))
            out, lse = torch.ops.reprokernels.label_map_fwd(x, mapping, "mean", input, backend)
            needs = [True, mapping.is_floating_point()]
            torch.library.opcheck(torch.ops.reprokernels.label_map_bwd,
                                  (torch.randn_like(out), x, mapping, out, lse, "mean", input, needs, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    mapping = torch.tensor([[1, 5, -1], [0, 0, 32]])
    x = torch.randn(4, 33, requires_grad=True)

    def loss_fn(x):
        return torch.nn.functional.cross_entropy(rk.label_map(x, mapping, input="log_probs", backend=backend),
                                                 torch.tensor([0, 1, 1, 0]))

    grads_match_compiled(loss_fn, x)


def test_torch_export():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mapping", torch.tensor([3, 1, 4]))

        def forward(self, x):
            return rk.label_map(x, self.mapping, input="probs", backend="reference")

    m, x = M(), torch.randn(2, 10)
    ep = torch.export.export(m, (x,))
    assert "label_map_fwd" in str(ep.graph)
    assert_close(ep.module()(x), m(x))


def triton_blocks(B: int, T: int) -> int:
    from reprokernels.triton.label_map import _index_block_t

    return -(-T // _index_block_t(B, T))


def test_triton_traffic_reads_each_row_once():
    """probs through an index mapping: the logits are read once (the LSE pass) plus the mapped columns."""
    B, K, T, m = 4, 5000, 10, 2
    x, mapping = torch.randn(B, K), torch.randint(0, K, (T, m))
    with traffic_counter() as t:
        out = rk.label_map(x, mapping, input="probs", backend="triton")
    assert t.stored_unique == out.numel() * 4 + B * 8  # out and the saved row (max, log-sum), nothing else
    # the gather kernel reads the row stats back (B * 8 bytes) rather than recomputing them per block of targets
    assert t.loaded_unique <= B * K * 4 + mapping.numel() * 8 + T * m * 4 + B * 8
    assert t.loaded <= B * K * 4 + B * (mapping.numel() * 8 + T * m * 4 + T * m * 4) + B * 8 * triton_blocks(B, T)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("mapping", "kwargs", "error", "message"),
    [
        (torch.tensor([3, 10]), {}, ValueError,
         r"mapping: expected values in \[-1, 9\] \(source indices, or -1 for none\), got 10"),
        (torch.tensor([[3, -2]]), {}, ValueError, r"mapping: expected values in .* got -2"),
        (torch.tensor([1.0, 2.0]), {}, ValueError, r"mapping: a dense \(float\) mapping must be \(K_src=10, K_tgt\)"),
        (torch.rand(9, 3), {}, ValueError, r"mapping: a dense .* got shape \(9, 3\)"),
        (torch.tensor([True, False]), {}, TypeError, r"mapping: expected integer source indices .* got torch.bool"),
        (torch.zeros(2, 2, 2, dtype=torch.long), {}, ValueError, r"mapping: an index mapping must be \(K_tgt,\)"),
        (torch.tensor([1]), dict(reduce="max"), ValueError, "reduce: expected one of 'mean', 'sum'"),
        (torch.tensor([1]), dict(input="softmax"), ValueError, "input: expected one of 'logits', 'probs', 'log_probs'"),
        (torch.tensor([1]), dict(backend="cuda"), rk.BackendUnavailableError, "needs CUDA tensors"),
    ],
)
def test_bad_input_errors(mapping, kwargs, error, message):
    with pytest.raises(error, match=message):
        rk.label_map(torch.randn(2, 10), mapping, **kwargs)


def test_integer_logits_are_rejected():
    with pytest.raises(TypeError, match="logits: expected a floating dtype"):
        rk.label_map(torch.ones(2, 3, dtype=torch.long), torch.tensor([0]))
