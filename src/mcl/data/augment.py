"""View generation on uint8 ``(C, H, W)`` tensors with torchvision.transforms.v2."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The smallest crop area of the supervised recipe (BYOL's sides use data.min_scale, 0.2 by default).
SUPERVISED_MIN_SCALE = 0.08


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def _crop(image_size: int, min_scale: float, zoom_out: float, zoom_out_p: float) -> list[v2.Transform]:
    """Random resized crop, then (with ``zoom_out`` > 1, probability ``zoom_out_p``) paste the crop at a random
    place on a black canvas up to ``zoom_out`` times its side and resize back: the object then spans
    ``1/zoom_out`` to 1 of the view, so small objects are seen too (detection data holds them, object-centric
    classification data does not)."""
    if zoom_out < 1:
        raise ValueError(f"zoom_out={zoom_out} is invalid: it is the largest canvas/crop side ratio, at least 1")
    crop = [v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True)]
    if zoom_out == 1 or zoom_out_p == 0:
        return crop
    zoom = v2.RandomZoomOut(fill=0, side_range=(1.0, zoom_out), p=zoom_out_p)
    return [*crop, zoom, v2.Resize((image_size, image_size), antialias=True)]


def blur_kernel_size(image_size: int) -> int:
    """The Gaussian blur kernel of a view: odd, about 10% of the image side (23 at 224 px), at least 3."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def byol_view(
    image_size: int,
    blur_p: float,
    solarize_p: float,
    min_scale: float = 0.2,
    jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    zoom_out: float = 1.0,
    zoom_out_p: float = 0.5,
) -> v2.Compose:
    """One side of BYOL's asymmetric augmentation; the blur kernel is ~10% of the image, as at 224 px (23).
    ``zoom_out``: see ``_crop`` (1: off, BYOL's recipe)."""
    kernel = blur_kernel_size(image_size)
    return v2.Compose(
        [
            *_crop(image_size, min_scale, zoom_out, zoom_out_p),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(*jitter)], p=jitter_p),
            v2.RandomGrayscale(p=grayscale_p),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
            v2.RandomSolarize(threshold=128, p=solarize_p),
            *_normalize(mean, std),
        ]
    )


def supervised_view(
    image_size: int,
    min_scale: float = SUPERVISED_MIN_SCALE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    zoom_out: float = 1.0,
    zoom_out_p: float = 0.5,
) -> v2.Compose:
    """The plain supervised recipe: random resized crop and flip (``zoom_out``: see ``_crop``; 1: off)."""
    return v2.Compose(
        [
            *_crop(image_size, min_scale, zoom_out, zoom_out_p),
            v2.RandomHorizontalFlip(),
            *_normalize(mean, std),
        ]
    )


def eval_view(
    image_size: int,
    crop_fraction: float = 224 / 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Resize the short side to ``image_size / crop_fraction``, centre-crop ``image_size``."""
    return v2.Compose(
        [
            v2.Resize(round(image_size / crop_fraction), antialias=True),
            v2.CenterCrop(image_size),
            *_normalize(mean, std),
        ]
    )


class MultiView:
    """Apply a list of per-view transforms to one image and stack the results.

    With ``sides`` ``[view_a, view_b]`` and ``views_per_side`` S the output is ``(2, S, C, H, W)``; with one side
    and ``squeeze_sides`` it is ``(S, C, H, W)`` (the supervised variant).
    """

    def __init__(self, sides: Sequence[Callable], views_per_side: int, squeeze_sides: bool = False):
        if views_per_side < 1:
            raise ValueError(f"views_per_side={views_per_side} is invalid: it must be at least 1")
        self.sides = list(sides)
        self.views_per_side = views_per_side
        self.squeeze_sides = squeeze_sides

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        views = torch.stack([torch.stack([side(image) for _ in range(self.views_per_side)]) for side in self.sides])
        return views[0] if self.squeeze_sides else views
