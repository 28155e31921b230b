"""Image/label transforms in torch with identical geometry for both.

Every function takes ``image`` float ``[3, H, W]`` (values in ``[0, 1]``), ``label`` ``[H, W]``
(any integer or bool dtype) or ``None``, and an optional ``torch.Generator`` for the random ones,
and returns ``(image, label)``. Images are resampled bilinearly (antialiased when shrinking),
labels with nearest neighbour (``nearest-exact``: the same pixel-centre convention as the image).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unseg.data.color import luma

Pair = tuple[torch.Tensor, torch.Tensor | None]


def _resize_pair(
    image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]
) -> Pair:
    """Resize image (bilinear, antialiased) and label (nearest) to ``size = (H, W)``."""
    if tuple(image.shape[-2:]) != tuple(size):
        image = F.interpolate(
            image[None], size=size, mode="bilinear", align_corners=False, antialias=True
        )[0]
    if label is not None and tuple(label.shape[-2:]) != tuple(size):
        dtype = label.dtype
        lab = label[None, None].to(torch.float32)
        label = F.interpolate(lab, size=size, mode="nearest-exact")[0, 0].to(dtype)
    return image, label


def _check(image: torch.Tensor, label: torch.Tensor | None) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    if label is not None and tuple(label.shape) != tuple(image.shape[1:]):
        raise ValueError(f"label {tuple(label.shape)} must match image {tuple(image.shape[1:])}")


def uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    """A float drawn uniformly from ``[low, high)`` with ``generator``."""
    return low + (high - low) * torch.rand((), generator=generator).item()


def resize_short_side(
    image: torch.Tensor,
    label: torch.Tensor | None,
    size: int,
    generator: torch.Generator | None = None,
) -> Pair:
    """Resize so the short side is ``size`` (long side proportional, rounded)."""
    _check(image, label)
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    return _resize_pair(image, label, (max(1, round(h * scale)), max(1, round(w * scale))))


def center_crop(
    image: torch.Tensor,
    label: torch.Tensor | None,
    size: int | tuple[int, int],
    generator: torch.Generator | None = None,
) -> Pair:
    """Crop the central ``size`` (``int`` or ``(H, W)``); the image must be at least that big."""
    _check(image, label)
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = image.shape[-2:]
    if th > h or tw > w:
        raise ValueError(f"crop {th}x{tw} larger than image {h}x{w}")
    top, left = (h - th) // 2, (w - tw) // 2
    return _crop(image, label, top, left, th, tw)


def _crop(
    image: torch.Tensor, label: torch.Tensor | None, top: int, left: int, h: int, w: int
) -> Pair:
    image = image[:, top : top + h, left : left + w]
    if label is not None:
        label = label[top : top + h, left : left + w]
    return image, label


def hflip(
    image: torch.Tensor,
    label: torch.Tensor | None,
    generator: torch.Generator | None = None,
    p: float = 0.5,
) -> Pair:
    """Mirror left-right with probability ``p`` (``p=1``: always)."""
    _check(image, label)
    if p < 1.0 and uniform(generator) >= p:
        return image, label
    return image.flip(-1), None if label is None else label.flip(-1)


def sample_crop_box(
    size: tuple[int, int],
    generator: torch.Generator | None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(top, left, h, w)`` in pixels of an image of ``size = (H, W)``:
    area fraction in ``scale``, aspect ``w / h`` in ``ratio`` (log-uniform).

    Sampling as torchvision's RandomResizedCrop: ten tries, then the central crop of the nearest
    allowed aspect.
    """
    h, w = size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = h * w * uniform(generator, *scale)
        aspect = math.exp(uniform(generator, *log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (), generator=generator))
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(
    image: torch.Tensor,
    label: torch.Tensor | None,
    generator: torch.Generator | None,
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Pair:
    """Crop a random area fraction ``scale`` with aspect ``ratio`` (:func:`sample_crop_box`),
    resized to ``size``."""
    _check(image, label)
    out = (size, size) if isinstance(size, int) else size
    top, left, ch, cw = sample_crop_box(
        (int(image.shape[-2]), int(image.shape[-1])), generator, scale, ratio
    )
    image, label = _crop(image, label, top, left, ch, cw)
    return _resize_pair(image, label, out)


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """RGB ``[3, H, W]`` in ``[0, 1]`` → HSV with hue in ``[0, 1)``."""
    r, g, b = image
    maxc, _ = image.max(0)
    minc, _ = image.min(0)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), 0.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack(
        [
            torch.stack([v, q, p, p, t, v]),
            torch.stack([t, v, v, q, p, p]),
            torch.stack([p, p, t, v, v, q]),
        ]
    )  # [3 channels, 6 sectors, H, W]
    return table.gather(1, i[None, None].expand(3, 1, *i.shape))[:, 0]


