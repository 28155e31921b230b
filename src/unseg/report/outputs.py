"""What a run or output folder holds: its masks, overlays, boxes, run record and source images.

Layouts read (as the commands write them):

- ``segment`` / ``discover``: ``OUT/masks/**.png``, ``OUT/overlays/**.jpg`` (segment),
  ``OUT/boxes.json`` (discover), ``OUT/run/config.json`` (fitted model, when there is one);
- ``predict``: PNGs directly in ``OUT`` (with ``boxes.json`` for saliency runs);
- ``fit``: a bare run folder (``config.json`` + ``weights.safetensors``), reported without masks.

A run folder given as ``OUT/run`` stands for ``OUT``. The kind of masks is the run's method's
output kind in the registry (a saliency method writes 8-bit probabilities, the others label
PNGs); without a run it is read off the
files: ``boxes.json`` or a greyscale PNG means saliency, a palette PNG semantic labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from unseg.data.datasets import image_files
from unseg.data.image import IMAGE_EXTENSIONS
from unseg.data.layouts import resolve_image_dir
from unseg.data.mat import MAT_SUFFIX
from unseg.errors import InputFileError, UnsegError
from unseg.layout import BOXES_FILE, CONFIG_FILE, MASKS_DIR, OVERLAYS_DIR, RUN_DIR, WEIGHTS_FILE
from unseg.outdir import recorded_failures, recorded_setting, recorded_timings
from unseg.registry import get_method
from unseg.utils.io import read_json_object

Kind = Literal["semantic", "saliency"]
SKIPPED_DIRS = (RUN_DIR, OVERLAYS_DIR)


@dataclass
class RunOutputs:
    """The pieces of one run's output folder (absent pieces are ``None`` / empty)."""

    output_dir: Path
    kind: Kind
    masks_dir: Path | None = None
    masks: list[Path] = field(default_factory=list)
    overlays_dir: Path | None = None
    boxes_file: Path | None = None
    run_dir: Path | None = None
    config: dict[str, Any] | None = None
    images_root: Path | None = None
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, problem), capped
    failed_count: int = 0  # all the inputs the command that wrote the folder could not use
    timings: dict[str, Any] = field(default_factory=dict)  # that command's stage seconds

    def mask_key(self, mask: Path) -> str:
        """The mask's path relative to the masks folder, without suffix (``sub/name``)."""
        if self.masks_dir is None:
            raise ValueError(f"{self.output_dir}: no masks folder")
        return mask.relative_to(self.masks_dir).with_suffix("").as_posix()


