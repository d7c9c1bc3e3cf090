"""The CUDA backend of label_map against the reference.

Without a GPU the kernels' own code runs through the extension's host emulation
(``reprokernels.cuda.label_map.*(..., emulate=True)`` on CPU tensors: every "thread" of a block phase by phase, the
block reductions in the device's tree order): one-to-one, many-to-one (with -1 entries and repeats) and dense
mappings x logits / probs / log_probs x mean / sum, forward and both gradients, K_src from 1 to a few thousand and a
50,000-way vocabulary, float16 / bfloat16 logits, int32 / int64 indices, extreme logits, empty batches, every memory
layout (the 16-byte, the misaligned-head and the strided paths), block shapes from one warp to 1024 threads,
several column chunks in the backward, and determinism. Every buffer a kernel writes is poisoned with NaN first,
so an element nobody writes fails the test. The ``gpu`` tests run the device kernels through the public
``reprokernels.label_map(..., backend="cuda")``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reprokernels as rk
from reprokernels import _cuda
from reprokernels.reference import label_map as R
from reprokernels.reference.label_map import INPUTS, REDUCES

from .utils import as_layout, assert_close, empty_poisoned, tolerances

pytestmark = pytest.mark.skipif(not _cuda.extension_built(), reason="reprokernels._C is not built")

if _cuda.extension_built():
    from reprokernels.cuda import label_map as cu
else:  # the module imports fine; its functions need the extension
    cu = None

HALF = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    def poisoned(shape, dtype, device):
        return empty_poisoned(tuple(shape), dtype, device)

    monkeypatch.setattr(cu, "empty_output", poisoned)


# ---- helpers ------------------------------------------------------------------------------------------------------

def make_mapping(kind: str, K: int, T: int, m: int = 3, *, g: torch.Generator, index_dtype=torch.int64,
                 w_dtype=torch.float32) -> torch.Tensor:
    if kind == "one":
        return torch.randint(0, K, (T,), generator=g).to(index_dtype)
    if kind == "many":  # -1 entries, and repeats both inside a target and across targets
        mp = torch.randint(-1, K, (T, m), generator=g)
        if T >= 2 and m >= 2:
            mp[0, 1] = mp[0, 0]
            mp[1, 0] = mp[0, 0]
        return mp.to(index_dtype)
    return torch.rand(K, T, generator=g).to(w_dtype)


def reference(x, mapping, reduce, input, grad, need_mapping=True):
    """The reference in float64 (the values of x and a dense mapping upcast)."""
    xd = x.double()
    md = mapping.double() if mapping.is_floating_point() else mapping
    if md.dim() == 1:
        md = md.unsqueeze(1)
    out, lse = R.label_map(xd, md, reduce, input)
    dx, dw = R.label_map_backward(grad.double(), xd, md, out, lse, reduce, input, True, need_mapping)
    return out, lse, dx, dw


def close(actual, expected, dtype, name, scale=4.0):
    """Dtype-scaled tolerance, absolute part relative to the expected tensor's magnitude (sums of many terms)."""
    mag = max(1.0, float(expected.abs().nan_to_num(posinf=0, neginf=0).max())) if expected.numel() else 1.0
    rtol, atol = tolerances(dtype, scale)
    assert_close(actual, expected.to(torch.float64), rtol=rtol, atol=atol * mag, name=name)


def check(x, mapping, reduce="mean", input="logits", *, grad=None, threads=0, chunk=None, tol_dtype=None,
          scale=4.0):
    """Emulated forward and backward against the float64 reference; returns (out, lse, dx, dw)."""
    dense = mapping.is_floating_point()
    out, lse = cu.label_map(x, mapping, reduce, input, emulate=True, threads=threads)
    assert out.dtype == R.out_dtype(x, input) and out.is_contiguous()
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    dx, dw = cu.label_map_backward(grad, x, mapping, out, lse, reduce, input, True, dense, emulate=True,
                                   threads=threads, chunk=chunk)
    wo, wl, wx, ww = reference(x, mapping, reduce, input, grad, dense)
    td = tol_dtype or (torch.float32 if x.dtype == torch.float32 and (not dense or mapping.dtype == torch.float32)
                       else (torch.bfloat16 if torch.bfloat16 in (x.dtype, mapping.dtype) else torch.float16))
    close(out, wo, td, "out", scale)
    if input == "logits":
        assert lse.numel() == 0
    else:
        assert lse.shape == (x.shape[0], 2) and lse.dtype == torch.float32
        close(lse, wl, torch.float32, "lse", scale)
    assert dx.dtype == x.dtype and dx.shape == x.shape and dx.is_contiguous()
    close(dx, wx, td, "dlogits", scale)
    if dense:
        assert dw.dtype == mapping.dtype and dw.shape == mapping.shape
        close(dw, ww, td, "dmapping", scale)
    else:
        assert dw is None
    return out, lse, dx, dw


