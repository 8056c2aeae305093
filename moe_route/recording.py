"""``record(model)``: routing statistics of every MoE layer, accumulated on device by the gate.

    with moe_route.record(model) as rec:
        with rec.group("fra_Latn"):
            model(**batch)                      # every (unmasked) token -> group "fra_Latn"
        rec.set_groups(lang_ids, names=langs)   # or per sequence [B] / per token [B, S]
        model(**batch)
    stats = rec.stats                           # RoutingStats on the CPU

Each patched router accumulates into its own ``GateStats`` buffers (on the router's device, so
``device_map`` models work) inside the fused gate: no hook, no host sync while the model runs.
Which statistics row a token goes to is worked out once per model call, from the model's
``input_ids`` / ``attention_mask`` (a forward pre-hook that only builds a small index tensor; an
encoder-decoder's encoder routers use its ``input_ids`` / ``attention_mask``, its decoder routers
``decoder_input_ids`` / ``decoder_attention_mask``, in a forward and in ``generate()``):
padding (``attention_mask == 0``), ``ignore_token_ids`` (template or special tokens) and, with
``tokens="prompt"`` or ``"generated"``, the other phase of ``generate()`` are skipped. A call
given a 4-D mask (``generate()`` with a static cache builds one) has its padding read from the
2-D mask given to ``generate()``, at the call's positions, or else from the 4-D mask's
diagonal (a token that does not attend to itself is padding: bool True attends, an additive
float mask's 0 attends); a mask that neither reads counts every token, with a warning.

**generate().** While recording, ``model.generate`` is wrapped so that the recorder knows the
prompt: the tokens at positions below the length of the ids (or embeddings) given to
``generate`` are the prompt, every later position is generated, whatever the cache holds (a
conversation continued on its ``past_key_values`` has its new turn counted as prompt). Each
position counts once per ``generate``: without a KV cache (``use_cache=False``) every step
re-runs the whole sequence, and only its new position is counted. A sequence of a batch that has
ended is skipped from then on: ``generate``'s own stopping criteria (its EOS, ``stop_strings``,
a ``StoppingCriteria`` of the caller's) say which sequence is done, and the token that finished
it, fed back once more, and whatever is fed to it after (padding, or without an EOS the tokens it
goes on generating) while the rest of the batch goes on are not counted, so a sequence's
statistics are the same batched or alone (where those criteria cannot be seen, a ``generate``
that does not build them through ``_get_stopping_criteria``, a sequence ends at the first EOS
id of the generation config fed at a generated position). ``set_groups`` ids per sequence ``[B]``
also cover the ``num_beams`` / ``num_return_sequences`` copies generate makes of each sequence.
Every routed token counts, which includes the candidate tokens of assisted or prompt-lookup
decoding that are then rejected, and every beam of a beam search. Model calls outside
``generate`` (a decoding loop of your own) tell the phases apart by the KV cache: a call with
positions before it is generated.

A loop layer (Inkling2-Loop runs some decoder layers several times per forward) routes once per
pass, and each pass is a layer of its own in the statistics and the trace, named
``"<router path>@pass<p>"`` with the decoder layer's index; the layers come in the order a
forward routes them (pre-loop layers, the loop layers' pass 0, pass 1, ..., post-loop layers).
Analyses key such statistics by name (``analysis.layer_keys``), and ``steer``/``replay`` take
the same names.

Each group gets its statistics row when it becomes current (``group()`` entered or left,
``set_groups``), between model calls, and a call's hook reads the rows as tensors: a model
under ``torch.compile`` records group after group, batch after batch of per-sequence groups,
in the graphs of its first calls, without recompiling for a new group name. The statistics list
the groups in the order they became current, and leave out a group that no model call ran in.

The device buffers hold up to ``max_groups`` rows: 256 at first (or ``max_groups`` if fewer),
grown as more groups arrive, so a large ``max_groups`` costs memory only for the groups a run
uses. When a batch needs a row and none is free, the buffers are flushed to the host total
(``RoutingStats.merge``) between model calls, so per-sequence statistics over any number of
sequences take bounded device memory.

The statistics are the fused gate's (``GateStats``): ``weight_sum`` holds the gate's weights,
which are the router's outputs except in families whose router post-processes them in PyTorch
(Gemma4's per-expert scale, Ernie's clamped renormalisation; ``Adapter.returns``).

``trace=True`` also keeps the per-token routing of every layer on the CPU: ids (int16 when E <=
32767), weights (fp16 unless ``trace_dtype=torch.float32``), the statistics row and input token
id of each token (-1 for a call given ``inputs_embeds``), the layer's expert count and, with
``trace_logits=True``, the router logits (``rec.trace``, ``rec.save_trace(path)``). A router
call on a GPU casts its rows to those dtypes there and leaves them there; they come to the host
together, one copy per device and dtype, whenever ``recording.TRACE_STAGE_BYTES`` (64 MiB) of
them wait, and when the trace is read or spilled: no sync and no pinned host memory per router
call. The trace grows Python lists in each router call, which a compiled graph cannot trace
(Dynamo would guard on their lengths and recompile at every call): under ``torch.compile`` the
step is a call of the op ``moe_route::trace_rows`` in the graph, marked as having a side effect
so that no pass drops or reorders it, which runs the step as the graph runs. A traced model
compiles with ``fullgraph=True`` and a new ``record()`` of it runs in the same graphs (the op
names its recorder by the model). Where torch cannot mark an op's side effect the step breaks
the graph instead.
``load_trace(path)`` reads a saved trace back in the same layout. A trace is a ``Trace``: the
dict of layers, with the recorder's ``meta`` as ``trace.meta``, saved with it.

``trace_path=PATH`` traces into that file instead of memory: the host parts go to a spill file
beside PATH each time they pass ``trace_buffer_bytes`` (default ``traces.TRACE_BUFFER_BYTES``,
256 MiB; their Python objects counted), and the end of the context writes PATH from it (the file
``save_trace`` writes, atomically), so a trace of any length takes about that much host memory,
and twice its size on disk while it is written. A smaller buffer spills more often, in smaller
writes. A context that ends in an error writes nothing (PATH keeps what it held) and removes the
spill. The recorder is entered once, and ``rec.trace`` is refused: ``load_trace(PATH)``.

``meta`` (the statistics' and the trace's) gets ``"model"``, the model's
``config._name_or_path`` (the Hub id or local path it was loaded from), unless the given meta
has a ``"model"`` key or the model has no such path.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Iterable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from moe_route._checks import check_bool, check_int, is_int
from moe_route._device import cacheable, copy_on, module_device, to_device
from moe_route._json import check as check_json
from moe_route.hf.model_calls import CacheLengths, past_length, stack_of, stacks, watch
from moe_route.hf.patch import acquire, release
from moe_route.ops import GateStats
from moe_route.stats import LayerStats, RoutingStats
from moe_route import traces
from moe_route.traces import _TRACE_TENSORS, Trace, TraceSpill, check_trace_path, save_trace

__all__ = ["record", "Recorder"]

TOKENS = ("all", "prompt", "generated")
FIRST_ROWS = 256  # device rows allocated on entry (the default max_groups); more as groups arrive


class Recorder:
    """Routing statistics of one model while its ``record`` context is open (see module doc)."""

    def __init__(self, model: nn.Module, *, dense: bool = True, coact: bool = False,
                 tokens: str = "all", ignore_token_ids: Optional[Iterable[int]] = None,
                 max_groups: int = 256, default_group: str = "all", meta: Optional[dict] = None,
                 trace: bool = False, trace_logits: bool = False,
                 trace_dtype: torch.dtype = torch.float16, trace_path=None,
                 trace_buffer_bytes: Optional[int] = None):
        if tokens not in TOKENS:
            raise ValueError(f"record: tokens={tokens!r} must be one of {TOKENS}")
        max_groups = check_int("record", "max_groups", max_groups, 1)
        for name, value in (("dense", dense), ("coact", coact), ("trace", trace),
                            ("trace_logits", trace_logits)):
            check_bool("record", name, value)
        if not isinstance(default_group, str):
            raise TypeError(f"record: default_group must be a str, got "
                            f"{type(default_group).__name__}")
        self.model = model
        self.dense, self.coact, self.tokens = dense, coact, tokens
        self.ignore_token_ids = None if ignore_token_ids is None else _token_ids(ignore_token_ids)
        self._ignore_on: dict = {}   # ignore_token_ids copied to each device a call ran on
        self.max_groups = max_groups
        if meta is not None and not isinstance(meta, Mapping):
            raise TypeError(f"record: meta must be a dict or None, got {type(meta).__name__}")
        self.meta = {**_model_meta(model), **(meta or {})}
        check_json(self.meta, "record: meta")  # not at the first flush, after the model calls
        if trace_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"record: trace_dtype={trace_dtype} must be float16, bfloat16 or "
                             f"float32")
        self.trace_path = None if trace_path is None else check_trace_path(trace_path, "record")
        if trace and trace_path is not None:
            raise ValueError("record: trace=True keeps the trace in host memory (rec.trace) and "
                             "trace_path streams it into a file instead; pass one of them")
        self.trace_on = trace or trace_path is not None
        if trace_buffer_bytes is None:
            trace_buffer_bytes = traces.TRACE_BUFFER_BYTES
        elif trace_path is None:
            raise ValueError("record: trace_buffer_bytes bounds the host memory of a trace "
                             "streamed to a file: pass trace_path too")
        else:
            trace_buffer_bytes = check_int("record", "trace_buffer_bytes", trace_buffer_bytes, 1,
                                           means="bytes of trace held before they are spilled")
        self.trace_buffer_bytes = trace_buffer_bytes
        self.trace_logits, self.trace_dtype = trace_logits, trace_dtype
        self._trace: dict[str, dict[str, list]] = {}
        self._staged: list = []    # (parts list, position) of the trace parts still on a device
        self._staged_bytes = 0
        self._spill: Optional[TraceSpill] = None   # trace_path: the file being recorded
        self._buffered = 0                        # host bytes of trace parts not spilled yet
        self._streamed = False                    # trace_path: a context ran (and wrote it)
        self._lock = threading.RLock()
        self._handle = None
        self._buffers: dict[str, GateStats] = {}   # per routing site (RouterState.site)
        self._layers: dict[str, tuple] = {}         # site -> (decoder-layer index, top_k)
        self._attached: dict = {}                   # router -> the stats it was given
        self._rows: dict[str, int] = {}          # group name -> device row
        self._row_names: Optional[list] = None   # trace: list(self._rows), shared until it changes
        self._capacity = 0                       # device rows the buffers have
        self._used: set = set()                  # rows of groups a model call ran in
        self._devices: set = set()               # the routers' devices
        self._current: Optional[_Rows] = None    # the current groups' rows (_regroup)
        self._parts: list[RoutingStats] = []    # flushed, merged once when read
        self._context: list[str] = [default_group]
        self._batch: Optional[_GroupIds] = None   # set_groups
        # each stack's (model.stacks: the model, or an encoder-decoder's encoder and decoder)
        # latest call: {stack path: {device: token rows [T]}}
        self._calls: dict = {}
        self._call_tokens: dict = {}   # trace: {stack path: the call's input ids [B*S] int32}
        # trace under torch.compile: {stack path: (the graph's token ids, the trace's copy)}
        self._graph_tokens: dict = {}
        self._key = id(model)   # the graph's name for this model's recorder (_trace_rows)
        self._hooks: list = []
        self._generation: Optional[_Generation] = None   # inside the wrapped model.generate
        self._decoder = ""                                # the stack generate decodes with
        self._unwrap = None
        self._warned_embeds = False
        self._warned_outside = False
        self._warned_mask = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "Recorder":
        if self._handle is not None:  # its cleanup would take the active entry's buffers off
            raise RuntimeError("record: this record() context is already active; it cannot be "
                               "entered again inside itself")
        if self._streamed:   # its file was written (or given up) when the context ended
            raise RuntimeError(f"record: a recorder with trace_path={self.trace_path!r} writes "
                               f"its trace when its context ends and cannot be entered again; "
                               f"make a new record()")
        self._handle = acquire(self.model, self._unhook)
        try:
            if self.trace_path is not None:
                self._spill = TraceSpill(self.trace_path, "record")
            for name, state in self._handle.routers.items():
                if state.stats is not None:
                    raise RuntimeError(f"record: {name} is already being recorded; nested "
                                       f"record() contexts on one model are not supported")
            devices = {}
            # an earlier entry that ended in an error left its numbers on the device: into the
            # host total with them before the buffers are made anew
            self._flush_rows()
            self._capacity = min(self.max_groups, FIRST_ROWS)
            self._devices = set()
            for site, state, _ in self._handle.sites():  # a loop layer's passes: one each
                device = devices.get(state.name)
                if device is None:
                    device = devices[state.name] = module_device(
                        self.model.get_submodule(state.name))
                    if device is None:
                        raise ValueError(f"record: {state.name}'s weights are on the meta "
                                         f"device and no accelerate hook says where it runs")
                self._buffers[site] = GateStats.zeros(self._capacity, state.num_experts,
                                                      device=device, dense=self.dense,
                                                      coact=self.coact)
                self._layers[site] = (state.index, state.top_k)
                self._devices.add(device)
            paths = stacks(self.model)
            for name, state in self._handle.routers.items():
                per_pass = tuple(self._buffers[state.site(p)] for p in range(state.passes))
                state.stats = self._attached[name] = per_pass if state.passes > 1 else per_pass[0]
                state.groups = functools.partial(self._token_rows, stack_of(paths, name))
                if self.trace_on:
                    state.trace = functools.partial(self._trace_call, stack_of(paths, name))
            if self.trace_on:
                _TRACING[self._key] = self
            self._hooks = watch(self.model, self._on_call, self._end_call)
            self._decoder = _decoder_path(self.model) if len(paths) > 1 else ""
            self._wrap_generate()
            self._regroup()
        except BaseException:
            self._detach()
            if self._spill is not None:
                self._spill.discard()
                self._spill = None
            raise
        self._streamed = self.trace_path is not None
        return self

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                self._flush_rows()
                if self._spill is not None:
                    self._spill_parts()
                    self._spill.finish(self.meta)
        finally:
            self._detach()
            if self._spill is not None:
                self._spill.discard()   # after an error: the file is not written
                self._spill = None
        return False

    def _unhook(self):
        """Take the call hooks and the ``generate`` wrapper off the model."""
        while self._hooks:
            self._hooks.pop().remove()
        if self._unwrap is not None:
            self._unwrap()
            self._unwrap = None

    def _detach(self):
        self._unhook()
        if self._handle is not None:
            for name, state in self._handle.routers.items():
                if name in self._attached and state.stats is self._attached[name]:
                    state.stats, state.groups, state.trace = None, None, None
            self._attached = {}
            if _TRACING.get(self._key) is self:
                del _TRACING[self._key]
            self._graph_tokens = {}
            release(self._handle, self._unhook)
            self._handle = None
        self._retire()   # after an error the rows stay used, for the next entry's flush

    # -- groups ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def group(self, name: str):
        """Every token of the model calls inside the block goes to group ``name``."""
        if not isinstance(name, str):
            raise TypeError(f"Recorder.group: name must be a str, got {type(name).__name__}")
        self._context.append(name)
        self._regroup()
        try:
            yield self
        finally:
            self._context.pop()
            self._regroup()

    def set_groups(self, ids: Optional[torch.Tensor], names: Optional[Sequence[str]] = None):
        """Groups for the following model calls, per sequence (``[B]``) or per token (``[B, S]``).

        ``ids`` are ints >= 0, dense or not (document ids, hashes); ``-1`` skips a sequence or
        token. With ``names``, id i is group ``names[i]``, else group ``str(i)``; only the names of
        the ids given are read (a corpus's names indexed by document id cost a batch its own
        groups), and they must be distinct. ``None`` goes back to the context group. Per-token ids
        apply to calls whose input has exactly that shape (a prompt); per-sequence ids also cover
        ``generate()``'s decoding steps.
        """
        if ids is None:
            self._batch = None
            self._regroup()
            return
        ids = torch.as_tensor(ids)
        if ids.dtype not in (torch.int32, torch.int64) or ids.dim() not in (1, 2):
            raise ValueError(f"Recorder.set_groups: ids must be an int tensor of shape [B] or "
                             f"[B, S], got {ids.dtype} of shape {tuple(ids.shape)}")
        # ids may be sparse (document ids, hashes): each model call looks its rows up by the
        # ids' ranks among the distinct ids (codes), in a table of one entry per group
        present, codes = torch.unique(ids, return_inverse=True)
        present = present.tolist()
        if present and present[0] < -1:
            raise ValueError(f"Recorder.set_groups: ids must be group ids >= 0 or -1 (skip), got "
                             f"{present[0]}")
        if present and present[0] == -1:
            present, codes = present[1:], codes - 1  # -1 (skip) picks the table's last entry
        if names is None:
            names = [str(i) for i in present]
        else:
            if not isinstance(names, Sequence):   # an iterable: its i-th item names id i
                names = list(names)
            if present and present[-1] >= len(names):
                raise ValueError(f"Recorder.set_groups: id {present[-1]} has no name "
                                 f"(len(names)={len(names)})")
            names = [str(names[i]) for i in present]
            twice = sorted(name for name, n in Counter(names).items() if n > 1)
            if twice:
                raise ValueError(f"Recorder.set_groups: names must be distinct, got {twice} "
                                 f"more than once")
        if len(names) > self.max_groups:
            raise ValueError(f"Recorder.set_groups: ids of {len(names)} groups, more than "
                             f"max_groups={self.max_groups}")
        self._batch = _GroupIds(codes, names)
        self._regroup()

    def per_sequence(self, names: Sequence[str]):
        """One group per sequence of the next batch: sequence b -> group ``names[b]``."""
        self.set_groups(torch.arange(len(names)), names)

    def _regroup(self) -> None:
        """Give the current groups their statistics rows: set_groups' groups in the order of
        their ids, and the context group (the rows of a router run outside a forward; left
        without one when set_groups' groups fill max_groups), after a flush if the new ones do
        not fit. Done on the host when the groups change, between model calls: a call's hook
        only reads the rows as tensors, so a compiled model does not guard on group names (nor
        recompile for each new group)."""
        if self._handle is None:   # not entered: __enter__ does it
            return
        devices = self._devices.union(self._current.devices if self._current else ())
        self._retire()
        context = self._context[-1]
        names = [] if self._batch is None else self._batch.names
        new = set(names).union([context]).difference(self._rows)
        if len(self._rows) + len(new) > self.max_groups:
            self._flush_rows()
        rows = [self._row_of(name) for name in names]
        fits = context in self._rows or len(self._rows) < self.max_groups
        context_row = self._row_of(context) if fits else None
        self._current = _Rows(rows if names else [context_row],
                              None if self._batch is None else self._batch.codes,
                              context_row, devices)

    def _retire(self) -> None:
        """Note the current groups' rows as used if a model call ran in them."""
        if self._current is not None and self._current.called:
            self._used.update(self._current.rows)
        self._current = None

    def _row_of(self, name: str) -> int:
        row = self._rows.get(name)
        if row is None:
            row = self._rows[name] = len(self._rows)
            self._row_names = None
            if row == self._capacity:
                self._grow(min(2 * row, self.max_groups))
        return row

    def _grow(self, rows: int) -> None:
        """Give every site's buffers ``rows`` group rows, keeping their numbers. In place (same
        tensors): the routers hold them."""
        with self._lock:
            for buf in self._buffers.values():
                for f, t in zip(GateStats.NAMES, buf.buffers()):
                    if t is not None and f != "coact":  # coact [E, E] is over all groups
                        t.resize_((rows, *t.shape[1:]))[self._capacity:].zero_()
            self._capacity = rows

    # -- per call ----------------------------------------------------------------------------

    def _wrap_generate(self):
        """Wrap ``model.generate`` (an instance attribute, removed on exit) so that model calls
        inside it know the prompt's length, its attention mask and which sequences have ended
        (module doc); and ``model._get_stopping_criteria``, which generate() calls to build its
        stopping criteria, so that the criteria's per-sequence done flags reach the recorder."""
        model = self.model
        generate = getattr(model, "generate", None)
        if not callable(generate):
            return
        wrapped = {}

        @functools.wraps(generate)
        def recorded_generate(*args, **kwargs):
            outer, self._generation = self._generation, _Generation.of(model, args, kwargs)
            try:
                return generate(*args, **kwargs)
            finally:
                self._generation = outer

        wrapped["generate"] = (recorded_generate, generate, "generate" in vars(model))
        model.generate = recorded_generate
        get_criteria = getattr(model, "_get_stopping_criteria", None)
        if callable(get_criteria):
            @functools.wraps(get_criteria)
            def observed_criteria(*args, **kwargs):
                criteria = get_criteria(*args, **kwargs)
                gen = self._generation
                if gen is None or not isinstance(criteria, list):
                    return criteria
                return _observed(criteria, gen)

            wrapped["_get_stopping_criteria"] = (observed_criteria, get_criteria,
                                                 "_get_stopping_criteria" in vars(model))
            model._get_stopping_criteria = observed_criteria

        def unwrap():
            for name, (wrapper, original, had_own) in wrapped.items():
                if vars(model).get(name) is wrapper:
                    if had_own:
                        setattr(model, name, original)
                    else:
                        delattr(model, name)
        self._unwrap = unwrap

    def _on_call(self, stack: str, call: dict):
        """Build the token -> statistics-row map of a call of one of the model's stacks (the
        model, or an encoder-decoder's encoder or decoder) from its arguments by name (traceable
        by torch.compile, which runs module hooks inside the graph). No host sync with
        tokens="all" outside generate(), nor inside it but for a static cache's length, read once
        per generate() (``CacheLengths``); the host tensors it needs (the ``set_groups`` table,
        ``ignore_token_ids``, the EOS ids) are copied to a device once, not at each call."""
        input_ids = call.get("input_ids")
        embeds = call.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        rows_on = self._calls[stack] = {}
        if self.trace_on:  # once per call, for every layer's trace rows (on the call's device)
            self._call_tokens[stack] = None if input_ids is None else \
                input_ids.reshape(-1).to(torch.int32, copy=True)
        if ref is None:
            return
        B, S = ref.shape[0], ref.shape[1]
        device = ref.device
        gen = self._generation if stack == self._decoder else None
        kept, generated = self._positions(gen, call, S)
        if not kept:  # the other phase: its groups are named all the same
            if self._fits(B, S):
                self._current.called = True
            rows_on[device] = torch.full((B * S,), -1, dtype=torch.int32, device=device)
            return
        rows = self._batch_rows(B, S, device)
        if len(kept) < S:
            rows = torch.where(_within(kept, S, device), rows, -1)
        if gen is not None:
            done = gen.done
            if done is not None and done.shape[0] == B:
                # generate()'s own stopping criteria said which sequences are done: none of the
                # tokens fed to them since counts (the one that finished them included)
                rows = torch.where(done.to(device)[:, None], -1, rows)
            elif gen.stop_ids is not None and input_ids is not None:
                # fallback where the criteria's flags do not cover this call's sequences (a
                # generate() that does not build them through _get_stopping_criteria, or a beam
                # search, whose running beams never hold an EOS): a sequence ends at its EOS
                rows = torch.where(self._ended(gen, input_ids, generated), -1, rows)
        attended = self._attended(gen, call, B, S)
        if attended is not None:
            rows = torch.where(attended.to(device), rows, -1)
        if self.ignore_token_ids is not None:
            if input_ids is not None:
                ignored = copy_on(self._ignore_on, self.ignore_token_ids, device)
                rows = torch.where(torch.isin(input_ids, ignored), -1, rows)
            elif not self._warned_embeds:
                self._warned_embeds = True
                warnings.warn("record: a model call was given inputs_embeds without input_ids; "
                              "ignore_token_ids cannot be applied to its tokens, which are "
                              "counted", stacklevel=2)
        rows_on[device] = rows.reshape(-1).to(torch.int32)

    def _attended(self, gen, call: dict, B: int, S: int) -> Optional[torch.Tensor]:
        """[B, S] bool: which of a call's tokens are not padding, or None (all of them). From the
        call's attention mask: a 2-D one's last S columns; inside generate(), for a call given
        another form of mask (a static cache's 4-D one), the 2-D mask generate() was given, at
        the call's positions (positions past its end, generated, are not padding); else a 4-D
        (or 3-D) mask's diagonal, whether each token attends to itself, which only padding does
        not (bool: True attends; float, additive: 0 attends; int: nonzero attends). A mask that
        none of these reads counts every token, with a warning (once)."""
        mask = call.get("attention_mask")
        if isinstance(mask, Mapping):  # one mask per attention type: any has the diagonal
            mask = mask.get("full_attention", next(iter(mask.values()), None))
        if not isinstance(mask, torch.Tensor):
            mask = None
        if mask is not None and mask.dim() == 2 and mask.shape[0] == B:
            return mask[:, -S:] != 0
        if gen is not None and gen.mask is not None and B % gen.mask.shape[0] == 0:
            given = gen.mask[:, gen.past:gen.past + S] != 0
            if given.shape[1] < S:    # generated positions
                given = torch.cat([given, given.new_ones(given.shape[0], S - given.shape[1])], 1)
            return given.repeat_interleave(B // given.shape[0], 0)  # beams, samples
        if mask is None:
            return None
        if mask.dim() in (3, 4) and mask.shape[0] == B and mask.shape[-2] == S:
            K = mask.shape[-1]
            past = gen.past if gen is not None else 0 if K == S else past_length(call, S)
            if past + S <= K:
                square = (mask if mask.dim() == 3 else mask[:, 0])[:, :, past:past + S]
                diagonal = torch.diagonal(square, dim1=1, dim2=2)
                if diagonal.dtype == torch.bool:
                    return diagonal
                return diagonal == 0 if diagonal.is_floating_point() else diagonal != 0
        if not self._warned_mask:
            self._warned_mask = True
            warnings.warn(f"record: a model call of [{B}, {S}] tokens was given an attention_mask "
                          f"of shape {tuple(mask.shape)}, which record() cannot read: none of "
                          f"its tokens is taken for padding; pass the 2-D [B, S] mask",
                          UserWarning, stacklevel=2)
        return None

    def _positions(self, gen, call: dict, S: int) -> tuple[range, Optional[int]]:
        """``(kept, generated)``: the indices of a call's S positions that its phase keeps (a
        ``range``) and, inside generate(), the index of its first generated position (S: none).
        Outside generate() ``generated`` is None and ``kept`` all or none, as the KV cache tells
        (no host sync with tokens="all"). Python ints, so that the masks made from them are
        built on the call's device, not copied there."""
        if gen is None:
            if self.tokens == "all":
                return range(S), None
            generated = past_length(call, S) > 0  # may sync: a cache_position, a static cache
            return (range(S) if generated == (self.tokens == "generated") else range(0)), None
        past = gen.past = past_length(call, S, gen.lengths)
        start, stop = 0, S
        if past == 0 and gen.routed > 0:  # no cache: the whole sequence again; count what is new
            start = gen.routed
        if 0 < past < gen.routed:         # a cache cut back (assisted decoding's rejects)
            gen.ended.clear()
        gen.routed = max(gen.routed, past + S)
        if gen.prompt is not None:
            generated = min(max(gen.prompt - past, 0), S)
        else:
            generated = 0 if past > 0 else S
        if self.tokens == "generated":
            start = max(start, generated)
        elif self.tokens == "prompt":
            stop = generated
        return range(start, stop), generated

    @staticmethod
    def _ended(gen, input_ids: torch.Tensor, generated: int) -> torch.Tensor:
        """[B, S]: the tokens of sequences that have ended, from the first stop id fed at a
        generated position (the call's index ``generated`` and after) on, and every token of a
        sequence that ended in an earlier call."""
        device = input_ids.device
        fed = torch.arange(input_ids.shape[1], device=device) >= generated
        ended = (torch.isin(input_ids, copy_on(gen.stop_on, gen.stop_ids, device))
                 & fed).cumsum(1) > 0
        before = gen.ended.get(device)
        if gen.past > 0 and before is not None and before.shape[0] == input_ids.shape[0]:
            ended |= before[:, None]  # a cache continued: sequences ended before stay ended
        gen.ended[device] = ended[:, -1]
        return ended

    def _batch_codes(self, B: int) -> torch.Tensor:
        """The set_groups codes for a call of B sequences: per-sequence codes repeated over
        generate()'s copies of each sequence (beams, samples) when B is a multiple of them."""
        codes = self._batch.codes
        if codes.dim() == 1 and codes.shape[0] != B and self._generation is not None and \
                B % codes.shape[0] == 0:
            codes = codes.repeat_interleave(B // codes.shape[0])
        return codes

    def _fits(self, B: int, S: int) -> bool:
        """Whether the set_groups ids apply to a call of [B, S] tokens."""
        if self._batch is None:
            return True
        codes = self._batch_codes(B)
        return codes.shape[0] == B and (codes.dim() == 1 or codes.shape[1] == S)

    def _batch_rows(self, B, S, device) -> torch.Tensor:
        """[B, S] int64 on ``device``: each token's statistics row (-1: skipped), from the
        current groups' rows (``_regroup``), which it marks called."""
        if not self._fits(B, S):
            codes = self._batch_codes(B)
            per_token = codes.dim() == 2 and codes.shape[0] == B
            hint = ("; per-token ids cover only a call of exactly their shape: for generate()'s "
                    "decoding steps or an encoder-decoder's other stack give per-sequence ids "
                    "[B], or record(tokens='prompt')") if per_token else ""
            raise ValueError(f"record: set_groups gave ids of shape {tuple(codes.shape)}, but "
                             f"the model was called on [{B}, {S}] tokens{hint}")
        # a store, not a read: under torch.compile it is replayed after each call, unguarded
        self._current.called = True
        table, codes = self._current.on(device)
        if codes is None:
            return table[0].expand(B, S)
        rows = table[codes]
        if rows.shape[0] != B:  # generate()'s copies of each sequence (_batch_codes)
            rows = rows.repeat_interleave(B // rows.shape[0], 0)
        return rows if rows.dim() == 2 else rows[:, None].expand(B, S)

    def _end_call(self, stack: str) -> None:
        self._calls.pop(stack, None)   # a call's rows hold for that call only
        self._call_tokens.pop(stack, None)
        if stack == self._decoder and self._generation is not None:
            self._generation.lengths.call_done()

    def _token_rows(self, stack: str, T: int, device: torch.device) -> Optional[torch.Tensor]:
        """The statistics rows of a call with T tokens on ``device`` of a router in ``stack``."""
        calls = self._calls.get(stack)
        rows = calls.get(device) if calls else None
        if rows is None:
            if calls is None and not self._warned_outside:
                self._warned_outside = True
                warnings.warn(f"record: a router ran outside a forward of "
                              f"{stack or type(self.model).__name__} (a submodule called "
                              f"directly, as model.model(...), or a wrapper that skips its "
                              f"forward hooks): its tokens count in the context group "
                              f"{self._context[-1]!r}, padding included (or, while "
                              f"set_groups' groups fill max_groups, not at all); call the "
                              f"model that record() was given", UserWarning, stacklevel=2)
            if not calls:  # a router called outside a forward of its stack: the context group
                row = self._current.context
                if row is None:
                    return torch.full((T,), -1, dtype=torch.int32, device=device)
                self._used.add(row)
                return torch.full((T,), row, dtype=torch.int32, device=device)
            rows = next(iter(calls.values())).to(device)
            calls[device] = rows
        if rows.shape[0] != T:
            raise RuntimeError(f"record: a router saw {T} tokens but the model call had "
                               f"{rows.shape[0]}; this model routes a different token set than "
                               f"its input_ids (a multimodal model's), which record() cannot "
                               f"assign to groups")
        return rows

    def _trace_call(self, stack, name, logits, weights, ids, groups):
        """A router call's trace step (``RouterState.trace``). Under ``torch.compile`` it is a
        call of the op ``moe_route::trace_rows`` in the graph, which runs ``_record_trace``
        when the graph runs; an op with a side effect, so no pass drops or reorders it."""
        tokens = self._call_tokens.get(stack)
        if tokens is not None and tokens.shape[0] != ids.shape[0]:
            tokens = None   # a call whose router routes another token set (a multimodal model's)
        if torch.compiler.is_compiling() and _TRACE_OP:
            # a host tensor first: inductor puts the op on that tensor's device, and a host op
            # stays out of CUDA graphs (mode="reduce-overhead"), whose replays would skip it
            torch.ops.moe_route.trace_rows(torch.empty(0), self._key, stack, name,
                                           logits.detach(), weights.detach(), ids.detach(),
                                           groups, tokens)
        else:
            self._record_trace(name, logits, weights, ids, groups, tokens)

    # a graph break where torch has no side-effect ops (_TRACE_OP): Dynamo would guard on the
    # lists' lengths
    @torch.compiler.disable
    def _record_trace(self, name, logits, weights, ids, groups, tokens):
        if ids.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("record: trace=True cannot run inside a CUDA graph capture, "
                               "whose replays would not trace; capture the model without "
                               "tracing, or trace it uncaptured")
        E, T = logits.shape[-1], ids.shape[0]
        parts = self._trace.setdefault(name, {})
        if tokens is None:  # inputs_embeds, or outside the stack's call
            tokens = torch.full((T,), -1, dtype=torch.int32)
        # copies, never the model's tensors: the parts may wait on the device (_trace_to_host)
        rows = {"ids": ids.detach().to(torch.int16 if E <= 32767 else torch.int32, copy=True),
                "weights": weights.detach().to(self.trace_dtype, copy=True),
                "groups": groups.to(torch.int32, copy=True) if groups is not None else
                torch.full((T,), -1, dtype=torch.int32)}
        if self.trace_logits:
            rows["logits"] = logits.detach().to(self.trace_dtype, copy=True)
        rows["tokens"] = tokens   # shared by the call's layers
        for key, t in rows.items():
            kept = parts.setdefault(key, [])
            kept.append(t)
            if not _is_host(t):
                self._staged.append((kept, len(kept) - 1))
                # in device memory, as the CUDA caching allocator's blocks: 512 bytes at least
                self._staged_bytes += -(-t.numel() * t.element_size() // 512) * 512
        # group rows are recycled after a flush: keep each token's group *name*
        if self._row_names is None:
            self._row_names = list(self._rows)
        parts.setdefault("group_names", []).append(self._row_names)
        parts["experts"] = E
        if self._staged_bytes >= TRACE_STAGE_BYTES:
            self._trace_to_host()
        if self._spill is not None:
            self._buffered += _PART_OBJECTS + sum(t.numel() * t.element_size()
                                                  for t in rows.values())
            if self._buffered >= self.trace_buffer_bytes:
                self._spill_parts()

    def _trace_to_host(self) -> None:
        """Bring the trace parts still on a device to the host: one copy per device and dtype
        (``_to_host``), a call's tokens (shared by its layers' parts) once."""
        if not self._staged:
            return
        staged = {id(kept[i]): kept[i] for kept, i in self._staged}
        host = dict(zip(staged, _to_host(list(staged.values()))))
        for kept, i in self._staged:
            kept[i] = host[id(kept[i])]
        self._staged, self._staged_bytes = [], 0

    def _spill_parts(self) -> None:
        """Append every layer's buffered calls to the spill file and drop them from memory (each
        token's group row becomes its group's index in the file)."""
        self._trace_to_host()
        codes = self._spill.group_codes
        for name, parts in self._trace.items():
            E = parts["experts"]
            for key in _TRACE_TENSORS:
                if parts.get(key):
                    self._spill.append(name, E, key, torch.cat(parts[key]))
                    parts[key] = []
            if parts.get("groups"):
                runs = []   # consecutive calls that share a row table, joined (generate()'s steps)
                for rows, table in zip(parts["groups"], parts["group_names"]):
                    if runs and runs[-1][0] is table:
                        runs[-1][1].append(rows)
                    else:
                        runs.append((table, [rows]))
                joined = []
                for table, chunk in runs:
                    rows = torch.cat(chunk).long()
                    rows = torch.where((rows >= 0) & (rows < len(table)), rows, -1)
                    lookup = torch.full((len(table) + 1,), -1, dtype=torch.int32)  # -1: the last
                    for r in _first_appearances(rows[rows >= 0]):  # numbered as save_trace does
                        lookup[r] = codes.setdefault(table[r], len(codes))
                    joined.append(lookup[rows])
                self._spill.append(name, E, "group", torch.cat(joined))
                parts["groups"], parts["group_names"] = [], []
        self._spill.flush()
        self._buffered = 0

    @property
    def trace(self) -> "Trace":
        """``{layer name: {"ids" [N, k], "weights" [N, k], "tokens" [N] int32, "group" list of N
        names or None, "experts" E, ("logits" [N, E])}}`` for every token routed while tracing,
        in call order (``load_trace``); ``.meta`` is a copy of the recorder's ``meta``.
        The tensors are the recorder's own (each layer's calls are joined into one tensor at the
        first read, a layer at a time, so a large trace is not held twice): copy one before
        changing it in place."""
        self._not_streamed("trace")
        self._trace_to_host()
        out = Trace(meta=self.meta)
        for name, parts in self._trace.items():
            for key in _TRACE_TENSORS:
                if len(parts.get(key, ())) > 1:
                    parts[key] = [torch.cat(parts[key])]
            layer = {key: parts[key][0] for key in _TRACE_TENSORS if key in parts}
            layer["experts"] = parts["experts"]
            names = []
            for rows, table in zip(parts["groups"], parts["group_names"]):
                names.extend(table[r] if 0 <= r < len(table) else None for r in rows.tolist())
            layer["group"] = names
            out[name] = layer
        return out

    def save_trace(self, path) -> None:
        """Write ``self.trace`` and its meta to one safetensors file, atomically
        (``save_trace``)."""
        self._not_streamed("save_trace")
        save_trace(self.trace, path)

    def _not_streamed(self, what: str) -> None:
        if self.trace_path is not None:
            raise RuntimeError(f"record: Recorder.{what}: this recorder streams its trace to "
                               f"trace_path={self.trace_path!r}, which its context writes when "
                               f"it ends; read it with moe_route.load_trace(trace_path)")

    # -- results -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Move the device buffers' numbers into the host total and clear them (a host sync)."""
        with self._lock:
            self._flush_rows()
            self._regroup()

    def _flush_rows(self) -> None:
        """``flush`` but for giving the current groups rows again: the groups a model call ran
        in go to the host total, in the order of their rows, and every row is free."""
        self._retire()
        if not self._rows:
            return
        G = len(self._rows)
        names = [name for name, row in self._rows.items() if row in self._used]
        if names:
            keep = torch.tensor(sorted(self._used))
            fields = [(site, f, t if f == "coact" else t[:G])
                      for site, buf in self._buffers.items()
                      for f, t in zip(GateStats.NAMES, buf.buffers()) if t is not None]
            host = {site: dict.fromkeys(GateStats.NAMES) for site in self._buffers}
            for (site, f, _), t in zip(fields, _to_host([t for _, _, t in fields])):
                host[site][f] = t.clone() if f == "coact" else t[keep]
            layers = [LayerStats(site, *self._layers[site], **host[site])
                      for site in self._buffers]
            self._parts.append(RoutingStats(layers, names, meta=self.meta))
        for buf in self._buffers.values():
            buf.zero_()
        self._rows = {}
        self._row_names = None
        self._used = set()

    @property
    def stats(self) -> RoutingStats:
        """Everything recorded so far, on the CPU (flushes the device buffers)."""
        self.flush()
        if not self._parts:
            raise RuntimeError("record: nothing was recorded (no model call inside the context, "
                               "or none had a token whose group counts)")
        if len(self._parts) > 1:
            self._parts = [RoutingStats.merge_all(self._parts)]
        return self._parts[0]


# Host bytes of one router call's trace parts beyond their data (five CPU tensors and the list
# entries that hold them; about 2 kB measured), counted against trace_buffer_bytes: in
# generate()'s one-token steps they outweigh the data many times.
_PART_OBJECTS = 2048
# bytes of trace parts the devices hold (each part's in 512-byte blocks, so that a generate()'s
# one-token steps are not undercounted) before they are copied to the host together
TRACE_STAGE_BYTES = 64 << 20


def _is_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


# The recorders tracing now, by their model (Recorder._key): a compiled graph's trace_rows calls
# name their recorder so, and a new record() of the model runs in the same graph.
_TRACING: dict = {}


def _trace_rows(host: torch.Tensor, key: int, stack: str, name: str, logits: torch.Tensor,
                weights: torch.Tensor, ids: torch.Tensor, groups: Optional[torch.Tensor],
                tokens: Optional[torch.Tensor]) -> None:
    """``moe_route::trace_rows``: a compiled router call's trace step, run as the graph runs.
    The graph may reuse its tensors' memory after the call, so the token ids are copied too:
    once per call of the stack, where the graph hands its layers one tensor."""
    rec = _TRACING.get(key)
    if rec is None:
        raise RuntimeError(f"record: a compiled graph traced {name} for a recorder that is no "
                           f"longer open")
    if tokens is not None:
        held = rec._graph_tokens.get(stack)
        if held is None or held[0] is not tokens:
            held = rec._graph_tokens[stack] = (tokens, tokens.clone())
        tokens = held[1]
    rec._record_trace(name, logits, weights, ids, groups, tokens)


def _define_trace_op() -> bool:
    """Define ``moe_route::trace_rows`` (``_trace_rows``) as an op with an ordered side effect,
    which torch.compile keeps in its graphs, in order, and tagged ``cudagraph_unsafe`` (inductor
    does not see the tag through the effect's wrapper, hence the host tensor of
    ``_trace_call``). False where this torch cannot mark an op's side effect: a compiled model's
    trace step then breaks its graph."""
    try:
        from torch.library import EffectType, _register_effectful_op
    except ImportError:
        try:   # where torch.library does not export them yet
            from torch._higher_order_ops.effects import _EffectType as EffectType
            from torch._higher_order_ops.effects import _register_effectful_op
        except ImportError:
            return False
    unsafe = getattr(torch.Tag, "cudagraph_unsafe", None)
    _LIB.define("trace_rows(Tensor host, int key, str stack, str name, Tensor logits, "
                "Tensor weights, Tensor ids, Tensor? groups, Tensor? tokens) -> ()",
                tags=() if unsafe is None else (unsafe,))
    _LIB.impl("trace_rows", _trace_rows, "CompositeExplicitAutograd")
    torch.library.register_fake("moe_route::trace_rows", lambda *args: None, lib=_LIB)
    _register_effectful_op(torch.ops.moe_route.trace_rows.default, EffectType.ORDERED)
    return True


_LIB = torch.library.Library("moe_route", "FRAGMENT")
_TRACE_OP = _define_trace_op()


def _to_host(tensors: list) -> list:
    """``tensors`` on the host: host tensors as they are, the others copied with one
    device-to-host copy (and sync) per device and dtype, where a copy per tensor made a flush of
    L layers' five statistics fields 5 L syncs. Host tensors skip the gathering copy, which
    there only costs time."""
    out = list(tensors)
    kinds: dict = {}
    for i, t in enumerate(tensors):
        if not _is_host(t):
            kinds.setdefault((t.device, t.dtype), []).append(i)
    for indices in kinds.values():
        for i, t in zip(indices, _flat_copy([tensors[i] for i in indices])):
            out[i] = t
    return out


def _flat_copy(tensors: list) -> list:
    """Host copies of same-dtype ``tensors`` of one device, made as one flat copy: each is a
    view of it."""
    flat = torch.cat([t.reshape(-1) for t in tensors]).cpu()
    parts = flat.split([t.numel() for t in tensors])
    return [part.view(t.shape) for t, part in zip(tensors, parts)]


def _first_appearances(rows: torch.Tensor) -> list:
    """The distinct values of ``rows`` (int64 [n]) in order of first appearance."""
    if not rows.numel():
        return []
    values, inverse = torch.unique(rows, return_inverse=True)
    first = torch.full((values.numel(),), rows.numel()).scatter_reduce_(
        0, inverse, torch.arange(rows.numel()), "amin")
    return values[first.argsort()].tolist()


def _model_meta(model: nn.Module) -> dict:
    """``{"model": path}``: where the model was loaded from (``config._name_or_path``), if known."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return {"model": path} if isinstance(path, str) and path else {}


def _token_ids(values) -> torch.Tensor:
    """``ignore_token_ids`` as an int64 tensor: ints only (a 1.5 would have ignored token 1)."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"record: ignore_token_ids must hold ints, got a {values.dtype} "
                            f"tensor")
        return values.detach().to("cpu", torch.int64).reshape(-1)
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"record: ignore_token_ids must be an iterable of ints, got {values!r}")
    values = list(values)
    bad = [v for v in values if not is_int(v)]
    if bad:
        raise TypeError(f"record: ignore_token_ids must be ints, got {bad[0]!r} "
                        f"({type(bad[0]).__name__})")
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def _within(kept: range, S: int, device: torch.device) -> torch.Tensor:
    """bool [S] on ``device``: which of the indices 0..S-1 are in ``kept`` (built there, not
    copied from the host)."""
    index = torch.arange(S, device=device)
    return (index >= kept.start) & (index < kept.stop)


class _GroupIds(NamedTuple):
    """``set_groups``' ids: each id's rank among the distinct group ids (``codes``, [B] or
    [B, S]; -1 for a skipped id) and the groups' names in that order."""

    codes: torch.Tensor
    names: list


class _Rows:
    """The statistics rows of the current groups (``Recorder._regroup``): ``rows``, group g's
    at g (the context group's alone when there are no set_groups ids), and as ``table`` int64
    [G + 1] with -1 last; the set_groups ``codes`` (or None); the context group's row
    ``context`` (None: none); whether a model call ran in them (``called``); and, per device,
    the table and codes copied there (to the given devices when made, so that a model call's
    hook copies nothing)."""

    def __init__(self, rows: list, codes: Optional[torch.Tensor], context: Optional[int],
                 devices: Iterable):
        self.rows, self.codes, self.context = rows, codes, context
        self.table = torch.tensor(rows + [-1], dtype=torch.int64)
        self.called = False
        self._on: dict = {}
        for device in devices:
            self.on(device)

    @property
    def devices(self):
        return self._on.keys()

    def on(self, device: torch.device) -> tuple:
        """``(table, codes)`` on ``device``."""
        pair = self._on.get(device)
        if pair is None:
            pair = (to_device(self.table, device),
                    None if self.codes is None else to_device(self.codes, device))
            if cacheable(pair[0]):
                self._on[device] = pair
        return pair


class _Generation:
    """What the recorder knows of a ``generate()`` call in progress: the prompt's length in
    positions (None: unknown), the 2-D attention mask it was given (None: none), which
    sequences its stopping criteria have said are done (bool [B], cumulative, from ``_observed``;
    None before their first call), the EOS ids that end a sequence where those flags are
    missing (and their copy on each device), the positions routed so far, the lengths of its KV
    caches held on a device (``CacheLengths``) and, for that fallback, per device, which
    sequences have ended."""

    def __init__(self, prompt: Optional[int], stop_ids: Optional[torch.Tensor],
                 mask: Optional[torch.Tensor] = None):
        self.prompt, self.stop_ids, self.mask = prompt, stop_ids, mask
        self.stop_on: dict = {}
        self.routed = self.past = 0
        self.lengths = CacheLengths()
        self.ended: dict = {}
        self.done: Optional[torch.Tensor] = None

    def saw_done(self, done) -> None:
        """The stopping criteria's answer at a step (is_done [n]): generate() never takes a
        sequence back once done, so the flags accumulate while the number of sequences stays the
        same (a beam search's candidates are another number, and are not accumulated)."""
        if not isinstance(done, torch.Tensor) or done.dim() != 1:
            return
        done = done.detach().to(torch.bool)
        before = self.done
        if before is not None and before.shape == done.shape and before.device == done.device:
            done = done | before
        self.done = done

    @classmethod
    def of(cls, model: nn.Module, args: tuple, kwargs: dict) -> "_Generation":
        config = kwargs.get("generation_config")
        if config is None and len(args) > 1:
            config = args[1]
        if config is None:
            config = getattr(model, "generation_config", None)
        # only the EOS ids end a sequence (for the fallback of _on_call): a pad id is fed to a
        # sequence after its EOS, which has ended it already, and a live sequence may generate it
        stop = set()
        for source in (kwargs.get("eos_token_id"), getattr(config, "eos_token_id", None)):
            if source is not None:
                stop = {int(i) for i in torch.as_tensor(source).reshape(-1).tolist()}
                break
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            start = kwargs.get("decoder_input_ids")
            prompt = start.shape[-1] if isinstance(start, torch.Tensor) else 1
            mask = kwargs.get("decoder_attention_mask")
        else:
            ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            embeds = kwargs.get("inputs_embeds")
            lengths = [t.shape[1] for t in (ids, embeds)
                       if isinstance(t, torch.Tensor) and t.dim() >= 2]
            prompt = max(lengths) if lengths else None
            mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] > 0):
            mask = None
        return cls(prompt, torch.tensor(sorted(stop), dtype=torch.int64) if stop else None,
                   mask)


def _observed(criteria: list, gen: _Generation) -> list:
    """``criteria`` (generate()'s ``StoppingCriteriaList``) as a list of the same class whose
    call also hands its per-sequence answer to ``gen`` (``_Generation.saw_done``)."""
    observed = _observed_class(type(criteria))(criteria)
    observed.generation = gen
    return observed


@functools.lru_cache(maxsize=None)
def _observed_class(base: type) -> type:
    def __call__(self, *args, **kwargs):
        done = base.__call__(self, *args, **kwargs)
        self.generation.saw_done(done)
        return done
    return type(f"Observed{base.__name__}", (base,), {"__call__": __call__,
                                                      "__module__": __name__})


def _decoder_path(model: nn.Module) -> str:
    decoder = model.get_decoder()
    return next(name for name, module in model.named_modules() if module is decoder)


def record(model: nn.Module, **options) -> Recorder:
    """Record routing statistics of ``model`` (patching it for the duration if needed).

    Options: ``dense`` (prob_sum and entropy_sum, default True), ``coact`` ([E, E] pair counts),
    ``tokens`` ("all", "prompt" or "generated"), ``ignore_token_ids``, ``max_groups`` (device
    rows before a flush, default 256), ``default_group`` (name of the group outside any
    ``group()`` context, default "all"), ``meta`` (saved with the statistics and the trace),
    ``trace`` (keep every token's routing on the host: ``rec.trace``), ``trace_path`` (stream it
    into that safetensors file instead), ``trace_buffer_bytes`` (host memory of the streamed
    trace, default 256 MiB), ``trace_logits`` (the router logits too) and ``trace_dtype`` (of
    the traced weights and logits, default float16).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"record: model must be a torch.nn.Module, got {type(model).__name__}")
    return Recorder(model, **options)
