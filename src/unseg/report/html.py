"""``unseg report``: one self-contained HTML page about a run (no network needed to view it).

The page holds, all inline (pictures as base64 data URIs, CSS in a ``<style>``, no scripts):
a summary; with ground truth the metrics table (semantic: pixel accuracy, mIoU and per-class IoU
after Hungarian matching; saliency: Acc, IoU, maxFβ, MAE; CorLoc of the boxes with VOC
annotations), a per-class IoU bar chart and a confusion heat map (saliency: the pixel confusion
and the per-image IoU histogram); the gallery (image | overlay | ground truth); the cluster
colours (the PNG palette's); the run's configuration and its timings (``config.json``
``"timings"``, when the run records them).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from unseg._version import __version__
from unseg.data.image import max_pixels_default
from unseg.errors import UnsegError
from unseg.layout import CONFIG_FILE, REPORT_FILE
from unseg.methods.balance import balance_message, class_counts, class_shares, read_labels
from unseg.metrics.semantic import MatchMode
from unseg.outdir import recorded_max_pixels, recorded_method, recorded_setting
from unseg.pipelines.evaluate import CorLocResult
from unseg.report.charts import (
    confusion_heatmap,
    iou_bar_chart,
    iou_histogram,
    matched_cluster,
    pixel_confusion_heatmap,
)
from unseg.report.gallery import Gallery, render_gallery
from unseg.report.outputs import RunOutputs, find_outputs
from unseg.report.scores import (
    SaliencyEvaluation,
    SemanticEvaluation,
    evaluate_boxes,
    evaluate_saliency_run,
    evaluate_semantic_run,
)
from unseg.report.thumbs import bytes_uri
from unseg.utils.io import atomic_write
from unseg.utils.palette import label_colors

DEFAULT_MAX_IMAGES = 60
SUMMARY_KEYS = (
    ("method", "method"),
    ("backbone", "backbone"),
    ("num_classes", "classes K"),
    ("feature_size", "feature size"),
    ("n_images", "images fitted"),
    ("unseg_version", "unseg version"),
)

CSS = """
:root { --ink: #1f2937; --muted: #6b7280; --line: #e5e7eb; --bg: #f8fafc; --accent: #1d4ed8; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
header.top { background: #0f172a; color: #f8fafc; padding: 18px 28px; }
header.top h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header.top p { margin: 0; color: #cbd5e1; }
main { padding: 8px 28px 40px; max-width: 1500px; }
section { margin-top: 22px; }
h2 { font-size: 17px; margin: 0 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
.note { color: var(--muted); margin: 4px 0 10px; }
table { border-collapse: collapse; background: white; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; }
th { background: #f1f5f9; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.tables { display: flex; flex-wrap: wrap; gap: 20px; align-items: flex-start; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.charts img { background: white; border: 1px solid var(--line); max-width: 100%; }
.swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px;
          vertical-align: -2px; margin-right: 6px; border: 1px solid rgba(0,0,0,.2); }
.legend { display: flex; flex-wrap: wrap; gap: 6px 14px; margin-bottom: 12px; }
.gallery { display: grid; gap: 14px; align-items: start;
           grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); }
.card { background: white; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
.card header { display: flex; justify-content: space-between; padding: 6px 10px;
               border-bottom: 1px solid var(--line); font-size: 13px; }
.card .name { font-weight: 600; word-break: break-all; }
.card .score { color: var(--accent); white-space: nowrap; margin-left: 8px; }
.row { display: grid; gap: 6px; padding: 8px; }
.row.n1 { grid-template-columns: 1fr; } .row.n2 { grid-template-columns: 1fr 1fr; }
.row.n3 { grid-template-columns: 1fr 1fr 1fr; }
figure { margin: 0; text-align: center; }
figure img { width: 100%; height: auto; display: block; border-radius: 4px; background: #eee; }
figcaption { font-size: 11px; color: var(--muted); margin-top: 2px; }
figure.absent div { padding: 30px 4px; color: var(--muted); border: 1px dashed var(--line); }
details pre { background: white; border: 1px solid var(--line); padding: 10px; overflow: auto;
              max-height: 480px; font-size: 12px; }
summary { cursor: pointer; color: var(--accent); }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}%"


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], numeric_from: int = 1) -> str:
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{cell}</td>' if i >= numeric_from else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        ) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _swatch(cluster: int) -> str:
    r, g, b = (int(v) for v in label_colors(256)[cluster])
    return f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'


def _class_names(evaluation: SemanticEvaluation) -> list[str]:
    r = evaluation.result
    return r.class_names or [f"class {c}" for c in range(r.num_classes)]


def _semantic_section(evaluation: SemanticEvaluation) -> str:
    r = evaluation.result
    names = _class_names(evaluation)
    head = _table(
        ["metric", "value"],
        [["pixel accuracy", _pct(r.acc)], ["mIoU", _pct(r.miou)], ["images", _esc(r.n_images)],
         ["missing predictions", _esc(r.n_missing)], ["matching", _esc(f"Hungarian ({r.match})")],
         ["dataset", _esc(r.dataset or "plain folder")]],
    )
    clusters = matched_cluster(r.assignment, r.num_classes)
    per_class = _table(
        ["class", "matched cluster", "IoU"],
        [[_esc(name), (_swatch(c) + _esc(c)) if c >= 0 else "none", _pct(v)]
         for name, c, v in zip(names, clusters, r.per_class_iou, strict=True)],
        numeric_from=2,
    )
    bars = bytes_uri(iou_bar_chart(r.per_class_iou, names, r.assignment, r.miou))
    heat = bytes_uri(confusion_heatmap(evaluation.confusion, evaluation.unassigned,
                                       r.assignment, names))
    return (
        '<section id="metrics"><h2>Metrics</h2>'
        '<p class="note">Clusters are matched to classes once over the whole set (Hungarian); '
        "predicted pixels without a label and missing predictions count as wrong.</p>"
        f'<div class="tables">{head}{per_class}</div></section>'
        '<section id="charts"><h2>Charts</h2><div class="charts">'
        f'<img src="{bars}" alt="per-class IoU bar chart">'
        f'<img src="{heat}" alt="confusion matrix heat map"></div></section>'
    )


def _saliency_section(evaluation: SaliencyEvaluation) -> str:
    r = evaluation.result
    table = _table(
        ["metric", "value"],
        [["maxFβ", _pct(r.max_fbeta)], [_esc("IoU (p > 0.5)"), _pct(r.iou)],
         [_esc("Acc (p > 0.5)"), _pct(r.acc)], ["MAE", f"{r.mae:.4f}"],
         ["Fβ mode / β²", _esc(f"{r.fbeta_mode} / {r.beta2}")],
         ["images", _esc(r.n_images)], ["missing predictions", _esc(r.n_missing)],
         ["dataset", _esc(r.dataset or "plain folder")]],
    )
    heat = bytes_uri(pixel_confusion_heatmap(evaluation.pixel_confusion))
    hist = bytes_uri(iou_histogram(list(evaluation.image_iou.values())))
    return (
        f'<section id="metrics"><h2>Metrics</h2><div class="tables">{table}</div></section>'
        '<section id="charts"><h2>Charts</h2><div class="charts">'
        f'<img src="{heat}" alt="pixel confusion heat map">'
        f'<img src="{hist}" alt="per-image IoU histogram"></div></section>'
    )


def _corloc_section(result: CorLocResult) -> str:
    table = _table(
        ["metric", "value"],
        [["CorLoc", _pct(result.corloc)], ["correct", _esc(result.n_correct)],
         ["images", _esc(result.n_images)], ["missing", _esc(result.n_missing)],
         ["boxes from", _esc(result.source)]],
    )
    return f'<section id="boxes"><h2>Boxes</h2>{table}</section>'


def _legend(outputs: RunOutputs, evaluation: SemanticEvaluation | None) -> str:
    if outputs.kind != "semantic":
        return ""
    k = None if outputs.config is None else outputs.config.get("num_classes")
    if not isinstance(k, int) and evaluation is not None:
        k = len(evaluation.confusion)
    if not isinstance(k, int) or not 0 < k <= 256:
        return ""
    names: dict[int, str] = {}
    if evaluation is not None:
        class_names = _class_names(evaluation)
        for cluster, cls in enumerate(evaluation.result.assignment):
            if 0 <= cls < len(class_names):
                names[cluster] = class_names[cls]
    items = "".join(
        f"<span>{_swatch(c)}cluster {c}{_esc(' → ' + names[c]) if c in names else ''}</span>"
        for c in range(k)
    )
    return f'<div class="legend">{items}</div>'


def _balance_section(outputs: RunOutputs) -> str:
    """Share of the predicted pixels per cluster, with a warning when some are nearly empty."""
    k = None if outputs.config is None else outputs.config.get("num_classes")
    if outputs.kind != "semantic" or not isinstance(k, int) or not outputs.masks:
        return ""
    shares = class_shares(class_counts(read_labels(outputs.masks), k))
    message = balance_message(shares)
    note = f'<p class="note"><strong>{_esc(message)}</strong></p>' if message else ""
    rows = [[_swatch(c) + f"cluster {c}", _pct(float(s))] for c, s in enumerate(shares)]
    return (f'<section id="balance"><h2>Class balance</h2>{note}'
            f'{_table(["cluster", "share of pixels"], rows)}</section>')


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        rows: list[tuple[str, Any]] = []
        for key, value in obj.items():
            rows += _flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
        return rows
    return [(prefix, obj)]


def _seconds(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.1f} s" if value < 600 else f"{value / 60:.1f} min"
    return _esc(value)


def _timings_section(timings: Any, source: str) -> str:
    """The stage timings table (nested stages flattened), or nothing without timings."""
    if not isinstance(timings, dict) or not timings:
        return ""
    rows = [[_esc(k), _seconds(v)] for k, v in _flatten(timings)]
    return (f'<section id="timings"><h2>Timings</h2><p class="note">{_esc(source)}</p>'
            f'{_table(["stage", "time"], rows)}</section>')


def _config_section(outputs: RunOutputs) -> str:
    if outputs.config is None:
        return ('<section id="config"><h2>Configuration</h2><p class="note">No run record in '
                f"{_esc(outputs.output_dir)} (only commands that fit a model write one).</p>"
                "</section>" + _timings_section(outputs.timings, "Of the command that wrote "
                                                "this folder (its manifest)."))
    cfg = outputs.config
    rows = [[_esc(label), _esc(cfg[key])] for key, label in SUMMARY_KEYS if key in cfg]
    full = {k: v for k, v in cfg.items() if k != "timings"}
    parts = [
        '<section id="config"><h2>Configuration</h2>',
        f'<p class="note">From {_esc(outputs.run_dir / CONFIG_FILE)}.</p>' if outputs.run_dir
        else "",
        _table(["setting", "value"], rows, numeric_from=2) if rows else "",
        "<details><summary>Full configuration</summary>"
        f"<pre>{_esc(json.dumps(full, indent=2))}</pre></details></section>",
    ]
    parts.append(_timings_section(cfg.get("timings"), "Of the run's fit (its configuration)."))
    return "".join(parts)


def _evaluate(
    outputs: RunOutputs, gt: str | Path | None, num_classes: int | None, match: MatchMode
) -> SemanticEvaluation | SaliencyEvaluation | None:
    if gt is None or outputs.masks_dir is None:
        return None
    if outputs.kind == "semantic":
        return evaluate_semantic_run(outputs.masks_dir, gt, num_classes, match=match)
    return evaluate_saliency_run(outputs.masks_dir, gt)


def _gallery_section(outputs: RunOutputs, gallery: Gallery, legend: str) -> str:
    notes = []
    if gallery.total > gallery.shown:
        notes.append(f"Showing {gallery.shown} of {gallery.total} images, evenly spread "
                     "(--max-images to change).")
    if outputs.images_root is None and gallery.total:
        notes.append("Original images not found (the run does not record them): give "
                     "--images DIR to show them beside the masks.")
    elif gallery.total and gallery.with_images < gallery.total:
        notes.append(f"{gallery.total - gallery.with_images} mask(s) have no image in "
                     f"{_esc(outputs.images_root)}.")
    note = "".join(f'<p class="note">{n}</p>' for n in notes)
    if not gallery.total:
        note = '<p class="note">This folder holds no masks.</p>'
    return f'<section id="gallery"><h2>Gallery</h2>{note}{legend}{gallery.html}</section>'


SHOWN_FAILURES = 50  # inputs listed on the page; the count says how many there were


def _failures_section(outputs: RunOutputs) -> str:
    """The inputs the command that wrote the folder could not use (its manifest's record),
    with their problems; empty when none failed."""
    if not outputs.failed_count:
        return ""
    shown = outputs.failed[:SHOWN_FAILURES]
    more = outputs.failed_count - len(shown)
    note = (f"{outputs.failed_count} input(s) could not be used; they have no mask"
            + (f" (the first {len(shown)} are listed)" if more > 0 else "") + ".")
    rows = [(_esc(path), _esc(problem)) for path, problem in shown]
    return (f'<section id="failed"><h2>Inputs that failed</h2><p class="note">{note}</p>'
            f"{_table(('input', 'problem'), rows, numeric_from=2)}</section>")


def _method(outputs: RunOutputs) -> str:
    """The method that made the masks: the run's, else the one the command that wrote the
    folder chose or was given (a spectral ``discover`` has no run: the page said "discover",
    then "auto" for the default)."""
    method = ((outputs.config or {}).get("method") or recorded_method(outputs.output_dir)
              or recorded_setting(outputs.output_dir, "--method"))
    return str(method) if method else "unknown"


def render_report(
    outputs: RunOutputs,
    gt: str | Path | None = None,
    annotations: str | Path | None = None,
    num_classes: int | None = None,
    match: MatchMode = "pixels",
    max_images: int = DEFAULT_MAX_IMAGES,
) -> str:
    """The report page of ``outputs`` as an HTML string (see the module docstring)."""
    evaluation = _evaluate(outputs, gt, num_classes, match)
    corloc = None if annotations is None else evaluate_boxes(outputs, annotations)
    gallery = render_gallery(outputs, evaluation, max_images)
    sections = []
    if isinstance(evaluation, SemanticEvaluation):
        sections.append(_semantic_section(evaluation))
    elif isinstance(evaluation, SaliencyEvaluation):
        sections.append(_saliency_section(evaluation))
    if corloc is not None:
        sections.append(_corloc_section(corloc))
    legend = _legend(outputs, evaluation if isinstance(evaluation, SemanticEvaluation) else None)
    sections.append(_balance_section(outputs))
    sections.append(_gallery_section(outputs, gallery, legend))
    sections.append(_failures_section(outputs))
    sections.append(_config_section(outputs))
    method = _method(outputs)
    title = f"unseg report: {outputs.output_dir.resolve().name}"
    subtitle = (f"{outputs.kind} masks · {len(outputs.masks)} image(s) · method {method}"
                f" · {outputs.output_dir}")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
        f'<header class="top"><h1>{_esc(title)}</h1><p>{_esc(subtitle)}</p></header>'
        f"<main>{''.join(sections)}"
        f'<p class="note">Written by unseg {_esc(__version__)}.</p></main></body></html>\n'
    )


def write_report(
    output_dir: str | Path,
    images: str | Path | None = None,
    gt: str | Path | None = None,
    *,
    annotations: str | Path | None = None,
    run: str | Path | None = None,
    out: str | Path | None = None,
    num_classes: int | None = None,
    match: MatchMode = "pixels",
    max_images: int = DEFAULT_MAX_IMAGES,
    max_pixels: int | None = None,
) -> Path:
    """Write the report of a run or output folder; returns the page's path.

    ``images``: the original images (default: as the run records them); ``gt``: ground truth
    (label or mask PNGs, or a dataset root) for the metrics and charts; ``annotations``: VOC XML
    for CorLoc of ``boxes.json``; ``run``: the run that made the masks when it is not in
    ``output_dir`` (``unseg predict``); ``out``: the page (default ``OUTPUT_DIR/report.html``).
    ``max_pixels``: the per-file pixel limit (default: the ``--max-pixels`` the folder's run
    was given, else Pillow's). The page is written atomically.
    """
    if max_images < 0:
        raise UnsegError(f"--max-images must be 0 (no gallery) or more, got {max_images}")
    outputs = find_outputs(output_dir, images, run)
    if max_pixels is None:
        max_pixels = recorded_max_pixels(outputs.output_dir)
    with max_pixels_default(max_pixels):
        page = render_report(outputs, gt, annotations, num_classes, match, max_images)
    target = Path(out) if out is not None else outputs.output_dir / REPORT_FILE
    atomic_write(target, lambda p: p.write_text(page, encoding="utf-8"))
    return target