# ---- every form against the reference --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["one", "many", "dense"])
@pytest.mark.parametrize("input", INPUTS)
@pytest.mark.parametrize("reduce", REDUCES)
def test_matches_reference(kind, input, reduce):
    g = torch.Generator().manual_seed(0)
    for K in (1, 2, 7, 33, 257, 1000, 3001):
        x = torch.randn(5, K, generator=g) * 3
        check(x, make_mapping(kind, K, 9, 4, g=g), reduce, input)


@settings(max_examples=40)
@given(B=st.integers(0, 5), K=st.sampled_from([1, 3, 8, 33, 257, 1000, 3001]), T=st.integers(1, 12),
       kind=st.sampled_from(["one", "many", "dense"]), m=st.integers(1, 5), input=st.sampled_from(INPUTS),
       reduce=st.sampled_from(REDUCES), layout=st.sampled_from(["contiguous", "transposed", "strided"]),
       scale=st.sampled_from([1.0, 30.0]), index_dtype=st.sampled_from([torch.int64, torch.int32]),
       seed=st.integers(0, 2**16))
def test_random_configs(B, K, T, kind, m, input, reduce, layout, scale, index_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = as_layout(torch.randn(B, K, generator=g) * scale, layout)
    check(x, make_mapping(kind, K, T, m, g=g, index_dtype=index_dtype), reduce, input)


def test_one_to_one_and_many_to_one_semantics():
    x = torch.arange(12.0).view(2, 6)
    mapping = torch.tensor([[0, 1, -1], [5, -1, -1], [-1, -1, -1], [3, 3, 4]])
    out, _ = cu.label_map(x, mapping, "mean", "logits", emulate=True)
    assert_close(out[0], torch.tensor([0.5, 5.0, 0.0, 10 / 3]))
    out, _ = cu.label_map(x, mapping, "sum", "logits", emulate=True)
    assert out[1].tolist() == [6 + 7, 11.0, 0.0, 9 + 9 + 10]
    out, _ = cu.label_map(x, torch.tensor([4, 0, 4]), "mean", "logits", emulate=True)
    assert torch.equal(out, x[:, [4, 0, 4]])  # one-to-one: a column selection, bit for bit
    # the gradient of a repeated source sums over its entries (and over the targets mapping to it)
    dx, _ = cu.label_map_backward(torch.ones(2, 4), x, mapping, out, torch.empty(0), "sum", "logits", True, False,
                                  emulate=True)
    assert dx[0].tolist() == [1.0, 1.0, 0.0, 2.0, 1.0, 1.0]


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_index_dtypes_and_mapping_layouts(index_dtype, layout):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 300, generator=g)
    mapping = as_layout(torch.randint(-1, 300, (7, 5), generator=g).to(index_dtype), layout)
    for input in INPUTS:
        check(x, mapping, "mean", input)


# ---- dtypes, vocabulary rows, extremes ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("input", INPUTS)
def test_half_precision_logits(dtype, input):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 500, generator=g) * 4).to(dtype)
    for kind in ("one", "many", "dense"):
        for reduce in REDUCES:
            check(x, make_mapping(kind, 500, 10, 3, g=g), reduce, input)


