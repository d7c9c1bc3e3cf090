"""The CUDA backend of soft_prompt_concat against the reference.

Without a GPU the kernels' own per-thread code runs through the extension's host emulation
(``reprokernels.cuda.soft_prompt.*(..., emulate=True)`` on CPU tensors): forward and both gradients, a single
prompt and a task table, ids and ready embeddings, insertion points, embed_scale, every (prompt, token) dtype
pair, index dtypes, memory layouts, the 16-byte and the scalar paths, batch chunking and empty sizes. Every
buffer a kernel writes is poisoned with NaN first, so an element no work item writes fails the test.
The ``gpu`` tests run the device kernels through the public ``reprokernels.soft_prompt_concat(..., backend="cuda")``.
"""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reprokernels
from reprokernels import _cuda
from reprokernels.ops import soft_prompt as sp_ops
from reprokernels.reference import soft_prompt as R

from .utils import as_layout, assert_close, empty_poisoned

pytestmark = pytest.mark.skipif(not _cuda.extension_built(), reason="reprokernels._C is not built")

if _cuda.extension_built():
    from reprokernels.cuda import soft_prompt as cu
else:  # the module imports fine; its functions need the extension
    cu = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    def poisoned(shape, dtype, device):
        return empty_poisoned(tuple(shape), dtype, device)

    monkeypatch.setattr(cu, "empty_output", poisoned)


# ---- helpers ------------------------------------------------------------------------------------------------------

