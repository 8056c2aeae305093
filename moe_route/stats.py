"""Routing statistics of a model: ``LayerStats`` per MoE layer, ``RoutingStats`` for the model.

Every tensor has one row per *group* (a sequence, a language, a domain) and, where it has one,
one column per expert:

    tokens      [G]   int64   tokens routed (masked tokens, group -1, are not counted)
    counts      [G,E] int64   tokens whose top-k holds expert e
    weight_sum  [G,E] fp32    sum of the routed weights of e
    prob_sum    [G,E] fp32    sum of the dense routing distribution (the paper's Eq. 1); optional
    entropy_sum [G]   fp32    sum of the dense distribution's entropy, nats; optional
    coact       [E,E] int64   ordered pairs within a token's top-k, over *all* groups; optional

The numbers are those the gate accumulates (``moe_route.ops.GateStats``): integer counts are
exact, float sums are fp32. ``merge`` adds in fp32 too, so merged float sums equal the sums of the
parts up to fp32 rounding (bit-reproducible on the CPU for a fixed merge order).

A save is a directory holding ``tensors.safetensors`` (keys ``layers.{i}.{field}``) and
``manifest.json``; see ``RoutingStats.save``.
"""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import errno
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch

from moe_route._atomic import fsync_dir, fsync_file, make_temp, mode_of
from moe_route._checks import check_int, is_int
from moe_route._json import check as check_json, read as read_json
from moe_route.ops import GateStats

__all__ = ["LayerStats", "RoutingStats"]

# (field, dims, dtype); dims name the axes: "G" groups, "E" experts.
_FIELDS = (
    ("tokens", ("G",), torch.int64),
    ("counts", ("G", "E"), torch.int64),
    ("weight_sum", ("G", "E"), torch.float32),
    ("prob_sum", ("G", "E"), torch.float32),
    ("entropy_sum", ("G",), torch.float32),
    ("coact", ("E", "E"), torch.int64),
)
_DIMS = {name: dims for name, dims, _ in _FIELDS}
_DTYPES = {name: dtype for name, _, dtype in _FIELDS}
FIELDS = tuple(name for name, _, _ in _FIELDS)
REQUIRED_FIELDS = ("tokens", "counts", "weight_sum")
OPTIONAL_FIELDS = ("prob_sum", "entropy_sum", "coact")
COUNT_FIELDS = ("tokens", "counts", "coact")  # the exact integer counts, never negative

FORMAT = "moe_route.RoutingStats"
FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"


def _shape_str(dims: Sequence[str], G: int, E: Optional[int]) -> str:
    return "[" + ", ".join(f"{d}={G if d == 'G' else E}" for d in dims) + "]"


