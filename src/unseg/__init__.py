"""unseg: unsupervised image segmentation on frozen self-supervised backbones.

The library's front door is :class:`unseg.Segmenter` (images in, masks out, for every method);
:func:`unseg.list_methods` and :func:`unseg.list_backbones` say what exists;
:func:`unseg.list_images` gives a folder's files in the order of its masks;
:func:`unseg.score_semantic`, :func:`unseg.score_saliency` and :func:`unseg.score_corloc` score
masks in memory with ``unseg evaluate``'s protocols; :func:`unseg.set_progress` shows the
commands' progress bars in a program or notebook (off by default: a library stays silent).
They are imported on first use, so ``import unseg`` stays light (no torch until a segmenter is
made).
"""

import logging
from typing import Any

from unseg._version import __version__

__all__ = ["Segmenter", "__version__", "keep_freed_memory", "list_backbones", "list_images",
           "list_methods", "score_corloc", "score_saliency", "score_semantic", "set_progress"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    if name in ("Segmenter", "list_methods", "list_backbones", "list_images"):
        from unseg import segmenter

        return getattr(segmenter, name)
    if name in ("score_semantic", "score_saliency", "score_corloc"):
        from unseg.metrics import in_memory

        return getattr(in_memory, name)
    if name == "set_progress":
        from unseg.utils.progress import set_progress

        return set_progress
    if name == "keep_freed_memory":
        from unseg.utils.allocator import keep_freed_memory

        return keep_freed_memory
    raise AttributeError(f"module 'unseg' has no attribute {name!r}")
