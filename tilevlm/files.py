"""Small file helpers shared by every reader and writer: the one JSON reader (objects, lists,
single lines), regular-file checks, confinement of named files, atomic writes.

Rules every reader follows (docs/reliability.md, "Files that name other files"):
- a file is read only when it is a regular file (a FIFO or a device would block or never end);
- a JSON problem of any kind (not UTF-8, truncated, nested too deep, the wrong type) is a
  ValueError that starts with the file's name;
- a name read from a file (an image path, a shard, an Arrow file, the `latest` pointer) must,
  once symlinks are resolved, stay inside the directory it is relative to.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

# Deeper JSON is refused: no file tilevlm reads nests anywhere near this.
MAX_JSON_DEPTH = 64


def check_regular_file(path: Path) -> None:
    """A ValueError naming `path` unless it is a regular file (symlinks followed)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: not a regular file")


def parse_json(text: str | bytes, name: str) -> Any:
    """The JSON value in `text`; a ValueError starting with `name` when it is not valid JSON,
    not UTF-8, or nested deeper than MAX_JSON_DEPTH."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: not valid JSON ({e})") from None
    except RecursionError:  # Python's parser gave up: far deeper than the limit
        raise ValueError(f"{name}: JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    # Counting brackets is cheap; only text with many of them has its depth measured.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(data) > MAX_JSON_DEPTH:
        raise ValueError(f"{name}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return data


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                  else item))
    return deepest


def read_json(path: Path, kind: type = dict, what: str = "a JSON object") -> Any:
    """The JSON value of type `kind` in the regular file `path`; a ValueError naming the file."""
    check_regular_file(path)
    data = parse_json(path.read_bytes(), str(path))
    if not isinstance(data, kind):
        raise ValueError(f"{path}: expected {what}, got a {_json_type(data)}")
    return data


def read_json_object(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object in `path` (a ValueError naming the file otherwise); {} for a missing
    file when `missing_ok`."""
    if missing_ok and not path.exists():
        return {}
    return read_json(path)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def confined(root: str | Path, name: Any, what: str = "path",
             root_name: str = "the directory") -> Path:
    """`root / name`, refused (ValueError) unless `name` is a non-empty string whose target,
    symlinks resolved, stays inside `root` (also resolved)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r:.80}")
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, name))  # an absolute `name` replaces `base`
    if os.path.commonpath([base, path]) != base:
        raise ValueError(f"{what} {name!r:.200} is outside {root_name} {base}")
    return Path(path)


def make_output_dir(path: Path, what: str = "output directory") -> Path:
    """`path` as a directory (created with its parents); a ValueError when it, or a parent,
    exists and is not a directory (an input mistake, not a machine failure)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{path}: cannot be the {what}: it or a parent exists and is not a "
                         "directory") from None
    return path


_UMASK = os.umask(0)  # read once (reading it means setting it), then restored
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename: a kill never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from the user's group
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
