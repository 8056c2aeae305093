"""``replay(model, routing)``: route a model's tokens to given experts (router replay).

    trace = load_trace("rollout.safetensors")          # or rec.trace, recorded with trace=True
    with moe_route.replay(model, trace):                # each router takes the next rows of its
        model(**batch)                                  # layer's trace, call by call

    with moe_route.replay(model, {7: ids}):             # ids [B, S, k]: by position, e.g. the
        loss = model(input_ids, labels=labels).loss     # experts an inference engine reported
        loss.backward()                                 # for a rollout (RL routing replay)

Inside the block every replayed router selects the given experts; its weights come from the
model's own logits at those experts, by the family's rule (softmax over E, over the k, sigmoid,
renormalisation, scale), exactly as if the gate had chosen them, and in train mode they carry
the router's gradient. Statistics of a ``record`` context count the replayed ids; steering still
changes the weights (not the ids) of steered layers. Rows of -1 route as usual (padding, or
positions the routing does not cover). The replay runs in the fused gate: the kernel skips
selection for those rows.

Two layouts per layer:

* ``[N, k]`` (a trace, or any ``{layer: ids}``): **call order**. Each router call with T tokens
  takes the next T rows, so the calls must match those that produced the routing (same batch
  shapes, same order). Leaving the block with rows unused raises ``ValueError`` (``strict``).
  Activation recomputation would take rows a second time, so it raises ``RuntimeError`` in the
  backward: train by position.
* ``[B, S, k]``: **by position**. A model call on ``[B, S']`` tokens with a KV cache of length c
  takes positions ``[c, c + S')`` of every sequence, so one forward over whole sequences, a
  ``generate()`` and activation recomputation (gradient checkpointing) all line up.
  ``trace_by_position`` turns a trace of ``generate()`` into this layout. In an encoder-decoder
  (Switch, NLLB) positions are those of the router's own stack: an encoder layer's ``[B, S, k]``
  indexes ``input_ids``, a decoder layer's ``decoder_input_ids``.

A loop layer (Inkling2-Loop runs some layers several times per forward) routes once per pass.
``"<module path>@pass<p>"`` keys (how ``record`` names the passes, so a trace replays as it is)
give pass p its own ids, in either layout. The layer's plain key gives every pass the same
source: in call order each pass takes the next rows; by position is refused (one set of ids per
position cannot say which pass it is for).

Ids may be int16/int32/int64 on any device; they are checked once on entry (k distinct ids in
[0, E) or all -1 per row, k equal to the router's top-k, and a trace layer's recorded expert
count equal to the router's) and moved to each router's device once.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from moe_route import reference
from moe_route._checks import check_int
from moe_route._device import copy_on
from moe_route.hf.model_calls import past_length, stack_of, stacks, watch
from moe_route.hf.patch import PASS, acquire, in_backward, put, release, sites_by_key, withdraw

__all__ = ["replay", "Replay", "trace_by_position"]


class _Source:
    """The ids of one replayed router and where its next call reads them."""

    def __init__(self, name: str, stack: str, ids: torch.Tensor, owner: "Replay"):
        self.name, self.stack, self.owner = name, stack, owner
        self.ids = ids.to(torch.int32)      # expert ids, < E
        self.by_position = ids.dim() == 3
        self.cursor = 0                     # call order: rows used so far
        self._served = None                 # by position: the model call last served
        self._on: dict = {}                 # device -> ids as int32 there

    def __call__(self, T: int, device: torch.device) -> torch.Tensor:
        ids = copy_on(self._on, self.ids, device)
        k = ids.shape[-1]
        if not self.by_position:
            if in_backward():  # checkpointing's recompute would take the next call's rows
                raise RuntimeError(f"replay: {self.name} is recomputed in the backward "
                                   f"(activation checkpointing), which call-order routing "
                                   f"cannot serve: it would take the rows of the next call. "
                                   f"Replay by position ([B, S, k] ids, trace_by_position) to "
                                   f"train with checkpointing")
            if self.cursor + T > ids.shape[0]:
                raise RuntimeError(f"replay: {self.name} is called on {T} tokens, but only "
                                   f"{ids.shape[0] - self.cursor} of its {ids.shape[0]} rows are "
                                   f"left; the model's calls do not match the routing")
            out = ids[self.cursor:self.cursor + T]
            self.cursor += T
            return out
        call = self.owner._calls.get(self.stack)
        if call is None and in_backward():  # checkpointing's recompute, after the forward
            call = self.owner._ended.get(self.stack)
        if call is None:
            raise RuntimeError(f"replay: {self.name} was called outside a forward of the model; "
                               f"routing by position needs the model call's positions")
        B, S, start, number = call
        if number == self._served and not in_backward():  # not checkpointing's recompute
            raise RuntimeError(f"replay: {self.name} ran twice in one model call (a loop layer, "
                               f"whose router runs once per pass: Inkling2-Loop); routing by "
                               f"position gives each position one set of ids and cannot tell "
                               f"the passes apart: give each pass its own ids under the key "
                               f"'{self.name}{PASS}<p>', or replay the layer in call order")
        self._served = number
        if B != ids.shape[0] or start + S > ids.shape[1]:
            raise RuntimeError(f"replay: the model call covers positions [{start}, {start + S}) "
                               f"of {B} sequences, but {self.name}'s routing has "
                               f"{ids.shape[1]} positions of {ids.shape[0]} sequences")
        if T != B * S:
            raise RuntimeError(f"replay: {self.name} routes {T} tokens, but the model call has "
                               f"{B} x {S}; this model routes a different token set than its "
                               f"input_ids (a multimodal model's)")
        return ids[:, start:start + S].reshape(T, k)


class Replay:
    """The ``replay(model, routing)`` context (module docstring)."""

    def __init__(self, model: nn.Module, routing: Mapping, *, layers=None, strict: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"replay: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        if not isinstance(routing, Mapping) or not routing:
            raise TypeError(f"replay: routing must be a non-empty mapping {{layer: ids}} or a "
                            f"trace, got {type(routing).__name__}"
                            f"{' (empty)' if isinstance(routing, Mapping) else ''}")
        self.model, self.strict = model, strict
        self.routing = {key: _ids_of(key, value, "replay: routing")
                        for key, value in routing.items()}
        # a trace layer's expert count, to refuse a trace recorded on another model
        self._experts = {key: value.get("experts") for key, value in routing.items()
                         if isinstance(value, Mapping)}
        self.layers = None if layers is None else (
            [layers] if isinstance(layers, (int, str)) else list(layers))
        self._handle = None
        self._hooks: list = []
        self._sources: list = []
        self._applied: list = []
        # each stack's (model_calls.stacks) call in progress: {stack path: (B, S, past length,
        # the call's number)}
        self._calls: dict = {}
        self._ended: dict = {}   # each stack's call that ended last (for backward's recompute)
        self._numbered = 0  # model calls seen

    def __enter__(self) -> "Replay":
        if self._handle is not None:  # its exit would undo both entries and release one patch
            raise RuntimeError("replay: this replay() context is already active; nest another "
                               "replay(model, routing) instead of entering the same one twice")
        self._handle = acquire(self.model, self._unhook)
        self._sources = []  # a new entry replays from the first row; used/strict see only it
        try:
            routers = self._handle.routers
            targets = sites_by_key(list(self.routing), routers, "replay")
            if self.layers is not None:
                targets = _only(targets, sites_by_key(self.layers, routers, "replay"))
            paths = stacks(self.model)
            by_router: dict = {}  # one push per router, whichever of its passes are replayed
            for key, (state, p) in targets.items():
                if state.adapter.fixed_choice:
                    raise ValueError(f"replay: layer {key!r} ({state.name}) routes by "
                                     f"{state.adapter.name}, not by score; it cannot be replayed")
                ids = self.routing[key]
                _check_ids(key, state, ids, self._experts.get(key))
                name = state.name if p is None else state.site(p)
                source = _Source(name, stack_of(paths, state.name), ids, self)
                by_router.setdefault(state.name, (state, {}))[1][p] = source
                self._sources.append(source)
            for state, sources in by_router.values():
                put(state, "replay", self, sources)
                self._applied.append(state)
            if any(s.by_position for s in self._sources):
                self._hooks = watch(self.model, self._on_call, self._end_call)
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc):
        self._detach()
        if exc[0] is None and self.strict:
            left = {s.name: s.ids.shape[0] - s.cursor for s in self._sources
                    if not s.by_position and s.cursor != s.ids.shape[0]}
            if left:
                raise ValueError(f"replay: rows left unused (the model's calls covered fewer "
                                 f"tokens than the routing): {left}; pass strict=False to allow")
        return False

    def _unhook(self):
        while self._hooks:
            self._hooks.pop().remove()

    def _detach(self):
        self._unhook()
        while self._applied:
            withdraw(self._applied.pop(), "replay", self)
        if self._handle is not None:
            release(self._handle, self._unhook)
            self._handle = None

    def _end_call(self, stack: str) -> None:
        # a call's positions hold for that call only (and for checkpointing's recompute)
        self._ended[stack] = self._calls.pop(stack, None)

    def _on_call(self, stack: str, call: dict):
        ref = call.get("input_ids")
        if ref is None:
            ref = call.get("inputs_embeds")
        if ref is None:
            self._calls[stack] = None
            return
        self._numbered += 1
        self._calls[stack] = (ref.shape[0], ref.shape[1], past_length(call, ref.shape[1]),
                              self._numbered)

    @property
    def used(self) -> dict:
        """``{router name: rows used}`` of the call-order layers so far."""
        return {s.name: s.cursor for s in self._sources if not s.by_position}


def _only(targets: dict, wanted: dict) -> dict:
    """The sites of ``targets`` (``sites_by_key``) that ``wanted`` (the ``layers`` option) names:
    a router's every pass, or one pass. Each wanted layer must be in the routing."""
    names = {(state.name, p) for state, p in wanted.values()}
    kept = {key: (state, p) for key, (state, p) in targets.items()
            if (state.name, None) in names or (state.name, p) in names}
    missing = [key for key, (state, q) in wanted.items()
               if not any(s is state and q in (None, p) for s, p in kept.values())]
    if missing:
        raise ValueError(f"replay: layers {missing} are not in the routing (it covers "
                         f"{list(targets)[:4]}...)")
    return kept


