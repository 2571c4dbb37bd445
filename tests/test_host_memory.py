"""glibc keeps freed blocks for reuse once `keep_freed_memory` ran (checked with mallinfo2 in a
fresh process, so this test process keeps the C library's defaults)."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from tilevlm.host_memory import OPT_OUT_ENV

glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")
needs_glibc = pytest.mark.skipif(not glibc, reason="glibc 2.33+ (mallinfo2) only")

PROBE = textwrap.dedent("""
    import ctypes, torch
    from tilevlm.host_memory import keep_freed_memory

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = Info
    took = keep_freed_memory()
    block = torch.empty(16 * 2**20)  # 64 MiB, above any mmap threshold glibc would use
    mapped = mallinfo2().hblkhd  # bytes in mmap-served blocks
    del block
    print(took, mapped >= 64 * 2**20, mallinfo2().fordblks >= 64 * 2**20)  # free, kept
""")


def _probe(**env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **env}, check=True)
    return out.stdout.split()


@needs_glibc
def test_freed_blocks_stay_in_the_heap():
    took, mapped, kept = _probe(**{OPT_OUT_ENV: ""})
    assert (took, mapped, kept) == ("True", "False", "True")


@needs_glibc
def test_opt_out_keeps_the_c_library_defaults():
    took, mapped, kept = _probe(**{OPT_OUT_ENV: "1"})
    assert (took, mapped, kept) == ("False", "True", "False")


def test_every_command_runs_with_it(monkeypatch):
    """main() turns it on before any command runs (here one that stops at a missing file)."""
    import tilevlm.cli as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["inspect", "/nonexistent.png", "--preset", "tiny"]) == 2
    assert calls == [1]
