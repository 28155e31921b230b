"""What the two saliency heads' estimators share (FOUND-style and SEMPART-style): their state
before a fit, the crop source of multi-scale consistency, the collapse check after a fit, the
guard and weights of a fitted network, and its reload from them. Each head adds its network,
losses and training loop.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from unseg.errors import UnsegError
from unseg.methods.base import FromState, require_finite
from unseg.methods.collapse import CollapseReport, check_head
from unseg.methods.crop_cache import CropSource, FeatureFn
from unseg.methods.head_config import HeadTrainingConfig
from unseg.utils.device import resolve_device

logger = logging.getLogger(__name__)


class HeadEstimator(FromState):
    """Base of a saliency head's estimator (contract of :mod:`unseg.methods.base`).

    ``feature_fn`` (images ``[B, 3, H, W]`` in ``[0, 1]`` → features ``[B, C, h, w]``, the frozen
    backbone) is needed for multi-scale consistency with the ``"cache"`` or ``"backbone"`` crop
    modes; the pipeline sets it before ``fit``. After ``fit``, ``collapse_`` holds the
    :class:`~unseg.methods.collapse.CollapseReport` of the training images.
    """

    config_class: ClassVar[type[HeadTrainingConfig]] = HeadTrainingConfig
    title: ClassVar[str] = "the head"  # in errors: "the FOUND head is not fitted"
    state_name: ClassVar[str] = "head"  # in errors: "FOUND-head state: tensor ..."
    misfit: ClassVar[str] = "saved head weights do not fit"  # the error when they do not load

    def __init__(self, config: Any = None, device: str | torch.device | None = None) -> None:
        self.config = config or self.config_class()
        self.device = resolve_device(device or "cpu")
        self.feature_fn: FeatureFn | None = None
        self.net: Any = None
        self.history_: list[float] = []
        self.collapse_: CollapseReport | None = None

    def fitted_net(self) -> nn.Module:
        """The trained network (an error when :meth:`fit` has not run)."""
        if self.net is None:
            raise UnsegError(f"{self.title} is not fitted")
        return self.net

    @property
    def in_dim(self) -> int:
        """Channels of the features the fitted network takes (each head's own)."""
        raise NotImplementedError

    def crop_source(
        self, images: torch.Tensor, generator: torch.Generator, **kwargs: Any
    ) -> CropSource | None:
        """The crops of multi-scale consistency over the training ``images`` ``[N, 3, H, W]``
        (None when the config has it off); ``kwargs``: the source's batch size."""
        c = self.config
        if not c.multiscale:
            return None
        return CropSource(c.crop_mode, images, self.feature_fn, c.crop_pool,
                          tuple(c.crop_scale), c.fixed_crop, generator, device=self.device,
                          **kwargs)

    @torch.no_grad()
    def check_collapse(self, features: torch.Tensor, images: torch.Tensor) -> CollapseReport:
        """:class:`CollapseReport` of the head's maps on ``features`` ``[N, C, h, w]`` and
        ``images`` ``[N, 3, H, W]`` (with ``history_``)."""
        return check_head(
            self.predict_proba, features, images, self.config.batch_size, self.history_
        )

    def predict_proba(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Foreground probabilities ``[B, 1, H, W]`` (each head's own)."""
        raise NotImplementedError

    def after_fit(self, features: torch.Tensor, images: torch.Tensor) -> None:
        """The collapse check of the trained head on its training set, warned about when
        flagged."""
        self.collapse_ = self.check_collapse(features, images)
        self.collapse_.log(logger)

    def net_state(self) -> dict[str, torch.Tensor]:
        """The fitted network's weights, detached on the CPU."""
        return {k: v.detach().cpu() for k, v in self.fitted_net().state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """For :meth:`from_state`: the weights of :meth:`state_dict`'s output (all finite)
        loaded into the network :meth:`empty_net` builds for them, in eval mode."""
        state = dict(state)
        require_finite(state, self.state_name)
        net = self.empty_net(state)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise UnsegError(f"{self.misfit}: {exc}") from None
        self.net = net.to(self.device).eval()

    def empty_net(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """For :meth:`load_state`: the untrained network (on the CPU) that ``state``'s weights
        go into, after reading and popping from ``state`` its entries that are not weights
        (each head's own)."""
        raise NotImplementedError