def _ids_of(key, value, where: str) -> torch.Tensor:
    """A layer's ids: a tensor, or a trace entry's ``"ids"``; errors name ``where[key]``."""
    if isinstance(value, Mapping):
        if "ids" not in value:
            raise ValueError(f"{where}[{key!r}] is a mapping without 'ids' (a trace layer has "
                             f"'ids' [N, k])")
        value = value["ids"]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}[{key!r}] must be an int tensor [N, k] or [B, S, k], "
                        f"got {type(value).__name__}")
    if value.dtype not in (torch.int16, torch.int32, torch.int64) or value.dim() not in (2, 3):
        raise ValueError(f"{where}[{key!r}] must be an int16/int32/int64 tensor of shape "
                         f"[N, k] or [B, S, k], got {value.dtype} of shape {tuple(value.shape)}")
    return value


def _check_ids(key, state, ids: torch.Tensor, recorded: Optional[int] = None) -> None:
    k, E = ids.shape[-1], state.num_experts
    if recorded is not None and recorded != E:
        raise ValueError(f"replay: routing[{key!r}] was recorded on a router of {recorded} "
                         f"experts, but {state.name} has {E}: a trace of another model")
    if k != state.top_k:
        raise ValueError(f"replay: routing[{key!r}] has {k} ids per token, but {state.name} "
                         f"routes to top_k={state.top_k}")
    reference.check_replay_rows(ids.reshape(-1, k).cpu(), E, f"replay: routing[{key!r}]")


