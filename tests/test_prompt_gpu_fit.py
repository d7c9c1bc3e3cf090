"""visual_prompt / soft_prompt_concat on a GPU's terms, checked on the CPU: no host syncs in forward and backward,
enough programs at benchmark shapes (batch- and window-split reductions, tested against the reference by forcing
them at small sizes), grids within CUDA's axis limits and int64 offsets where int32 would wrap.

Launch-geometry tests never run a kernel at the large sizes: they call the pure planning helpers, or record the
launches (``_capture``: the kernel's ``run`` is replaced, nothing executes) on meta tensors (no memory)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import reprokernels as rk
from tests.utils import assert_close

pytestmark = pytest.mark.skipif(not rk._backend.triton_installed(), reason="triton is not installed")

H100_SMS = 132


@pytest.fixture
def tvp():
    from reprokernels.triton import visual_prompt

    return visual_prompt


@pytest.fixture
def tsp():
    from reprokernels.triton import soft_prompt

    return soft_prompt


def _capture(monkeypatch, kernel) -> list[dict]:
    """Record every launch of kernels of ``kernel``'s class (JITFunction, or InterpretedFunction under
    TRITON_INTERPRET) as {name, grid, kwargs}; nothing runs."""
    launches: list[dict] = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(dict(name=self.fn.__name__, grid=tuple(grid), args=args, kwargs=kwargs))

    monkeypatch.setattr(type(kernel), "run", run)
    return launches


# ------------------------------------------------------------------------------------------------ host syncs

# aten ops that make the host wait for a CUDA device (or, for lift_fresh, a blocking host-to-device copy of a
# Python list: a stream sync, and illegal while a CUDA graph is captured); bincount sizes its output from max()
_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "unique_consecutive", "_unique2", "masked_select",
             "lift_fresh", "bincount", "tolist"}


class _SyncCounter(TorchDispatchMode):
    """Counts host-syncing aten ops, looking inside reprokernels' registered ops (their Python launchers)."""

    def __init__(self):
        super().__init__()
        self.syncs: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if func.namespace == "reprokernels":
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        if name in _SYNC_OPS:
            self.syncs[name] += 1
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                   for i in (args[1] if len(args) > 1 else [])):
            self.syncs["boolean-mask index"] += 1
        return func(*args, **kwargs)


def _count_syncs(monkeypatch, kernel, step) -> collections.Counter:
    """Host syncs of ``step()`` (forward + backward) with value checks in their CUDA (asynchronous) mode."""
    _capture(monkeypatch, kernel)  # kernels need not run: only the torch work around them is counted
    counter = _SyncCounter()
    with rk.eager_checks(False), counter:
        step()
    return counter.syncs


@pytest.mark.parametrize("mean_std", ["numbers", "one_number", "tensors", "none"])
@pytest.mark.parametrize("mask", ["outside", "patch_tensor"])
def test_visual_prompt_has_no_host_sync(monkeypatch, tvp, mean_std, mask):
    x = torch.rand(3, 3, 6, 6)
    delta = torch.zeros(3, 8, 8, requires_grad=True)
    kw = {}
    if mean_std == "numbers":
        kw = dict(mean=[0.48, 0.46, 0.41], std=[0.27, 0.26, 0.28])
    elif mean_std == "one_number":
        kw = dict(mean=0.5, std=0.25)
    elif mean_std == "tensors":
        kw = dict(mean=torch.tensor([0.48, 0.46, 0.41]), std=torch.tensor([0.27, 0.26, 0.28]))
    m = torch.ones(1, 1, 4, 4, requires_grad=True) if mask == "patch_tensor" else mask

    def step():
        out = rk.visual_prompt(x.requires_grad_(), delta, mask=m, size=8, squash="sigmoid", clamp=(0.0, 1.0),
                               backend="triton", **kw)
        out.backward(torch.ones_like(out))

    assert _count_syncs(monkeypatch, tvp._vp_fwd_kernel, step) == {}


