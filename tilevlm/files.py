"""Small file helpers shared by every reader and writer: the one JSON reader (objects, lists,
single lines) and its typed field reader (`json_field`, for files we did not write), regular-file
checks, confinement of named files, how an output path overlaps an input (`path_overlap`), atomic
(fsynced) writes of files and whole directories, and a full disk inside a Rust writer as an
OSError (`rust_io_errors`).

Rules every reader follows (docs/reliability.md, "Files that name other files"):
- a file is read only when it is a regular file (a FIFO or a device would block or never end);
- a JSON problem of any kind (not UTF-8, truncated, nested too deep, the wrong type) is a
  ValueError that starts with the file's name;
- a name read from a file (an image path, a shard, an Arrow file, the `latest` pointer) must,
  once symlinks are resolved, stay inside the directory it is relative to.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

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


REQUIRED = object()  # `json_field`'s default: the field must be there
_KINDS = {  # a field's kind -> (test, what it must be)
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v), "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def json_field(data: dict[str, Any], key: str, kind: str, where: str | Path,
               default: Any = REQUIRED, low: float | None = None, high: float | None = None,
               nullable: bool = False, prefix: str = "") -> Any:
    """`data[key]` of a JSON object read from a file we did not write, checked before use: of
    `kind` (one of int, number, bool, str, object, list), within [low, high] for numbers; a
    missing key (or null, when `nullable`) gives `default`. A ValueError names the file and the
    field (`where: prefix+key must be ...`) otherwise."""
    name = f"{prefix}{key}"
    value = data.get(key) if isinstance(data, dict) else None
    if value is None and (key not in data or nullable):
        if default is REQUIRED:
            raise ValueError(f"{where}: {name} is missing")
        return default
    test, what = _KINDS[kind]
    if not test(value):
        raise ValueError(f"{where}: {name} must be {what}, got {value!r:.60}")
    if low is not None and value < low:
        raise ValueError(f"{where}: {name} must be >= {low:g}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{where}: {name} must be <= {high:g}, got {value}")
    return value


def json_numbers(data: dict[str, Any], key: str, where: str | Path, count: int,
                 default: Any = REQUIRED, low: float | None = None, prefix: str = "") -> Any:
    """A list of `count` finite numbers (each >= `low` when given) at `data[key]`, as a tuple
    of floats; `default` when missing; a ValueError naming the file and the field otherwise."""
    value = json_field(data, key, "list", where, default, prefix=prefix)
    if value is default:
        return default
    ok = len(value) == count and all(_KINDS["number"][0](v) and (low is None or v >= low)
                                     for v in value)
    if not ok:
        bound = f" >= {low:g}" if low is not None else ""
        raise ValueError(f"{where}: {prefix}{key} must be a list of {count} finite numbers"
                         f"{bound}, got {value!r:.60}")
    return tuple(float(v) for v in value)


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


def path_overlap(output: str | Path, source: str | Path) -> str | None:
    """How writing `output` would touch `source` (symlinks resolved): "is" (the same file or
    directory), "holds" (a directory above it), or None."""
    out, src = os.path.realpath(output), os.path.realpath(source)
    if out == src:
        return "is"
    if os.path.commonpath([out, src]) == out:
        return "holds"
    return None


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
    """`write(tmp)` to a temporary name beside `path`, fsync, then rename over `path`: a kill or a
    full disk never leaves half a file, only the old one or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with rust_io_errors(path):
            write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from the user's group
        _fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """`text` (UTF-8) into `path`, atomically (`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_directory(final: Path, write: Callable[[Path], None], prefix: str = ".tmp-") -> Path:
    """Run `write(tmp_dir)` in a temporary directory `prefix*` beside `final`, fsync every file,
    rename it to `final` (replacing it whole: none of the old directory's files is kept): a kill
    leaves the old `final`, or the new one, never half of one; a failed `write` (a full disk
    included) leaves nothing behind and the old `final` as it was."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        with rust_io_errors(final):
            write(tmp)
        _fsync_tree(tmp)
        _replace_dir(tmp, final, prefix)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _replace_dir(src: Path, dst: Path, prefix: str) -> None:
    """`os.replace` for directories; an existing `dst` is moved aside first and deleted after
    (put back when the rename fails)."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))
        os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old / dst.name, dst)
            shutil.rmtree(old, ignore_errors=True)
        raise
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Rust writers (safetensors, tokenizers) raise their own exception types for a failed write,
# with the OS error in the message: "... No space left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


@contextlib.contextmanager
def rust_io_errors(path: str | Path) -> Iterator[None]:
    """A failed write inside safetensors' or tokenizers' Rust code (a full disk, ...) as the
    OSError it reports, naming `path`: a machine failure like any other (one line, exit 1 on
    the command line), not an unknown exception type."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - only those that carry an OS error are converted
        found = _RUST_OS_ERROR.search(str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            _fsync_file(path)
    for path in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
