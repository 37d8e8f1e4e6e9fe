"""The transfer benchmark's protocol pieces: held-out split, area thirds, seed statistics, weight report, probe,
claims table."""

import importlib
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from mcl.detection.coco import THIRD_NAMES, area_thirds, coco_evaluate, split_annotations
from mcl.detection.finetune import weight_report
from mcl.linear import feature_probe_top1
from mcl.results import compare_means, mean_std


def square_dataset(sides):
    """One 200x200 image per object: a square of the given side at (10, 10), category 1."""
    return {
        "images": [{"id": i + 1, "width": 200, "height": 200, "file_name": f"{i}.png"} for i in range(len(sides))],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, s, s], "area": s * s, "iscrowd": 0}
            for i, s in enumerate(sides)
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }


def as_coco(dataset, tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(dataset))
    return COCO(str(path))


def test_area_thirds_split_the_objects_into_three_equal_groups(tmp_path):
    sides = [4, 5, 6, 10, 11, 12, 40, 50, 60]
    coco = as_coco(square_dataset(sides), tmp_path)
    (a0, a1), (b0, b1), (c0, c1) = area_thirds(coco)
    areas = np.array(sides) ** 2
    assert a0 == 0 and a1 == b0 and b1 == c0 and c1 == 1e10
    assert [int(((areas >= lo) & (areas < hi)).sum()) for lo, hi in area_thirds(coco)] == [3, 3, 3]
    assert a1 == pytest.approx(np.quantile(areas, 1 / 3)) and b1 == pytest.approx(np.quantile(areas, 2 / 3))
    with pytest.raises(ValueError, match="at least 3 annotated objects"):
        area_thirds(as_coco(square_dataset([4, 5]), tmp_path))


def test_thirds_ap_counts_only_the_objects_of_each_third(tmp_path):
    """Perfect boxes for the small and large thirds only: APs3 = APl3 = 100, APm3 = 0, COCO's APl has no objects."""
    sides = [4, 5, 6, 10, 11, 12, 40, 50, 60]
    coco = as_coco(square_dataset(sides), tmp_path)
    found = [0, 1, 2, 6, 7, 8]
    results = [{"image_id": i + 1, "category_id": 1, "bbox": [10, 10, sides[i], sides[i]], "score": 0.9} for i in found]
    stats = coco_evaluate(coco, results, "bbox", area_thirds(coco))
    assert (stats["APs3"], stats["APm3"], stats["APl3"]) == (pytest.approx(100.0), 0.0, pytest.approx(100.0))
    assert stats["APl"] == 0.0  # 60² < 96²: COCO's "large" is empty here
    assert set(THIRD_NAMES) <= set(stats) and len(stats["ap_by_iou"]) == 10
    assert "APs3" not in coco_evaluate(coco, results, "bbox")
    with pytest.raises(ValueError, match="3 .* ranges"):
        coco_evaluate(coco, results, "bbox", [(0, 10), (10, 1e10)])


def test_split_annotations_partitions_images_and_their_objects(tmp_path):
    source = tmp_path / "train.json"
    source.write_text(json.dumps(square_dataset(list(range(4, 24)))))
    fit, heldout = split_annotations(source, 0.25, tmp_path / "out", seed=3)
    fit, heldout = json.loads(fit.read_text()), json.loads(heldout.read_text())
    fit_ids, heldout_ids = {i["id"] for i in fit["images"]}, {i["id"] for i in heldout["images"]}
    assert len(heldout_ids) == 5 and len(fit_ids) == 15 and fit_ids | heldout_ids == set(range(1, 21))
    assert {a["image_id"] for a in heldout["annotations"]} == heldout_ids
    assert {a["image_id"] for a in fit["annotations"]} == fit_ids
    assert fit["categories"] == heldout["categories"]
    again = json.loads(split_annotations(source, 0.25, tmp_path / "again", seed=3)[1].read_text())
    assert {i["id"] for i in again["images"]} == heldout_ids
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        split_annotations(source, 1.0, tmp_path)


