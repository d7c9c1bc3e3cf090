"""``reprokernels.integrations.peft.accelerate`` against PEFT itself: logits, loss and trainable-parameter
gradients equal PEFT's forward on left-padded batches; generation equals greedy decoding by repeated full
forwards (where PEFT's own generate does not); the adapter saves and loads through plain PEFT."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.hf_models import (
    MODELS,
    greedy_by_full_forwards,
    need_hf,
    padded_batch,
    peft_model,
    scale_trainable_,
    tiny_bert_classifier,
    trainable,
)
from tests.utils import assert_close

need_hf("transformers", "peft")

import peft  # noqa: E402

from reprokernels.integrations.peft import accelerate  # noqa: E402

P = 5


def _configs(task: str = "CAUSAL_LM") -> dict[str, object]:
    return {
        "prefix": peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P),
        "prefix_projection": peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=True,
                                                     encoder_hidden_size=24),
        "prompt": peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P),
        "p_tuning_mlp": peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=24),
        "p_tuning_lstm": peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=24,
                                                  encoder_reparameterization_type="LSTM"),
    }


CONFIGS = tuple(_configs())


def _peft_forward(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**kwargs)


def _loss_and_grads(model, params, **kwargs):
    out = _peft_forward(model, **kwargs)
    grads = torch.autograd.grad(out.loss, params)
    return out, grads


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("kind", CONFIGS)
def test_forward_and_grads_match_peft(arch: str, kind: str) -> None:
    pm = peft_model(MODELS[arch](), _configs()[kind])
    scale_trainable_(pm)
    ids, mask = padded_batch(4, 9)
    labels = ids.masked_fill(mask == 0, -100)
    params = trainable(pm)
    ref, ref_grads = _loss_and_grads(pm, params, input_ids=ids, attention_mask=mask, labels=labels)
    acc = accelerate(pm)
    out, grads = _loss_and_grads(acc, params, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == ref.logits.shape
    assert_close(out.logits, ref.logits, dtype=torch.float32)
    assert_close(out.loss, ref.loss, dtype=torch.float32)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, dtype=torch.float32, scale=4.0)
    # the frozen backbone: no gradient anywhere
    assert all(p.grad is None for p in pm.get_base_model().parameters())


def test_prefix_path_really_reads_the_prefix() -> None:
    """The accelerated logits differ from the base model's without prefix (the test above cannot pass trivially)."""
    base = MODELS["llama"]()
    ids, mask = padded_batch(2, 7)
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits
    pm = peft_model(base, _configs()["prefix"])
    acc = accelerate(pm)
    with torch.no_grad():
        out = acc(input_ids=ids, attention_mask=mask).logits
    assert (out - plain).abs().max() > 1e-2
    assert acc._prefixed._state.calls == 2  # both layers went through prefix_attention
    assert acc.unwrap() is pm
    assert pm.get_base_model().config._attn_implementation != "reprokernels_prefix"


def test_multitask_prompt_tuning_matches_peft() -> None:
    T = 3
    cfg = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, num_tasks=T, num_ranks=2)
    pm = peft_model(MODELS["llama"](), cfg)
    with torch.no_grad():  # PEFT initialises the task factors to ones; make the tasks differ
        enc = pm.prompt_encoder["default"]
        enc.prefix_task_cols.normal_()
        enc.prefix_task_rows.normal_()
    ids, mask = padded_batch(5, 8)
    task_ids = torch.tensor([2, 0, 1, 2, 0])
    labels = ids.masked_fill(mask == 0, -100)
    params = trainable(pm)
    ref, ref_grads = _loss_and_grads(pm, params, input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
    out, grads = _loss_and_grads(accelerate(pm), params, input_ids=ids, attention_mask=mask, labels=labels,
                                 task_ids=task_ids)
    assert_close(out.logits, ref.logits, dtype=torch.float32)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, dtype=torch.float32, scale=4.0)


@pytest.mark.parametrize("kind", ["prompt", "p_tuning_mlp"])
def test_sequence_classification_matches_peft(kind: str) -> None:
    pm = peft_model(tiny_bert_classifier(), _configs("SEQ_CLS")[kind])
    scale_trainable_(pm)
    ids, mask = padded_batch(4, 7, left=False)
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, 4:] = 1
    labels = torch.tensor([0, 2, 1, 2])
    params = trainable(pm)
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=token_type_ids, labels=labels)
    ref, ref_grads = _loss_and_grads(pm, params, **kw)
    out, grads = _loss_and_grads(accelerate(pm), params, **kw)
    assert_close(out.logits, ref.logits, dtype=torch.float32)
    assert_close(out.loss, ref.loss, dtype=torch.float32)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, dtype=torch.float32, scale=4.0)


# ------------------------------------------------------------------------------------------- generation

NEW = 20