def color_jitter(
    image: torch.Tensor,
    label: torch.Tensor | None,
    generator: torch.Generator | None,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
) -> Pair:
    """Random brightness, contrast, saturation (factors in ``[1-x, 1+x]``) and hue shift
    (in ``[-hue, hue]`` turns), applied in that order; the label is returned unchanged."""
    _check(image, label)
    if brightness > 0:
        image = (image * uniform(generator, 1 - brightness, 1 + brightness)).clamp(0, 1)
    if contrast > 0:
        mean = luma(image).mean()
        factor = uniform(generator, 1 - contrast, 1 + contrast)
        image = (mean + factor * (image - mean)).clamp(0, 1)
    if saturation > 0:
        grey = luma(image)
        factor = uniform(generator, 1 - saturation, 1 + saturation)
        image = (grey + factor * (image - grey)).clamp(0, 1)
    if hue > 0:
        hsv = rgb_to_hsv(image)
        hsv = torch.stack([(hsv[0] + uniform(generator, -hue, hue)) % 1.0, hsv[1], hsv[2]])
        image = hsv_to_rgb(hsv).clamp(0, 1)
    return image, label


def _mirror_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices ``[n + 2·radius]`` of positions ``-radius … n-1+radius`` mirrored into ``[0, n)``
    without repeating the edge (``d c b | a b c d | c b a``), as often as needed."""
    i = torch.arange(-radius, n + radius, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.abs() % period
    return torch.where(i >= n, period - i, i)


def gaussian_blur(image: torch.Tensor, sigma: float, kernel_size: int = 21) -> torch.Tensor:
    """Gaussian blur of ``image [C, H, W]`` (float) → ``[C, H, W]``.

    Separable ``kernel_size``-tap kernel ``exp(-x²/2σ²)`` (normalised) along each axis; borders
    mirrored without repeating the edge pixel (torchvision's ``reflect``, OpenCV's
    ``BORDER_REFLECT_101``), at any image size.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    radius = kernel_size // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(image.dtype).to(image.device)
    c = image.shape[0]
    out = image[None]
    for dim, shape in ((2, (c, 1, kernel_size, 1)), (3, (c, 1, 1, kernel_size))):
        padded = out.index_select(dim, _mirror_index(out.shape[dim], radius, image.device))
        out = F.conv2d(padded, kernel.view(1, 1, *shape[2:]).expand(shape), groups=c)
    return out[0]


def student_view(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PriMaPs-EM's student view of ``image [3, H, W]`` in ``[0, 1]`` → ``[3, H, W]``.

    As the reference (methods.md §3): Gaussian blur (kernel 21, σ ~ U(0.1, 2)); then with
    probability ½ colour jitter 0.1 (brightness, contrast, saturation, hue, in random order)
    applied with probability 0.3, otherwise greyscale with probability 0.1. Photometric only:
    the geometry is unchanged. (The reference applies it to the ImageNet-normalised tensor; here
    it acts on the ``[0, 1]`` image, as colour jitter is defined.)
    """
    _check(image, None)
    out = gaussian_blur(image, uniform(generator, 0.1, 2.0), 21)
    if uniform(generator) < 0.5:
        if uniform(generator) < 0.3:
            names = ("brightness", "contrast", "saturation", "hue")
            for j in torch.randperm(4, generator=generator).tolist():
                amounts = {name: 0.1 if i == j else 0.0 for i, name in enumerate(names)}
                out, _ = color_jitter(out, None, generator, **amounts)
    elif uniform(generator) < 0.1:
        out = luma(out).expand(3, -1, -1).clone()
    return out
