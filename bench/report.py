"""What every bench script does with its figures: print them as JSON and keep them in a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], out: str | Path | None) -> None:
    """Print `result` as JSON; also write it to `out` when given (bench/results/<name>.json by convention)."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
