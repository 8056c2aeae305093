"""Task accuracy per language, and whether a steering plan changed it by more than chance.

    items = load_choice_task("belebele", ["eng_Latn", "swh_Latn"], limit=200)
    base = choice_accuracy(model, items, tokenizer=tok)             # EvalResult
    with moe_route.steer(model, plan):
        steered = choice_accuracy(model, items, tokenizer=tok)
    paired_comparison(base, steered)["swh_Latn"]                     # delta, 95% CI, McNemar p
    # or: ab_test(model, plan, lambda: choice_accuracy(model, items, tokenizer=tok))

The paper's steering gains are 1-2 points on a few hundred questions per language, the size of
the noise. Both runs answer the same questions, so the comparison is paired: only the questions
whose outcome changed (``gained``: wrong -> right, ``lost``: right -> wrong) carry information,
and the exact McNemar test asks whether ``gained`` and ``lost`` differ more than a fair coin
would make them.

* **Multiple choice** (Belebele, Global-MMLU): each option is scored by the log-likelihood of its
  tokens after the prompt (summed; or per token / per byte with ``normalize``); the answer is the
  best option, ties to the lower index. Options of one token each (the letters " A".." D") need
  one forward per question, read at the last position; longer options one row per option.
  Batches are left-padded, with position ids from the attention mask, and only the logits of
  the last positions are computed (``logits_to_keep``).
* **Generation** (MGSM): greedy ``generate``, the text cut at the first stop string
  (``"Question:"``), the last number in it compared with the answer (digits of any script,
  ``1,234.50`` == ``1234.5``).
* **Few-shot** prompts: ``few_shot(items, exemplars, n)`` writes n solved examples before each
  question (per language, or one set for every language; never the question itself).
"""
from __future__ import annotations

import decimal
import inspect
import json
import math
import os
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

import torch

from moe_route._atomic import write_text_atomic
from moe_route._checks import check_int
from moe_route._json import check as check_json, parse as parse_json, read as read_json
from moe_route.analysis.inputs import (BELEBELE, belebele_rows, chat_wrap, check_batch_size,
                                     check_limit, check_not_retired, from_hub, pad_id,
                                     special_tokens)
from moe_route.analysis.progress import progress_bar

__all__ = ["ChoiceItem", "GenerationItem", "EvalResult", "PairedComparison", "choice_accuracy",
           "generation_accuracy", "paired_comparison", "format_paired", "mcnemar_exact",
           "last_number", "few_shot", "load_choice_task", "load_generation_task"]

EVAL_FORMAT = "moe_route.eval"
EVAL_VERSION = 1
# the Hub tasks the loaders know, by the names they accept
GLOBAL_MMLU = ("global_mmlu", "CohereLabs/Global-MMLU", "CohereForAI/Global-MMLU")
CHOICE_DATASETS = BELEBELE + GLOBAL_MMLU
GENERATION_DATASETS = ("mgsm", "CohereLabs/global-mgsm")

Tokens = Union[str, Sequence[int], torch.Tensor]


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice question: ``prompt`` then one of ``options`` (text, or token ids when
    the prompt is token ids); ``answer`` is the index of the right option."""

    prompt: Tokens
    options: Sequence[Tokens]
    answer: int


@dataclass(frozen=True)
class GenerationItem:
    """A question answered by generating text; ``answer`` is the expected number (or string)."""

    prompt: str
    answer: str


@dataclass
class EvalResult:
    """Per-question outcomes by language: ``correct[lang]`` bool ``[N]``, ``predictions[lang]``
    (the chosen option index, or the extracted answer: ``None`` when none was found). Outcomes
    may be given as a sequence of bools or of 0/1 ints; they are kept as a bool tensor."""

    correct: dict
    predictions: dict
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.correct = _checked_outcomes(self.correct, self.predictions, self.meta, "EvalResult")

    def accuracy(self) -> dict:
        """``{language: share correct}``."""
        return {lang: float(c.double().mean()) if c.numel() else float("nan")
                for lang, c in self.correct.items()}

    def mean_accuracy(self) -> float:
        """Mean of the per-language accuracies (every language weighs the same)."""
        acc = list(self.accuracy().values())
        return sum(acc) / len(acc) if acc else float("nan")

    def to_dict(self) -> dict:
        return {"format": EVAL_FORMAT, "version": EVAL_VERSION, "meta": self.meta,
                "languages": {lang: {"correct": [int(v) for v in c.tolist()],
                                     "predictions": list(self.predictions[lang])}
                              for lang, c in self.correct.items()}}

    def save(self, path) -> None:
        """Write the outcomes as JSON, atomically (temp file, fsync, rename)."""
        write_text_atomic(path, json.dumps(self.to_dict(), allow_nan=False) + "\n")

    @classmethod
    def load(cls, path) -> "EvalResult":
        data = read_json(path, f"EvalResult.load: {path}")
        return cls.from_dict(data, where=f"EvalResult.load: {path}")

    @classmethod
    def from_dict(cls, data, where: str = "EvalResult.from_dict") -> "EvalResult":
        """The inverse of ``to_dict``; ``where`` starts the error messages."""
        if not isinstance(data, dict) or data.get("format") != EVAL_FORMAT:
            raise ValueError(f"{where} is not a moe_route evaluation result (expected format "
                             f"{EVAL_FORMAT!r})")
        version = data.get("version")
        if version != EVAL_VERSION or isinstance(version, bool):  # true == 1 in Python
            raise ValueError(f"{where} has version {version!r}; this moe_route reads version "
                             f"{EVAL_VERSION}")
        languages = data.get("languages")
        if not isinstance(languages, dict):
            got = type(languages).__name__ if "languages" in data else "nothing"
            raise ValueError(f"{where}: 'languages' must be an object {{language: {{correct, "
                             f"predictions}}}}, got {got}")
        correct, predictions = {}, {}
        for lang, entry in languages.items():
            if not isinstance(entry, dict) or not {"correct", "predictions"} <= set(entry):
                raise ValueError(f"{where}: language {lang!r} must be an object with 'correct' "
                                 f"and 'predictions', got {str(entry)[:80]}")
            correct[lang], predictions[lang] = entry["correct"], entry["predictions"]
        meta = data.get("meta", {})
        try:
            _checked_outcomes(correct, predictions, meta, where)
        except TypeError as exc:    # a file's content is a value, whatever its type
            raise ValueError(str(exc)) from None
        return cls(correct, predictions, meta)


def _checked_outcomes(correct, predictions, meta, where: str) -> dict:
    """``correct`` as ``{language: bool tensor}``, after checking an EvalResult's fields."""
    for name, value in (("correct", correct), ("predictions", predictions), ("meta", meta)):
        if not isinstance(value, Mapping):
            raise TypeError(f"{where}: {name} must be a dict, got {type(value).__name__}")
    check_json(dict(meta), f"{where}: meta")
    if list(correct) != list(predictions):
        raise ValueError(f"{where}: correct and predictions must cover the same languages, got "
                         f"{list(correct)} and {list(predictions)}")
    out = {lang: _outcomes(c, f"{where}: correct[{lang!r}]") for lang, c in correct.items()}
    for lang, p in predictions.items():
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise TypeError(f"{where}: predictions[{lang!r}] must be a list, got "
                            f"{type(p).__name__}")
        if len(p) != len(out[lang]):
            raise ValueError(f"{where}: language {lang!r} has {len(out[lang])} outcomes but "
                             f"{len(p)} predictions")
    return out


