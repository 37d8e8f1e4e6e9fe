"""Object probes: does a frozen backbone recognise the objects of a detection set where they lie?

Linear-probe top-1 on the ground-truth objects of a COCO-format set, from features of the frozen backbone:

- ``in_place``: the whole image goes through the backbone and each object's box is pooled (RoIAlign, one bin) from
  C3, C4 and C5, concatenated: what a detector's RoI head starts from.
- ``centred``: each object's box content is pasted at the centre of an empty image of the same size (the
  background colour), and C5 is pooled globally: the object at its own size, alone, always at the same place.
- ``moved``: the same, but each object at a random place of the empty image (seeded): alone, anywhere.

``centred`` far above ``moved`` means features that change with where an object lies relative to the backbone's
stride (pretraining that always shows objects at the same place teaches nothing else); ``moved`` above
``in_place`` means neighbours disturb them. Either way fine-tuning has to relearn it before pretraining helps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import roi_align

from mcl.backbones import Backbone
from mcl.detection.coco import read_annotation_file
from mcl.linear import feature_probe_top1

PLACES = ("in_place", "centred", "moved")


def read_objects(
    image_dir: str | Path, annotation_file: str | Path, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The images ``(N, 3, H, W)`` normalised with ``mean``/``std``, the boxes ``(M, 5)`` as ``[image index, x0,
    y0, x1, y1]`` and the 0-based labels ``(M,)`` (COCO category id - 1) of a COCO-format set of equal-size images."""
    coco = read_annotation_file(annotation_file, ("images", "annotations"))
    index = {image["id"]: i for i, image in enumerate(coco["images"])}
    images = [
        torch.from_numpy(np.array(Image.open(Path(image_dir) / image["file_name"]).convert("RGB")))
        for image in coco["images"]
    ]
    pixels = torch.stack(images).permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    boxes = []
    for a in coco["annotations"]:
        x, y, width, height = a["bbox"]
        boxes.append([index[a["image_id"]], x, y, x + width, y + height])
    labels = [a["category_id"] - 1 for a in coco["annotations"]]
    return pixels, torch.tensor(boxes, dtype=torch.float32).view(-1, 5), torch.tensor(labels, dtype=torch.long)


def pasted_objects(
    images: torch.Tensor, boxes: torch.Tensor, background: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One image per box: the box's content (integer pixel coordinates) pasted on an image of the same size filled
    with ``background``, at the centre, or with ``generator`` at a uniformly random place where it fits."""
    size_y, size_x = images.shape[-2:]
    out = images.new_full((len(boxes), images.shape[1], size_y, size_x), background)
    for k, (i, x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        width, height = x1 - x0, y1 - y0
        left, top = (size_x - width) // 2, (size_y - height) // 2
        if generator is not None:
            left = int(torch.randint(0, size_x - width + 1, (), generator=generator))
            top = int(torch.randint(0, size_y - height + 1, (), generator=generator))
        out[k, :, top : top + height, left : left + width] = images[i, :, y0:y1, x0:x1]
    return out


@torch.no_grad()
def object_features(
    backbone: Backbone,
    images: torch.Tensor,
    boxes: torch.Tensor,
    place: str = "in_place",
    batch_size: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """Frozen features of every box, ``(M, D)``: see the module's docstring for ``place`` (``seed``: the places of
    ``moved``; the background is the images' smallest value)."""
    if place not in PLACES:
        raise ValueError(f"place={place!r} is invalid: use one of {PLACES}")
    backbone.eval()
    if place in ("centred", "moved"):
        generator = torch.Generator().manual_seed(seed) if place == "moved" else None
        objects = pasted_objects(images, boxes, float(images.amin()), generator)
        return torch.cat(
            [backbone.forward_pooled(objects[i : i + batch_size]) for i in range(0, len(objects), batch_size)]
        )
    features: torch.Tensor | None = None
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        inside = (boxes[:, 0] >= start) & (boxes[:, 0] < start + len(chunk))
        local = boxes[inside].clone()
        local[:, 0] -= start
        maps = backbone(chunk)[-3:]
        pooled = [
            roi_align(m.float(), local, output_size=1, spatial_scale=m.shape[-1] / chunk.shape[-1], aligned=True)
            for m in maps
        ]
        pooled = torch.cat(pooled, dim=1).flatten(1)
        if features is None:
            features = pooled.new_zeros(len(boxes), pooled.shape[1])
        features[inside] = pooled
    if features is None:
        raise ValueError("no images to probe")
    return features


def object_probe_top1(
    backbone: Backbone,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    place: str = "in_place",
) -> float:
    """Linear-probe top-1 (%) on ``test``'s objects after fitting on ``train``'s (each ``read_objects``' triple)."""
    train_x = object_features(backbone, train[0], train[1], place, seed=0)
    test_x = object_features(backbone, test[0], test[1], place, seed=1)
    return feature_probe_top1((train_x, train[2]), (test_x, test[2]))
