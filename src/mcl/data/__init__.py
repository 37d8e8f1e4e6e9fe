"""Data: raw sources, view augmentation and LightningDataModules."""

from mcl.data.datamodules import (
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MultiLevelDataModule,
    SyntheticDataModule,
)
from mcl.data.sources import MissingDatasetError

__all__ = [
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "MissingDatasetError",
    "MultiLevelDataModule",
    "SyntheticDataModule",
]
