"""The Fashion-MNIST canvas detection set: annotations agree with their masks and images, and builds repeat."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mcl.detection.fashion_canvas import CanvasSpec, build_fashion_canvas, object_scale_spread

SPEC = CanvasSpec(canvas_size=128, max_objects=5, min_side=10, max_side=96)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("canvas")
    return root, build_fashion_canvas(root, num_train=8, num_val=4, seed=3, spec=SPEC)


def test_annotations_match_their_masks_and_pixels(built):
    root, paths = built
    for split, path in paths.items():
        coco = json.loads(path.read_text())
        assert [c["name"] for c in coco["categories"]][:2] == ["T-shirt/top", "Trouser"]
        assert len(coco["images"]) == {"train": 8, "val": 4}[split]
        for image_info in coco["images"]:
            pixels = np.asarray(Image.open(root / split / image_info["file_name"]))[..., 0]
            union = np.zeros(pixels.shape, dtype=int)
            for ann in (a for a in coco["annotations"] if a["image_id"] == image_info["id"]):
                mask = mask_utils.decode(ann["segmentation"]).astype(bool)
                ys, xs = np.nonzero(mask)
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert ann["area"] == mask.sum() >= SPEC.min_visible_pixels
                assert (pixels[mask] > SPEC.threshold).all()
                assert 1 <= ann["category_id"] <= 10
                union += mask
            assert union.max() <= 1  # visible masks of one canvas never overlap
            assert (pixels[union == 0] <= SPEC.threshold).all()  # outside the masks: background or faint edges


def test_pycocotools_reads_the_files(built):
    _, paths = built
    coco = COCO(str(paths["val"]))
    assert len(coco.getImgIds()) == 4 and len(coco.getCatIds()) == 10


def test_builds_are_deterministic(built, tmp_path):
    root, paths = built
    again = build_fashion_canvas(tmp_path, num_train=8, num_val=4, seed=3, spec=SPEC)
    assert again["train"].read_text() == paths["train"].read_text()
    assert (tmp_path / "val" / "000002.png").read_bytes() == (root / "val" / "000002.png").read_bytes()
    other = build_fashion_canvas(tmp_path / "other", num_train=8, num_val=1, seed=4, spec=SPEC)
    assert other["train"].read_text() != paths["train"].read_text()


def test_object_scales_spread_widely(built):
    _, paths = built
    spread = object_scale_spread(paths["train"])
    assert spread["count"] > 8 and spread["max"] > 3 * spread["min"]
    assert spread["std"] == pytest.approx(
        np.std(np.sqrt([a["area"] for a in json.loads(paths["train"].read_text())["annotations"]]))
    )


def test_bad_spec_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="object sides"):
        build_fashion_canvas(tmp_path, spec=CanvasSpec(canvas_size=64, max_side=96))
