"""LightningDataModules. Training batches carry augmented views only; montages are assembled on the device by the
LightningModule after the batch is transferred.

Validation has two labelled loaders for the kNN monitor: the bank (a training subset) and the validation split. A
source without labelled data (:class:`FolderDataModule` without kNN folders) has no validation at all.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from mcl import distributed
from mcl.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SUPERVISED_MIN_SCALE,
    MultiView,
    byol_view,
    eval_view,
    supervised_view,
)
from mcl.data.device import DeviceViews, OwnRandomness, ShrinkToFit, SourceBatch, collate_sources
from mcl.data.sources import (
    FASHION_MNIST_ROOT,
    ON_CORRUPT,
    ImageFiles,
    ImageFolderImages,
    MissingDatasetError,
    TensorImages,
    describe_folders,
    load_fashion_mnist,
    synthetic_images,
)

log = logging.getLogger(__name__)
VIEW_MODES = ("byol", "supervised")
# Where training views are made: in the DataLoader workers (torchvision), or on the batch's device after the
# transfer (mcl.data.device: the workers only decode).
AUGMENT_ON = ("cpu", "device")
# BYOL's asymmetric sides: Gaussian blur and solarisation probabilities for side A and side B.
BLUR_P = (1.0, 0.1)
SOLARIZE_P = (0.0, 0.2)


class SeededIndex(int):
    """A dataset index that carries the seed of the item's random views (:func:`sample_seed`)."""

    seed: int

    def __new__(cls, index: int, seed: int) -> SeededIndex:
        item = super().__new__(cls, index)
        item.seed = seed
        return item

    def __reduce__(self) -> tuple:  # to the DataLoader's worker processes with its seed
        return (SeededIndex, (int(self), self.seed))


def sample_seed(epoch_seed: int, index: int) -> int:
    """The seed of an item's views in an epoch: a function of ``(seed, epoch, index)`` alone (32 bits, what the CPU
    generator keeps)."""
    return (epoch_seed * 2_654_435_761 + index * 40_503 + 1) % 2**32


class EpochShuffle(DistributedSampler):
    """A random order that is a function of ``(seed, epoch)`` alone, split between the ranks: Lightning calls
    :meth:`set_epoch` before each epoch, so a resumed run sees the same order as an uninterrupted one. Every rank
    draws the same order of the whole dataset and takes every ``num_replicas``-th item from its ``rank`` on (the tail
    that does not divide evenly is left out of the epoch). Being a ``DistributedSampler``, Lightning uses it as it is
    instead of wrapping it in one of its own (whose epoch would not reach this order).

    Each index is a :class:`SeededIndex`: :class:`Transformed` draws the item's views from a generator seeded with
    :func:`sample_seed`, so the views of an item in an epoch are the same whatever the worker, the number of workers
    or ranks, and whether the run was resumed. :meth:`resume_at` leaves out the items of the batches an interrupted
    run had trained on, so a run resumed mid-epoch trains on exactly the rest of the epoch.

    Starting an epoch also seeds torch's global generators (CPU and CUDA) from ``(seed, epoch, rank)``: what the model
    draws from them (DropPath in Swin, dropout) differs between ranks and repeats after a resume at an epoch
    boundary.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int | None = None, rank: int | None = None):
        num_replicas = distributed.world_size() if num_replicas is None else num_replicas
        rank = distributed.rank() if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, items_done: int) -> None:
        """Leave out this rank's first ``items_done`` items of ``epoch`` (once), those an interrupted run trained on."""
        self.resume = (epoch, items_done)

    def __iter__(self) -> Iterator[int]:
        seed = self.seed * 1_000_003 + self.epoch
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(global_seed(seed, self.rank))
        indices = order[self.rank : self.total_size : self.num_replicas].tolist()
        if self.resume is not None and self.resume[0] == self.epoch:
            indices = indices[self.resume[1] :]
            self.resume = None
        return iter([SeededIndex(index, sample_seed(seed, index)) for index in indices])


