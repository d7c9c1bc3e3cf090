"""reprokernels.nn.PrefixKV: shapes, the projection, per-task tables, frozen caches, gradients through the op."""

from __future__ import annotations

import pytest
import torch

import reprokernels as rk
from reprokernels.nn import PrefixKV
from tests.utils import assert_close


def test_shapes_and_gradients_reach_the_prefix():
    m = PrefixKV(num_layers=3, num_kv_heads=2, head_dim=8, num_virtual_tokens=5)
    pk, pv = m(1)
    assert pk.shape == pv.shape == (2, 5, 8)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    m.attend(1, q, k, v).sum().backward()
    assert m.prefix.grad is not None
    assert torch.equal(m.prefix.grad[:, 0], torch.zeros_like(m.prefix.grad[:, 0]))  # other layers untouched
    assert m.prefix.grad[:, 1].abs().sum() > 0
    assert len(m.prefixes()) == 3
    with pytest.raises(IndexError, match="layer_idx"):
        m(3)


def test_projection_matches_the_prefix_tuning_mlp():
    torch.manual_seed(0)
    m = PrefixKV(2, 2, 4, 3, projection_hidden=16)
    flat = m.transform(m.embedding.weight)  # (P, layers * 2 * H * d), PEFT's layout
    want = flat.view(3, 2, 2, 2, 4)  # (P, layer, k/v, H, d)
    pk, pv = m(1)
    assert_close(pk, want[:, 1, 0].permute(1, 0, 2))
    assert_close(pv, want[:, 1, 1].permute(1, 0, 2))
    q, k, v = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)
    m.attend(0, q, k, v).sum().backward()
    assert m.embedding.weight.grad is not None and m.transform[0].weight.grad is not None


def test_per_task_tables():
    m = PrefixKV(2, 1, 4, 3, num_tasks=4)
    pk, pv = m(0)
    assert pk.shape == (4, 1, 3, 4)
    q, k, v = torch.randn(3, 2, 2, 4), torch.randn(3, 1, 2, 4), torch.randn(3, 1, 2, 4)
    out = m.attend(0, q, k, v, task_ids=torch.tensor([3, 0, 3]))
    for b, t in enumerate([3, 0, 3]):
        one = rk.prefix_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], pk[t], pv[t], backend="reference")
        assert_close(out[b:b + 1], one)
    out.sum().backward()
    assert torch.equal(m.prefix.grad[1:3], torch.zeros_like(m.prefix.grad[1:3]))  # tasks 1, 2 have no rows


def test_from_kv_cache_is_frozen_and_exact():
    keys = [torch.randn(1, 2, 6, 8) for _ in range(2)]  # batch-1 HF cache layout
    values = [torch.randn(2, 6, 8) for _ in range(2)]
    m = PrefixKV.from_kv_cache(keys, values)
    assert not list(m.parameters())
    assert "cache" in m.state_dict()
    pk, pv = m(1)
    assert torch.equal(pk, keys[1][0]) and torch.equal(pv, values[1])
    q = torch.randn(2, 4, 1, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    out = m.attend(1, q, k, v, kv_lengths=torch.tensor([5, 2]))
    out.sum().backward()
    assert q.grad is not None and pk.grad is None
    with pytest.raises(ValueError, match="values: expected 2 layers"):
        PrefixKV.from_kv_cache(keys, values[:1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads: expected a positive int"):
        PrefixKV(2, 0, 8, 4)
    with pytest.raises(ValueError, match="projection_hidden"):
        PrefixKV(2, 1, 8, 4, projection_hidden=0)
