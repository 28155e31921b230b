"""The pydensecrf2 reference the CRF tests compare against: skip marker when it is absent."""

from __future__ import annotations

import importlib.util

import pytest

needs_reference = pytest.mark.skipif(
    importlib.util.find_spec("pydensecrf") is None,
    reason="pydensecrf2 (the reference) is not installed: it is a dev extra",
)
