"""The estimator contract every method follows (scikit-learn's habit, on tensors).

- ``__init__(config=None, device=None)`` only stores its arguments; ``config`` is a frozen
  dataclass whose defaults are the paper's values.
- ``fit(inputs: FitInputs) -> self``: everything a method may need of the training images comes
  in one :class:`FitInputs`; a method reads the fields it needs and raises ``UnsegError`` naming
  a missing one. Training losses per step or epoch go to ``history_``.
- ``state_dict() -> dict[str, Tensor]`` and ``from_state(config, state, device=None)``: the
  fitted state, saved as safetensors next to the config, reloads to an estimator that predicts
  identically (:class:`FromState` gives ``from_state`` to an estimator that reads the state in
  its ``load_state``).
- Semantic estimators (:class:`SemanticEstimator`) also give ``logits(features, factor)`` and
  ``predict(features, size, factor)`` for one image's features.

Estimators run on ``device`` (``None``: the CPU) and move what they are given there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from unseg.errors import UnsegError


@dataclass
class FitInputs:
    """What a method may be fitted on; one entry per training image, in the same order.

    - ``features``: dense features ``[C, h, w]`` (float), always given;
    - ``images``: the uint8 RGB image ``[3, H, W]`` the features were computed on;
    - ``proposals``: mask-proposal ids ``[H', W']`` (int64, 255 = none), e.g. PriMaPs;
    - ``student_features``: features ``[C, h, w]`` of a photometrically augmented view;
    - ``masks``: saliency mask proposals ``[H, W]`` (bool, or float in ``[0, 1]``) at the image's
      size, e.g. from :mod:`unseg.proposals.saliency_masks` (MaskContrast).
    """

    features: Sequence[torch.Tensor]
    images: Sequence[torch.Tensor] | None = None
    proposals: Sequence[torch.Tensor] | None = None
    student_features: Sequence[torch.Tensor] | None = None
    masks: Sequence[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.features)


def stack_crops(inputs: FitInputs, who: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``inputs``' features and images stacked: ``[N, C, h, w]``, ``[N, 3, H, W]`` and the
    stride ``H / h`` (a whole number), for the saliency heads; ``who`` names the method in the
    errors."""
    if inputs.images is None:
        raise UnsegError(f"the {who} needs FitInputs.images (the training crops)")
    if not len(inputs) or len(inputs.images) != len(inputs):
        raise UnsegError(
            f"{len(inputs)} feature maps but {len(inputs.images)} images (one per image)"
        )
    try:
        features = torch.stack(list(inputs.features))
        images = torch.stack(list(inputs.images))
    except RuntimeError as exc:
        raise UnsegError(f"training crops must share one size ({exc})") from None
    if features.ndim != 4 or images.ndim != 4 or images.shape[1] != 3:
        raise UnsegError(
            f"need features [C, h, w] and images [3, H, W]; got {tuple(features.shape[1:])} "
            f"and {tuple(images.shape[1:])}"
        )
    stride = images.shape[-1] // features.shape[-1]
    if stride < 1 or images.shape[-2] != stride * features.shape[-2]:
        raise UnsegError(
            f"images {tuple(images.shape[-2:])} are not a whole multiple of the feature grid "
            f"{tuple(features.shape[-2:])}"
        )
    return features, images, stride


@runtime_checkable
class Estimator(Protocol):
    """What every registered method implements."""

    config: Any
    history_: list[float]

    def fit(self, inputs: FitInputs) -> Estimator:
        """Fit on ``inputs``; returns ``self``."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted state (CPU tensors)."""
        ...

    @classmethod
    def from_state(
        cls, config: Any, state: dict[str, torch.Tensor], device: str | torch.device | None = None
    ) -> Estimator:
        """A fitted estimator rebuilt from :meth:`state_dict`'s output."""
        ...


@runtime_checkable
class SemanticEstimator(Estimator, Protocol):
    """A method that gives K class scores per pixel."""

    def logits(self, features: torch.Tensor, factor: int = 1) -> torch.Tensor:
        """Class scores ``[K, h·factor, w·factor]`` for one image's ``features [C, h, w]``."""
        ...

    def predict(
        self, features: torch.Tensor, size: tuple[int, int], factor: int = 1
    ) -> torch.Tensor:
        """Class ids ``[H, W]`` (int64): :meth:`logits` upsampled bilinearly to ``size``."""
        ...


E = TypeVar("E", bound="FromState")


class FromState:
    """The contract's ``from_state`` for an estimator made as ``cls(config, device)``: the new
    estimator reads the fitted state in its :meth:`load_state`."""

    @classmethod
    def from_state(
        cls: type[E],
        config: Any,
        state: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
    ) -> E:
        """A fitted estimator rebuilt from :meth:`state_dict`'s output."""
        estimator = cls(config, device)  # type: ignore[call-arg]
        estimator.load_state(state)
        return estimator

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take the fitted state from ``state`` (``state_dict``'s output; left unchanged), a
        clear error when it is incomplete or does not fit the config (each estimator's own)."""
        raise NotImplementedError


def require_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`UnsegError` naming the first floating tensor of ``state`` that holds NaN or
    infinite values (a damaged or hand-edited weights file), for ``from_state``."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UnsegError(f"{what} state: tensor '{key}' holds NaN or infinite values")


def feature_mean(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean feature ``[C]`` over every position of every ``features[i] [C, h, w]`` (float64
    accumulation, returned as float32)."""
    return _moments(features, with_std=False)[0]


def feature_moments(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std ``[C]`` (float32) over every position of every ``features[i]
    [C, h, w]`` (a sequence or an ``[N, C, h, w]`` tensor; float64 sums, one image at a
    time); std floored at 1e-6."""
    mean, std = _moments(features, with_std=True)
    assert std is not None
    return mean, std


def _moments(
    features: Sequence[torch.Tensor], with_std: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not len(features):
        raise UnsegError("no feature maps to average")
    total: torch.Tensor | int = 0
    squares: torch.Tensor | int = 0
    count = 0
    for f in features:
        x = f.double()
        total = total + x.sum(dim=(1, 2))
        if with_std:
            squares = squares + (x * x).sum(dim=(1, 2))
        count += x.shape[1] * x.shape[2]
    mean = total / count
    assert isinstance(mean, torch.Tensor)
    if not with_std:
        return mean.float(), None
    var = (squares / count - mean * mean).clamp_min(0.0)
    return mean.float(), var.sqrt().clamp_min(1e-6).float()
