"""What every benchmark does with its result: print it as JSON and, with `--out`, write it whole or not at all."""

from __future__ import annotations

import json


def emit(result: dict, out: str | None) -> None:
    """Print `result` as indented JSON; also write it to `out` (atomically: a reader never sees half a file)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        from tokensft.io import atomic_write

        atomic_write(out, text + "\n")
