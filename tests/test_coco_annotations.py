"""COCO annotation files of detection fine-tuning: a missing, malformed or foreign file is named with what is wrong,
on every path that reads one (mcl-finetune's training and validation files, split_annotations, the object probe),
and mcl-finetune checks what it resumes from before it builds anything."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from mcl.checkpoints import CheckpointKindError
from mcl.data.sources import MissingDatasetError
from mcl.detection.coco import AnnotationFileError, CocoDetection, quiet_coco, read_annotation_file, split_annotations
from mcl.detection.finetune import finetune, num_classes_of
from mcl.detection.probe import read_objects
from mcl.runtime import CONFIG_DIR


def write_coco_set(root: Path) -> Path:
    """A valid COCO-format set of one 16 x 16 image with one box in each split: ``root/{train,val}/a.png`` and
    ``root/annotations/{train,val}.json``."""
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / split).mkdir()
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(root / split / "a.png")
        coco = {
            "images": [{"id": 1, "file_name": "a.png", "height": 16, "width": 16}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [2, 2, 8, 8], "area": 64, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
        }
        (root / "annotations" / f"{split}.json").write_text(json.dumps(coco))
    return root


def finetune_cfg(root: Path, output: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("finetune", [f"data.root={root}", "data.num_workers=0", "logger=none", *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(output)
    return cfg


def test_a_malformed_file_is_named_with_where_parsing_stopped(tmp_path):
    broken = tmp_path / "train.json"
    broken.write_text('{"images": [\n  {"id": 1,\n')
    message = (
        f"{broken} is not a COCO annotation file: its JSON breaks off or is malformed at line 3, column 1 (Expecting "
        "property name enclosed in double quotes); rewrite the file (e.g. regenerate it) or point to another one"
    )
    for read in (read_annotation_file, quiet_coco, num_classes_of):
        with pytest.raises(AnnotationFileError) as refused:
            read(broken)
        assert str(refused.value) == message, read
    with pytest.raises(AnnotationFileError, match=f"^{broken} is not a COCO annotation file: its JSON breaks off"):
        split_annotations(broken, 0.5, tmp_path / "split")
    with pytest.raises(AnnotationFileError, match=f"^{broken} is not a COCO annotation file: its JSON breaks off"):
        read_objects(tmp_path, broken, [0.5] * 3, [0.5] * 3)
    assert issubclass(AnnotationFileError, ValueError)


def test_json_of_another_shape_is_named_with_what_it_lacks(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("[1, 2]")
    with pytest.raises(AnnotationFileError, match=r"a.json is not a COCO annotation file: it holds a JSON list, not"):
        quiet_coco(path)
    path.write_text('{"info": {}, "images": []}')
    with pytest.raises(AnnotationFileError, match=r"it has no 'annotations' list \(its top-level keys: info, images\)"):
        split_annotations(path, 0.5, tmp_path)
    path.write_text('{"images": [], "categories": []}')
    with pytest.raises(AnnotationFileError, match=r"a.json lists no categories, .* set model.num_classes"):
        num_classes_of(path)
    path.write_text('{"images": [{"file_name": "x.png"}]}')
    with pytest.raises(AnnotationFileError, match=r"an image, annotation or category lacks a field .*KeyError: 'id'"):
        quiet_coco(path)
    path.write_text('{"images": [{"id": 1}], "annotations": []}')
    (tmp_path / "images").mkdir()
    with pytest.raises(
        AnnotationFileError, match=r"a.json is not a COCO annotation file: an image lacks its file_name"
    ):
        CocoDetection(tmp_path / "images", path)


def test_a_missing_file_names_what_its_folder_holds(tmp_path):
    with pytest.raises(MissingDatasetError) as refused:
        read_annotation_file(tmp_path / "annotations" / "train.json")
    assert str(refused.value) == (
        f"COCO annotation file {tmp_path / 'annotations' / 'train.json'} does not exist: "
        f"{tmp_path / 'annotations'} does not exist"
    )
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(MissingDatasetError, match=r"annotations holds instances_train2017.json$"):
        quiet_coco(tmp_path / "annotations" / "train.json")


def test_finetune_names_missing_annotation_files_the_folder_and_the_layout(tmp_path):
    root = tmp_path / "dataset"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val.json").write_text("{}")
    with pytest.raises(MissingDatasetError) as refused:
        finetune(finetune_cfg(root, tmp_path / "run"))
    assert str(refused.value) == (
        f"COCO annotation file(s) not found: data.train_annotations={root}/annotations/train.json, "
        f"data.val_annotations={root}/annotations/val.json. Looked in: {root}/annotations holds instances_val.json. "
        f"mcl-finetune expects data.root (now {root}) to hold train/, val/ and annotations/train.json and "
        "annotations/val.json; point data.root at such a dataset, or set data.train_annotations and "
        "data.val_annotations to your files"
    )
    with pytest.raises(MissingDatasetError, match=rf"Looked in: {tmp_path}/nowhere/annotations does not exist\."):
        finetune(finetune_cfg(tmp_path / "nowhere", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_finetune_names_a_malformed_annotation_file(tmp_path, split):
    root = write_coco_set(tmp_path / "dataset")
    broken = root / "annotations" / f"{split}.json"
    broken.write_text(broken.read_text()[:40])
    with pytest.raises(AnnotationFileError, match=f"^{broken} is not a COCO annotation file: its JSON breaks off"):
        finetune(finetune_cfg(root, tmp_path / "run"))
    # The intact set reads, with categories 1 and 2: three outputs with the background.
    write_coco_set(tmp_path / "intact")
    assert num_classes_of(tmp_path / "intact" / "annotations" / "train.json") == 3
    assert len(CocoDetection(tmp_path / "intact" / "train", tmp_path / "intact" / "annotations" / "train.json")) == 1


def test_finetune_refuses_to_resume_from_a_pretraining_checkpoint(tmp_path):
    pretraining = tmp_path / "last.ckpt"
    state = {"backbone.model.conv1.weight": torch.zeros(1), "neck.inner_blocks.0.0.weight": torch.zeros(1)}
    torch.save({"state_dict": state, "hyper_parameters": {"backbone": {"name": "resnet18"}}}, pretraining)
    cfg = finetune_cfg(tmp_path / "nowhere", tmp_path / "run", f"ckpt_path={pretraining}")
    with pytest.raises(
        CheckpointKindError,
        match=r"last.ckpt is a pretraining checkpoint \(written by mcl-train\), "
        r"not a detector checkpoint: mcl-finetune ckpt_path=\.\.\. resumes fine-tuning",
    ):
        finetune(cfg)
