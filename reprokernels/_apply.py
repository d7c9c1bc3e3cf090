"""``apply_function(Fn, *args)``: ``Fn.apply(*args)`` without the per-call cost torch adds in eager mode.

``torch.autograd.Function.apply`` binds the arguments to ``forward``'s signature with ``inspect.signature`` on
every call when the Function defines ``setup_context`` (to fill in defaults): about 40 us per call, as much as a
whole eager ``log_softmax`` + gather + backward at small sizes. The ops' Functions have no defaults and every call
site passes all arguments positionally, so the binding changes nothing; this calls the C++ ``apply`` directly.
Under torch.compile and functorch transforms (vmap, grad, ...) the regular ``Fn.apply`` runs, as those need it.
"""

from __future__ import annotations

import torch


def apply_function(fn: type[torch.autograd.Function], *args: object) -> object:
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return super(torch.autograd.Function, fn).apply(*args)  # torch._C._FunctionBase.apply, bound to fn