@pytest.mark.parametrize("w_dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("x_dtype", [torch.float32, *HALF])
def test_dense_mapping_dtypes(w_dtype, x_dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 70, generator=g).to(x_dtype)
    w = make_mapping("dense", 70, 5, g=g, w_dtype=w_dtype)
    for input in INPUTS:
        check(x, w, "mean", input)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("input", ["probs", "log_probs"])
def test_vocabulary_sized_rows(dtype, input):
    """A 50,000-way vocabulary mapped to 4 classes of 3 label words; rows of an odd length start misaligned (the
    scalar head before the 16-byte groups), and the backward spreads each row over several column chunks."""
    g = torch.Generator().manual_seed(1)
    for K in (50_000, 50_257):
        x = (torch.randn(3, K, generator=g) * 5).to(dtype)
        mapping = torch.randint(0, K, (4, 3), generator=g)
        assert cu._chunking(3, K, 4, None)[1] > 1
        check(x, mapping, "mean", input)
        check(x, mapping, "sum", input, threads=256, chunk=4096)


@pytest.mark.parametrize("input", ["probs", "log_probs"])
def test_extreme_logits_do_not_overflow(input):
    x = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-3e4, -3e4 + 1, -3e4 + 2, -float("inf")]])
    mapping = torch.tensor([[0, 2], [1, 3]])
    out, lse = cu.label_map(x, mapping, "mean", input, emulate=True)
    dx, _ = cu.label_map_backward(torch.randn(2, 2), x, mapping, out, lse, "mean", input, True, False,
                                  emulate=True)
    assert torch.isfinite(dx).all() and not torch.isnan(out).any()
    assert torch.isfinite(out[:, 0]).all()
    ref = torch.softmax(x.double(), -1) if input == "probs" else torch.log_softmax(x.double(), -1)
    assert_close(out, ((ref[:, [0, 1]] + ref[:, [2, 3]]) / 2).float())


@pytest.mark.parametrize("input", INPUTS)
def test_extreme_logits_every_form(input):
    """+-1e4 and -inf entries (never a whole -inf row) through every mapping form and every path; nothing is NaN
    where the reference is not."""
    g = torch.Generator().manual_seed(5)
    for K, layout in ((37, "contiguous"), (300, "transposed"), (300, "strided")):
        x = torch.randn(4, K, generator=g) * 1e4
        x[:, ::5] = -float("inf")
        x[:, 1] = 1e4
        x = as_layout(x, layout)
        # a -inf logit or log-prob through a dense map gives inf - inf (NaN in the reference too): probs only
        kinds = ("one", "many", "dense") if input == "probs" else ("one", "many")
        for kind in kinds:
            mapping = make_mapping(kind, K, 6, 3, g=g)
            for reduce in REDUCES:
                out, _, dx, _ = check(x, mapping, reduce, input)
                assert not torch.isnan(dx).any() and not torch.isnan(out).any()


# ---- layouts, block shapes, chunks, empties ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_layouts_and_misaligned_rows(dtype):
    """Contiguous rows (16-byte groups), a view starting one element past an aligned base (a scalar head on every
    row, and dx aligned differently from x: scalar stores), odd row lengths, transposed and strided rows (the
    scalar path): the same values give the same results within rounding."""
    g = torch.Generator().manual_seed(2)
    for K in (64, 67, 1000):
        base = torch.randn(3, K + 1, generator=g).to(dtype)
        mapping = torch.randint(-1, K, (5, 3), generator=g)
        views = [base[:, 1:], base[:, 1:].contiguous(), as_layout(base[:, 1:], "transposed"),
                 as_layout(base[:, 1:], "strided")]
        assert views[0].data_ptr() % 16 != 0
        for input in INPUTS:
            results = [check(v, mapping, "sum", input) for v in views]
            first = results[0]
            for other in results[1:]:
                for a, b in zip(first, other, strict=True):
                    if a is not None and a.numel():
                        assert_close(a, b, dtype=dtype, name="layouts")


def test_broadcast_and_transposed_gradients():
    """An expanded (stride 0) or transposed gradient is read through its strides."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 90, generator=g)
    for kind in ("many", "dense"):
        mapping = make_mapping(kind, 90, 6, 3, g=g)
        for input in INPUTS:
            check(x, mapping, "mean", input, grad=torch.ones(()).expand(4, 6))
            check(x, mapping, "mean", input, grad=torch.randn(6, 4, generator=g).t())


@pytest.mark.parametrize("threads", [32, 64, 128, 1024])
def test_block_shapes(threads):
    """One warp to 32 warps per block: the shuffle tree, the per-warp slots and the idle threads of a small row."""
    g = torch.Generator().manual_seed(6)
    for K in (1, 5, 31, 33, 700):
        x = torch.randn(3, K, generator=g) * 4
        for kind in ("one", "many"):
            for input in ("probs", "log_probs"):
                check(x, make_mapping(kind, K, 40, 3, g=g), "mean", input, threads=threads)


def test_backward_chunks_give_identical_gradients():
    """Columns cut into chunks (one block each, the row scalar recomputed per block with the same tree): the
    same bits whatever the chunking, including chunks that hold no mapped column."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 1000, generator=g)
    mapping = torch.randint(-1, 40, (12, 4), generator=g)  # mapped columns only in the first chunk
    mapping[0, 0] = 999
    for input in INPUTS:
        out, lse = cu.label_map(x, mapping, "mean", input, emulate=True)
        grad = torch.randn(out.shape, generator=g)
        runs = [cu.label_map_backward(grad, x, mapping, out, lse, "mean", input, True, False, emulate=True,
                                      threads=128, chunk=c)[0] for c in (None, 1, 64, 100, 1000)]
        for r in runs[1:]:
            assert torch.equal(r, runs[0])
        check(x, mapping, "mean", input, chunk=7)


