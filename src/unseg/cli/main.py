"""Entry point of the ``unseg`` command: builds the parser from the command modules and runs one.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func=callable(args) -> int`` as the parser default.

Interrupts: Ctrl-C exits with status 130 and SIGTERM with 143, each with one line on stderr and
no traceback; the outputs finished so far are kept (every write is atomic) and worker processes
are stopped on the way out (see :mod:`unseg.utils.signals` and :class:`unseg.refine.crf.CRFPool`).
Under ``torchrun`` each rank ends the same way when torchrun forwards a signal, and terminates
itself when torchrun is killed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from unseg._version import __version__
from unseg.errors import UnsegError
from unseg.utils.allocator import keep_freed_memory
from unseg.utils.progress import set_progress
from unseg.utils.signals import Terminated, follow_launcher, sigterm_raises

log = logging.getLogger(__name__)

COMMAND_MODULES = (
    "unseg.cli.backbones",
    "unseg.cli.features",
    "unseg.cli.fit",
    "unseg.cli.predict",
    "unseg.cli.segment",
    "unseg.cli.discover",
    "unseg.cli.evaluate",
    "unseg.cli.report",
)


def build_parser() -> argparse.ArgumentParser:
    """The full ``unseg`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="unseg",
        description="Unsupervised image segmentation on frozen self-supervised backbones.",
    )
    parser.add_argument("--version", action="version", version=f"unseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _add_logging_flags(parser, 0)
    return parser


def _add_logging_flags(parser: argparse.ArgumentParser, level: int) -> None:
    """``-v`` / ``-q`` on ``parser`` and on every (sub)command under it, so that they may also
    follow the command. Below the top (``level`` > 0) each level has its own destination,
    absent unless given, since a subcommand's values replace its parent's: :func:`parse_args`
    adds them up."""
    top = level == 0
    suffix = "" if top else f"_{level}"
    parser.add_argument("-v", "--verbose", action="count", dest="verbose" + suffix,
                        default=0 if top else argparse.SUPPRESS, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", dest="quiet" + suffix,
                        default=False if top else argparse.SUPPRESS, help="no progress bars")
    children = {id(p): p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                for p in a.choices.values()}  # an alias names the same parser
    for child in children.values():
        _add_logging_flags(child, level + 1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``argv`` parsed by :func:`build_parser`; ``-v`` and ``-q`` given before or after the
    command end up in ``verbose`` (the count of all) and ``quiet``."""
    args = build_parser().parse_args(argv)
    for name in list(vars(args)):
        head, _, level = name.rpartition("_")
        if head == "verbose" and level.isdigit():
            args.verbose += vars(args).pop(name)
        elif head == "quiet" and level.isdigit():
            args.quiet = vars(args).pop(name) or args.quiet
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (0 ok, 1 some inputs failed, 2 error,
    130 interrupted by Ctrl-C, 143 terminated by SIGTERM)."""
    try:
        with sigterm_raises() as sigterm:
            follow_launcher()
            return _run(argv)
    except Terminated:
        return _terminated()
    except KeyboardInterrupt:
        print("unseg: interrupted; finished outputs are kept", file=sys.stderr)
        return 130
    except Exception as exc:
        if sigterm.is_set():  # e.g. a worker killed by the same SIGTERM, sent to the group
            log.debug("while terminating: %r", exc)
            return _terminated()
        if isinstance(exc, UnsegError):
            print(f"unseg: error: {exc}", file=sys.stderr)
            return 2
        raise


def _terminated() -> int:
    print("unseg: terminated; finished outputs are kept", file=sys.stderr)
    return 143


def _run(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    set_progress(not args.quiet and sys.stderr.isatty())
    keep_freed_memory()  # large tensors reuse mapped pages: a quarter off a run (see its module)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