def _outcomes(values, what: str) -> torch.Tensor:
    """Right/wrong per question as a 1-D bool tensor: from one, or from bools or 0/1 ints."""
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool and values.dim() == 1:
            return values
        ok = (values.dim() == 1 and not values.is_floating_point() and not values.is_complex()
              and bool(((values == 0) | (values == 1)).all()))
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        ok = all(isinstance(v, int) and v in (0, 1) for v in values)
    else:
        raise TypeError(f"{what} must be a bool tensor or a list of bools, got "
                        f"{type(values).__name__}")
    if not ok:
        raise ValueError(f"{what} must hold one bool (or 0/1 int) per question, got "
                         f"{_describe(values)}")
    return torch.as_tensor(values).to(torch.bool)


def _describe(values) -> str:
    if isinstance(values, torch.Tensor):
        return f"a {values.dtype} tensor of shape {tuple(values.shape)}"
    return str(list(values))[:80]


class PairedComparison(NamedTuple):
    """Two runs over the same questions. ``delta`` = steered - baseline accuracy, with a 95%
    interval for a paired difference (``ci_low``, ``ci_high``): Agresti and Min's adjusted Wald
    interval ("Wald+2", half a question added to each of the four outcome cells), clipped to
    [-1, 1]. The plain Wald interval collapses to a point when every changed question changed
    the same way (4 of 4 gained: [1, 1], at McNemar p = 0.125); this one does not. It is still
    approximate for few changed questions: read ``p_value`` then, the exact two-sided McNemar
    test."""

    n: int
    baseline: float
    steered: float
    delta: float
    ci_low: float
    ci_high: float
    gained: int
    lost: int
    p_value: float


