"""A run owns its folder (`--out`): one writer at a time, and a new run never mixes with an old one.

`claim_run_dir(out, ...)` is called before any work. It takes `OUT/tilevlm.lock` (an exclusive
`flock` on the file, held until the run ends; the file holds the holder's PID, host, start time
and command line as JSON, so a second writer is refused in one line that names it). The kernel
releases the lock of a process that dies, however it dies; a lock file that still names a holder
when the lock is free was left by a run that did not end cleanly, and is taken over with a
warning. The file is emptied (never deleted: a deleted file could be locked twice) when the run
ends.

A new run into a folder that already holds a run (`run_folder.run_entries`: checkpoints,
`latest`, `model/`, `adapter/`, metrics) is refused unless it continues that run (`--resume`) or
replaces it (`--overwrite`: `clear_run` deletes those entries, and only those, before step 1).
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from tilevlm.files import make_output_dir, path_overlap
from tilevlm.weights.run_folder import LOCK_FILE, run_entries

try:  # POSIX; elsewhere the lock falls back to the PID it names
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)


class RunLock:
    """The held lock of one run folder; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # no holder named: the next run takes it without a warning
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_run_dir(out: Path) -> RunLock:
    """Take `out/tilevlm.lock`; a ValueError naming the holder when another process has it."""
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _flock(fd, path)
        previous = _holder(fd)
        if previous:
            log.warning("%s: taking over the lock of %s, which ended without releasing it",
                        path, _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(["tilevlm", *sys.argv[1:]])[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return RunLock(path, fd)


def _flock(fd: int, path: Path) -> None:
    """An exclusive lock on `fd` without waiting; a ValueError naming the holder when taken."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            raise ValueError(_refusal(path, _holder(fd))) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
    # No locking on this file system: a holder still running on this host keeps the folder.
    holder = _holder(fd)
    if holder and holder.get("host") == socket.gethostname() and _alive(holder.get("pid")):
        raise ValueError(_refusal(path, holder))


def _refusal(path: Path, holder: dict[str, Any] | None) -> str:
    return (f"{path.parent} is in use by another run ({_describe(holder)}): wait for it to end, "
            "or give another --out")


def _holder(fd: int) -> dict[str, Any] | None:
    """The holder the lock file names, or None when it is empty or unreadable."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "null")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that did not say who it is"
    return (f"PID {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}: "
            f"{holder.get('command')}")[:300]


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_run_dir(out: str | Path, resume: str | Path | None = None,
                  overwrite: bool = False) -> RunLock:
    """The run folder `out`, checked and locked before any work (see the module docstring);
    under torchrun rank 0 alone claims it (the job fails with it).

    `resume`: the checkpoint or run folder the run continues from; `overwrite`: a run already in
    `out` is to be replaced."""
    out = make_output_dir(Path(out), "run directory (--out)")
    held = lock_run_dir(out)
    try:
        _check_claim(out, resume, overwrite)
    except BaseException:
        held.release()
        raise
    return held


def _check_claim(out: Path, resume: str | Path | None, overwrite: bool) -> None:
    inside = resume is not None and path_overlap(out, resume) is not None
    if overwrite and inside:
        raise ValueError(f"--overwrite would delete {resume}, which --resume continues from; "
                         "give one of the two")
    entries = run_entries(out)
    if entries and not overwrite and not inside:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(f"--out {out} already holds a run ({shown}): continue it with --resume "
                         f"{out}, replace it with --overwrite, or give a new folder")


def clear_run(out: str | Path) -> None:
    """Delete a previous run's entries in `out` (`--overwrite`), nothing else."""
    out = Path(out)
    entries = run_entries(out)
    if entries:
        log.warning("--overwrite: deleting the previous run in %s (%s)", out, ", ".join(entries))
    for name in entries:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
