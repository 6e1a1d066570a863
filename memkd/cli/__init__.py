"""The ``memkd`` command line: train, test, predict, export, info and demo.

Every command prints ``memkd: error: <one line>`` and exits with status 1 on bad input (missing
paths, unknown categories, corrupt checkpoints, dataset layout errors, invalid settings); ``--debug``
shows the traceback instead. Usage errors exit with status 2, an interrupt with 130.

``parser`` holds every command's options; the commands are ``train``, ``checkpoints`` (test,
predict, export), ``info`` and ``demo``; what they run is ``memkd.pipeline``.
"""
from __future__ import annotations

import sys
import traceback
from typing import Optional, Sequence

from memkd.cli.checkpoints import find_checkpoints
from memkd.cli.common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE
from memkd.cli.info import info_lines
from memkd.cli.parser import build_parser
from memkd.devices import resolve_device
from memkd.errors import CommandError

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "CommandError",
    "build_parser",
    "find_checkpoints",
    "info_lines",
    "main",
    "one_line",
    "resolve_device",
]


def one_line(exc: BaseException) -> str:
    """The user-facing message of an exception, on one line. An error re-raised by a DataLoader
    worker carries the worker's traceback; its last line is the original error."""
    text = str(exc).strip()
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        prefix, _, rest = last.partition(": ")
        text = rest if rest and all(part.isidentifier() for part in prefix.split(".")) else last
    if isinstance(exc, KeyError) and text.startswith("'"):
        text = f"missing {text}"
    text = " ".join(text.split())
    if not text:
        text = type(exc).__name__
    elif not isinstance(exc, (CommandError, ValueError, OSError)):
        text = f"{type(exc).__name__}: {text}"
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (``memkd`` console script and ``python -m memkd``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help, --version and usage errors
            return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USAGE)
        debug = bool(getattr(args, "debug", False))
        if hasattr(args, "no_progress"):
            args.progress = not args.no_progress
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("memkd: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # every failure ends in one line unless --debug
        if debug:
            traceback.print_exc()
        else:
            print(f"memkd: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_ERROR