@dataclass(frozen=True, eq=False)
class LayerStats:
    """Statistics of one MoE layer for G groups and E experts (fields: module docstring).

    ``name`` is the router's module path (``"model.layers.3.mlp.gate"``), ``index`` the decoder
    layer index (None where a model has no such index), ``top_k`` the experts per token.
    Tensors are held, not copied: a LayerStats built over a gate's buffers sees them grow.
    Their dtypes, shapes and devices are checked, not their values (that would sync a CUDA
    buffer at every flush); ``RoutingStats`` save, load and merge refuse negative counts.
    """

    name: str
    index: Optional[int]
    top_k: int
    tokens: torch.Tensor
    counts: torch.Tensor
    weight_sum: torch.Tensor
    prob_sum: Optional[torch.Tensor] = None
    entropy_sum: Optional[torch.Tensor] = None
    coact: Optional[torch.Tensor] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"LayerStats: name={self.name!r} must be a non-empty str")
        where = f"LayerStats({self.name!r})"
        object.__setattr__(self, "index",
                           check_int(where, "index", self.index, 0, none="no layer index"))
        for name in FIELDS:
            t = getattr(self, name)
            if t is None:
                if name in REQUIRED_FIELDS:
                    raise ValueError(f"{where}: {name} is required (a {_DTYPES[name]} tensor), "
                                     f"got None")
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a torch.Tensor or None, got "
                                f"{type(t).__name__}")
            if t.dtype != _DTYPES[name]:
                raise TypeError(f"{where}: {name} must be {_DTYPES[name]}, got {t.dtype}")
            if t.dim() != len(_DIMS[name]):
                raise ValueError(f"{where}: {name} must be {len(_DIMS[name])}-D "
                                 f"[{', '.join(_DIMS[name])}], got shape {tuple(t.shape)}")
        G = self.tokens.shape[0]
        E = self.counts.shape[1]
        if E < 1:
            raise ValueError(f"{where}: counts must have at least one expert column, got shape "
                             f"{tuple(self.counts.shape)}")
        for name in FIELDS:
            t = getattr(self, name)
            if t is None:
                continue
            expected = tuple(G if d == "G" else E for d in _DIMS[name])
            if tuple(t.shape) != expected:
                raise ValueError(f"{where}: {name} must have shape "
                                 f"{_shape_str(_DIMS[name], G, E)} (G from tokens, E from "
                                 f"counts), got {tuple(t.shape)}")
            if t.device != self.tokens.device:
                raise ValueError(f"{where}: {name} is on {t.device}, tokens on "
                                 f"{self.tokens.device}; a layer's tensors share one device")
        object.__setattr__(self, "top_k", check_int(where, "top_k", self.top_k, 1, E,
                                                    means=f"of num_experts={E}"))

    @classmethod
    def from_gate_stats(cls, name: str, index: Optional[int], top_k: int,
                        gate_stats) -> "LayerStats":
        """A LayerStats over a ``GateStats``' buffers (shared, not copied)."""
        if not isinstance(gate_stats, GateStats):
            raise TypeError(f"LayerStats.from_gate_stats: gate_stats must be a GateStats, got "
                            f"{type(gate_stats).__name__}")
        missing = [n for n in REQUIRED_FIELDS if getattr(gate_stats, n) is None]
        if missing:
            raise ValueError(f"LayerStats.from_gate_stats({name!r}): gate_stats.{missing[0]} is "
                             f"None; a LayerStats needs {', '.join(REQUIRED_FIELDS)}")
        return cls(name, index, top_k, **{n: getattr(gate_stats, n) for n in FIELDS})

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]

    @property
    def num_groups(self) -> int:
        return self.tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def fields_present(self) -> List[str]:
        """Names of the tensors this layer holds, in the canonical field order."""
        return [n for n in FIELDS if getattr(self, n) is not None]

    def tensors(self) -> Dict[str, torch.Tensor]:
        """``{field: tensor}`` for the fields present."""
        return {n: getattr(self, n) for n in self.fields_present()}

    def replace(self, **changes) -> "LayerStats":
        """A copy with some attributes replaced (validated like a new LayerStats)."""
        return dataclasses.replace(self, **changes)

    def to(self, device, *, copy: bool = False) -> "LayerStats":
        """Tensors on ``device``; like ``Tensor.to``, shared when already there unless ``copy``."""
        return self.replace(**{n: t.to(device, copy=copy) for n, t in self.tensors().items()})

    def clone(self) -> "LayerStats":
        return self.replace(**{n: t.clone() for n, t in self.tensors().items()})

    def __repr__(self) -> str:
        optional = [n for n in OPTIONAL_FIELDS if getattr(self, n) is not None]
        return (f"LayerStats({self.name!r}, index={self.index}, top_k={self.top_k}, "
                f"groups={self.num_groups}, experts={self.num_experts}, "
                f"optional={optional}, device={self.device})")


