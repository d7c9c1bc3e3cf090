"""soft_prompt_concat: the reference's semantics, the Triton kernels against it, registration, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reprokernels as rk
from reprokernels.reference import soft_prompt as ref
from tests.utils import as_layout, assert_close, grads_match_compiled, traffic_counter

triton_backends = ["triton"] if rk._backend.triton_installed() else []
BACKENDS = ["reference", *triton_backends]


def _grad_like(t: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)).to(t.dtype)


def _run(backend, prompt, *, inputs_embeds=None, **kw):
    """Forward + backward with a fixed grad: (PromptedInputs, d prompt, d inputs_embeds)."""
    p = prompt.detach().clone().requires_grad_(True)
    e = inputs_embeds.detach().clone().requires_grad_(True) if inputs_embeds is not None else None
    res = rk.soft_prompt_concat(p, inputs_embeds=e, backend=backend, **kw)
    res.inputs_embeds.backward(_grad_like(res.inputs_embeds))
    return res, p.grad, (e.grad if e is not None else None)


def _peft_style(prompt, tokens, attention_mask, labels):
    """What PEFT does for prompt tuning (prompt first, one task): repeat + cat, three times."""
    B, P = tokens.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.unsqueeze(0).repeat(B, 1, 1).to(tokens.dtype), tokens], dim=1)
    mask = torch.cat([torch.ones(B, P, dtype=attention_mask.dtype), attention_mask], dim=1)
    lab = torch.cat([torch.full((B, P), -100, dtype=labels.dtype), labels], dim=1)
    return embeds, mask, lab


# ---------------------------------------------------------------- semantics


def test_matches_the_peft_recipe():
    emb = torch.nn.Embedding(50, 12)
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    labels = torch.randint(0, 50, (3, 7))
    prompt = torch.randn(4, 12)
    out = rk.soft_prompt_concat(prompt, input_ids=ids, embedding_weight=emb.weight, attention_mask=mask,
                                labels=labels, backend="reference")
    want = _peft_style(prompt, emb(ids), mask, labels)
    assert torch.equal(out.inputs_embeds, want[0])
    assert torch.equal(out.attention_mask, want[1])
    assert torch.equal(out.labels, want[2])


def test_insert_at_and_position_ids_for_left_and_right_padding():
    P, L = 2, 4
    tokens = torch.arange(2 * L, dtype=torch.float32).view(2, L, 1)
    prompt = torch.tensor([[100.0], [101.0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])  # left padded, right padded
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = rk.soft_prompt_concat(prompt, inputs_embeds=tokens, attention_mask=mask, labels=labels,
                                insert_at=torch.tensor([3, 1]), backend="reference")
    assert out.inputs_embeds[..., 0].tolist() == [[0, 1, 2, 100, 101, 3], [4, 100, 101, 5, 6, 7]]
    assert out.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert out.labels.tolist() == [[5, 6, 7, -100, -100, 8], [9, -100, -100, 10, 11, 12]]
    assert out.position_ids.tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0]]
    assert P == 2


def test_no_mask_means_no_position_ids():
    out = rk.soft_prompt_concat(torch.randn(2, 3), inputs_embeds=torch.randn(1, 4, 3))
    assert out.attention_mask is None and out.labels is None and out.position_ids is None


def test_reference_backward_is_autograd_of_the_forward():
    torch.manual_seed(0)
    table, tokens = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(5, 6, 5, dtype=torch.float64)
    task_ids, insert_at = torch.tensor([2, 0, 2, 1, 2]), torch.tensor([0, 6, 3, 1, 2])
    p, e = table.clone().requires_grad_(), tokens.clone().requires_grad_()
    out = ref.soft_prompt_concat(p, None, e, None, task_ids, insert_at, 1.5)
    g = _grad_like(out)
    want = torch.autograd.grad(out, (p, e), g)
    got = ref.soft_prompt_concat_backward(g, table, task_ids, insert_at, 6, 1.5, True, True)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


# ---------------------------------------------------------------- Triton against the reference


@st.composite
def configs(draw):
    B, L, P = draw(st.integers(0, 4)), draw(st.integers(0, 7)), draw(st.integers(0, 5))
    D = draw(st.sampled_from([1, 3, 8, 13, 40, 67]))
    T = draw(st.sampled_from([None, 1, 3]))
    return dict(B=B, L=L, P=P, D=D, T=T, V=draw(st.integers(1, 30)), from_ids=draw(st.booleans()),
                insert=draw(st.booleans()), scale=draw(st.sampled_from([None, 1.7])),
                layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])))


def _inputs(cfg, g, dtype=torch.float32, prompt_dtype=torch.float32):
    B, L, P, D, T, V = (cfg[k] for k in ("B", "L", "P", "D", "T", "V"))
    prompt = as_layout(torch.randn(*((T,) if T else ()), P, D, generator=g).to(prompt_dtype), cfg["layout"])
    kw: dict = dict(embed_scale=cfg["scale"])
    emb = None
    if cfg["from_ids"]:
        emb = as_layout(torch.randn(V, D, generator=g).to(dtype), cfg["layout"]).requires_grad_(True)
        kw.update(input_ids=torch.randint(0, V, (B, L), generator=g), embedding_weight=emb)
    else:
        kw["inputs_embeds"] = as_layout(torch.randn(B, L, D, generator=g).to(dtype), cfg["layout"])
    if T:
        kw["task_ids"] = torch.randint(0, T, (B,), generator=g)
    if cfg["insert"]:
        kw["insert_at"] = torch.randint(0, L + 1, (B,), generator=g)
    return prompt, kw, emb


@pytest.mark.parametrize("backend", triton_backends)
@settings(max_examples=40)
@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_triton_matches_reference(backend, cfg, seed):
    prompt, kw, emb = _inputs(cfg, torch.Generator().manual_seed(seed))
    want = _run("reference", prompt, **kw)
    got = _run(backend, prompt, **kw)
    assert torch.equal(got[0].inputs_embeds, want[0].inputs_embeds)  # a copy: bit-identical in float32
    assert_close(got[1], want[1], name="dprompt")
    if want[2] is not None:
        assert_close(got[2], want[2], name="dembeds")
    if emb is not None:
        assert emb.grad is None


@pytest.mark.parametrize("backend", triton_backends)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tokens_with_float32_prompt(backend, dtype):
    cfg = dict(B=3, L=5, P=4, D=24, T=2, V=17, from_ids=True, insert=True, scale=2.0, layout="contiguous")
    prompt, kw, _ = _inputs(cfg, torch.Generator().manual_seed(0), dtype=dtype)
    want = _run("reference", prompt, **kw)
    got = _run(backend, prompt, **kw)
    assert got[0].inputs_embeds.dtype == dtype and got[1].dtype == torch.float32
    # Within one ulp, not bit-equal: the interpreter converts float32 -> bfloat16 by truncation, GPUs and
    # torch round to nearest even (the float32 prompt rows are converted; token rows are copied exactly).
    assert_close(got[0].inputs_embeds, want[0].inputs_embeds, dtype=dtype)
    if dtype == torch.float16:
        assert torch.equal(got[0].inputs_embeds, want[0].inputs_embeds)
    assert_close(got[1], want[1], dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_gradient_is_index_add_of_the_prompt_slice(backend):
    g = torch.Generator().manual_seed(5)
    T, P, D, B, L = 3, 4, 6, 7, 5
    table, tokens = torch.randn(T, P, D, generator=g), torch.randn(B, L, D, generator=g)
    task_ids, insert_at = torch.randint(0, T, (B,), generator=g), torch.randint(0, L + 1, (B,), generator=g)
    res, dprompt, _ = _run(backend, table, inputs_embeds=tokens, task_ids=task_ids, insert_at=insert_at)
    grad = _grad_like(res.inputs_embeds)
    slices = torch.stack([grad[b, int(s):int(s) + P] for b, s in enumerate(insert_at)])
    assert_close(dprompt, torch.zeros(T, P, D).index_add_(0, task_ids, slices))
    # the single-prompt form is the same sum over every row
    res, dprompt, _ = _run(backend, table[0], inputs_embeds=tokens, insert_at=insert_at)
    assert_close(dprompt, slices.sum(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_table_is_read_only_and_gets_no_gradient(backend):
    emb = torch.nn.Embedding(20, 8)
    before = emb.weight.detach().clone()
    prompt = torch.randn(3, 8, requires_grad=True)
    out = rk.soft_prompt_concat(prompt, input_ids=torch.randint(0, 20, (4, 5)), embedding_weight=emb.weight,
                                embed_scale=3.0, backend=backend)
    out.inputs_embeds.sum().backward()
    assert emb.weight.grad is None
    assert torch.equal(emb.weight, before)
    assert prompt.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance(backend):
    """A row's output and its prompt-gradient contribution do not depend on the other rows."""
    g = torch.Generator().manual_seed(2)
    table, tokens = torch.randn(2, 3, 5, generator=g), torch.randn(4, 6, 5, generator=g)
    task_ids, insert_at = torch.tensor([1, 0, 1, 1]), torch.tensor([0, 2, 6, 3])
    full = rk.soft_prompt_concat(table, inputs_embeds=tokens, task_ids=task_ids, insert_at=insert_at,
                                 backend=backend).inputs_embeds
    for b in range(4):
        p = table.clone().requires_grad_()
        one = rk.soft_prompt_concat(p, inputs_embeds=tokens[b:b + 1], task_ids=task_ids[b:b + 1],
                                    insert_at=insert_at[b:b + 1], backend=backend).inputs_embeds
        assert torch.equal(one[0], full[b])
        one.backward(torch.ones_like(one))
        assert torch.equal(p.grad[1 - task_ids[b]], torch.zeros(3, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_sizes(backend):
    tokens = torch.randn(2, 4, 3)
    out = _run(backend, torch.randn(0, 3), inputs_embeds=tokens)  # P = 0: the embeddings themselves
    assert torch.equal(out[0].inputs_embeds, tokens) and out[1].shape == (0, 3)
    prompt = torch.randn(5, 3)
    out = _run(backend, prompt, inputs_embeds=torch.randn(2, 0, 3))  # L = 0: the prompt rows
    assert torch.equal(out[0].inputs_embeds, prompt.expand(2, 5, 3))
    out = _run(backend, prompt, inputs_embeds=torch.randn(0, 4, 3))  # B = 0
    assert out[0].inputs_embeds.shape == (0, 9, 3) and torch.equal(out[1], torch.zeros(5, 3))


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    prompt, ids, emb = torch.randn(2, 3, 6), torch.randint(0, 9, (4, 5)), torch.randn(9, 6)
    task_ids, insert_at = torch.tensor([1, 0, 1, 1]), torch.tensor([0, 5, 2, 1])
    torch.library.opcheck(torch.ops.reprokernels.soft_prompt_concat_fwd,
                          (prompt, ids, None, emb, task_ids, insert_at, 1.5, backend))
    torch.library.opcheck(torch.ops.reprokernels.soft_prompt_concat_fwd,
                          (prompt[0], None, torch.randn(4, 5, 6), None, None, None, 1.0, backend))
    grad = torch.randn(4, 8, 6)
    torch.library.opcheck(torch.ops.reprokernels.soft_prompt_concat_bwd,
                          (grad, prompt, task_ids, insert_at, 5, 1.5, [True, True], backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    emb, prompt = torch.randn(11, 6), torch.randn(3, 6, requires_grad=True)
    ids, mask = torch.randint(0, 11, (2, 4)), torch.ones(2, 4, dtype=torch.long)

    def step(prompt):
        out = rk.soft_prompt_concat(prompt, input_ids=ids, embedding_weight=emb, attention_mask=mask,
                                    backend=backend)
        return (out.inputs_embeds ** 2).sum() + out.position_ids.sum()

    grads_match_compiled(step, prompt)


def test_torch_export():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.prompt = torch.nn.Parameter(torch.randn(3, 6))
            self.register_buffer("table", torch.randn(11, 6))

        def forward(self, ids):
            return rk.soft_prompt_concat(self.prompt, input_ids=ids, embedding_weight=self.table,
                                         backend="reference").inputs_embeds

    m, ids = M(), torch.randint(0, 11, (2, 4))
    ep = torch.export.export(m, (ids,))
    assert "soft_prompt_concat_fwd" in str(ep.graph)
    assert_close(ep.module()(ids), m(ids))


def test_triton_traffic_is_one_pass():
    """Forward reads each gathered row and the prompt once and writes the output once."""
    B, L, P, D, V = 4, 6, 3, 32, 100
    emb, prompt = torch.randn(V, D), torch.randn(P, D)
    ids = torch.stack([torch.randperm(V)[:L] for _ in range(B)])  # distinct ids: no row is legitimately re-read
    with traffic_counter() as t:
        out = rk.soft_prompt_concat(prompt, input_ids=ids, embedding_weight=emb, backend="triton").inputs_embeds
    assert t.stored == t.stored_unique == out.numel() * 4
    rows = torch.unique(ids).numel()
    assert t.loaded_unique == rows * D * 4 + P * D * 4 + ids.numel() * 8


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(input_ids=torch.tensor([[0, 10]])), ValueError, r"input_ids: expected values in \[0, 9\].*got 10"),
        (dict(input_ids=torch.tensor([[-1, 0]])), ValueError, r"input_ids: expected values in \[0, 9\].*got -1"),
        (dict(input_ids=torch.tensor([[0.0, 1.0]])), TypeError, "input_ids: expected an integer tensor"),
        (dict(prompt=torch.randn(2, 3, 4), task_ids=torch.tensor([2])), ValueError,
         r"task_ids: expected values in \[0, 1\] \(tasks of the prompt table\), got 2"),
        (dict(prompt=torch.randn(2, 3, 4)), ValueError, "task_ids: a .T, P, D. prompt table needs task_ids"),
        (dict(task_ids=torch.tensor([0])), ValueError, "task_ids: only used with a .T, P, D. prompt table"),
        (dict(insert_at=torch.tensor([3])), ValueError, r"insert_at: expected values in \[0, 2\]"),
        (dict(insert_at=torch.tensor([0, 1])), ValueError, r"insert_at: expected shape \(1,\), got \(2,\)"),
        (dict(embedding_weight=torch.randn(10, 5)), ValueError, r"embedding_weight: expected \(V, D=4\)"),
        (dict(embedding_weight=None), ValueError, "embedding_weight: input_ids need the"),
        (dict(inputs_embeds=torch.randn(1, 2, 4)), ValueError, "input_ids/inputs_embeds: expected exactly one"),
        (dict(attention_mask=torch.ones(1, 3)), ValueError, r"attention_mask: expected shape \(B=1, L=2\)"),
        (dict(labels=torch.ones(1, 2)), TypeError, "labels: expected an integer tensor"),
        (dict(prompt=torch.randn(4)), ValueError, r"prompt: expected a 2-D or 3-D tensor \(P, D\) or \(T, P, D\)"),
        (dict(prompt=torch.ones(3, 4, dtype=torch.long)), TypeError, "prompt: expected a floating dtype"),
        (dict(backend="fast"), ValueError, "backend: expected one of"),
    ],
)
def test_bad_input_errors(kwargs, error, message):
    args = dict(prompt=torch.randn(3, 4), input_ids=torch.tensor([[1, 2]]), embedding_weight=torch.randn(10, 4))
    args.update(kwargs)
    prompt = args.pop("prompt")
    with pytest.raises(error, match=message):
        rk.soft_prompt_concat(prompt, **args)


def test_cuda_backend_refuses_cpu_tensors():
    with pytest.raises(rk.BackendUnavailableError, match="needs CUDA tensors"):
        rk.soft_prompt_concat(torch.randn(3, 4), inputs_embeds=torch.randn(1, 2, 4), backend="cuda")
