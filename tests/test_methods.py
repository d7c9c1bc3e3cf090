"""reprokernels.methods: every registered method builds and trains (forward + backward) on a tiny frozen model of
its location; the taxonomy is well-formed; the CLI prints the table and valid JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reprokernels
from reprokernels import methods
from reprokernels.__main__ import main as cli_main
from reprokernels.nn import LabelMapping, PrefixKV, PromptTunedModel, SoftPrompt

EXPECTED = {
    "adversarial-reprogramming", "vp-pad", "vp-patch", "ilm-vp", "bar", "autovp", "smm", "blm", "blm+",
    "prompt-tuning", "multi-task-prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2", "shared-prefix",
}
ALL = [m.name for m in methods.all_methods()]
IMAGE = [m.name for m in methods.all_methods() if "input" in m.location]
EMBEDDING = [m.name for m in methods.all_methods() if "embedding" in m.location]
HIDDEN = [m.name for m in methods.all_methods() if "hidden" in m.location]

# ------------------------------------------------------------------------------------------- tiny frozen models

K_SRC, K_TGT, CANVAS, SMALL = 12, 4, 16, 8


class TinyCNN(nn.Module):
    """(B, 3, 16, 16) -> (B, K_SRC) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, K_SRC)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


V, D = 13, 8


