"""Raw image sources: each item is ``(uint8 (3, H, W) tensor, int label)``; views are made by the datamodule.
Unlabelled sources (:class:`ImageFiles`) give the label ``UNLABELLED`` (-1).
"""

from __future__ import annotations

import gzip
import itertools
import logging
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
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


log = logging.getLogger(__name__)


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


# Unlabelled images: the label of every item of an ImageFiles source.
UNLABELLED = -1
# What a folder source picks up (compared in lower case): the common formats Pillow reads.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# data.on_corrupt: skip an unreadable file (logged once, the next readable image takes its place) or stop on it.
ON_CORRUPT = ("skip", "fail")
# What decoding a damaged or foreign file raises in Pillow: unknown format and I/O errors (UnidentifiedImageError and
# "image file is truncated" are OSErrors), bad headers or chunks (SyntaxError, ValueError, struct.error, EOFError)
# and images too large to be safe (DecompressionBombError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class UnreadableImageError(OSError):
    """An image file that cannot be decoded; the message names the file and the cause."""


def check_truncated_images_raise() -> None:
    """Refuse to read when ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is on: Pillow would then fill the missing part of
    a truncated file with grey instead of raising, and such files would be trained on instead of skipped."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by this program or a library it imported): truncated "
            "images would be padded with grey instead of being reported. Set it back to False before reading images."
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a Pillow image of any mode.

    Transparent images (RGBA, LA, PA, or a palette with a transparent colour) are composited over black, so
    transparent pixels are black whatever colour the file stores under them. 16-bit grayscale is scaled to 8 bits
    (``value * 255 / 65535``) rather than clipped. Modes without a defined 8-bit range (float ``F``, 32-bit ``I``
    with values beyond 16 bits) raise ``ValueError``.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"mode {image.mode} with values {values.min()}..{values.max()} has no defined 8-bit range")
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    elif image.mode == "F":
        raise ValueError("floating-point (mode F) images have no defined 8-bit range; convert the file to 8 bits")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_image(path: str | Path) -> torch.Tensor:
    """The image file ``path`` as a uint8 ``(3, H, W)`` tensor, upright by its EXIF orientation and converted with
    :func:`to_rgb`; :class:`UnreadableImageError` names the file when it cannot be decoded whole."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: Image.open reads the header only, and a truncated body raises here
            return TF.pil_to_tensor(to_rgb(ImageOps.exif_transpose(image)))
    except DECODE_ERRORS as error:
        cause = str(error) or type(error).__name__
        raise UnreadableImageError(f"unreadable image {path}: {cause}") from error


class UnlistableFolderError(OSError):
    """Folders under a data root that cannot be listed (no read or search permission, an I/O error), so the images
    in them cannot be found; the message names them and the cause."""


# Unlistable folders named in a message; the others are counted.
FOLDERS_NAMED = 5
# ImageFiles.check_readable: files tried, spread over the source, before the others; failures named in its message.
READABLE_SAMPLE = 8
FAILURES_NAMED = 3


def describe_folders(folders: Sequence[tuple[str | Path, str]]) -> str:
    """``folder (cause), ...`` for the first :data:`FOLDERS_NAMED` of ``(folder, cause)`` pairs, and how many more."""
    named = ", ".join(f"{folder} ({cause})" for folder, cause in folders[:FOLDERS_NAMED])
    more = len(folders) - FOLDERS_NAMED
    return named + (f" and {more} more" if more > 0 else "")


def find_images(
    root: str | Path,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    unlistable: list[tuple[Path, str]] | None = None,
) -> list[Path]:
    """The image files under the folder ``root``, in every sub-folder, in a fixed order: each folder's files sorted by
    name, then its sub-folders in name order (depth first).

    A file counts when its extension, in lower case, is one of ``extensions``. Names starting with ``.`` (hidden
    files and folders, macOS ``._*`` files) are left out. Linked folders are followed, each real folder once.

    A folder that cannot be listed (``root`` or any sub-folder: no read or search permission, an I/O error) cannot
    be searched. ``os.walk`` would pass over it in silence; here its ``(folder, cause)`` is appended to
    ``unlistable`` when a list is given (the search goes on with the other folders), and without one
    :class:`UnlistableFolderError` names every such folder once the search is over.
    """
    root = Path(root)
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    failed: list[tuple[Path, str]] = []

    def record(error: OSError) -> None:  # os.walk's onerror: a folder it could not list
        folder = Path(error.filename) if error.filename is not None else root
        failed.append((folder, error.strerror or str(error)))

    for folder, subfolders, files in os.walk(root, onerror=record, followlinks=True):
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in seen:  # a link back to a folder already searched
            subfolders.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found += [
            Path(folder, name)
            for name in sorted(files)
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions
        ]
    if unlistable is not None:
        unlistable += failed
    elif failed:
        raise UnlistableFolderError(
            f"{len(failed)} folder(s) under {root} cannot be listed, so the images in them cannot be found: "
            f"{describe_folders(failed)}. Make them readable (e.g. chmod -R u+rX <folder>) or move them out of {root}"
        )
    return found


