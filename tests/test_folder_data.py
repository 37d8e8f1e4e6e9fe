"""Pretraining on a folder of unlabelled images (data=folder): what is found, how every image mode is read, what
happens to unreadable files (in the main process and in DataLoader workers), and a whole run without validation."""

import errno
import io
import json
import logging
import multiprocessing
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from mcl.data import FolderDataModule, MissingDatasetError
from mcl.data.sources import (
    IMAGE_EXTENSIONS,
    UNLABELLED,
    ImageFiles,
    UnlistableFolderError,
    UnreadableImageError,
    decode_image,
    find_images,
)
from mcl.train import train

from .conftest import compose_train

# Readable images of the tree below, in the order a folder source lists them, with their (height, width).
GOOD = {
    "a.jpg": (30, 40),
    "b.png": (24, 24),
    "nested/c.webp": (20, 36),
    "nested/deeper/palette.gif": (16, 16),
    "nested/deeper/palette.png": (16, 16),
    "nested/deeper/photo.BMP": (18, 22),
    "nested/gray.png": (28, 20),
    "nested/rgba.png": (12, 10),
}
# Unreadable ones: a JPEG cut in half, a text file named .jpg, an empty file.
BAD = ("nested/deeper/empty.jpg", "nested/deeper/text.jpg", "nested/deeper/truncated.jpg")


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(48, 48, seed=9)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def write_tree(root: Path, extra_jpegs: int = 0) -> Path:
    """The mixed tree of GOOD and BAD files, a hidden file and folder and a non-image file (both left out), and
    ``extra_jpegs`` more readable JPEGs under ``more/``."""
    (root / "nested" / "deeper").mkdir(parents=True)
    Image.fromarray(noise(30, 40, seed=1)).save(root / "a.jpg", quality=90)
    Image.fromarray(noise(24, 24, seed=2)).save(root / "b.png")
    Image.fromarray(noise(20, 36, seed=3)).save(root / "nested" / "c.webp", lossless=True)
    Image.fromarray(noise(28, 20, channels=1, seed=4), mode="L").save(root / "nested" / "gray.png")
    rgba = noise(12, 10, channels=4, seed=5)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 255, 0, 0)  # fully transparent: composited over black
    Image.fromarray(rgba, mode="RGBA").save(root / "nested" / "rgba.png")
    palette = Image.fromarray(noise(16, 16, seed=6)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(root / "nested" / "deeper" / "palette.gif")
    palette.save(root / "nested" / "deeper" / "palette.png", transparency=0)
    Image.fromarray(noise(18, 22, seed=7)).save(root / "nested" / "deeper" / "photo.BMP")
    (root / "nested" / "deeper" / "truncated.jpg").write_bytes(truncated_jpeg())
    (root / "nested" / "deeper" / "text.jpg").write_text("this is not a JPEG\n")
    (root / "nested" / "deeper" / "empty.jpg").write_bytes(b"")
    Image.fromarray(noise(8, 8)).save(root / ".hidden.png")
    (root / ".cache").mkdir()
    Image.fromarray(noise(8, 8)).save(root / ".cache" / "thumb.png")
    (root / "notes.txt").write_text("not an image\n")
    if extra_jpegs:
        (root / "more").mkdir()
        for index in range(extra_jpegs):
            Image.fromarray(noise(40, 40, seed=100 + index)).save(root / "more" / f"{index:02d}.jpg")
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_tree(tmp_path / "photos")


def relative(files: ImageFiles, root: Path) -> list[str]:
    return [files.path(index).relative_to(root).as_posix() for index in range(len(files))]


def test_a_folder_is_searched_recursively_in_a_fixed_order_without_hidden_files(tree):
    files = ImageFiles.from_root(tree)
    # Each folder's files sorted by name, then its sub-folders, depth first; hidden and .txt files left out.
    assert relative(files, tree) == [
        "a.jpg",
        "b.png",
        "nested/c.webp",
        "nested/gray.png",
        "nested/rgba.png",
        "nested/deeper/empty.jpg",
        "nested/deeper/palette.gif",
        "nested/deeper/palette.png",
        "nested/deeper/photo.BMP",
        "nested/deeper/text.jpg",
        "nested/deeper/truncated.jpg",
    ]
    assert len(files) == len(GOOD) + len(BAD) == 11


def test_every_mode_becomes_uint8_rgb_of_the_image_size(tree):
    for name, (height, width) in GOOD.items():
        image = decode_image(tree / name)
        assert image.dtype == torch.uint8 and image.shape == (3, height, width), name
    gray = decode_image(tree / "nested" / "gray.png")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.equal(gray[0], torch.from_numpy(noise(28, 20, channels=1, seed=4)))
    rgba = decode_image(tree / "nested" / "rgba.png")
    assert rgba[:, 0, 0].tolist() == [255, 0, 0] and rgba[:, 0, 1].tolist() == [0, 0, 0]
    webp = decode_image(tree / "nested" / "c.webp")  # lossless: the exact pixels
    assert torch.equal(webp, torch.from_numpy(noise(20, 36, seed=3)).permute(2, 0, 1))


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert decode_image(tmp_path / "deep.png")[0, 0].tolist() == [0, 1, 128, 255]


def test_items_are_unlabelled_images_and_a_text_list_names_the_files(tree):
    files = ImageFiles.from_root(tree)
    image, label = files[0]
    assert label == UNLABELLED == -1 and image.shape == (3, 30, 40) and image.dtype == torch.uint8
    listing = tree / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(f"# my images\n\n../a.jpg\n  ../nested/gray.png  \n{tree / 'nested' / 'rgba.png'}\n")
    listed = ImageFiles.from_root(listing)
    assert [listed.path(i) for i in range(len(listed))] == [
        listing.parent / "../a.jpg",
        listing.parent / "../nested/gray.png",
        tree / "nested" / "rgba.png",
    ]
    assert [listed[i][0].shape for i in range(3)] == [(3, 30, 40), (3, 28, 20), (3, 12, 10)]


def test_missing_or_empty_roots_say_what_was_looked_for(tmp_path):
    with pytest.raises(MissingDatasetError, match=f"data.root={tmp_path / 'nowhere'} does not exist"):
        ImageFiles.from_root(tmp_path / "nowhere")
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    Image.fromarray(noise(8, 8)).save(tmp_path / "empty" / ".hidden" / "a.png")
    with pytest.raises(MissingDatasetError, match=r"holds no images: looked for \.bmp, \.gif, \.jpeg, \.jpg"):
        ImageFiles.from_root(tmp_path / "empty")
    assert ".webp" in IMAGE_EXTENSIONS
    (tmp_path / "list.txt").write_text("# nothing yet\n\n")
    with pytest.raises(MissingDatasetError, match="names no images"):
        ImageFiles.from_root(tmp_path / "list.txt")
    with pytest.raises(MissingDatasetError, match="does not exist"):
        FolderDataModule(root=str(tmp_path / "nowhere"))


def test_unreadable_files_are_skipped_once_each_and_counted(tree, caplog):
    files = ImageFiles.from_root(tree)
    order = relative(files, tree)
    with caplog.at_level(logging.WARNING, logger="mcl.data.sources"):
        for _ in range(2):  # two epochs: each bad file is logged once
            items = [files[index] for index in range(len(files))]
    assert files.num_unreadable == 3
    assert sorted(order[i] for i in files.unreadable.nonzero().flatten().tolist()) == sorted(BAD)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3
    for name in BAD:
        (line,) = [line for line in lines if str(tree / name) in line]
        assert line.startswith(f"skipping unreadable image {tree / name}: ")
    assert "truncated" in next(line for line in lines if "truncated.jpg" in line)
    # A bad item is the next readable image (empty.jpg -> palette.gif; truncated.jpg, the last, -> a.jpg).
    assert torch.equal(
        items[order.index("nested/deeper/empty.jpg")][0], files[order.index("nested/deeper/palette.gif")][0]
    )
    assert torch.equal(items[order.index("nested/deeper/truncated.jpg")][0], items[0][0])
    assert all(image.shape[0] == 3 and label == -1 for image, label in items)


def test_fail_mode_names_the_file(tree):
    files = ImageFiles.from_root(tree, on_corrupt="fail")
    index = relative(files, tree).index("nested/deeper/text.jpg")
    with pytest.raises(UnreadableImageError, match=f"unreadable image {tree / 'nested/deeper/text.jpg'}: .*on_corrupt"):
        files[index]
    with pytest.raises(ValueError, match="data.on_corrupt='ignore' is invalid"):
        ImageFiles.from_root(tree, on_corrupt="ignore")


def test_no_readable_file_at_all_is_an_error(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "y.png").write_text("no")
    with pytest.raises(MissingDatasetError, match="none of the 2 images of .* can be read"):
        ImageFiles.from_root(tmp_path)[0]


def test_truncated_images_are_refused_to_be_padded(tree, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES is True"):
        ImageFiles.from_root(tree)


def test_dataloader_workers_share_the_skip_flags(tree, tmp_path):
    """Two worker processes, two epochs: the main process counts the files the workers flagged, and each is logged
    once (the workers' log lines go to a file, which forked workers inherit)."""
    files = ImageFiles.from_root(tree)
    log_file = tmp_path / "workers.log"
    handler = logging.FileHandler(log_file)
    logger = logging.getLogger("mcl.data.sources")
    logger.addHandler(handler)
    try:
        loader = DataLoader(
            files,
            batch_size=1,
            num_workers=2,
            persistent_workers=True,
            multiprocessing_context=multiprocessing.get_context("fork"),
        )
        for _ in range(2):
            images = [batch[0] for batch, _ in loader]
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert len(images) == len(files) and all(image.shape[0] == 3 for image in images)
    assert files.num_unreadable == 3
    lines = log_file.read_text().splitlines()
    assert sorted(lines) == sorted(line for line in lines if line.startswith("skipping unreadable image"))
    assert sorted(Path(line.split(" ")[3].rstrip(":")).relative_to(tree).as_posix() for line in lines) == sorted(BAD)


def test_the_datamodule_subsets_the_files_and_reports_their_count(tree, caplog):
    module = FolderDataModule(root=str(tree), image_size=32, batch_size=4, num_workers=0, train_size=6, seed=0)
    module.setup()
    assert not module.has_validation and module.val_dataloader() == []
    assert isinstance(module.train_images, ImageFiles) and len(module.train_images) == 6
    views, labels = next(iter(module.train_dataloader()))
    assert views.shape == (4, 2, 3, 3, 32, 32) and labels.tolist() == [-1] * 4
    for index in range(6):
        module.train_set[index]
    with caplog.at_level(logging.INFO, logger="mcl.data.datamodules"):
        report = module.data_report()
    skipped = module.train_images.num_unreadable
    assert report == {"data/skipped_images": float(skipped), "data/skipped_folders": 0.0}
    assert f"skipped {skipped} unreadable images of 6" in caplog.text


def write_locked_tree(root: Path) -> Path:
    """12 small PNGs: 8 in ``root`` and 4 in ``root/locked``, the sub-folder that the tests make unlistable."""
    (root / "locked").mkdir(parents=True)
    for index in range(12):
        folder = root / "locked" if index >= 8 else root
        Image.fromarray(noise(8, 8, seed=index)).save(folder / f"{index:02d}.png")
    return root


def deny_listing(monkeypatch, *folders: Path) -> None:
    """Make ``os.scandir`` (which ``os.walk`` lists folders with) fail on ``folders`` as it does for a user without
    read permission: the tests run as root, for whom mode 000 stops nothing."""
    real = os.scandir
    denied = {str(folder) for folder in folders}

    def scandir(path="."):
        if os.fspath(path) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unlistable_sub_folder_is_counted_and_reported(tmp_path, monkeypatch, caplog):
    root = write_locked_tree(tmp_path / "photos")
    locked = root / "locked"
    deny_listing(monkeypatch, locked)
    with caplog.at_level(logging.WARNING, logger="mcl.data.sources"):
        files = ImageFiles.from_root(root)
    assert len(files) == 8 and files.unlistable_folders == [(str(locked), "Permission denied")]
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith(f"data.root={root}: 1 folder(s) cannot be listed and are left out")
    assert warning.endswith(f"chmod -R u+rX <folder>, to use them): {locked} (Permission denied)")
    # The subset the datamodule trains on keeps the folders, and the report counts them beside the skipped images.
    module = FolderDataModule(root=str(root), image_size=32, batch_size=4, num_workers=0, train_size=6)
    module.setup()
    assert len(module.train_images) == 6 and module.train_images.unlistable_folders == files.unlistable_folders
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mcl.data.datamodules"):
        report = module.data_report()
    assert report == {"data/skipped_images": 0.0, "data/skipped_folders": 1.0}
    assert caplog.records[-1].getMessage() == (
        f"skipped 0 unreadable images of 6; 1 folder(s) could not be listed: {locked} (Permission denied)"
    )
    # on_corrupt=fail stops, naming the folder; so does find_images without a list to collect them in.
    with pytest.raises(UnlistableFolderError) as refused:
        ImageFiles.from_root(root, on_corrupt="fail")
    assert str(refused.value) == (
        f"data.root={root}: 1 folder(s) cannot be listed, so the images in them cannot be found (8 image(s) found in "
        f"the folders that could be listed): {locked} (Permission denied). Make them readable (e.g. chmod -R u+rX "
        "<folder>) or move them out of data.root, or set data.on_corrupt=skip to train without them"
    )
    with pytest.raises(UnlistableFolderError, match=rf"1 folder\(s\) under {root} cannot be listed.*{locked}"):
        find_images(root)


def test_many_unlistable_folders_are_named_up_to_five_and_an_unlistable_root_is_an_error(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    for index in range(7):
        (root / f"f{index}").mkdir(parents=True)
        Image.fromarray(noise(8, 8)).save(root / f"f{index}" / "a.png")
    Image.fromarray(noise(8, 8)).save(root / "top.png")
    deny_listing(monkeypatch, *(root / f"f{index}" for index in range(7)))
    files = ImageFiles.from_root(root)
    assert len(files) == 1 and len(files.unlistable_folders) == 7
    module = FolderDataModule(root=str(root), image_size=32, batch_size=1, num_workers=0)
    module.setup()
    assert module.data_report()["data/skipped_folders"] == 7.0
    with pytest.raises(UnlistableFolderError, match=r"f4 \(Permission denied\) and 2 more\. Make them"):
        ImageFiles.from_root(root, on_corrupt="fail")
    deny_listing(monkeypatch, root)  # the root itself: nothing can be found, whatever on_corrupt says
    with pytest.raises(
        UnlistableFolderError, match=rf"\(0 image\(s\) found.*\): {root} \(Permission denied\)\. .*data.root$"
    ):
        ImageFiles.from_root(root, on_corrupt="skip")


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists folders of any mode")
def test_a_folder_of_mode_000_is_reported(tmp_path):
    root = write_locked_tree(tmp_path / "photos")
    (root / "locked").chmod(0)
    try:
        files = ImageFiles.from_root(root)
    finally:
        (root / "locked").chmod(0o755)
    assert len(files) == 8 and files.unlistable_folders == [(str(root / "locked"), "Permission denied")]


def test_a_training_set_without_one_readable_image_says_so_at_set_up(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    for index in range(3):
        (root / f"{index}.jpg").write_text("not a JPEG\n")
    module = FolderDataModule(root=str(root), image_size=32, batch_size=8, num_workers=0)
    with pytest.raises(MissingDatasetError) as refused:
        module.setup()
    message = str(refused.value)
    assert message.startswith(
        f"no readable image in {root}: 3 file(s) tried, none could be decoded, e.g. {root / '0.jpg'}: "
    )
    assert message.count("cannot identify image file") == 3 and "batch size would not help" in message
    # With a readable image among them, the batch size is what is wrong, and the message says so.
    Image.fromarray(noise(8, 8)).save(root / "9.png")
    with pytest.raises(ValueError, match="the training set has 4 images, fewer than data.batch_size=8: lower"):
        FolderDataModule(root=str(root), image_size=32, batch_size=8, num_workers=0).setup()


def test_the_readability_check_goes_past_a_broken_start(tmp_path, monkeypatch):
    """Nine broken files, then one good one: the eight files spread over the set all fail, the others are tried in
    order until the good one reads, and set-up goes on; each file is decoded once at most."""
    root = tmp_path / "mostly_broken"
    root.mkdir()
    for index in range(9):
        (root / f"{index}.jpg").write_bytes(b"")
    Image.fromarray(noise(8, 8)).save(root / "9.png")
    files = ImageFiles.from_root(root)
    decoded = []
    real = decode_image

    def counting(path):
        decoded.append(Path(path).name)
        return real(path)

    monkeypatch.setattr("mcl.data.sources.decode_image", counting)
    files.check_readable()
    assert decoded[:8] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "5.jpg", "6.jpg", "7.jpg", "8.jpg"]
    assert decoded[8:] == ["4.jpg", "9.png"] and files.num_unreadable == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"view_mode": "supervised"}, "data=folder has no labels"),
        ({"knn_bank_dir": "x"}, "set both"),
        ({"on_corrupt": "warn"}, "data.on_corrupt='warn' is invalid"),
    ],
)
def test_bad_folder_settings_name_the_key(tree, kwargs, message):
    with pytest.raises(ValueError, match=message):
        FolderDataModule(root=str(tree), **kwargs)


