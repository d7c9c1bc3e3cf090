"""Reprogrammer: frozen backbone (parameters and buffers bit-identical after training), forward composition,
checkpoints that hold only what was learned."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reprokernels.nn import ExpansivePrompter, LabelMapping, Reprogrammer

from .utils import assert_close


def _backbone(num_classes: int = 6) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(4 * 12 * 12, num_classes))


def _model(backbone: nn.Module, method: str = "ilm") -> Reprogrammer:
    prompter = ExpansivePrompter(12, input_size=8, channels=1, mean=(0.3,), std=(0.4,), backend="reference")
    mapping = LabelMapping(6, 4, method=method, backend="reference")
    return Reprogrammer(backbone, prompter, mapping)


def _train(model: Reprogrammer, steps: int = 5) -> None:
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    model.train()
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.rand(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        with torch.no_grad():
            model.label_mapping.fit([(model.backbone(model.input_prompt(x)), y)])
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_backbone_frozen_and_bit_identical_after_training():
    backbone = _backbone().train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = _model(backbone)
    assert all(not p.requires_grad for p in backbone.parameters())
    assert model.training and not backbone.training
    _train(model, steps=6)
    assert model.training and not backbone.training  # train() keeps the backbone in eval mode
    assert all(p.grad is None for p in backbone.parameters())
    after = backbone.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():  # parameters and buffers (BatchNorm running stats, num_batches_tracked)
        assert torch.equal(after[k], v), k
    assert model.input_prompt.delta.abs().sum() > 0  # the prompt did learn


def test_forward_is_the_composition_and_eval_is_deterministic():
    model = _model(_backbone()).train()  # dropout in the backbone must stay off even in training mode
    with torch.no_grad():
        model.input_prompt.delta.normal_()
    x = torch.rand(5, 1, 8, 8)
    expected = model.label_mapping(model.backbone(model.input_prompt(x)))
    assert_close(model(x), expected)
    assert torch.equal(model(x), model(x))
    bare = Reprogrammer(_backbone())  # no prompt, no mapping: the frozen backbone alone
    canvas = torch.rand(2, 1, 12, 12)
    assert torch.equal(bare(canvas), bare.backbone(canvas))


def test_trainable_parameters_and_counts():
    backbone = _backbone()
    model = _model(backbone)
    params = list(model.trainable_parameters())
    assert len(params) == 1 and params[0] is model.input_prompt.delta
    assert model.num_trainable == 12 * 12
    assert model.num_frozen == sum(p.numel() for p in backbone.parameters())
    linear = Reprogrammer(_backbone(), None, LabelMapping(6, 4, method="linear"))
    assert linear.num_trainable == 6 * 4 + 4


def test_state_dict_holds_only_what_was_learned_and_restores_on_a_fresh_backbone():
    backbone = _backbone()
    fresh_backbone = copy.deepcopy(backbone)
    model = _model(backbone)
    _train(model)
    sd = model.state_dict()
    assert not any(k.startswith("backbone.") for k in sd)
    assert set(sd) == {"input_prompt.delta", "label_mapping.mapping", "label_mapping.num_updates"}
    restored = _model(fresh_backbone)
    result = restored.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in sd.items():
        assert torch.equal(restored.state_dict()[k], v), k
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    restored.eval()
    assert torch.equal(model(x), restored(x))


def test_nested_state_dict_and_backbone_entries_refused():
    outer = nn.ModuleDict({"rp": _model(_backbone())})
    sd = outer.state_dict()
    assert sorted(sd) == ["rp.input_prompt.delta", "rp.label_mapping.mapping", "rp.label_mapping.num_updates"]
    other = nn.ModuleDict({"rp": _model(_backbone())})
    other.load_state_dict(sd)  # strict: no missing backbone keys
    full = dict(sd)
    weight_before = other["rp"].backbone[0].weight.clone()
    full["rp.backbone.0.weight"] = torch.zeros_like(weight_before)
    with pytest.raises(RuntimeError, match=r"Unexpected key.*rp\.backbone\.0\.weight"):
        other.load_state_dict(full)
    result = other.load_state_dict(full, strict=False)
    assert result.unexpected_keys == ["rp.backbone.0.weight"]
    assert torch.equal(other["rp"].backbone[0].weight, weight_before)  # never loaded through the wrapper


def test_rejects_bad_arguments():
    with pytest.raises(TypeError, match="backbone"):
        Reprogrammer(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="label_mapping"):
        Reprogrammer(_backbone(), None, "flm")  # type: ignore[arg-type]