_EXACT_MCNEMAR = 4000  # changed questions up to which the tail is summed in integers


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: the chance that a fair coin splits the ``gained + lost``
    changed questions at least as unevenly, ``min(1, 2 P[Bin(n, 1/2) <= min(gained, lost)])``.
    Up to 4000 changed questions the binomial tail is summed in integers (exact); above, in
    float64 from its largest term (log-gamma) down, to a relative error of about 1e-11, in time
    that grows with sqrt(n) (the integer sum grows with n²)."""
    gained = check_int("mcnemar_exact", "gained", gained, 0)
    lost = check_int("mcnemar_exact", "lost", lost, 0)
    n, m = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    if n <= _EXACT_MCNEMAR:
        term = tail = 1
        for i in range(m):  # C(n, i + 1) from C(n, i)
            term = term * (n - i) // (i + 1)
            tail += term
        return min(1.0, 2 * tail / 2 ** n)
    # sum_{i <= m} C(n, i) = C(n, m) * (1 + r_m + r_m r_{m-1} + ...), r_i = i / (n - i + 1) < 1
    ratio_sum, term = 1.0, 1.0
    for i in range(m, 0, -1):
        term *= i / (n - i + 1)
        ratio_sum += term
        if term < ratio_sum * 1e-17:
            break
    log_p = (math.log(2.0) + math.lgamma(n + 1) - math.lgamma(m + 1) - math.lgamma(n - m + 1)
             + math.log(ratio_sum) - n * math.log(2.0))
    return math.exp(min(0.0, log_p))


def paired_comparison(baseline: EvalResult, steered: EvalResult) -> dict:
    """``{language: PairedComparison}`` plus ``"all"`` (every question pooled), for two results
    over the same questions in the same order (e.g. without and with a steering plan)."""
    for name, r in (("baseline", baseline), ("steered", steered)):
        if not isinstance(r, EvalResult):
            raise TypeError(f"paired_comparison: {name} must be an EvalResult, got "
                            f"{type(r).__name__}")
    if list(baseline.correct) != list(steered.correct):
        raise ValueError(f"paired_comparison: the results cover different languages: "
                         f"{list(baseline.correct)} vs {list(steered.correct)}")
    out = {}
    for lang, a in baseline.correct.items():
        b = steered.correct[lang]
        if a.shape != b.shape:
            raise ValueError(f"paired_comparison: language {lang!r} has {a.numel()} baseline "
                             f"and {b.numel()} steered outcomes; both runs must answer the same "
                             f"questions")
        out[lang] = _paired(a.bool(), b.bool())
    if len(out) > 1:
        out["all"] = _paired(torch.cat([c.bool() for c in baseline.correct.values()]),
                             torch.cat([c.bool() for c in steered.correct.values()]))
    return out



def format_paired(paired: Mapping[str, Union[PairedComparison, Mapping]]) -> list:
    """One line per language of ``paired_comparison`` (or its ``_asdict()`` form, as in
    ``ab_test``'s ``"paired"``)."""
    rows = {lang: c if isinstance(c, Mapping) else c._asdict() for lang, c in paired.items()}
    width = max([len(lang) for lang in rows] + [4])
    return [f"{lang:<{width}}  n {c['n']:>5}  {c['baseline']:.3f} -> {c['steered']:.3f}  "
            f"delta {c['delta']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]  "
            f"+{c['gained']}/-{c['lost']}  p {c['p_value']:.2g}" for lang, c in rows.items()]


def _paired(a: torch.Tensor, b: torch.Tensor) -> PairedComparison:
    n = a.numel()
    gained = int((~a & b).sum())
    lost = int((a & ~b).sum())
    if n == 0:
        nan = float("nan")
        return PairedComparison(0, nan, nan, nan, nan, nan, 0, 0, 1.0)
    delta = (gained - lost) / n
    # Wald+2 (Agresti and Min 2005): the Wald interval of the table with 0.5 added to each cell
    m = n + 2
    centre = (gained - lost) / m
    half = 1.959963984540054 * math.sqrt(max(gained + lost + 1 - (gained - lost) ** 2 / m,
                                             0.0)) / m
    # a difference of two shares lies in [-1, 1]; the normal approximation can step outside
    return PairedComparison(n, float(a.double().mean()), float(b.double().mean()), delta,
                            max(centre - half, -1.0), min(centre + half, 1.0), gained, lost,
                            mcnemar_exact(gained, lost))


# -- multiple choice ---------------------------------------------------------------------------

_NORMALIZE = ("none", "tokens", "chars", "bytes")


@torch.no_grad()
def choice_accuracy(model, items: Mapping[str, Sequence[ChoiceItem]], *, tokenizer=None,
                    normalize: str = "none", batch_size: int = 8, chat_template: bool = False,
                    progress: bool = False) -> EvalResult:
    """Multiple-choice accuracy by language: the predicted option is the one whose tokens are
    most likely after the prompt (log-likelihood summed over its tokens; ``normalize="tokens"``
    divides by its token count, ``"chars"`` by its length in characters, as lm-eval's
    ``acc_norm``, ``"bytes"`` by its UTF-8 length, which counts 2-4 per character outside ASCII;
    both leave out the option's leading space, which separates it from the prompt).

    ``items``: ``{language: [ChoiceItem]}``. Text prompts need a ``tokenizer``; the option's
    tokens are those of ``prompt + option`` beyond the ones every option shares with the prompt
    (so a BPE merge across the boundary, as after a prompt ending in a space, is tokenised as the
    model would see it, and scored with the option). The prompt keeps the tokenizer's leading
    special tokens (BOS) but never a trailing one (an EOS some tokenizers append).
    ``chat_template`` wraps the prompt as a user turn with the generation prompt, and the options
    follow it without their leading space (``"A"``, not ``" A"``, after the assistant header),
    as lm-eval does under a chat template. Runs under whatever ``steer``/``record`` is active.

    Numerics: log-softmax of the logits in fp32 (whatever the model's dtype), an option's
    log-probabilities summed in float64; the best score wins, ties to the lower option index,
    and a NaN score (NaN logits) ranks below every number.
    """
    _check_items("choice_accuracy", items, ChoiceItem)
    if normalize not in _NORMALIZE:
        raise ValueError(f"choice_accuracy: normalize={normalize!r} must be one of {_NORMALIZE}")
    batch_size = check_batch_size("choice_accuracy", batch_size)
    # rows: (tokens, reads); a read (back, token) is the log-probability of token at the
    # position `back` from the end. plans: per question, which reads make each option's score.
    rows, plans = [], []
    vocab = _vocabulary(model)
    for lang, questions in items.items():
        for q, item in enumerate(questions):
            where = f"language {lang!r}, item {q}"
            prompt, options = _encode_choice(item, tokenizer, chat_template, where)
            bad = next((t for t in prompt + sum(options, []) if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"choice_accuracy: {where}: token id {bad} is not in the "
                                 f"model's vocabulary [0, {vocab})")
            if normalize in ("chars", "bytes") and not all(isinstance(o, str)
                                                           for o in item.options):
                raise ValueError(f"choice_accuracy: normalize={normalize!r} needs text options "
                                 f"({where} has token ids)")
            scale = [1.0 / (len(o) if normalize == "tokens" else
                            max(1, len(_bare(t))) if normalize == "chars" else
                            max(1, len(_bare(t).encode("utf-8"))) if normalize == "bytes" else 1)
                     for o, t in zip(options, item.options)]
            if all(len(o) == 1 for o in options):       # one forward, read at the last position
                refs = [(len(rows), j, j + 1) for j in range(len(options))]
                rows.append((prompt, [(1, o[0]) for o in options]))
            else:                                       # one row per option
                refs = []
                for o in options:
                    refs.append((len(rows), 0, len(o)))
                    rows.append((prompt + o, [(len(o) + 1 - i, t) for i, t in enumerate(o)]))
            plans.append((lang, item.answer, refs, scale))
    scored = _score_rows(model, rows, batch_size, pad_id(tokenizer), progress)
    correct = {lang: [] for lang in items}
    predictions = {lang: [] for lang in items}
    for lang, answer, refs, scale in plans:
        scores = [float(scored[r][a:b].sum()) * s for (r, a, b), s in zip(refs, scale)]
        ranked = [-math.inf if math.isnan(x) else x for x in scores]    # NaN never wins
        best = max(range(len(ranked)), key=lambda j: (ranked[j], -j))
        predictions[lang].append(best)
        correct[lang].append(best == answer)
    return EvalResult({lang: torch.tensor(c, dtype=torch.bool) for lang, c in correct.items()},
                      predictions, {"kind": "choice", "normalize": normalize})


def _encode_choice(item: ChoiceItem, tokenizer, chat_template: bool, where: str):
    if not isinstance(item.answer, int) or isinstance(item.answer, bool) or not (
            0 <= item.answer < len(item.options)):
        raise ValueError(f"choice_accuracy: {where}: answer={item.answer!r} must be an option "
                         f"index in [0, {len(item.options)})")
    if len(item.options) < 2:
        raise ValueError(f"choice_accuracy: {where}: needs >= 2 options, got {len(item.options)}")
    if isinstance(item.prompt, str):
        if tokenizer is None:
            raise ValueError(f"choice_accuracy: {where} is text; pass tokenizer=")
        text = chat_wrap(tokenizer, item.prompt, chat_template)
        prompt = _prompt_ids(tokenizer, text, chat_template)
        wholes = []
        for option in item.options:
            if not isinstance(option, str):
                raise TypeError(f"choice_accuracy: {where}: a text prompt needs text options, "
                                f"got {type(option).__name__}")
            wholes.append(_prompt_ids(tokenizer, text + (_bare(option) if chat_template
                                                         else option), chat_template))
        # Each option is scored on the tokens the model reads for prompt + option. Where the
        # prompt's last token merges with an option ("Answer: " + "A" reads "Answer", ":", " A"),
        # the prompt shared by the options ends before it: the option alone would be tokenised
        # as a new text (SentencePiece writes "▁A", a second space).
        shared = min(_common_prefix(prompt, whole) for whole in wholes)
        prompt = prompt[:shared]
        options = [whole[shared:] for whole in wholes]
    else:
        prompt = _ids(item.prompt, where, "prompt")
        options = [_ids(o, where, "option") for o in item.options]
    if not prompt:
        raise ValueError(f"choice_accuracy: {where}: the prompt has no tokens")
    empty = [j for j, o in enumerate(options) if not o]
    if empty:
        raise ValueError(f"choice_accuracy: {where}: options {empty} have no tokens")
    return prompt, options


def _bare(option: str) -> str:
    """An option without the space that separates it from its prompt (``" A"`` -> ``"A"``)."""
    return option[1:] if option.startswith(" ") else option


def _vocabulary(model) -> Union[int, float]:
    """The number of token ids ``model`` embeds (inf where it does not say)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    return getattr(embeddings, "num_embeddings", math.inf)


def _common_prefix(a: list, b: list) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _ids(value, where: str, what: str) -> list:
    if isinstance(value, str):
        raise TypeError(f"choice_accuracy: {where}: token-id prompts need token-id options, "
                        f"got text for the {what}")
    if not isinstance(value, torch.Tensor) and len(value) == 0:
        return []
    ids = torch.as_tensor(value)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"choice_accuracy: {where}: the {what} must be a 1-D sequence of token "
                         f"ids, got {ids.dtype} of shape {tuple(ids.shape)}")
    return [int(t) for t in ids]


def _score_rows(model, rows: list, batch_size: int, pad_id: int, progress: bool) -> list:
    """Per row ``(tokens, reads)``, the fp32 log-probabilities its reads ask for (float64, CPU).
    Only the logits of the last positions any read needs are computed and kept."""
    device = next(model.parameters()).device
    accepts = inspect.signature(model.forward).parameters
    keep = max(back for _, reads in rows for back, _ in reads) if rows else 1
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))  # similar lengths per batch
    out = [None] * len(rows)
    bar = progress_bar(len(order), progress, "score")
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        ids, mask = _left_pad([rows[r][0] for r in batch], pad_id)
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if "position_ids" in accepts:   # rotary models ignore a common shift; absolute ones do not
            inputs["position_ids"] = (mask.cumsum(1) - 1).clamp_(min=0).to(device)
        if "logits_to_keep" in accepts:
            inputs["logits_to_keep"] = keep
        lp = torch.log_softmax(model(**inputs).logits[:, -keep:].float(), dim=-1)
        for b, r in enumerate(batch):
            reads = rows[r][1]
            back = torch.tensor([-k for k, _ in reads], device=lp.device)
            token = torch.tensor([t for _, t in reads], device=lp.device)
            out[r] = lp[b, back, token].double().cpu()
        bar(len(batch))
    bar(None)
    return out


# -- generation --------------------------------------------------------------------------------

# Arabic and full-width separators read as ASCII ones, but their decimal marks (Arabic U+066B,
# full-width U+FF0E) stay decimal marks (_DECIMAL): only an ASCII dot may group thousands
_DECIMAL = "\ue000"
_SEPARATORS = str.maketrans({"\u066c": ",", "\uff0c": ",", "\u066b": _DECIMAL,
                             "\uff0e": _DECIMAL, "\uff0d": "-"})
# no-break and thin spaces (French, Russian) and apostrophes (Swiss "1'234", also typographic)
# group thousands when exactly three digits follow; a plain space does not ("page 1 234")
_SPACE_GROUP = re.compile(r"(?<=\d)[\u00a0\u202f\u2009'\u2019](?=\d{3}(?!\d))")
# Over ASCII digits (every script's are read as them first). Not glued to a Latin letter or another
# digit ("w30", "H2O"), nor to a decimal mark after a digit (the "000" of "x18.000", the "5" of
# "v1.5", the "3" of "1.2.3": the rest of a number or word is not a number of its own; a sign
# between them starts one: "5.-3" ends in -3); "5km", "$18" and "答案是42" count. Comma groups end in
# three digits and may hold two before (Indian "1,23,456"); any other comma separates numbers
# ("1,2,3" is three of them). Dot groups (German "18.000") are three digits each after one to three
# that do not start with 0; a decimal comma may follow them ("10.000,50"), and then the number ends
# (_DOT_GROUPED).
_NUMBER = re.compile(r"(?<![A-Za-z_\d])[-\u2212]?(?<!\d[.\ue000])"
                     r"(?:\d{1,3}(?:,\d{2,3})*,\d{3}(?!\d)(?:[.\ue000]\d+)?"
                     r"|[1-9]\d{0,2}(?:\.\d{3})+(?:,\d+)?(?!\d|[.\ue000]\d)"
                     r"|\d+(?:[.\ue000]\d+)?)")
_DOT_GROUPED = re.compile(r"[-\u2212]?[1-9]\d{0,2}(?:\.\d{3})+(?:,\d+)?")


def last_number(text: str) -> Optional[str]:
    """The last number in ``text``, normalised: ASCII digits (any script's decimal digits are
    read), no thousands separators, no trailing fractional zeros (``"1,234.50"`` -> ``"1234.5"``,
    ``"৪২"`` -> ``"42"``, ``"１，２３４"`` -> ``"1234"``; French ``"1 234"`` with a narrow
    no-break space, Swiss ``"1'234"`` and German ``"1.234"`` -> ``"1234"``).
    Thousands are grouped by commas (also Arabic and full-width ones), by no-break and thin
    spaces, by apostrophes, or by ASCII dots: a number that is one to three digits (not starting
    with 0) followed by groups of a dot and three digits is an integer (``"18.000"`` is 18000,
    and so is ``"3.140"``; ``"0.125"``, ``"3.14"`` and ``"1234.567"`` are decimals), and a comma
    after dot groups is its decimal mark (``"10.000,50"`` is 10000.5). The reading is for
    integer answers (MGSM's): the paper's evaluation ignores punctuation, so it too scores
    ``"18.000"`` right for 18000, and a language that groups by dots is not marked down.
    Otherwise the decimal point is a dot; the Arabic and full-width decimal marks are always
    decimal points (``"٢٫٥٠٠"`` is 2.5). A decimal comma is not read elsewhere (``"1,5"`` is 1
    and 5, the last number 5). Digits right after a Latin letter are part of a word, not a
    number (``"w30"``, and ``"v1.5"`` and ``"x18.000"`` hold none), and the rest of a dotted
    run is not a number of its own (``"1.2.3"`` reads 1.2, not 3), while numbers right after
    CJK or Thai text count. ``None`` when there is none."""
    if not isinstance(text, str):
        raise TypeError(f"last_number: text must be a str, got {type(text).__name__}")
    text = "".join(str(unicodedata.decimal(ch)) if ch.isdecimal() else ch for ch in text)
    found = _NUMBER.findall(_SPACE_GROUP.sub(",", text.translate(_SEPARATORS)))
    if not found:
        return None
    return _normalise_number(found[-1])


def _normalise_number(token: str) -> str:
    if _DOT_GROUPED.fullmatch(token):
        token = token.replace(".", "").replace(",", ".")
    sign = "-" if token[0] in "-\u2212" else ""
    whole, _, frac = token.lstrip("-\u2212").replace(",", "").replace(_DECIMAL, ".").partition(".")
    value = (whole.lstrip("0") or "0") + ("." + frac.rstrip("0") if frac.rstrip("0") else "")
    return value if value == "0" else sign + value


@torch.no_grad()
def generation_accuracy(model, items: Mapping[str, Sequence[GenerationItem]], *, tokenizer,
                        max_new_tokens: int = 256, batch_size: int = 8,
                        chat_template: bool = False, stop: Sequence[str] = ("Question:",),
                        extract: Callable[[str], Optional[str]] = last_number,
                        progress: bool = False) -> EvalResult:
    """Generative accuracy by language (MGSM): greedy decoding of at most ``max_new_tokens``,
    the text cut at the first of ``stop``, ``extract(text)`` compared with ``extract(answer)``
    (for the default, the last number of each). ``predictions`` hold the extracted answers.
    The default stop is ``"Question:"`` alone (the next few-shot question), as in the paper's
    follow-up evaluation: a chat model's worked answer runs over several paragraphs, and a stop
    at a blank line would read the number of its first one.
    A model that writes channels (GPT-OSS's harmony format: an analysis channel, then the final
    one) is read for its final channel only; a generation that ends before it has no answer
    (give such a model room to reason: ``max_new_tokens`` in the thousands).
    Greedy is ``generate(do_sample=False)``: the model's own argmax in its dtype (ties to the
    lower token id). Prompts are left-padded, so a batch's answers start in one column, and
    keep the tokenizer's leading special tokens (BOS) but not an EOS it appends."""
    _check_items("generation_accuracy", items, GenerationItem)
    batch_size = check_batch_size("generation_accuracy", batch_size)
    if not isinstance(stop, Sequence) or isinstance(stop, str) or \
            not all(isinstance(s, str) for s in stop):
        raise TypeError(f"generation_accuracy: stop must be a sequence of strings (one stop "
                        f"string is ({stop!r},)), got {stop!r:.80}")
    if not callable(extract):
        raise TypeError(f"generation_accuracy: extract must be callable (text -> answer or "
                        f"None), got {type(extract).__name__}")
    if tokenizer is None:
        raise ValueError("generation_accuracy: pass tokenizer= (the prompts are text)")
    max_new_tokens = check_int("generation_accuracy", "max_new_tokens", max_new_tokens, 1)
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    specials = special_tokens(tokenizer)
    ids_of = {text: i for i, text in specials.items()}
    channels = (ids_of.get("<|channel|>"), ids_of.get("<|message|>"))
    ends = set(specials) | set(getattr(tokenizer, "all_special_ids", ()))
    work = [(lang, item) for lang, questions in items.items() for item in questions]
    correct = {lang: [] for lang in items}
    predictions = {lang: [] for lang in items}
    bar = progress_bar(len(work), progress, "generate")
    try:
        for start in range(0, len(work), batch_size):
            batch = work[start:start + batch_size]
            prompts = [_prompt_ids(tokenizer, chat_wrap(tokenizer, item.prompt, chat_template),
                                   chat_template) for _, item in batch]
            empty = next((item.prompt for p, (_, item) in zip(prompts, batch) if not p), None)
            if empty is not None:
                raise ValueError(f"generation_accuracy: the prompt {empty!r} has no tokens")
            ids, mask = _left_pad(prompts, pad)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            new = [_answer_text(tokenizer, row, channels, ends)
                   for row in out[:, ids.shape[1]:].tolist()]
            for (lang, item), text in zip(batch, new):
                for s in stop:
                    text = text.split(s, 1)[0] if s else text
                got = extract(text)
                predictions[lang].append(got)
                correct[lang].append(got is not None and got == extract(str(item.answer)))
            bar(len(batch))
    finally:
        bar(None)
    return EvalResult({lang: torch.tensor(c, dtype=torch.bool) for lang, c in correct.items()},
                      predictions, {"kind": "generation", "max_new_tokens": max_new_tokens})


def _answer_text(tokenizer, ids: list, channels: tuple, ends: set) -> str:
    """The decoded answer in generated ``ids``. With the harmony format's channel tokens
    (``channels``: the ids of "<|channel|>" and "<|message|>", or None; GPT-OSS writes
    "<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>ANSWER
    <|return|>"), only the final channel's text, up to the next special token (``ends``: the
    tokenizer's special ids, its added special tokens included: "<|end|>" is one, and so are the
    channel tokens), and "" when there is none yet."""
    channel, message = channels
    if channel is None or message is None or channel not in ids:
        return tokenizer.decode(ids, skip_special_tokens=True)
    answer = []
    for p, token in enumerate(ids):
        if token != channel:
            continue
        try:
            start = ids.index(message, p + 1)
        except ValueError:
            break  # no message after this channel token, nor after a later one
        if tokenizer.decode(ids[p + 1:start]).strip() == "final":
            end = next((q for q in range(start + 1, len(ids)) if ids[q] in ends), len(ids))
            answer = ids[start + 1:end]
    return tokenizer.decode(answer, skip_special_tokens=True)


# -- few-shot prompts --------------------------------------------------------------------------

def few_shot(items: Mapping[str, Sequence], exemplars, shots: int, *,
             separator: str = "\n\n") -> dict:
    """The same questions with ``shots`` solved examples written before each prompt.

    ``items``: ``{language: [ChoiceItem | GenerationItem]}`` with text prompts. ``exemplars``:
    solved questions of the same kind, ``{language: [...]}`` (each language its own) or one
    sequence for every language (e.g. English examples for all); pass ``items`` itself to draw
    them from the task. An example reads as its prompt followed by its answer: the right option
    of a ChoiceItem, ``" " + answer`` of a GenerationItem (so a worked solution whose last number
    is the result makes a chain-of-thought example). Each question takes the first ``shots``
    examples in order whose prompt differs from its own, joined by ``separator``; the result is
    deterministic, and a question never sees itself.
    """
    _check_items("few_shot", items, (ChoiceItem, GenerationItem))
    shots = check_int("few_shot", "shots", shots, 0)
    if not isinstance(separator, str):
        raise TypeError(f"few_shot: separator must be str, got {type(separator).__name__}")
    if isinstance(exemplars, Mapping):
        missing = [lang for lang in items if lang not in exemplars]
        if missing:
            raise ValueError(f"few_shot: exemplars has no {missing}; it has {sorted(exemplars)} "
                             f"(or pass one sequence for every language)")
        pools = {lang: list(exemplars[lang]) for lang in items}
    elif isinstance(exemplars, Sequence) and not isinstance(exemplars, str):
        pools = {lang: list(exemplars) for lang in items}
    else:
        raise TypeError(f"few_shot: exemplars must be a {{language: [items]}} mapping or a "
                        f"sequence of items, got {type(exemplars).__name__}")
    out = {}
    for lang, questions in items.items():
        shown = [(_solved(e, lang, n), e.prompt) for n, e in enumerate(pools[lang])]
        out[lang] = []
        for q, item in enumerate(questions):
            if not isinstance(item.prompt, str):
                raise TypeError(f"few_shot: items[{lang!r}][{q}] has a token-id prompt; "
                                f"few-shot prompts are text")
            chosen = [text for text, prompt in shown if prompt != item.prompt][:shots]
            if len(chosen) < shots:
                raise ValueError(f"few_shot: items[{lang!r}][{q}] needs {shots} examples, the "
                                 f"exemplars for {lang!r} give {len(chosen)}")
            prompt = separator.join(chosen + [item.prompt])
            out[lang].append(ChoiceItem(prompt, item.options, item.answer)
                             if isinstance(item, ChoiceItem)
                             else GenerationItem(prompt, item.answer))
    return out


def _solved(example, lang: str, n: int) -> str:
    if not isinstance(example, (ChoiceItem, GenerationItem)) or not isinstance(example.prompt,
                                                                                str):
        raise TypeError(f"few_shot: exemplar {n} for {lang!r} must be a ChoiceItem or "
                        f"GenerationItem with a text prompt, got {example!r:.80}")
    if isinstance(example, GenerationItem):
        return f"{example.prompt} {example.answer}"
    answer = example.answer
    if not isinstance(answer, int) or isinstance(answer, bool) or not (
            0 <= answer < len(example.options)) or not isinstance(example.options[answer], str):
        raise ValueError(f"few_shot: exemplar {n} for {lang!r}: answer={answer!r} must index a "
                         f"text option")
    return example.prompt + example.options[answer]


# -- data --------------------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJ"


def load_choice_task(source, languages: Optional[Sequence[str]] = None, *,
                     limit: Optional[int] = None, subjects: Optional[Sequence[str]] = None,
                     split: str = "test") -> dict:
    """``{language: [ChoiceItem]}`` from a local JSONL file, Belebele or Global-MMLU.

    * ``*.jsonl``: one question per line, ``{"language": ..., "prompt": ..., "options": [...],
      "answer": index}``; the options are scored as written (give them their leading space);
    * ``"belebele"`` / ``"facebook/belebele"`` (needs ``datasets`` and the Hub): the passage,
      question and four answers as ``P: ... Q: ... A: ... B: ... C: ... D: ... Answer:``, scored
      on the letters ``" A"``..``" D"`` (one token each in most tokenizers: one forward per
      question);
    * ``"global_mmlu"`` / ``"CohereLabs/Global-MMLU"``: the language configs (``en``, ``sw``,
      ...), split ``split`` (``test``, or ``dev``: 5 per subject, for few-shot examples), as
      ``QUESTION A. ... B. ... C. ... D. ... Answer:`` scored on the letters. ``subjects`` keeps
      the questions whose ``subject`` or ``subject_category`` is one of them (any case), e.g.
      ``["medical"]`` for the paper's Global-MMLU-medical. ``limit`` applies after it.
    """
    limit = check_limit("load_choice_task", limit)
    if subjects is not None and source not in GLOBAL_MMLU:
        raise ValueError(f"load_choice_task: subjects= applies to Global-MMLU, not {source!r}")
    if split != "test" and source not in GLOBAL_MMLU:
        raise ValueError(f"load_choice_task: split={split!r} applies to Global-MMLU, not "
                         f"{source!r}")
    if source in BELEBELE:
        return from_hub("load_choice_task", source, languages, limit, _belebele_item,
                        belebele_rows)
    if source in GLOBAL_MMLU:
        if isinstance(subjects, str):
            raise TypeError(f"load_choice_task: subjects must be a list of names, got the "
                            f"string {subjects!r}")
        wanted = None if subjects is None else {str(x).casefold() for x in subjects}

        def rows(datasets, lang):
            data = datasets.load_dataset("CohereLabs/Global-MMLU", lang, split=split)
            kept = [row for row in data if wanted is None or wanted & {
                str(row["subject"]).casefold(), str(row["subject_category"]).casefold()}]
            if not kept:
                categories = sorted({str(row["subject_category"]) for row in data})
                raise ValueError(f"load_choice_task: no Global-MMLU {lang!r} {split} question "
                                 f"has a subject or category in {subjects}; the categories "
                                 f"are {categories}")
            return kept
        return from_hub("load_choice_task", source, languages, limit, _mmlu_item, rows)
    rows = _jsonl("load_choice_task", source)
    out = {}
    for n, row in rows:
        try:
            item = ChoiceItem(row["prompt"], row["options"], row["answer"])
            lang = row["language"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"load_choice_task: {source} line {n}: expected language, prompt, "
                             f"options and answer ({exc!r})") from None
        _check_texts("load_choice_task", source, n, language=lang, prompt=item.prompt)
        if not isinstance(item.options, list) or not all(isinstance(o, str)
                                                          for o in item.options):
            raise ValueError(f"load_choice_task: {source} line {n}: options must be a list of "
                             f"strings, got {item.options!r:.80}")
        if isinstance(item.answer, bool) or not isinstance(item.answer, int):
            raise ValueError(f"load_choice_task: {source} line {n}: answer must be an option "
                             f"index (an int), got {item.answer!r}")
        if not 0 <= item.answer < len(item.options):
            raise ValueError(f"load_choice_task: {source} line {n}: answer={item.answer} is not "
                             f"an index of its {len(item.options)} options")
        out.setdefault(lang, []).append(item)
    return _select("load_choice_task", out, languages, limit, source)


def _belebele_item(row) -> ChoiceItem:
    answers = [row[f"mc_answer{i}"] for i in range(1, 5)]
    prompt = (f"P: {row['flores_passage']}\nQ: {row['question'].strip()}\n"
              + "".join(f"{_LETTERS[i]}: {a}\n" for i, a in enumerate(answers)) + "Answer:")
    return ChoiceItem(prompt, [f" {_LETTERS[i]}" for i in range(4)],
                      int(row["correct_answer_num"]) - 1)


def _mmlu_item(row) -> ChoiceItem:
    letter = str(row["answer"]).strip().upper()
    if len(letter) != 1 or letter not in "ABCD":
        raise ValueError(f"load_choice_task: Global-MMLU question {row.get('sample_id')!r} has "
                         f"answer {row['answer']!r}, expected a letter A-D")
    options = "".join(f"{x}. {row['option_' + x.lower()]}\n" for x in "ABCD")
    return ChoiceItem(f"{row['question'].strip()}\n{options}Answer:", [f" {x}" for x in "ABCD"],
                      "ABCD".index(letter))


def load_generation_task(source, languages: Optional[Sequence[str]] = None, *,
                         limit: Optional[int] = None) -> dict:
    """``{language: [GenerationItem]}`` from a local JSONL file or MGSM.

    * ``*.jsonl``: ``{"language": ..., "prompt": ..., "answer": ...}`` per line;
    * ``"mgsm"`` / ``"CohereLabs/global-mgsm"`` (needs ``datasets`` and the Hub): Global-MGSM,
      MGSM's 250 questions in its 11 languages and more, the test split of each language config
      (``en``, ``sw``, ``bn``, ...), answered by ``answer``. Prompted as the paper's follow-up
      evaluation does, with the row's instruction and answer prefix in its language:
      ``INSTRUCTION\\n\\nQuestion: ...\\n\\nPREFIX:``; a row without them gets
      ``Question: ...\\nAnswer:``.
      (``juletxara/mgsm``, the older copy, is a loading script that ``datasets`` 4 refuses.)
    """
    limit = check_limit("load_generation_task", limit)
    check_not_retired("load_generation_task", source, "juletxara/mgsm",
                      "'mgsm' (CohereLabs/global-mgsm)")
    if source in GENERATION_DATASETS:
        return from_hub("load_generation_task", source, languages, limit, _mgsm_item,
                         lambda datasets, lang: datasets.load_dataset("CohereLabs/global-mgsm",
                                                                      lang, split="test"))
    out = {}
    for n, row in _jsonl("load_generation_task", source):
        try:
            lang, prompt, answer = row["language"], row["prompt"], row["answer"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"load_generation_task: {source} line {n}: expected language, "
                             f"prompt and answer ({exc!r})") from None
        _check_texts("load_generation_task", source, n, language=lang, prompt=prompt)
        if (isinstance(answer, bool) or not isinstance(answer, (str, int, float))
                or (isinstance(answer, float) and not math.isfinite(answer))):
            raise ValueError(f"load_generation_task: {source} line {n}: answer must be a "
                             f"finite number or a string, got {answer!r:.80}")
        if isinstance(answer, float):  # positional: str(1e20) is "1e+20", whose last number is 20
            answer = format(decimal.Decimal(repr(answer)), "f")
        out.setdefault(lang, []).append(GenerationItem(prompt, str(answer)))
    return _select("load_generation_task", out, languages, limit, source)


def _check_texts(caller: str, source, n: int, **texts) -> None:
    """A question's language and prompt are strings (a JSON null became the text "None")."""
    for name, value in texts.items():
        if not isinstance(value, str):
            raise ValueError(f"{caller}: {source} line {n}: {name} must be a string, got "
                             f"{value!r:.80}")


def _jsonl(caller: str, source):
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source).endswith(".jsonl"):
        raise ValueError(f"{caller}: source={source!r} must be a .jsonl file or a known dataset "
                         f"name")
    if not os.path.exists(source):
        raise ValueError(f"{caller}: {source} does not exist")
    rows = []
    with open(source, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rows.append((n, parse_json(line, f"{caller}: {source} line {n}")))
    return rows


def _select(caller: str, out: dict, languages, limit, source) -> dict:
    if not out:
        raise ValueError(f"{caller}: {source} holds no questions")
    languages = list(languages) if languages else list(out)
    missing = [lang for lang in languages if lang not in out]
    if missing:
        raise ValueError(f"{caller}: languages {missing} are not in the data; it has "
                         f"{sorted(out)}")
    return {lang: out[lang][:limit] for lang in languages}


def _mgsm_item(row) -> GenerationItem:
    # Global-MGSM's rows carry the language's instruction and answer prefix ("Jibu"); the
    # paper's follow-up evaluation prompts with both. A copy without them gets English labels.
    instruction, prefix = row.get("instruction"), row.get("answer_prefix")
    if instruction and prefix:
        return GenerationItem(f"{instruction}\n\nQuestion: {row['question']}\n\n{prefix}:",
                              str(row["answer"]))
    return GenerationItem(f"Question: {row['question']}\nAnswer:", str(row["answer"]))


# -- shared ------------------------------------------------------------------------------------

def _check_items(caller: str, items, kind) -> None:
    """``kind``: the item class, or a tuple of the classes allowed."""
    name = " | ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    if not isinstance(items, Mapping) or not items:
        raise ValueError(f"{caller}: items must be a non-empty {{language: [{name}]}} "
                         f"mapping, got {type(items).__name__}")
    for lang, questions in items.items():
        bad = next((q for q in questions if not isinstance(q, kind)), None)
        if bad is not None:
            raise TypeError(f"{caller}: items[{lang!r}] must hold {name} items, got "
                            f"{type(bad).__name__}")


def _prompt_ids(tokenizer, text: str, chat_template: bool) -> list:
    """The token ids of a prompt: the tokenizer's leading special tokens (BOS) unless the text
    is a chat template's (which writes its own), and none after the text. Some tokenizers
    append EOS; the answer must follow the prompt, not an end of text."""
    if chat_template:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if plain and ids[len(ids) - len(plain):] == plain:
        return ids
    for start in range(len(ids) - len(plain), -1, -1) if plain else ():
        if ids[start:start + len(plain)] == plain:          # specials after the text: cut them
            return ids[:start + len(plain)]
    specials = set(getattr(tokenizer, "all_special_ids", ()))   # no match: cut trailing ones
    while ids and ids[-1] in specials:
        ids.pop()
    return ids


def _left_pad(rows: list, pad_id: int):
    """``(input_ids, attention_mask)`` ``[len(rows), longest]`` int64, the rows right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, tokens in enumerate(rows):
        ids[b, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[b, width - len(tokens):] = 1
    return ids, mask