def trace_by_position(trace: Mapping, batch_size: int, prompt_length: int,
                      length: Optional[int] = None, *,
                      sequences: Optional[torch.Tensor] = None) -> dict:
    """A trace of ``generate()`` (call order) as routing by position, ``{layer: [B, S, k]}``.

    ``generate`` routes the prompt (``batch_size`` x ``prompt_length`` rows, left padding
    included) and then one token per sequence per step, so row ``B * P + s * B + b`` is position
    ``P + s`` of sequence b. The last generated token is never fed back, so it has no routing:
    with ``length`` (e.g. the length of the generated sequences) the positions the trace does not
    cover are -1 (route as usual). The result replays a training forward over the generated
    sequences with the rollout's experts (``replay``).

    ``sequences``: the generated sequences ``[B, L]`` (``generate``'s output), whose L is then
    the default ``length``. Each layer's recorded tokens (a trace recorded from ``input_ids``)
    are checked against them: a ``generate()`` without the KV cache (``use_cache=False``
    re-routes the whole sequence at every step) or with a chunked prefill
    (``prefill_chunk_size``) routes in another order, and a trace of it raises ValueError
    instead of replaying other positions' experts.
    """
    if not isinstance(trace, Mapping):
        raise TypeError(f"trace_by_position: trace must be a mapping {{layer: ids}} (a trace), "
                        f"got {type(trace).__name__}")
    batch_size = check_int("trace_by_position", "batch_size", batch_size, 1)
    prompt_length = check_int("trace_by_position", "prompt_length", prompt_length, 1)
    # and no shorter than the trace's positions: checked per layer
    length = check_int("trace_by_position", "length", length, 1, none="the positions covered")
    if sequences is not None:
        if not isinstance(sequences, torch.Tensor):
            raise TypeError(f"trace_by_position: sequences must be the generated token ids, a "
                            f"[B, L] tensor, got {type(sequences).__name__}")
        if sequences.dim() != 2 or sequences.shape[0] != batch_size or \
                sequences.is_floating_point() or sequences.is_complex():
            raise ValueError(f"trace_by_position: sequences must be int token ids [B, L] with "
                             f"B = batch_size = {batch_size}, got {sequences.dtype} of shape "
                             f"{tuple(sequences.shape)}")
        if length is not None and length != sequences.shape[1]:
            raise ValueError(f"trace_by_position: length={length} differs from the "
                             f"{sequences.shape[1]} positions of sequences")
        length = sequences.shape[1]
        sequences = sequences.cpu()
    out, first = {}, None
    for key, layer in trace.items():
        ids = _ids_of(key, layer, "trace_by_position: trace")
        if ids.dim() != 2:
            raise ValueError(f"trace_by_position: {key!r} must hold call-order ids [N, k], got "
                             f"shape {tuple(ids.shape)}")
        N, k = ids.shape
        if first is None:
            first = (key, N)
        elif N != first[1]:  # one generate() routes every position once in every layer
            raise ValueError(f"trace_by_position: {key!r} has {N} rows but {first[0]!r} has "
                             f"{first[1]}: layers of an encoder-decoder's two stacks, or a loop "
                             f"layer's passes under one name; this takes the layers of one "
                             f"generate() of a decoder, each routing every token once")
        B, P = batch_size, prompt_length
        if N < B * P or (N - B * P) % B:
            raise ValueError(f"trace_by_position: {key!r} has {N} rows, not {B} x {P} prompt "
                             f"rows plus {B} per decoding step")
        steps = (N - B * P) // B
        covered = P + steps
        total = covered if length is None else length
        if total < covered:
            raise ValueError(f"trace_by_position: {key!r} covers {covered} positions, more than "
                             f"the {length} of sequences: {_NOT_ONE_GENERATE}"
                             if sequences is not None else
                             f"trace_by_position: length={length} is shorter than the {covered} "
                             f"positions {key!r} covers")
        tokens = layer.get("tokens") if isinstance(layer, Mapping) else None
        if sequences is not None and tokens is not None:
            _check_tokens(key, _by_position(tokens.reshape(N, 1), B, P, steps)[..., 0],
                          sequences[:, :covered])
        pos = ids.new_full((B, total, k), -1)
        pos[:, :covered] = _by_position(ids, B, P, steps)
        out[key] = pos
    return out