def test_chunking_choice():
    assert cu._chunking(1, 100, 4, None) == (128, 1)  # small rows: one block per row
    chunk, n = cu._chunking(2, 50_000, 4, None)
    assert n > 1 and chunk % 64 == 0 and chunk * n >= 50_000 and chunk >= cu.MIN_CHUNK
    assert cu._chunking(4096, 50_000, 4, None)[1] == 1  # enough rows already
    assert cu._chunking(2, 50_000, 50_000, None)[1] == 1  # T ~ K: the row scalar per chunk would dominate
    assert cu._chunking(1, 10**7, 1, 1)[1] <= cu.MAX_CHUNKS


def test_empty_sizes():
    g = torch.Generator().manual_seed(9)
    for kind in ("one", "many", "dense"):
        mapping = make_mapping(kind, 5, 2, g=g)
        for input in INPUTS:
            out, _, dx, dw = check(torch.randn(0, 5), mapping, "mean", input)
            assert out.shape == (0, 2) and dx.shape == (0, 5)
            if dw is not None:  # no rows: a zero gradient, written by the kernel (the buffer was NaN)
                assert torch.equal(dw, torch.zeros(5, 2))
    x = torch.randn(3, 5)
    for input in INPUTS:  # no targets; targets without sources
        check(x, torch.empty(0, 2, dtype=torch.int64), "mean", input)
        check(x, torch.full((3, 2), -1), "mean", input)
        check(x, torch.empty(4, 0, dtype=torch.int64), "sum", input)
        check(x, torch.rand(5, 0), "mean", input)


# ---- determinism, robustness ---------------------------------------------------------------------------------------

def test_deterministic():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(70, 400, generator=g)
    for mapping in (torch.randint(-1, 400, (12, 6), generator=g), torch.rand(400, 5, generator=g)):
        for input in INPUTS:
            runs = [check(x, mapping, "mean", input) for _ in range(2)]
            for a, b in zip(*runs, strict=True):
                assert a is None or torch.equal(a, b)


def test_logits_are_never_written():
    x = torch.randn(3, 50)
    before = x.clone()
    for mapping in (torch.tensor([[1, 2], [3, -1]]), torch.rand(50, 2)):
        check(x, mapping, "mean", "probs")
    assert torch.equal(x, before)


def test_out_of_range_indices_read_nothing():
    """The op range-checks before the launch; the kernels still skip an index outside [0, K) (as if it were -1)."""
    x = torch.randn(2, 6)
    bad = torch.tensor([[0, 6, -1], [1 << 40, 2, -5]])
    as_missing = torch.tensor([[0, -1, -1], [-1, 2, -1]])
    for input in INPUTS:
        out, lse = cu.label_map(x, bad, "mean", input, emulate=True)
        want, _ = cu.label_map(x, as_missing, "mean", input, emulate=True)
        assert torch.equal(out, want)
        grad = torch.randn(2, 2)
        dx, _ = cu.label_map_backward(grad, x, bad, out, lse, "sum", input, True, False, emulate=True)
        assert torch.isfinite(dx).all()


def test_launcher_refuses_bad_parameters():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="label_map_fwd_host' failed"):
        cu.label_map(x, torch.tensor([1, 2]), "mean", "probs", emulate=True, threads=48)
    p = _cuda.extension().LabelMapParams()
    p.B, p.K, p.T, p.M = 2, 8, 1, 1
    p.x = x.data_ptr()
    p.x_sb, p.x_sk = 8, 1
    assert _cuda.extension().label_map_fwd_host(p) != 0  # no output buffer
    p.x_dtype = 3
    assert _cuda.extension().label_map_fwd_host(p) != 0
    with pytest.raises(AttributeError):
        p.not_a_field = 1


