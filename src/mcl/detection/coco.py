"""COCO-format detection data for torchvision detectors, and COCO evaluation with pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from mcl.data.sources import MissingDatasetError, read_rgb

log = logging.getLogger(__name__)
# COCOeval.stats order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# AP over the dataset's own small / medium / large thirds of objects (coco_evaluate's area_ranges).
THIRD_NAMES = ("APs3", "APm3", "APl3")


class AnnotationFileError(ValueError):
    """An annotation file that is not COCO-format JSON; the message names the file and what is wrong with it."""


def json_folder_contents(folder: Path) -> str:
    """What a folder an annotation file was looked for in holds: its ``.json`` files, none, or that it is missing."""
    if not folder.is_dir():
        return f"{folder} does not exist"
    found = sorted(path.name for path in folder.glob("*.json"))
    return f"{folder} holds {', '.join(found[:10])}" if found else f"{folder} holds no .json file"


def read_annotation_file(annotation_file: str | Path, required: Sequence[str] = ("images",)) -> dict[str, Any]:
    """The JSON object of a COCO-format annotation file, holding at least the ``required`` top-level keys.

    Every failure names the file: :class:`~mcl.data.sources.MissingDatasetError` when it does not exist (with what
    its folder holds), :class:`AnnotationFileError` when it cannot be read, is not JSON (with the line and column
    where parsing stopped), or is JSON of another shape.
    """
    path = Path(annotation_file)
    if not path.is_file():
        raise MissingDatasetError(f"COCO annotation file {path} does not exist: {json_folder_contents(path.parent)}")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as error:
        raise AnnotationFileError(
            f"{path} is not a COCO annotation file: its JSON breaks off or is malformed at line {error.lineno}, "
            f"column {error.colno} ({error.msg}); rewrite the file (e.g. regenerate it) or point to another one"
        ) from error
    except UnicodeDecodeError as error:
        raise AnnotationFileError(
            f"{path} is not a COCO annotation file: it is not UTF-8 text ({error}); point to the JSON file"
        ) from error
    except OSError as error:
        raise AnnotationFileError(f"{path} cannot be read ({error}); check its permissions") from error
    if not isinstance(data, dict):
        raise AnnotationFileError(
            f"{path} is not a COCO annotation file: it holds a JSON {type(data).__name__}, not an object with "
            f"{', '.join(repr(key) for key in required)}"
        )
    missing = [key for key in required if not isinstance(data.get(key), list)]
    if missing:
        raise AnnotationFileError(
            f"{path} is not a COCO annotation file: it has no {', '.join(repr(key) for key in missing)} list "
            f"(its top-level keys: {', '.join(map(str, data)) or 'none'})"
        )
    return data


def quiet_coco(annotation_file: str | Path) -> COCO:
    """A pycocotools ``COCO`` index of an annotation file (read by :func:`read_annotation_file`), without the lines
    pycocotools prints; errors name the file."""
    path = Path(annotation_file)
    coco = COCO()
    coco.dataset = read_annotation_file(path)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError, AttributeError) as error:
        raise AnnotationFileError(
            f"{path} is not a COCO annotation file: an image, annotation or category lacks a field or has the wrong "
            f"type ({type(error).__name__}: {error})"
        ) from error
    return coco


class CocoDetection(Dataset):
    """``(image (3, H, W) float in [0, 1], target)`` with torchvision's target keys: ``boxes`` (xyxy), ``labels``
    (COCO category ids, so 0 stays the background), ``masks`` (with ``masks=True``) and ``image_id``."""

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        masks: bool = False,
        train: bool = False,
        drop_degenerate_boxes: bool = False,
    ):
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise MissingDatasetError(f"image folder {self.image_dir} does not exist")
        self.coco = quiet_coco(annotation_file)
        self.ids = sorted(self.coco.getImgIds())
        self.masks = masks
        self.train = train
        try:
            self.check_images(annotation_file)
            self.check_boxes(annotation_file, drop_degenerate_boxes)
        except (KeyError, TypeError) as error:
            raise AnnotationFileError(
                f"{annotation_file} is not a COCO annotation file: an image lacks its file_name or an annotation its "
                f"bbox, or one has the wrong type ({type(error).__name__}: {error})"
            ) from error

    def check_images(self, annotation_file: str | Path) -> None:
        """Every image the annotations list must exist, found now rather than during the first epoch."""
        missing = [
            info["file_name"]
            for info in self.coco.loadImgs(self.ids)
            if not (self.image_dir / info["file_name"]).is_file()
        ]
        if missing:
            raise MissingDatasetError(
                f"{len(missing)} image(s) listed in {annotation_file} are missing from {self.image_dir}, e.g. "
                + ", ".join(missing[:5])
            )

    def check_boxes(self, annotation_file: str | Path, drop: bool) -> None:
        """Boxes with zero or negative width or height: an error naming them, or dropped with a count."""
        bad = [a for a in self.coco.dataset.get("annotations", []) if len(a["bbox"]) != 4 or min(a["bbox"][2:]) <= 0]
        if not bad:
            return
        ids = [a.get("id") for a in bad]
        if not drop:
            raise ValueError(
                f"{annotation_file}: {len(bad)} annotation(s) have a box of zero or negative width or height "
                f"(ids {ids[:10]}); fix them or set data.drop_degenerate_boxes=true to drop them"
            )
        log.warning("%s: dropped %d annotation(s) with degenerate boxes (ids %s)", annotation_file, len(bad), ids[:10])
        for annotation_id in ids:
            del self.coco.anns[annotation_id]
        self.coco.imgToAnns = {
            image: [a for a in annotations if a["id"] in self.coco.anns]
            for image, annotations in self.coco.imgToAnns.items()
        }

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        info = self.coco.loadImgs(image_id)[0]
        image = TF.to_dtype(TF.pil_to_tensor(read_rgb(str(self.image_dir / info["file_name"]))), torch.float32, True)
        annotations = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd")]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target = {
            "boxes": boxes,
            "labels": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
            "image_id": torch.tensor(image_id),
        }
        if self.masks:
            target["masks"] = torch.from_numpy(
                np.stack([self.coco.annToMask(a) for a in annotations])
                if annotations
                else np.zeros((0, info["height"], info["width"]), dtype=np.uint8)
            )
        if self.train and torch.rand(()) < 0.5:
            image, target = horizontal_flip(image, target)
        return image, target


def split_annotations(
    annotation_file: str | Path, heldout_fraction: float, output_dir: str | Path, seed: int = 0
) -> tuple[Path, Path]:
    """Split a COCO file's images at random into ``fit.json`` and ``heldout.json`` (``heldout_fraction`` of them),
    written to ``output_dir``; both keep the categories and refer to the same image folder."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction} is invalid: it must lie strictly between 0 and 1")
    coco = read_annotation_file(annotation_file, ("images", "annotations"))
    images = coco["images"]
    count = round(len(images) * heldout_fraction)
    if not 0 < count < len(images):
        raise ValueError(
            f"{annotation_file} has {len(images)} images: a held-out fraction of {heldout_fraction} "
            "leaves one part empty"
        )
    order = np.random.default_rng(seed).permutation(len(images))
    heldout_ids = {images[i]["id"] for i in order[:count]}
    paths = []
    for name, keep in (("fit", lambda i: i not in heldout_ids), ("heldout", lambda i: i in heldout_ids)):
        part = {
            **coco,
            "images": [image for image in images if keep(image["id"])],
            "annotations": [a for a in coco["annotations"] if keep(a["image_id"])],
        }
        path = Path(output_dir) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(part))
        paths.append(path)
    return paths[0], paths[1]


