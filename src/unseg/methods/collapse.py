"""Detecting a saliency head whose training failed: diverged, or collapsed to a trivial map.

A head trained without labels can end in a state its loss does not reveal. At the end of ``fit``
the estimator runs :class:`CollapseCheck` over its training images and keeps the resulting
:class:`CollapseReport` as ``collapse_``; the fit pipeline reports it (warning and run record)
instead of saving the head as if it were fine. The commands that write saliency masks run the same
check over the images they predicted (at least :data:`MIN_PREDICTED` of them) and warn when it
fails: a head can pass on its training images and still collapse on other images. Verdicts:

- ``"diverged"``: a non-finite training loss or prediction, or a loss that exploded: its last
  value above ``explode`` (10) times its smallest finite value and above 1e-3 in absolute terms;
- ``"all-foreground"`` / ``"all-background"``: the foreground share (pixels with ``p > 0.5``)
  is above ``1 − share`` (98 %) / below ``share`` (2 %) for at least ``fraction`` (95 %) of
  the images;
- ``"mostly-foreground"``: over all images, more than ``max_mean_foreground`` (90 %) of the
  pixels are foreground: no image's map need be all-foreground, but the head calls nearly
  everything the object (measured: a FOUND-style head on Lite0 features that labelled 98 % of
  ECSSD's pixels foreground, 85 % of its images entirely, passed the per-image rules; the
  datasets' salient objects cover about a quarter of the image on average);
- ``"oversized"``: over all images, more than ``max_typical_foreground`` (60 %) of the pixels
  are foreground: the head calls most of each image the object, which a cut that fell on the
  wrong side or between two background regions does (measured: a SEMPART-style head on Lite0
  features whose ECSSD masks were 74 % foreground scored IoU 22.7, against 41.0 and 29.8 for two
  other seeds; ECSSD's objects cover 29 % of the pixels on average, docs/results-boosting.md).
  It is checked after the collapse verdicts and only *flags* a head (a warning; ``failed`` stays
  False): a FOUND-style head trained on VOC2007, whose objects are often large, called more than
  60 % of its training images foreground yet scored the session's best ECSSD IoU (50.6), and a
  folder of close-ups can trip it too;
  A caller that asks for large masks on purpose (MaskContrast's mask source) runs the head
  inside :func:`oversized_expected`, which turns this flag into an INFO line with its reason;
- ``"constant"``: the spatial standard deviation of ``p`` is below ``min_std`` (1e-3) for at
  least ``fraction`` of the images (a map that ignores the image, whatever its level);
- ``"ok"`` otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from unseg.errors import UnsegError

MIN_PREDICTED = 5  # fewer predicted images say too little about a method to warn on

_OVERSIZED_REASON: ContextVar[str | None] = ContextVar("unseg_oversized_reason", default=None)


@contextmanager
def oversized_expected(reason: str) -> Iterator[None]:
    """Within it, an ``"oversized"`` verdict is expected for ``reason`` (a caller that asks for
    large masks on purpose): :meth:`CollapseReport.log` gives the reason instead of the advice
    to change seed or method, at INFO instead of WARNING. The other verdicts still warn."""
    token = _OVERSIZED_REASON.set(reason)
    try:
        yield
    finally:
        _OVERSIZED_REASON.reset(token)


@dataclass(frozen=True)
class CollapseConfig:
    """Thresholds of the verdicts (see the module docstring)."""

    share: float = 0.02
    fraction: float = 0.95
    min_std: float = 1e-3
    explode: float = 10.0
    max_mean_foreground: float = 0.9
    max_typical_foreground: float = 0.6


@dataclass(frozen=True)
class CollapseReport:
    """The verdict and the numbers behind it (shares and fractions in ``[0, 1]``)."""

    verdict: str
    n_images: int
    mean_foreground: float
    frac_all_foreground: float
    frac_all_background: float
    frac_constant: float
    nonfinite: bool
    final_loss: float | None
    min_loss: float | None

    @property
    def failed(self) -> bool:
        """True for a collapse or divergence: any verdict but ``"ok"`` and ``"oversized"``."""
        return self.verdict not in ("ok", "oversized")

    @property
    def flagged(self) -> bool:
        """True for any verdict but ``"ok"`` (worth a warning, ``"oversized"`` included)."""
        return self.verdict != "ok"

    def message(self, of: Literal["training", "prediction"] = "training") -> str:
        """One line for a user: what failed and the evidence; ``of``: whether the maps are the
        head's on its training images or a command's on the images it predicted."""
        evidence = (
            f"{self.frac_all_foreground:.0%} all-foreground, {self.frac_all_background:.0%} "
            f"all-background, {self.frac_constant:.0%} constant maps; mean foreground share "
            f"{self.mean_foreground:.1%}"
        )
        if self.verdict == "oversized":
            which = "training" if of == "training" else "predicted"
            reason = _OVERSIZED_REASON.get()
            advice = (
                f"expected here: {reason}" if reason else
                "the cut likely fell on the wrong side or between two background regions: use "
                "another seed or method, unless these images are close-ups"
            )
            return (
                f"the masks look oversized: over {self.n_images} {which} images they call "
                f"{self.mean_foreground:.0%} of the pixels foreground (objects typically cover a "
                f"quarter to a half); {advice}"
            )
        if of == "prediction":
            if not self.failed:
                return f"the masks look sound ({self.n_images} images, {evidence})"
            return (
                f"the masks look degenerate ({self.verdict}): over {self.n_images} predicted "
                f"images, {evidence}; the method does not fit these images (a head trained on "
                "other images may not transfer)"
            )
        if not self.failed:
            return (
                f"head training looks sound ({self.n_images} images, mean foreground share "
                f"{self.mean_foreground:.1%})"
            )
        return (
            f"head training failed ({self.verdict}): over {self.n_images} training images, "
            f"{evidence}; loss final {self.final_loss} / min {self.min_loss}"
        )

    def log(self, logger: logging.Logger,
            of: Literal["training", "prediction"] = "training") -> None:
        """Log :meth:`message` to ``logger`` when the report is flagged: a warning, or INFO for
        an ``"oversized"`` verdict inside :func:`oversized_expected`."""
        if not self.flagged:
            return
        expected = self.verdict == "oversized" and _OVERSIZED_REASON.get() is not None
        logger.log(logging.INFO if expected else logging.WARNING, "%s", self.message(of))

    def as_dict(self) -> dict[str, object]:
        """JSON-able fields, with ``failed``."""
        return {**asdict(self), "failed": self.failed, "flagged": self.flagged}


class CollapseCheck:
    """Accumulates per-image statistics of predicted maps, then gives a :class:`CollapseReport`.

    Call :meth:`update` with each batch of probabilities ``[B, 1, H, W]`` (or ``[B, H, W]``), then
    :meth:`report` with the training losses.
    """

    def __init__(self, config: CollapseConfig | None = None) -> None:
        self.config = config or CollapseConfig()
        self._share: list[torch.Tensor] = []
        self._std: list[torch.Tensor] = []
        self._nonfinite = False

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        """Add the foreground maps ``probs`` ``[B, 1, H, W]`` or ``[B, H, W]`` in ``[0, 1]``."""
        if probs.ndim == 4 and probs.shape[1] == 1:
            probs = probs[:, 0]
        if probs.ndim != 3:
            raise UnsegError(f"expected maps [B, 1, H, W] or [B, H, W], got {tuple(probs.shape)}")
        flat = probs.detach().float().flatten(1).cpu()
        finite = torch.isfinite(flat).all(dim=1)
        self._nonfinite |= not bool(finite.all())
        self._share.append((flat > 0.5).float().mean(dim=1))
        self._std.append(torch.nan_to_num(flat, nan=0.0).std(dim=1, unbiased=False))

    def report(self, history: Sequence[float] = ()) -> CollapseReport:
        """The verdict over every map added so far, given the training ``history`` (losses)."""
        c = self.config
        if not self._share:
            raise UnsegError("no predicted maps to check (call update first)")
        share, std = torch.cat(self._share), torch.cat(self._std)
        losses = [float(v) for v in history]
        finite = [v for v in losses if math.isfinite(v)]
        loss_bad = len(finite) != len(losses)
        final = losses[-1] if losses else None
        low = min(finite) if finite else None
        exploded = (
            final is not None and low is not None and math.isfinite(final)
            and final > c.explode * max(low, 0.0) and final > 1e-3
        )
        frac_fg = float((share > 1.0 - c.share).double().mean())
        frac_bg = float((share < c.share).double().mean())
        frac_const = float((std < c.min_std).double().mean())
        if loss_bad or self._nonfinite or exploded:
            verdict = "diverged"
        elif frac_const >= c.fraction:
            verdict = "constant"
        elif frac_fg >= c.fraction:
            verdict = "all-foreground"
        elif frac_bg >= c.fraction:
            verdict = "all-background"
        elif float(share.mean()) > c.max_mean_foreground:
            verdict = "mostly-foreground"
        elif float(share.mean()) > c.max_typical_foreground:
            verdict = "oversized"
        else:
            verdict = "ok"
        return CollapseReport(
            verdict=verdict,
            n_images=int(share.numel()),
            mean_foreground=float(share.mean()),
            frac_all_foreground=frac_fg,
            frac_all_background=frac_bg,
            frac_constant=frac_const,
            nonfinite=self._nonfinite or loss_bad,
            final_loss=final,
            min_loss=low,
        )


@torch.no_grad()
def check_head(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    images: torch.Tensor,
    batch_size: int,
    history: Sequence[float] = (),
) -> CollapseReport:
    """The :class:`CollapseReport` of a saliency head's ``predict(features, images)`` maps
    ``[B, 1, H, W]`` over ``features`` ``[N, C, h, w]`` and ``images`` ``[N, 3, H, W]``, taken
    ``batch_size`` images at a time, with its training ``history``."""
    check = CollapseCheck()
    for i in range(0, features.shape[0], batch_size):
        check.update(predict(features[i : i + batch_size], images[i : i + batch_size]))
    return check.report(history)