@pytest.mark.parametrize("kind", ["ids", "embeds_tasks_insert"])
def test_soft_prompt_has_no_host_sync(monkeypatch, tsp, kind):
    B, L, P, D = 4, 5, 3, 8
    if kind == "ids":
        prompt = torch.zeros(P, D, requires_grad=True)
        kw = dict(input_ids=torch.randint(0, 11, (B, L)), embedding_weight=torch.randn(11, D))
    else:
        prompt = torch.zeros(2, P, D, requires_grad=True)
        kw = dict(inputs_embeds=torch.randn(B, L, D, requires_grad=True), task_ids=torch.tensor([1, 0, 1, 1]),
                  insert_at=torch.tensor([0, 2, 5, 1]), attention_mask=torch.ones(B, L, dtype=torch.long),
                  labels=torch.zeros(B, L, dtype=torch.long))

    def step():
        out = rk.soft_prompt_concat(prompt, backend="triton", **kw).inputs_embeds
        out.backward(torch.ones_like(out))

    assert _count_syncs(monkeypatch, tsp._sp_fwd_kernel, step) == {}


# ------------------------------------------------------------------------------ Python-number mean and std


def test_number_mean_std_build_the_same_vectors_without_a_host_copy(monkeypatch):
    from reprokernels.ops import visual_prompt as ops_vp

    x = torch.rand(1, 3, 2, 2)

    def no_tensor(*a, **k):
        raise AssertionError("torch.tensor(python list) on the device: a blocking host-to-device copy")

    monkeypatch.setattr(torch, "tensor", no_tensor)
    v = ops_vp._channel_vector([0.48, 0.46, 0.41], "mean", 3, x)
    assert v.dtype == torch.float32 and v.shape == (3,) and v.is_contiguous()
    assert v.tolist() == torch.as_tensor([0.48, 0.46, 0.41], dtype=torch.float32).tolist()
    assert ops_vp._channel_vector(0.25, "std", 3, x).tolist() == [0.25] * 3
    assert ops_vp._channel_vector((2, 2, 2), "std", 3, x).tolist() == [2.0] * 3
    assert ops_vp._channel_vector([0.5], "mean", 3, x).tolist() == [0.5] * 3


@pytest.mark.parametrize("std", [[1.0, 0.0, 1.0], 0.0, [1.0, 1e-50, 1.0]])
def test_number_std_zero_is_refused_on_the_host(std):
    """Also a value that only becomes 0 as the float32 the kernels divide by."""
    with pytest.raises(ValueError, match="std: expected non-zero values"):
        rk.visual_prompt(torch.rand(1, 3, 4, 4), torch.randn(3, 7, 7), std=std, backend="triton")


def test_number_mean_std_match_tensor_mean_std():
    x, delta = torch.rand(2, 3, 5, 5), torch.randn(3, 9, 9)
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    a = rk.visual_prompt(x, delta, mean=mean, std=std, squash="tanh", backend="triton")
    b = rk.visual_prompt(x, delta, mean=torch.tensor(mean), std=torch.tensor(std), squash="tanh", backend="triton")
    want = rk.visual_prompt(x, delta, mean=mean, std=std, squash="tanh", backend="reference")
    assert torch.equal(a, b)
    assert_close(a, want)


# ------------------------------------------------------------------- visual_prompt: window-split mask gradient


