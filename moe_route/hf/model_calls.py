"""What a model call was given, for ``record`` and ``replay``: its forward's arguments by name.

Both work out which tokens a model call routes (its token ids, attention mask and KV cache) in a
forward pre-hook. A model's routers route the tokens of one *stack*: the model's own forward for
a decoder-only model; the encoder's or the decoder's forward for an encoder-decoder (Switch,
NLLB), whose encoder routers see ``input_ids`` and decoder routers ``decoder_input_ids``, each
with its own mask, and whose ``generate()`` calls the encoder through ``get_encoder()``, never
through the model's forward. So the hooks go on the stacks, each seeing its own ``input_ids``
and ``attention_mask``. Arguments may come positionally (``model(ids, mask)``, as the forward's
signature allows): the hook binds them to the parameter names of the module class's forward,
read once when the hook is registered; the hook itself only zips names and values, which
torch.compile traces.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["positional_names", "stacks", "stack_of", "watch", "past_length", "cache_length",
           "CacheLengths"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def positional_names(module: nn.Module) -> tuple:
    """The parameter names that positional arguments of ``module``'s forward bind to, in order.
    Read from the class's forward: accelerate's hooks replace the instance's with a wrapper that
    takes ``*args``."""
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]  # no self
    return tuple(p.name for p in params if p.kind in _POSITIONAL)


def stacks(model: nn.Module) -> dict:
    """``{module path: module}`` of the forwards whose tokens a model's routers route: the model
    itself (path ""), or an encoder-decoder's (``config.is_encoder_decoder``) encoder and
    decoder."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return {"": model}
    wanted = [model.get_encoder(), model.get_decoder()]
    found = {name: module for name, module in model.named_modules()
             if any(module is w for w in wanted) and module is not model}
    if len(found) != 2:
        raise ValueError(f"{type(model).__name__}: an encoder-decoder whose get_encoder() and "
                         f"get_decoder() are not two submodules (found {sorted(found)})")
    return found


def stack_of(paths, router: str) -> str:
    """The path (one of ``paths``, from ``stacks``) of the stack a router's module path is in."""
    inside = [p for p in paths if p == "" or router.startswith(p + ".")]
    if not inside:
        raise ValueError(f"{router} is in none of the model's stacks {sorted(paths)}")
    return max(inside, key=len)


def watch(model: nn.Module, on_call: Callable[[str, dict], None],
          on_return: Optional[Callable[[str], None]] = None) -> list:
    """Call ``on_call(stack, arguments)`` before every forward of each of ``model``'s stacks
    (``stacks``), with the stack's path and the call's arguments by parameter name (positional
    ones bound to the stack forward's signature), and ``on_return(stack)`` after it (the output
    stays the forward's); returns the hooks' handles (``remove()``)."""
    handles = []
    for path, module in stacks(model).items():
        names = positional_names(module)

        def hook(module, args, kwargs, path=path, names=names):
            call = dict(zip(names, args))
            call.update(kwargs)
            on_call(path, call)

        def done(module, args, output, path=path):
            on_return(path)   # returns None: the output stays the forward's

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        if on_return is not None:
            handles.append(module.register_forward_hook(done))
    return handles


# The names a model forward's KV cache argument has had: transformers 5.24 renamed
# ``past_key_values`` (and the Mamba-style models' ``cache_params``) to ``cache`` and keeps the
# old names as deprecated aliases, so a call can carry any of them.
CACHE_ARGUMENTS = ("cache", "past_key_values", "cache_params")


def past_length(call: Mapping, S: int, lengths: Optional["CacheLengths"] = None) -> int:
    """How many positions of each sequence come before the ``S`` tokens of a model call (its
    arguments by name): the call's ``cache_position[0]`` when it is given one (transformers
    before 5.24 passes it); else the length of its KV cache (``CACHE_ARGUMENTS``), or the 2-D
    attention mask's length minus ``S`` where that is more (a cache none of whose layers report
    positions). 0 for a call without either. Reading a tensor (``cache_position``, a static
    cache's length) syncs with its device, except a cache length that ``lengths`` follows from
    call to call (``CacheLengths``)."""
    position = call.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    cache = next((call[name] for name in CACHE_ARGUMENTS if call.get(name) is not None), None)
    past = cache_length(cache, S, lengths)
    mask = call.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        past = max(past, mask.shape[1] - S)
    return past


def cache_length(cache, S: int = 0, lengths: Optional["CacheLengths"] = None) -> int:
    """The positions a KV cache holds: ``get_seq_length()`` (layer 0, or a hybrid cache's first
    attention layer), else the longest of its layers. MiniMaxCache's layer 0 belongs to a
    linear-attention layer: it holds no positions and reports 0 at every step. A length held in
    a device tensor is read through ``lengths`` where given, for a call of ``S`` tokens."""
    if cache is None:
        return 0
    length = _layer_length(cache, None, S, lengths)
    if length == 0:
        try:
            layers = len(cache)
        except TypeError:
            layers = 0
        for i in range(1, layers):
            length = max(length, _layer_length(cache, i, S, lengths))
    return length


def _layer_length(cache, layer, S: int, lengths: Optional["CacheLengths"]) -> int:
    try:
        length = cache.get_seq_length() if layer is None else cache.get_seq_length(layer)
        if isinstance(length, torch.Tensor) and lengths is not None:
            return lengths.read(length, S)
        return int(length)
    except (AttributeError, TypeError, ValueError, IndexError):
        # no get_seq_length, or a layer that tracks no length (a hybrid cache's linear layers)
        return 0


class CacheLengths:
    """The lengths of the KV caches one ``generate()``'s model calls feed, where a cache keeps its
    length in a device tensor (a static cache's ``cumulative_length``, which ``int()`` reads
    with a host sync): read at the first call, then followed from call to call. The tensor's
    version counter, which counts its in-place changes, says when that is safe: a tensor that the
    call changed once (its update, by the call's S positions) and nothing changed since holds its
    length at that call plus S. Anything else (a crop of assisted decoding's rejected
    candidates, a reset, an update the counter does not see, as a CUDA graph's) reads it again,
    as does a tensor made in inference mode, which has no version counter. ``call_done()`` after
    each call."""

    def __init__(self):
        self._known: dict = {}   # id(tensor) -> (tensor, its version, its length at that version)
        self._fed: list = []     # this call's reads: (tensor, version, length after the update)

    def read(self, length: torch.Tensor, S: int) -> int:
        """The value of ``length`` (a device tensor) at the start of a call of ``S`` tokens."""
        if length.is_inference():
            return int(length)
        known = self._known.get(id(length))
        if known is not None and known[0] is length and known[1] == length._version:
            value = known[2]
        else:
            value = int(length)   # a host sync
        self._fed.append((length, length._version, value + S))
        return value

    def call_done(self) -> None:
        """After a model call: keep the lengths that its update alone changed."""
        self._known = {id(t): (t, version + 1, after) for t, version, after in self._fed
                       if t._version == version + 1}
        self._fed = []