class TinyLM(nn.Module):
    """An embedding + linear "LM" accepting inputs_embeds: (B, L) -> (B, L, V) logits; position t reads the
    (masked) causal mean of tanh(embeddings) up to t, so the last token sees the prompt."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.head = nn.Linear(D, V)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None) -> torch.Tensor:
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        keep = torch.ones_like(h[..., 0]) if attention_mask is None else attention_mask.to(h.dtype)
        context = (torch.tanh(h) * keep[..., None]).cumsum(1) / keep.cumsum(1).clamp_min(1)[..., None]
        return self.head(context)


HQ, HKV, HD, LAYERS = 2, 1, 4, 2


class AttnBlock(nn.Module):
    """One attention layer (GQA: 2 query heads, 1 kv head) that calls reprokernels.prefix_attention."""

    def __init__(self, dim: int = D) -> None:
        super().__init__()
        self.q = nn.Linear(dim, HQ * HD)
        self.kv = nn.Linear(dim, 2 * HKV * HD)
        self.o = nn.Linear(HQ * HD, dim)

    def keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, _ = h.shape
        k, v = self.kv(h).view(B, L, 2, HKV, HD).permute(2, 0, 3, 1, 4)  # (B, Hkv, L, d) each
        return k, v

    def forward(self, h: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None, backend: str) -> torch.Tensor:
        B, L, _ = h.shape
        q = self.q(h).view(B, L, HQ, HD).transpose(1, 2)
        k, v = self.keys_values(h)
        pk, pv = prefix if prefix is not None else (None, None)
        out = reprokernels.prefix_attention(q, k, v, pk, pv, causal=True, backend=backend)
        return h + self.o(out.transpose(1, 2).reshape(B, L, HQ * HD))


class TinyAttnLM(nn.Module):
    """Embedding, LAYERS attention blocks, a vocabulary head; no position embeddings (so a cached prefix is
    exactly equivalent to running the concatenation)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList([AttnBlock() for _ in range(LAYERS)])
        self.head = nn.Linear(D, V)

    def forward(self, input_ids=None, prefix_kv: PrefixKV | None = None, backend: str = "reference", *,
                inputs_embeds=None) -> torch.Tensor:
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        prefixes = prefix_kv.prefixes() if prefix_kv is not None else [None] * LAYERS
        for block, prefix in zip(self.blocks, prefixes, strict=True):
            h = block(h, prefix, backend)
        return self.head(h)

    @torch.no_grad()
    def kv_cache(self, ids: torch.Tensor, backend: str = "reference") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer (Hkv, P, d) keys and values of a (P,) token prefix (batch 1)."""
        h, keys, values = self.embed(ids[None]), [], []
        for block in self.blocks:
            k, v = block.keys_values(h)
            keys.append(k[0])
            values.append(v[0])
            h = block(h, None, backend)
        return keys, values


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _trainable(modules: dict[str, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    return [(f"{k}.{n}", p) for k, mod in modules.items() for n, p in mod.named_parameters() if p.requires_grad]


def _nudge(params: list[tuple[str, nn.Parameter]]) -> None:
    """Move every learnable tensor off its initial value: zero-initialised δ (SMM, ILM-VP) would otherwise give
    the parts behind it (SMM's mask network) an exactly-zero first gradient."""
    with torch.no_grad():
        for _, p in params:
            p.add_(0.1 * torch.randn_like(p))


def _assert_grads(params: list[tuple[str, nn.Parameter]], frozen: nn.Module) -> None:
    assert params, "a learnable method without learnable parameters"
    for name, p in params:
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: all-zero gradient"
    for name, p in frozen.named_parameters():
        assert p.grad is None, f"frozen {name} got a gradient"


# ------------------------------------------------------------------------------------------- the registry


def test_registry_has_every_method_with_a_valid_taxonomy() -> None:
    assert set(ALL) == EXPECTED and len(ALL) == len(EXPECTED)
    for m in methods.all_methods():
        assert m.format in methods.FORMATS and m.operator in methods.OPERATORS
        assert m.alignment in methods.ALIGNMENTS
        assert isinstance(m.location, tuple) and set(m.location) <= set(methods.LOCATIONS)
        assert m.paper and m.summary and m.doc
        with pytest.raises(dataclasses.FrozenInstanceError):
            m.name = "x"  # type: ignore[misc]
    assert methods.get("ilm-vp").location == ("input", "output")
    assert methods.get("shared-prefix").format == "fixed"
    assert {methods.get(n).alignment for n in ("blm", "blm+")} == {"statistical"}
    assert methods.get("ILM_VP") is methods.get("ilm-vp")
    with pytest.raises(KeyError, match="no method 'nope'"):
        methods.get("nope")
    with pytest.raises(TypeError, match=r"prefix-tuning.build: missing .*arguments: \(\*, num_layers"):
        methods.get("prefix-tuning").build(num_layers=2)
    with pytest.raises(ValueError, match="location"):
        methods.Method("x", "p", "learnable", ("output", "input"), "additive", "none", ("input_prompt",), "s",
                       lambda: {})


# ------------------------------------------------------------------------------------------- input + output

IMAGE_KWARGS = {
    "adversarial-reprogramming": {"input_size": SMALL},
    "vp-pad": {"pad_size": 3},
    "vp-patch": {"patch_size": 5},
    "ilm-vp": {"input_size": SMALL},
    "bar": {"input_size": SMALL},
    "autovp": {"resize": 12},
    "smm": {"patch_size": 4, "layers": 3},
    "blm": {"input_size": SMALL},
    "blm+": {"input_size": SMALL},
}
IMAGE_SIZE = {"vp-pad": CANVAS, "vp-patch": CANVAS}  # VP prompts the canvas-sized image; the others place x


@pytest.mark.parametrize("name", IMAGE)
def test_image_method_trains_through_a_frozen_cnn(name: str) -> None:
    method = methods.get(name)
    modules = method.build(num_source=K_SRC, num_target=K_TGT, image_size=CANVAS, backend="reference",
                           **IMAGE_KWARGS[name])
    assert tuple(modules) == method.components == ("input_prompt", "label_mapping")
    prompt, lm = modules["input_prompt"], modules["label_mapping"]
    assert isinstance(lm, LabelMapping)
    cnn = _frozen(TinyCNN())
    frozen_state = {k: v.clone() for k, v in cnn.state_dict().items()}
    size = IMAGE_SIZE.get(name, SMALL)
    x, y = torch.rand(3, 3, size, size), torch.tensor([0, 1, 3])
    params = _trainable(modules)
    _nudge(params)

    canvas = prompt(x)
    assert canvas.shape == (3, 3, CANVAS, CANVAS)
    if lm.needs_statistics:  # ILM / BAR / BLM / BLM+: estimate the mapping first, as a training loop would
        assert lm.should_update()
        lm.fit([(cnn(canvas).detach(), y)])
    out = lm(cnn(canvas))
    assert out.shape == (3, K_TGT)
    loss = F.nll_loss(out.clamp_min(1e-12).log(), y) if lm.input == "probs" else F.cross_entropy(out, y)
    loss.backward()
    _assert_grads(params, cnn)
    assert all(torch.equal(v, cnn.state_dict()[k]) for k, v in frozen_state.items())


def test_adversarial_reprogramming_details() -> None:
    ar = methods.get("adversarial-reprogramming")
    x = torch.rand(2, 3, 5, 5)
    full = ar.build(num_source=K_SRC, num_target=K_TGT, image_size=9, input_size=5, backend="reference")
    with torch.no_grad():
        full["input_prompt"][1].delta.normal_()
    delta = full["input_prompt"][1].delta
    expected = F.pad(x, (2, 2, 2, 2)) + torch.tanh(delta)  # the whole canvas, image included
    torch.testing.assert_close(full["input_prompt"](x), expected)
    # the fixed mapping: the first K_tgt source labels, never re-estimated
    assert full["label_mapping"].mapping.tolist() == list(range(K_TGT))
    assert not full["label_mapping"].should_update()
    outside = ar.build(num_source=K_SRC, num_target=K_TGT, image_size=9, input_size=5, mask="outside",
                       backend="reference")["input_prompt"]
    with torch.no_grad():
        outside.delta.copy_(delta)
    got = outside(x)
    torch.testing.assert_close(got[..., 2:7, 2:7], x)  # M = 0 on the image
    torch.testing.assert_close(got[..., 0, :], torch.tanh(delta)[..., 0, :].expand(2, 3, 9))


# ------------------------------------------------------------------------------------------- embedding space

EMBEDDING_KWARGS = {"prompt-tuning": {}, "multi-task-prompt-tuning": {"num_tasks": 3},
                    "p-tuning": {"encoder_hidden": 6}}


@pytest.mark.parametrize("name", EMBEDDING)
def test_embedding_method_trains_through_a_frozen_lm(name: str) -> None:
    method = methods.get(name)
    modules = method.build(dim=D, num_virtual_tokens=3, backend="reference", **EMBEDDING_KWARGS[name])
    assert tuple(modules) == method.components == ("soft_prompt",)
    sp = modules["soft_prompt"]
    assert isinstance(sp, SoftPrompt)
    lm = TinyLM()
    wrapped = PromptTunedModel(lm, sp)
    assert all(not p.requires_grad for p in lm.parameters())
    ids, mask = torch.randint(0, V, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    task_ids = torch.tensor([2, 0]) if sp.num_tasks > 1 else None
    logits = wrapped(ids, mask, task_ids=task_ids)
    assert logits.shape == (2, 3 + 5, V)
    F.cross_entropy(logits[:, -1], torch.tensor([1, 4])).backward()
    _assert_grads(_trainable(modules), lm)
    if task_ids is not None:  # only the tasks in the batch are trained
        assert sp.prompt.grad[1].abs().sum() == 0 and sp.prompt.grad[0].abs().sum() > 0


# ------------------------------------------------------------------------------------------- hidden space

HIDDEN_KWARGS = {"prefix-tuning": {"projection_hidden": 6}, "p-tuning-v2": {}}


@pytest.mark.parametrize("backend", ["reference", "composite"])
@pytest.mark.parametrize("name", [n for n in HIDDEN if methods.get(n).format == "learnable"])
def test_learnable_hidden_method_trains_through_frozen_attention(name: str, backend: str) -> None:
    method = methods.get(name)
    modules = method.build(num_layers=LAYERS, num_kv_heads=HKV, head_dim=HD, num_virtual_tokens=3,
                           **HIDDEN_KWARGS[name])
    assert tuple(modules) == method.components == ("prefix_kv",)
    prefix = modules["prefix_kv"]
    assert isinstance(prefix, PrefixKV) and not prefix.frozen
    model = _frozen(TinyAttnLM())
    ids = torch.randint(0, V, (2, 5))
    logits = model(ids, prefix, backend)
    assert logits.shape == (2, 5, V)
    F.cross_entropy(logits[:, -1], torch.tensor([1, 4])).backward()
    _assert_grads(_trainable(modules), model)


@pytest.mark.parametrize("backend", ["reference", "composite"])
def test_shared_prefix_is_fixed_and_equals_running_the_instruction(backend: str) -> None:
    model = _frozen(TinyAttnLM())
    instruction, ids = torch.randint(0, V, (4,)), torch.randint(0, V, (2, 5))
    keys, values = model.kv_cache(instruction, backend)
    method = methods.get("shared-prefix")
    modules = method.build(keys=keys, values=values)
    prefix = modules["prefix_kv"]
    assert isinstance(prefix, PrefixKV) and prefix.frozen and _trainable(modules) == []
    # gradients flow through the cached prefix to the (here: differentiable) input, never into the cache
    embeds = model.embed(ids).detach().requires_grad_(True)
    logits = model(prefix_kv=prefix, backend=backend, inputs_embeds=embeds)
    logits.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(b.grad is None for b in prefix.buffers())
    assert all(p.grad is None for p in model.parameters())
    # attending to the cache == running the model on instruction + text
    full = model(torch.cat([instruction.expand(2, -1), ids], dim=1), None, backend)
    torch.testing.assert_close(logits.detach(), full[:, 4:], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_prints_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ALL:
        assert name in out
    for column in ("location", "format", "operator", "alignment", "paper"):
        assert column in out.splitlines()[0]
    assert methods.main(["smm"]) == 0
    detail = capsys.readouterr().out
    assert "build(*, num_target=10" in detail and "parametric" in detail


def test_cli_json_parses(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ALL
    by_name = {r["name"]: r for r in rows}
    assert by_name["ilm-vp"]["location"] == ["input", "output"]
    assert by_name["prefix-tuning"]["components"] == ["prefix_kv"]
    assert set(rows[0]) == {"name", "paper", "format", "location", "operator", "alignment", "components",
                            "summary", "build"}
    with pytest.raises(SystemExit):
        methods.main(["no-such-method"])