def test_window_split_gives_a_full_wave_at_the_audit_shape(tvp):
    """B=256, 3 x 224 x 224 canvas, a learnable 14 x 14 mask shared by the batch (fp16 gradient)."""
    B, C, H, kh = 256, 3, 224, 16
    n_bblocks = B // tvp.BLOCK_B_MAX
    budget = B * C * H * H * 2 // (4 * tvp.PARTIAL_FRACTION)
    sh, sw = tvp.window_split(kh, kh, 14, 14, n_bblocks, True, n_bblocks * 14 * 14, budget,
                              block_m=tvp.BLOCK_M_MASK)
    assert kh % sh == 0 and kh % sw == 0
    programs = -(-(14 * sh * 14 * sw) // tvp.BLOCK_M_MASK) * n_bblocks
    assert programs >= H100_SMS
    assert sh * sw * n_bblocks * 14 * 14 <= budget
    # without a mask gradient every pixel is its own cell; a tiny budget allows no split at all
    assert tvp.window_split(kh, kh, 14, 14, n_bblocks, False, 1, 0) == (kh, kh)
    assert tvp.window_split(kh, kh, 14, 14, n_bblocks, True, 10**6, 10) == (1, 1)


def test_window_split_at_the_audit_shape_launches_a_full_wave(monkeypatch, tvp):
    """The launcher's own plan, recorded on meta tensors (no memory, no kernel)."""
    launches = _capture(monkeypatch, tvp._vp_bwd_kernel)
    from reprokernels.ops.visual_prompt import prepare

    x = torch.empty(256, 3, 224, 224, dtype=torch.float16, device="meta")
    delta = torch.empty(3, 224, 224, device="meta")
    mask = torch.empty(1, 1, 14, 14, device="meta")
    m4, mean, std, spec = prepare(x, delta, mask=mask, size=224)
    grad = torch.empty(256, 3, 224, 224, dtype=torch.float16, device="meta")
    _, dd, dm = tvp.visual_prompt_backward(grad, x, delta, m4, mean, std, spec, True, True, True)
    (launch,) = launches
    assert launch["grid"][0] >= H100_SMS and launch["grid"][1:] in ((), (1,), (1, 1))
    assert dd.shape == (3, 224, 224) and dd.dtype == torch.float32
    assert dm.shape == (1, 1, 14, 14) and dm.dtype == torch.float32


def _vp_grads(backend, x, delta, mask, **kw):
    xg = x.detach().clone().requires_grad_()
    dg = delta.detach().clone().requires_grad_()
    mg = mask.detach().clone().requires_grad_()
    out = rk.visual_prompt(xg, dg, mask=mg, backend=backend, **kw)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype))
    return out, xg.grad, dg.grad, mg.grad


@pytest.fixture
def force_split(monkeypatch, tvp):
    """Split every mask window as far as it goes (huge program target, unlimited partial budget)."""
    monkeypatch.setattr(tvp, "TARGET_PROGRAMS", 10**9)
    monkeypatch.setattr(tvp, "PARTIAL_FRACTION", 10**-9)


@pytest.mark.parametrize("mask_shape", [(1, 1, 3, 2), (1, 3, 3, 2), (5, 1, 3, 2), (5, 3, 1, 2)])
@pytest.mark.parametrize("per_sample_delta", [False, True])
def test_window_split_matches_the_reference(monkeypatch, tvp, force_split, mask_shape, per_sample_delta):
    """Odd sizes: 5 samples (two batch blocks of 4 with BLOCK_B 4), 3 channels, windows 3 x 5 or 9 x 5."""
    monkeypatch.setattr(tvp, "BLOCK_B_MAX", 4)
    seen = []
    plan = tvp.window_split
    monkeypatch.setattr(tvp, "window_split", lambda *a, **k: seen.append(plan(*a, **k)) or seen[-1])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 4, 7, generator=g)
    delta = torch.randn(*((5,) if per_sample_delta else ()), 3, 9, 10, generator=g)
    mask = torch.rand(mask_shape, generator=g)
    kw = dict(squash="sigmoid", clamp=(0.1, 0.9), mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25], resize=(5, 6))
    got = _vp_grads("triton", x, delta, mask, **kw)
    want = _vp_grads("reference", x, delta, mask, **kw)
    assert seen and seen[0][0] * seen[0][1] > 1
    for name, a, e in zip(("out", "dx", "ddelta", "dmask"), got, want, strict=True):
        assert a.dtype == e.dtype, name
        assert_close(a, e, scale=16, name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_split_mixed_precision(monkeypatch, tvp, force_split, dtype):
    """16-bit x with a float32 delta and mask: their gradients stay float32, against a float32 reference."""
    monkeypatch.setattr(tvp, "BLOCK_B_MAX", 2)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 8, 8, generator=g).to(dtype)
    delta, mask = torch.randn(3, 12, 12, generator=g), torch.rand(1, 1, 3, 4, generator=g)
    kw = dict(squash="tanh", mean=[0.48, 0.45, 0.4], std=[0.26, 0.26, 0.27])
    got = _vp_grads("triton", x, delta, mask, **kw)
    want = _vp_grads("reference", x.float(), delta, mask, **kw)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for name, a, e in zip(("out", "dx", "ddelta", "dmask"), got, want, strict=True):
        assert_close(a, e, dtype=dtype, scale=2 if name in ("out", "dx") else 8, name=name)


