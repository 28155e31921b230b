"""`unseg backbones [PATTERN]`: list the backbones, their stride, dim and weight status."""

from __future__ import annotations

import argparse

from unseg.backbones.listing import describe_backbones


def run(args: argparse.Namespace) -> int:
    """Print the backbone table."""
    print(describe_backbones(args.pattern))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `backbones` command to the parser."""
    p = sub.add_parser(
        "backbones",
        help="list backbones: stride, feature dim, weights status (packaged/cached/download)",
    )
    p.add_argument("pattern", nargs="?", default="*", help="wildcard on names, e.g. 'dino*'")
    p.set_defaults(func=run)
