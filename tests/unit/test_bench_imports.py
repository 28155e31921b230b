"""Every benchmark script under ``bench/`` imports against the current library.

The scripts run by hand, so nothing else notices when a refactor removes a name they import;
each is loaded as a module here (its ``main`` guarded by ``__name__ == "__main__"``, so nothing
runs).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def test_the_bench_folder_is_found() -> None:
    assert len(SCRIPTS) > 1, f"no bench scripts under {BENCH}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_imports(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``script`` loads (``bench/`` first on ``sys.path``, as when it runs) and has a ``main``;
    what it does to ``sys.path`` is undone after."""
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])  # as `python bench/x.py` runs
    name = f"_bench_{script.stem}"
    spec = importlib.util.spec_from_file_location(name, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up here
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"


def test_the_machine_block_states_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench/_machine.py``'s block has the fields the results pages quote, with this machine's
    CPU count and torch."""
    import os

    import torch

    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])
    monkeypatch.delitem(sys.modules, "_machine", raising=False)
    from _machine import machine

    block = machine()
    assert block["cpu_count"] == os.cpu_count()
    assert block["torch"] == torch.__version__
    assert block["device"] == "cpu"
    assert len(block["load_average"]) == 3
