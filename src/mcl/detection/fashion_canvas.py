"""A small real detection set: Fashion-MNIST items pasted at widely varying scales onto canvases.

Deterministic for a seed. Writes COCO-format annotations (boxes, RLE instance masks, categories) beside the PNG
canvases, so any COCO tool reads it. Items pasted later occlude earlier ones; masks, boxes and areas describe what
stays visible, and an item left with fewer than ``min_visible_pixels`` is dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from mcl.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, load_fashion_mnist
from mcl.detection.coco import read_annotation_file


@dataclass(frozen=True)
class CanvasSpec:
    """How canvases are drawn: size, objects per canvas, object side range (pixels), mask threshold."""

    canvas_size: int = 256
    min_objects: int = 1
    max_objects: int = 6
    min_side: int = 12
    max_side: int = 192
    threshold: int = 24
    min_visible_pixels: int = 16


def _paste_one(
    canvas: np.ndarray, masks: list[np.ndarray], item: np.ndarray, side: int, rng: np.random.Generator, spec: CanvasSpec
) -> np.ndarray:
    """Paste ``item`` resized to ``side`` at a random place; return its full-canvas mask and clear it from ``masks``."""
    resized = F.interpolate(torch.from_numpy(item).float()[None, None], size=(side, side), mode="bilinear")
    resized = resized[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    top, left = rng.integers(0, spec.canvas_size - side + 1, size=2)
    mask = np.zeros_like(canvas, dtype=bool)
    mask[top : top + side, left : left + side] = resized > spec.threshold
    canvas[mask] = resized[mask[top : top + side, left : left + side]]
    for earlier in masks:
        earlier &= ~mask
    return mask


def draw_canvas(
    images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, spec: CanvasSpec
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One grayscale canvas ``(S, S)`` and its visible objects ``[(label, mask (S, S) bool)]``."""
    canvas = np.zeros((spec.canvas_size, spec.canvas_size), dtype=np.uint8)
    count = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    picks = rng.integers(0, len(images), size=count)
    # Log-uniform sides: as many small objects as large ones, like detection data and unlike classification data.
    sides = np.exp(rng.uniform(np.log(spec.min_side), np.log(spec.max_side), size=count)).round().astype(int)
    masks: list[np.ndarray] = []
    for pick, side in zip(picks, sides, strict=True):
        masks.append(_paste_one(canvas, masks, images[pick], int(side), rng, spec))
    objects = [(int(labels[p]), m) for p, m in zip(picks, masks, strict=True) if m.sum() >= spec.min_visible_pixels]
    return canvas, objects


def annotation(mask: np.ndarray, label: int, image_id: int, annotation_id: int) -> dict:
    """A COCO annotation for one instance mask: tight box ``[x, y, w, h]``, area, compressed RLE."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": label + 1,
        "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
        "area": int(mask.sum()),
        "iscrowd": 0,
        "segmentation": rle,
    }


def build_split(
    output_dir: Path, split: str, images: np.ndarray, labels: np.ndarray, count: int, seed: int, spec: CanvasSpec
) -> Path:
    """Draw ``count`` canvases into ``output_dir/split/`` and write ``output_dir/annotations/split.json``."""
    rng = np.random.default_rng(seed)
    image_dir = output_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    coco: dict = {
        "info": {"description": f"Fashion-MNIST canvases ({split}), mcl.detection.fashion_canvas, seed {seed}"},
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(FASHION_MNIST_CLASSES)],
        "images": [],
        "annotations": [],
    }
    for image_id in range(1, count + 1):
        canvas, objects = draw_canvas(images, labels, rng, spec)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(canvas).convert("RGB").save(image_dir / file_name)
        coco["images"].append(
            {"id": image_id, "file_name": file_name, "width": spec.canvas_size, "height": spec.canvas_size}
        )
        for label, mask in objects:
            coco["annotations"].append(annotation(mask, label, image_id, len(coco["annotations"]) + 1))
    annotation_path = output_dir / "annotations" / f"{split}.json"
    annotation_path.parent.mkdir(parents=True, exist_ok=True)
    annotation_path.write_text(json.dumps(coco))
    return annotation_path


def build_fashion_canvas(
    output_dir: str | Path,
    num_train: int = 400,
    num_val: int = 100,
    seed: int = 0,
    root: str | Path = FASHION_MNIST_ROOT,
    spec: CanvasSpec | None = None,
) -> dict[str, Path]:
    """Build the train and val splits; training canvases use Fashion-MNIST's train items, val its test items."""
    spec = spec or CanvasSpec()
    if not 0 < spec.min_side <= spec.max_side <= spec.canvas_size:
        raise ValueError(f"object sides {spec.min_side}..{spec.max_side} must lie in 1..canvas_size={spec.canvas_size}")
    output_dir = Path(output_dir)
    paths = {}
    for split, fmnist_split, count, split_seed in (
        ("train", "train", num_train, seed),
        ("val", "test", num_val, seed + 1),
    ):
        images, labels = load_fashion_mnist(root, fmnist_split)
        paths[split] = build_split(output_dir, split, images.numpy(), labels.numpy(), count, split_seed, spec)
    return paths


def object_scale_spread(annotation_file: str | Path) -> dict[str, float]:
    """Spread of object scales (``sqrt(area)`` in pixels) of a COCO-format file: the paper's Fig. 5 statistic."""
    annotations = read_annotation_file(annotation_file, ("annotations",))["annotations"]
    if not annotations:
        raise ValueError(f"{annotation_file} has no annotations")
    scales = np.sqrt([a["area"] for a in annotations])
    return {
        "count": len(scales),
        "mean": float(scales.mean()),
        "std": float(scales.std()),
        "min": float(scales.min()),
        "max": float(scales.max()),
    }