def test_the_folder_config_composes_with_the_default_recipe_and_presets(tree):
    cfg = compose_train(["data=folder", f"data.root={tree}", "preset=official"])
    assert cfg.data.train_size == 5760 and cfg.levels == 4 and cfg.data.views_per_side == 4
    assert cfg.optimized_metric is None and cfg.validate_at_init is False
    assert cfg.callbacks.checkpoint.monitor is None and cfg.callbacks.checkpoint.save_top_k == 0
    labelled = compose_train(
        ["data=folder", f"data.root={tree}", f"data.knn_bank_dir={tree}", f"data.knn_val_dir={tree}"]
    )
    assert labelled.optimized_metric == "val/knn_top1" and labelled.validate_at_init is True
    assert labelled.callbacks.checkpoint.monitor == "val/knn_top1" and labelled.callbacks.checkpoint.save_top_k == 1
    assert compose_train([]).callbacks.checkpoint.get("save_top_k") is None  # the other sources are untouched


FOLDER_RUN = [
    "data=folder",
    "batch_size=8",
    "image_size=32",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "neck.out_channels=16",
]
SMALL_MCL = ["method.projector_hidden_dim=32", "method.embedding_dim=16"]


def test_supervised_pretraining_on_a_folder_is_refused(tree, tmp_path):
    cfg = compose_train([*FOLDER_RUN, f"data.root={tree}", "method=supervised"], output_dir=tmp_path / "run")
    with pytest.raises(Exception, match="data=folder has no labels"):
        train(cfg)


