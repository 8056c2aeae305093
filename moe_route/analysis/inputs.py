"""Text inputs shared by the routing pipeline and the task evaluation: the chat-template wrap,
Hub datasets by language, and the batch-size check."""
from __future__ import annotations

__all__ = ["chat_wrap", "check_batch_size", "from_hub"]


def chat_wrap(tokenizer, prompt: str, chat_template: bool) -> str:
    """``prompt`` as one user turn of the tokenizer's chat template, with the generation prompt
    after it (or unchanged when ``chat_template`` is false)."""
    if not chat_template:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def check_batch_size(caller: str, batch_size) -> None:
    """ValueError, naming ``caller``, unless ``batch_size`` is an int >= 1 (a bool is not)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{caller}: batch_size={batch_size!r} must be an int >= 1")


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