def test_window_split_is_deterministic(monkeypatch, tvp, force_split):
    monkeypatch.setattr(tvp, "BLOCK_B_MAX", 2)
    x, delta, mask = torch.rand(7, 2, 6, 6), torch.randn(2, 8, 8), torch.rand(1, 1, 2, 2)
    a = _vp_grads("triton", x, delta, mask, squash="sigmoid")
    b = _vp_grads("triton", x, delta, mask, squash="sigmoid")
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_window_split_with_an_empty_batch(tvp, force_split):
    x, delta, mask = torch.rand(0, 2, 3, 3), torch.randn(2, 4, 4), torch.rand(1, 1, 2, 2)
    _, _, dd, dm = _vp_grads("triton", x, delta, mask)
    assert torch.equal(dd, torch.zeros(2, 4, 4)) and torch.equal(dm, torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------------- visual_prompt: grid and int64 limits


def test_grid_1d_limit(tvp, tsp):
    for mod in (tvp, tsp):
        assert mod.grid_1d(2**31 - 1, "op") == (2**31 - 1,)
        assert mod.grid_1d(0, "op") == (1,)
        with pytest.raises(ValueError, match="op: 2147483648 programs exceed a CUDA grid"):
            mod.grid_1d(2**31, "op")


def test_visual_prompt_grids_use_axis_0_only(monkeypatch, tvp):
    """70000 samples x 1 channel would pass axis 1's 65535 if samples were not on axis 0."""
    launches = _capture(monkeypatch, tvp._vp_fwd_kernel)
    from reprokernels.ops.visual_prompt import prepare

    x = torch.empty(70000, 1, 2, 2, device="meta")
    delta = torch.empty(1, 4, 4, device="meta")
    _, mean, std, spec = prepare(x, delta)
    tvp.visual_prompt(x, delta, None, mean, std, spec)
    tvp.visual_prompt_backward(torch.empty(70000, 1, 4, 4, device="meta"), x, delta, None, mean, std, spec,
                               True, True, False)
    assert [ln["name"] for ln in launches] == ["_vp_fwd_kernel", "_vp_bwd_kernel"]
    for ln in launches:
        assert len(ln["grid"]) == 1 and ln["grid"][0] <= 2**31 - 1
    assert launches[0]["grid"][0] == 70000 * 1  # one 16-pixel block per (sample, channel)


def test_needs_idx64(tvp):
    assert not tvp.needs_idx64(((224, 224), (224, 1)), None)
    assert tvp.needs_idx64(((3, 2), (2**30, 2**30)))  # 2 * 2**30 + 2**30 >= 2**31
    assert not tvp.needs_idx64(((2, 2), (2**30 - 1, 1)))


def test_huge_pixel_strides_launch_the_int64_variant(monkeypatch, tvp):
    """An x whose pixel offsets pass 2**31 (a strided view of a big buffer): meta tensors, recorded launches."""
    launches = _capture(monkeypatch, tvp._vp_fwd_kernel)
    from reprokernels.ops.visual_prompt import prepare

    big = torch.empty_strided((2, 3, 4, 4), (48, 16, 2**30, 1), device="meta")
    small = torch.empty(2, 3, 4, 4, device="meta")
    delta = torch.empty(3, 6, 6, device="meta")
    for x in (small, big):
        _, mean, std, spec = prepare(x, delta)
        tvp.visual_prompt(x, delta, None, mean, std, spec)
        tvp.visual_prompt_backward(torch.empty(2, 3, 6, 6, device="meta"), x, delta, None, mean, std, spec,
                                   True, True, False)
    assert [ln["kwargs"]["IDX64"] for ln in launches] == [False, False, True, True]


@pytest.mark.parametrize("mask", ["canvas", "patch_per_sample"])
@pytest.mark.parametrize("resize", ["none", "bilinear", "nearest"])
def test_int64_variant_matches_the_reference(monkeypatch, tvp, mask, resize):
    """The IDX64 code path itself (int64 pixel offsets), forced at a small size."""
    monkeypatch.setattr(tvp, "needs_idx64", lambda *t: True)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 2, 5, 4, generator=g).transpose(2, 3)  # non-contiguous pixels
    delta = torch.randn(2, 8, 10, generator=g)
    m = torch.rand(3, 1, 4, 5, generator=g) if mask == "patch_per_sample" else torch.rand(1, 1, 8, 10, generator=g)
    kw = dict(squash="sigmoid", clamp=(0.1, 0.9))
    if resize != "none":
        kw.update(resize=(6, 7), resize_mode=resize)
    got = _vp_grads("triton", x, delta, m, **kw)
    want = _vp_grads("reference", x, delta, m, **kw)
    for name, a, e in zip(("out", "dx", "ddelta", "dmask"), got, want, strict=True):
        assert_close(a, e, scale=16, name=name)