@pytest.mark.parametrize("override", ["validate_at_init=true", "optimized_metric=val/knn_top1"])
def test_validation_settings_without_validation_data_are_refused(tree, tmp_path, override):
    cfg = compose_train([*FOLDER_RUN, *SMALL_MCL, f"data.root={tree}", override], output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=f"{override}.*: these need validation metrics.*data.knn_bank_dir"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder was touched


@pytest.mark.slow
def test_pretraining_on_a_folder_writes_last_checkpoint_and_the_skip_count(tmp_path, caplog):
    root = write_tree(tmp_path / "photos", extra_jpegs=13)  # 21 readable images and 3 unreadable ones
    overrides = [*FOLDER_RUN, *SMALL_MCL, f"data.root={root}", "data.num_workers=2"]  # the flags of 2 workers
    cfg = compose_train(overrides, output_dir=tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        metrics = train(cfg)
    run = Path(cfg.output_dir)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    assert np.isfinite(saved["train/loss"]) and saved["data/skipped_images"] == 3
    assert not [key for key in saved if key.startswith(("val/", "init/"))]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3  # 24 images / 8
    # No validation warnings: neither Lightning's nor the checkpoint callback's.
    messages = [str(w.message) for w in caught] + [record.getMessage() for record in caplog.records]
    storm = ("monitored key", "val_dataloader", "validation_step", "val loop", "across ranks is zero")
    assert not [m for m in messages if any(word in m for word in storm)], messages
    assert "skipped 3 unreadable images of 24" in caplog.text


def write_labelled_tree(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    """An ImageFolder-style tree: one flat colour per class with a little noise."""
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = np.clip(noise(32, 32, seed=10 * label + index) // 8 + 200 * label, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.mark.slow
def test_labelled_knn_folders_bring_validation_back(tmp_path):
    root = write_tree(tmp_path / "photos", extra_jpegs=5)  # 13 readable images: one batch of 8
    labelled = write_labelled_tree(tmp_path / "labelled")
    overrides = [*FOLDER_RUN, *SMALL_MCL, f"data.root={root}", "data.num_workers=0"]
    overrides += [f"data.knn_bank_dir={labelled}", f"data.knn_val_dir={labelled}", "logger=none"]
    cfg = compose_train(overrides, output_dir=tmp_path / "run")
    metrics = train(cfg)
    assert 0 <= metrics["init/knn_top1"] <= 100 and 0 <= metrics["val/knn_top1"] <= 100
    names = sorted(p.name for p in (Path(cfg.output_dir) / "checkpoints").iterdir())
    assert names[-1] == "last.ckpt" and names[0].startswith("epoch000-knn")  # the best by val/knn_top1, as today


def test_images_of_mixed_sizes_become_device_views(tree):
    # Every readable image of the tree (sizes 12 x 10 to 30 x 40, gray, RGBA, palette) in one padded batch; the
    # shrink limit (24 px) applies to the larger ones in the worker, the views are made after the "transfer".
    module = FolderDataModule(
        root=str(tree), image_size=32, batch_size=8, num_workers=0, augment_on="device", source_max_side=24, seed=0
    )
    module.setup()
    batch = next(iter(module.train_dataloader()))
    assert batch.images.dtype == torch.uint8 and batch.sizes.max() <= 24
    assert batch.images.shape[-2:] == tuple(batch.sizes.max(0).values.tolist())
    assert len({tuple(size) for size in batch.sizes.tolist()}) > 1  # sizes differ within the batch
    views, labels = module.on_after_batch_transfer(batch, 0)
    assert views.shape == (8, 2, 3, 3, 32, 32) and torch.isfinite(views).all() and labels.tolist() == [-1] * 8
