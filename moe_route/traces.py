"""Traces: every routed token's experts, weights, group and token id per layer (``record(model,
trace=True)``), as a ``Trace`` in memory and one safetensors file on disk (``save_trace``,
``load_trace``, and ``record(model, trace_path=PATH)``, which streams the file as it records).
"""
from __future__ import annotations

import copy
import json
import os
import struct
import weakref
from collections.abc import Iterable, Mapping
from typing import Optional, Sequence

import torch

from moe_route._atomic import make_temp, write_atomic
from moe_route._checks import is_int
from moe_route._json import check as check_json, parse as parse_json
from moe_route.stats import _package_version, _safetensors

__all__ = ["Trace", "TraceFile", "save_trace", "load_trace", "open_trace"]

# -------------------------------------------------------------------------------------------
# traces on disk: one safetensors file. Per layer the tensors "{layer}.ids", ".weights",
# (".tokens", ".logits") and ".group" (int32 [N], an index into the metadata's "group_names",
# -1 for an ungrouped token); the metadata also lists the layers in order and, from version 3,
# their expert counts ("experts", null where a hand-made trace gave none), and "meta" holds the
# trace's meta as a JSON object, with "moe_route_version" beside it (both optional: readers of
# any version ignore metadata keys they do not know). Version 1 (the first
# save_trace) kept every token's group name as JSON in the metadata instead, which outgrows
# safetensors' 100 MB header limit (names like "fra_Latn/123" take 16 bytes each: about 520k
# tokens over 12 layers); versions 1 and 2 (no token ids, no expert counts) are still read.