def test_emulation_refuses_device_mismatch():
    with pytest.raises(ValueError, match="the cuda backend needs cuda tensors"):
        cu.label_map(torch.randn(2, 3), torch.tensor([1]), "mean", "logits")


# ---- on a GPU: the device kernels through the public op --------------------------------------------------------

def _run_op(backend, x, mapping, grad, **kw):
    x = x.detach().clone().requires_grad_(True)
    w = mapping.detach().clone().requires_grad_(True) if mapping.is_floating_point() else mapping
    out = rk.label_map(x, w, backend=backend, **kw)
    out.backward(grad)
    return out, x.grad, (w.grad if mapping.is_floating_point() else None)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["one", "many", "dense"])
@pytest.mark.parametrize("input", INPUTS)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_gpu_matches_reference(kind, input, dtype):
    g = torch.Generator().manual_seed(0)
    for B, K, layout in ((5, 1, "contiguous"), (7, 33, "transposed"), (300, 1000, "contiguous"),
                         (4, 3001, "strided"), (3, 50_257, "contiguous")):
        x = as_layout((torch.randn(B, K, generator=g) * 4).to(dtype), layout)
        mapping = make_mapping(kind, K, 11, 3, g=g)
        for reduce in REDUCES:
            odt = R.out_dtype(x, input)
            grad = torch.randn(B, 11, generator=g).to(odt)
            got = _run_op("cuda", x.cuda(), mapping.cuda(), grad.cuda(), reduce=reduce, input=input)
            wo, _, wx, ww = reference(x, mapping, reduce, input, grad, kind == "dense")
            td = torch.float32 if dtype == torch.float32 else dtype
            close(got[0].cpu(), wo, td, "out")
            close(got[1].cpu(), wx, td, "dlogits")
            if kind == "dense":
                close(got[2].cpu(), ww, td, "dmapping")


@pytest.mark.gpu
def test_gpu_auto_backend_serves_every_form():
    x = torch.randn(4, 100, device="cuda")
    for mapping in (torch.tensor([3, 1], device="cuda"), torch.rand(100, 3, device="cuda")):
        out = rk.label_map(x, mapping, input="probs")
        assert_close(out.cpu(), rk.label_map(x.cpu(), mapping.cpu(), input="probs", backend="reference"))


@pytest.mark.gpu
def test_gpu_emulation_agrees_with_device():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5003, generator=g) * 3
    for mapping in (torch.randint(-1, 5003, (10, 4), generator=g), torch.rand(5003, 7, generator=g)):
        for input in INPUTS:
            host = cu.label_map(x, mapping, "mean", input, emulate=True)
            dev = cu.label_map(x.cuda(), mapping.cuda(), "mean", input)
            for a, b in zip(host, dev, strict=True):
                assert_close(b.cpu(), a, scale=4.0, name="device vs emulation")


@pytest.mark.gpu
def test_gpu_deterministic_and_opcheck():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 2000, generator=g).cuda()
    for mapping in (torch.randint(-1, 2000, (30, 5), generator=g).cuda(), torch.rand(2000, 9, generator=g).cuda()):
        for input in INPUTS:
            grad = torch.randn(512, mapping.shape[-1] if mapping.is_floating_point() else 30, device="cuda")
            a = _run_op("cuda", x, mapping, grad, input=input)
            b = _run_op("cuda", x, mapping, grad, input=input)
            for u, v in zip(a, b, strict=True):
                assert u is None or torch.equal(u, v)
            small = x[:4, :33].contiguous()
            m = mapping[:33, :3].contiguous() if mapping.is_floating_point() else mapping.clamp(max=32)
            torch.library.opcheck(torch.ops.reprokernels.label_map_fwd, (small, m, "mean", input, "cuda"))
            out, lse = torch.ops.reprokernels.label_map_fwd(small, m, "mean", input, "cuda")
            needs = [True, m.is_floating_point()]
            torch.library.opcheck(torch.ops.reprokernels.label_map_bwd,
                                  (torch.randn_like(out), small, m, out, lse, "mean", input, needs, "cuda"))