def _is_run(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def _read_config(run_dir: Path) -> dict[str, Any]:
    return read_json_object(run_dir / CONFIG_FILE, "cannot read the run's configuration",
                            "not a run configuration (expected a JSON object)")


def _list_masks(masks_dir: Path, nested_outputs: bool) -> list[Path]:
    masks = []
    for p in sorted(masks_dir.rglob("*.png")):
        parts = p.relative_to(masks_dir).parts
        if any(part.startswith(".") for part in parts):
            continue
        if nested_outputs and len(parts) > 1 and parts[0] in SKIPPED_DIRS:
            continue
        if p.is_file():
            masks.append(p)
    return masks


def _kind_from_files(masks: list[Path], boxes: Path | None) -> Kind:
    if boxes is not None or not masks:
        return "saliency" if boxes is not None else "semantic"
    try:
        with Image.open(masks[0]) as img:
            mode = img.mode
    except OSError as exc:
        raise InputFileError(masks[0], f"unreadable mask ({exc})") from None
    return "semantic" if mode == "P" else "saliency"


def _kind_of_method(method: str, masks: list[Path], boxes: Path | None) -> Kind:
    """The kind of masks the registered ``method`` writes: 8-bit probabilities for saliency
    methods, class ids for the others (MaskContrast's clusters included); read off the files
    when no run names a method this unseg knows."""
    try:
        output = get_method(method).output if method else None
    except UnsegError:
        output = None
    if output is None:
        return _kind_from_files(masks, boxes)
    return "saliency" if output == "saliency" else "semantic"


def _images_from_record(output_dir: Path, config: dict[str, Any] | None) -> Path | None:
    """The images the masks were made from, as recorded: the ``images`` the command that wrote
    ``output_dir`` read (its manifest), else the run's ``config.json``; None when neither
    records a folder that still exists."""
    for value in (recorded_setting(output_dir, "images"),
                  None if config is None else config.get("images")):
        if isinstance(value, str) and Path(value).exists():
            return resolve_image_dir(value)
    return None


def _locate(path: Path) -> tuple[Path, Path | None]:
    """The output folder and run folder that ``path`` stands for (a run inside its output
    folder stands for that folder)."""
    if _is_run(path):
        return (path.parent if (path.parent / MASKS_DIR).is_dir() else path), path
    if _is_run(path / RUN_DIR):
        return path, path / RUN_DIR
    return path, None


def find_outputs(
    path: str | Path, images: str | Path | None = None, run: str | Path | None = None
) -> RunOutputs:
    """Read the folder ``path`` (a run or a command's output folder) as :class:`RunOutputs`.

    ``images`` is the folder of original images; default: the ``images`` the folder's manifest
    records (the command that wrote it), else the run's ``config.json``, when one that exists
    is recorded. ``run``: the run folder that
    made the masks when it is not inside ``path`` (``unseg predict RUN IMAGES --out PATH``).
    Raises :class:`UnsegError` for a folder that holds neither masks nor a run.
    """
    path = Path(path)
    if not path.is_dir():
        what = "a file, not a folder" if path.exists() else "no such folder"
        raise UnsegError(f"{path}: {what} (expected a run or an output folder)")
    if run is not None and not _is_run(Path(run)):
        raise UnsegError(f"{run}: not an unseg run folder (expected {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE})")
    output_dir, run_dir = _locate(path)
    if run is not None:
        run_dir = Path(run)
    masks_dir: Path | None = output_dir / MASKS_DIR
    masks = _list_masks(masks_dir, False) if masks_dir.is_dir() else []
    if not masks and output_dir != run_dir:
        masks_dir = output_dir
        masks = _list_masks(output_dir, True)
    if not masks:
        masks_dir = None
    if not masks and run_dir is None:
        raise UnsegError(
            f"{path}: neither masks (masks/*.png or *.png) nor a run (config.json and "
            f"{WEIGHTS_FILE}) found; give the folder a command wrote"
        )
    config = None if run_dir is None else _read_config(run_dir)
    boxes = output_dir / BOXES_FILE
    boxes_file = boxes if boxes.is_file() else None
    method = "" if config is None else str(config.get("method", ""))
    kind = _kind_of_method(method, masks, boxes_file)
    overlays = output_dir / OVERLAYS_DIR
    if images is not None:
        if not Path(images).exists():
            raise UnsegError(f"{images}: no such image folder")
        images_root: Path | None = resolve_image_dir(images)
    else:
        images_root = _images_from_record(output_dir, config)
    failed, failed_count = recorded_failures(output_dir)
    return RunOutputs(
        output_dir=output_dir,
        kind=kind,
        masks_dir=masks_dir,
        masks=masks,
        overlays_dir=overlays if overlays.is_dir() else None,
        boxes_file=boxes_file,
        run_dir=run_dir,
        config=config,
        images_root=images_root,
        failed=failed,
        failed_count=failed_count,
        timings=recorded_timings(output_dir),
    )


def match_images(outputs: RunOutputs) -> dict[str, Path]:
    """Original image of each mask, by mask key (:meth:`RunOutputs.mask_key`); masks whose
    image is not found are left out. Matched by relative path first, then by the one image
    whose path ends with the key (``--images`` a folder above the run's: ``images/cats/001``
    for ``cats/001``), then by the one image with the key's file stem. A name that several
    images share is no match (``cats/001`` and ``dogs/001`` under a folder the masks do not
    mirror): the card of ``dogs/001`` showed the first ``001``, a cat."""
    if outputs.images_root is None or outputs.masks_dir is None:
        return {}
    root = outputs.images_root
    # a Potsdam root's images folder lists its .mat tiles
    files = image_files(root) if root.is_dir() else [root]
    by_tail: dict[str, list[Path]] = {}  # every path ending: cats/001 and 001 of cats/001.jpg
    for f in files:
        if f.suffix.lower() not in (*IMAGE_EXTENSIONS, MAT_SUFFIX):
            continue
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        parts = str(Path(rel).with_suffix("")).split("/")
        for i in range(len(parts)):
            by_tail.setdefault("/".join(parts[i:]), []).append(f)
    found: dict[str, Path] = {}
    for mask in outputs.masks:
        key = outputs.mask_key(mask)
        exact = [f for f in by_tail.get(key, []) if f.with_suffix("") == root / key]
        hits = exact[:1] or by_tail.get(key) or by_tail.get(Path(key).name, [])
        if len(hits) == 1:
            found[key] = hits[0]
    return found
