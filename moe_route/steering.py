"""Steering plans: per-layer, per-expert router interventions, ``{layer: {expert: SteerEntry}}``.

A layer key is an int (the decoder layer index: 12 for ``model.layers.12``) or a str (a router's
module path). A loop layer's router (Inkling2-Loop) routes once per pass of the loop: its key
steers every pass, ``"<module path>@pass<p>"`` pass p alone, as ``RoutingStats`` names the passes.
Resolving keys to modules is the steering context manager's job; a plan only describes.
``plan.steer_spec(layer, num_experts)`` turns one layer into the ``moe_route.ops.SteerSpec`` the
gate takes (numerics: ``moe_route.reference``).

JSON form (``to_json``/``from_json``)::

    {"format": "moe_route.SteeringPlan", "version": 1,
     "layers": {"12": {"5": {"std": 0.5}}, "model.layers.3.mlp.gate": {"1": {"force": 1}}}}

JSON object keys are strings, so layer keys are spelled: an int as its decimal digits ("12"); a str
as itself, unless it would read back as an int (canonical decimal digits, "12") or starts with a
double quote, in which case it is written as a JSON string literal (the str "12" -> "\\"12\\"").
Entries list only their non-default fields.
"""
from __future__ import annotations

import json
import numbers
import operator
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Dict, List, Optional, Union

from torch import nn

from moe_route._atomic import write_text_atomic
from moe_route._checks import check_bool, check_int, is_int
from moe_route._device import module_device
from moe_route._json import parse as parse_json
from moe_route.ops import SteerSpec
from moe_route.reference import FLT_MAX

__all__ = ["SteerEntry", "SteeringPlan", "Steering", "steer"]

LayerKey = Union[int, str]

FORMAT = "moe_route.SteeringPlan"
FORMAT_VERSION = 1