def global_seed(epoch_seed: int, rank: int) -> int:
    """The seed of torch's global generators for an epoch on a rank: rank 0 keeps the single-process seed, the other
    ranks theirs. Modulo 2**32: the CPU generator keeps only the lower 32 bits of a seed."""
    return (epoch_seed + 1 + rank * 2_654_435_761) % 2**32


class Transformed(Dataset):
    """``(image, label)`` -> ``(transform(image), label)``; for a :class:`SeededIndex`, the transform draws from a
    CPU generator seeded with the index's seed (the process's own stream is left as it was)."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        seed = getattr(index, "seed", None)
        if seed is None:
            return self.transform(image), label
        generator = torch.default_generator  # what torchvision's transforms draw from; 2 us, fork_rng 80 us
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.transform(image), label
        finally:
            generator.set_state(state)


def fixed_subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A deterministic random subset of ``size`` items (all of them when ``size`` is None or not smaller). The subset
    of an :class:`ImageFiles` source is an ``ImageFiles`` of those files, so that skipping an unreadable file stays
    within the subset and its count is the subset's."""
    if size is None or size >= len(dataset):
        return dataset
    if size < 1:
        raise ValueError(f"a subset size of {size} is invalid: it must be at least 1 (or null for all)")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    indices = order[:size].sort().values.tolist()
    return dataset.select(indices) if isinstance(dataset, ImageFiles) else Subset(dataset, indices)


