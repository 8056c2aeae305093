"""What a model call was given, for ``record`` and ``replay``: its forward's arguments by name.

Both work out which tokens a model call routes (its token ids, attention mask and KV cache) in a
forward pre-hook on the model. Arguments may come positionally (``model(ids, mask)``, as the
forward's signature allows), so the hook binds them to the parameter names of the model class's
forward, read once when the hook is registered; the hook itself only zips names and values, which
torch.compile traces.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

__all__ = ["positional_names", "watch", "past_length", "cache_length"]

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


def past_length(call: Mapping, S: int) -> int:
    """How many positions of each sequence come before the ``S`` tokens of a model call (its
    arguments by name): the call's ``cache_position[0]`` when it is given one; else the length of
    its KV cache (``past_key_values``), or the 2-D attention mask's length minus ``S`` where that
    is more (a cache none of whose layers report positions). 0 for a call without either. Reading
    a tensor (``cache_position``, a static cache's length) syncs with its device."""
    position = call.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    past = cache_length(call.get("past_key_values"))
    mask = call.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        past = max(past, mask.shape[1] - S)
    return past


def cache_length(cache) -> int:
    """The positions a KV cache holds: ``get_seq_length()`` (layer 0, or a hybrid cache's first
    attention layer), else the longest of its layers. MiniMaxCache's layer 0 belongs to a
    linear-attention layer: it holds no positions and reports 0 at every step."""
    if cache is None:
        return 0
    length = _layer_length(cache, None)
    if length == 0:
        try:
            layers = len(cache)
        except TypeError:
            layers = 0
        for i in range(1, layers):
            length = max(length, _layer_length(cache, i))
    return length


def _layer_length(cache, layer) -> int:
    try:
        return int(cache.get_seq_length() if layer is None else cache.get_seq_length(layer))
    except (AttributeError, TypeError, ValueError, IndexError):
        # no get_seq_length, or a layer that tracks no length (a hybrid cache's linear layers)
        return 0
