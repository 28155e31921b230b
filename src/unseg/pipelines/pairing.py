"""Matching prediction files to ground truth by stem, from a plain folder or a dataset root.

Ground truth may be a plain folder or a dataset root in its official layout
(``unseg.data.layouts``: the layout's ground-truth folder, suffix and split file; Potsdam-3's
``gt/*.mat``, read by :func:`unseg.data.image.load_label`). A plain folder's ``.mat`` files are
not ground truth.
Predictions are listed recursively, so the mirrored sub-folders that ``segment``/``predict``
write for nested inputs (e.g. Cityscapes' city folders) pair by stem; an unseg output folder
(with its ``unseg-manifest.json``) stands for its ``masks`` folder. A plain ground-truth folder is
listed recursively too, and when its stems repeat across sub-folders
(``cats/001.png``, ``dogs/001.png``) both sides pair by path relative to their folder, without
suffix (``cats/001``): the sub-folders ``segment`` mirrors.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from unseg.data.datasets import read_split
from unseg.data.image import list_images
from unseg.data.layouts import DatasetLayout, Task, find_layout
from unseg.errors import ManyFilesError, UnsegError, a_or_an
from unseg.layout import MANIFEST_FILE, MASKS_DIR

logger = logging.getLogger(__name__)


@dataclass
class Pairing:
    """Ground-truth files matched to prediction files by key: the stem, or the path relative
    to the folder without suffix (``cats/001``) when the ground truth's stems repeat."""

    gt: dict[str, Path]
    pred: dict[str, Path]
    layout: DatasetLayout | None
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)


def _stem(path: Path, suffix: str) -> str:
    """File stem, with a layout's multi-part suffix (``_gtFine_labelIds.png``) removed."""
    name = path.name
    if suffix and name.endswith(suffix):
        return name[: -len(suffix)]
    return path.stem


def _by_stem(paths: Iterable[Path], suffixes: tuple[str, ...], what: str,
             root: Path | None = None) -> dict[str, Path]:
    """``paths`` by stem (with ``root``: by path relative to it, without suffix,
    ``cats/001``); a key found twice is an error naming every file that has it."""
    out: dict[str, Path] = {}
    dupes: list[Path] = []
    for p in paths:
        stem = next((_stem(p, s) for s in suffixes if s and p.name.endswith(s)), p.stem)
        if root is not None:
            stem = (p.parent.relative_to(root) / stem).as_posix()
        if stem in out:
            if out[stem] not in dupes:
                dupes.append(out[stem])
            dupes.append(p)
        else:
            out[stem] = p
    if dupes:
        raise ManyFilesError(f"several {what} files share a stem", dupes)
    return out


# each task's kind of dataset, its ground truth, and the command that scores it
_TASK_GT = {
    "semantic": ("semantic segmentation", "class label PNGs", "unseg evaluate semantic"),
    "saliency": ("saliency", "foreground masks", "unseg evaluate saliency"),
    "boxes": ("object detection", "XML boxes", "unseg evaluate corloc"),
}


def _refuse_other_task(gt: Path, task: Task) -> None:
    """Raise :class:`UnsegError` when ``gt`` is a dataset root of another task than ``task``
    (say ECSSD, saliency masks, given to semantic scoring): its ground truth is not ``task``'s."""
    other = find_layout(gt)
    if other is None or other.task == task:
        return
    kind, holds, command = _TASK_GT[other.task]
    raise UnsegError(f"{gt}: {other.name} is {a_or_an(kind)} dataset ({holds}): it has no "
                     f"{_TASK_GT[task][1]} to score against; use `{command}`")


def _plain_gt(gt: Path, files: list[Path]) -> dict[str, Path]:
    """A plain folder's ground-truth ``files``, sub-folders included (as the predictions are
    listed: images at the top beside category folders are all scored; the sub-folders' were
    ignored when the top held any), by stem, or by relative path when stems repeat across
    its sub-folders."""
    try:
        return _by_stem(files, (), "ground-truth")
    except ManyFilesError:
        if all(p.parent == gt for p in files):
            raise
    logger.info("%s: ground-truth stems repeat across its sub-folders: pairing by path "
                "relative to the folder", gt)
    return _by_stem(files, (), "ground-truth", root=gt)


def _xml_files(gt: Path) -> list[Path]:
    """The ``.xml`` annotations under ``gt``, sub-folders included, hidden ones skipped."""
    if not gt.is_dir():
        raise UnsegError(f"{gt}: no such folder")
    files = sorted(p for p in gt.rglob("*.xml") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(gt).parts))
    if not files:
        raise UnsegError(f"{gt}: no .xml annotations found")
    return files


