"""A tiny generated data set for tests and smoke runs: one shape per class on a noisy canvas."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from eexit.data.base import DataInfo, SplitDataModule

SHAPES = ("square", "hbar", "vbar", "cross", "diagonal", "ring")


def _stamp(shape: str, size: int) -> Tensor:
    """A ``(size, size)`` binary pattern."""
    p = torch.zeros(size, size)
    mid = size // 2
    if shape == "square":
        p[:] = 1
    elif shape == "hbar":
        p[mid - 1 : mid + 1] = 1
    elif shape == "vbar":
        p[:, mid - 1 : mid + 1] = 1
    elif shape == "cross":
        p[mid - 1 : mid + 1] = 1
        p[:, mid - 1 : mid + 1] = 1
    elif shape == "diagonal":
        p.fill_diagonal_(1)
    elif shape == "ring":
        p[[0, -1]] = 1
        p[:, [0, -1]] = 1
    return p


def make_shapes(
    n: int, num_classes: int = 4, image_size: int = 16, in_chans: int = 1, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Generate ``n`` images, each one class shape at a random place, plus noise.

    Returns:
        images ``(n, in_chans, S, S)`` (background -0.5, shape pixels 1.5, plus Gaussian noise
        of std 0.3: used as they are, the data module's recorded mean 0 and std 1 mean no
        further normalisation), labels ``(n,)`` and the shape's pixel masks ``(n, S, S)``.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    if image_size < 4:
        raise ValueError(f"image_size must be at least 4 (the shapes are stamps of 4 pixels or more), got {image_size}")
    g = torch.Generator().manual_seed(seed)
    stamp = max(4, image_size // 3)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    masks = torch.zeros(n, image_size, image_size)
    pos = torch.randint(0, image_size - stamp + 1, (n, 2), generator=g)
    patterns = [_stamp(s, stamp) for s in SHAPES[:num_classes]]
    for i in range(n):
        r, c = pos[i].tolist()
        masks[i, r : r + stamp, c : c + stamp] = patterns[int(labels[i])]
    noise = 0.3 * torch.randn(n, in_chans, image_size, image_size, generator=g)
    images = masks.unsqueeze(1) * 2.0 - 0.5 + noise
    return images, labels, masks


class SyntheticDataModule(SplitDataModule):
    """Generated shapes (see ``make_shapes``); nothing to download, deterministic per seed.

    Args:
        num_train: size of the pool split into train / val / calib.
        num_test: size of the test set.
        num_classes: number of shape classes (at most 6).
        image_size: canvas size.
        in_chans: channels.
        **kwargs: see ``SplitDataModule``.
    """

    def __init__(
        self,
        num_train: int = 512,
        num_test: int = 128,
        num_classes: int = 4,
        image_size: int = 16,
        in_chans: int = 1,
        **kwargs,
    ) -> None:
        kwargs.setdefault("val_size", 0.125)
        kwargs.setdefault("calib_size", 0.125)
        super().__init__(**kwargs)
        self.num_train, self.num_test = num_train, num_test
        self._num_classes, self.image_size, self.in_chans = num_classes, image_size, in_chans

    @property
    def info(self) -> DataInfo:
        c = self.in_chans
        return DataInfo(
            "synthetic", self._num_classes, c, self.image_size, [0.0] * c, [1.0] * c, list(SHAPES[: self._num_classes])
        )

    def _make(self, n: int, seed: int) -> Dataset:
        x, y, _ = make_shapes(n, self._num_classes, self.image_size, self.in_chans, seed)
        return TensorDataset(x, y)

    def load_pool(self) -> Dataset:
        return self._make(self.num_train, self.split_seed)

    def load_test(self) -> Dataset:
        return self._make(self.num_test, self.split_seed + 10_000)
