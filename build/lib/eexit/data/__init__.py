"""Datamodules: Fashion-MNIST, CIFAR-10, any ImageFolder, generated shapes; cluttered scenes."""

from eexit.data.base import DataInfo, SplitDataModule
from eexit.data.cluttered import ClutteredScenes, ClutterLevel, make_cluttered
from eexit.data.fashion_mnist import FashionMNISTDataModule
from eexit.data.image_folder import CIFAR10DataModule, ImageFolderDataModule
from eexit.data.synthetic import SyntheticDataModule, make_shapes

__all__ = [
    "CIFAR10DataModule",
    "ClutterLevel",
    "ClutteredScenes",
    "DataInfo",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "SplitDataModule",
    "SyntheticDataModule",
    "make_cluttered",
    "make_shapes",
]
