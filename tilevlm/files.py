"""Small file helpers shared by every reader and writer: one JSON-object reader, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def read_json_object(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object in `path` (a ValueError naming the file otherwise); {} for a missing
    file when `missing_ok`."""
    if not path.is_file():
        if missing_ok:
            return {}
        raise ValueError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename: a kill never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