# ---------------------------------------------------------------- soft_prompt_concat: batch-split prompt gradient


@pytest.mark.parametrize(("T", "dtype", "want_chunks"), [(1, torch.bfloat16, 4), (1, torch.float32, 4),
                                                        (4, torch.bfloat16, 1)])
def test_prompt_chunks_give_a_full_wave_at_the_audit_shape(tsp, T, dtype, want_chunks):
    """B=32 P=64 D=4096: 64 programs per (P, D) prompt without a split."""
    B, P, D = 32, 64, 4096
    chunk, n = tsp.prompt_chunks(B, T, P, D, dtype.itemsize)
    assert n == want_chunks and chunk * n >= B and chunk * (n - 1) < B
    programs = n * T * -(-P // tsp.BLOCK_P) * -(-D // 1024)
    assert programs >= H100_SMS
    # partials (written then read in float32) cost at most half of the gradient slice they reduce
    assert n == 1 or n * T * P * D * 8 <= B * P * D * dtype.itemsize // 2
    assert tsp.prompt_chunks(0, 1, P, D, 2) == (1, 1)


def _sp_grads(backend, prompt, **kw):
    p = prompt.detach().clone().requires_grad_()
    emb = kw.pop("inputs_embeds", None)
    e = emb.detach().clone().requires_grad_() if emb is not None else None
    out = rk.soft_prompt_concat(p, inputs_embeds=e, backend=backend, **kw).inputs_embeds
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype))
    return out, p.grad, (e.grad if e is not None else None)


@pytest.fixture
def force_chunks(monkeypatch, tsp):
    """Chunks of 2 rows whatever the size (huge program target, no minimum, no partial budget)."""
    real = tsp.prompt_chunks
    monkeypatch.setattr(tsp, "prompt_chunks", lambda B, T, P, D, itemsize: real(
        B, T, P, D, 10**6, target=10**9, min_chunk=2))


