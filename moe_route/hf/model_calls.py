"""What a model call was given, for ``record`` and ``replay``: its forward's arguments by name.

Both work out which tokens a model call routes (its token ids, attention mask and KV cache) in a
forward pre-hook on the model. Arguments may come positionally (``model(ids, mask)``, as the
forward's signature allows), so the hook binds them to the parameter names of the model class's
forward, read once when the hook is registered; the hook itself only zips names and values, which
torch.compile traces.
"""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

__all__ = ["positional_names", "watch", "cache_length"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def positional_names(module: nn.Module) -> tuple:
    """The parameter names that positional arguments of ``module``'s forward bind to, in order.
    Read from the class's forward: accelerate's hooks replace the instance's with a wrapper that
    takes ``*args``."""
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]  # no self
    return tuple(p.name for p in params if p.kind in _POSITIONAL)


def watch(model: nn.Module, on_call: Callable[[dict], None]):
    """Call ``on_call(arguments)`` before every forward of ``model``, with the call's arguments
    by parameter name (positional ones bound to the forward's signature); returns the hook's
    handle (``remove()``)."""
    names = positional_names(model)

    def hook(module, args, kwargs):
        call = dict(zip(names, args))
        call.update(kwargs)
        on_call(call)

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def cache_length(cache) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except (AttributeError, TypeError):
        return 0