class MultiLevelDataModule(pl.LightningDataModule):
    """Base datamodule: subclasses return raw ``(train, bank, val)`` sources from :meth:`sources`; a subclass whose
    :attr:`has_validation` is False returns ``(train, None, None)`` and gets no validation loaders.

    Args:
        image_size: view size ``H`` (a multiple of 32).
        views_per_side: views per image and augmentation side, one per montage level.
        view_mode: ``"byol"`` (two asymmetric sides, ``(2, S, C, H, W)`` per image) or ``"supervised"``
            (``(S, C, H, W)``).
        train_size / bank_size / val_size: fixed random subsets (null for all).
        augment_on: ``"cpu"`` (views made by the DataLoader workers) or ``"device"`` (the workers decode and
            shrink images to ``source_max_side``; :class:`~mcl.data.device.DeviceViews` makes the views on the
            device the batch is moved to, in :meth:`on_after_batch_transfer`). Validation images are made on the CPU
            either way (a resize and a centre crop).
    """

    def __init__(
        self,
        image_size: int = 64,
        batch_size: int = 128,
        num_workers: int = 2,
        views_per_side: int = 3,
        view_mode: str = "byol",
        train_size: int | None = None,
        bank_size: int | None = 5000,
        val_size: int | None = 2000,
        eval_batch_size: int = 256,
        min_scale: float = 0.2,
        jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        zoom_out: float = 1.0,
        zoom_out_p: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pin_memory: bool = True,
        augment_on: str = "cpu",
        source_max_side: int | None = 512,
        seed: int = 0,
    ):
        super().__init__()
        if view_mode not in VIEW_MODES:
            raise ValueError(f"data.view_mode={view_mode!r} is invalid: use one of {VIEW_MODES}")
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"data.augment_on={augment_on!r} is invalid: use one of {AUGMENT_ON}")
        if augment_on == "device" and zoom_out != 1:
            raise ValueError(
                f"data.zoom_out={zoom_out} is not available with data.augment_on=device: set data.zoom_out=1 or "
                "make the views on the CPU (data.augment_on=cpu)"
            )
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} is invalid: it must be at least 1")
        if zoom_out < 1 or not 0 <= zoom_out_p <= 1:
            raise ValueError(
                f"data.zoom_out={zoom_out}, data.zoom_out_p={zoom_out_p} are invalid: zoom_out is the largest "
                "canvas/crop side ratio (at least 1; 1 is off) and zoom_out_p a probability"
            )
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.views_per_side = views_per_side
        self.view_mode = view_mode
        self.train_size, self.bank_size, self.val_size = train_size, bank_size, val_size
        self.eval_batch_size = eval_batch_size
        self.augment: dict[str, Any] = {
            "min_scale": min_scale,
            "jitter": tuple(jitter),
            "jitter_p": jitter_p,
            "grayscale_p": grayscale_p,
        }
        self.zoom = {"zoom_out": zoom_out, "zoom_out_p": zoom_out_p}
        self.mean, self.std = tuple(mean), tuple(std)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.augment_on = augment_on
        self.shrink = ShrinkToFit(source_max_side)
        self.device_views: DeviceViews | None = None
        self.view_randomness = OwnRandomness()
        self.seed = seed
        self.train_set: Dataset | None = None
        self.resume_point: tuple[int, int] | None = None

    # Subclasses implement this.
    def sources(self) -> tuple[Dataset, Dataset | None, Dataset | None]:
        raise NotImplementedError

    @property
    def has_validation(self) -> bool:
        """Whether there are labelled bank and validation sets, for the kNN monitor (``val/knn_top1``)."""
        return True

    def data_report(self) -> dict[str, float]:
        """What reading the training data met, logged and returned as ``data/*`` metrics for ``metrics.json``; in-memory
        sources have nothing to report. Call it after training, on every rank."""
        return {}

    def train_transform(self) -> MultiView | ShrinkToFit:
        """What a worker does to a training image: all its views (``augment_on=cpu``), or only the shrinking
        (``augment_on=device``; :meth:`make_device_views` does the rest)."""
        if self.augment_on == "device":
            return self.shrink
        if self.view_mode == "supervised":
            side = supervised_view(self.image_size, mean=self.mean, std=self.std, **self.zoom)
            return MultiView([side], self.views_per_side, squeeze_sides=True)
        sides = [
            byol_view(self.image_size, blur, solarize, mean=self.mean, std=self.std, **self.augment, **self.zoom)
            for blur, solarize in zip(BLUR_P, SOLARIZE_P, strict=True)
        ]
        return MultiView(sides, self.views_per_side)

    def make_device_views(self) -> DeviceViews:
        """The device twin of :meth:`train_transform`'s views: same crops, sides and normalisation."""
        if self.view_mode == "supervised":
            return DeviceViews(
                self.image_size, self.views_per_side, None, SUPERVISED_MIN_SCALE, mean=self.mean, std=self.std
            )
        return DeviceViews(
            self.image_size,
            self.views_per_side,
            list(zip(BLUR_P, SOLARIZE_P, strict=True)),
            mean=self.mean,
            std=self.std,
            **self.augment,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Let the model check the batch while it is on the host (its ``check_host_batch``, if it has one: e.g. the
        supervised method's label range), where a check waits for nothing."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        check = getattr(model, "check_host_batch", None)
        if check is not None:
            check(batch)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``augment_on=device``, turn a training :class:`~mcl.data.device.SourceBatch` (now on the device)
        into ``(views, labels)``, the batch the methods train on; other batches pass unchanged.

        The views draw from a stream of their own, restarted from ``(seed, epoch, rank, batch)`` at each batch: ranks
        draw different views (a process's default generators are seeded alike on every rank), and a resumed run draws
        the same views as an uninterrupted one."""
        if not isinstance(batch, SourceBatch):
            return batch
        if self.device_views is None:
            self.device_views = self.make_device_views()
        epoch, done = self.progress()
        seed = ((self.seed * 1_000_003 + epoch) * 1009 + distributed.rank()) * 100_003 + done
        with self.view_randomness.use(batch.images.device, seed):
            views = self.device_views(batch)
        return views, batch.labels

    def progress(self) -> tuple[int, int]:
        """``(epoch, training batches done in it)`` of the Trainer fitting this datamodule (``(0, 0)`` outside)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def batches_per_epoch(self, batches: int) -> int:
        """The training batches an epoch of ``batches`` runs under the Trainer's ``limit_train_batches``."""
        limit = self.trainer.limit_train_batches if self.trainer is not None else 1.0
        return min(batches, limit) if isinstance(limit, int) else int(batches * limit)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: where training stood in its epoch (``epoch``, ``batches_done``), so that a resumed run
        starts the training loader at the right epoch, and from a checkpoint written mid-epoch (``every_n_train_steps``,
        an interruption) trains on the rest of that epoch only (:meth:`_loader`)."""
        epoch, done = self.progress()
        return {"epoch": epoch, "batches_done": done} if done else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume_point = (int(state_dict["epoch"]), int(state_dict["batches_done"])) if state_dict else None
        if self.resume_point is not None:
            # Lightning warns that a mid-epoch resume repeats data unless the loader is resumable: here the sampler
            # leaves out the batches already trained on (EpochShuffle.resume_at).
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, bank, val = self.sources()
        splits = {"training": fixed_subset(train, self.train_size, self.seed)}
        if self.has_validation:
            splits["kNN bank"] = fixed_subset(bank, self.bank_size, self.seed + 1)
            splits["validation"] = fixed_subset(val, self.val_size, self.seed + 2)
        for name, dataset in splits.items():
            if len(dataset) == 0:
                raise MissingDatasetError(f"the {name} set of {type(self).__name__} is empty")
        train = splits["training"]
        if isinstance(train, ImageFiles):
            train.check_readable()  # no readable file at all: say so, rather than suggest a smaller batch
        if len(train) < self.batch_size:
            raise ValueError(
                f"the training set has {len(train)} images, fewer than data.batch_size={self.batch_size}: "
                "lower the batch size or use more data"
            )
        self.train_set = Transformed(train, self.train_transform())
        if self.has_validation:
            evaluate = eval_view(self.image_size, mean=self.mean, std=self.std)
            self.bank_set = Transformed(splits["kNN bank"], evaluate)
            self.val_set = Transformed(splits["validation"], evaluate)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        sampler = EpochShuffle(dataset, self.seed) if train else None
        if sampler is not None and self.resume_point is not None:
            # Lightning starts a resumed run's loader before it sets the sampler's epoch, and worker processes take
            # their first indices at once: the sampler must already be at the epoch the run resumes in.
            epoch, batches_done = self.resume_point
            if batches_done >= self.batches_per_epoch(len(sampler) // batch_size):
                sampler.set_epoch(epoch + 1)
            else:
                sampler.set_epoch(epoch)
                sampler.resume_at(epoch, batches_done * batch_size)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_sources if train and self.augment_on == "device" else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> list[DataLoader]:
        """``[bank, validation]``; none without validation data (the Trainer then runs with ``limit_val_batches=0``,
        see :func:`mcl.train.train`)."""
        if not self.has_validation:
            return []
        return [
            self._loader(self.bank_set, self.eval_batch_size, train=False),
            self._loader(self.val_set, self.eval_batch_size, train=False),
        ]


class FashionMNISTDataModule(MultiLevelDataModule):
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, as 3-channel images upscaled by the views."""

    num_classes = 10

    def __init__(self, root: str = FASHION_MNIST_ROOT, **kwargs: Any):
        super().__init__(**kwargs)
        self.root = root

    def sources(self) -> tuple[Dataset, Dataset, Dataset]:
        train = TensorImages(*load_fashion_mnist(self.root, "train"))
        test = TensorImages(*load_fashion_mnist(self.root, "test"))
        return train, train, test


class ImageFolderDataModule(MultiLevelDataModule):
    """Any ImageFolder-style tree, e.g. ImageNet: ``train_dir/<class>/*.JPEG`` and ``val_dir/<class>/*.JPEG``."""

    def __init__(self, train_dir: str, val_dir: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.train_dir, self.val_dir = Path(train_dir), Path(val_dir)

    @property
    def num_classes(self) -> int:
        return len(ImageFolderImages(self.train_dir).folder.classes)

    def sources(self) -> tuple[Dataset, Dataset, Dataset]:
        train = ImageFolderImages(self.train_dir)
        return train, train, ImageFolderImages(self.val_dir)


class SyntheticDataModule(MultiLevelDataModule):
    """Class-structured random images, for tests and smoke runs without any data on disk."""

    def __init__(self, num_train: int = 64, num_val: int = 32, num_classes: int = 4, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_train, self.num_val, self.num_classes = num_train, num_val, num_classes

    def sources(self) -> tuple[Dataset, Dataset, Dataset]:
        size = self.image_size
        train = TensorImages(*synthetic_images(self.num_train, self.num_classes, size, self.seed, noise_seed=0))
        val = TensorImages(*synthetic_images(self.num_val, self.num_classes, size, self.seed, noise_seed=1))
        return train, train, val


class FolderDataModule(MultiLevelDataModule):
    """Unlabelled images for pretraining: every image under the folder ``root`` (recursively), or every path listed in
    the text file ``root``; see :class:`~mcl.data.sources.ImageFiles` (formats, order, ``on_corrupt``).

    Without labels there is no validation (:attr:`has_validation` is False) unless ``knn_bank_dir`` and
    ``knn_val_dir`` name labelled ImageFolder-style trees (``<dir>/<class>/<image>``): they then feed the kNN monitor
    as the bank and validation split of the other sources do (``bank_size`` / ``val_size`` subsets), and their files
    must all be readable. Training items are labelled ``UNLABELLED`` (-1), so the supervised view mode is refused.
    """

    def __init__(
        self,
        root: str,
        on_corrupt: str = "skip",
        knn_bank_dir: str | None = None,
        knn_val_dir: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if self.view_mode == "supervised":
            raise ValueError(
                "data=folder has no labels (its images are labelled -1), but the supervised view mode needs them "
                "(method=supervised, mcl-linear): pretrain with method=mcl, or use data=imagefolder with one "
                "sub-folder per class"
            )
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"data.on_corrupt={on_corrupt!r} is invalid: use one of {ON_CORRUPT}")
        if (knn_bank_dir is None) != (knn_val_dir is None):
            raise ValueError(
                f"data.knn_bank_dir={knn_bank_dir} and data.knn_val_dir={knn_val_dir}: set both (labelled bank and "
                "validation folders for the kNN monitor) or neither (no validation)"
            )
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise MissingDatasetError(
                f"data.root={root} does not exist: point it at a folder of images or at a text file listing image "
                "paths, one per line"
            )
        self.on_corrupt = on_corrupt
        self.knn_dirs = (Path(knn_bank_dir), Path(knn_val_dir)) if knn_bank_dir is not None else None
        self.train_images: ImageFiles | None = None

    @property
    def has_validation(self) -> bool:
        return self.knn_dirs is not None

    def sources(self) -> tuple[Dataset, Dataset | None, Dataset | None]:
        train = ImageFiles.from_root(self.root, self.on_corrupt)
        if self.knn_dirs is None:
            return train, None, None
        return train, ImageFolderImages(self.knn_dirs[0]), ImageFolderImages(self.knn_dirs[1])

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.train_images = self.train_set.dataset

    def data_report(self) -> dict[str, float]:
        """Logs ``skipped N unreadable images of M`` (and ``; K folder(s) could not be listed: ...`` when sub-folders
        of the root could not be listed and were left out) and returns ``{"data/skipped_images": N,
        "data/skipped_folders": K}``, ``M`` being the training images found. With several ranks, each reads its own
        share of the images: the count is over all of them (every rank must call this); every rank lists the same
        folders."""
        if self.train_images is None:
            return {}
        flags = self.train_images.unreadable
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            strategy = trainer.strategy
            flags = strategy.reduce(flags.to(strategy.root_device, torch.int32), reduce_op="sum").cpu() > 0
        skipped, total = int(flags.sum()), len(flags)
        folders = self.train_images.unlistable_folders
        if trainer is None or trainer.is_global_zero:
            if folders:
                log.warning(
                    "skipped %d unreadable images of %d; %d folder(s) could not be listed: %s",
                    skipped,
                    total,
                    len(folders),
                    describe_folders(folders),
                )
            else:
                (log.warning if skipped else log.info)("skipped %d unreadable images of %d", skipped, total)
        return {"data/skipped_images": float(skipped), "data/skipped_folders": float(len(folders))}
