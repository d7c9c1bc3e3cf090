"""Hidden-space reprogramming: per-layer prefix keys and values (prefix tuning, P-tuning v2) or a frozen,
precomputed instruction prefix, consumed by :func:`reprokernels.prefix_attention` without ever being expanded
to the batch.

===============================================  =================================================================
what                                              recipe
===============================================  =================================================================
``PrefixKV(L, Hkv, d, P)``                        P-tuning v2 / PEFT ``PREFIX_TUNING`` without projection
``PrefixKV(L, Hkv, d, P, projection_hidden=h)``   prefix tuning (Li & Liang 2021): Embedding -> Linear -> Tanh ->
                                                  Linear, as PEFT's ``prefix_projection=True``
``PrefixKV(L, Hkv, d, P, num_tasks=T)``           one prefix per task, chosen per row by ``task_ids``
``PrefixKV.from_kv_cache(keys, values)``          a fixed instruction / few-shot prefix's KV cache (frozen)
===============================================  =================================================================

``forward(layer_idx) -> (prefix_k, prefix_v)``: (Hkv, P, d) each, or (T, Hkv, P, d) with ``num_tasks > 1``
(pass ``task_ids`` to the op). With the projection, ``prefixes()`` computes every layer's in one MLP call (use
it once per step rather than ``forward`` per layer, which recomputes the MLP).

Rotary embeddings: learnable prefix keys carry **no** rotary embedding (the PEFT convention: they are inserted
into the cache after the model applied RoPE to its own keys), so they are position-free. A cache given to
``from_kv_cache`` is used as it is: keys a model computed for the prefix tokens already carry RoPE at
positions 0 ... P-1, and the sequence's own tokens should then be numbered from P.

Dtypes: parameters are float32 (master weights); the op accepts a prefix whose dtype differs from q's (a
bf16 model), rounds it to q's dtype for the products and returns its gradient in float32. A cache given to
``from_kv_cache`` keeps its floating dtype (all layers, keys and values, one dtype and device).

Edge inputs: P = 0 (``num_virtual_tokens=0``) is plain attention; modules built on the meta device give meta
prefixes that the op turns into meta outputs (shapes only); every input edge of the op (strides, garbage in
padded keys, index dtypes) is the op's contract (docs/contracts-attention.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._validation import check_float
from ..ops.prefix_attention import prefix_attention


class PrefixKV(nn.Module):
    """Learnable (or frozen) prefix keys/values for every attention layer.

    Args:
        num_layers: attention layers of the backbone.
        num_kv_heads: Hkv, the key/value heads of each layer (GQA models: fewer than the query heads).
        head_dim: d.
        num_virtual_tokens: P.
        num_tasks: T; T > 1 stores one prefix per task ((T, Hkv, P, d) tables, rows choose by ``task_ids``).
        projection_hidden: None (the prefix is the parameter itself, P-tuning v2) or the hidden width of the
            reparametrisation Embedding(T * P, Hkv * d) -> Linear(Hkv * d, h) -> Tanh ->
            Linear(h, num_layers * 2 * Hkv * d) (prefix tuning; PEFT's ``prefix_projection``).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_virtual_tokens: int,
                 num_tasks: int = 1, projection_hidden: int | None = None) -> None:
        super().__init__()
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("num_virtual_tokens", num_virtual_tokens), ("num_tasks", num_tasks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "num_virtual_tokens"
                                                                                 else 1):
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        ph = projection_hidden
        if ph is not None and (not isinstance(ph, int) or isinstance(ph, bool) or ph < 1):
            raise ValueError(f"projection_hidden: expected None or a positive int, got {projection_hidden!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_virtual_tokens, self.num_tasks = num_virtual_tokens, num_tasks
        self.projection_hidden = projection_hidden
        self.frozen = False
        T, Lyr, H, P, d = num_tasks, num_layers, num_kv_heads, num_virtual_tokens, head_dim
        if projection_hidden is None:
            # N(0, 1) as PEFT's nn.Embedding of the prefix
            self.prefix = nn.Parameter(torch.randn(T, Lyr, 2, H, P, d))
            self.embedding = self.transform = None
        else:
            self.prefix = None
            self.embedding = nn.Embedding(T * P, H * d)
            self.transform = nn.Sequential(nn.Linear(H * d, projection_hidden), nn.Tanh(),
                                           nn.Linear(projection_hidden, Lyr * 2 * H * d))

    @classmethod
    def from_kv_cache(cls, keys: torch.Tensor | Sequence[torch.Tensor],
                      values: torch.Tensor | Sequence[torch.Tensor]) -> PrefixKV:
        """A frozen prefix from a precomputed KV cache (a shared instruction or few-shot prefix).

        keys, values: one (Hkv, P, d) (or (1, Hkv, P, d), a batch-1 Hugging Face cache) tensor per layer, or a
        stacked (num_layers, Hkv, P, d) tensor. Stored as buffers (no gradient, moved by ``.to()``, kept in
        ``state_dict``); used as they are (see the module docstring on rotary embeddings).
        """
        ks, vs = _layers(keys, "keys"), _layers(values, "values")
        if len(ks) != len(vs):
            raise ValueError(f"values: expected {len(ks)} layers (as keys), got {len(vs)}")
        for i, (k, v) in enumerate(zip(ks, vs, strict=True)):
            if k.shape != ks[0].shape or v.shape != k.shape:
                raise ValueError(f"keys/values: layer {i} has shapes {tuple(k.shape)} / {tuple(v.shape)}, expected "
                                 f"{tuple(ks[0].shape)} for both")
            # one stacked buffer holds them all: a silent promotion of mixed dtypes would change the values the op
            # rounds to q's dtype, and an integer cache is no prefix at all
            for name, t in (("keys", k), ("values", v)):
                check_float(t, f"{name}[{i}]")
                if t.dtype != ks[0].dtype or t.device != ks[0].device:
                    raise TypeError(f"{name}[{i}]: expected the dtype and device of keys[0] ({ks[0].dtype} on "
                                    f"{ks[0].device}), got {t.dtype} on {t.device}")
        H, P, d = ks[0].shape
        self = cls(len(ks), H, d, P)
        self.prefix = None
        kv = torch.stack([torch.stack([k, v]) for k, v in zip(ks, vs, strict=True)]).unsqueeze(0)
        self.register_buffer("cache", kv.detach().clone())
        self.frozen = True
        return self

    def prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's (prefix_k, prefix_v) at once (one MLP call with the projection)."""
        full = self._full()
        return [self._split(full, i) for i in range(self.num_layers)]

    def forward(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix_k, prefix_v) of one layer: (Hkv, P, d) each, or (T, Hkv, P, d) with num_tasks > 1."""
        if not -self.num_layers <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx: expected in [0, {self.num_layers}), got {layer_idx}")
        return self._split(self._full(), layer_idx)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        """``prefix_attention(q, k, v, *self(layer_idx), **kwargs)`` (kwargs: task_ids, causal, masks, backend)."""
        return prefix_attention(q, k, v, *self(layer_idx), **kwargs)

    def _full(self) -> torch.Tensor:
        """(T, num_layers, 2, Hkv, P, d)."""
        if self.frozen:
            return self.cache
        if self.prefix is not None:
            return self.prefix
        T, Lyr, H, P, d = self.num_tasks, self.num_layers, self.num_kv_heads, self.num_virtual_tokens, self.head_dim
        out = self.transform(self.embedding.weight)  # (T * P, Lyr * 2 * H * d)
        return out.view(T, P, Lyr, 2, H, d).permute(0, 2, 3, 4, 1, 5)

    def _split(self, full: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer = full[:, i]
        if self.num_tasks == 1:
            return layer[0, 0], layer[0, 1]
        return layer[:, 0], layer[:, 1]

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"num_virtual_tokens={self.num_virtual_tokens}, num_tasks={self.num_tasks}, "
                f"projection_hidden={self.projection_hidden}, frozen={self.frozen}")


def _layers(t: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    if isinstance(t, torch.Tensor):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a (num_layers, Hkv, P, d) tensor or a list of per-layer tensors, "
                             f"got shape {tuple(t.shape)}")
        return list(t.unbind(0))
    out = []
    for i, x in enumerate(t):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 3:
            raise ValueError(f"{name}[{i}]: expected (Hkv, P, d) or (1, Hkv, P, d), got {tuple(x.shape)}")
        out.append(x)
    if not out:
        raise ValueError(f"{name}: expected at least one layer")
    return out
