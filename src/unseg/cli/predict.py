"""`unseg predict`: placeholder registered until the command is implemented."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `predict` command to the parser."""
    p = sub.add_parser("predict", help="(not implemented yet)")
    p.set_defaults(func=lambda args: (_ for _ in ()).throw(NotImplementedError("predict")))