def horizontal_flip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def collate(batch: list) -> tuple[list, list]:
    return tuple(map(list, zip(*batch, strict=True)))


def to_coco_results(predictions: list[dict[str, torch.Tensor]], image_ids: list[int], masks: bool) -> list[dict]:
    """torchvision outputs -> COCO result dicts (xywh boxes, RLE masks thresholded at 0.5)."""
    results = []
    for prediction, image_id in zip(predictions, image_ids, strict=True):
        boxes = prediction["boxes"].detach().cpu().clone()
        boxes[:, 2:] -= boxes[:, :2]
        rles = []
        if masks and "masks" in prediction:
            binary = (prediction["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
            rles = [mask_utils.encode(np.asfortranarray(m)) for m in binary]
            for rle in rles:
                rle["counts"] = rle["counts"].decode("ascii")
        for index, (box, score, label) in enumerate(
            zip(boxes.tolist(), prediction["scores"].tolist(), prediction["labels"].tolist(), strict=True)
        ):
            result: dict[str, Any] = {"image_id": image_id, "category_id": label, "bbox": box, "score": score}
            if rles:
                result["segmentation"] = rles[index]
            results.append(result)
    return results


def area_thirds(coco: COCO) -> list[tuple[float, float]]:
    """Object-area ranges ``[(0, a1), (a1, a2), (a2, inf)]`` that split a dataset's objects into thirds.

    COCO's fixed thresholds (32² and 96² pixels) suit 800-pixel COCO images; on small images they leave "large"
    nearly empty. These split the objects actually present into three equal groups (by the annotation ``area``, which
    is what COCOeval filters on).
    """
    areas = np.array([a["area"] for a in coco.dataset.get("annotations", []) if not a.get("iscrowd")], dtype=float)
    if len(areas) < 3:
        raise ValueError(f"area thirds need at least 3 annotated objects, the dataset has {len(areas)}")
    low, high = np.quantile(areas, [1 / 3, 2 / 3])
    return [(0.0, float(low)), (float(low), float(high)), (float(high), 1e10)]


def coco_evaluate(
    coco: COCO, results: list[dict], iou_type: str = "bbox", area_ranges: list[tuple[float, float]] | None = None
) -> dict[str, Any]:
    """COCO AP metrics, plus ``ap_by_iou``: AP at each IoU threshold 0.50:0.05:0.95 (the paper's Fig. 6).

    ``area_ranges`` (three ``(low, high)`` object areas, e.g. :func:`area_thirds`) adds ``APs3``, ``APm3`` and
    ``APl3``: AP over the small, medium and large objects by those ranges, beside COCO's ``APs``/``APm``/``APl``.
    """
    extra = list(area_ranges or [])
    if extra and len(extra) != 3:
        raise ValueError(f"area_ranges must hold 3 (low, high) ranges (small, medium, large), got {len(extra)}")
    extra_names = list(THIRD_NAMES) if extra else []
    if not results:
        empty = dict.fromkeys([*STAT_NAMES, *extra_names], 0.0)
        return {**empty, "ap_by_iou": {f"{t:.2f}": 0.0 for t in np.linspace(0.5, 0.95, 10)}}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
        if extra:
            evaluator.params.areaRng = [*evaluator.params.areaRng, *([float(a), float(b)] for a, b in extra)]
            evaluator.params.areaRngLbl = [*evaluator.params.areaRngLbl, *extra_names]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"][..., -1]  # IoU x recall x class x area, 100 detections

    def mean_ap(values: np.ndarray) -> float:
        valid = values[values > -1]
        return 100.0 * float(valid.mean()) if valid.size else 0.0

    by_iou = {f"{t:.2f}": mean_ap(precision[i, :, :, 0]) for i, t in enumerate(evaluator.params.iouThrs)}
    stats = {name: 100.0 * max(0.0, float(value)) for name, value in zip(STAT_NAMES, evaluator.stats[:6], strict=True)}
    for offset, name in enumerate(extra_names):
        stats[name] = mean_ap(precision[:, :, :, 4 + offset])
    return {**stats, "ap_by_iou": by_iou}
