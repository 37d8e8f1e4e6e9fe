"""Object probes on detection canvases: box features in place and centred."""

import json

import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align

from mcl.backbones import Backbone
from mcl.detection.probe import object_features, object_probe_top1, pasted_objects, read_objects


def test_centred_objects_paste_the_box_content_at_the_centre():
    images = torch.zeros(2, 3, 10, 10)
    images[1, :, 1:4, 6:8] = torch.arange(6.0).view(3, 2)
    boxes = torch.tensor([[1, 6, 1, 8, 4]], dtype=torch.float32)
    out = pasted_objects(images, boxes, background=-1.0)
    assert out.shape == (1, 3, 10, 10)
    # a 2-wide, 3-high box lands at left (10 - 2) // 2 = 4, top (10 - 3) // 2 = 3
    assert torch.equal(out[0, :, 3:6, 4:6], images[1, :, 1:4, 6:8])
    assert (out[0] == -1).sum() == 3 * (100 - 6)


def test_moved_objects_land_anywhere_they_fit_and_repeat_for_a_seed():
    images = torch.zeros(1, 1, 10, 10)
    images[0, 0, 1:4, 6:8] = torch.arange(1.0, 7.0).view(3, 2)
    boxes = torch.tensor([[0, 6, 1, 8, 4]] * 200, dtype=torch.float32)
    out = pasted_objects(images, boxes, -1.0, torch.Generator().manual_seed(0))
    again = pasted_objects(images, boxes, -1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # the top-left value 1 marks each paste's corner: every left 0..8 and top 0..7 occurs, nothing else
    corners = (out[:, 0] == 1).nonzero()[:, 1:]
    assert len(corners) == 200
    assert set(corners[:, 1].tolist()) == set(range(9)) and set(corners[:, 0].tolist()) == set(range(8))
    assert all((out[k, 0] != -1).sum() == 6 for k in range(200))


def test_in_place_features_are_c3_c4_c5_pooled_over_each_box_in_box_order():
    torch.manual_seed(0)
    backbone = Backbone("resnet18", image_size=64).eval()
    images = torch.randn(3, 3, 64, 64)
    # boxes out of image order, and split over two batches of 2 images
    boxes = torch.tensor([[2, 0, 0, 32, 32], [0, 8, 16, 40, 64], [1, 10, 10, 20, 30]], dtype=torch.float32)
    features = object_features(backbone, images, boxes, "in_place", batch_size=2)
    assert features.shape == (3, 128 + 256 + 512)
    with torch.no_grad():
        maps = backbone(images)[-3:]
    expected = torch.cat(
        [roi_align(m, boxes, 1, spatial_scale=m.shape[-1] / 64, aligned=True).flatten(1) for m in maps], dim=1
    )
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def write_set(root, count, seed):
    """Images of one bright square (class 0) or one bright bar (class 1) at random places on black."""
    generator = torch.Generator().manual_seed(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 2}]}
    for image_id in range(count):
        label = image_id % 2
        width, height = (12, 12) if label == 0 else (4, 16)
        x, y = torch.randint(0, 48 - 16, (2,), generator=generator).tolist()
        pixels = torch.zeros(48, 48, 3, dtype=torch.uint8)
        pixels[y : y + height, x : x + width] = 255
        Image.fromarray(pixels.numpy()).save(root / "images" / f"{image_id}.png")
        coco["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": 48, "height": 48})
        coco["annotations"].append({"id": image_id, "image_id": image_id, "category_id": label + 1,
                                    "bbox": [x, y, width, height]})  # fmt: skip
    (root / "annotations.json").write_text(json.dumps(coco))
    return read_objects(root / "images", root / "annotations.json", mean=[0.5] * 3, std=[0.5] * 3)


def test_read_objects_and_the_probe_tell_two_shapes_apart(tmp_path):
    train, test = write_set(tmp_path / "train", 40, seed=0), write_set(tmp_path / "test", 20, seed=1)
    images, boxes, labels = train
    assert images.shape == (40, 3, 48, 48) and images.min() == -1 and images.max() == 1
    assert boxes[1].tolist()[0] == 1 and labels[:4].tolist() == [0, 1, 0, 1]
    assert boxes[0, 3] - boxes[0, 1] == 12 and boxes[1, 4] - boxes[1, 2] == 16
    torch.manual_seed(0)
    backbone = Backbone("resnet18", image_size=48)
    for place in ("in_place", "centred"):
        assert object_probe_top1(backbone, train, test, place) >= 90  # chance: 50
    # moved: pooled C5 of each object pasted alone at the seed's random places
    moved = pasted_objects(images, boxes, -1.0, torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = backbone.eval().forward_pooled(moved)
    torch.testing.assert_close(object_features(backbone, images, boxes, "moved", seed=3), expected)
    with pytest.raises(ValueError, match="place='corner'"):
        object_features(backbone, images, boxes, "corner")