@pytest.mark.parametrize("table", [False, True])
@pytest.mark.parametrize("insert", [False, True])
@pytest.mark.parametrize("from_ids", [False, True])
def test_chunked_prompt_gradient_matches_the_reference(tsp, force_chunks, table, insert, from_ids):
    B, L, P, D, T = 7, 5, 3, 13, 3
    g = torch.Generator().manual_seed(4)
    prompt = torch.randn(*((T,) if table else ()), P, D, generator=g)
    kw: dict = dict(embed_scale=1.5)
    if from_ids:
        kw.update(input_ids=torch.randint(0, 17, (B, L), generator=g), embedding_weight=torch.randn(17, D))
    else:
        kw["inputs_embeds"] = torch.randn(B, L, D, generator=g)
    if table:
        kw["task_ids"] = torch.tensor([2, 0, 2, 2, 1, 0, 2], dtype=torch.int32)  # task 1 once, 2 over chunks
    if insert:
        kw["insert_at"] = torch.tensor([0, 5, 2, 1, 3, 4, 5])
    got = _sp_grads("triton", prompt, **dict(kw))
    want = _sp_grads("reference", prompt, **dict(kw))
    for name, a, e in zip(("out", "dprompt", "dembeds"), got, want, strict=True):
        if e is None:
            assert a is None
            continue
        assert a.dtype == e.dtype, name
        assert_close(a, e, scale=4, name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_prompt_gradient_mixed_precision(tsp, force_chunks, dtype):
    """16-bit tokens with a float32 prompt table: d prompt (a float32 master gradient) stays float32."""
    g = torch.Generator().manual_seed(5)
    prompt = torch.randn(2, 4, 24, generator=g)
    emb = torch.randn(9, 6, 24, generator=g)
    task_ids = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1])
    got = _sp_grads("triton", prompt, inputs_embeds=emb.to(dtype), task_ids=task_ids)
    # float32 reference on the same rounded tokens and the same rounded incoming gradient
    p = prompt.clone().requires_grad_()
    e = emb.to(dtype).float().requires_grad_()
    out = rk.soft_prompt_concat(p, inputs_embeds=e, task_ids=task_ids, backend="reference").inputs_embeds
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).float())
    assert got[1].dtype == torch.float32 and got[2].dtype == dtype
    assert_close(got[0], out, dtype=dtype, name="out")
    assert_close(got[1], p.grad, dtype=dtype, scale=4, name="dprompt")
    assert_close(got[2], e.grad, dtype=dtype, name="dembeds")


def test_chunked_prompt_gradient_is_deterministic(tsp, force_chunks):
    prompt, emb = torch.randn(2, 3, 10), torch.randn(11, 4, 10)
    task_ids = torch.randint(0, 2, (11,), generator=torch.Generator().manual_seed(6))
    a = _sp_grads("triton", prompt, inputs_embeds=emb, task_ids=task_ids)
    b = _sp_grads("triton", prompt, inputs_embeds=emb, task_ids=task_ids)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_chunked_prompt_gradient_empty_batch(tsp, force_chunks):
    _, dp, de = _sp_grads("triton", torch.randn(2, 3, 5), inputs_embeds=torch.randn(0, 4, 5),
                          task_ids=torch.zeros(0, dtype=torch.long))
    assert torch.equal(dp, torch.zeros(2, 3, 5)) and de.shape == (0, 4, 5)


# ------------------------------------------------------------------------- soft_prompt_concat: grid limits


def test_long_sequence_grid_stays_within_cuda_axis_limits(monkeypatch, tsp):
    """P + L = 1,000,064 rows: 125,008 row blocks, past axis 1's 65535 if they were there (meta tensors)."""
    launches = _capture(monkeypatch, tsp._sp_fwd_kernel)
    B, L, P, D = 2, 1_000_000, 64, 8
    prompt = torch.empty(P, D, device="meta")
    embeds = torch.empty(B, L, D, device="meta")
    out = tsp.soft_prompt_concat(prompt, None, embeds, None, None, None, 1.0)
    tsp.soft_prompt_concat_backward(torch.empty(out.shape, device="meta"), prompt, None, None, L, 1.0, True, True)
    assert [ln["name"] for ln in launches] == ["_sp_fwd_kernel", "_sp_bwd_prompt_kernel", "_sp_bwd_embeds_kernel"]
    for ln in launches:
        g = ln["grid"]
        assert g[0] <= 2**31 - 1 and all(a <= 65535 for a in g[1:]), ln["name"]
    assert launches[0]["grid"][0] == B * -(-(P + L) // 8)


def test_grid_2d_refuses_too_many_feature_blocks(tsp):
    assert tsp.grid_2d(10, 65535, "op") == (10, 65535)
    with pytest.raises(ValueError, match="op: 65536 feature blocks exceed"):
        tsp.grid_2d(10, 65536, "op")
