"""Data: raw sources, view augmentation and LightningDataModules."""

from mcl.data.datamodules import (
    FashionMNISTDataModule,
    FolderDataModule,
    ImageFolderDataModule,
    MultiLevelDataModule,
    SyntheticDataModule,
)
from mcl.data.sources import MissingDatasetError

__all__ = [
    "FashionMNISTDataModule",
    "FolderDataModule",
    "ImageFolderDataModule",
    "MissingDatasetError",
    "MultiLevelDataModule",
    "SyntheticDataModule",
]
