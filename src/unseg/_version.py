"""The package version (its own module, so that any layer may read it)."""

__version__ = "0.2.0"
