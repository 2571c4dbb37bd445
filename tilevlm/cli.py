"""The `tilevlm` command: one subcommand per module named in COMMANDS (under `tilevlm/commands/`,
beside the shared `options.py` and `answering.py`, which are not commands).

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their command runs, so `tilevlm --help` stays fast.
A `ValueError` from the library is a user error: one line on stderr and exit code 2. An
`OSError` (disk full, permission denied, ...) is one line and exit code 1; warnings (an animated
image, ...) are one line each. `-v` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import contextlib
import logging
import sys
import warnings
from typing import Iterator

COMMANDS = {
    "demo": "tilevlm.commands.demo",
    "train": "tilevlm.commands.train",
    "eval": "tilevlm.commands.evaluate",
    "generate": "tilevlm.commands.generate",
    "chat": "tilevlm.commands.chat",
    "inspect": "tilevlm.commands.inspect",
    "build": "tilevlm.commands.build",
    "export": "tilevlm.commands.export",
    "bench": "tilevlm.commands.bench",
}


def _available() -> dict[str, str]:
    """Commands whose module exists in this install (some land in later releases)."""
    found = {}
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = module
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilevlm",
        description="tilevlm: a small tile-based vision-language model toolkit "
        "(train, run, evaluate and inspect).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in _available().items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP,
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        with _one_line_warnings(args.command):
            return int(args._run(args) or 0)
    except ValueError as e:
        logging.debug("traceback", exc_info=True)
        print(f"tilevlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the input: disk full, permissions, ...
        logging.debug("traceback", exc_info=True)
        print(f"tilevlm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tilevlm {args.command}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Warnings as `tilevlm COMMAND: warning: MESSAGE`, not Python's two-line source excerpt."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"tilevlm {command}: warning: {message}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())
