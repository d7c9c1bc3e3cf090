"""``apply_function(Fn, *args)``: ``Fn.apply(*args)`` without the per-call cost torch adds in eager mode.

``torch.autograd.Function.apply`` binds the arguments to ``forward``'s signature with ``inspect.signature`` on
every call when the Function defines ``setup_context`` (to fill in defaults): about 40 us per call, as much as a
whole eager ``log_softmax`` + gather + backward at small sizes. The ops' Functions have no defaults and every call
site passes all arguments positionally, so the binding changes nothing; this calls the C++ ``apply`` directly.
Under torch.compile and functorch transforms (vmap, grad, ...) the regular ``Fn.apply`` runs, as those need it.

``plain_eager(*tensors)`` says when an op may skip its registered-op wrapper altogether and run its reference as
plain differentiable PyTorch: what ``auto`` does on CPU tensors where it keeps the reference, since the wrapper
(the autograd Function, the torch.library dispatch, a backward that recomputes the softmax) made the reference
slower than the eager code it specifies, and plain autograd gives the same values at the eager code's cost.

``direct_call(backend, *tensors)`` says when an op's autograd Function may call its backend's Python
implementation itself instead of the registered op (``torch.ops.reprokernels.*``): for the cpu backend in plain
eager mode with the profiler off. The dispatcher's round trip (argument conversion, the Python kernel's boxing, an
empty tensor for each gradient not needed) cost 4 us per forward and 12 us per backward, as much as the kernels
themselves at small sizes; it is what torch.compile, functorch, dispatch modes and the profiler need, so those keep it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
import torch.autograd.forward_ad as _forward_ad


def apply_function(fn: type[torch.autograd.Function], *args: object) -> object:
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return super(torch.autograd.Function, fn).apply(*args)  # torch._C._FunctionBase.apply, bound to fn


PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors: torch.Tensor | None, autocast_free: bool = False) -> bool:
    """Not traced, compiled or transformed, no Python dispatch mode (fake tensors, ...) active, no autocast on the
    first tensor's device (plain autograd would run the backward's matmuls under it; ``autocast_free``: the caller's
    reference calls no op autocast changes, so autocast does not matter), and every tensor a plain one on a real
    device: the conditions under which an op's registered wrapper adds nothing. The first tensor must be given."""
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack()):
        return False
    for t in tensors:  # (a loop, not all() over a generator: this runs on every small call)
        if t is not None and (type(t) not in PLAIN_TYPES or t.is_meta):
            return False
    if autocast_free:
        return True
    first = tensors[0]
    return not torch.is_autocast_enabled("cpu" if first.is_cpu else first.device.type)  # (no torch.device object)


def in_forward_ad() -> bool:
    """Inside a forward-AD dual level, where the ops' Functions (no jvp) refuse dual inputs: a route that could
    have been plain autograd keeps it there."""
    return _forward_ad._current_level >= 0


def direct_call(backend: str, *tensors: torch.Tensor | None) -> bool:
    """Whether the Function may skip the registered op (see the module docstring); ``tensors``: the op's inputs."""
    # (plain_eager first: it is False while torch.compile traces, which cannot trace the profiler query; inside a
    # forward-AD dual level the Function must run, to refuse dual inputs it has no jvp for)
    return (backend == "cpu" and plain_eager(*tensors, autocast_free=True) and not torch.autograd._profiler_enabled()
            and not in_forward_ad())


def op_outputs(like: torch.Tensor, tensors: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor, ...]:
    """A registered op's gradient outputs: its schema has no optional outputs, so a gradient that is not needed is
    an empty tensor like ``like`` (a fresh one each: outputs must not alias)."""
    return tuple(like.new_empty((0,)) if t is None else t for t in tensors)


_modules: dict[str, ModuleType] = {}


def backend_module(modules: dict[str, str], backend: str) -> ModuleType:
    """``importlib.import_module(modules[backend])``, remembered: a backend's launcher module, once imported."""
    name = modules[backend]
    mod = _modules.get(name)
    if mod is None:
        mod = _modules[name] = importlib.import_module(name)
    return mod


def run_function(fn: type[torch.autograd.Function], impl: object, *args: object, direct: bool) -> object:
    """``fn.apply(*args, direct)``, or where ``direct`` and no tensor argument needs a gradient, ``impl(*args)``:
    the backend's forward itself, since the Function has nothing to record then."""
    if direct and not (torch.is_grad_enabled()
                       and any(type(a) in PLAIN_TYPES and a.requires_grad for a in args)):  # type: ignore[union-attr]
        return impl(*args)  # type: ignore[operator]
    return apply_function(fn, *args, direct)
