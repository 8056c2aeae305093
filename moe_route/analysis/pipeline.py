"""The study as a few calls: parallel data in, per-sequence routing statistics, experts, A/B.

    corpus = load_parallel("flores.tsv", languages=["eng_Latn", "fra_Latn", "jpn_Jpan"])
    stats = record_parallel(model, corpus, tokenizer=tok, batch_size=16)   # groups "lang/i"
    div = routing_divergence(stats, reference="eng_Latn")                  # {lang: [L]}
    task = record_sequences(model, {"task": gsm8k_texts}, tokenizer=tok)
    base = record_sequences(model, {"base": flores_eng}, tokenizer=tok)
    plan = plan_from_experts(task_experts(task, base, tau=0.3), layers=range(7, 34))
    result = ab_test(model, plan, evaluate)                                # your eval callable

Data is a ``{language: sequences}`` mapping whose i-th sequences are translations of each other:
strings (tokenised here, optionally wrapped in the tokenizer's chat template) or token-id tensors.
Only the tokens of the text itself are counted: padding, special tokens and the chat template's
own tokens get group -1 (skipped by the gate's statistics). ``all_tokens=True`` counts every
token but the padding, as the paper's code averages (the template's tokens are the same in every
language, so they pull the languages' distributions together).
"""
from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Optional, Union

import torch

from moe_route.analysis.evaluation import EvalResult, paired_comparison
from moe_route.analysis.inputs import (BELEBELE, belebele_rows, chat_wrap, check_batch_size,
                                     check_limit, check_not_retired, from_hub, pad_id,
                                     special_tokens)
from moe_route.analysis.progress import progress_bar
from moe_route.recording import record
from moe_route.traces import check_trace_path
from moe_route._checks import check_bool, check_int
from moe_route._json import parse as parse_json
from moe_route.stats import RoutingStats, _short_list
from moe_route.steering import SteeringPlan, steer

__all__ = ["load_parallel", "record_parallel", "record_sequences", "ab_test"]

Corpus = Mapping[str, Union[Sequence[str], torch.Tensor]]
FLORES = ("flores", "openlanguagedata/flores_plus")


def load_parallel(source, languages: Optional[Sequence[str]] = None, *, limit: Optional[int] = None,
                  split: str = "devtest") -> dict[str, list[str]]:
    """A parallel corpus ``{language: [sentences]}`` from a file or a Hugging Face dataset.

    ``source``:
      * ``*.tsv``: a header row of language codes, one parallel sentence per row, each cell as
        written (no CSV quoting: a sentence may start with a quote mark; it cannot hold a tab);
      * ``*.jsonl``: one object per line, ``{"eng_Latn": "...", "fra_Latn": "...", ...}``;
      * ``"flores"`` / ``"openlanguagedata/flores_plus"``: FLORES+ (FLORES-200 as maintained
        now) through ``datasets``: a config per language, field ``text``, split ``split``
        (``dev`` or ``devtest``), rows in ``id`` order. It is gated on the Hub: accept its terms
        and log in first. Some codes differ from FLORES-200's (``cmn_Hans`` for ``zho_Hans``).
        ``facebook/flores`` is a loading script that ``datasets`` 4 refuses;
      * ``"belebele"`` / ``"facebook/belebele"``: Belebele passages (``flores_passage``) per
        language, one per source ``link``, sorted by it (the paper's ~488 passages); by text in
        row order if rows carry no link.
    ``languages`` selects and orders the columns (default: all in a file); ``limit`` keeps the first
    sentences (an int >= 1). Every language must have the same number of sentences, at least one.
    """
    limit = check_limit("load_parallel", limit)
    check_not_retired("load_parallel", source, "facebook/flores",
                      "'flores' (openlanguagedata/flores_plus, FLORES-200's successor)")
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        path = os.fspath(source)
        if path.endswith(".tsv"):
            with open(path, newline="", encoding="utf-8") as f:
                # QUOTE_NONE: csv's quoting dropped a cell's leading and closing quote marks, and
                # merged the rows of a quotation that opens in one sentence and closes in another
                rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            if not rows:
                raise ValueError(f"load_parallel: {path} is empty (expected a header of languages)")
            header = rows[0]
            columns = {lang: [] for lang in header}
            if len(columns) < len(header):
                raise ValueError(f"load_parallel: {path}: the header names a language twice "
                                 f"({header})")
            for n, row in enumerate(rows[1:], 2):
                if not row:     # a blank line
                    continue
                if len(row) != len(header):
                    raise ValueError(f"load_parallel: {path} line {n} has {len(row)} columns, "
                                     f"the header {len(header)}")
                _parallel_row(path, n, dict(zip(header, row)), columns)
        elif path.endswith(".jsonl"):
            columns = {lang: [] for lang in languages} if languages else None
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        row = parse_json(line, f"load_parallel: {path} line {n}")
                        if not isinstance(row, dict):
                            raise ValueError(f"load_parallel: {path} line {n} must be a JSON "
                                             f"object {{language: sentence}}, got "
                                             f"{type(row).__name__}")
                        if columns is None:
                            columns = {lang: [] for lang in row}
                        _parallel_row(path, n, row, columns, every=not languages)
            columns = columns or {}
        else:
            raise ValueError(f"load_parallel: source={path!r} must end in .tsv or .jsonl")
    elif source in FLORES + BELEBELE:
        if not languages:
            raise ValueError(f"load_parallel: source={source!r} needs languages=[...]")
        columns = _load_hub(source, languages, split)
    else:
        raise ValueError(f"load_parallel: source={source!r} is neither an existing .tsv/.jsonl "
                         f"file nor 'flores'/'belebele'")
    languages = list(languages) if languages else list(columns)
    missing = [lang for lang in languages if lang not in columns]
    if missing:
        raise ValueError(f"load_parallel: languages {missing} are not in the data; it has "
                         f"{sorted(columns)}")
    out = {lang: list(columns[lang][:limit]) for lang in languages}
    sizes = {lang: len(v) for lang, v in out.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"load_parallel: languages have different sentence counts {sizes}; "
                         f"parallel data needs one sentence per language per row")
    if not any(sizes.values()):
        raise ValueError(f"load_parallel: source={source!r} holds no sentences for {languages}")
    return out


