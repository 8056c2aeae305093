"""Reading JSON that may be damaged or foreign: every way it can fail to parse is one ValueError;
and checking that metadata a file will hold reads back unchanged (``check``).

``json`` fails in three ways on bad input: ``JSONDecodeError`` (a ValueError), a
``UnicodeDecodeError`` from bytes that are not text (also a ValueError, without the file's name),
and ``RecursionError`` when arrays or objects nest past Python's recursion limit (a file of
100 000 ``[`` is enough). The readers of saved plans, statistics, traces, results and data files
all go through here, so each reports ``<what> is not valid JSON (<why>)``.
"""
from __future__ import annotations

import json

__all__ = ["check", "parse", "read"]


def parse(text, what: str, **options):
    """``json.loads(text, **options)``; a failure is a ValueError that starts with ``what``.
    A ValueError raised by a hook in ``options`` is reported the same way."""
    try:
        return json.loads(text, **options)
    except RecursionError:
        reason = "arrays or objects nest deeper than Python's recursion limit"
    except ValueError as exc:
        reason = str(exc)
    raise ValueError(f"{what} is not valid JSON ({reason})")


def read(path, what: str, **options):
    """The JSON document in the file ``path`` (its bytes decoded as ``json.loads`` does). A file
    that cannot be opened raises OSError as ``open`` does; one that does not parse, a ValueError
    starting with ``what``."""
    with open(path, "rb") as f:
        data = f.read()
    return parse(data, what, **options)


def check(value, what: str) -> None:
    """That ``value`` (metadata a file will hold) is written as strict JSON and reads back equal;
    else a ValueError starting with ``what``."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable ({exc})") from None
    # json writes tuples as lists and int/float/bool/None keys as str: load would differ
    if json.loads(text) != value:
        raise ValueError(f"{what} must read back from JSON unchanged (dicts with str keys, "
                         f"lists, str, int, float, bool, None; a tuple reads back as a list, "
                         f"an int key as a str), got {value!r:.120}")
