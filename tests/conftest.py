"""Shared test fixtures: paths to the real data beside the repo, seeded RNGs, the stand-in
backbone (an instance, or registered for the commands), the planted images and a smooth
random photo written to a file, and the image listing's reads counted.

Test modules take these as fixtures; none imports this file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import unseg.backbones.base as backbone_registry
from unseg.backbones import Backbone, BackboneSpec, build_backbone

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
STAND_IN = "stand_in16"  # the registered stand-in's name (stride 16)
# the modules whose ``create_backbone`` the commands call (imported by the fixture that patches
# them, so that only the tests using it depend on the folder pipeline's layout)
CREATE_BACKBONE_IN = ("unseg.pipelines.backbone", "unseg.backbones.create", "unseg.features")


def _shared_data(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it lives beside the repo)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Callable[[str], Path]:
    """``shared_data(sub)``: the path of ``../shared/data/<sub>``; skips the calling test with a
    clear message if absent."""
    return _shared_data


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded NumPy generator."""
    return np.random.default_rng(0)


class StandInBackbone(Backbone):
    """The stand-in backbone: each patch's mean (normalised) colour and its negation, 6 channels
    at the spec's stride, through a 1x1 conv: the identity pair ``[I; -I]`` (patches of
    different colours point different ways) or, with ``seed``, seeded random weights (another
    model). Its ``"keys"`` are the tokens, or with ``negate_keys`` the negated tokens (to tell
    the two kinds apart). It counts its calls and images, and raises ``KeyboardInterrupt`` once
    ``fail_after`` calls are done (an interrupted run)."""

    def __init__(
        self,
        spec: BackboneSpec,
        seed: int | None = None,
        fail_after: int | None = None,
        negate_keys: bool = False,
    ) -> None:
        super().__init__(spec)
        self.proj = torch.nn.Conv2d(3, 6, 1, bias=False)
        with torch.no_grad():
            if seed is None:
                weight = torch.cat([torch.eye(3), -torch.eye(3)])
            else:
                weight = torch.randn(6, 3, generator=torch.Generator().manual_seed(seed))
            self.proj.weight.copy_(weight.view(6, 3, 1, 1))
        self.calls = 0
        self.images = 0
        self.fail_after = fail_after
        self.negate_keys = negate_keys

    def _features(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.images += x.shape[0]
        out = self.proj(F.avg_pool2d(x, self.stride))
        return -out if kind == "keys" and self.negate_keys else out


def stand_in_spec(
    name: str = STAND_IN, stride: int = 16, mean: float = 0.5, std: float = 0.5
) -> BackboneSpec:
    """The spec of a stand-in: 6 channels at ``stride``, input normalised by ``mean``/``std``."""
    return BackboneSpec(name, "test", stride, 6, (mean,) * 3, (std,) * 3)


@pytest.fixture
def stand_in() -> Callable[..., StandInBackbone]:
    """``stand_in(stride=16, seed=None, fail_after=None, negate_keys=False, name=None,
    mean=0.5, std=0.5)``: a frozen :class:`StandInBackbone` named ``stand_in<stride>``
    (``std=1``: each patch's mean colour minus 0.5, and its negation)."""

    def make(
        stride: int = 16,
        seed: int | None = None,
        fail_after: int | None = None,
        negate_keys: bool = False,
        name: str | None = None,
        mean: float = 0.5,
        std: float = 0.5,
    ) -> StandInBackbone:
        spec = stand_in_spec(name or f"stand_in{stride}", stride, mean, std)
        model = StandInBackbone(spec, seed, fail_after, negate_keys)
        return model.requires_grad_(False).eval()

    return make


def _create(name: str, weights=None, device=None, **kwargs) -> Backbone:
    return build_backbone(name).requires_grad_(False).eval()


@pytest.fixture(scope="module")
def registered_stand_in() -> Iterator[str]:
    """The stand-in registered as ``stand_in16`` (stride 16), and every ``create_backbone`` of
    the commands building it (no weight files involved), for the module; yields the name."""
    with pytest.MonkeyPatch.context() as mp:
        # registered for the module only: the tests after it see the package's backbones
        mp.setitem(backbone_registry._REGISTRY, STAND_IN, (stand_in_spec(), StandInBackbone))
        for module in CREATE_BACKBONE_IN:
            mp.setattr(importlib.import_module(module), "create_backbone", _create)
        yield STAND_IN


@pytest.fixture
def planted_squares() -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """``planted_squares(n, generator)``: ``n`` dark noisy 64x64 backgrounds with one bright
    24-pixel square each (random place): images ``[n, 3, 64, 64]`` in ``[0, 1]`` and the truth
    ``[n, 1, 64, 64]`` (0/1)."""

    def make(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images = 0.2 + 0.05 * torch.rand(n, 3, 64, 64, generator=gen)
        truth = torch.zeros(n, 1, 64, 64)
        for i in range(n):
            top, left = torch.randint(8, 32, (2,), generator=gen).tolist()
            images[i, :, top : top + 24, left : left + 24] += 0.6
            truth[i, :, top : top + 24, left : left + 24] = 1.0
        return images.clamp(0, 1), truth

    return make


@pytest.fixture
def smooth_photo() -> Callable[..., Path]:
    """``smooth_photo(path, h, w, seed=0, quality=90)``: a smooth random ``h x w`` picture
    (bilinear noise) saved at ``path`` as JPEG or PNG by its suffix; returns ``path``."""

    def make(path: Path, h: int, w: int, seed: int = 0, quality: int = 90) -> Path:
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(1, 3, h // 50 + 2, w // 50 + 2, generator=g) * 255
        img = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        arr = img.round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(path, quality=quality)
        return path

    return make


@pytest.fixture
def listing_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Path]]:
    """The image listing's reads (:mod:`unseg.data.datasets`), counted: ``"walks"`` (folders
    listed, the commands' check that a folder has images included), ``"opened"`` (files
    checked readable) and ``"headers"`` (image headers read)."""
    import unseg.cli.common as cli_common
    import unseg.data.datasets as datasets

    reads: dict[str, list[Path]] = {"walks": [], "opened": [], "headers": []}

    def counted(key: str, real: Callable[..., object]) -> Callable[..., object]:
        def call(path: Path, *args: object) -> object:
            reads[key].append(Path(path))
            return real(path, *args)
        return call

    for key, name in (("walks", "dataset_images"), ("opened", "unreadable"),
                      ("headers", "image_size")):
        wrapped = counted(key, getattr(datasets, name))
        for module in (datasets, cli_common):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, wrapped)
    return reads