def _parallel_row(path: str, n: int, row: dict, columns: dict, every: bool = True) -> None:
    """Append line ``n`` of a parallel file, ``{language: sentence}``, to ``columns``. It must
    give a string for each language of ``columns`` (and, if ``every``, no other), or the rows
    would not line up."""
    if not set(columns) <= set(row) or every and len(row) != len(columns):
        raise ValueError(f"load_parallel: {path} line {n} gives the languages "
                         f"{_short_list(sorted(row))}; expected "
                         f"{_short_list(sorted(columns))}" + ("" if every else " (at least)"))
    for lang in columns:
        text = row[lang]
        if not isinstance(text, str):
            raise ValueError(f"load_parallel: {path} line {n}: the {lang!r} sentence must be a "
                             f"string, got {type(text).__name__}")
        columns[lang].append(text)


def _load_hub(source: str, languages, split):
    if source in FLORES:
        rows = from_hub("load_parallel", source, languages, None,
                        lambda row: (row["id"], row["text"]),
                        lambda datasets, lang: datasets.load_dataset(
                            "openlanguagedata/flores_plus", lang, split=split))
        return {lang: [text for _, text in sorted(r)] for lang, r in rows.items()}
    rows = from_hub("load_parallel", source, languages, None,
                    lambda row: (row.get("link"), row["flores_passage"]), belebele_rows)
    return {lang: _passages(r) for lang, r in rows.items()}


def _passages(rows: list) -> list:
    """Belebele's FLORES passages, one each (several questions share a passage): by source link,
    sorted by it, so the languages line up whatever their row order; by text, in row order, if
    a row has no link."""
    if not all(link for link, _ in rows):
        return list(dict.fromkeys(passage for _, passage in rows))
    first = {}
    for link, passage in rows:
        first.setdefault(link, passage)
    return [first[link] for link in sorted(first)]