def _by_position(rows: torch.Tensor, B: int, P: int, steps: int) -> torch.Tensor:
    """Call-order rows ``[B * P + steps * B, k]`` of one prefill and ``steps`` one-token steps
    as ``[B, P + steps, k]``."""
    k = rows.shape[1]
    return torch.cat([rows[:B * P].reshape(B, P, k),
                      rows[B * P:].reshape(steps, B, k).transpose(0, 1)], 1)


def _check_tokens(key, recorded: torch.Tensor, sequences: torch.Tensor) -> None:
    """ValueError at the first position whose recorded token is not the sequences' there."""
    bad = (recorded.to(sequences.dtype) != sequences).nonzero()
    if bad.numel():
        b, p = bad[0].tolist()
        raise ValueError(f"trace_by_position: {key!r} routed token {int(recorded[b, p])} at "
                         f"position {p} of sequence {b} by this layout, but sequences[{b}, {p}] "
                         f"is {int(sequences[b, p])}: {_NOT_ONE_GENERATE}")


_NOT_ONE_GENERATE = ("the trace is not of one generate() of these sequences with the KV cache and "
                     "a single prefill (use_cache=False or prefill_chunk_size route in another "
                     "order)")


def replay(model: nn.Module, routing: Mapping, *, layers=None, strict: bool = True) -> Replay:
    """Route ``model``'s tokens to the experts in ``routing`` inside a ``with`` block.

    ``routing`` is a trace (``Recorder.trace``, ``load_trace``: router module path -> layer dict
    with ``"ids"``) or ``{layer: ids}`` with int keys (decoder-layer index) or module paths and
    ids ``[N, k]`` (call order) or ``[B, S, k]`` (by position); see the module docstring.
    ``layers`` (keys as above) replays only those of the routing's layers. Contexts nest: an inner
    replay replaces an outer one on the layers it names. Patches the model for the duration if
    needed.
    """
    return Replay(model, routing, layers=layers, strict=strict)