def make_inputs(B=3, L=5, P=4, D=16, T=None, V=23, *, from_ids=True, insert=None, dtype=torch.float32,
                prompt_dtype=torch.float32, layout="contiguous", seed=0):
    """(prompt, input_ids, inputs_embeds, embedding_weight, task_ids, insert_at) in the backends' argument order.

    insert: None (no insert_at), "mixed" (0, L and values between) or "random"."""
    g = torch.Generator().manual_seed(seed)
    prompt = as_layout(torch.randn(*((T,) if T else ()), P, D, generator=g).to(prompt_dtype), layout)
    ids = embeds = weight = task_ids = insert_at = None
    if from_ids:
        weight = as_layout(torch.randn(V, D, generator=g).to(dtype), layout)
        ids = torch.randint(0, V, (B, L), generator=g)
    else:
        embeds = as_layout(torch.randn(B, L, D, generator=g).to(dtype), layout)
    if T:
        task_ids = torch.randint(0, T, (B,), generator=g)
    if insert == "mixed":
        insert_at = torch.tensor([(0, L, L // 2)[b % 3] for b in range(B)], dtype=torch.int64)
    elif insert == "random":
        insert_at = torch.randint(0, L + 1, (B,), generator=g)
    return prompt, ids, embeds, weight, task_ids, insert_at


def tol_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The tolerance class of a result depending on tensors of these dtypes: the least precise one."""
    for d in (torch.bfloat16, torch.float16):
        if d in dtypes:
            return d
    return torch.float32


def check(args, scale: float = 1.0, *, chunk=None, grad_layout="contiguous", exact_forward=True):
    """Emulated forward and backward vs the reference's forward and written-out backward."""
    prompt, ids, embeds, weight, task_ids, insert_at = args
    src = weight if embeds is None else embeds
    out = cu.soft_prompt_concat(*args, scale, emulate=True)
    want = R.soft_prompt_concat(*args, scale)
    assert out.dtype == src.dtype and out.is_contiguous() and out.shape == want.shape
    if exact_forward:  # one rounding of the same float32 value on both sides: bit for bit
        assert torch.equal(out, want), (out - want).abs().max()
    else:
        assert_close(out, want, dtype=src.dtype, name="out")
    L = (ids if embeds is None else embeds).shape[1]
    grad = as_layout(torch.randn(out.shape).to(out.dtype), grad_layout)
    need_embeds = embeds is not None
    dp, de = cu.soft_prompt_concat_backward(grad, prompt, task_ids, insert_at, L, scale, True, need_embeds,
                                            emulate=True, chunk=chunk)
    wp, we = R.soft_prompt_concat_backward(grad, prompt, task_ids, insert_at, L, scale, True, need_embeds)
    assert dp.dtype == prompt.dtype and dp.shape == prompt.shape and dp.is_contiguous()
    assert_close(dp, wp, dtype=tol_dtype(prompt.dtype, grad.dtype), scale=4.0, name="dprompt")
    if need_embeds:
        assert de.dtype == grad.dtype and de.shape == embeds.shape
        assert torch.equal(de, we), "dembeds: grad[b, j] * embed_scale rounded once, as the reference"
    else:
        assert de is None
    return out, dp, de


# ---- forward and backward against the reference ----------------------------------------------------------------

@pytest.mark.parametrize("table", [False, True])
@pytest.mark.parametrize("from_ids", [True, False])
@pytest.mark.parametrize("insert", [None, "mixed"])
@pytest.mark.parametrize("scale", [1.0, 2.5, 13 ** 0.5])  # sqrt(13): rounded to float32 on both sides
def test_matches_reference(table, from_ids, insert, scale):
    check(make_inputs(B=5, L=6, P=3, D=16, T=3 if table else None, from_ids=from_ids, insert=insert), scale)


@pytest.mark.parametrize("D", [1, 13, 67, 8, 64])
@pytest.mark.parametrize("from_ids", [True, False])
def test_odd_and_vector_widths(D, from_ids):
    """Odd D takes the scalar path; D a multiple of the group (4 floats, 8 halves) the 16-byte one."""
    for dtype in DTYPES:
        check(make_inputs(B=3, L=4, P=2, D=D, T=2, from_ids=from_ids, insert="mixed", dtype=dtype), 1.5)


@pytest.mark.parametrize("prompt_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_pair(prompt_dtype, dtype):
    """The prompt is cast into the token dtype (never scaled); d prompt in float32, stored in the prompt's dtype."""
    for D in (24, 13):
        for from_ids in (True, False):
            check(make_inputs(B=4, L=5, P=3, D=D, T=2, from_ids=from_ids, insert="random", dtype=dtype,
                              prompt_dtype=prompt_dtype), 3.0)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("grad_layout", ["strided", "transposed"])
def test_non_contiguous_inputs(layout, grad_layout):
    for from_ids in (True, False):
        args = list(make_inputs(B=4, L=5, P=3, D=16, T=2, from_ids=from_ids, insert="mixed", layout=layout))
        if from_ids:  # every other column of a wider id matrix
            wide = torch.zeros(4, 10, dtype=torch.int64)
            wide[:, ::2] = args[1]
            args[1] = wide[:, ::2]
        args[4] = torch.stack([args[4], args[4]], 1)[:, 0]  # task_ids with stride 2
        args[5] = torch.stack([args[5], args[5]], 1)[:, 1]
        check(tuple(args), 2.0, grad_layout=grad_layout)


def test_broadcast_gradient():
    """The gradient of out.sum() is an expanded (stride 0) tensor: read through its strides."""
    prompt, _, _, _, task_ids, insert_at = make_inputs(B=3, L=4, P=2, D=8, T=2, from_ids=False, insert="mixed")
    grad = torch.ones(()).expand(3, 6, 8)
    dp, de = cu.soft_prompt_concat_backward(grad, prompt, task_ids, insert_at, 4, 2.0, True, True, emulate=True)
    wp, we = R.soft_prompt_concat_backward(grad, prompt, task_ids, insert_at, 4, 2.0, True, True)
    assert_close(dp, wp, name="dprompt")
    assert torch.equal(de, we)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int16, torch.uint8])
def test_index_dtypes_are_read_in_place(index_dtype):
    """input_ids / task_ids / insert_at in any integer dtype the op accepts (the reference's F.embedding takes
    only int32/int64 ids, so it gets the int64 originals)."""
    args = make_inputs(B=4, L=5, P=2, D=13, T=3, insert="random")
    small = list(args)
    for i in (1, 4, 5):
        small[i] = args[i].to(index_dtype)
    assert torch.equal(cu.soft_prompt_concat(*small, 2.0, emulate=True), R.soft_prompt_concat(*args, 2.0))
    grad = torch.randn(4, 7, 13)
    dp, _ = cu.soft_prompt_concat_backward(grad, args[0], small[4], small[5], 5, 2.0, True, False, emulate=True)
    wp, _ = R.soft_prompt_concat_backward(grad, args[0], args[4], args[5], 5, 2.0, True, False)
    assert torch.equal(dp, wp)


def test_vector_decisions():
    """The 16-byte flags from data_ptr and strides, and the two paths giving the same bytes."""
    h = torch.randn(4, 64).half()
    assert cu._rows_vec(h, torch.float16, 1, (64,))
    assert not cu._rows_vec(h[:, 1:], torch.float16, 1, (64,))  # base 2 bytes past a pack
    assert not cu._rows_vec(h[:, :60], torch.float16, 1, (60,))  # row stride not a whole pack
    assert not cu._rows_vec(h.t(), torch.float16, 4, (1,))
    # a float16 source of a float32 output is read 4 halves (8 bytes) at a time: 8-byte alignment suffices
    assert cu._rows_vec(h.view(-1)[4:].view(-1, 4), torch.float32, 1, (4,))
    assert cu._outs_vec(64, torch.float16, torch.empty(2, 64).half()) and not cu._outs_vec(12, torch.float16)
    # vectorised (contiguous, D = 64) and scalar (misaligned base) reads of the same values agree bit for bit
    prompt, ids, _, weight, task_ids, insert_at = make_inputs(B=3, L=4, P=3, D=64, T=2, insert="mixed",
                                                              dtype=torch.float16)
    shifted = torch.empty(weight.numel() + 1, dtype=weight.dtype)[1:].view(weight.shape).copy_(weight)
    assert not cu._rows_vec(shifted, torch.float16, 1, (64,))
    a = cu.soft_prompt_concat(prompt, ids, None, weight, task_ids, insert_at, 2.0, emulate=True)
    b = cu.soft_prompt_concat(prompt, ids, None, shifted, task_ids, insert_at, 2.0, emulate=True)
    assert torch.equal(a, b)


# ---- empty sizes --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [dict(P=0), dict(L=0), dict(B=0), dict(P=0, L=0), dict(B=0, L=0)])
@pytest.mark.parametrize("table", [False, True])
def test_empty_sizes(sizes, table):
    kw = dict(B=3, L=4, P=2, D=8) | sizes
    for from_ids in (True, False):
        out, dp, _ = check(make_inputs(**kw, T=2 if table else None, from_ids=from_ids, insert="random"), 2.0)
        assert out.shape == (kw["B"], kw["P"] + kw["L"], 8)
        if kw["B"] == 0:  # no rows: the prompt gradient is zero, written by the kernel (the buffer was NaN)
            assert torch.equal(dp, torch.zeros_like(dp))


# ---- the reduction: chunks and determinism ----------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("table", [False, True])
def test_batch_chunks(chunk, table):
    """One chunk writes the prompt's dtype directly; several write float32 partials summed afterwards (also with
    a task table, where chunks past a task's samples write zeros)."""
    check(make_inputs(B=11, L=3, P=2, D=20, T=4 if table else None, insert="random", from_ids=False), 1.0,
          chunk=chunk)


def test_default_chunking():
    assert cu._default_chunk(64, 16, table=True) == 64  # one chunk per task: no host sync to size partials
    assert cu._default_chunk(5, 16, table=False) == 5
    assert cu._default_chunk(64, 16, table=False) == cu.MIN_CHUNK  # little work per chunk: many chunks
    assert cu._default_chunk(64, 1 << 20, table=False) == 64  # enough work already: one chunk


def test_prompt_gradient_is_deterministic():
    """Fixed summation order (stable argsort by task, increasing sample index), no atomics: bit-equal reruns,
    and float32 accumulation in that order equals index_add_ of the reference bit for bit."""
    prompt, _, _, _, task_ids, insert_at = make_inputs(B=40, L=6, P=3, D=24, T=5, from_ids=False,
                                                       insert="random")
    grad = torch.randn(40, 9, 24)
    runs = [cu.soft_prompt_concat_backward(grad, prompt, task_ids, insert_at, 6, 1.0, True, False,
                                           emulate=True)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    want, _ = R.soft_prompt_concat_backward(grad, prompt, task_ids, insert_at, 6, 1.0, True, False)
    assert torch.equal(runs[0], want)


def test_task_without_samples_gets_zero_gradient():
    prompt = make_inputs(B=4, L=3, P=2, D=8, T=4, from_ids=False)[0]
    task_ids = torch.tensor([2, 0, 2, 0])
    dp, _ = cu.soft_prompt_concat_backward(torch.randn(4, 5, 8), prompt, task_ids, None, 3, 1.0, True, False,
                                           emulate=True)
    assert torch.equal(dp[1], torch.zeros(2, 8)) and torch.equal(dp[3], torch.zeros(2, 8))


# ---- frozen table, robustness ---------------------------------------------------------------------------------

def test_embedding_table_is_never_written():
    args = make_inputs(B=4, L=6, P=2, D=16, T=2, insert="mixed")
    weight = args[3]
    before = weight.clone()
    check(args, 2.0)
    assert torch.equal(weight, before)


def test_out_of_range_indices_read_nothing():
    """The op range-checks before the launch; the kernel itself still masks: ids outside [0, V) and tasks
    outside [0, T) give zero rows, insert_at is clamped into [0, L]."""
    prompt, ids, _, weight, _, _ = make_inputs(B=2, L=3, P=2, D=8, T=2, V=5)
    ids = torch.tensor([[0, 5, -1], [4, 1 << 40, 2]])
    task_ids = torch.tensor([7, -3])
    out = cu.soft_prompt_concat(prompt, ids, None, weight, task_ids, None, 1.0, emulate=True)
    zero = torch.zeros(8)
    for b, row in ((0, 3), (0, 4), (1, 3)):
        assert torch.equal(out[b, row], zero)
    assert torch.equal(out[:, :2], torch.zeros(2, 2, 8))  # unknown tasks: zero prompt rows
    assert torch.equal(out[0, 2], weight[0]) and torch.equal(out[1, 2], weight[4])
    clamped = cu.soft_prompt_concat(prompt[0], ids.clamp(0, 4), None, weight, None, torch.tensor([9, -2]), 1.0,
                                    emulate=True)
    want = R.soft_prompt_concat(prompt[0], ids.clamp(0, 4), None, weight, None, torch.tensor([3, 0]), 1.0)
    assert torch.equal(clamped, want)


@settings(max_examples=25)
@given(data=st.data())
def test_random_configurations(data):
    B, L, P = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 7)), data.draw(st.integers(0, 4))
    D = data.draw(st.sampled_from([1, 3, 8, 13, 16, 40]))
    args = make_inputs(B=B, L=L, P=P, D=D, T=data.draw(st.sampled_from([None, 1, 3])),
                       V=data.draw(st.integers(1, 20)), from_ids=data.draw(st.booleans()),
                       insert=data.draw(st.sampled_from([None, "mixed", "random"])),
                       dtype=data.draw(st.sampled_from(DTYPES)), prompt_dtype=data.draw(st.sampled_from(DTYPES)),
                       layout=data.draw(st.sampled_from(["contiguous", "strided", "transposed"])),
                       seed=data.draw(st.integers(0, 2**16)))
    check(args, data.draw(st.sampled_from([1.0, 0.5, 3.0])), chunk=data.draw(st.sampled_from([None, 1, 2])),
          grad_layout=data.draw(st.sampled_from(["contiguous", "transposed"])))


def test_unneeded_gradients_are_none():
    prompt, _, _, _, task_ids, _ = make_inputs(B=2, L=3, P=2, D=8, T=2)
    grad = torch.randn(2, 5, 8)
    assert cu.soft_prompt_concat_backward(grad, prompt, task_ids, None, 3, 1.0, False, False,
                                          emulate=True) == (None, None)
    dp, de = cu.soft_prompt_concat_backward(grad, prompt, task_ids, None, 3, 1.0, False, True, emulate=True)
    assert dp is None and de.shape == (2, 3, 8)


# ---- the op layer end to end (autograd) through the emulation -----------------------------------------------------

def test_public_op_through_emulation(monkeypatch):
    """The registered ops + autograd.Function with this module as the backend (emulated), vs the reference."""
    emulated = types.SimpleNamespace(
        soft_prompt_concat=lambda *a: cu.soft_prompt_concat(*a, emulate=True),
        soft_prompt_concat_backward=lambda *a: cu.soft_prompt_concat_backward(*a, emulate=True),
    )
    g = torch.Generator().manual_seed(3)
    prompt = torch.randn(3, 4, 16, generator=g)
    embeds = torch.randn(5, 6, 16, generator=g).half()
    kw = dict(task_ids=torch.tensor([2, 0, 1, 2, 2]), insert_at=torch.tensor([0, 6, 3, 1, 0]), embed_scale=4.0,
              attention_mask=torch.ones(5, 6, dtype=torch.long), labels=torch.arange(30).view(5, 6))
    results = []
    for emulate in (True, False):
        p, e = prompt.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
        with monkeypatch.context() as m:
            if emulate:
                m.setattr(sp_ops, "backend_module", lambda modules, backend: emulated)
            res = reprokernels.soft_prompt_concat(p, inputs_embeds=e, backend="reference", **kw)
            res.inputs_embeds.backward(torch.linspace(-1, 1, res.inputs_embeds.numel()).view(5, 10, 16).half())
        results.append((res, p.grad, e.grad))
    (a, ap, ae), (b, bp, be) = results
    assert torch.equal(a.inputs_embeds, b.inputs_embeds)
    assert torch.equal(a.attention_mask, b.attention_mask) and torch.equal(a.labels, b.labels)
    assert_close(ap, bp, dtype=torch.float16, name="dprompt")
    assert torch.equal(ae, be)


# ---- errors -------------------------------------------------------------------------------------------------------

def test_cpu_tensors_need_the_emulation_switch():
    args = make_inputs(B=1, L=2, P=2, D=4)
    with pytest.raises(ValueError, match=r"prompt: the cuda backend needs cuda tensors, got a tensor on cpu"):
        cu.soft_prompt_concat(*args, 1.0)
    if not torch.cuda.is_available():  # backend selection refuses CPU tensors before this module is reached
        with pytest.raises(reprokernels.BackendUnavailableError, match="needs CUDA tensors"):
            reprokernels.soft_prompt_concat(args[0], input_ids=args[1], embedding_weight=args[3], backend="cuda")


def test_bad_inputs_name_the_argument():
    prompt, ids, _, weight, _, _ = make_inputs(B=1, L=2, P=2, D=4)
    with pytest.raises(ValueError, match=r"prompt: the cuda backend supports float32, float16 and bfloat16"):
        cu.soft_prompt_concat(prompt.double(), ids, None, weight, None, None, 1.0, emulate=True)
    with pytest.raises(ValueError, match=r"embedding_weight: the cuda backend supports"):
        cu.soft_prompt_concat(prompt, ids, None, weight.double(), None, None, 1.0, emulate=True)
    with pytest.raises(ValueError, match=r"grad: expected \(B, P \+ L = 4, D = 4\)"):
        cu.soft_prompt_concat_backward(torch.randn(1, 5, 4), prompt, None, None, 2, 1.0, True, False, emulate=True)


def test_params_block_rejects_unknown_fields():
    p = _cuda.extension().SoftPromptParams()
    p.B, p.embed_scale = 4, 0.5
    assert (p.B, p.embed_scale) == (4, 0.5)
    with pytest.raises(AttributeError):
        p.batch = 4  # a misspelt field is an error, never silently ignored


def _fwd_params(out, prompt, embeds):
    p = _cuda.extension().SoftPromptParams()
    B, L, D = embeds.shape
    p.B, p.L, p.P, p.D, p.T = B, L, prompt.shape[0], D, 1
    p.prompt, p.prompt_sp, p.prompt_sd = prompt.data_ptr(), *prompt.stride()
    p.tokens, (p.tok_sb, p.tok_sl, p.tok_sd) = embeds.data_ptr(), embeds.stride()
    p.out = out.data_ptr()
    return p


def test_invalid_params_are_refused_by_the_launcher():
    """A vector flag that does not hold (odd D, misaligned base), unknown codes or a missing pointer: no launch."""
    ext = _cuda.extension()
    prompt, embeds = torch.randn(2, 13), torch.randn(1, 3, 13)
    out = torch.empty(1, 5, 13)
    assert ext.soft_prompt_fwd_host(_fwd_params(out, prompt, embeds)) == 0
    bad = []
    for field, value in (("vec_out", 1), ("vec_prompt", 1), ("tok_dtype", 3), ("ids_dtype", 5), ("out", 0)):
        p = _fwd_params(out, prompt, embeds)
        setattr(p, field, value)
        bad.append(ext.soft_prompt_fwd_host(p))
    p = _fwd_params(out, prompt, embeds)
    p.nchunks = 0
    bad.append(ext.soft_prompt_bwd_host(p))
    assert all(code == 1 for code in bad), bad  # cudaErrorInvalidValue
    assert "invalid argument" in ext.error_string(1)


# ---- the device kernels (need a GPU) -----------------------------------------------------------------------------

def _cuda_ready() -> None:
    if not _cuda.cuda_available():
        pytest.skip(_cuda.unavailable_reason())


def _public(backend, prompt, kw, grad):
    """Forward and backward through the public op: (out, d prompt, d inputs_embeds)."""
    p = prompt.detach().clone().requires_grad_(True)
    kw = dict(kw)
    if "inputs_embeds" in kw:
        kw["inputs_embeds"] = kw["inputs_embeds"].detach().clone().requires_grad_(True)
    out = reprokernels.soft_prompt_concat(p, backend=backend, **kw).inputs_embeds
    out.backward(grad)
    return out.detach(), p.grad, kw["inputs_embeds"].grad if "inputs_embeds" in kw else None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prompt_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("from_ids", [True, False])
@pytest.mark.parametrize("table", [False, True])
@pytest.mark.parametrize("D", [4096, 67])
def test_gpu_matches_reference(dtype, prompt_dtype, from_ids, table, D):
    _cuda_ready()
    dev = "cuda"
    B, L, P, T, V = 24, 37, 20, 5, 1000
    prompt = torch.randn(*((T,) if table else ()), P, D, device=dev).to(prompt_dtype)
    kw: dict = dict(embed_scale=D ** 0.5, insert_at=torch.randint(0, L + 1, (B,), device=dev))
    if table:
        kw["task_ids"] = torch.randint(0, T, (B,), device=dev)
    if from_ids:
        weight = torch.randn(V, D, device=dev).to(dtype)
        kw.update(input_ids=torch.randint(0, V, (B, L), device=dev, dtype=torch.int32), embedding_weight=weight)
        before = weight.clone()
    else:
        kw["inputs_embeds"] = torch.randn(B, L, D, device=dev).to(dtype)
    grad = torch.randn(B, P + L, D, device=dev).to(dtype)
    got = _public("cuda", prompt, kw, grad)
    want = _public("reference", prompt, kw, grad)
    assert torch.equal(got[0], want[0])
    assert got[1].dtype == prompt.dtype
    assert_close(got[1], want[1], dtype=tol_dtype(dtype, prompt_dtype), scale=8.0, name="dprompt")
    if from_ids:
        assert torch.equal(weight, before)
    else:
        assert torch.equal(got[2], want[2])


@pytest.mark.gpu
def test_gpu_backward_is_deterministic_and_uses_the_current_stream():
    _cuda_ready()
    dev = "cuda"
    B, L, P, D, T = 256, 64, 16, 1024, 3
    for table in (False, True):
        prompt = torch.randn(*((T,) if table else ()), P, D, device=dev)
        task_ids = torch.randint(0, T, (B,), device=dev) if table else None
        insert_at = torch.randint(0, L + 1, (B,), device=dev)
        grad = torch.randn(B, P + L, D, device=dev, dtype=torch.bfloat16)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            a = cu.soft_prompt_concat_backward(grad, prompt, task_ids, insert_at, L, 2.0, True, True)
            b = cu.soft_prompt_concat_backward(grad, prompt, task_ids, insert_at, L, 2.0, True, True)
        stream.synchronize()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        want = R.soft_prompt_concat_backward(grad, prompt, task_ids, insert_at, L, 2.0, True, True)
        assert_close(a[0], want[0], dtype=torch.bfloat16, scale=4.0, name="dprompt")
        assert torch.equal(a[1], want[1])


@pytest.mark.gpu
def test_gpu_large_batch_grid_stride():
    """More work items than one grid covers (the grid-stride loops): 537,680 rows x 32 lanes > 65,535 x 256."""
    _cuda_ready()
    dev = "cuda"
    B, L, P, D, V = 260, 2048, 20, 256, 32000
    weight = torch.randn(V, D, device=dev, dtype=torch.bfloat16)
    prompt = torch.randn(P, D, device=dev)
    ids = torch.randint(0, V, (B, L), device=dev)
    out = reprokernels.soft_prompt_concat(prompt, input_ids=ids, embedding_weight=weight, backend="cuda",
                                          embed_scale=64.0).inputs_embeds
    want = R.soft_prompt_concat(prompt, ids[-2:], None, weight, None, None, 64.0)
    assert torch.equal(out[-2:], want)
