"""Progress bars for long analysis runs: tqdm when it is installed, else a line on stderr."""
from __future__ import annotations

__all__ = ["progress_bar"]


def progress_bar(total: int, enabled: bool, label: str):
    """``bar = progress_bar(total, enabled, label)``; ``bar(n)`` counts n more done, ``bar(None)``
    closes it. Does nothing unless ``enabled``."""
    if not enabled:
        return lambda n: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, desc=label)
        return lambda n: bar.update(n) if n is not None else bar.close()
    import sys

    done = [0]

    def step(n):
        if n is None:
            sys.stderr.write("\n")
            return
        done[0] += n
        sys.stderr.write(f"\r{label}: {done[0]}/{total}")
        sys.stderr.flush()
    return step