def _encode(texts: Sequence[str], tokenizer, chat_template: bool, max_length: Optional[int],
            verbose: bool = True):
    """``input_ids``, ``attention_mask`` and a ``[B, S]`` mask of the text's own tokens.

    Rows are padded here, on the right: a causal model's tokens never see the padding after them,
    so a text's routing does not depend on the longest text of its batch (left padding, the
    default of the Llama-family tokenizers in transformers 5, shifts every position of the
    shorter rows), and a tokenizer without a pad token (Mixtral's, Llama 3's) needs none."""
    wrapped = [chat_wrap(tokenizer, t, chat_template) for t in texts]
    enc = tokenizer(wrapped, truncation=max_length is not None, max_length=max_length,
                    return_offsets_mapping=True, return_special_tokens_mask=True,
                    add_special_tokens=not chat_template, verbose=verbose)
    width = max([len(row) for row in enc["input_ids"]] + [1])
    input_ids = torch.full((len(texts), width), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(texts), width), dtype=torch.long)
    keep = torch.zeros((len(texts), width), dtype=torch.bool)
    specials = _special_ids(tokenizer)
    after = _text_offset(tokenizer) if chat_template else 0
    for b, (full, text) in enumerate(zip(wrapped, texts)):
        row = torch.tensor(enc["input_ids"][b], dtype=torch.long)
        n = len(row)
        input_ids[b, :n] = row
        attention_mask[b, :n] = 1
        start, end = _text_span(full, text, after)
        if n == 0 or end <= start:
            continue
        # special tokens are never the text's: the post-processor's BOS/EOS, and the template's
        # (Phi-3's "<|user|>" strips the whitespace after it, so its span runs into the text)
        own = ~(torch.tensor(enc["special_tokens_mask"][b], dtype=torch.bool)
                | torch.isin(row, specials))
        span = torch.tensor(enc["offset_mapping"][b], dtype=torch.long).reshape(n, 2)
        first, last = span[:, 0].clone(), span[:, 1].clone()
        # A ByteLevel post-processor that trims offsets (trim_offsets, its default in
        # `tokenizers`) leaves a token of spaces only ("Ġ", "ĠĠ") an empty span, at its end (at
        # its start for a first token at 0): give it back its width, or a text's leading,
        # double and trailing spaces would not count.
        for i in torch.nonzero(own & (first == last)).flatten().tolist():
            piece = tokenizer.convert_ids_to_tokens(int(row[i]))
            if not piece or set(piece) - {"\u0120", "\u2581", " "}:
                continue                                      # not a token of spaces
            spaces = len(piece)
            if first[i] >= spaces:
                first[i] -= spaces
            else:
                last[i] += spaces
        # A token counts if it covers any of the text: a SentencePiece "▁Hello" or byte-level
        # "ĠHello" spans the space the template wrote before the text (Mixtral's "[INST] ").
        keep[b, :n] = own & (last > start) & (first < end)
    return {"input_ids": input_ids, "attention_mask": attention_mask}, keep


def _special_ids(tokenizer) -> torch.Tensor:
    """The ids of the tokenizer's special tokens (``special_tokens``) but the unknown token (the
    text's own words become it)."""
    ids = set(special_tokens(tokenizer))
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return torch.tensor(sorted(ids), dtype=torch.long)


_MARK = "\x00moe_route-text\x00"


def _text_offset(tokenizer) -> int:
    """Where the chat template writes the user's text: after its prefix, which may hold the
    text's words too (the role name "user", a system prompt)."""
    return max(chat_wrap(tokenizer, _MARK, True).find(_MARK), 0)


def _text_span(full: str, text: str, after: int):
    """``(start, end)`` of ``text`` in the rendered prompt ``full``, searched from ``after``:
    as written, else stripped (templates that ``| trim`` the content). Text of whitespace only
    is where it was written as given, or empty (trimmed away)."""
    if not text.strip():
        return (after, after + len(text)) if full.startswith(text, after) else (after, after)
    for written in (text, text.strip()):
        start = full.find(written, after)
        if start >= 0:
            return start, start + len(written)
    raise ValueError(f"record_sequences: the chat template does not write the text "
                     f"{text[:60]!r} as given (nor stripped), so its tokens cannot be told from "
                     f"the template's; pass chat_template=False")