TRACE_FORMAT = "moe_route.trace"
TRACE_VERSION = "3"
_TRACE_TENSORS = ("ids", "weights", "tokens", "logits")
_INT_DTYPES = (torch.int16, torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Trace(dict):
    """A trace: ``{layer name: {"ids", "weights", "group", ("tokens", "experts", "logits")}}``
    (``Recorder.trace``, ``load_trace``), a plain dict of layers with ``meta`` beside them: free
    JSON information (the recorder's ``meta``: the model it came from, the options of the run),
    written and read with the trace. Anything that takes a trace takes a plain dict too."""

    def __init__(self, layers=(), meta: Optional[Mapping] = None):
        if meta is not None and not isinstance(meta, Mapping):
            raise TypeError(f"Trace: meta must be a dict or None, got {type(meta).__name__}")
        super().__init__(layers)
        self.meta = copy.deepcopy(dict(meta or {}))

    def copy(self) -> "Trace":
        """A shallow copy of the layers, with a copy of ``meta``."""
        return Trace(self, self.meta)

    def __repr__(self) -> str:
        return f"Trace({super().__repr__()}, meta={self.meta!r})"


def _check_trace_layer(name, layer, where: str, checked_group=None) -> int:
    """Check one layer of a trace; returns its row count N. ``checked_group``: a group list
    already checked (the previous layer's): an equal one is not checked name by name again."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"{where}: layer names must be non-empty str, got {name!r}")
    if not isinstance(layer, Mapping):
        raise TypeError(f"{where}: trace[{name!r}] must be a mapping with 'ids', 'weights' and "
                        f"'group', got {type(layer).__name__}")
    for key in ("ids", "weights", "group"):
        if key not in layer:
            raise ValueError(f"{where}: trace[{name!r}] has no {key!r} (it holds "
                             f"{sorted(layer)})")
    ids, weights = layer["ids"], layer["weights"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in _INT_DTYPES:
        raise ValueError(f"{where}: trace[{name!r}]['ids'] must be an int16/int32/int64 tensor "
                         f"[N, k], got {getattr(ids, 'dtype', type(ids).__name__)} of shape "
                         f"{tuple(getattr(ids, 'shape', ()))}")
    N = ids.shape[0]
    if ids.shape[1] < 1:
        raise ValueError(f"{where}: trace[{name!r}]['ids'] must be [N, k] with k >= 1 (each "
                         f"row the token's experts), got shape {tuple(ids.shape)}")
    if not isinstance(weights, torch.Tensor) or weights.dtype not in _FLOAT_DTYPES \
            or weights.shape != ids.shape:
        raise ValueError(f"{where}: trace[{name!r}]['weights'] must be a float tensor of the ids' "
                         f"shape {tuple(ids.shape)}, got "
                         f"{getattr(weights, 'dtype', type(weights).__name__)} of shape "
                         f"{tuple(getattr(weights, 'shape', ()))}")
    tokens = layer.get("tokens")
    if tokens is not None and (not isinstance(tokens, torch.Tensor) or tokens.dtype
                               not in _INT_DTYPES or tuple(tokens.shape) != (N,)):
        raise ValueError(f"{where}: trace[{name!r}]['tokens'] must be an int tensor [N={N}] (the "
                         f"token id of each row, -1 where unknown), got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} of shape "
                         f"{tuple(getattr(tokens, 'shape', ()))}")
    experts = layer.get("experts")
    if experts is not None:
        if not is_int(experts) or experts < 1:
            raise ValueError(f"{where}: trace[{name!r}]['experts'] must be the layer's expert "
                             f"count, an int >= 1, got {experts!r}")
        if N and not 0 <= int(ids.min()) <= int(ids.max()) < experts:
            raise ValueError(f"{where}: trace[{name!r}]['ids'] must be in [0, experts="
                             f"{experts}), got [{int(ids.min())}, {int(ids.max())}]")
    logits = layer.get("logits")
    if logits is not None and (not isinstance(logits, torch.Tensor) or logits.dim() != 2
                               or logits.dtype not in _FLOAT_DTYPES or logits.shape[0] != N
                               or (experts is not None and logits.shape[1] != experts)):
        raise ValueError(f"{where}: trace[{name!r}]['logits'] must be a float tensor [N={N}, E], "
                         f"got {getattr(logits, 'dtype', type(logits).__name__)} of shape "
                         f"{tuple(getattr(logits, 'shape', ()))}")
    group = layer["group"]
    if isinstance(group, str) or not isinstance(group, Sequence):
        raise ValueError(f"{where}: trace[{name!r}]['group'] must be a list of N={N} group names "
                         f"(str, or None for an ungrouped token), got {type(group).__name__}")
    if len(group) != N or (group != checked_group
                           and not all(g is None or isinstance(g, str) for g in group)):
        bad = next((g for g in group if g is not None and not isinstance(g, str)), None)
        raise ValueError(f"{where}: trace[{name!r}]['group'] must hold N={N} group names (str "
                         f"or None), got {len(group)} entries"
                         + (f", one of them {bad!r}" if bad is not None else ""))
    return N



def save_trace(trace: Mapping, path, *, meta: Optional[Mapping] = None) -> None:
    """Write a trace (``Recorder.trace``'s layout) to the safetensors file ``path``.

    ``trace``: ``{layer name: {"ids" [N, k] int, "weights" [N, k] float, "group" [N names or
    None], optionally "tokens" [N] int, "experts" E and "logits" [N, E] float}}``. Tensors keep
    their dtype; group names are stored once, tokens refer to them by index. ``meta`` (a dict
    that reads back from JSON unchanged; default: ``trace.meta`` for a ``Trace``, else none) is
    saved with it, and ``load_trace`` gives it back as ``.meta``. The file is written
    and fsynced under a temporary name in the same directory, then renamed over ``path``:
    ``path`` holds the old file or the complete new one, never a part. Parent directories are
    created.
    """
    where = "save_trace"
    st = _safetensors(where)
    if not isinstance(trace, Mapping):
        raise TypeError(f"{where}: trace must be a mapping {{layer: {{'ids', 'weights', "
                        f"'group', ...}}}} (Recorder.trace), got {type(trace).__name__}")
    given = "meta" if meta is not None else "trace.meta"
    if meta is None:
        meta = getattr(trace, "meta", None) or {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"{where}: {given} must be a dict or None, got {type(meta).__name__}")
    meta = dict(meta)
    check_json(meta, f"{where}: {given}")
    tensors, table, written = {}, {}, set()
    last_group, last_codes = None, None
    for name, layer in trace.items():
        _check_trace_layer(name, layer, where, checked_group=last_group)
        for key in _TRACE_TENSORS:
            if layer.get(key) is not None:
                tensors[f"{name}.{key}"] = _own_storage(layer[key].detach().to("cpu"), written)
        group = list(layer["group"])
        if group != last_group:  # the layers of one model usually share the token list
            last_group = group
            last_codes = torch.tensor([-1 if g is None else table.setdefault(g, len(table))
                                       for g in group], dtype=torch.int32)
        tensors[f"{name}.group"] = last_codes.clone()
    experts = [layer.get("experts") for layer in trace.values()]
    if any(e is not None for e in experts) or any(f"{n}.tokens" in tensors for n in trace):
        metadata = _file_metadata(list(trace), list(table), meta, experts)
    else:   # nothing of version 3's: readable by the moe_route releases that read version 2
        metadata = _file_metadata(list(trace), list(table), meta)
    write_atomic(path, lambda tmp: st.save_file(tensors, tmp, metadata=metadata))


def _file_metadata(layers: list, group_names: list, meta: Mapping,
                   experts: Optional[list] = None) -> dict:
    """A trace file's safetensors metadata: version 3 with the layers' expert counts (None where
    unknown), version 2 without them."""
    metadata = {"format": TRACE_FORMAT, "layers": json.dumps(layers),
                "group_names": json.dumps(group_names), "meta": json.dumps(dict(meta))}
    package = _package_version()
    if package is not None:
        metadata["moe_route_version"] = package
    if experts is None:
        metadata["version"] = "2"
    else:
        metadata.update(version=TRACE_VERSION,
                        experts=json.dumps([None if e is None else int(e) for e in experts]))
    return metadata


def _own_storage(t: torch.Tensor, written: set) -> torch.Tensor:
    """``t`` if it is the whole of a storage not ``written`` yet (``written`` gets it), else a
    contiguous copy: safetensors refuses tensors that share memory (a hand-made trace's views of
    one tensor, or one tensor in several layers), and a recorded trace is not copied again (that
    would double the memory a large trace takes while it is written). A lazily negated view
    (``_neg_view``) is resolved first: safetensors would write its memory, not its values."""
    t = t.resolve_neg()
    storage = t.untyped_storage()
    whole = t.is_contiguous() and t.storage_offset() == 0 and \
        storage.nbytes() == t.numel() * t.element_size() and storage.data_ptr() not in written
    if not whole:
        return t.clone(memory_format=torch.contiguous_format)
    if t.numel():
        written.add(storage.data_ptr())
    return t


def _identity(path: str) -> tuple:
    """What tells a file from one saved over its path: device, inode, size, modification time."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class TraceFile(Mapping):
    """A trace file opened for reading a layer at a time (``open_trace``): a read-only mapping
    ``{layer name: layer}`` in saved order, with ``meta``, whose layers are read from the file
    each time they are looked up (no tensor is kept; each lookup gives new objects), so an
    analysis that goes through the layers one by one (``trace_agreement``,
    ``trace_statistics``, ``trace_token_routing``, ``trace_transitions``) holds one layer of the
    trace at a time. A file replaced or removed after it was opened is refused at the next
    lookup."""

    def __init__(self, path, where: str = "open_trace"):
        _safetensors(where)
        self.path = path = os.path.abspath(os.fspath(path))
        self._where = f"{where}: {path!r}"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: {path!r} is not a file (a trace is one "
                                    f".safetensors file written by save_trace)")
        from safetensors import safe_open

        try:
            self._identity = _identity(path)
            with safe_open(path, framework="pt") as f:
                metadata, self._stored = f.metadata() or {}, set(f.keys())
            if _identity(path) != self._identity:
                raise ValueError("it was replaced while being opened")
        except Exception as exc:   # safetensors' own SafetensorError on a damaged file
            raise _unreadable(self._where, exc) from None
        if metadata.get("format") != TRACE_FORMAT:
            raise ValueError(f"{self._where} is not a moe_route trace: its metadata says "
                             f"format={metadata.get('format')!r}, expected {TRACE_FORMAT!r} (a "
                             f"RoutingStats save is a directory: RoutingStats.load)")
        version = self._version = metadata.get("version")
        if version not in ("1", "2", TRACE_VERSION):
            raise ValueError(f"{self._where} is trace format version {version!r}; this "
                             f"moe_route reads versions '1' to {TRACE_VERSION!r}")
        keys = {"1": ("groups",), "2": ("layers", "group_names")}.get(
            version, ("layers", "group_names", "experts"))
        meta = {key: parse_json(metadata.get(key, ""), f"{self._where}: the {key!r} metadata")
                for key in keys}
        want = dict if version == "1" else list
        for key in keys:
            if not isinstance(meta[key], want):
                raise ValueError(f"{self._where}: the {key!r} metadata must be a JSON "
                                 f"{'object' if want is dict else 'array'}, got "
                                 f"{type(meta[key]).__name__}")
        saved = parse_json(metadata.get("meta", "{}"), f"{self._where}: the 'meta' metadata")
        if not isinstance(saved, dict):
            raise ValueError(f"{self._where}: the 'meta' metadata must be a JSON object, got "
                             f"{type(saved).__name__}")
        self.meta = saved
        self._v1_groups = meta.get("groups")
        self._group_table = meta.get("group_names")
        layers = list(meta["groups"] if version == "1" else meta["layers"])
        if not all(isinstance(name, str) for name in layers):
            raise ValueError(f"{self._where}: the 'layers' metadata must list layer names (str), "
                             f"got {[n for n in layers if not isinstance(n, str)][:3]}")
        experts = meta.get("experts", [None] * len(layers))
        if len(experts) != len(layers):
            raise ValueError(f"{self._where}: the 'experts' metadata must list one count per "
                             f"layer ({len(layers)}), got {len(experts)}")
        self._experts = dict(zip(layers, experts))
        listed = {f"{name}.{key}" for name in layers for key in (*_TRACE_TENSORS, "group")}
        extra = sorted(self._stored - listed)
        if extra:
            raise ValueError(f"{self._where} holds tensors of no listed layer: {extra[:8]}")
        self._last = None   # (codes, names tuple) of the last layer read: the next often shares
        self._metadata = metadata

    def __iter__(self):
        return iter(self._experts)

    def __len__(self) -> int:
        return len(self._experts)

    def __contains__(self, name) -> bool:
        return name in self._experts

    def __getitem__(self, name: str) -> dict:
        if name not in self._experts:
            raise KeyError(name)
        count = self._experts[name]
        layer = {} if count is None else {"experts": count}
        from safetensors import safe_open

        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self._where} is gone (it was opened as a trace; the "
                                    f"layers are read when looked up)")
        try:
            # a rerun saved over the path has the same layers and metadata: the file's identity
            # (an atomic save is a new inode), before and after the read, tells it apart
            same = _identity(self.path) == self._identity
            if same:
                with safe_open(self.path, framework="pt") as f:
                    same = f.metadata() == self._metadata and set(f.keys()) == self._stored
                    if same:
                        for key in (*_TRACE_TENSORS, "group"):
                            if f"{name}.{key}" in self._stored:
                                layer[key] = f.get_tensor(f"{name}.{key}")
                same = same and _identity(self.path) == self._identity
        except Exception as exc:
            raise _unreadable(self._where, exc) from None
        if not same:
            raise ValueError(f"{self._where} changed since it was opened (its layers are read "
                             f"when looked up); open it again")
        checked, cached = None, None
        if self._version == "1":
            layer["group"] = list(self._v1_groups[name])
        else:
            codes = layer.get("group")
            if self._last is not None and isinstance(codes, torch.Tensor) \
                    and torch.equal(codes, self._last[0]):
                layer["group"] = checked = list(self._last[1])  # names checked at the last lookup
            else:
                layer["group"] = _group_names(codes, self._group_table,
                                              f"{self._where}: layer {name!r}")
            cached = (codes, tuple(layer["group"]))
        try:
            _check_trace_layer(name, layer, self._where, checked_group=checked)
        except TypeError as exc:  # a damaged file, not a wrong argument
            raise ValueError(str(exc)) from None
        if cached is not None:
            self._last = cached
        return layer

    def __repr__(self) -> str:
        return f"TraceFile({self.path!r}, {len(self)} layers, meta={self.meta!r})"


def _unreadable(where: str, exc: Exception) -> ValueError:
    return ValueError(f"{where} is not a readable safetensors file ({type(exc).__name__}: {exc})")


def open_trace(path) -> TraceFile:
    """Open a trace file (``save_trace``, ``record(trace_path=)``) for reading a layer at a time:
    a read-only mapping of its layers, each read from the file when it is looked up (the layer
    ``load_trace`` gives: tensors on the CPU in their saved dtypes, ids int32 or int64, weights
    and logits in the trace's dtype, no value converted), and its ``meta``. The analyses take it
    wherever they take a trace, holding one layer at a time; for a trace larger than memory.
    ``load_trace`` reads it all at once."""
    return TraceFile(path)


def load_trace(path, layers: Optional[Sequence] = None) -> Trace:
    """Read a file written by ``save_trace`` / ``Recorder.save_trace`` / ``record(trace_path=)``:
    the same ``{layer name: {"ids", "weights", "group", ("tokens", "experts", "logits")}}`` dict,
    layers in saved order, tensors on the CPU in their saved dtypes (files of format versions 1
    and 2 have no "tokens" or "experts"), as a ``Trace`` whose ``.meta`` is the saved meta (empty
    for a file saved without). ``layers``: the layers to read (in saved order), by decoder-layer
    index or name (``layer_positions``); the others' tensors are not read (``open_trace`` reads
    one layer at a time as it is asked for). Errors name the file and what is wrong with it."""
    from moe_route.hf.patch import layer_positions

    where = "load_trace"
    if layers is not None and (isinstance(layers, (str, bytes))
                               or not isinstance(layers, Iterable)):
        raise TypeError(f"{where}: layers must be a list of layer keys (decoder-layer indices or "
                        f"names) or None (every layer), got {layers!r}")
    f = TraceFile(path, where)
    names = list(f)
    if layers is not None:
        wanted = set(layer_positions(names, layers, f"{where}: {f.path!r}"))
        names = [n for p, n in enumerate(names) if p in wanted]
    return Trace({name: f[name] for name in names}, meta=f.meta)


def _group_names(codes, names, where: str) -> list:
    """Group names of a layer's tokens from their codes."""
    if codes is None or codes.dim() != 1 or codes.dtype != torch.int32:
        raise ValueError(f"{where}: needs a 'group' tensor, int32 [N], got "
                         f"{None if codes is None else (codes.dtype, tuple(codes.shape))}")
    if codes.numel() and (int(codes.min()) < -1 or int(codes.max()) >= len(names)):
        raise ValueError(f"{where}: group codes must be in [-1, {len(names)}) (the file names "
                         f"{len(names)} groups), got [{int(codes.min())}, {int(codes.max())}]")
    table = list(names) + [None]  # code -1 picks the last entry
    return [table[c] for c in codes.tolist()]


# -------------------------------------------------------------------------------------------
# streamed traces (record(model, trace_path=PATH)): the recorder's host parts are appended to a
# spill file beside PATH whenever they pass TRACE_BUFFER_BYTES, and at the end of the context the
# safetensors file is written from the spill, a tensor at a time, so host memory holds one
# buffer's worth of trace however long the run. The file holds the tensors and metadata that
# save_trace writes for the same trace; group names are numbered in order of first appearance,
# layer by layer within each spill, which is save_trace's numbering when the layers see the same
# groups (the layers of one model do, an encoder-decoder's two stacks need not).

TRACE_BUFFER_BYTES = 256 << 20
_COPY_BYTES = 16 << 20   # the piece a spilled tensor is copied into the file by
_ST_DTYPES = {torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
              torch.float64: "F64"}


def check_trace_path(trace_path, where: str) -> str:
    """``trace_path`` as an absolute path, or a TypeError/ValueError saying why it cannot be one
    (not a path, or a directory)."""
    if not isinstance(trace_path, (str, os.PathLike)):
        raise TypeError(f"{where}: trace_path must be a str or os.PathLike (a .safetensors file), "
                        f"got {type(trace_path).__name__}")
    path = os.path.abspath(os.fspath(trace_path))
    if os.path.isdir(path):
        raise ValueError(f"{where}: trace_path={os.fspath(trace_path)!r} is a directory; name the "
                         f".safetensors file to write")
    return path


class TraceSpill:
    """The trace file being recorded: tensors appended per layer and key as they come, and
    ``finish`` writing them into ``path`` as one safetensors file, atomically.

    The spill is a private temporary file in ``path``'s directory (created here, so a directory
    that cannot be written fails before anything is recorded); ``finish`` and ``discard`` remove
    it, and so does the garbage collector if neither ran.
    """

    def __init__(self, path: str, where: str):
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
            # a short name: the file's own may be near the 255 bytes a name can have
            self.file, _ = make_temp(parent, f".{os.path.basename(path)[:64]}.", ".spill",
                                     private=True)
        except OSError as exc:
            raise type(exc)(f"{where}: cannot write trace_path={path!r}: {exc}") from None
        self.path = path
        self._out = open(self.file, "r+b")
        self._size = 0
        self._failed: Optional[BaseException] = None   # a write that failed: the spill is unusable
        # layer -> {"experts": E, key: [dtype, trailing shape, rows, [(offset, nbytes), ...]]}
        self._layers: dict[str, dict] = {}
        self.group_codes: dict[str, int] = {}   # group name -> its index in the file
        self._cleanup = weakref.finalize(self, _remove_spill, self._out, self.file)

    def append(self, layer: str, experts: int, key: str, t: torch.Tensor) -> None:
        """Add rows ``t`` ([n, ...], every call the same dtype and trailing shape) to
        ``{layer}.{key}``."""
        t = t.detach().resolve_neg().contiguous()
        entry = self._layers.setdefault(layer, {"experts": experts})
        spec = entry.setdefault(key, [t.dtype, tuple(t.shape[1:]), 0, []])
        if (spec[0], spec[1]) != (t.dtype, tuple(t.shape[1:])):
            raise RuntimeError(f"trace: {layer}.{key} was {spec[0]} [*, {spec[1]}] and is now "
                               f"{t.dtype} {tuple(t.shape)}")
        nbytes = t.numel() * t.element_size()
        data = t.reshape(-1).view(torch.uint8).numpy().data
        self._write(lambda: self._out.write(data) if nbytes else None)
        spec[2] += t.shape[0]
        spec[3].append((self._size, nbytes))
        self._size += nbytes

    def flush(self) -> None:
        """Hand what was appended to the operating system (out of this process's buffers)."""
        self._write(self._out.flush)

    def _write(self, io) -> None:
        """``io()`` on the spill, which must not have failed before; if it fails, part of a
        write may be in the file and no offset holds after it: the spill is unusable."""
        self._check_usable()
        try:
            io()
        except BaseException as exc:
            self._failed = exc
            raise

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"trace: writing the spill file {self.file!r} failed earlier "
                               f"({type(self._failed).__name__}: {self._failed}); the trace "
                               f"cannot be completed") from None

    def finish(self, meta: Mapping) -> None:
        """Write ``path`` from the spill (the layers in the order they first came), then remove
        the spill."""
        self.flush()
        header, pieces, offset = {}, [], 0
        tensors = [(f"{name}.{key}", entry[key]) for name, entry in self._layers.items()
                   for key in (*_TRACE_TENSORS, "group") if key in entry]
        # widest elements first (safetensors' own order): every tensor starts aligned to its
        # element size, since the data does to 8 bytes
        tensors.sort(key=lambda item: -item[1][0].itemsize)
        for key, (dtype, tail, rows, chunks) in tensors:
            nbytes = sum(n for _, n in chunks)
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": [rows, *tail],
                           "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            pieces.extend(chunks)
        header["__metadata__"] = _file_metadata(
            list(self._layers), list(self.group_codes), meta,
            [e["experts"] for e in self._layers.values()])
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)   # the data starts 8-byte aligned, as safetensors writes

        def write(tmp: str) -> None:
            src = self._out
            with open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(blob)))
                f.write(blob)
                for start, nbytes in pieces:
                    src.seek(start)
                    while nbytes > 0:
                        piece = src.read(min(_COPY_BYTES, nbytes))
                        if not piece:
                            raise OSError(f"trace: the spill file {self.file!r} ended early")
                        f.write(piece)
                        nbytes -= len(piece)

        try:
            write_atomic(self.path, write)
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the spill (what was recorded is lost; ``path`` is left as it was)."""
        self._cleanup()


def _remove_spill(out, file: str) -> None:
    out.close()
    try:
        os.remove(file)
    except FileNotFoundError:
        pass