class RoutingStats:
    """An ordered collection of ``LayerStats`` (one per MoE layer) over shared named groups.

    Row g of every layer's tensors is group ``group_names[g]``; ``meta`` is free JSON information
    (model name, dtype, ...) that must read back from JSON unchanged: no tuples, str keys only.
    Layers may live on different devices (a model split with ``device_map``); ``stack`` needs one
    device, ``to_cpu()`` gives it.

    ``stats[i]`` is the i-th layer (by position), ``stats["model.layers.3.mlp.gate"]`` a layer by
    name; ``len(stats)`` is the number of layers; iteration yields the layers in order.
    """

    def __init__(self, layers: Iterable[LayerStats], group_names: Sequence[str],
                 meta: Optional[Mapping] = None):
        _check_iterable(layers, "RoutingStats: layers", "an iterable of LayerStats")
        layers = tuple(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, LayerStats):
                raise TypeError(f"RoutingStats: layers[{i}] must be a LayerStats, got "
                                f"{type(layer).__name__}")
        if isinstance(group_names, str):
            raise TypeError(f"RoutingStats: group_names must be a sequence of str, got the str "
                            f"{group_names!r}")
        _check_iterable(group_names, "RoutingStats: group_names", "a sequence of str")
        group_names = tuple(group_names)
        for g, gname in enumerate(group_names):
            if not isinstance(gname, str):
                raise TypeError(f"RoutingStats: group_names[{g}]={gname!r} must be a str")
        _check_unique(group_names, "RoutingStats: group_names")
        _check_unique([layer.name for layer in layers], "RoutingStats: layer names")
        for layer in layers:
            if layer.num_groups != len(group_names):
                raise ValueError(f"RoutingStats: layer {layer.name!r} has {layer.num_groups} "
                                 f"groups (rows), expected len(group_names)={len(group_names)}")
        if meta is not None and not isinstance(meta, Mapping):
            raise TypeError(f"RoutingStats: meta must be a dict or None, got "
                            f"{type(meta).__name__}")
        meta = dict(meta) if meta is not None else {}
        check_json(meta, "RoutingStats: meta")
        self._layers = layers
        self._by_name = {layer.name: layer for layer in layers}
        self._group_names = group_names
        self.meta = meta

    # ---------------------------------------------------------------------------------------
    # access

    @property
    def layers(self) -> List[LayerStats]:
        return list(self._layers)

    @property
    def layer_names(self) -> List[str]:
        return [layer.name for layer in self._layers]

    @property
    def layer_indices(self) -> List[Optional[int]]:
        return [layer.index for layer in self._layers]

    @property
    def group_names(self) -> List[str]:
        return list(self._group_names)

    @property
    def num_groups(self) -> int:
        return len(self._group_names)

    @property
    def num_experts(self) -> int:
        """E, when every layer has the same number of experts (else ValueError)."""
        by_e = _layers_by_num_experts(self._layers)
        if not by_e:
            raise ValueError("RoutingStats.num_experts: there are no layers")
        if len(by_e) > 1:
            raise ValueError(f"RoutingStats.num_experts: layers differ in num_experts: "
                             f"{_describe_by_e(by_e)}")
        return next(iter(by_e))

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[LayerStats]:
        return iter(self._layers)

    def __contains__(self, name) -> bool:
        return name in self._by_name

    def __getitem__(self, key: Union[int, str]) -> LayerStats:
        if isinstance(key, str):
            try:
                return self._by_name[key]
            except KeyError:
                raise KeyError(f"RoutingStats: no layer named {key!r}; layers are "
                               f"{_short_list(self.layer_names)}") from None
        if isinstance(key, bool) or not hasattr(key, "__index__"):
            raise TypeError(f"RoutingStats: layer key must be an int position or a str name, "
                            f"got {type(key).__name__}")
        i = key.__index__()
        if not -len(self._layers) <= i < len(self._layers):
            raise IndexError(f"RoutingStats: layer position {i} out of range for "
                             f"{len(self._layers)} layers")
        return self._layers[i]

    def stack(self, field: str) -> torch.Tensor:
        """One field of every layer stacked on a new leading axis: ``[L, ...]``.

        counts/weight_sum/prob_sum -> [L,G,E], tokens/entropy_sum -> [L,G], coact -> [L,E,E].
        Fields with an expert axis need the same E in every layer; all layers on one device.
        """
        if field not in FIELDS:
            raise ValueError(f"RoutingStats.stack: field={field!r} must be one of {FIELDS}")
        if not self._layers:
            raise ValueError(f"RoutingStats.stack({field!r}): there are no layers to stack")
        missing = [layer.name for layer in self._layers if getattr(layer, field) is None]
        if missing:
            raise ValueError(f"RoutingStats.stack: field {field!r} is None in layers "
                             f"{_short_list(missing)}")
        if "E" in _DIMS[field]:
            by_e = _layers_by_num_experts(self._layers)
            if len(by_e) > 1:
                raise ValueError(f"RoutingStats.stack({field!r}): needs the same num_experts in "
                                 f"every layer, got {_describe_by_e(by_e)}")
        devices = {layer.device for layer in self._layers}
        if len(devices) > 1:
            raise ValueError(f"RoutingStats.stack({field!r}): layers are on several devices "
                             f"{sorted(map(str, devices))}; call .to_cpu() or .to(device) first")
        return torch.stack([getattr(layer, field) for layer in self._layers])

    # ---------------------------------------------------------------------------------------
    # copies

    def to(self, device, *, copy: bool = False) -> "RoutingStats":
        """A new RoutingStats with every layer on ``device`` (tensors already there are shared,
        as with ``Tensor.to``, unless ``copy``)."""
        return self._with_layers([layer.to(device, copy=copy) for layer in self._layers])

    def to_cpu(self) -> "RoutingStats":
        """An independent host copy: never shares memory with the recording buffers, which the
        recorder may zero and reuse (also when they already are on the CPU)."""
        return self.to("cpu", copy=True)

    def clone(self) -> "RoutingStats":
        return self._with_layers([layer.clone() for layer in self._layers])

    def _with_layers(self, layers, group_names=None) -> "RoutingStats":
        return RoutingStats(layers, self._group_names if group_names is None else group_names,
                            copy.deepcopy(self.meta))

    # ---------------------------------------------------------------------------------------
    # groups

    def group(self, names: Union[str, Sequence[str]]) -> "RoutingStats":
        """The statistics of one group (a str) or of several (a list, rows in its order).

        ``coact`` counts pairs over all groups and cannot be split by group: it is kept when the
        selection holds every group and set to None otherwise. Tensors are copies.
        """
        if isinstance(names, str):
            wanted = [names]
        else:
            _check_iterable(names, "RoutingStats.group: names", "a str or a sequence of str")
            wanted = list(names)
        for n in wanted:
            if not isinstance(n, str):
                raise TypeError(f"RoutingStats.group: group names must be str, got {n!r}")
        _check_unique(wanted, "RoutingStats.group: names")
        position = {n: g for g, n in enumerate(self._group_names)}
        unknown = [n for n in wanted if n not in position]
        if unknown:
            raise KeyError(f"RoutingStats.group: unknown groups {unknown}; groups are "
                           f"{_short_list(self.group_names)}")
        keep_coact = set(wanted) == set(self._group_names)
        layers = []
        for layer in self._layers:
            rows = torch.tensor([position[n] for n in wanted], dtype=torch.long,
                                device=layer.device)
            changes = {n: (t.index_select(0, rows) if "G" in _DIMS[n] else t.clone())
                       for n, t in layer.tensors().items()}
            if not keep_coact:
                changes["coact"] = None
            layers.append(layer.replace(**changes))
        return self._with_layers(layers, wanted)

    # ---------------------------------------------------------------------------------------
    # merging

    def merge(self, other: "RoutingStats") -> "RoutingStats":
        """A copy of self with ``other``'s numbers added in; neither input changes.

        Layers are matched by name (self's order is kept) and must agree in index, top_k, E and
        the optional fields present. Groups are matched by name; groups only in ``other`` become
        new rows after self's. ``coact`` is summed. Sums are fp32 (and exact for the integer
        fields). other's tensors are moved to the device of self's matching layer, so device
        buffers can be merged straight into a host total. ``meta`` is self's, plus other's keys
        that self lacks; keys whose values differ keep self's, with a warning.
        """
        if not isinstance(other, RoutingStats):
            raise TypeError(f"RoutingStats.merge: other must be a RoutingStats, got "
                            f"{type(other).__name__}")
        _check_has_data(self, "RoutingStats.merge: self")
        _check_has_data(other, "RoutingStats.merge: other")
        return RoutingStats.merge_all([self, other])

    @staticmethod
    def merge_all(items: Iterable["RoutingStats"]) -> "RoutingStats":
        """``items[0].merge(items[1]).merge(items[2])...`` in one pass: each output tensor is
        allocated once, so accumulating thousands of per-batch flushes stays linear in size.

        Integer sums that pass int64's maximum are a ValueError, found by their sign (one host
        sync per device, after all the additions)."""
        _check_iterable(items, "RoutingStats.merge_all: items", "an iterable of RoutingStats")
        items = list(items)
        if not items:
            raise ValueError("RoutingStats.merge_all: items must hold at least one RoutingStats")
        for i, item in enumerate(items):
            if not isinstance(item, RoutingStats):
                raise TypeError(f"RoutingStats.merge_all: items[{i}] must be a RoutingStats, "
                                f"got {type(item).__name__}")
            _check_has_data(item, f"RoutingStats.merge_all: items[{i}]")
        first = items[0]
        for other in items[1:]:
            _check_mergeable(first, other)
        group_names = list(first._group_names)
        position = {n: g for g, n in enumerate(group_names)}
        for other in items[1:]:
            for n in other._group_names:
                if n not in position:
                    position[n] = len(group_names)
                    group_names.append(n)
        G = len(group_names)
        sums = []
        for base in first._layers:
            out = {}
            for name, t in base.tensors().items():
                if "G" in _DIMS[name]:
                    acc = t.new_zeros((G,) + tuple(t.shape[1:]))
                    acc[: t.shape[0]] = t
                else:
                    acc = t.clone()
                out[name] = acc
            sums.append(out)
        for i, other in enumerate(items):
            negative = _negative_count(other._layers)
            if negative:
                raise ValueError(f"RoutingStats.merge: counts are never negative, but input {i} "
                                 f"holds {negative}")
        for other in items[1:]:
            for base, out in zip(first._layers, sums):
                layer = other._by_name[base.name]
                rows = torch.tensor([position[n] for n in other._group_names], dtype=torch.long,
                                    device=base.device)
                for name, t in layer.tensors().items():
                    t = t.to(base.device)
                    if "G" in _DIMS[name]:
                        out[name].index_add_(0, rows, t)
                    else:
                        out[name] += t
            # Counts are >= 0, so adding one more input's to sums <= 2**63 - 1 wraps at most
            # once, to a negative value: checked after every input (past 2**64 a sum checked
            # only at the end could wrap back to >= 0)
            negative = _negative_count(first._layers, sums)
            if negative:
                raise ValueError(f"RoutingStats.merge: counts overflow int64: merged sums must "
                                 f"be <= 2**63 - 1, got {negative}, wrapped around")
        layers = [base.replace(**out) for base, out in zip(first._layers, sums)]
        meta = copy.deepcopy(first.meta)
        differ = []
        for other in items[1:]:
            for key, value in other.meta.items():
                if key not in meta:
                    meta[key] = copy.deepcopy(value)
                elif meta[key] != value and key not in differ:
                    differ.append(key)
        if differ:   # e.g. statistics of two models, or counted with other settings
            warnings.warn(f"RoutingStats.merge: the inputs' meta differ in {differ}; the merged "
                          f"meta keeps the first input's values", UserWarning, stacklevel=3)
        return RoutingStats(layers, group_names, meta)

    # ---------------------------------------------------------------------------------------
    # persistence

    def manifest(self) -> dict:
        """The JSON manifest ``save`` writes next to the tensors."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "moe_route_version": _package_version(),
            "num_groups": self.num_groups,
            "group_names": self.group_names,
            "layers": [{"name": layer.name, "index": layer.index, "top_k": layer.top_k,
                        "num_experts": layer.num_experts, "fields": layer.fields_present()}
                       for layer in self._layers],
            "meta": self.meta,
        }

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the directory ``path`` (``tensors.safetensors`` + ``manifest.json``), atomically.

        Everything is written and fsynced in a temporary sibling directory, which then takes
        ``path``'s place: by an atomic exchange (Linux ``renameat2``) when ``path`` already holds a
        save, so that ``path`` always holds the complete old or the complete new save; where the
        exchange is unavailable, the old save is renamed aside first and restored if the rename
        in fails. An error while writing leaves ``path`` as it was and removes the temporary
        directory. ``path`` may be absent or a previous RoutingStats save (never anything else:
        an unrelated directory is not replaced). Parent directories are created. The directory
        and its files get the modes a plain create gives them (the umask's), except that a
        replaced save's directory keeps its mode (``moe_route._atomic``, "Permissions").
        """
        st = _safetensors("RoutingStats.save")
        _check_has_data(self, "RoutingStats.save: the statistics")
        path = os.path.abspath(os.fspath(path))
        manifest = self.manifest()
        check_json(manifest["meta"], "RoutingStats.save: meta")
        negative = _negative_count(self._layers)
        if negative:  # load would refuse the file
            raise ValueError(f"RoutingStats.save: {', '.join(COUNT_FIELDS)} must be >= 0, got "
                             f"{negative}")
        _refuse_foreign(path)
        parent, base = os.path.split(path)
        os.makedirs(parent, exist_ok=True)
        kept = mode_of(path)
        tmp, mode = make_temp(parent, f".{base}.tmp-", directory=True, private=kept is not None)
        try:
            # copy=True: one writable, unshared host tensor per key (safetensors refuses tensors
            # sharing storage, as views into one recorder buffer would).
            tensors = {f"layers.{i}.{name}": t.detach().to("cpu", copy=True).contiguous()
                       for i, layer in enumerate(self._layers)
                       for name, t in layer.tensors().items()}
            manifest_file = os.path.join(tmp, MANIFEST_FILE)
            with open(manifest_file, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1, allow_nan=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            tensors_file = os.path.join(tmp, TENSORS_FILE)
            st.save_file(tensors, tensors_file, metadata={"format": "pt"})
            # safetensors writes 0o600; the manifest has the mode open() gives a new file here
            os.chmod(tensors_file, mode_of(manifest_file))
            fsync_file(tensors_file)
            os.chmod(tmp, mode if kept is None else kept)
            fsync_dir(tmp)
            _move_into_place(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(parent)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "RoutingStats":
        """Read a ``save`` directory; tensors on the CPU. Errors name the file and what is wrong."""
        st = _safetensors("RoutingStats.load")
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"RoutingStats.load: {path!r} is not a directory (a save is a "
                                    f"directory with {MANIFEST_FILE} and {TENSORS_FILE})")
        manifest_file = os.path.join(path, MANIFEST_FILE)
        tensors_file = os.path.join(path, TENSORS_FILE)
        for f in (manifest_file, tensors_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"RoutingStats.load: missing {f!r}")
        manifest = read_json(manifest_file, f"RoutingStats.load: {manifest_file!r}")
        _check_manifest(manifest, manifest_file)
        try:
            tensors = st.load_file(tensors_file)
        except Exception as exc:  # safetensors raises its own SafetensorError on a damaged file
            raise ValueError(f"RoutingStats.load: {tensors_file!r} is not a readable safetensors "
                             f"file ({type(exc).__name__}: {exc})") from None
        expected_keys = set()
        layers = []
        for i, entry in enumerate(manifest["layers"]):
            fields = {}
            for name in entry["fields"]:
                key = f"layers.{i}.{name}"
                expected_keys.add(key)
                if key not in tensors:
                    raise ValueError(f"RoutingStats.load: {tensors_file!r} has no tensor {key!r} "
                                     f"(the manifest lists field {name!r} for layer "
                                     f"{entry['name']!r})")
                fields[name] = tensors[key]
            try:
                layer = LayerStats(entry["name"], entry["index"], entry["top_k"], **fields)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"RoutingStats.load: {tensors_file!r}, layer {i}: {exc}") \
                    from None
            if layer.num_experts != entry["num_experts"]:
                raise ValueError(f"RoutingStats.load: {tensors_file!r}, layer {i} "
                                 f"({entry['name']!r}): counts has {layer.num_experts} experts, "
                                 f"the manifest says num_experts={entry['num_experts']}")
            layers.append(layer)
        extra = sorted(set(tensors) - expected_keys)
        if extra:
            raise ValueError(f"RoutingStats.load: {tensors_file!r} holds tensors the manifest "
                             f"does not list: {_short_list(extra)}")
        negative = _negative_count(layers)
        if negative:
            raise ValueError(f"RoutingStats.load: {tensors_file!r}: {', '.join(COUNT_FIELDS)} "
                             f"must be >= 0, got {negative}")
        try:
            return cls(layers, manifest["group_names"], manifest["meta"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"RoutingStats.load: {path!r}: {exc}") from None

    # ---------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        L = len(self._layers)
        if not L:
            return f"RoutingStats(layers=0, groups={self.num_groups})"
        by_e = _layers_by_num_experts(self._layers)
        experts = "/".join(str(e) for e in sorted(by_e))
        top_k = "/".join(str(k) for k in sorted({layer.top_k for layer in self._layers}))
        per_layer = sorted({int(layer.tokens.sum()) for layer in self._layers})
        tokens = (f"{per_layer[0]:,}" if len(per_layer) == 1
                  else f"{per_layer[0]:,}..{per_layer[-1]:,}")
        optional = [n for n in OPTIONAL_FIELDS
                    if any(getattr(layer, n) is not None for layer in self._layers)]
        devices = ",".join(sorted({str(layer.device) for layer in self._layers}))
        return (f"RoutingStats(layers={L}, groups={self.num_groups} "
                f"{_short_list(self.group_names, 4)}, experts={experts}, top_k={top_k}, "
                f"tokens/layer={tokens}, optional={optional}, device={devices})")


# -------------------------------------------------------------------------------------------
# helpers


def _check_unique(names: Sequence[str], what: str) -> None:
    seen, dup = set(), []
    for n in names:
        if n in seen and n not in dup:
            dup.append(n)
        seen.add(n)
    if dup:
        raise ValueError(f"{what} must be unique, got duplicates {dup}")


def _check_iterable(value, what: str, expected: str) -> None:
    if not isinstance(value, Iterable):
        raise TypeError(f"{what} must be {expected}, got {type(value).__name__}")


def _check_has_data(stats: RoutingStats, what: str) -> None:
    on_meta = [layer.name for layer in stats if layer.device.type == "meta"]
    if on_meta:
        raise ValueError(f"{what} must hold data, got layers {_short_list(on_meta, 4)} on the "
                         f"meta device (shapes only, no data)")


def _negative_count(layers: Sequence[LayerStats], sums: Optional[Sequence[dict]] = None
                    ) -> Optional[str]:
    """``"layer 'name' tokens (min -3)"`` for the first count tensor holding a value < 0, else
    None; ``sums``: each layer's ``{field: tensor}`` in place of its own. One host sync per
    device, not one per tensor: merge may run on CUDA buffers."""
    minima: Dict[torch.device, list] = {}
    for l, layer in enumerate(layers):
        for name in COUNT_FIELDS:
            t = getattr(layer, name) if sums is None else sums[l].get(name)
            if t is not None and t.numel():
                minima.setdefault(t.device, []).append((layer.name, name, t.min()))
    for entries in minima.values():
        values = torch.stack([m for _, _, m in entries]).tolist()
        for (layer_name, name, _), value in zip(entries, values):
            if value < 0:
                return f"layer {layer_name!r} {name} (min {value})"
    return None


def _short_list(items: Sequence, limit: int = 8) -> str:
    items = list(items)
    if len(items) <= limit:
        return repr(items)
    return repr(items[:limit])[:-1] + f", ... (+{len(items) - limit} more)]"


def _layers_by_num_experts(layers) -> Dict[int, List[str]]:
    by_e: Dict[int, List[str]] = {}
    for layer in layers:
        by_e.setdefault(layer.num_experts, []).append(layer.name)
    return by_e


def _describe_by_e(by_e: Dict[int, List[str]]) -> str:
    return "; ".join(f"E={e} in {_short_list(names, 4)}" for e, names in sorted(by_e.items()))


def _check_mergeable(a: RoutingStats, b: RoutingStats) -> None:
    names_a, names_b = set(a.layer_names), set(b.layer_names)
    if names_a != names_b:
        raise ValueError(f"RoutingStats.merge: layers must match by name; only in self: "
                         f"{_short_list(sorted(names_a - names_b))}, only in other: "
                         f"{_short_list(sorted(names_b - names_a))}")
    for la in a:
        lb = b[la.name]
        for attr in ("num_experts", "top_k", "index"):
            va, vb = getattr(la, attr), getattr(lb, attr)
            if va != vb:
                raise ValueError(f"RoutingStats.merge: layer {la.name!r} has {attr}={va} in self "
                                 f"but {attr}={vb} in other")
        fa, fb = la.fields_present(), lb.fields_present()
        if fa != fb:
            raise ValueError(f"RoutingStats.merge: layer {la.name!r} holds fields {fa} in self "
                             f"but {fb} in other; merged sums need the same fields")


def _package_version() -> Optional[str]:
    import moe_route
    version = getattr(moe_route, "__version__", None)
    if version is not None:
        return str(version)
    try:
        from importlib import metadata
        return metadata.version("moe_route")
    except Exception:  # not installed as a distribution: a source checkout on sys.path
        return None


def _safetensors(caller: str):
    try:
        import safetensors.torch as st
    except ImportError as exc:
        raise ImportError(f"{caller} needs the safetensors package (pip install safetensors): "
                          f"{exc}") from None
    return st


def _check_manifest(manifest, manifest_file: str) -> None:
    def bad(msg):
        raise ValueError(f"RoutingStats.load: {manifest_file!r}: {msg}")

    def need_int(key, value, minimum, none_ok=False):
        if none_ok and value is None:
            return
        integer = is_int(value)
        if not integer or value < minimum:
            bad(f"{key}={value!r} must be {'null or ' if none_ok else ''}an int >= {minimum}"
                + ("" if integer else f", got {type(value).__name__}"))

    if not isinstance(manifest, dict):
        bad(f"expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        bad(f"format={manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("version")
    need_int("version", version, 1)
    if version > FORMAT_VERSION:
        bad(f"version={version} is newer than this moe_route "
            f"({_package_version()}) reads (<= {FORMAT_VERSION}); upgrade moe_route")
    for key, kind in (("group_names", list), ("layers", list), ("meta", dict)):
        if not isinstance(manifest.get(key), kind):
            bad(f"{key} must be a JSON {kind.__name__}, got {manifest.get(key)!r:.80}")
    need_int("num_groups", manifest.get("num_groups"), 0)
    if manifest["num_groups"] != len(manifest["group_names"]):
        bad(f"num_groups={manifest['num_groups']} disagrees with "
            f"len(group_names)={len(manifest['group_names'])}")
    for i, entry in enumerate(manifest["layers"]):
        if not isinstance(entry, dict):
            bad(f"layers[{i}] must be an object, got {entry!r:.80}")
        for key in ("name", "index", "top_k", "num_experts", "fields"):
            if key not in entry:
                bad(f"layers[{i}] has no {key!r}")
        need_int(f"layers[{i}].index", entry["index"], 0, none_ok=True)
        need_int(f"layers[{i}].top_k", entry["top_k"], 1)
        need_int(f"layers[{i}].num_experts", entry["num_experts"], 1)
        fields = entry["fields"]
        if (not isinstance(fields, list) or any(f not in FIELDS for f in fields)
                or any(f not in fields for f in REQUIRED_FIELDS)):
            bad(f"layers[{i}].fields={fields!r} must list {REQUIRED_FIELDS} and any of "
                f"{OPTIONAL_FIELDS}")


def _refuse_foreign(path: str) -> None:
    """Refuse to replace anything at ``path`` that is not a previous save: replacing removes it."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        raise FileExistsError(f"RoutingStats.save: {path!r} exists and is not a directory; "
                              f"refusing to replace it")
    entries = set(os.listdir(path))
    # Only our two file names may be there; a readable manifest must be ours (another tool's
    # directory may hold a manifest.json too), an unreadable one is a damaged save of ours.
    is_save = entries <= {TENSORS_FILE, MANIFEST_FILE}
    if is_save and MANIFEST_FILE in entries:
        try:
            manifest = read_json(os.path.join(path, MANIFEST_FILE), "the manifest")
        except (OSError, ValueError):
            manifest = None
        if manifest is not None:
            is_save = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    if not is_save:
        raise FileExistsError(f"RoutingStats.save: {path!r} exists and is not a RoutingStats "
                              f"save (entries {_short_list(sorted(entries), 4)}); refusing to "
                              f"replace it")


def _move_into_place(tmp: str, path: str) -> None:
    """Put the finished directory ``tmp`` at ``path``; ``tmp`` is gone afterwards."""
    if not os.path.lexists(path):
        os.rename(tmp, path)  # fails (ENOTEMPTY/EEXIST) if a save appeared meanwhile: no clobber
        return
    if _exchange(tmp, path):  # tmp now holds the old save
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = os.path.join(os.path.dirname(path),
                         f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:12]}")
    os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where the libc
    or file system cannot (the caller then falls back to rename-aside)."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError, TypeError):
            _renameat2 = False
    if not _renameat2:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"RoutingStats.save: exchanging {a!r} and {b!r} failed: "
                       f"{os.strerror(err)}")
