"""PASCAL VOC annotation XML: image size and every object's box (difficult/truncated included).

Boxes are converted from VOC's 1-based inclusive pixel indices to 0-based pixel-edge
coordinates ``[x0, y0, x1, y1]`` (``x0 = xmin - 1``, ``x1 = xmax``), as in the LOST/TokenCut
CorLoc code: a box covering the whole image is ``[0, 0, W, H]``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from unseg.errors import InputFileError


@dataclass(frozen=True)
class VocObject:
    """One annotated object."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool
    truncated: bool


@dataclass(frozen=True)
class VocAnnotation:
    """One image's annotation: ``size`` is ``(height, width)``."""

    filename: str
    size: tuple[int, int]
    objects: tuple[VocObject, ...]


def _text(node: ET.Element, tag: str, path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise InputFileError(path, f"VOC annotation lacks <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path) -> float:
    value = _text(node, tag, path)
    try:
        return float(value)
    except ValueError:
        raise InputFileError(path, f"<{tag}> is not a number: {value!r}") from None


def read_voc_annotation(path: str | Path) -> VocAnnotation:
    """Parse a VOC XML file; a malformed file raises :class:`InputFileError` naming it."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise InputFileError(path, "no such file") from None
    except ET.ParseError as exc:
        raise InputFileError(path, f"malformed XML ({exc})") from None
    size_node = root.find("size")
    if size_node is None:
        raise InputFileError(path, "VOC annotation lacks <size>")
    width = int(_number(size_node, "width", path))
    height = int(_number(size_node, "height", path))
    objects = []
    for obj in root.findall("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise InputFileError(path, "an <object> lacks <bndbox>")
        box = (
            _number(bb, "xmin", path) - 1,
            _number(bb, "ymin", path) - 1,
            _number(bb, "xmax", path),
            _number(bb, "ymax", path),
        )
        flags = {t: (obj.findtext(t) or "0").strip() == "1" for t in ("difficult", "truncated")}
        objects.append(VocObject(_text(obj, "name", path), box, **flags))
    filename = (root.findtext("filename") or path.with_suffix(".jpg").name).strip()
    return VocAnnotation(filename, (height, width), tuple(objects))


def parse_voc_xml(
    path: str | Path,
) -> tuple[tuple[int, int], list[list[float]], list[str]]:
    """``((height, width), boxes [[x0, y0, x1, y1], …], names)`` of every object in ``path``."""
    ann = read_voc_annotation(path)
    return ann.size, [list(o.box) for o in ann.objects], [o.name for o in ann.objects]
