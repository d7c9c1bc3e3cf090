"""The reprogramming methods reprokernels implements, as data: the survey's taxonomy made executable.

Each :class:`Method` is a small frozen record: its ``name``, a short citation (``paper``), the four taxonomy
dimensions, and :meth:`Method.build`, which returns freshly configured modules from :mod:`reprokernels.nn`.
``reprokernels methods`` prints the table (``--json`` for machine-readable output).

Taxonomy (one value per dimension, except ``location``):

=============  ===========================================================================================
dimension      values
=============  ===========================================================================================
``format``     ``fixed`` (given, never trained: a cached instruction prefix) | ``learnable`` (trained)
``location``   a *tuple* of ``input`` | ``embedding`` | ``hidden`` | ``output``: every interface the method
               touches, in data-flow order (ILM-VP is ``("input", "output")``)
``operator``   how the reprogramming meets the model's information: ``additive`` (a perturbation added to
               the input) | ``concatenative`` (tokens / keys and values prepended) | ``parametric`` (a learned
               function of each sample: SMM's mask network)
``alignment``  output alignment: ``none`` (the model's own head, e.g. an LM's vocabulary) | ``index`` (a
               one-to-one or many-to-one index mapping: fixed, random or frequency-estimated) |
               ``statistical`` (a soft matrix estimated from prediction statistics: BLM) | ``linear`` (a
               learned dense layer on the logits)
=============  ===========================================================================================

``format`` describes the method's reprogramming parameters (the prompt / perturbation / prefix); how the output
mapping is obtained is what ``alignment`` says. ``operator`` describes the input-side interface (the output
side is ``alignment``). The record describes the method's *default* recipe: overriding e.g. ``mapping=`` in
``build`` changes the built modules, not the record.

The ``build(**kwargs)`` contract
--------------------------------
``method.build(**kwargs) -> dict[str, nn.Module]``, keyword arguments only, every module new (fresh parameters
on the CPU, float32), the keys in data-flow order and always exactly ``method.components``:

* ``"input_prompt"``: (B, C, h, w) images -> (B, C, H, W) model inputs (a visual prompter). Feed it to the
  frozen model ``f``.
* ``"label_mapping"``: a :class:`~reprokernels.nn.LabelMapping`, (B, K_src) logits of ``f`` -> (B, K_tgt). For
  the estimated mappings (ILM, BAR, BLM, BLM+) call its ``fit`` / ``accumulate`` + ``update`` when
  ``should_update()`` says so; the BAR mapping returns probabilities (train with ``nll_loss`` of their log).
  So an image method is ``label_mapping(f(input_prompt(x)))``; the two keys are the keyword arguments of
  ``reprokernels.nn.Reprogrammer(backbone, input_prompt=..., label_mapping=...)``, i.e.
  ``Reprogrammer(f, **method.build(...))``.
* ``"soft_prompt"``: a :class:`~reprokernels.nn.SoftPrompt`; wrap the frozen LM as
  ``PromptTunedModel(model, soft_prompt)`` (which freezes it) and call it as the model.
* ``"prefix_kv"``: a :class:`~reprokernels.nn.PrefixKV`; each attention layer ``i`` of the frozen model calls
  ``reprokernels.prefix_attention(q, k, v, *prefix_kv(i), ...)`` (or ``prefix_kv.attend(i, q, k, v)``).

Nothing is attached to a backbone here (``build`` never sees one), so the same record serves any model whose
sizes are passed in: image methods default to the ImageNet setting (224 x 224 canvas, 1,000 source classes),
while the sizes a text backbone dictates (``dim``; ``num_layers``, ``num_kv_heads``, ``head_dim``) have no
default. ``backend`` is passed to every module that calls an op (``PrefixKV`` does not: the backend is an
argument of the attention call). Extra keyword arguments of a builder go to its main module's constructor
(``**options``); image methods take the label mapping's extra arguments as ``mapping_options``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .nn import (
    ExpansivePrompter,
    FullPrompter,
    LabelMapping,
    PadPrompter,
    PatchPrompter,
    PrefixKV,
    SampleSpecificMaskPrompter,
    SoftPrompt,
)

__all__ = [
    "ALIGNMENTS",
    "COMPONENTS",
    "FORMATS",
    "LOCATIONS",
    "OPERATORS",
    "Method",
    "all_methods",
    "get",
    "main",
    "names",
]

FORMATS = ("fixed", "learnable")
LOCATIONS = ("input", "embedding", "hidden", "output")
OPERATORS = ("additive", "concatenative", "parametric")
ALIGNMENTS = ("none", "index", "statistical", "linear")
COMPONENTS = ("input_prompt", "soft_prompt", "prefix_kv", "label_mapping")

Modules = dict[str, nn.Module]


@dataclass(frozen=True)
class Method:
    """One reprogramming method: its citation, its four taxonomy dimensions, and a builder of its modules."""

    name: str
    paper: str
    format: str
    location: tuple[str, ...]
    operator: str
    alignment: str
    components: tuple[str, ...]
    summary: str
    builder: Callable[..., Modules] = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        for what, value, allowed in (("format", self.format, FORMATS), ("operator", self.operator, OPERATORS),
                                     ("alignment", self.alignment, ALIGNMENTS)):
            if value not in allowed:
                raise ValueError(f"{what}: expected one of {allowed}, got {value!r} (method {self.name!r})")
        if not isinstance(self.location, tuple) or not self.location or any(
                loc not in LOCATIONS for loc in self.location):
            raise ValueError(f"location: expected a non-empty tuple of {LOCATIONS}, got {self.location!r}")
        if list(self.location) != sorted(self.location, key=LOCATIONS.index) or len(set(self.location)) != len(
                self.location):
            raise ValueError(f"location: expected distinct values in data-flow order {LOCATIONS}, got "
                             f"{self.location!r}")
        if not self.components or any(c not in COMPONENTS for c in self.components):
            raise ValueError(f"components: expected names from {COMPONENTS}, got {self.components!r}")

    def build(self, **kwargs: Any) -> Modules:
        """Freshly configured modules, ``{component: module}`` with keys ``self.components`` (see the module
        docstring for the contract; ``self.signature`` lists the arguments)."""
        try:
            inspect.signature(self.builder).bind(**kwargs)
        except TypeError as e:  # name the method and its arguments, not the private builder
            raise TypeError(f"{self.name}.build: {e}; arguments: {self.signature}") from None
        modules = self.builder(**kwargs)
        if tuple(modules) != self.components:  # a registry bug, not a user error
            raise RuntimeError(f"{self.name}: the builder returned {tuple(modules)}, expected {self.components}")
        return modules

    @property
    def signature(self) -> str:
        """The builder's keyword arguments and their defaults, e.g. ``(*, num_target=10, ...)``."""
        sig = inspect.signature(self.builder)
        params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
        return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))

    @property
    def doc(self) -> str:
        """The builder's docstring: the recipe and its defaults."""
        return inspect.getdoc(self.builder) or ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (location and components as lists; ``build`` as the builder's signature)."""
        return {"name": self.name, "paper": self.paper, "format": self.format, "location": list(self.location),
                "operator": self.operator, "alignment": self.alignment, "components": list(self.components),
                "summary": self.summary, "build": self.signature}


_REGISTRY: dict[str, Method] = {}


def _register(name: str, paper: str, format: str, location: tuple[str, ...], operator: str, alignment: str,
              components: tuple[str, ...], summary: str) -> Callable[[Callable[..., Modules]], Callable[..., Modules]]:
    def deco(builder: Callable[..., Modules]) -> Callable[..., Modules]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = Method(name, paper, format, location, operator, alignment, components, summary, builder)
        return builder

    return deco


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def get(name: str) -> Method:
    """The method called ``name`` (case-insensitive; ``_`` and ``-`` are the same: ``"ilm_vp"`` works)."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    try:
        return _REGISTRY[_normalise(name)]
    except KeyError:
        raise KeyError(f"name: no method {name!r}; registered: {', '.join(_REGISTRY)}") from None


def all_methods() -> tuple[Method, ...]:
    """Every registered method, in registry order (input space, output space, embedding, hidden)."""
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


# ---------------------------------------------------------------------------------------------- helpers


def _label_mapping(num_source: int, num_target: int, method: str, backend: str, seed: int,
                   options: Mapping[str, Any] | None) -> LabelMapping:
    if method == "first":  # the fixed "first K_tgt source labels" mapping: random's module, never re-estimated
        lm = LabelMapping(num_source, num_target, "random", backend=backend, **dict(options or {}))
        assert lm.mapping is not None
        with torch.no_grad():
            lm.mapping.copy_(torch.arange(lm.mapping.numel()).view_as(lm.mapping))
        return lm
    return LabelMapping(num_source, num_target, method, seed=seed, backend=backend, **dict(options or {}))


def _centre_pad(image_size: Sequence[int] | int, input_size: Sequence[int] | int) -> nn.ZeroPad2d:
    """``nn.ZeroPad2d`` centring an input_size image on the canvas with top/left pad ``(S - h + 1) // 2``."""
    H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if h > H or w > W:
        raise ValueError(f"input_size: the image {(h, w)} is larger than image_size={(H, W)}")
    top, left = (H - h + 1) // 2, (W - w + 1) // 2
    return nn.ZeroPad2d((left, W - w - left, top, H - h - top))


# ---------------------------------------------------------------------------------------------- input + output


@_register("adversarial-reprogramming", "Elsayed et al., ICLR 2019", "learnable", ("input", "output"), "additive",
           "index", ("input_prompt", "label_mapping"),
           "tanh(W) over the whole canvas around the zero-padded, centred image; first-K_tgt label mapping")
def _adversarial_reprogramming(*, num_target: int = 10, num_source: int = 1000, image_size: int | Sequence[int] = 224,
                               input_size: int | Sequence[int] = 28, channels: int = 3, mask: str = "full",
                               mapping: str = "first", mapping_options: Mapping[str, Any] | None = None,
                               seed: int = 0, backend: str = "auto", **options: Any) -> Modules:
    """Adversarial reprogramming: X_adv = X~ + tanh(W) (mask="full"), X~ the image centred on a zero canvas.

    * ``mask="full"`` (default): the program covers the whole canvas, the image included (Elsayed et al. note
      their mask M "is not required"): ``nn.Sequential(nn.ZeroPad2d(centre), FullPrompter(squash="tanh",
      order="pre_norm"))``. The padded image is materialised once (an extra (B, C, H, W) pass).
    * ``mask="outside"``: their equation with M = 0 on the image, ``tanh(W * M)``, fused in one pass:
      ``ExpansivePrompter(squash="tanh")``.

    No normalisation by default (``mean``/``std`` go to the prompter: X~ is taken in the model's input range;
    tanh spans [-1, 1] as Inception's inputs). Output: the fixed hard-coded mapping of the paper, the first
    K_tgt source labels to the K_tgt targets (``mapping="first"``; a LabelMapping "random" whose mapping is
    arange, never re-estimated); ``mapping="random"`` draws a seeded one, any LabelMapping method works.
    """
    if mask == "full":
        H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        prompt: nn.Module = nn.Sequential(
            _centre_pad((H, W), input_size),
            FullPrompter((H, W), channels, squash="tanh", order="pre_norm", backend=backend, **options))
    elif mask == "outside":
        options = {"mean": None, "std": None, **options}
        prompt = ExpansivePrompter(image_size, input_size, channels=channels, squash="tanh", backend=backend,
                                   **options)
    else:
        raise ValueError(f"mask: expected 'full' or 'outside', got {mask!r}")
    return {"input_prompt": prompt,
            "label_mapping": _label_mapping(num_source, num_target, mapping, backend, seed, mapping_options)}


@_register("vp-pad", "Bahng et al., arXiv 2022", "learnable", ("input", "output"), "additive", "index",
           ("input_prompt", "label_mapping"), "a learnable frame of width p added to the (normalised) image; RLM")
def _vp_pad(*, num_target: int = 10, num_source: int = 1000, image_size: int | Sequence[int] = 224,
            pad_size: int = 30, channels: int = 3, mapping: str = "random",
            mapping_options: Mapping[str, Any] | None = None, seed: int = 0, backend: str = "auto",
            **options: Any) -> Modules:
    """VP's padding prompt: ``PadPrompter(image_size, pad_size)`` (p = 30 on 224, VP's ``prompt_size``).

    x must already be the canvas size (VP resizes in the data transform) and normalised, unless ``mean``/``std``
    are given. VP's headline runs use CLIP's text encoder as the output head (not part of this library); for
    vision-only models the mapping is a random one-to-one label mapping (RLM, ``mapping="random"``), as Chen
    et al. (ILM-VP) characterise it.
    """
    return {"input_prompt": PadPrompter(image_size, pad_size, channels, backend=backend, **options),
            "label_mapping": _label_mapping(num_source, num_target, mapping, backend, seed, mapping_options)}


@_register("vp-patch", "Bahng et al., arXiv 2022", "learnable", ("input", "output"), "additive", "index",
           ("input_prompt", "label_mapping"), "a learnable patch added at a random position each step; RLM")
def _vp_patch(*, num_target: int = 10, num_source: int = 1000, image_size: int | Sequence[int] = 224,
              patch_size: int | Sequence[int] = 30, channels: int = 3, random_position: bool = True,
              mapping: str = "random", mapping_options: Mapping[str, Any] | None = None, seed: int = 0,
              backend: str = "auto", **options: Any) -> Modules:
    """VP's random patch prompt: ``PatchPrompter(image_size, patch_size, random_position=True, seed=seed)``.

    A new position per training forward (fixed at ``position``, default top-left, in eval mode;
    ``random_position=False`` is VP's fixed patch). Mapping as ``vp-pad``.
    """
    return {"input_prompt": PatchPrompter(image_size, patch_size, channels, random_position, seed=seed,
                                          backend=backend, **options),
            "label_mapping": _label_mapping(num_source, num_target, mapping, backend, seed, mapping_options)}


def _padding_method(squash: str, default_mapping: str, doc: str) -> Callable[..., Modules]:
    def builder(*, num_target: int = 10, num_source: int = 1000, image_size: int | Sequence[int] = 224,
                input_size: int | Sequence[int] | None = 128, channels: int = 3, mapping: str = default_mapping,
                mapping_options: Mapping[str, Any] | None = None, seed: int = 0, backend: str = "auto",
                **options: Any) -> Modules:
        options = {"squash": squash, **options}
        return {"input_prompt": ExpansivePrompter(image_size, input_size, channels=channels, backend=backend,
                                                  **options),
                "label_mapping": _label_mapping(num_source, num_target, mapping, backend, seed, mapping_options)}

    builder.__doc__ = doc
    return builder


_register("ilm-vp", "Chen et al., CVPR 2023", "learnable", ("input", "output"), "additive", "index",
          ("input_prompt", "label_mapping"),
          "sigmoid border around the centred image (expansive padding); ILM re-estimated every epoch")(
    _padding_method("sigmoid", "ilm", """ILM-VP: ``ExpansivePrompter(image_size, input_size)`` + ILM.

    The image (default 128 x 128) centred on the canvas, ``normalize(pad(x) + sigmoid(δ) * mask_outside)`` with
    ImageNet mean/std (as ILM-VP's ``ExpansiveVisualPrompt``); the one-to-one mapping is re-estimated greedily
    from argmax counts before every epoch (``mapping="flm"``: once).
    """))

_register("bar", "Tsai et al., ICML 2020", "learnable", ("input", "output"), "additive", "index",
          ("input_prompt", "label_mapping"),
          "tanh border around the centred image; many-to-one mapping, mean of m source probabilities")(
    _padding_method("tanh", "bar", """BAR (black-box adversarial reprogramming), trained here with gradients.

    ``ExpansivePrompter(squash="tanh")``: X~ + tanh(W * M), M = 0 on the centred image (ImageNet normalisation
    by default, ``mean=None, std=None`` to skip) + ``LabelMapping("bar")``: m source labels per target (default
    ``min(10, K_src // K_tgt)``), the target's score the mean of their probabilities, the assignment picked once
    by frequency (``mapping_options={"m": ...}``). BAR's zeroth-order gradient estimation (a black-box
    model) is outside the library: with a differentiable model, train δ with autograd; with a black box, use
    the modules' forward inside a ZO estimator.
    """))


@_register("autovp", "Tsao et al., ICLR 2024", "learnable", ("input", "output"), "additive", "linear",
           ("input_prompt", "label_mapping"),
           "resize the image, then a learnable border around it (fused); fully-connected output mapping")
def _autovp(*, num_target: int = 10, num_source: int = 1000, image_size: int | Sequence[int] = 224,
            resize: int | Sequence[int] = 160, input_size: int | Sequence[int] | None = None, channels: int = 3,
            mapping: str = "linear", mapping_options: Mapping[str, Any] | None = None, seed: int = 0,
            backend: str = "auto", **options: Any) -> Modules:
    """AutoVP-style resize + pad: ``ExpansivePrompter(image_size, input_size, resize=resize)``.

    The image is bilinearly resized to ``resize`` and centred, a sigmoid border fills the rest (the resize is
    fused in the op: the resized image is never materialised). AutoVP *searches* the scale (and the mapping);
    here ``resize`` is a fixed hyper-parameter (default 160 on 224). Output: ``LabelMapping("linear")``, AutoVP's
    FullyMap; ``mapping="ilm"`` / ``"flm"`` are its IterMap / FreqMap.
    """
    return {"input_prompt": ExpansivePrompter(image_size, input_size, resize, channels=channels, backend=backend,
                                              **options),
            "label_mapping": _label_mapping(num_source, num_target, mapping, backend, seed, mapping_options)}


@_register("smm", "Cai et al., ICML 2024", "learnable", ("input", "output"), "parametric", "index",
           ("input_prompt", "label_mapping"),
           "shared δ times a per-sample mask a small CNN predicts (patch-wise upsampled); ILM")
def _smm(*, num_target: int = 10, num_source: int = 1000, image_size: int | Sequence[int] = 224,
         input_size: int | Sequence[int] | None = None, patch_size: int = 8, layers: int = 5, channels: int = 3,
         mapping: str = "ilm", mapping_options: Mapping[str, Any] | None = None, seed: int = 0,
         backend: str = "auto", **options: Any) -> Modules:
    """SMM: ``SampleSpecificMaskPrompter(image_size, input_size, patch_size, layers=layers)`` + ILM.

    The image resized to the canvas, plus δ multiplied by a three-channel mask the mask generator predicts from
    the image at 1/``patch_size`` resolution (8 on 224; ``layers`` 5 for ResNets, 6 for ViTs). Operator
    "parametric": the perturbation is a learned function of each sample, not one pattern added to all.
    Note δ starts at 0, so the mask network gets its first non-zero gradient only after δ moved.
    """
    return {"input_prompt": SampleSpecificMaskPrompter(image_size, input_size, patch_size, channels, layers=layers,
                                                       backend=backend, **options),
            "label_mapping": _label_mapping(num_source, num_target, mapping, backend, seed, mapping_options)}


_BLM_DOC = """{name}: ``ExpansivePrompter(image_size, input_size)`` (ILM-VP's padding, sigmoid, ImageNet
    normalisation) + ``LabelMapping("{method}")``: a (K_src, K_tgt) probabilistic matrix ω, columns-normalised
    D / (rowsum(D) + lam), re-estimated every epoch and applied to the logits. {stat}
    (``mapping_options={{"lam": ...}}``.) For ViTs the paper uses watermarking instead (δ over the whole
    resized image): pair this mapping with a ``FullPrompter``.
    """

_register("blm", "Cai et al., NeurIPS 2024", "learnable", ("input", "output"), "additive", "statistical",
          ("input_prompt", "label_mapping"),
          "sigmoid padding prompt; Bayesian-guided probabilistic mapping from argmax counts")(
    _padding_method("sigmoid", "blm", _BLM_DOC.format(name="BLM", method="blm",
                                                        stat="D counts (argmax source, target) pairs.")))

_register("blm+", "Cai et al., NeurIPS 2024", "learnable", ("input", "output"), "additive", "statistical",
          ("input_prompt", "label_mapping"),
          "sigmoid padding prompt; Bayesian-guided mapping from top-k probability mass")(
    _padding_method("sigmoid", "blm+", _BLM_DOC.format(
        name="BLM+", method="blm+",
        stat="D sums each sample's top-k source probabilities (k = max(1, int(0.15 K_tgt)), ``topk``).")))


# ---------------------------------------------------------------------------------------------- embedding space


@_register("prompt-tuning", "Lester et al., EMNLP 2021", "learnable", ("embedding",), "concatenative", "none",
           ("soft_prompt",), "P learnable token embeddings prepended to the input's (one prompt)")
def _prompt_tuning(*, dim: int, num_virtual_tokens: int = 100, init: str = "random", backend: str = "auto",
                   **options: Any) -> Modules:
    """Prompt tuning: ``SoftPrompt(num_virtual_tokens, dim)`` (P = 100, Lester et al.'s main setting).

    ``init="random"`` is their uniform [-0.5, 0.5]; ``"vocab"`` / ``"text"`` (sampled vocabulary, class labels:
    their better ones) need ``embedding=`` (the frozen nn.Embedding). Use with ``PromptTunedModel(model, sp)``.
    """
    return {"soft_prompt": SoftPrompt(num_virtual_tokens, dim, init=init, backend=backend, **options)}


@_register("multi-task-prompt-tuning", "Lester et al., EMNLP 2021 (task table)", "learnable",
           ("embedding",), "concatenative", "none", ("soft_prompt",),
           "a (T, P, D) table of per-task prompts; each row of a batch picks its task's")
def _multi_task_prompt_tuning(*, dim: int, num_tasks: int, num_virtual_tokens: int = 100, init: str = "random",
                              backend: str = "auto", **options: Any) -> Modules:
    """Multi-task prompt tuning as a task table: ``SoftPrompt(P, dim, num_tasks=T)``; forward needs
    ``task_ids`` (B,) and one batch mixes tasks (Lester et al.'s "mixed-task inference"). This is not MPT
    (Wang et al. 2023, a shared prompt times low-rank task factors), which is a different parametrisation.
    """
    return {"soft_prompt": SoftPrompt(num_virtual_tokens, dim, num_tasks, init=init, backend=backend, **options)}


@_register("p-tuning", "Liu et al., arXiv 2021", "learnable", ("embedding",),
           "concatenative", "none", ("soft_prompt",),
           "the prompt is a prompt encoder's output (bi-LSTM + MLP) on learnable inputs")
def _p_tuning(*, dim: int, num_virtual_tokens: int = 20, encoder: str = "lstm", encoder_hidden: int | None = None,
              init: str = "normal", backend: str = "auto", **options: Any) -> Modules:
    """P-tuning: ``SoftPrompt(P, dim, encoder="lstm")``: a bidirectional LSTM + MLP prompt encoder, as the paper
    (``encoder="mlp"`` is PEFT's default). Inputs N(0, 1) as PEFT's embedding; ``SoftPrompt.to_static()`` folds
    the encoder away for inference. Prompts are prepended (the paper also interleaves them with the text:
    ``insert_at`` places one block after a per-row number of tokens).
    """
    return {"soft_prompt": SoftPrompt(num_virtual_tokens, dim, init=init, encoder=encoder,
                                      encoder_hidden=encoder_hidden, backend=backend, **options)}


# ---------------------------------------------------------------------------------------------- hidden space


@_register("prefix-tuning", "Li & Liang, ACL 2021", "learnable", ("hidden",), "concatenative", "none",
           ("prefix_kv",), "per-layer prefix keys/values from an MLP reparametrisation, prepended in attention")
def _prefix_tuning(*, num_layers: int, num_kv_heads: int, head_dim: int, num_virtual_tokens: int = 10,
                   projection_hidden: int = 512, num_tasks: int = 1) -> Modules:
    """Prefix tuning: ``PrefixKV(num_layers, num_kv_heads, head_dim, P, projection_hidden=h)``.

    Embedding(P, Hkv d) -> Linear -> Tanh -> Linear(h, layers * 2 * Hkv d) (PEFT's ``prefix_projection``; P = 10
    and h = 512 as Li & Liang's table-to-text setting). ``prefixes()`` runs the MLP once per step.
    """
    return {"prefix_kv": PrefixKV(num_layers, num_kv_heads, head_dim, num_virtual_tokens, num_tasks,
                                  projection_hidden)}


@_register("p-tuning-v2", "Liu et al., ACL 2022", "learnable", ("hidden",), "concatenative", "none",
           ("prefix_kv",), "per-layer learnable prefix keys/values, no reparametrisation")
def _p_tuning_v2(*, num_layers: int, num_kv_heads: int, head_dim: int, num_virtual_tokens: int = 20,
                 num_tasks: int = 1) -> Modules:
    """P-tuning v2: ``PrefixKV(num_layers, num_kv_heads, head_dim, P)``, the prefixes are the parameters
    (N(0, 1)), no projection. The paper's NLU runs put a linear classification head on the hidden states:
    that head is not an interface of this library (the record's alignment is "none")."""
    return {"prefix_kv": PrefixKV(num_layers, num_kv_heads, head_dim, num_virtual_tokens, num_tasks)}


@_register("shared-prefix", "Brown et al., NeurIPS 2020 (as a KV cache)", "fixed",
           ("hidden",), "concatenative", "none", ("prefix_kv",),
           "a fixed instruction / few-shot prefix's KV cache, shared by the batch, never recomputed")
def _shared_prefix(*, keys: torch.Tensor | Sequence[torch.Tensor],
                   values: torch.Tensor | Sequence[torch.Tensor]) -> Modules:
    """Shared instruction prefixes: ``PrefixKV.from_kv_cache(keys, values)``.

    keys/values: the frozen model's per-layer (Hkv, P, d) keys and values of the instruction (a list, a
    stacked (layers, Hkv, P, d) tensor, or batch-1 HF cache tensors), computed once. Buffers, no gradient.
    Attending to it equals running the model on ``instruction + text`` (the text's positions continue at P).
    """
    return {"prefix_kv": PrefixKV.from_kv_cache(keys, values)}


# ---------------------------------------------------------------------------------------------- CLI


_COLUMNS = (("name", "name"), ("location", "location"), ("format", "format"), ("operator", "operator"),
            ("alignment", "alignment"), ("build ->", "components"), ("paper", "paper"))


def table(methods: Sequence[Method] | None = None) -> str:
    """The methods as a fixed-width text table."""
    methods = all_methods() if methods is None else tuple(methods)

    def cell(m: Method, attr: str) -> str:
        value = getattr(m, attr)
        return " + ".join(value) if isinstance(value, tuple) else str(value)

    rows = [[cell(m, attr) for _, attr in _COLUMNS] for m in methods]
    heads = [h for h, _ in _COLUMNS]
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(heads), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """``reprokernels methods [--json] [NAME ...]``: the table (or the named methods' details)."""
    parser = argparse.ArgumentParser(
        prog="reprokernels methods",
        description="The reprogramming methods reprokernels implements, by the survey's taxonomy "
                    "(format, location, operator, output alignment).")
    parser.add_argument("names", nargs="*", help="show these methods only, with their build arguments")
    parser.add_argument("--json", action="store_true", help="machine-readable output (a JSON list)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        methods = [get(n) for n in args.names] if args.names else list(all_methods())
    except KeyError as e:
        parser.error(str(e.args[0]))
    if args.json:
        print(json.dumps([m.to_dict() for m in methods], indent=1))
        return 0
    print(table(methods))
    if args.names:
        for m in methods:
            print(f"\n{m.name}: {m.summary}\n  build{m.signature}\n{textwrap.indent(m.doc, '  ')}")
    else:
        print("\nlocation: input | embedding | hidden | output;  operator: additive | concatenative | parametric;  "
              "alignment: none | index | statistical | linear.\n`reprokernels methods NAME` shows a method's "
              "build arguments; reprokernels.methods.get(NAME).build(...) returns its modules.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