def _generate(model, ids, mask, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                              pad_token_id=0, **kw)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("kind", ["prefix", "prefix_projection", "prompt", "p_tuning_lstm"])
def test_generate_equals_greedy_full_forwards(arch: str, kind: str) -> None:
    pm = peft_model(MODELS[arch](), _configs()[kind])
    scale_trainable_(pm)
    ids, mask = padded_batch(3, 7)
    expected = greedy_by_full_forwards(pm, ids, mask, NEW)
    acc = accelerate(pm)
    out = _generate(acc, ids, mask)
    assert out.shape == expected.shape
    assert torch.equal(out, expected)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_generated_prefix_stays_out_of_the_cache(kind: str) -> None:
    pm = peft_model(MODELS["llama"](), _configs()[kind])
    ids, mask = padded_batch(2, 6)
    out = _generate(accelerate(pm), ids, mask, return_dict_in_generate=True)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    own = ids.shape[1] + NEW - 1  # the last token is never fed back
    assert cache.get_seq_length() == (own if kind == "prefix" else own + P)


@pytest.mark.xfail(strict=True, reason="PEFT 0.21.2 + transformers 5.24: PEFT's generate() differs from greedy "
                   "decoding by full forwards (prompt tuning re-inserts the virtual tokens every step; prefix "
                   "tuning drops the prefix at prefill). An XPASS means PEFT fixed it: update README's note.")
@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_peft_generate_is_still_wrong(kind: str) -> None:
    pm = peft_model(MODELS["llama"](), _configs()[kind])
    scale_trainable_(pm)
    ids, mask = padded_batch(3, 7)
    expected = greedy_by_full_forwards(pm, ids, mask, NEW)
    out = _generate(pm, ids, mask)
    assert torch.equal(out[:, -NEW:], expected[:, -NEW:])


# ------------------------------------------------------------------------- training, saving, memory


@pytest.mark.parametrize("kind", ["prefix_projection", "prompt"])
def test_optimizer_step_updates_only_the_adapter(kind: str) -> None:
    pm = peft_model(MODELS["llama"](), _configs()[kind])
    base = pm.get_base_model()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    adapter = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    acc = accelerate(pm)
    opt = torch.optim.SGD(trainable(acc), lr=0.5)
    ids, mask = padded_batch(3, 8)
    acc(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    opt.step()
    for n, p in base.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p, frozen[n]), n
    changed = [n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, adapter[n])]
    assert changed == list(adapter)


@pytest.mark.parametrize("kind", ["prefix_projection", "p_tuning_mlp"])
def test_adapter_saves_and_loads_with_plain_peft(kind: str, tmp_path) -> None:
    pm = peft_model(MODELS["llama"](), _configs()[kind])
    acc = accelerate(pm)
    opt = torch.optim.Adam(trainable(acc), lr=0.05)
    ids, mask = padded_batch(3, 8)
    for _ in range(2):
        opt.zero_grad()
        acc(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        opt.step()
    acc.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path)
    with torch.no_grad():
        expected = acc(input_ids=ids, attention_mask=mask).logits
        got = _peft_forward(loaded, input_ids=ids, attention_mask=mask).logits
    assert_close(got, expected, dtype=torch.float32)


class _ShapeRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an ATen op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _batch_copies_of_prefix(shapes, B: int, P: int) -> list[tuple[int, ...]]:
    """Tensors with a batch dim and a P-long dim (an expanded prefix or its per-row encoder output)."""
    return [s for s in shapes if len(s) >= 3 and s[0] == B and P in s[1:] and s.count(P) >= 1]


def test_prefix_is_never_expanded_to_the_batch() -> None:
    B, Pp, L = 5, 11, 7  # P differs from every other size in play
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=Pp, prefix_projection=True,
                                  encoder_hidden_size=24)
    pm = peft_model(MODELS["llama"](), cfg)
    ids, mask = padded_batch(B, L)
    labels = ids.masked_fill(mask == 0, -100)
    with _ShapeRecorder() as peft_rec:
        _peft_forward(pm, input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert _batch_copies_of_prefix(peft_rec.shapes, B, Pp), "the detector must see PEFT's expanded prefix"
    acc = accelerate(pm)
    with _ShapeRecorder() as rec:
        acc(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert _batch_copies_of_prefix(rec.shapes, B, Pp) == []
    peak = max(torch.Size(s).numel() for s in rec.shapes)
    assert peak <= max(torch.Size(s).numel() for s in peft_rec.shapes)


def test_refuses_what_it_does_not_accelerate() -> None:
    lora = peft_model(MODELS["llama"](), peft.LoraConfig(task_type="CAUSAL_LM", r=2))
    with pytest.raises(ValueError, match="prompt-learning"):
        accelerate(lora)
    seq_prefix = peft_model(tiny_bert_classifier(), _configs("SEQ_CLS")["prefix"])
    with pytest.raises(ValueError, match="task types"):
        accelerate(seq_prefix)
    with pytest.raises(TypeError, match=r"peft\.PeftModel"):
        accelerate(torch.nn.Linear(2, 2))
    acc = accelerate(peft_model(MODELS["llama"](), _configs()["prompt"]))
    with pytest.raises(ValueError, match="task_ids"):
        acc(input_ids=torch.ones(1, 3, dtype=torch.long), task_ids=torch.zeros(1, dtype=torch.long))
