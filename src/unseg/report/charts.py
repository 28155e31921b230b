"""The report's charts as PNG bytes, drawn with matplotlib's Agg canvas (no pyplot, no display).

matplotlib is imported when the first chart is drawn, not with this module: it costs most of a
second, and every command imports the report code whether or not it writes a report.

Cluster colours are the PNG palette's (:func:`unseg.utils.palette.label_colors`), so a class's
bar and heat-map column have the colour of its matched cluster in the masks and overlays.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from unseg.report.thumbs import UNMATCHED_COLOR
from unseg.utils.palette import label_colors

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
MAX_ANNOTATED = 30
TEXT = "#1f2937"


def _figure(**kwargs: Any) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _rgb(color: Sequence[int]) -> tuple[float, float, float]:
    return (color[0] / 255.0, color[1] / 255.0, color[2] / 255.0)


def matched_cluster(assignment: Sequence[int], num_classes: int) -> list[int]:
    """Per class, the cluster matched to it (``assignment[cluster] = class``), -1 if none."""
    out = [-1] * num_classes
    for cluster, cls in enumerate(assignment):
        if 0 <= cls < num_classes:
            out[cls] = cluster
    return out


def iou_bar_chart(
    per_class_iou: Sequence[float | None],
    class_names: Sequence[str],
    assignment: Sequence[int],
    miou: float,
) -> bytes:
    """Horizontal bars of per-class IoU (fractions; ``None`` = class absent), each in the colour
    of its matched cluster, with the mIoU as a dashed line. Returns PNG bytes."""
    n = len(per_class_iou)
    palette = label_colors(256)
    clusters = matched_cluster(assignment, n)
    values = [0.0 if v is None else float(v) for v in per_class_iou]
    colors = [_rgb(palette[c]) if 0 <= c < 256 else _rgb(UNMATCHED_COLOR) for c in clusters]
    fig = _figure(figsize=(6.4, max(2.4, 0.6 + 0.28 * n)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(n)
    ax.barh(y, values, color=colors, edgecolor="#374151", linewidth=0.4)
    for i, (v, raw, c) in enumerate(zip(values, per_class_iou, clusters, strict=True)):
        label = "absent" if raw is None else f"{100 * v:.1f}"
        label += "" if c < 0 else f"  (cluster {c})"
        ax.text(min(v, 1.0) + 0.01, i, label, va="center", fontsize=8, color=TEXT)
    if not np.isnan(miou):
        ax.axvline(miou, color="#111827", linestyle="--", linewidth=1)
        ax.text(miou, 1.0, f"mIoU {100 * miou:.1f}", ha="center", va="bottom", fontsize=8,
                color=TEXT, transform=ax.get_xaxis_transform())
    ax.set_yticks(y, labels=list(class_names), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.25)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0], labels=["0", "25", "50", "75", "100"])
    ax.set_xlabel("IoU (%) of the class with its Hungarian-matched cluster")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _column_order(confusion: np.ndarray, assignment: Sequence[int], num_classes: int) -> list[int]:
    clusters = matched_cluster(assignment, num_classes)
    order = [c for c in clusters if c >= 0]
    occupied = np.flatnonzero(confusion.sum(axis=1) > 0)
    return order + [int(c) for c in occupied if int(c) not in order]


def confusion_heatmap(
    confusion: np.ndarray,
    unassigned: np.ndarray,
    assignment: Sequence[int],
    class_names: Sequence[str],
) -> bytes:
    """Heat map of the share of each class's pixels ``[C]`` (rows) given to each cluster
    (columns: matched clusters in class order, then unmatched ones, then "none" for pixels
    without a prediction). ``confusion [P, C]``, ``unassigned [C]``. Returns PNG bytes."""
    num_classes = confusion.shape[1]
    cols = _column_order(confusion, assignment, num_classes)
    table = confusion[cols].T.astype(np.float64)
    labels = [str(c) for c in cols]
    if unassigned.sum() > 0:
        table = np.concatenate([table, unassigned[:, None].astype(np.float64)], axis=1)
        labels.append("none")
    totals = table.sum(axis=1, keepdims=True)
    share = np.divide(table, totals, out=np.zeros_like(table), where=totals > 0)
    n_rows, n_cols = share.shape
    fig = _figure(
        figsize=(max(4.0, 1.8 + 0.36 * n_cols), max(3.0, 1.4 + 0.3 * n_rows)), layout="constrained"
    )
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    if n_rows <= MAX_ANNOTATED and n_cols <= MAX_ANNOTATED:
        for (r, c), v in np.ndenumerate(share):
            if v >= 0.005:
                ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 else TEXT)
    ax.set_yticks(np.arange(n_rows), labels=list(class_names), fontsize=8)
    ax.set_xticks(np.arange(n_cols), labels=labels, fontsize=8)
    palette = label_colors(256)
    for tick, col in zip(ax.get_xticklabels(), cols, strict=False):
        tick.set_bbox({"facecolor": _rgb(palette[col]), "edgecolor": "none", "pad": 1.5})
        tick.set_color("white" if palette[col].astype(int).sum() < 300 else "black")
    ax.set_xlabel("predicted cluster (in its mask colour)")
    ax.set_ylabel("ground-truth class")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the class's pixels")
    return _png(fig)


def pixel_confusion_heatmap(confusion: np.ndarray) -> bytes:
    """Heat map of the saliency pixel confusion ``[2, 2]`` (rows: ground truth background,
    foreground; columns: predicted background, foreground), as shares of each row."""
    table = confusion.astype(np.float64)
    totals = table.sum(axis=1, keepdims=True)
    share = np.divide(table, totals, out=np.zeros_like(table), where=totals > 0)
    fig = _figure(figsize=(4.2, 3.2), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for (r, c), v in np.ndenumerate(share):
        ax.text(c, r, f"{100 * v:.1f}%\n{int(confusion[r, c]):,} px", ha="center", va="center",
                fontsize=8, color="white" if v > 0.6 else TEXT)
    ax.set_xticks([0, 1], labels=["background", "foreground"])
    ax.set_yticks([0, 1], labels=["background", "foreground"])
    ax.set_xlabel("prediction (p > 0.5)")
    ax.set_ylabel("ground truth")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _png(fig)


def iou_histogram(values: Sequence[float]) -> bytes:
    """Histogram of per-image IoU values (fractions) in 20 bins, with their mean marked."""
    fig = _figure(figsize=(5.6, 3.0), layout="constrained")
    ax = fig.add_subplot()
    data = np.asarray(values, dtype=np.float64)
    ax.hist(data, bins=20, range=(0.0, 1.0), color=_rgb(label_colors(1)[0]), edgecolor="white")
    if data.size:
        mean = float(data.mean())
        ax.axvline(mean, color="#111827", linestyle="--", linewidth=1)
        ax.text(mean, 1.0, f"mean {100 * mean:.1f}", ha="center", va="bottom", fontsize=8,
                color=TEXT, transform=ax.get_xaxis_transform())
    ax.set_xlabel("IoU of the image's mask (p > 0.5) with its ground truth")
    ax.set_ylabel("images")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)
