"""unseg.utils.allocator: freed blocks stay in the heap, and the user's choice is respected."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from unseg.cli import main as cli_main
from unseg.errors import UnsegError
from unseg.utils import allocator

# Page faults of 40 rounds of allocating, filling and freeing a 64 MiB tensor, in a fresh
# process. glibc's default maps and unmaps each one (16384 pages of 4 KiB every round); with the
# setting the freed block is reused once the heap has settled (measured: within 2-9 rounds, as
# its aligned blocks coalesce).
_REFILL = """
import json, resource, sys
import torch
from unseg.utils.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    t = torch.empty(16 * 2**20).fill_(1.0)
    del t
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _refill(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in (*allocator._USER_SETTINGS, allocator.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", _REFILL, mode], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator.glibc() is None, reason="the C library is not glibc")
def test_a_freed_large_tensor_is_reused_without_new_page_faults() -> None:
    default = _refill("default")
    if default["faults"] < 40 * 1000:
        pytest.skip(f"40 rounds of 64 MiB took only {default['faults']} page faults here "
                    "(huge pages?): nothing for the setting to save")
    kept = _refill("keep")
    assert kept["applied"] is True
    assert kept["faults"] < default["faults"] / 3, (kept, default)


class _FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: int, value: object) -> int:
        self.calls.append((param, value.value))  # type: ignore[attr-defined]
        return self.answer


def test_sets_both_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in allocator._USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    libc = _FakeLibc()
    monkeypatch.setattr(allocator, "glibc", lambda: libc)
    assert allocator.keep_freed_memory(1 << 28) is True
    assert libc.calls == [(allocator.M_MMAP_THRESHOLD, 1 << 28),
                          (allocator.M_TRIM_THRESHOLD, 1 << 28)]


@pytest.mark.parametrize("name", allocator._USER_SETTINGS)
def test_the_users_own_allocator_settings_are_left_alone(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    for other in allocator._USER_SETTINGS:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, "libjemalloc.so" if name == "LD_PRELOAD" else "65536")
    libc = _FakeLibc()
    monkeypatch.setattr(allocator, "glibc", lambda: libc)
    assert allocator.keep_freed_memory() is False
    assert libc.calls == []


def test_the_opt_out_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in allocator._USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    libc = _FakeLibc()
    monkeypatch.setattr(allocator, "glibc", lambda: libc)
    monkeypatch.setenv(allocator.OPT_OUT, "0")
    assert allocator.keep_freed_memory() is False
    assert libc.calls == []
    monkeypatch.setenv(allocator.OPT_OUT, "1")
    assert allocator.keep_freed_memory() is True


def test_no_glibc_or_a_refused_value_reports_false(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in allocator._USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator, "glibc", lambda: None)
    assert allocator.keep_freed_memory() is False
    monkeypatch.setattr(allocator, "glibc", lambda: _FakeLibc(answer=0))
    assert allocator.keep_freed_memory() is False


@pytest.mark.parametrize("threshold", [0, -1, 2**31])
def test_a_threshold_out_of_range_is_a_clear_error(threshold: int) -> None:
    with pytest.raises(UnsegError, match="allocator threshold"):
        allocator.keep_freed_memory(threshold)


def test_the_command_applies_it(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    called: list[bool] = []
    monkeypatch.setattr(cli_main, "keep_freed_memory", lambda: called.append(True) or True)
    assert cli_main.main(["backbones"]) == 0
    assert called == [True]