_FLOAT_FIELDS = ("add", "std", "abs")
_CANONICAL_INT = re.compile(r"0|[1-9][0-9]*")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class SteerEntry:
    """How to steer one expert of one router (semantics: ``moe_route.ops.SteerSpec``).

    add: constant logit bias, z_e += add.
    std: z_e += std * (the token's population std over the E logits); the paper's soft steering
        uses 0.5.
    std_unbiased: the std term uses the sample std (divided by E - 1: ``torch.std``'s default,
        which EasySteer's implementation of the paper uses; 3% more than the population std at
        E = 16; 0 at E = 1, not NaN). One value per layer among its entries with a std; computed
        in the gate as the population std is (fp32, ``moe_route.reference.steer_logits``).
    abs: z_e += abs * |z_e| (multiplicative).
    force: +1 forces the expert into every token's top-k, -1 out of it, 0 leaves it.
    select_only: the steering changes which experts are chosen; the weights come from the
        unsteered logits. One value per layer (the gate has one switch per call).
    """

    add: float = 0.0
    std: float = 0.0
    abs: float = 0.0
    force: int = 0
    select_only: bool = False
    std_unbiased: bool = False

    def __post_init__(self):
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"SteerEntry: {name}={value!r} must be a float, got "
                                f"{type(value).__name__}")
            # the gate takes fp32 tables: beyond FLT_MAX a value cannot even be stored there
            if not abs(value) <= FLT_MAX:
                raise ValueError(f"SteerEntry: {name}={value!r} must be finite in float32 "
                                 f"(|{name}| <= {FLT_MAX!r})")
            # + 0.0 turns -0.0 into +0.0, so an entry and its JSON round trip agree bit for bit
            object.__setattr__(self, name, float(value) + 0.0)
        if not is_int(self.force):
            raise TypeError(f"SteerEntry: force={self.force!r} must be an int in {{-1, 0, 1}}, "
                            f"got {type(self.force).__name__}")
        if self.force not in (-1, 0, 1):
            raise ValueError(f"SteerEntry: force={self.force!r} must be -1 (off), 0 or +1 (on)")
        object.__setattr__(self, "force", int(self.force))
        for name in ("select_only", "std_unbiased"):
            check_bool("SteerEntry", name, getattr(self, name))
        if self.std_unbiased and self.std == 0:
            raise ValueError("SteerEntry: std_unbiased=True picks the std that the std field "
                             "scales, but std=0.0; give a std, or leave std_unbiased False")

    @classmethod
    def from_dict(cls, values: Mapping) -> "SteerEntry":
        """An entry from ``{"std": 0.5, ...}``; unknown keys are an error."""
        if not isinstance(values, Mapping):
            raise TypeError(f"SteerEntry.from_dict: expected a mapping of fields, got "
                            f"{type(values).__name__}")
        allowed = [f.name for f in fields(cls)]
        for key in values:
            if key not in allowed:
                raise ValueError(f"SteerEntry: unknown field {key!r}; allowed fields are "
                                 f"{allowed}")
        return cls(**values)

    def to_dict(self) -> Dict[str, Union[float, int, bool]]:
        """The non-default fields (the JSON form)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != f.default}

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"SteerEntry({body})"


class SteeringPlan(Mapping):
    """An immutable ``{layer: {expert: SteerEntry}}`` plan (module docstring for layer keys).

    Build it from nested mappings whose entries are ``SteerEntry`` or dicts (``{"std": 0.5}``),
    or with ``promote``/``force``/``bias``; combine with ``plan | other`` (other wins per
    (layer, expert)). As a Mapping it iterates over its layers in ``layers`` order, and
    ``len(plan)`` is the number of layers (``num_entries`` counts (layer, expert) pairs).
    Layers with no experts are dropped.
    """

    __slots__ = ("_layers", "_specs")

    def __init__(self, layers: Optional[Mapping] = None):
        if layers is None:
            layers = {}
        if isinstance(layers, SteeringPlan):
            data = {layer: dict(experts) for layer, experts in layers._layers.items()}
        else:
            if not isinstance(layers, Mapping):
                raise TypeError(f"SteeringPlan: layers must be a mapping {{layer: {{expert: "
                                f"entry}}}}, got {type(layers).__name__}")
            data = {}
            for raw_layer, experts in layers.items():
                layer = _layer_key(raw_layer, "SteeringPlan")
                if layer in data:
                    raise ValueError(f"SteeringPlan: layer {layer!r} given twice "
                                     f"(as {raw_layer!r})")
                if not isinstance(experts, Mapping):
                    raise TypeError(f"SteeringPlan: layer {layer!r} must map experts to entries, "
                                    f"got {type(experts).__name__}")
                entries = {}
                for raw_expert, entry in experts.items():
                    expert = _expert_key(raw_expert, f"SteeringPlan: layer {layer!r}")
                    if expert in entries:
                        raise ValueError(f"SteeringPlan: layer {layer!r}, expert {expert} given "
                                         f"twice")
                    entries[expert] = _entry(entry, f"SteeringPlan: layer {layer!r}, expert "
                                                    f"{expert}")
                data[layer] = entries
        self._layers = {layer: dict(sorted(data[layer].items()))
                        for layer in sorted(data, key=_layer_order) if data[layer]}
        self._specs = {}

    # ---------------------------------------------------------------------------------------
    # builders

    @classmethod
    def promote(cls, layers, experts, std: float = 0.5, *, select_only: bool = False,
                std_unbiased: bool = False) -> "SteeringPlan":
        """Soft steering (the paper's): ``std`` times the token's logit std (population, or
        sample with ``std_unbiased``) added to each expert's logit. ``experts``: a list for
        every layer, or ``{layer: [experts]}``."""
        entry = SteerEntry(std=std, select_only=select_only, std_unbiased=std_unbiased)
        return cls._uniform(layers, experts, entry, "SteeringPlan.promote")

    @classmethod
    def force(cls, layers, experts, on: bool = True, *,
              select_only: bool = False) -> "SteeringPlan":
        """Hard steering: the experts forced into (``on``) or out of every token's top-k."""
        check_bool("SteeringPlan.force", "on", on)
        return cls._uniform(layers, experts,
                            SteerEntry(force=1 if on else -1, select_only=select_only),
                            "SteeringPlan.force")

    @classmethod
    def bias(cls, layers, experts, add: float, *, select_only: bool = False) -> "SteeringPlan":
        """A constant ``add`` on the experts' logits."""
        return cls._uniform(layers, experts, SteerEntry(add=add, select_only=select_only),
                            "SteeringPlan.bias")

    @classmethod
    def _uniform(cls, layers, experts, entry: SteerEntry, where: str) -> "SteeringPlan":
        """The same entry for every (layer, expert) pair.

        ``layers``: one key or an iterable of keys (None: the keys of an ``experts`` mapping).
        ``experts``: one expert, an iterable of experts, or ``{layer: experts}``; with a mapping,
        every layer in ``layers`` must be one of its keys (give ``[]`` for none)."""
        if isinstance(experts, Mapping):
            by_layer = {_layer_key(k, where): _expert_list(v, where) for k, v in experts.items()}
            chosen = list(by_layer) if layers is None else _layer_list(layers, where)
            missing = [layer for layer in chosen if layer not in by_layer]
            if missing:
                raise ValueError(f"{where}: layers {missing} are not keys of experts (its keys: "
                                 f"{sorted(by_layer, key=_layer_order)}); give [] for no experts")
            data = {layer: {e: entry for e in by_layer[layer]} for layer in chosen}
        else:
            if layers is None:
                raise ValueError(f"{where}: layers=None needs experts as a {{layer: [experts]}} "
                                 f"mapping, got {type(experts).__name__}")
            expert_list = _expert_list(experts, where)
            data = {layer: {e: entry for e in expert_list}
                    for layer in _layer_list(layers, where)}
        return cls(data)

    # ---------------------------------------------------------------------------------------
    # mapping

    @property
    def layers(self) -> List[LayerKey]:
        """The layer keys, sorted: int layers ascending, then str layers."""
        return list(self._layers)

    @property
    def num_entries(self) -> int:
        return sum(len(experts) for experts in self._layers.values())

    def __getitem__(self, layer: LayerKey) -> Mapping[int, SteerEntry]:
        key = _lookup_key(layer)
        if key not in self._layers:
            raise KeyError(layer)
        return MappingProxyType(self._layers[key])

    def __iter__(self) -> Iterator[LayerKey]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __bool__(self) -> bool:
        return bool(self._layers)

    def __contains__(self, layer) -> bool:
        return _lookup_key(layer) in self._layers

    def __eq__(self, other) -> bool:
        if not isinstance(other, SteeringPlan):
            return NotImplemented
        return self._layers == other._layers

    def __hash__(self) -> int:
        return hash(tuple((layer, tuple(experts.items()))
                          for layer, experts in self._layers.items()))

    def __or__(self, other) -> "SteeringPlan":
        if isinstance(other, Mapping) and not isinstance(other, SteeringPlan):
            other = SteeringPlan(other)
        if not isinstance(other, SteeringPlan):
            return NotImplemented
        data = {layer: dict(experts) for layer, experts in self._layers.items()}
        for layer, experts in other._layers.items():
            data.setdefault(layer, {}).update(experts)
        return SteeringPlan(data)

    def __ror__(self, other) -> "SteeringPlan":
        if isinstance(other, Mapping) and not isinstance(other, SteeringPlan):
            return SteeringPlan(other) | self
        return NotImplemented

    def __reduce__(self):
        return (SteeringPlan, ({layer: dict(e) for layer, e in self._layers.items()},))

    def to_dict(self) -> Dict[LayerKey, Dict[int, SteerEntry]]:
        """A plain, mutable ``{layer: {expert: SteerEntry}}`` copy."""
        return {layer: dict(experts) for layer, experts in self._layers.items()}

    def __repr__(self) -> str:
        shown, parts = 0, []
        for layer, experts in self._layers.items():
            inner = []
            for expert, entry in experts.items():
                if shown == 12:
                    break
                body = ", ".join(f"{k}={v!r}" for k, v in entry.to_dict().items())
                inner.append(f"{expert}: {body or 'noop'}")
                shown += 1
            if inner:
                parts.append(f"{layer!r}: {{{'; '.join(inner)}}}")
        more = self.num_entries - shown
        tail = f", ... (+{more} entries)" if more else ""
        return (f"SteeringPlan({len(self)} layers, {self.num_entries} entries: "
                f"{', '.join(parts)}{tail})")

    # ---------------------------------------------------------------------------------------
    # to the gate

    def steer_spec(self, layer: LayerKey, num_experts: int) -> Optional[SteerSpec]:
        """The ``SteerSpec`` of ``layer`` for a router with ``num_experts`` experts, or None if the
        plan does not steer that layer. Cached per (layer, num_experts), so the SteerSpec's
        device tables are built once."""
        num_experts = check_int("SteeringPlan.steer_spec", "num_experts", num_experts, 1)
        if layer not in self:
            return None
        key = (layer, num_experts)
        spec = self._specs.get(key)
        if spec is None:
            experts = self._layers[layer]
            self._check_experts(layer, num_experts, "SteeringPlan.steer_spec")
            rows = {}
            for name in ("add", "std", "abs", "force"):
                values = {e: float(getattr(entry, name)) for e, entry in experts.items()
                          if getattr(entry, name) != 0}
                rows[name] = values or None
            # the gate takes one of each switch per layer (std_unbiased: of the std entries)
            select_only = _one_switch(layer, experts, "select_only", list(experts))
            std_unbiased = _one_switch(layer, experts, "std_unbiased", list(rows["std"] or ()))
            spec = SteerSpec(select_only=select_only, std_unbiased=std_unbiased, **rows)
            self._specs[key] = spec
        return spec

    def validate(self, layers: Mapping[LayerKey, int]) -> "SteeringPlan":
        """Check the plan against a model's routers, ``{layer key: num_experts}``: every plan
        layer must be one of them and every expert in range. Returns the plan."""
        unknown = [layer for layer in self._layers if layer not in layers]
        if unknown:
            raise ValueError(f"SteeringPlan.validate: layers {unknown} are not in the model; "
                             f"available layers are {sorted(layers, key=_layer_order)}")
        for layer in self._layers:
            self._check_experts(layer, layers[layer], "SteeringPlan.validate")
        return self

    def _check_experts(self, layer, num_experts, where):
        bad = [e for e in self._layers[layer] if e >= num_experts]
        if bad:
            raise ValueError(f"{where}: layer {layer!r}: expert {bad[0]} must be < "
                             f"num_experts={num_experts}"
                             + (f" (also out of range: {bad[1:]})" if len(bad) > 1 else ""))

    # ---------------------------------------------------------------------------------------
    # JSON

    def to_json(self, indent: Optional[int] = None) -> str:
        layers = {_encode_layer(layer): {str(e): entry.to_dict() for e, entry in experts.items()}
                  for layer, experts in self._layers.items()}
        return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "layers": layers},
                          indent=indent, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "SteeringPlan":
        doc = parse_json(text, "SteeringPlan.from_json: the plan",
                         object_pairs_hook=_no_duplicate_keys)
        if not isinstance(doc, dict):
            raise ValueError(f"SteeringPlan.from_json: expected a JSON object, got "
                             f"{type(doc).__name__}")
        if doc.get("format") != FORMAT:
            raise ValueError(f"SteeringPlan.from_json: format={doc.get('format')!r}, expected "
                             f"{FORMAT!r}")
        version = doc.get("version")
        if not is_int(version) or version < 1:
            raise ValueError(f"SteeringPlan.from_json: version={version!r} must be an int >= 1")
        if version > FORMAT_VERSION:
            raise ValueError(f"SteeringPlan.from_json: version={version} is newer than this "
                             f"moe_route reads (<= {FORMAT_VERSION}); upgrade moe_route")
        unknown = sorted(set(doc) - {"format", "version", "layers"})
        if unknown:
            raise ValueError(f"SteeringPlan.from_json: unknown keys {unknown}; allowed are "
                             f"['format', 'version', 'layers']")
        raw = doc.get("layers")
        if not isinstance(raw, dict):
            raise ValueError(f"SteeringPlan.from_json: layers must be a JSON object, got "
                             f"{raw!r:.80}")
        data = {}
        for text_key, experts in raw.items():
            layer = _decode_layer(text_key)
            if layer in data:
                raise ValueError(f"SteeringPlan.from_json: layer {layer!r} given twice")
            if not isinstance(experts, dict):
                raise ValueError(f"SteeringPlan.from_json: layer {text_key!r} must be an object "
                                 f"{{expert: entry}}, got {experts!r:.80}")
            entries = {}
            for expert_text, entry in experts.items():
                if not _DIGITS.fullmatch(expert_text):
                    raise ValueError(f"SteeringPlan.from_json: layer {text_key!r}: expert key "
                                     f"{expert_text!r} must be a non-negative int")
                expert = int(expert_text)
                if expert in entries:
                    raise ValueError(f"SteeringPlan.from_json: layer {text_key!r}: expert "
                                     f"{expert} given twice")
                if not isinstance(entry, dict):
                    raise ValueError(f"SteeringPlan.from_json: layer {text_key!r}, expert "
                                     f"{expert}: entry must be an object, got {entry!r:.80}")
                entries[expert] = entry
            data[layer] = entries
        try:
            return cls(data)
        except TypeError as exc:  # a field of the wrong type: damaged content, not an argument
            raise ValueError(str(exc)) from None

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``to_json(indent=1)`` to ``path`` atomically (temp file, fsync, rename)."""
        write_text_atomic(path, self.to_json(indent=1) + "\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SteeringPlan":
        path = os.fspath(path)
        with open(path, "rb") as f:  # bytes: from_json reports a file that is not UTF-8 JSON
            data = f.read()
        try:
            return cls.from_json(data)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} (in {path!r})") from None


def _one_switch(layer, experts: Mapping, name: str, among: list) -> bool:
    """The value of the bool field ``name`` that the entries of ``among`` share (False for none);
    ValueError if they differ."""
    on = [e for e in among if getattr(experts[e], name)]
    off = [e for e in among if not getattr(experts[e], name)]
    if on and off:
        raise ValueError(f"SteeringPlan.steer_spec: layer {layer!r} mixes {name}=True (experts "
                         f"{on}) and {name}=False (experts {off}); the gate takes one {name} "
                         f"per layer")
    return bool(on)


# -------------------------------------------------------------------------------------------
# keys and entries


def _layer_key(key, where: str) -> LayerKey:
    if isinstance(key, str):
        if not key:
            raise ValueError(f"{where}: layer key must be a non-empty str or an int >= 0, got ''")
        return key
    if isinstance(key, bool):
        raise TypeError(f"{where}: layer key {key!r} must be an int >= 0 or a str, got bool")
    try:
        index = operator.index(key)  # numpy / torch integer scalars too
    except TypeError:
        raise TypeError(f"{where}: layer key {key!r} must be an int >= 0 (decoder layer index) "
                        f"or a str (module path), got {type(key).__name__}") from None
    if index < 0:
        raise ValueError(f"{where}: layer key {index} must be >= 0 (a decoder layer index)")
    return index


def _lookup_key(key) -> Optional[LayerKey]:
    """``key`` as the plan stores it (an int for integer scalars), or None when no layer key can
    equal it: True, 1.0 and "1" do not find layer 1."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return None
    try:
        return operator.index(key)
    except TypeError:
        return None