def gt_files(gt: Path, task: Task) -> tuple[dict[str, Path], DatasetLayout | None]:
    """Ground-truth files by key (see :class:`Pairing`), from a dataset root in its layout or
    a plain folder."""
    layout = find_layout(gt, task)
    if layout is None:
        _refuse_other_task(gt, task)
        files = _xml_files(gt) if task == "boxes" else list_images(gt)
        return _plain_gt(gt, files), None
    root = layout.gt_path
    if not root.is_dir():
        raise UnsegError(f"{gt}: recognised as {layout.name} but {root} is missing")
    pattern = f"*/*{layout.gt_suffix}" if layout.recursive else f"*{layout.gt_suffix}"
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    found = _by_stem(files, (layout.gt_suffix,), "ground-truth")
    split = layout.split_path
    if split is not None and split.is_file():
        stems = read_split(split)
        absent = [s for s in stems if s not in found]
        if absent:
            raise ManyFilesError(f"{split}: listed images without ground truth in {root}", absent)
        found = {s: found[s] for s in stems}
    if not found:
        raise UnsegError(f"{gt}: no ground-truth files found in {root}")
    logger.info("%s: %s layout, %d ground-truth files", gt, layout.name, len(found))
    return found, layout


def prediction_folder(pred: Path) -> Path:
    """``pred``, or ``pred/masks`` when ``pred`` is an unseg output folder (it holds
    ``unseg-manifest.json`` and a ``masks`` folder): its overlays are not predictions."""
    masks = pred / MASKS_DIR
    if (pred / MANIFEST_FILE).is_file() and masks.is_dir():
        logger.info("%s is an unseg output folder: scoring %s", pred, masks)
        return masks
    return pred


def _deeper_hint(gt_map: dict[str, Path], pred_map: dict[str, Path], pred: Path) -> str:
    """When path-keyed ground truth finds its keys one folder down in the predictions
    (``masks/cats/001`` of a copied output folder, ``images/cats/001`` of a run on the
    dataset's parent folder): the ``--pred`` to give."""
    prefixes: Counter[str] = Counter()
    for key in pred_map:
        if key in gt_map:
            continue
        parts = key.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[i:]) in gt_map:
                prefixes["/".join(parts[:i])] += 1
                break
    if not prefixes:
        return ""
    # an output folder's masks, not its overlays, where both are there
    prefix, n = ((MASKS_DIR, prefixes[MASKS_DIR]) if MASKS_DIR in prefixes
                 else prefixes.most_common(1)[0])
    return (f"; {n} prediction(s) under {pred / prefix} are laid out as the ground truth: "
            f"pass --pred {pred / prefix}")


def _flat_hint(gt_map: dict[str, Path], pred_map: dict[str, Path]) -> str:
    """Why path-keyed ground truth finds no flat prediction: its names repeat, so a prediction
    must sit in the sub-folder of its image (``cats/001.png``); "" when some already do."""
    if any("/" in key for key in pred_map):
        return ""
    seen: dict[str, str] = {}
    for key in gt_map:
        name = key.rsplit("/", 1)[-1]
        if name in seen:
            return (f"; the ground truth's names repeat across its sub-folders ({seen[name]}, "
                    f"{key}), so each prediction must sit in the same sub-folder under --pred "
                    f"as its ground truth ({key}.png), as `unseg segment`/`predict` write them "
                    "for images laid out as the ground truth is")
        seen[name] = key
    return ""


def pair_files(
    pred: str | Path, gt: str | Path, task: Task, allow_missing: bool = False
) -> Pairing:
    """Match prediction files (under ``pred``, recursively, as
    :func:`unseg.data.image.list_images` lists them) to ground truth by stem.

    Raises :class:`UnsegError` listing missing and extra predictions unless ``allow_missing``.
    """
    gt_map, layout = gt_files(Path(gt), task)
    pred = Path(pred)
    if pred.is_file():
        raise UnsegError(f"{pred} is a file: --pred takes a folder of predictions (one mask "
                         "per ground-truth file, named by its stem), or an unseg output folder")
    if not pred.is_dir():
        raise UnsegError(f"{pred}: no such folder of predictions")
    pred = prediction_folder(pred)
    try:
        files = list_images(pred)
    except UnsegError:  # an empty folder: every ground-truth file is reported missing below
        files = []
    suffixes = (layout.image_suffix,) if layout is not None else ()
    nested = any("/" in key for key in gt_map)  # ground truth keyed by relative path
    try:
        pred_map = _by_stem(files, suffixes, "prediction", root=pred if nested else None)
    except ManyFilesError as exc:
        if (pred / MASKS_DIR).is_dir():
            hint = f"to score only the masks, pass --pred {pred / MASKS_DIR}"
            raise UnsegError(f"{exc} ({hint})") from None
        raise
    missing = [s for s in gt_map if s not in pred_map]
    extra = sorted(s for s in pred_map if s not in gt_map)
    if (missing or extra) and not allow_missing:
        parts = []
        if missing:
            gts = [gt_map[s] for s in missing]
            parts.append(str(ManyFilesError(f"no prediction in {pred} for", gts)))
        if extra:
            parts.append(str(ManyFilesError("predictions without ground truth", [
                pred_map[s] for s in extra])))
        hint = (_deeper_hint(gt_map, pred_map, pred) or _flat_hint(gt_map, pred_map)
                if nested and missing else "")
        raise UnsegError("; ".join(parts) + hint + " (use --allow-missing to score anyway)")
    if missing:
        logger.warning("%d ground-truth file(s) have no prediction", len(missing))
    if extra:
        logger.warning("%d prediction(s) have no ground truth and are ignored", len(extra))
    return Pairing(gt_map, {s: pred_map[s] for s in gt_map if s in pred_map}, layout,
                   missing, extra)