def record_sequences(model, corpus: Corpus, *, tokenizer=None, batch_size: int = 8,
                     chat_template: bool = False, max_length: Optional[int] = 512,
                     all_tokens: bool = False, progress: bool = False, device=None,
                     trace_path=None, **record_options) -> RoutingStats:
    """Per-sequence routing statistics: one group per sequence, named ``"{language}/{i}"``.

    ``corpus`` values are lists of strings (needs ``tokenizer``; a fast tokenizer, for the
    character offsets that mask template tokens) or ``[N, S]`` token-id tensors (all tokens
    count). ``record_options`` go to ``moe_route.record`` (``dense``, ``coact``, ...). Device
    buffers are flushed to the host between batches as they fill, so memory stays bounded.

    ``all_tokens`` also counts the chat template's and the special tokens (BOS, EOS) of string
    sequences, everything but the padding (module doc). For a corpus of strings the statistics'
    ``meta`` records ``chat_template``, ``max_length`` and ``all_tokens`` (beside any ``meta``
    given), so saved statistics say which tokens they counted.

    Texts are cut at ``max_length`` tokens (default 512, with the chat template's, to bound
    memory); ``None`` keeps them whole. A script that takes many more tokens than English would
    lose more of each text than the English one, biasing the comparison, so a call that cuts any
    text's own tokens warns once (``UserWarning``) with how many texts of which languages.

    ``trace_path``: also keep every token's routing (``record(trace_path=)``: expert ids and
    weights per layer, each token's sequence as its group, ``None`` for a token that is not
    counted), written there once the corpus is recorded (with the statistics' meta). The file
    takes 4·k + 8 bytes per routed token (the padding's too) and layer at top-k (0.6 GB a
    million tokens at OLMoE's 16 layers and k = 8); it is streamed to disk while recording, so
    host memory holds about ``trace_buffer_bytes`` of it (a ``record`` option, default 256 MiB;
    ``bench/trace_memory.py``).
    Tracing syncs at every router call. Two traces of one corpus, from two checkpoints or with
    and without a steering plan, compare with ``trace_agreement`` / ``moe-route compare``.
    """
    if not isinstance(corpus, Mapping) or not corpus:
        raise ValueError("record_sequences: corpus must be a non-empty {language: sequences} "
                         "mapping")
    batch_size = check_batch_size("record_sequences", batch_size)
    max_length = check_int("record_sequences", "max_length", max_length, 1, none="whole texts")
    check_bool("record_sequences", "all_tokens", all_tokens)
    _check_trace_options(trace_path, record_options)
    given = record_options.get("meta")
    if given is not None and not isinstance(given, Mapping):
        raise TypeError(f"record_sequences: meta must be a dict or None, got "
                        f"{type(given).__name__}")
    _check_corpus(corpus, tokenizer)
    device = device or next(model.parameters()).device
    batches = [(lang, i) for lang, seqs in corpus.items() for i in range(0, len(seqs), batch_size)]
    if not batches:
        raise ValueError(f"record_sequences: corpus holds no sequences (languages "
                         f"{list(corpus)} are all empty)")
    bar = progress_bar(len(batches), progress, "record")
    cut = dict.fromkeys(corpus, 0)
    counted_any = False
    texts = any(not isinstance(seqs, torch.Tensor) for seqs in corpus.values())
    counted = dict(chat_template=chat_template, max_length=max_length,
                   all_tokens=all_tokens) if texts else {}   # token ids: every token counts
    record_options["meta"] = {**counted, **(given or {})}
    with record(model, trace_path=trace_path, **record_options) as rec, torch.no_grad():
        for lang, i in batches:
            seqs = corpus[lang][i:i + batch_size]
            names = [f"{lang}/{j}" for j in range(i, i + len(seqs))]
            if isinstance(seqs, torch.Tensor):
                ids = torch.arange(len(seqs))
                rec.set_groups(ids, names)
                model(input_ids=seqs.to(device))
                counted_any = counted_any or seqs.numel() > 0
            else:
                enc, keep = _encode(seqs, tokenizer, chat_template, max_length)
                _check_cut_length(enc, max_length, chat_template)
                cut[lang] += _cut(seqs, tokenizer, chat_template, max_length, enc, keep)
                counts = enc["attention_mask"].bool() if all_tokens else keep
                counted_any = counted_any or bool(counts.any())
                groups = torch.where(counts, torch.arange(len(seqs))[:, None], -1)
                rec.set_groups(groups, names)
                model(**{k: v.to(device) for k, v in enc.items()})
            bar(1)
    bar(None)
    if not counted_any:
        cause = "empty texts" if max_length is None else (
            f"empty texts, or max_length={max_length} left only special tokens")
        raise ValueError(f"record_sequences: no text has a token of its own to count ({cause})")
    _warn_cut(cut, corpus, max_length)
    return rec.stats


def _check_cut_length(enc: dict, max_length: Optional[int], chat_template: bool) -> None:
    """A tokenizer asked to cut to fewer tokens than it adds to every text (BOS, EOS) leaves
    the text whole, with a log line: refused instead of counting uncut texts."""
    if max_length is None:
        return
    longest = max((len(row) for row in enc["input_ids"]), default=0)
    if longest > max_length:
        raise ValueError(f"record_sequences: max_length={max_length} is shorter than the tokens "
                         f"the tokenizer adds to every text"
                         f"{' (with the chat template)' if chat_template else ''}: it left a "
                         f"text of {longest} tokens uncut; raise max_length")


def _check_trace_options(trace_path, record_options: dict) -> None:
    """Refuse what would trace for nothing (record's ``trace=``, whose trace goes with the
    recorder; ``trace_logits``/``trace_dtype``/``trace_buffer_bytes`` without ``trace_path``)
    and a ``trace_path`` that is no file path, before any sequence is recorded (``record``
    refuses a directory that cannot be written as it starts)."""
    where = "record_sequences"
    if "trace" in record_options:
        raise TypeError(f"{where}: trace= is not an option here (the recorder's trace would be "
                        f"dropped with it); pass trace_path=PATH to save one")
    if trace_path is None:
        extra = sorted({"trace_logits", "trace_dtype", "trace_buffer_bytes"} & set(record_options))
        if extra:
            raise ValueError(f"{where}: {', '.join(extra)} shape a trace, which only "
                             f"trace_path=PATH keeps")
        return
    check_trace_path(trace_path, where)


