"""View generation on the accelerator: the CPU pipeline of :mod:`mcl.data.augment`, per sample, on a batch of decoded
uint8 images that the DataLoader only decoded (and, for large photos, shrank).

Why this split. At 224 px one CPU core spends tens of milliseconds per source image making its ``2 x levels``
views, so a GPU needs more cores than a node gives it. Here the workers decode each image and pad it into the batch;
after the transfer, :class:`DeviceViews` makes every view on the device in a handful of batched calls:

- **random resized crop**: the crop boxes are drawn by :func:`sample_crops` exactly as torchvision's
  ``RandomResizedCrop`` draws them (area fraction and log aspect ratio uniform, ten tries, the same centre-crop
  fallback), per view, relative to each image's own size; :func:`resized_crops` cuts and resizes them all at once
  with ``torchvision.ops.roi_align`` (bilinear; when a crop shrinks, each output pixel averages
  ``ceil(crop / output)`` squared samples, an area filter where torchvision's antialiased resize uses a triangle);
- **flip, grayscale, Gaussian blur, solarize**: ``kornia.augmentation`` modules, whose parameters are drawn per
  sample with torchvision's formulas (blur sigma per view; solarize at 128/255);
- **colour jitter**: :class:`ColorJitterPerView`, kornia's jitter functions with factors and an order of the steps
  drawn per view, as torchvision draws them per image (kornia's ``ColorJitter`` draws one order per call).

No step needs a value from the device on the host (no host sync): crops are grouped by a slice of the batch, the
jitter order is selected with ``torch.where``. kornia draws its own modules' parameters on the CPU and checks them
there.

Everything runs in float32 on values in ``[0, 1]`` (the CPU pipeline rounds to uint8 after each step) and works on
the CPU as well, which is how the tests compare its distributions with the CPU pipeline's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import kornia.augmentation as K
import kornia.enhance as KE
import torch
from torch import nn
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from mcl.data.augment import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size

CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
SOLARIZE_THRESHOLD = 128 / 255
# Images per roi_align call are chosen so that one call's float32 copy of its source images stays under this many
# values (256 MiB), whatever the batch size.
CHUNK_VALUES = 64 * 2**20


class SourceBatch(NamedTuple):
    """A training batch for :class:`DeviceViews`: decoded images zero-padded to the batch's largest height and
    width, ``images`` uint8 ``(B, C, H_max, W_max)``, each image's own ``sizes`` ``(B, 2)`` (height, width) and
    ``labels`` ``(B,)``."""

    images: torch.Tensor
    sizes: torch.Tensor
    labels: torch.Tensor


def collate_sources(items: Sequence[tuple[torch.Tensor, int]]) -> SourceBatch:
    """``[(uint8 (C, h, w) image, label), ...]`` -> :class:`SourceBatch` (images of any sizes, padded)."""
    images = [image for image, _ in items]
    sizes = torch.tensor([image.shape[-2:] for image in images], dtype=torch.int64)
    height, width = (int(v) for v in sizes.max(0).values)
    batch = torch.zeros(len(images), images[0].shape[0], height, width, dtype=torch.uint8)
    for slot, image in zip(batch, images, strict=True):
        h, w = image.shape[1:]
        slot[:, :h, :w] = image
        # One replicated row and column beyond the image, so that bilinear samples at its last pixels read the edge
        # (as a resize of the image alone does) instead of the zero padding.
        slot[:, :h, w : w + 1] = image[:, :, -1:]
        slot[:, h : h + 1, : w + 1] = slot[:, h - 1 : h, : w + 1]
    labels = torch.tensor([int(label) for _, label in items], dtype=torch.int64)
    return SourceBatch(batch, sizes, labels)


class ShrinkToFit:
    """The only per-image work left to a worker: shrink (antialiased, aspect kept) a uint8 ``(C, h, w)`` image whose
    longer side exceeds ``max_side``; smaller images pass unchanged. ``max_side=None``: never shrink."""

    def __init__(self, max_side: int | None):
        if max_side is not None and max_side < 1:
            raise ValueError(f"data.source_max_side={max_side} is invalid: use a positive side in pixels or null")
        self.max_side = max_side

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if self.max_side is None or max(height, width) <= self.max_side:
            return image
        scale = self.max_side / max(height, width)
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        return TF.resize(image, size, antialias=True)


def sample_crops(
    sizes: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
    attempts: int = CROP_ATTEMPTS,
) -> torch.Tensor:
    """Random resized crop boxes, drawn per row of ``sizes`` as torchvision's ``RandomResizedCrop`` draws them.

    Args:
        sizes: ``(N, 2)`` image heights and widths, one row per view to crop.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height), drawn log-uniformly.

    Returns:
        ``(N, 4)`` float boxes ``(left, top, left + width, top + height)`` in pixels (integers, as torchvision's):
        the first of ``attempts`` draws that fits in the image, else the centre crop of the whole image clipped
        to the ratio range.
    """
    device = sizes.device
    height, width = sizes[:, :1].double(), sizes[:, 1:].double()
    count = len(sizes)
    area = height * width * torch.empty(count, attempts, device=device, dtype=torch.float64).uniform_(*scale)
    log_ratio = torch.empty(count, attempts, device=device, dtype=torch.float64).uniform_(*map(math.log, ratio))
    aspect = log_ratio.exp()
    crop_w = torch.sqrt(area * aspect).round()
    crop_h = torch.sqrt(area / aspect).round()
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = fits.double().argmax(1, keepdim=True)  # the first attempt that fits (0 when none does)
    found = fits.any(1, keepdim=True)
    crop_w, crop_h = crop_w.gather(1, first), crop_h.gather(1, first)
    # Offsets uniform over the positions that keep the crop inside (torch.randint(0, H - h + 1) per view).
    top = (torch.rand(count, 1, device=device, dtype=torch.float64) * (height - crop_h + 1)).floor()
    left = (torch.rand(count, 1, device=device, dtype=torch.float64) * (width - crop_w + 1)).floor()
    # Fallback: the whole image, clipped to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    low, high = min(ratio), max(ratio)
    fall_w = torch.where(in_ratio > high, (height * high).round(), width)
    fall_h = torch.where(in_ratio < low, (width / low).round(), height)
    crop_w, crop_h = torch.where(found, crop_w, fall_w), torch.where(found, crop_h, fall_h)
    top = torch.where(found, top, torch.div(height - crop_h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - crop_w, 2, rounding_mode="floor"))
    return torch.cat([left, top, left + crop_w, top + crop_h], 1).float()


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Cut ``boxes`` (pixel boxes ``(left, top, right, bottom)``, ``(V, B, 4)``: ``V`` crops of each of the ``B``
    images) out of uint8 ``images`` ``(B, C, H, W)`` and resize each to ``size x size``: float
    ``(V, B, C, size, size)`` in ``[0, 1]``.

    Bilinear sampling at each output pixel's centre (``roi_align`` with ``aligned=True``); a crop larger than the
    output averages ``ceil(crop / size)`` samples per pixel and axis, so shrinking is antialiased too. The float copy
    of the sources is made in chunks of images (:data:`CHUNK_VALUES`), so memory stays bounded for any batch; which
    crops belong to a chunk follows from the layout (a slice of ``B``), so no step waits for the device.
    """
    views, count = boxes.shape[:2]
    per_chunk = max(1, CHUNK_VALUES // max(1, images[0].numel()))
    out = torch.empty(views, count, images.shape[1], size, size, device=images.device, dtype=torch.float32)
    for start in range(0, count, per_chunk):
        stop = min(count, start + per_chunk)
        chunk = images[start:stop].float().div_(255)
        index = torch.arange(stop - start, device=images.device, dtype=torch.float32).repeat(views).unsqueeze(1)
        rois = torch.cat([index, boxes[:, start:stop].reshape(-1, 4)], 1)
        crops = roi_align(chunk, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out[:, start:stop] = crops.view(views, stop - start, *crops.shape[1:])
    return out.clamp_(0, 1)


def hue_turns(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's hue factor (a fraction of a turn, in ``[-0.5, 0.5]``) on kornia's ``adjust_hue`` (radians)."""
    return KE.adjust_hue(image, factor * (2 * math.pi))


# torchvision's ColorJitter steps in its order (brightness, contrast, saturation, hue), as kornia functions that take
# one factor per image and blend as torchvision does.
JITTER_STEPS = (
    KE.adjust_brightness_accumulative,
    KE.adjust_contrast_with_mean_subtraction,
    KE.adjust_saturation_with_gray_subtraction,
    hue_turns,
)


class ColorJitterPerView(nn.Module):
    """torchvision's ``RandomApply([ColorJitter(*jitter)], p)`` per view of a float ``(N, 3, H, W)`` batch in
    ``[0, 1]``: each view is jittered with probability ``p``, with its own factors (brightness, contrast and
    saturation uniform in ``[max(0, 1 - s), 1 + s]``, hue uniform in ``[-h, h]``) and its own order of the active
    steps (a uniform random permutation, as torchvision draws one per image).

    Without waiting for the device: at each position of the order, every active step runs on every view and
    ``torch.where`` keeps it for the views whose order puts that step there (``k**2`` step calls for ``k`` active
    steps, a fixed number of kernels whatever the draws). kornia's ``ColorJitter`` draws one order per call, and
    splitting the views by order would need their counts on the host."""

    def __init__(self, jitter: Sequence[float], p: float):
        super().__init__()
        self.steps = [step for step, strength in enumerate(jitter) if strength]
        self.ranges = [
            (-jitter[step], jitter[step]) if step == 3 else (max(0.0, 1 - jitter[step]), 1 + jitter[step])
            for step in self.steps
        ]
        self.p = p

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        count, device = len(views), views.device
        applied = torch.rand(count, device=device) < self.p
        factors = [torch.empty(count, device=device).uniform_(low, high) for low, high in self.ranges]
        order = torch.rand(count, len(self.steps), device=device).argsort(1)  # order[:, k]: the step at position k
        out = views
        for position in range(len(self.steps)):
            for index, step in enumerate(self.steps):
                chosen = (applied & (order[:, position] == index)).view(-1, 1, 1, 1)
                out = torch.where(chosen, JITTER_STEPS[step](out, factors[index]), out)
        return out


def side_augmentation(
    blur_p: float,
    solarize_p: float,
    image_size: int,
    jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
) -> nn.Sequential:
    """After the crop, one BYOL side as kornia modules on float ``(N, 3, H, W)`` in ``[0, 1]``: flip, colour jitter,
    grayscale, Gaussian blur (the CPU pipeline's kernel and sigma range), solarize; steps with probability 0 are
    left out."""
    steps: list[nn.Module] = [K.RandomHorizontalFlip(p=0.5)]
    if jitter_p > 0 and any(jitter):
        steps.append(ColorJitterPerView(jitter, jitter_p))
    if grayscale_p > 0:
        steps.append(K.RandomGrayscale(p=grayscale_p))
    if blur_p > 0:
        kernel = blur_kernel_size(image_size)
        steps.append(K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), border_type="reflect", p=blur_p))
    if solarize_p > 0:
        steps.append(K.RandomSolarize((SOLARIZE_THRESHOLD, SOLARIZE_THRESHOLD), (0.0, 0.0), p=solarize_p))
    return nn.Sequential(*steps)


class OwnRandomness:
    """A random stream of its own for code that draws from torch's default generators (kornia does): inside
    :meth:`use`, the CPU generator and ``device``'s generator continue this stream, and the process's own streams are
    restored afterwards. A new ``seed`` restarts the stream; the same one continues it."""

    def __init__(self) -> None:
        self.seed: int | None = None
        self.states: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @contextmanager
    def use(self, device: torch.device, seed: int) -> Iterator[None]:
        cuda = device.type == "cuda"
        index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
        with torch.random.fork_rng(devices=[index] if cuda else []):
            if seed != self.seed or self.states is None:
                torch.default_generator.manual_seed(seed)
                if cuda:
                    torch.cuda.default_generators[index].manual_seed(seed)
            else:
                torch.set_rng_state(self.states[0])
                if cuda:
                    torch.cuda.set_rng_state(self.states[1], index)
            yield
            self.states = (torch.get_rng_state(), torch.cuda.get_rng_state(index) if cuda else None)
            self.seed = seed


class DeviceViews(nn.Module):
    """The training views of a :class:`SourceBatch`, made where the batch is (the accelerator after the transfer).

    With ``sides`` (one ``(blur_p, solarize_p)`` per augmentation side, BYOL's ``((1.0, 0.0), (0.1, 0.2))``) the
    output is float ``(B, len(sides), views_per_side, C, size, size)``; with ``sides=None`` (the supervised recipe:
    crop and flip only) it is ``(B, views_per_side, C, size, size)``. Views are normalised with ``mean`` and ``std``
    like the CPU pipeline's. Randomness comes from torch's default generators (the CPU's and the batch's device's);
    the datamodule runs it in an :class:`OwnRandomness` stream per rank and epoch.
    """

    def __init__(
        self,
        image_size: int,
        views_per_side: int,
        sides: Sequence[tuple[float, float]] | None,
        min_scale: float,
        jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        if views_per_side < 1:
            raise ValueError(f"views_per_side={views_per_side} is invalid: it must be at least 1")
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale={min_scale} is invalid: the smallest crop area fraction is in (0, 1]")
        self.image_size = image_size
        self.views_per_side = views_per_side
        self.scale = (min_scale, 1.0)
        self.squeeze_sides = sides is None
        if sides is None:
            self.sides = nn.ModuleList([nn.Sequential(K.RandomHorizontalFlip(p=0.5))])
        else:
            self.sides = nn.ModuleList(
                side_augmentation(blur, solarize, image_size, jitter, jitter_p, grayscale_p) for blur, solarize in sides
            )
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, batch: SourceBatch) -> torch.Tensor:
        images, sizes = batch.images, batch.sizes.to(batch.images.device)
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceViews takes uint8 images (decoded, not normalised), got {images.dtype}")
        count, sides, levels = len(images), len(self.sides), self.views_per_side
        # View order: side-major, then level, then image, so each side's views are one contiguous block.
        boxes = sample_crops(sizes.repeat(sides * levels, 1), self.scale)
        crops = resized_crops(images, boxes.view(sides * levels, count, 4), self.image_size)
        per_side = crops.view(sides, levels * count, *crops.shape[2:])
        views = torch.stack([augment(side_crops) for augment, side_crops in zip(self.sides, per_side, strict=True)])
        if self.mean.device != views.device:
            # Only the buffers, once: moving the whole module would move kornia's samplers to the device too, and
            # kornia checks its draws on the host.
            self.mean, self.std = self.mean.to(views.device), self.std.to(views.device)
        views = (views - self.mean) / self.std
        # (sides, levels, B, C, H, W) -> (B, sides, levels, C, H, W)
        views = views.view(sides, levels, count, *views.shape[2:]).permute(2, 0, 1, 3, 4, 5).contiguous()
        return views[:, 0] if self.squeeze_sides else views