def test_mean_std_and_the_two_standard_error_verdict():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    # gap 2.0; 2 * sqrt(1/3 + 1/3) = 1.633 -> better; a gap of 1.0 is within noise
    verdict = compare_means([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert verdict["gap"] == 2.0 and verdict["two_se"] == pytest.approx(1.63299, abs=1e-5)
    assert verdict["verdict"] == "better"
    assert compare_means([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])["verdict"] == "within noise"
    assert compare_means([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])["verdict"] == "worse"
    assert compare_means([9.0], [1.0, 2.0])["verdict"] == "within noise"  # one seed has no spread


def test_weight_report_gives_norms_and_relative_moves_per_part():
    start = {
        "backbone.body.layer1.0.conv1.weight": torch.full((2, 2), 1.0),  # norm 2
        "backbone.body.layer1.0.conv2.weight": torch.zeros(2, 2),
        "roi_heads.box_head.0.0.weight": torch.tensor([[3.0, 4.0]]),  # norm 5
    }
    end = dict(start)
    end["backbone.body.layer1.0.conv2.weight"] = torch.tensor([[0.0, 0.2], [0.0, 0.0]])
    end["roi_heads.box_head.0.0.weight"] = torch.tensor([[6.0, 8.0]])
    report = weight_report(start, end)
    assert list(report) == ["res2", "box_head"]
    assert report["res2"]["norm_start"] == pytest.approx(2.0)
    assert report["res2"]["relative_move"] == pytest.approx(0.1)
    assert report["box_head"] == pytest.approx({"norm_start": 5.0, "norm_end": 10.0, "relative_move": 1.0})


def test_feature_probe_separates_separable_features_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    centres = torch.randn(3, 16, generator=generator) * 4
    features = centres[labels] + torch.randn(300, 16, generator=generator)
    train, test = (features[:200], labels[:200]), (features[200:], labels[200:])
    assert feature_probe_top1(train, test) == 100.0
    noise = torch.randn(300, 16, generator=generator)
    chance = feature_probe_top1((noise[:200], labels[:200]), (noise[200:], labels[200:]))
    assert chance < 60.0


def pretrained_row(aps_per_pretraining, knn=50.0):
    """A row of the transfer benchmark's results: one pretraining per list of fine-tuning APs (AP50 = AP + 10,
    AP75 = AP - 1 in every run)."""
    return {
        "pretrainings": [
            {
                "seed": seed, "knn_top1": knn + seed, "linear_top1": knn + 10,
                "runs": [{"val/AP": ap, "val/AP50": ap + 10, "val/AP75": ap - 1} for ap in aps],
            }
            for seed, aps in enumerate(aps_per_pretraining)
        ]
    }  # fmt: skip


def test_claims_use_the_pretraining_spread_and_name_each_verdict():
    transfer = importlib.import_module("benchmarks.transfer")
    results = {
        "random init": pretrained_row([[4.0, 4.5, 5.0, 4.0, 4.5, 5.0]], knn=20.0),  # one group: its seeds
        "supervised": pretrained_row([[6.0, 6.0], [7.0, 7.0], [8.0, 8.0]]),
        "supervised multi-level": pretrained_row([[6.5, 6.5], [7.0, 7.0], [7.5, 7.5]]),
        "MCL, 1 level": pretrained_row([[2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]),
        "MCL, 3 levels": pretrained_row([[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]),
    }
    # Per-pretraining means 5, 6, 7: the mean 6, the spread their std 1 (not the fine-tuning seeds' 0).
    assert transfer.pooled(results["MCL, 3 levels"], "AP") == (6.0, 1.0)
    assert transfer.pooled(results["random init"], "AP") == pytest.approx((4.5, 0.4472136))
    # (a) gap 3, 2 * sqrt(1/3 + 1/3) = 1.63; (b) gap 1.5, 2 * sqrt(1/3 + 0.2/6) = 1.21; (c) gap 0;
    # (d) gap 1 within 2 * sqrt(0.25/3 + 1/3) = 1.29, so the gap is only bounded by 1 + 1.29.
    cost = {
        "environment": {"device": "cpu", "threads": 2},
        "settings": [{"name": "r18", "rows": [{"levels": 3, "flops": {"online_backbone_ratio": 1.3125,
                                                                     "online_ratio": 1.46}, "time": {"ratio": 1.5}}]}],
    }  # fmt: skip
    settings = {"command": "python benchmarks/transfer.py", "pretrain_seeds": 3, "seeds": 2}
    lines = transfer.claims(results, settings, "default", cost).splitlines()
    row = {line.split(" | ")[0].lstrip("| ") + line.split(" | ")[2]: line for line in lines if line.startswith("| ")}
    assert (
        "| 6.0 ± 1.0 vs 3.0 ± 1.0 | +3.0 ± 1.6 | shown | 51.0 / 60.0 vs 51.0 / 60.0 |"
        in row["aMCL, 3 levels vs MCL, 1 level"]
    )
    assert "| 6.0 ± 1.0 vs 4.5 ± 0.4 | +1.5 ± 1.2 | shown |" in row["bMCL, 3 levels vs random init"]
    assert (
        "| 7.0 ± 0.5 vs 7.0 ± 1.0 | +0.0 ± 1.3 | not shown at this scale |"
        in row["csupervised multi-level vs supervised"]
    )
    assert (
        "+1.0 ± 1.3 | consistent at this scale: the gap is within noise (it is not shown to be smaller than 2.3 AP)"
        in (row["dsupervised multi-level vs MCL, 3 levels"])
    )
    # (e) every run's AP75 - AP50 is -11: the gain is the same at both thresholds, so it does not grow.
    assert (
        "| gain at IoU 0.5 -1.0, at 0.75 -1.0 | +0.0 ± 0.0 (gain at 0.75 minus gain at 0.5) | not shown at this scale"
        in (row["eMCL, 3 levels vs supervised (the paper's baseline)"])
    )
    # A deficit at both thresholds that narrows at 0.75 (AP50 = AP + 2 for MCL: gains -9 at 0.5, -1 at 0.75) is no
    # gain that grows, though the per-run AP75 - AP50 differ beyond noise.
    for p in results["MCL, 3 levels"]["pretrainings"]:
        for run in p["runs"]:
            run["val/AP50"] = run["val/AP"] + 2
    narrowing = [
        line for line in transfer.claims(results, settings, "default", cost).splitlines() if "(the paper" in line
    ]
    assert "gain at IoU 0.5 -9.0, at 0.75 -1.0 | +8.0 ± 0.0" in narrowing[0]
    assert "| not shown: no gain at either threshold; the deficit narrows" in narrowing[0]
    assert "r18: backbone images 1.312x, online FLOPs 1.46x, step time 1.50x" in row["f-"]
    assert "shown for the backbone's share" in row["f-"]
    # A pretrained baseline with one pretraining seed has no pretraining spread: never better or worse.
    results["MCL, 1 level"]["pretrainings"] = results["MCL, 1 level"]["pretrainings"][:1]
    assert transfer.versus(results, "MCL, 3 levels", "MCL, 1 level", "AP")["verdict"] == "within noise"
    # A row that did not run is named, and the claim has no verdict.
    del results["supervised"]
    text = transfer.claims(results, settings, "default", None)
    assert "rows ['supervised'] not run" in text and "`make bench` has not run" in text


def test_the_committed_tables_are_what_their_json_gives():
    """``transfer.md`` regenerates from ``transfer.json`` (the run's results and settings) byte for byte: each table
    reads only what the json keeps, and the committed pair comes from one run."""
    transfer = importlib.import_module("benchmarks.transfer")
    results_dir = transfer.ROOT / "results"
    saved = json.loads((results_dir / "transfer.json").read_text())
    rows = saved["rows"]
    ranges = rows[transfer.BASELINE]["pretrainings"][0]["runs"][0]["area_ranges"]
    table = transfer.markdown(rows, saved["settings"], "default", saved["spread"], ranges, saved["minutes"],
                              saved["pixel_probe"])  # fmt: skip
    machine = transfer.machine()
    expected = (results_dir / "transfer.md").read_text()
    assert table.replace(f"on {machine}:", "on 2 CPU cores:") == expected
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| pretraining | kNN top-1"))
    assert header.count("|") - 1 == 14 and "| random init |" in table
    assert len([line for line in lines if line.startswith("| MCL, 3 levels | ")]) == 1 + 1 + 3 + 1 + 1