def _expert_key(key, where: str) -> int:
    if isinstance(key, bool) or isinstance(key, str):
        raise TypeError(f"{where}: expert key {key!r} must be an int >= 0, got "
                        f"{type(key).__name__}")
    try:
        expert = operator.index(key)
    except TypeError:
        raise TypeError(f"{where}: expert key {key!r} must be an int >= 0, got "
                        f"{type(key).__name__}") from None
    if expert < 0:
        raise ValueError(f"{where}: expert key {expert} must be >= 0")
    return expert


def _entry(value, where: str) -> SteerEntry:
    if isinstance(value, SteerEntry):
        return value
    if isinstance(value, Mapping):
        try:
            return SteerEntry.from_dict(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
    raise TypeError(f"{where}: entry must be a SteerEntry or a dict of its fields, got "
                    f"{type(value).__name__}")


def _layer_list(layers, where: str) -> List[LayerKey]:
    layers = _scalar(layers)
    if isinstance(layers, str) or not isinstance(layers, Iterable):
        return [_layer_key(layers, where)]
    return [_layer_key(layer, where) for layer in layers]


def _expert_list(experts, where: str) -> List[int]:
    experts = _scalar(experts)
    if isinstance(experts, str) or not isinstance(experts, Iterable):
        return [_expert_key(experts, where)]
    return [_expert_key(e, where) for e in experts]


def _scalar(value):
    """A 0-d tensor or array as the number it holds (it is one id, but iterating it raises)."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def _layer_order(layer: LayerKey):
    return (1, 0, layer) if isinstance(layer, str) else (0, layer, "")


def _encode_layer(layer: LayerKey) -> str:
    if isinstance(layer, int):
        return str(layer)
    if _CANONICAL_INT.fullmatch(layer) or layer.startswith('"'):
        return json.dumps(layer, ensure_ascii=False)
    return layer


def _decode_layer(text: str) -> LayerKey:
    if _CANONICAL_INT.fullmatch(text):
        return int(text)
    if text.startswith('"'):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, str):
            raise ValueError(f"SteeringPlan.from_json: layer key {text!r} starts with '\"' but is "
                             f"not a JSON string literal (the spelling of a str layer key that "
                             f"looks like an int)")
        return value
    return text


def _no_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# applying a plan to a model


class Steering:
    """The ``steer(model, plan)`` context: the plan's layers route with their ``SteerSpec``."""

    def __init__(self, model: nn.Module, plan: SteeringPlan):
        if not isinstance(model, nn.Module):
            raise TypeError(f"steer: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(plan, SteeringPlan):
            raise TypeError(f"steer: plan must be a SteeringPlan (SteeringPlan(mapping) builds "
                            f"one from {{layer: {{expert: entry}}}}), got {type(plan).__name__}")
        self.model, self.plan = model, plan
        self._handle = None
        self._applied: list = []

    def __enter__(self) -> "Steering":
        from moe_route.hf.patch import acquire, put  # the record/steer layer sits above hf

        if self._handle is not None:  # its exit would undo both entries and release one patch
            raise RuntimeError("steer: this steer() context is already active; nest another "
                               "steer(model, plan) instead of entering the same one twice")
        self._handle = acquire(self.model)   # its settings live on the patch alone
        try:
            by_router: dict = {}  # one push per router, whichever of its passes the plan names
            for key, (state, p) in resolve_layers(self.plan, self._handle.routers).items():
                if state.adapter.fixed_choice:
                    raise ValueError(f"steer: layer {key!r} ({state.name}) routes by "
                                     f"{state.adapter.name}, not by score; it cannot be steered")
                specs = by_router.setdefault(state.name, (state, {}))[1]
                spec = specs[p] = self.plan.steer_spec(key, state.num_experts)
                # the gate's table of the spec, made on the router's device now: a call only
                # reads it, so a compiled model does not guard on (and recompile for) its values
                device = module_device(self.model.get_submodule(state.name))
                if device is not None:
                    spec.table(state.num_experts, device)
                _warn_forcing(key, self.plan[key], state)
            for state, specs in by_router.values():
                put(state, "steer", self, specs)
                self._applied.append(state)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        from moe_route.hf.patch import release, withdraw

        while self._applied:
            withdraw(self._applied.pop(), "steer", self)
        if self._handle is not None:
            release(self._handle)
            self._handle = None
        return False


def _warn_forcing(key, experts: Mapping, state) -> None:
    """Forced-on experts the router cannot all take, which no token gets all of: more than its k
    (they tie at the top; each token takes the k it ranks first, by selection bias and group, then
    the lower id, not the paper's random draw among them), or experts in more groups than a
    group-limited router keeps per token (each token keeps the forced experts of the groups it
    scores highest)."""
    forced = sorted(e for e, entry in experts.items() if entry.force == 1)
    k, spec = state.top_k, state.spec
    if len(forced) > k:
        warnings.warn(f"steer: layer {key!r} forces {len(forced)} experts {forced[:8]} into a "
                      f"top-{k}: each token takes the {k} of them the router ranks first (by "
                      f"selection bias and group, then the lowest-numbered); keep at most {k} "
                      f"(plan_from_experts(max_per_layer={k}) keeps the largest deltas)",
                      UserWarning, stacklevel=3)
    if spec.n_group > 1:
        size = state.num_experts // spec.n_group
        groups = sorted({e // size for e in forced})
        if len(groups) > spec.topk_group:
            warnings.warn(f"steer: layer {key!r} forces experts {forced[:8]} of {len(groups)} "
                          f"expert groups {groups[:8]}, but the router keeps {spec.topk_group} "
                          f"of its {spec.n_group} groups per token: each token takes only the "
                          f"forced experts of the {spec.topk_group} of those groups it scores "
                          f"highest", UserWarning, stacklevel=3)


def resolve_layers(plan: SteeringPlan, routers: Mapping) -> dict:
    """``{plan layer key: (router state, pass or None)}`` for a patched model's ``{module path:
    RouterState}`` (``sites_by_key``); experts out of range raise ValueError."""
    from moe_route.hf.patch import sites_by_key

    out = sites_by_key(plan.layers, routers, "steer")
    plan.validate({key: state.num_experts for key, (state, _) in out.items()})
    return out


def steer(model: nn.Module, plan: SteeringPlan) -> Steering:
    """Steer ``model``'s routers by ``plan`` inside a ``with`` block (patching if needed).

    Only the plan's layers change; leaving the block restores the previous steering (contexts
    nest: an inner plan replaces an outer one on the layers, or passes, it names).
    """
    return Steering(model, plan)
