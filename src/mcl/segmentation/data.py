"""Per-pixel labels from a COCO-format instance dataset: each pixel takes the category id of the instance mask that
covers it (0 where none does), later annotations on top where masks overlap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from mcl.data.sources import MissingDatasetError, read_rgb
from mcl.detection.coco import AnnotationFileError, quiet_coco

# The label of pixels that no metric or loss counts (VOC's "void"; the canvases have none).
IGNORE_INDEX = 255
BACKGROUND = 0


class SemanticCoco(torch.utils.data.Dataset):
    """``(image (3, H, W) float in [0, 1], labels (H, W) int64)``: category ids per pixel, background 0. The masks
    come from the annotations' ``segmentation`` (RLE or polygons, through pycocotools); ``train`` flips half the
    items horizontally."""

    def __init__(self, image_dir: str | Path, annotation_file: str | Path, train: bool = False):
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise MissingDatasetError(f"image folder {self.image_dir} does not exist")
        self.coco = quiet_coco(annotation_file)
        self.ids = sorted(self.coco.getImgIds())
        self.train = train
        unmasked = [a.get("id") for a in self.coco.dataset.get("annotations", []) if not a.get("segmentation")]
        if unmasked:
            raise AnnotationFileError(
                f"{annotation_file}: {len(unmasked)} annotation(s) have no 'segmentation' (ids {unmasked[:10]}), so "
                "their pixels have no label; semantic segmentation needs instance masks (RLE or polygons)"
            )
        missing = [
            i["file_name"] for i in self.coco.loadImgs(self.ids) if not (self.image_dir / i["file_name"]).is_file()
        ]
        if missing:
            raise MissingDatasetError(
                f"{len(missing)} image(s) listed in {annotation_file} are missing from {self.image_dir}, e.g. "
                + ", ".join(missing[:5])
            )
        self.categories = {int(c["id"]): str(c.get("name", c["id"])) for c in self.coco.dataset.get("categories", [])}
        if any(category in (BACKGROUND, IGNORE_INDEX) for category in self.categories):
            raise AnnotationFileError(
                f"{annotation_file}: category ids {BACKGROUND} (the background) and {IGNORE_INDEX} (ignored pixels) "
                "are reserved for semantic labels; renumber the categories from 1"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def labels(self, image_id: int) -> torch.Tensor:
        """The ``(H, W)`` label map of one image."""
        info = self.coco.loadImgs(image_id)[0]
        labels = np.full((info["height"], info["width"]), BACKGROUND, dtype=np.int64)
        for annotation in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id)):
            mask = self.coco.annToMask(annotation).astype(bool)
            labels[mask] = IGNORE_INDEX if annotation.get("iscrowd") else annotation["category_id"]
        return torch.from_numpy(labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_id = self.ids[index]
        info = self.coco.loadImgs(image_id)[0]
        image = TF.to_dtype(TF.pil_to_tensor(read_rgb(str(self.image_dir / info["file_name"]))), torch.float32, True)
        labels = self.labels(image_id)
        if image.shape[-2:] != labels.shape:
            raise AnnotationFileError(
                f"{info['file_name']} is {tuple(image.shape[-2:])} pixels but its annotation says "
                f"{tuple(labels.shape)} (height, width)"
            )
        if self.train and torch.rand(()) < 0.5:
            image, labels = image.flip(-1), labels.flip(-1)
        return image, labels
