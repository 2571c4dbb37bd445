"""The `tilevlm` command: one subcommand per module named in COMMANDS (under `tilevlm/commands/`,
beside the shared `options.py` and `answering.py`, which are not commands).

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`;
a command module imports the library inside `run` (and what its options need inside
`add_arguments`), so building the parser, and `tilevlm --help`, stays fast.
A `ValueError` from the library is a user error: one line on stderr and exit code 2. An
`OSError` (disk full, permission denied, ...) is one line and exit code 1; warnings (an animated
image, ...) are one line each. `-v` adds the traceback. Every command runs with glibc keeping
freed memory (`tilevlm/host_memory.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings
from typing import Iterator, NoReturn

from tilevlm import __version__
from tilevlm.commands.options import apply_threads
from tilevlm.host_memory import keep_freed_memory

COMMANDS = {
    "demo": "tilevlm.commands.demo",
    "train": "tilevlm.commands.train",
    "eval": "tilevlm.commands.evaluate",
    "generate": "tilevlm.commands.generate",
    "chat": "tilevlm.commands.chat",
    "inspect": "tilevlm.commands.inspect",
    "build": "tilevlm.commands.build",
    "merge": "tilevlm.commands.merge",
    "export": "tilevlm.commands.export",
    "bench": "tilevlm.commands.bench",
    "serve": "tilevlm.commands.serve",
}


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its errors as one line, `tilevlm COMMAND: error: MESSAGE`, exit
    code 2 (argparse prints its usage block first; `--help` still shows the usage). Subcommand
    parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tilevlm",
        description="tilevlm: a small tile-based vision-language model toolkit "
        "(train, run, evaluate and inspect).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"tilevlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP,
                             formatter_class=_HelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """An option's default after its help, unless it is None, False or empty, or the help says
    it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == "" \
                or "default" in text:
            return text
        return super()._get_help_string(action)


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
            keep_freed_memory()  # before the command allocates: CPU steps reuse mapped pages
            apply_threads(args)
            return int(args._run(args) or 0)
    except ValueError as e:
        logging.debug("traceback", exc_info=True)
        print(f"tilevlm {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the input: disk full, permissions, ...
        logging.debug("traceback", exc_info=True)
        print(f"tilevlm {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tilevlm {args.command}: interrupted", file=sys.stderr)
        return 130


_PILLOW_PART = f"{os.sep}PIL{os.sep}"  # in the file name of Pillow's modules


def _one_line(message: object) -> str:
    """A message on one line (library messages may quote multi-line text from elsewhere)."""
    return " ".join(str(message).split())


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Warnings as `tilevlm COMMAND: warning: MESSAGE`, not Python's two-line source excerpt.

    Pillow's own warnings about a file it is decoding ("Tag data larger than file", ...) go to
    the debug log: what counts is the outcome, an image or a one-line refusal naming the file."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if _PILLOW_PART in filename:
            logging.debug("Pillow: %s", message)
            return
        print(f"tilevlm {command}: warning: {_one_line(message)}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())
