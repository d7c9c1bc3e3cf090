"""The cpu backend's direct calls (reprokernels/_apply.py: ``direct_call``, ``run_function``) and soft_prompt's
per-token layout kernel: the same values as the registered-op path and the torch layout code they bypass."""

from __future__ import annotations

import pytest
import torch

import reprokernels as rk
from reprokernels import _cpu
from reprokernels.ops import soft_prompt as sp_ops

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="the CPU module is not built")

MASK_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.float32]
LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


def _layout_inputs(B: int, L: int, mask_dtype: torch.dtype, labels_dtype: torch.dtype, strided: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, 2, (B, 2 * L if strided else L), generator=g)
    mask[:, 0] = 3  # a non-zero that is not 1: kept as it is, counted as kept
    labels = torch.randint(-100, 100, (B, 2 * L if strided else L), generator=g)
    if strided:
        mask, labels = mask[:, ::2], labels[:, ::2]
    return mask.to(mask_dtype), labels.to(labels_dtype)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("labels_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("insert", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_layout_matches_the_torch_code(mask_dtype, labels_dtype, insert, strided):
    B, L, P, D = 5, 9, 3, 4
    mask, labels = _layout_inputs(B, L, mask_dtype, labels_dtype, strided, seed=int(insert) + 2 * int(strided))
    insert_at = torch.tensor([0, 9, 4, 1, 7], dtype=torch.int16) if insert else None
    prompt = torch.randn(P, D)
    embeds = torch.randn(B, L, D)
    kw = dict(inputs_embeds=embeds, attention_mask=mask, labels=labels, insert_at=insert_at)
    got = rk.soft_prompt_concat(prompt, backend="cpu", **kw)  # the layout kernel where the dtypes allow
    want = rk.soft_prompt_concat(prompt, backend="reference", **kw)  # torch's cat/where/cumsum
    for name in ("inputs_embeds", "attention_mask", "labels", "position_ids"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("which", ["mask", "labels"])
def test_layout_with_one_of_mask_and_labels(which):
    mask, labels = _layout_inputs(3, 6, torch.int64, torch.int64, False, seed=5)
    kw = dict(attention_mask=mask) if which == "mask" else dict(labels=labels)
    prompt, embeds = torch.randn(2, 4), torch.randn(3, 6, 4)
    got = rk.soft_prompt_concat(prompt, inputs_embeds=embeds, backend="cpu", **kw)
    want = rk.soft_prompt_concat(prompt, inputs_embeds=embeds, backend="reference", **kw)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("L", [0, 1])
def test_layout_degenerate_lengths(L):
    prompt, embeds = torch.randn(3, 4), torch.randn(2, L, 4)
    mask, labels = torch.ones(2, L, dtype=torch.long), torch.zeros(2, L, dtype=torch.long)
    kw = dict(inputs_embeds=embeds, attention_mask=mask, labels=labels, insert_at=torch.full((2,), L))
    got = rk.soft_prompt_concat(prompt, backend="cpu", **kw)
    want = rk.soft_prompt_concat(prompt, backend="reference", **kw)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_layout_kernel_is_used_and_float_masks_are_not():
    """The kernel serves integer and bool masks; a float mask goes to the torch code."""
    calls = []
    real = _cpu.run

    def spy(name, p):
        calls.append(name)
        real(name, p)

    prompt, embeds = torch.randn(2, 4), torch.randn(3, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.long)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_cpu, "run", spy)
        rk.soft_prompt_concat(prompt, inputs_embeds=embeds, attention_mask=mask, labels=mask, backend="cpu")
        assert "soft_prompt_layout" in calls
        calls.clear()
        rk.soft_prompt_concat(prompt, inputs_embeds=embeds, attention_mask=mask.float(), backend="cpu")
        assert "soft_prompt_layout" not in calls


def _ops_called(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("reprokernels::")}


def test_profiler_sees_the_registered_ops():
    """Under the profiler the Functions call the registered ops, so profiles name them; both paths agree."""
    prompt = torch.randn(2, 4, requires_grad=True)
    embeds = torch.randn(3, 5, 4)

    def step():
        out = rk.soft_prompt_concat(prompt, inputs_embeds=embeds, backend="cpu").inputs_embeds
        return torch.autograd.grad(out.square().sum(), prompt)[0]

    names = _ops_called(step)
    assert {"reprokernels::soft_prompt_concat_fwd", "reprokernels::soft_prompt_concat_bwd"} <= names
    assert torch.equal(step(), torch.autograd.grad(
        rk.soft_prompt_concat(prompt, inputs_embeds=embeds, backend="cpu").inputs_embeds.square().sum(), prompt)[0])


def test_direct_call_only_in_plain_eager():
    from reprokernels._apply import direct_call

    t = torch.randn(3)
    assert direct_call("cpu", t)
    assert not direct_call("reference", t)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert not direct_call("cpu", t)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not direct_call("cpu", torch.empty(3))


def test_no_grad_forward_skips_the_function_and_matches():
    """No input needing a gradient: the backend's forward runs alone (no autograd node), same values."""
    prompt = torch.randn(2, 4, requires_grad=True)
    embeds = torch.randn(3, 5, 4)
    with torch.no_grad():
        a = rk.soft_prompt_concat(prompt, inputs_embeds=embeds, backend="cpu").inputs_embeds
    b = rk.soft_prompt_concat(prompt, inputs_embeds=embeds, backend="cpu").inputs_embeds
    assert a.grad_fn is None and b.grad_fn is not None
    assert torch.equal(a, b)
    logits = torch.randn(4, 7)
    mapping = torch.tensor([[1, 2], [6, -1]])
    out = rk.label_map(logits, mapping, input="log_probs", backend="cpu")
    assert out.grad_fn is None
    assert torch.equal(out, rk.label_map(logits.requires_grad_(), mapping, input="log_probs", backend="cpu").detach())


def test_histogram_direct_call_bumps_the_version():
    out = torch.zeros(7, 3)
    before = out._version
    rk.label_histogram(torch.randn(5, 7), torch.tensor([0, 2, 1, 1, 0]), 7, 3, out=out, backend="cpu")
    assert out._version > before and out.sum() == 5


def test_kernel_prompt_rounding_goes_through_backend_module(monkeypatch):
    """The registered impls find their backend through backend_module (what the CUDA emulation tests patch)."""
    seen = []
    real = sp_ops.backend_module

    def spy(modules, backend):
        seen.append(backend)
        return real(modules, backend)

    monkeypatch.setattr(sp_ops, "backend_module", spy)
    rk.soft_prompt_concat(torch.randn(2, 4), inputs_embeds=torch.randn(1, 3, 4), backend="cpu")
    assert seen == ["cpu"]


def test_forward_ad_is_refused_not_dropped():
    """Inside a forward-AD dual level the Function runs (it has no jvp and says so): a tangent is never lost."""
    import torch.autograd.forward_ad as fwAD

    x, tangent = torch.randn(4, 7), torch.randn(4, 7)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)
        with pytest.raises(RuntimeError):
            rk.label_map(dual, torch.tensor([[1, 2]]), input="log_probs", backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", ["1d", "col", "int32", "strided", "batched"])
def test_one_to_one_auto_gather_matches_the_reference(dtype, shape):
    """auto's index_select path (label_map._column_gather): the reference's values and gradient bit for bit."""
    g = torch.Generator().manual_seed(7)
    k_src = 13
    lead = (3, 5) if shape == "batched" else (6,)
    x = torch.randn(*lead, k_src, generator=g).to(dtype).requires_grad_()
    m = torch.tensor([12, 0, 4, 4, 7])  # a repeated source: its gradient is a sum
    if shape == "col":
        m = m[:, None]
    elif shape == "int32":
        m = m.to(torch.int32)
    elif shape == "strided":
        m = torch.stack([m, m], 1)[:, 1]
    before = m.clone()
    with torch.no_grad():  # the path serves no-grad calls as well
        assert torch.equal(rk.label_map(x, m), rk.label_map(x, m, backend="reference"))
    got, want = rk.label_map(x, m), rk.label_map(x, m, backend="reference")
    assert got.shape == want.shape == (*lead, 5) and got.dtype == want.dtype and torch.equal(got, want)
    dy = torch.randn(got.shape, generator=g).to(dtype)
    assert torch.equal(torch.autograd.grad(got, x, dy)[0], torch.autograd.grad(want, x, dy)[0])
    assert torch.equal(m, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # (16-bit with grad: the advanced-index branch)
def test_one_to_one_auto_gather_falls_back_on_minus_one_and_names_bad_indices(dtype):
    x = torch.randn(4, 6).to(dtype).requires_grad_()
    m = torch.tensor([5, -1, 2])  # -1: no source, a zero column (index_select refuses it; the checked path serves)
    got = rk.label_map(x, m)
    assert torch.equal(got, rk.label_map(x, m, backend="reference")) and torch.all(got[:, 1] == 0)
    for bad in (torch.tensor([6]), torch.tensor([-2]), torch.tensor([[0], [6]], dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"mapping: expected values in \[-1, 5\]"):
            rk.label_map(x, bad)
    with pytest.raises(ValueError, match="mapping: expected a tensor on cpu"):
        rk.label_map(x, torch.tensor([1], device="meta"))


# ---------------------------------------------------------------- index ranges checked in the kernel launch


def _bad_soft_prompt_call(which: str, index_dtype: torch.dtype, grad: bool):
    """A cpu soft_prompt call with one index tensor out of range (the others valid), and the message it must
    raise. Index tensors of any integer dtype, strided."""
    B, L, P, D, V, T = 3, 5, 2, 4, 11, 3
    ids = torch.randint(0, V, (B, 2 * L))[:, ::2].to(index_dtype)
    task = torch.tensor([0, 2, 1], dtype=index_dtype)
    insert = torch.tensor([0, 5, 2], dtype=index_dtype)
    message = {"input_ids": rf"input_ids: expected values in \[0, {V - 1}\] \(rows of embedding_weight\), got 11",
               "task_ids": rf"task_ids: expected values in \[0, {T - 1}\] \(tasks of the prompt table\), got 3",
               "insert_at": rf"insert_at: expected values in \[0, {L}\] \(tokens kept before the prompt\), got 6"}
    if which == "input_ids":
        ids[1, 3] = V
    elif which == "task_ids":
        task[2] = T
    else:
        insert[1] = L + 1
    prompt = torch.randn(T, P, D, requires_grad=grad)
    kw = dict(input_ids=ids, embedding_weight=torch.randn(V, D), task_ids=task, insert_at=insert, backend="cpu")
    return (lambda: rk.soft_prompt_concat(prompt, **kw)), message[which]


@pytest.mark.parametrize("which", ["input_ids", "task_ids", "insert_at"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("path", ["direct", "function", "registered"])
def test_soft_prompt_kernel_names_an_index_out_of_range(which, index_dtype, path):
    """The cpu kernel checks the index tensors in its own launch (the op skips its separate pass); a bad value is
    still the op's named ValueError with the value, on the direct call, through the Function (a gradient), and
    through the registered op (the profiler on)."""
    call, message = _bad_soft_prompt_call(which, index_dtype, grad=path != "direct")
    if path == "registered":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]), \
                pytest.raises(ValueError, match=message):
            call()
    else:
        with pytest.raises(ValueError, match=message):
            call()


def test_soft_prompt_launcher_refuses_out_of_range_indices_itself():
    """What a compiled graph calls: the launcher, whose kernel refuses the call with IndexRangeError (a
    ValueError naming the tensor) instead of clamping the index."""
    from reprokernels.cpu import soft_prompt as cpu_sp

    ids = torch.tensor([[0, 1, 7]])
    with pytest.raises(_cpu.IndexRangeError, match="input_ids: holds a value outside its valid range"):
        cpu_sp.soft_prompt_concat(torch.randn(2, 4), ids, None, torch.randn(7, 4), None, None, 1.0)
    with pytest.raises(_cpu.IndexRangeError, match="task_ids"):
        cpu_sp.soft_prompt_concat(torch.randn(2, 2, 4), ids.clamp(max=6), None, torch.randn(7, 4),
                                  torch.tensor([-1]), None, 1.0)


@pytest.mark.parametrize("mapping", [torch.tensor([[3, 10]]), torch.tensor([[3, -2], [1, 1]]),
                                     torch.tensor([[4, 10]], dtype=torch.int8)])
@pytest.mark.parametrize("path", ["direct", "function", "registered"])
def test_label_map_kernel_names_a_source_out_of_range(mapping, path):
    x = torch.randn(4, 10, requires_grad=path != "direct")
    bad = int(mapping[(mapping < -1) | (mapping > 9)][0])
    message = rf"mapping: expected values in \[-1, 9\] \(source indices, or -1 for none\), got {bad}"
    if path == "registered":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]), \
                pytest.raises(ValueError, match=message):
            rk.label_map(x, mapping, input="probs", backend="cpu")
    else:
        with pytest.raises(ValueError, match=message):
            rk.label_map(x, mapping, input="probs", backend="cpu")
    from reprokernels.cpu import label_map as cpu_lm

    with pytest.raises(_cpu.IndexRangeError, match="mapping: holds a value outside"):
        cpu_lm.label_map(x.detach(), mapping.to(torch.int64), "mean", "logits")


def test_cpu_route_reads_the_indices_once(monkeypatch):
    """On the cpu route the op leaves the index values to the kernel's launch: no separate Python range pass
    (its cost, 5-8 us a tensor, was the point), while other routes and empty outputs keep it."""
    from reprokernels.ops import label_map as lm_ops

    calls = []

    def spy(t, lo, hi, name, what=""):
        calls.append(name)

    monkeypatch.setattr(sp_ops, "check_index_range", spy)
    monkeypatch.setattr(lm_ops, "check_index_range", spy)
    kw = dict(input_ids=torch.tensor([[1, 2]]), embedding_weight=torch.randn(10, 4),
              task_ids=torch.tensor([1]), insert_at=torch.tensor([1]))
    rk.soft_prompt_concat(torch.randn(2, 3, 4), backend="cpu", **kw)
    rk.label_map(torch.randn(2, 10), torch.tensor([[1, 2]]), backend="cpu")
    assert calls == []
    rk.soft_prompt_concat(torch.randn(2, 3, 4), backend="reference", **kw)
    rk.soft_prompt_concat(torch.randn(2, 3, 0), backend="cpu", **{**kw, "embedding_weight": torch.randn(10, 0)})
    rk.label_map(torch.randn(2, 10), torch.tensor([[1, 2]]), backend="reference")
    rk.label_map(torch.randn(0, 10), torch.tensor([[1, 2]]), backend="cpu")
    assert calls == ["input_ids", "task_ids", "insert_at"] * 2 + ["mapping"] * 2
