"""Raw sources and datamodules: split sizes, batch layouts, reproducible orders and the checks on bad settings."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcl.data import MissingDatasetError, SyntheticDataModule
from mcl.data.datamodules import EpochShuffle, fixed_subset
from mcl.data.sources import (
    FASHION_MNIST_ROOT,
    ImageFolderImages,
    TensorImages,
    load_fashion_mnist,
    read_idx,
    synthetic_images,
)


def synthetic(**kwargs) -> SyntheticDataModule:
    """A small synthetic datamodule: 40 training (and bank) images, 20 validation images, 32 px."""
    settings = {"num_train": 40, "num_val": 20, "image_size": 32, "batch_size": 8, "num_workers": 0}
    return SyntheticDataModule(**{**settings, **kwargs})


def test_subsets_set_the_split_sizes_and_the_loaders_batch_them():
    module = synthetic(train_size=30, bank_size=12, val_size=10, eval_batch_size=5, views_per_side=2)
    module.setup()
    assert (len(module.train_set), len(module.bank_set), len(module.val_set)) == (30, 12, 10)
    train, (bank, val) = module.train_dataloader(), module.val_dataloader()
    assert len(train) == 3  # 30 // 8: the last, incomplete batch is dropped
    assert (len(bank), len(val)) == (3, 2)  # 12 / 5 and 10 / 5 rounded up: every image is scored
    views, labels = next(iter(train))
    assert views.shape == (8, 2, 2, 3, 32, 32) and labels.shape == (8,)  # (B, sides, views per side, C, H, W)
    images, labels = next(iter(val))
    assert images.shape == (5, 3, 32, 32)
    assert labels.tolist() == [module.val_set[index][1] for index in range(5)]  # in order, not shuffled


def test_without_subsets_every_image_is_used():
    module = synthetic(train_size=None, bank_size=None, val_size=None)
    module.setup()
    assert (len(module.train_set), len(module.bank_set), len(module.val_set)) == (40, 40, 20)


def test_supervised_views_have_no_sides():
    module = synthetic(view_mode="supervised", views_per_side=3)
    module.setup()
    views, _ = next(iter(module.train_dataloader()))
    assert views.shape == (8, 3, 3, 32, 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"view_mode": "simclr"}, "data.view_mode='simclr' is invalid"),
        ({"batch_size": 0}, "data.batch_size=0 is invalid"),
    ],
)
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic(**kwargs)


def test_a_training_set_smaller_than_a_batch_is_rejected():
    with pytest.raises(ValueError, match="the training set has 30 images, fewer than data.batch_size=32"):
        synthetic(train_size=30, batch_size=32).setup()


def test_an_empty_split_names_the_split():
    with pytest.raises(MissingDatasetError, match="the validation set of SyntheticDataModule is empty"):
        synthetic(num_val=0).setup()
    with pytest.raises(ValueError, match="a subset size of 0 is invalid"):
        synthetic(bank_size=0).setup()


def test_fixed_subsets_are_sorted_and_depend_on_the_seed_only():
    dataset = list(range(100))
    first = fixed_subset(dataset, 10, seed=3)
    assert list(first.indices) == sorted(first.indices) and len(set(first.indices)) == 10
    assert first.indices == fixed_subset(dataset, 10, seed=3).indices
    assert first.indices != fixed_subset(dataset, 10, seed=4).indices
    assert fixed_subset(dataset, None, seed=3) is dataset and fixed_subset(dataset, 100, seed=3) is dataset


def test_epoch_shuffle_is_a_function_of_seed_and_epoch():
    dataset = list(range(50))
    sampler = EpochShuffle(dataset, seed=7)
    first = list(sampler)
    assert sorted(first) == dataset and len(sampler) == 50
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    resumed = EpochShuffle(dataset, seed=7)
    resumed.set_epoch(1)
    assert list(resumed) == second
    # Starting the epoch also seeded the global RNG, for augmentations drawn in the main process.
    drawn = torch.rand(3)
    torch.manual_seed(7 * 1_000_003 + 1 + 1)
    assert torch.equal(drawn, torch.rand(3))


def write_idx(path: Path, array: np.ndarray, declared_shape=None) -> None:
    shape = declared_shape or array.shape
    header = struct.pack(">HBB", 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_are_read_exactly_and_bad_ones_are_named(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "good.gz", array)
    assert np.array_equal(read_idx(tmp_path / "good.gz"), array)
    write_idx(tmp_path / "short.gz", array, declared_shape=(3, 3, 4))
    with pytest.raises(ValueError, match=r"short.gz is truncated: header says \(3, 3, 4\), found 24 values"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="tiny is not an IDX file"):
        read_idx(tmp_path / "tiny")


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path):
    with pytest.raises(MissingDatasetError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, "test")
    with pytest.raises(ValueError, match="split='val' is invalid"):
        load_fashion_mnist(tmp_path, "val")


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_test_split():
    images, labels = load_fashion_mnist(split="test")
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [1000] * 10


def test_tensor_images_repeat_grayscale_to_three_channels():
    images = torch.arange(2 * 4 * 4, dtype=torch.uint8).view(2, 4, 4)
    dataset = TensorImages(images, torch.tensor([5, 6]))
    image, label = dataset[1]
    assert image.shape == (3, 4, 4) and label == 6 and isinstance(label, int)
    assert all(torch.equal(channel, images[1]) for channel in image)
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        TensorImages(images, torch.tensor([0, 1, 2]))


def test_image_folders_give_uint8_images_and_class_labels(tmp_path):
    for label, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        (tmp_path / f"class{label}").mkdir()
        Image.new("RGB", (6, 4), colour).save(tmp_path / f"class{label}" / "a.png")
    dataset = ImageFolderImages(tmp_path)
    assert len(dataset) == 2 and dataset.labels.tolist() == [0, 1]
    image, label = dataset[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 6) and label == 1
    assert image[:, 0, 0].tolist() == [0, 0, 255]
    with pytest.raises(MissingDatasetError, match=f"image folder {tmp_path / 'nowhere'} does not exist"):
        ImageFolderImages(tmp_path / "nowhere")


def test_synthetic_splits_share_their_class_patterns():
    train, train_labels = synthetic_images(40, num_classes=4, image_size=16, seed=0, noise_seed=0)
    val, val_labels = synthetic_images(40, num_classes=4, image_size=16, seed=0, noise_seed=1)
    assert train.shape == (40, 3, 16, 16) and train.dtype == torch.uint8
    assert train_labels.tolist() == val_labels.tolist() == [0, 1, 2, 3] * 10
    assert not torch.equal(train, val)
    # The class means of the two splits agree far better than those of different classes.
    means = [
        torch.stack([x[labels == c].float().mean(0) for c in range(4)])
        for x, labels in ((train, train_labels), (val, val_labels))
    ]
    distance = torch.cdist(means[0].flatten(1), means[1].flatten(1))
    assert distance.argmin(1).tolist() == [0, 1, 2, 3]
