"""`unseg fit`: placeholder registered until the command is implemented."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `fit` command to the parser."""
    p = sub.add_parser("fit", help="(not implemented yet)")
    p.set_defaults(func=lambda args: (_ for _ in ()).throw(NotImplementedError("fit")))
