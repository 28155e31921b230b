"""Placeholder until the method's fit command is implemented."""

from __future__ import annotations

import argparse


def register(methods: argparse._SubParsersAction) -> None:
    """Add this family's `unseg fit` subcommands."""
