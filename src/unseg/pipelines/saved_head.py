"""A saliency head already trained into a run folder, found again instead of retrained.

A command resumed after a kill (``unseg discover --resume``, or ``unseg segment --method
maskcontrast --resume``, whose chain discovers its masks first) used to train its head again
although the first attempt had saved it. :func:`saved_head` loads that head when the run records
the same method, configuration, backbone, tap, weights and training images (by name and size,
:func:`inputs_key`); anything else, or a run from before the key was recorded, returns None and
the head is trained as before.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from unseg.backbones import backbone_weights_sha256
from unseg.backbones.base import Backbone
from unseg.errors import UnsegError
from unseg.layout import CONFIG_FILE
from unseg.registry import MethodSpec, config_to_dict
from unseg.runs import load_run
from unseg.utils.hashing import settings_key

logger = logging.getLogger(__name__)

INPUTS_KEY = "inputs_key"  # the training facts' entry holding inputs_key()


def inputs_key(paths: list[Path]) -> str:
    """A key of the training images: their resolved paths and byte sizes, in order."""
    return settings_key([[str(p.resolve()), p.stat().st_size] for p in paths], length=32)


def saved_head(
    run_dir: Path, spec: MethodSpec, config: Any, model: Backbone, key: str,
    device: torch.device,
) -> tuple[Any, dict[str, Any]] | None:
    """``(head, training facts)`` of the run in ``run_dir`` when ``spec`` with ``config`` was
    trained there on ``model`` (same backbone, tap and weights) from the images whose
    :func:`inputs_key` is ``key``; else None."""
    if not (run_dir / CONFIG_FILE).is_file():
        return None
    try:
        meta, tensors = load_run(run_dir, spec.name)
        training = meta.get("training") or {}
        same = (
            meta.get("config") == json.loads(json.dumps(config_to_dict(config)))
            and meta.get("backbone") == model.spec.name
            and meta.get("tap") == getattr(model, "tap", None)
            and meta.get("weights_sha256") == backbone_weights_sha256(model)
            and isinstance(training, dict)
            and training.get(INPUTS_KEY) == key
        )
        if not same:
            return None
        head = spec.estimator.from_state(config, tensors, device)
    except (UnsegError, OSError, KeyError, RuntimeError, ValueError) as exc:
        logger.info("%s: not reused (%s); training again", run_dir, exc)
        return None
    logger.info("%s: the head this command trained before is reused (same configuration and "
                "images; --overwrite trains it again)", run_dir)
    return head, training
