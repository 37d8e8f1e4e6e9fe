"""Raw image sources: each item is ``(uint8 (3, H, W) tensor, int label)``; views are made by the datamodule."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2 import functional as TF

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class MissingDatasetError(FileNotFoundError):
    """A dataset that is not where the configuration says, with how to get it."""


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes, as used by MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file: it is {len(data)} bytes long")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {payload.size} values")
    return payload.reshape(shape)


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_ROOT, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of one Fashion-MNIST split ("train" or "test")."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split={split!r} is invalid: use 'train' or 'test'")
    root = Path(root)
    paths = [root / name for name in FASHION_MNIST_FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MissingDatasetError(
            f"Fashion-MNIST is missing: {', '.join(missing)} not found. Install the Debian package with "
            "'sudo apt-get install dataset-fashion-mnist' (or run 'make data'), or point data.root at a folder "
            "holding the four *-ubyte.gz files."
        )
    images, labels = (read_idx(p) for p in paths)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels under {root}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class TensorImages(Dataset):
    """In-memory uint8 images ``(N, H, W)`` or ``(N, C, H, W)``; grayscale is repeated to 3 channels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images if images.ndim == 4 else images.unsqueeze(1)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image, int(self.labels[index])


def read_rgb(path: str) -> Image.Image:
    """Open an image as RGB, naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise OSError(f"unreadable image {path}: {error}") from error


class ImageFolderImages(Dataset):
    """An ImageFolder-style tree (``root/<class>/<image>``), e.g. ImageNet's train and val folders."""

    def __init__(self, root: str | Path, loader: Callable[[str], Image.Image] = read_rgb):
        root = Path(root)
        if not root.is_dir():
            raise MissingDatasetError(f"image folder {root} does not exist; set data.train_dir / data.val_dir")
        try:
            self.folder = ImageFolder(str(root), loader=loader)
        except FileNotFoundError as error:
            raise MissingDatasetError(f"image folder {root} holds no images in class sub-folders: {error}") from error
        self.labels = torch.tensor(self.folder.targets)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.folder[index]
        return TF.pil_to_tensor(image), label


def synthetic_images(
    num_images: int, num_classes: int = 4, image_size: int = 32, seed: int = 0, noise_seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-structured random images for tests: each class is a coarse colour pattern, each image adds noise.

    ``seed`` fixes the class patterns and ``noise_seed`` the noise, so splits with one ``seed`` and different
    ``noise_seed`` share their classes. Returns uint8 images ``(N, 3, image_size, image_size)`` and labels ``(N,)``
    (cycling through the classes).
    """
    patterns = torch.rand(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(noise_seed)
    patterns = torch.nn.functional.interpolate(patterns, size=(image_size, image_size), mode="bilinear")
    labels = torch.arange(num_images) % num_classes
    noise = 0.25 * torch.randn(num_images, 3, image_size, image_size, generator=generator)
    images = (patterns[labels] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
    return images, labels
