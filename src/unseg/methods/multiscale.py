"""Multi-scale consistency (the Boosting paper's second trick): crops, crop-resize, the loss.

A square crop of side ``scale × side`` (scale drawn uniformly in ``scale_range``; half the side by
default) is placed uniformly at random inside the image, resized up to the input size and
predicted; that prediction, guided-filtered and detached, is the teacher. The student is the
full-image prediction cropped to the same box and resized. Loss: mean squared error.

``fixed_crop=True`` reproduces the reference code's near-fixed crop. There the offsets are built
by multiplying a Python list by an integer, which repeats the list instead of scaling the random
fractions; the offsets that come out are (almost) always zero pixels, so every crop is anchored
at the top-left corner and only its size varies. We could not run the reference code; this
switch reproduces the behaviour methods.md describes (top-left-anchored crops), for comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unseg.errors import UnsegError
from unseg.refine.guided_filter import GuidedFilterConfig, refine_masks


def sample_crops(
    batch: int,
    scale_range: tuple[float, float] = (0.5, 0.5),
    generator: torch.Generator | None = None,
    fixed_crop: bool = False,
) -> torch.Tensor:
    """Crop boxes ``[B, 3]`` = (top, left, side) as fractions of the image side, inside ``[0, 1]``.

    ``side ~ U(scale_range)``, ``top, left ~ U(0, 1 − side)`` independently (``fixed_crop``: 0).
    """
    lo, hi = scale_range
    if not 0.0 < lo <= hi <= 1.0:
        raise UnsegError(f"crop scale range must satisfy 0 < lo <= hi <= 1, got {scale_range}")
    u = torch.rand(batch, 3, generator=generator, dtype=torch.float64)
    side = lo + (hi - lo) * u[:, 2]
    top, left = u[:, 0] * (1 - side), u[:, 1] * (1 - side)
    if fixed_crop:
        top, left = torch.zeros_like(top), torch.zeros_like(left)
    return torch.stack([top, left, side], dim=1).float()


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop each ``x[b]`` (``[B, C, H, W]``) to ``boxes[b]`` and resize to ``size`` (bilinear).

    Differentiable in ``x`` (``grid_sample``); ``boxes`` as returned by :func:`sample_crops`.
    """
    b = x.shape[0]
    boxes = boxes.to(device=x.device, dtype=x.dtype)
    top, left, side = boxes[:, 0], boxes[:, 1], boxes[:, 2]
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = side
    theta[:, 0, 2] = 2 * left + side - 1
    theta[:, 1, 1] = side
    theta[:, 1, 2] = 2 * top + side - 1
    grid = F.affine_grid(theta, [b, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def consistency_loss(
    student_full: torch.Tensor,
    teacher_crop: torch.Tensor,
    crop_images: torch.Tensor,
    boxes: torch.Tensor,
    guided_filter: GuidedFilterConfig | None = GuidedFilterConfig(),  # noqa: B008 (frozen use)
) -> torch.Tensor:
    """MSE between the student's crop and the detached, guided-filtered teacher.

    ``student_full`` ``[B, 1, H, W]``: probabilities on the whole image (gradients flow);
    ``teacher_crop`` ``[B, 1, H, W]``: probabilities predicted on the resized crops, whose images
    ``crop_images`` ``[B, 3, H, W]`` guide the filter (``None``: no filtering). No gradient
    reaches ``teacher_crop``.
    """
    size = tuple(teacher_crop.shape[-2:])
    with torch.no_grad():
        teacher = teacher_crop.detach()
        if guided_filter is not None:
            teacher = refine_masks(teacher, crop_images, guided_filter)
    student = crop_resize(student_full, boxes, size)
    return F.mse_loss(student, teacher)
