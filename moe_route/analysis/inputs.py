"""Text inputs shared by the routing pipeline and the task evaluation: the chat-template wrap,
Hub datasets by language, and the batch-size check."""
from __future__ import annotations

from typing import Optional

from moe_route._checks import check_int

__all__ = ["chat_wrap", "check_batch_size", "check_limit", "from_hub", "belebele_rows",
           "check_not_retired", "pad_id", "special_tokens", "BELEBELE"]

BELEBELE = ("belebele", "facebook/belebele")


def chat_wrap(tokenizer, prompt: str, chat_template: bool) -> str:
    """``prompt`` as one user turn of the tokenizer's chat template, with the generation prompt
    after it (or unchanged when ``chat_template`` is false). Thinking is off, as in the paper:
    templates with a switch (Qwen3's ``enable_thinking``) close the think block in the
    generation prompt, so the answer follows at once; other templates ignore the switch."""
    if not chat_template:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (only masked positions
    hold it), else 0."""
    if tokenizer is None:
        return 0
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


def special_tokens(tokenizer) -> dict:
    """``{id: text}`` of the tokenizer's added tokens marked special: BOS, EOS, pad, a chat
    template's "<|im_start|>" or "<|user|>", GPT-OSS's "<|channel|>". Not a vocabulary token
    that was made the pad token (``all_special_ids`` would list it)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {i: token.content for i, token in added.items() if getattr(token, "special", False)}


def check_batch_size(caller: str, batch_size) -> int:
    """``batch_size``, an int >= 1 (``check_int``'s errors name ``caller``)."""
    return check_int(caller, "batch_size", batch_size, 1)


def check_limit(caller: str, limit) -> Optional[int]:
    """``limit``, None (everything) or an int >= 1: a slice ``[:0]`` would load nothing and
    ``[:-1]`` silently drop the last rows."""
    return check_int(caller, "limit", limit, 1, none="all")


def check_not_retired(caller: str, source, retired: str, use: str) -> None:
    """ValueError, naming ``caller`` and ``use`` instead, if ``source`` is ``retired``: a Hub
    repository the loaders read before, whose loading script ``datasets`` 4 and later refuse
    to run ("Dataset scripts are no longer supported")."""
    if source == retired:
        raise ValueError(f"{caller}: source={source!r} is a loading-script dataset, which "
                         f"`datasets` 4 and later no longer load; use {use}")


def belebele_rows(datasets, language: str):
    """Belebele's rows in one language. The Hub repository has been published in two layouts: a
    config per language holding a ``test`` split, and one config whose splits are the languages.
    The second is asked for only when the first is not there."""
    try:
        return datasets.load_dataset("facebook/belebele", language, split="test")
    except ValueError as by_config:
        try:
            return datasets.load_dataset("facebook/belebele", split=language)
        except ValueError:
            raise by_config from None


def from_hub(caller: str, source: str, languages, limit, make_item, split) -> dict:
    """``{language: [make_item(row)]}`` over ``split(datasets, language)`` of a Hub dataset,
    the first ``limit`` rows of each (all with ``None``)."""
    if not languages:
        raise ValueError(f"{caller}: source={source!r} needs languages=[...]")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{caller}: source={source!r} needs the `datasets` package "
                          f"(pip install datasets)") from None
    return {lang: [make_item(row) for row in split(datasets, lang)][:limit] for lang in languages}