def _check_corpus(corpus: Corpus, tokenizer) -> None:
    """TypeError for a language whose sequences are one string (it was read as one text per
    character); ValueError for text without ``tokenizer``. Checked before the model runs."""
    for lang, seqs in corpus.items():
        if isinstance(seqs, (str, bytes)):
            raise TypeError(f"record_sequences: language {lang!r}: a language's sequences must "
                            f"be a list of strings or an [N, S] token-id tensor, got "
                            f"{type(seqs).__name__} {seqs[:40]!r}")
        if tokenizer is None and not isinstance(seqs, torch.Tensor) and len(seqs):
            raise ValueError(f"record_sequences: language {lang!r} holds text; pass tokenizer=")


def _cut(texts: Sequence[str], tokenizer, chat_template: bool, max_length: Optional[int],
         enc: dict, keep: torch.Tensor) -> int:
    """How many of ``texts`` lost tokens of their own to ``max_length`` in ``_encode``. Only a row
    of ``max_length`` tokens can have been cut: those are encoded again whole, and were cut if
    more of their tokens count then (losing only the template's suffix does not count)."""
    if max_length is None:
        return 0
    full = [b for b, n in enumerate(enc["attention_mask"].sum(1).tolist()) if n >= max_length]
    if not full:
        return 0
    _, whole = _encode([texts[b] for b in full], tokenizer, chat_template, None, verbose=False)
    return int((whole.sum(1) > keep[full].sum(1)).sum())


def _warn_cut(cut: dict, corpus: Corpus, max_length: Optional[int], shown: int = 12) -> None:
    """One UserWarning with how many texts of which languages ``max_length`` cut, if any (the
    first ``shown`` such languages, in corpus order)."""
    counts = [f"{lang}: {n} of {len(corpus[lang])}" for lang, n in cut.items() if n]
    if not counts:
        return
    more = f", ... +{len(counts) - shown} more languages" if len(counts) > shown else ""
    total = sum(len(seqs) for seqs in corpus.values())
    warnings.warn(f"record_sequences: max_length={max_length} cut {sum(cut.values())} of {total} "
                  f"texts ({', '.join(counts[:shown])}{more}), so only their first tokens are "
                  f"counted; max_length=None (or a larger value) keeps them whole", UserWarning,
                  stacklevel=3)


def record_parallel(model, corpus: Corpus, **options) -> RoutingStats:
    """``record_sequences`` on parallel data (checks every language has the same length)."""
    if isinstance(corpus, Mapping):      # anything else is refused by record_sequences
        _check_corpus(corpus, options.get("tokenizer"))     # a string's length is not a count
        sizes = {lang: len(v) for lang, v in corpus.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"record_parallel: languages have different sequence counts {sizes}")
    return record_sequences(model, corpus, **options)


def ab_test(model, plan: SteeringPlan, evaluate: Callable[[], Union[float, Mapping, EvalResult]]
            ) -> dict:
    """Run ``evaluate()`` without and with ``plan`` steering ``model``: ``{"baseline", "steered",
    "delta"}`` (per key when ``evaluate`` returns a mapping, e.g. accuracy per language).

    When ``evaluate`` returns an ``EvalResult`` (``choice_accuracy``, ``generation_accuracy``),
    the two runs are compared question by question: ``"paired"`` holds, per language and
    pooled, the questions gained and lost, a 95% interval on the delta and the exact McNemar
    p-value (``paired_comparison``)."""
    if not callable(evaluate):
        raise TypeError(f"ab_test: evaluate must be callable, got {type(evaluate).__name__}")
    base = evaluate()
    with steer(model, plan):
        steered = evaluate()
    if isinstance(base, EvalResult):
        paired = paired_comparison(base, steered)
        return {"baseline": base.accuracy(), "steered": steered.accuracy(),
                "delta": {lang: paired[lang].delta for lang in base.correct},
                "paired": {lang: c._asdict() for lang, c in paired.items()}}
    if isinstance(base, Mapping):
        delta = {k: float(steered[k]) - float(base[k]) for k in base}
        return {"baseline": dict(base), "steered": dict(steered), "delta": delta}
    base, steered = float(base), float(steered)
    return {"baseline": base, "steered": steered, "delta": steered - base}
