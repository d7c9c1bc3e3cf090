"""reprokernels.nn SoftPrompt / PromptTunedModel against PEFT's recipe, written here in plain eager PyTorch.

The hand-written path follows PEFT's ``PeftModelForCausalLM.forward`` for prompt tuning: the embedding
lookup, ``prompt.repeat(B, 1, 1)`` (a table indexed by task for multi-task batches), ``.to(embeds.dtype)``,
``torch.cat`` of prompt and tokens, a ones-prefix on the attention mask and a -100 prefix on the labels.
The modules must produce the same tensors (and the same prompt gradients) through the fused op.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reprokernels.nn import PromptEncoder, PromptTunedModel, SoftPrompt
from tests.utils import assert_close, triton_param

BACKENDS = ["reference", triton_param("soft_prompt")]


@pytest.fixture(autouse=True)
def _one_thread():
    """Every tensor here is tiny: one intra-op thread. On a loaded machine, OpenMP threads contending for
    cores made these tests 8x slower (58 s vs 7 s on 2 cores); results do not depend on it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ------------------------------------------------------------------------------------------ eager baseline


def peft_eager(prompt: torch.Tensor, weight: torch.Tensor | None, input_ids: torch.Tensor | None,
               *, inputs_embeds: torch.Tensor | None = None, task_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
    """(inputs_embeds, attention_mask, labels) as PEFT builds them for prompt tuning."""
    embeds = F.embedding(input_ids, weight) if inputs_embeds is None else inputs_embeds
    B = embeds.shape[0]
    P = prompt.shape[-2]
    prompts = prompt.unsqueeze(0).repeat(B, 1, 1) if prompt.dim() == 2 else prompt[task_ids]
    embeds = torch.cat((prompts.to(embeds.dtype), embeds), dim=1)
    mask = None if attention_mask is None else torch.cat(
        (torch.ones(B, P, dtype=attention_mask.dtype), attention_mask), dim=1)
    lab = None if labels is None else torch.cat((torch.full((B, P), -100, dtype=labels.dtype), labels), dim=1)
    return embeds, mask, lab


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP (single head), padded keys masked out."""

    def __init__(self, D: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=keep))
        return h + self.mlp(self.ln2(h))


class TinyDecoder(nn.Module):
    """A decoder-only LM in plain torch: embedding, two blocks, tied LM head; HF-style forward."""

    def __init__(self, V: int = 29, D: int = 16, with_getter: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList([Block(D), Block(D)])
        self.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as GPT-2 (and the logits then span a useful range)
        self.with_getter = with_getter

    def get_input_embeddings(self) -> nn.Module | None:
        return self.embed if self.with_getter else None

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None) -> dict:
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        n = h.shape[1]
        keep = torch.ones(n, n, dtype=torch.bool).tril().unsqueeze(0)
        if attention_mask is not None:
            keep = keep & attention_mask.bool()[:, None, :]
        for block in self.blocks:
            h = block(h, keep)
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return {"loss": loss, "logits": logits}


def _batch(B: int, L: int, V: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, L - 2:] = 0  # right padding in one row
    labels = torch.randint(0, V, (B, L), generator=g).masked_fill(mask == 0, -100)
    return ids, mask, labels


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


# ------------------------------------------------------------------------------------------------- inits


@pytest.mark.parametrize("T", [1, 3])
def test_init_random_is_uniform_half(T: int) -> None:
    sp = SoftPrompt(50, 40, num_tasks=T)
    shape = (50, 40) if T == 1 else (T, 50, 40)
    assert tuple(sp.prompt.shape) == shape and sp.prompt.dtype == torch.float32 and sp.prompt.requires_grad
    lo, hi = float(sp.prompt.detach().min()), float(sp.prompt.detach().max())
    assert -0.5 <= lo < -0.45 and 0.45 < hi <= 0.5
    assert sp.num_parameters == sp.prompt.numel()
    normal = SoftPrompt(50, 40, init="normal").prompt.detach()
    assert 0.9 < float(normal.std()) < 1.1 and float(normal.abs().max()) > 1.0


@pytest.mark.parametrize("as_tensor", [False, True])
def test_init_vocab_rows_are_table_rows(as_tensor: bool) -> None:
    emb = nn.Embedding(60, 9)
    before = emb.weight.detach().clone()
    sp = SoftPrompt(7, 9, num_tasks=3, init="vocab", embedding=emb.weight if as_tensor else emb,
                    vocab_population=20)
    for t in range(3):
        rows = sp.prompt[t].detach()
        # each prompt row equals one of the first 20 rows of the table, distinct within a task (no replacement)
        hit = (rows[:, None, :] == emb.weight.detach()[None, :20, :]).all(-1)
        assert bool((hit.sum(-1) == 1).all())
        assert len(set(hit.float().argmax(-1).tolist())) == 7
    assert not torch.equal(sp.prompt[0], sp.prompt[1])  # each task its own draw
    assert torch.equal(emb.weight, before) and emb.weight.grad is None
    # more virtual tokens than the population: drawn with replacement, still rows of the table
    big = SoftPrompt(12, 9, init="vocab", embedding=emb, vocab_population=5).prompt.detach()
    assert bool(((big[:, None, :] == emb.weight.detach()[None, :5, :]).all(-1).sum(-1) == 1).all())
    # default population 5000 > V: the whole table
    whole = SoftPrompt(4, 9, init="vocab", embedding=emb).prompt.detach()
    assert bool(((whole[:, None, :] == emb.weight.detach()[None]).all(-1).sum(-1) == 1).all())


def test_init_vocab_half_table_copied_to_float32() -> None:
    w = torch.randn(30, 8).to(torch.bfloat16)
    sp = SoftPrompt(5, 8, init="vocab", embedding=w)
    assert sp.prompt.dtype == torch.float32
    hit = (sp.prompt.detach()[:, None, :] == w.float()[None]).all(-1)
    assert bool((hit.sum(-1) >= 1).all())


def test_init_text_repeats_and_truncates() -> None:
    emb = nn.Embedding(20, 6)
    w = emb.weight.detach()
    sp = SoftPrompt(7, 6, init="text", embedding=emb, init_text_ids=[3, 1, 4])
    assert torch.equal(sp.prompt.detach(), w[[3, 1, 4, 3, 1, 4, 3]])
    short = SoftPrompt(2, 6, init="text", embedding=emb, init_text_ids=torch.tensor([3, 1, 4]))
    assert torch.equal(short.prompt.detach(), w[[3, 1]])
    multi = SoftPrompt(4, 6, num_tasks=2, init="text", embedding=emb, init_text_ids=[[5], [6, 7, 8, 9, 10]])
    assert torch.equal(multi.prompt.detach(), torch.stack([w[[5, 5, 5, 5]], w[[6, 7, 8, 9]]]))
    shared = SoftPrompt(3, 6, num_tasks=2, init="text", embedding=emb, init_text_ids=[2, 9])
    assert torch.equal(shared.prompt.detach(), torch.stack([w[[2, 9, 2]]] * 2))


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(init="vocab"), ValueError, "embedding: init='vocab'"),
    (dict(init="text", embedding=nn.Embedding(5, 4)), ValueError, "init_text_ids: init='text' needs"),
    (dict(init="text", embedding=nn.Embedding(5, 4), init_text_ids=[1, 5]), ValueError, r"ids in \[0, 4\]"),
    (dict(init="vocab", embedding=nn.Embedding(5, 3)), ValueError, r"\(V, D=4\)"),
    (dict(init="vocab", embedding=nn.LayerNorm(4)), TypeError, r"\(V, D\) weight"),
    (dict(init="random", init_text_ids=[1]), ValueError, "only used with init='text'"),
    (dict(init="xavier"), ValueError, "init: expected one of"),
    (dict(encoder="gru"), ValueError, "encoder: expected one of"),
    (dict(backend="cudnn"), ValueError, "backend: expected one of"),
    (dict(num_tasks=0), ValueError, "num_tasks: expected an int >= 1"),
])
def test_bad_arguments(kwargs: dict, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        SoftPrompt(3, 4, **kwargs)


# ---------------------------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
@pytest.mark.parametrize("T", [1, 3])
def test_encoder_shapes_and_gradients(encoder: str, T: int) -> None:
    P, D, H = 5, 7, 6
    sp = SoftPrompt(P, D, num_tasks=T, encoder=encoder, encoder_hidden=H, backend="reference")
    assert isinstance(sp.encoder, PromptEncoder) and not hasattr(sp, "prompt")
    prompt = sp.prompt_embeddings()
    assert tuple(prompt.shape) == ((P, D) if T == 1 else (T, P, D))
    assert sp.num_parameters == sum(p.numel() for p in sp.parameters())
    if encoder == "lstm":  # PEFT's widths: bi-LSTM(D -> H per direction, 2 layers) + Linear(2H, 2H), Linear(2H, D)
        assert sp.encoder.lstm.num_layers == 2 and sp.encoder.lstm.bidirectional
        assert sp.encoder.mlp[0].in_features == 2 * H and sp.encoder.mlp[-1].out_features == D
    else:
        assert [m.out_features for m in sp.encoder.mlp if isinstance(m, nn.Linear)] == [H, H, D]
    emb = nn.Embedding(11, D).requires_grad_(False)
    ids, mask, labels = _batch(4, 6, 11)
    task_ids = torch.tensor([2, 0, 2, 1]) if T > 1 else None
    out = sp(ids, emb, task_ids=task_ids, attention_mask=mask, labels=labels)
    want = peft_eager(prompt, emb.weight, ids, task_ids=task_ids, attention_mask=mask, labels=labels)
    assert_close(out.inputs_embeds, want[0], name="inputs_embeds")
    out.inputs_embeds.square().sum().backward()
    for name, p in sp.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert float(sp.encoder.mlp[-1].weight.grad.abs().sum()) > 0 and float(sp.encoder_input.grad.abs().sum()) > 0
    static = sp.to_static()
    assert static.encoder is None and static.prompt.requires_grad
    # (no_grad may pick another LSTM kernel: equal to rounding, not bitwise)
    assert_close(static.prompt, prompt, name="static prompt")
    assert_close(static(ids, emb, task_ids=task_ids).inputs_embeds, out.inputs_embeds, name="static out")


# ----------------------------------------------------------------------------------- forward vs PEFT eager


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_peft_eager(backend: str, T: int, dtype: torch.dtype) -> None:
    B, L, P, D, V = 3, 5, 4, 7, 11
    emb = nn.Embedding(V, D).to(dtype).requires_grad_(False)
    sp = SoftPrompt(P, D, num_tasks=T, backend=backend)
    ids, mask, labels = _batch(B, L, V)
    task_ids = torch.tensor([2, 0, 2]) if T > 1 else None
    out = sp(ids, emb, task_ids=task_ids, attention_mask=mask, labels=labels)
    prompt = sp.prompt.detach().clone().requires_grad_()
    want = peft_eager(prompt, emb.weight, ids, task_ids=task_ids, attention_mask=mask, labels=labels)
    assert out.inputs_embeds.dtype == dtype
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        # the Triton interpreter truncates float32 -> bfloat16 (GPUs round to nearest even): 1 ulp apart
        assert torch.equal(out.inputs_embeds[:, P:], want[0][:, P:])  # gathered rows: a copy, bit-exact
        assert_close(out.inputs_embeds, want[0], rtol=2**-7, atol=0, name="inputs_embeds")
    else:
        assert torch.equal(out.inputs_embeds, want[0])  # a gather, a cast and a copy: bit-exact
    assert torch.equal(out.attention_mask, want[1]) and torch.equal(out.labels, want[2])
    keep = want[1].bool()
    assert torch.equal(out.position_ids, (keep.long().cumsum(-1) - 1).masked_fill(~keep, 0))
    g = torch.randn(out.inputs_embeds.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (dp,) = torch.autograd.grad(out.inputs_embeds, sp.prompt, g)
    (dp_want,) = torch.autograd.grad(want[0], prompt, g)
    assert dp.dtype == torch.float32
    assert_close(dp, dp_want, dtype=torch.float32, name="dprompt")
    assert emb.weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_embeds_path_and_insert_at(backend: str) -> None:
    B, L, P, D = 2, 5, 3, 6
    sp = SoftPrompt(P, D, backend=backend)
    x = torch.randn(B, L, D, requires_grad=True)
    out = sp(inputs_embeds=x)
    want = peft_eager(sp.prompt, None, None, inputs_embeds=x)[0]
    assert torch.equal(out.inputs_embeds, want)
    (dx,) = torch.autograd.grad(out.inputs_embeds.sum(), x)
    assert torch.equal(dx, torch.ones_like(x))
    s = torch.tensor([0, 2])
    mid = sp(inputs_embeds=x, insert_at=s).inputs_embeds
    assert torch.equal(mid[1], torch.cat([x[1, :2], sp.prompt.to(x.dtype), x[1, 2:]]))


def test_forward_errors() -> None:
    sp = SoftPrompt(3, 4, num_tasks=2)
    with pytest.raises(ValueError, match="embedding: input_ids need"):
        sp(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="task_ids: a"):
        sp(torch.zeros(1, 2, dtype=torch.long), nn.Embedding(5, 4))
    with pytest.raises(ValueError, match="embedding: only used with input_ids"):
        sp(inputs_embeds=torch.zeros(1, 2, 4), embedding=nn.Embedding(5, 4), task_ids=torch.zeros(1, dtype=torch.long))


# ------------------------------------------------------------------------------------------ the wrapper


def _wrapped(T: int = 1, backend: str = "reference", **kw) -> tuple[TinyDecoder, PromptTunedModel]:
    torch.manual_seed(0)
    model = TinyDecoder()
    sp = SoftPrompt(4, 16, num_tasks=T, init="vocab", embedding=model.embed, backend=backend)
    return model, PromptTunedModel(model, sp, **kw)


def test_wrapper_equals_model_on_peft_inputs() -> None:
    model, wrapped = _wrapped(T=2)
    ids, mask, labels = _batch(3, 6, 29)
    task_ids = torch.tensor([1, 0, 1])
    got = wrapped(ids, mask, labels, task_ids=task_ids)
    e, m, lab = peft_eager(wrapped.soft_prompt.prompt, model.embed.weight, ids, task_ids=task_ids,
                           attention_mask=mask, labels=labels)
    want = model(inputs_embeds=e, attention_mask=m, labels=lab)
    assert_close(got["logits"], want["logits"], name="logits")
    assert_close(got["loss"], want["loss"], name="loss")
    assert wrapped.embedding_weight is model.embed.weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("encoder", [None, "mlp"])
def test_training_step_reduces_loss_and_leaves_backbone_bit_identical(backend: str, encoder: str | None) -> None:
    torch.manual_seed(0)
    model = TinyDecoder()
    before = _snapshot(model)
    sp = SoftPrompt(4, 16, init="vocab", embedding=model.embed, encoder=encoder, encoder_hidden=16, backend=backend)
    wrapped = PromptTunedModel(model, sp)
    assert all(not p.requires_grad for p in model.parameters())
    assert wrapped.trainable_parameters() == [p for p in sp.parameters()]
    # toy task: random contexts that always end in token 7; the loss is on predicting that last token
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 29, (8, 5), generator=g)
    ids[:, -1] = 7
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = 7
    opt = torch.optim.Adam(wrapped.trainable_parameters(), lr=0.2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = wrapped(ids, mask, labels)["loss"]
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0] and all(b < a for a, b in itertools.pairwise(losses[:4])), losses
    after = model.state_dict(keep_vars=True)
    for name, t in before.items():
        assert torch.equal(after[name], t), f"{name} changed"
        assert after[name].grad is None, f"{name} got a gradient"
    assert model.embed.weight.grad is None


def test_state_dict_holds_only_the_soft_prompt() -> None:
    _, wrapped = _wrapped()
    sd = wrapped.state_dict()
    assert list(sd) == ["soft_prompt.prompt"]
    _, fresh = _wrapped()
    with torch.no_grad():
        fresh.soft_prompt.prompt.zero_()
    res = fresh.load_state_dict(sd)  # strict: backbone keys are not expected
    assert not res.missing_keys and not res.unexpected_keys
    assert torch.equal(fresh.soft_prompt.prompt, wrapped.soft_prompt.prompt)
    # nested in another module: the prefix is carried through
    parent = nn.ModuleDict({"pt": wrapped, "head": nn.Linear(2, 2)})
    psd = parent.state_dict()
    assert sorted(psd) == ["head.bias", "head.weight", "pt.soft_prompt.prompt"]
    parent.load_state_dict(psd)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({})


def test_embedding_resolution_and_errors() -> None:
    model = TinyDecoder(with_getter=False)
    sp = SoftPrompt(3, 16)
    with pytest.raises(ValueError, match="embedding: TinyDecoder has no get_input_embeddings"):
        PromptTunedModel(model, sp)
    ids, mask, _ = _batch(2, 4, 29)
    by_module = PromptTunedModel(model, sp, embedding=model.embed)
    by_weight = PromptTunedModel(model, sp, embedding=model.embed.weight)
    assert by_module.external_embedding is None and by_weight.embedding_weight is model.embed.weight
    assert torch.equal(by_module(ids, mask)["logits"], by_weight(ids, mask)["logits"])
    # an embedding outside the model is registered (frozen) so .to() moves it, but kept out of the state
    other = nn.Embedding(29, 16)
    ext = PromptTunedModel(model, sp, embedding=other)
    assert ext.external_embedding is other and not other.weight.requires_grad
    assert list(ext.state_dict()) == ["soft_prompt.prompt"]
    with pytest.raises(ValueError, match="max_norm"):
        PromptTunedModel(model, sp, embedding=nn.Embedding(29, 16, max_norm=1.0))
    with pytest.raises(ValueError, match="dim=3"):
        PromptTunedModel(TinyDecoder(), SoftPrompt(3, 3))

    class NoEmbeds(nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(TypeError, match="no inputs_embeds argument"):
        PromptTunedModel(NoEmbeds(), sp, embedding=other)


class Classifier(nn.Module):
    """A sequence classifier: labels (B,), position_ids accepted explicitly (recorded)."""

    def __init__(self, V: int = 13, D: int = 8, encoder_decoder: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.head = nn.Linear(D, 3)
        self.config = type("Config", (), {"is_encoder_decoder": encoder_decoder})()
        self.seen: dict = {}

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, inputs_embeds, position_ids=None, labels=None):
        self.seen = {"position_ids": position_ids, "labels": labels}
        logits = self.head(inputs_embeds.mean(1))
        return logits if labels is None or labels.dim() != 1 else F.cross_entropy(logits, labels)


def test_labels_position_ids_and_accepted_arguments() -> None:
    model = Classifier()
    wrapped = PromptTunedModel(model, SoftPrompt(2, 8))
    ids = torch.randint(0, 13, (3, 4))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    with pytest.raises(TypeError, match=r"attention_mask: given, but Classifier\.forward does not accept"):
        wrapped(ids, mask)
    y = torch.tensor([0, 2, 1])
    wrapped(ids, labels=y)
    assert model.seen["labels"] is y and model.seen["position_ids"] is None  # (B,) labels pass through
    tok_labels = torch.randint(0, 3, (3, 4))
    wrapped(ids, labels=tok_labels)
    assert torch.equal(model.seen["labels"][:, :2], torch.full((3, 2), -100)) and model.seen["labels"].shape == (3, 6)
    seq2seq = PromptTunedModel(Classifier(encoder_decoder=True), SoftPrompt(2, 8))
    seq2seq(ids, labels=tok_labels)
    assert seq2seq.model.seen["labels"] is tok_labels  # decoder targets: untouched

    class WithMask(Classifier):
        def forward(self, inputs_embeds, attention_mask=None, position_ids=None):
            self.seen = {"position_ids": position_ids, "attention_mask": attention_mask}
            return inputs_embeds

    m2 = WithMask()
    PromptTunedModel(m2, SoftPrompt(2, 8))(ids, mask)
    assert m2.seen["position_ids"] is None  # as PEFT: the model numbers positions itself
    assert torch.equal(m2.seen["attention_mask"][2], torch.tensor([1, 1, 1, 1, 1, 0]))
    PromptTunedModel(m2, SoftPrompt(2, 8), pass_position_ids=True)(ids, mask)
    assert torch.equal(m2.seen["position_ids"][0], torch.tensor([0, 1, 0, 2, 3, 4]))  # left padding
    with pytest.raises(ValueError, match="position_ids: the"):
        PromptTunedModel(m2, SoftPrompt(2, 8))(ids, mask, position_ids=torch.zeros_like(ids))
    with pytest.raises(TypeError, match=r"labels: given, but WithMask\.forward does not accept labels"):
        PromptTunedModel(m2, SoftPrompt(2, 8))(ids, mask, tok_labels)


def test_embed_scale_detected_from_scaled_embedding() -> None:
    class ScaledEmbedding(nn.Embedding):  # as Gemma 3's: forward returns the rows times embed_scale
        def __init__(self, V: int, D: int, scale: float) -> None:
            super().__init__(V, D)
            self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale.to(self.weight.dtype)

    model = Classifier()
    model.embed = ScaledEmbedding(13, 8, 8**0.5).to(torch.bfloat16)
    model.head.to(torch.bfloat16)
    wrapped = PromptTunedModel(model, SoftPrompt(3, 8))
    assert wrapped.embed_scale == float(torch.tensor(8**0.5).to(torch.bfloat16))
    ids = torch.randint(0, 13, (2, 5))
    got, _ = wrapped.prompted_inputs(ids)
    want = torch.cat([wrapped.soft_prompt.prompt.to(torch.bfloat16).expand(2, -1, -1), model.embed(ids)], 1)
    assert torch.equal(got.inputs_embeds, want)
    # inputs_embeds are the embedding module's output (already scaled): not scaled again
    x = model.embed(ids)
    assert torch.equal(wrapped.prompted_inputs(inputs_embeds=x)[0].inputs_embeds, want)
