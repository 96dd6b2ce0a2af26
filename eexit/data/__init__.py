"""Datamodules: Fashion-MNIST, CIFAR-10, any ImageFolder, and generated shapes."""

from eexit.data.base import DataInfo, SplitDataModule
from eexit.data.fashion_mnist import FashionMNISTDataModule
from eexit.data.image_folder import CIFAR10DataModule, ImageFolderDataModule
from eexit.data.synthetic import SyntheticDataModule, make_shapes

__all__ = [
    "CIFAR10DataModule",
    "DataInfo",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "SplitDataModule",
    "SyntheticDataModule",
    "make_shapes",
]