def read_image_list(path: str | Path) -> list[Path]:
    """The image paths listed in the text file ``path``, one per line, in file order.

    Surrounding whitespace is removed; blank lines and lines starting with ``#`` are ignored. Relative paths are
    relative to the folder holding the list file, and ``~`` is expanded. Listed files are not opened here: a missing
    one is reported when it is read, like any unreadable file.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise MissingDatasetError(
            f"data.root={path} is a file but not a UTF-8 text list of image paths ({error}): point data.root at a "
            "folder of images, or at a text file with one image path per line"
        ) from error
    entries = (line.strip() for line in lines)
    return [path.parent / Path(entry).expanduser() for entry in entries if entry and not entry.startswith("#")]


class ImageFiles(Dataset):
    """Unlabelled image files: items are ``(uint8 (3, H, W) tensor, UNLABELLED)``; images keep their own sizes.

    Build one with :meth:`from_root` (a folder searched recursively, or a text list of paths). Paths are held as one
    byte buffer with offsets rather than a list of Python strings, so DataLoader worker processes do not copy them
    bit by bit as they touch them (reference counts write to every object a forked worker reads).

    An unreadable file (truncated, not an image, empty, missing) is handled by ``on_corrupt``:

    - ``"fail"``: :class:`UnreadableImageError` naming the file.
    - ``"skip"``: the item is the next readable image in order (wrapping around to the first), so batches keep their
      size and an epoch its length; the file is flagged in :attr:`unreadable`, a bool ``(N,)`` tensor in shared
      memory that DataLoader workers (forked or spawned) share with the main process, so it is logged once (one
      warning line naming the file and the error) across workers and epochs, never read again, and counted by
      :attr:`num_unreadable` in the main process. Two workers that read the same bad file at the very same time may
      both log it. When no file can be read at all, :class:`MissingDatasetError` is raised.

    :meth:`from_root` handles a sub-folder that cannot be listed (permissions) by the same setting: ``"fail"`` stops
    with :class:`UnlistableFolderError` naming it, ``"skip"`` warns once and keeps its ``(folder, cause)`` in
    :attr:`unlistable_folders`, for the data report. :meth:`check_readable` stops before training when no file reads.
    """

    def __init__(
        self,
        paths: Iterable[str | Path],
        on_corrupt: str = "skip",
        source: str = "the image list",
        unlistable_folders: Sequence[tuple[str | Path, str]] = (),
    ):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"data.on_corrupt={on_corrupt!r} is invalid: use one of {ON_CORRUPT}")
        check_truncated_images_raise()
        encoded = [os.fsencode(path) for path in paths]
        self.offsets = np.cumsum([0, *(len(name) for name in encoded)], dtype=np.int64)
        self.names = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.on_corrupt = on_corrupt
        self.source = source
        self.unreadable = torch.zeros(len(encoded), dtype=torch.bool).share_memory_()
        # Folders under the root that could not be listed (on_corrupt=skip), as (folder, cause): their images are not
        # among the paths, and the data report counts them.
        self.unlistable_folders = [(str(folder), cause) for folder, cause in unlistable_folders]

    @classmethod
    def from_root(cls, root: str | Path, on_corrupt: str = "skip") -> ImageFiles:
        """Every image under the folder ``root`` (:func:`find_images`), or every path listed in the text file
        ``root`` (:func:`read_image_list`); :class:`MissingDatasetError` when it does not exist or names none.

        Sub-folders that cannot be listed: with ``on_corrupt="fail"`` an :class:`UnlistableFolderError` naming them;
        with ``"skip"`` one warning naming them (and their count), and the images found elsewhere are used. A root
        that cannot be listed at all is an error either way."""
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"data.on_corrupt={on_corrupt!r} is invalid: use one of {ON_CORRUPT}")
        root = Path(root).expanduser()
        if root.is_dir():
            unlistable: list[tuple[Path, str]] = []
            paths = find_images(root, unlistable=unlistable)
            if unlistable and (on_corrupt == "fail" or not paths):
                found = f"{len(paths)} image(s) found in the folders that could be listed"
                skip = "" if not paths else ", or set data.on_corrupt=skip to train without them"
                raise UnlistableFolderError(
                    f"data.root={root}: {len(unlistable)} folder(s) cannot be listed, so the images in them cannot be "
                    f"found ({found}): {describe_folders(unlistable)}. Make them readable (e.g. chmod -R u+rX "
                    f"<folder>) or move them out of data.root{skip}"
                )
            if unlistable:
                log.warning(
                    "data.root=%s: %d folder(s) cannot be listed and are left out, with the images in them "
                    "(data.on_corrupt=skip; make them readable, e.g. chmod -R u+rX <folder>, to use them): %s",
                    root,
                    len(unlistable),
                    describe_folders(unlistable),
                )
            if not paths:
                raise MissingDatasetError(
                    f"{root} holds no images: looked for {', '.join(IMAGE_EXTENSIONS)} files (in any case) in it and "
                    "its sub-folders, leaving out hidden ones (names starting with '.'). Point data.root at a folder "
                    "of images, or list the files in a text file and point data.root at it"
                )
            return cls(paths, on_corrupt, source=str(root), unlistable_folders=unlistable)
        if root.is_file():
            paths = read_image_list(root)
            if not paths:
                raise MissingDatasetError(
                    f"the image list {root} names no images: write one path per line (relative to its folder; blank "
                    "lines and lines starting with # are ignored)"
                )
            return cls(paths, on_corrupt, source=str(root))
        raise MissingDatasetError(
            f"data.root={root} does not exist: point it at a folder of images or at a text file listing image paths"
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def path(self, index: int) -> Path:
        start, end = self.offsets[index], self.offsets[index + 1]
        return Path(os.fsdecode(self.names[start:end].tobytes()))

    def select(self, indices: Sequence[int]) -> ImageFiles:
        """A source of the files at ``indices`` only (with flags of its own), e.g. a fixed training subset."""
        return ImageFiles((self.path(i) for i in indices), self.on_corrupt, self.source, self.unlistable_folders)

    @property
    def num_unreadable(self) -> int:
        """Files found unreadable so far, by this process and its DataLoader workers."""
        return int(self.unreadable.sum())

    def check_readable(self, sample: int = READABLE_SAMPLE) -> None:
        """Stop at set-up, rather than in the first batch, when not one file can be read.

        Decodes up to ``sample`` files spread evenly over the source; the first that reads ends the check (usually
        the first one tried). Only when all of them fail are the other files tried, in order, until one reads. When
        none does, :class:`MissingDatasetError` says so with the number of files tried and the first causes. Files
        found unreadable here are neither flagged nor logged: reading them during training does that.
        """
        size = len(self)
        spread = sorted({index * size // min(sample, size) for index in range(min(sample, size))})
        tried = set(spread)
        rest = (index for index in range(size) if index not in tried)
        failures: list[str] = []
        for index in itertools.chain(spread, rest):
            try:
                decode_image(self.path(index))
            except UnreadableImageError as error:
                failures.append(str(error).removeprefix("unreadable image "))
                continue
            return
        if not failures:
            return
        raise MissingDatasetError(
            f"no readable image in {self.source}: {len(failures)} file(s) tried, none could be decoded, e.g. "
            + "; ".join(failures[:FAILURES_NAMED])
            + ". Replace or remove the broken files, or point data.root at readable images (a smaller batch size "
            "would not help)"
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.on_corrupt == "fail":
            try:
                return decode_image(self.path(index)), UNLABELLED
            except UnreadableImageError as error:
                raise UnreadableImageError(f"{error} (data.on_corrupt=skip skips such files)") from error
        size = len(self)
        for offset in range(size):
            current = (index + offset) % size
            if self.unreadable[current]:
                continue
            try:
                return decode_image(self.path(current)), UNLABELLED
            except UnreadableImageError as error:
                if not self.unreadable[current]:
                    self.unreadable[current] = True
                    log.warning("skipping %s", error)
        raise MissingDatasetError(f"none of the {size} images of {self.source} can be read (see the warnings above)")
