"""The base of the prototype estimators, k-means and PriMaPs-EM: class prototypes ``[K, C]``
over the backbone features, optionally centred by the training images' mean feature.

:class:`PrototypeEstimator` holds what the two share: the fitted ``prototypes_`` and
``mean_`` (the centring statistic, fitted with the method and kept in its state), the
centring itself, saving and loading that statistic, the reload of a fitted estimator, and the
prediction (the subclass's
:meth:`~PrototypeEstimator.logits` upsampled to the image and argmaxed, as the CLI writes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from unseg.data.resize import upsample_argmax
from unseg.errors import UnsegError
from unseg.methods.base import FromState, feature_mean, require_finite


def center_features(features: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """``features [C, h, w]`` minus ``mean [C]`` (unchanged when ``mean`` is None)."""
    if mean is None:
        return features
    return features.float() - mean.to(features.device)[:, None, None]


def state_tensor(state: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    """``state[key]`` as float32, or a clear error naming the missing or non-finite tensor."""
    if key not in state:
        raise UnsegError(f"{what} state lacks tensor '{key}'")
    require_finite({key: state[key]}, what)
    return state[key].float()


class PrototypeEstimator(FromState):
    """Shared state of the prototype estimators: ``prototypes_ [K, C]``, with ``config.center``
    the mean feature ``mean_ [C]``, and ``history_``; subclasses fit the prototypes and give
    :meth:`logits`. ``what`` names the method in error messages."""

    what = "prototype estimator"

    def __init__(self, config: Any, device: str | torch.device | None = None) -> None:
        self.config = config
        self.device = torch.device(device or "cpu")
        self.prototypes_: torch.Tensor | None = None
        self.mean_: torch.Tensor | None = None
        self.history_: list[float] = []

    def fit_center(self, features: Sequence[torch.Tensor]) -> None:
        """Set ``mean_`` to the mean of ``features[i] [C, h, w]`` when ``config.center``, else
        to None."""
        self.mean_ = feature_mean(features).to(self.device) if self.config.center else None

    def centered(self, features: torch.Tensor) -> torch.Tensor:
        """``features [C, h, w]`` minus ``mean_`` (unchanged without centring)."""
        return center_features(features, self.mean_)

    def prediction_input(self, features: torch.Tensor) -> torch.Tensor:
        """``features [C, h, w]`` on the device, float32 and :meth:`centered`, for the fitted
        prototypes ``[K, C]``: a clear error when ``C`` is not their width."""
        if self.prototypes_ is not None and features.shape[0] != self.prototypes_.shape[1]:
            raise UnsegError(
                f"{self.what}: {features.shape[0]}-channel features, but the prototypes are "
                f"{self.prototypes_.shape[1]}-channel: features of another backbone or tap"
            )
        return self.centered(features.to(self.device).float())

    def center_state(self) -> dict[str, torch.Tensor]:
        """``{"mean": mean_}`` (CPU) when centring, else empty: for :meth:`state_dict`."""
        return {} if self.mean_ is None else {"mean": self.mean_.cpu()}

    def load_center(self, state: dict[str, torch.Tensor]) -> None:
        """Read ``mean_`` back from ``state`` when ``config.center`` (for ``from_state``)."""
        if self.config.center:
            self.mean_ = state_tensor(state, "mean", self.what).to(self.device)
            width = None if self.prototypes_ is None else self.prototypes_.shape[1]
            if self.mean_.shape != (width,):
                raise UnsegError(f"{self.what} state: mean {tuple(self.mean_.shape)} does not fit "
                                 f"the {width}-channel prototypes")

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """For :meth:`from_state`: the subclass's tensors (:meth:`load_fitted`), then the
        centring statistic (:meth:`load_center`)."""
        self.load_fitted(state)
        self.load_center(state)

    def load_fitted(self, state: dict[str, torch.Tensor]) -> None:
        """Read the subclass's fitted tensors (``prototypes_`` and its own) back from ``state``
        (for :meth:`from_state`), a clear error when they are missing or do not fit."""
        raise NotImplementedError

    def logits(self, features: torch.Tensor, factor: int = 1) -> torch.Tensor:
        """Class logits ``[K, h·factor, w·factor]`` of ``features [C, h, w]``."""
        raise NotImplementedError

    def predict(
        self, features: torch.Tensor, size: tuple[int, int], factor: int = 1
    ) -> torch.Tensor:
        """Class ids ``[H, W]`` (int64): :meth:`logits` upsampled bilinearly to ``size``, argmax
        (:func:`~unseg.data.resize.upsample_argmax`, as the CLI writes its label maps)."""
        logits = self.logits(features, factor)
        return torch.from_numpy(upsample_argmax(logits, size)).to(logits.device, torch.int64)
