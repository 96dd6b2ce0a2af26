"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` idx files (or torchvision's download)."""

from __future__ import annotations

import gzip
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision.datasets import FashionMNIST

from eexit.config import ConfigError
from eexit.data.base import DataInfo, SplitDataModule

log = logging.getLogger(__name__)

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530
_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def prepare_raw_folder(root: Path, source_dir: Path) -> bool:
    """Make ``root/FashionMNIST/raw`` hold the four idx files, unpacked from ``source_dir``.

    Returns:
        True if the folder is complete afterwards.
    """
    raw = root / "FashionMNIST" / "raw"
    # a cached file that is not a whole idx file (an earlier unpack of a wrong source) is unpacked
    # again, not read: otherwise it would fail deep in torchvision on every run
    broken = {f: why for f in _FILES if (raw / f).exists() and (why := idx_problem(raw / f))}
    for f, why in broken.items():
        log.warning("cached %s is no idx file (%s): unpacking it again", raw / f, why)
    missing = [f for f in _FILES if not (raw / f).exists() or f in broken]
    if not missing:
        return True
    if not all((source_dir / f"{f}.gz").exists() or (source_dir / f).exists() for f in missing):
        if broken:
            f, why = next(iter(broken.items()))
            raise ConfigError("data.data_dir", f"{raw / f} is no idx file ({why}) and {source_dir} has no copy")
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for f in missing:
        # each process writes its own temporary file and renames it into place: ranks that start
        # together (torchrun, SLURM) all unpack, and whichever rename comes last leaves the same bytes
        fd, tmp_name = tempfile.mkstemp(dir=raw, prefix=f".{f}.", suffix=".partial")
        tmp = Path(tmp_name)
        try:
            origin, opener = (
                (source_dir / f, open) if (source_dir / f).exists() else (source_dir / f"{f}.gz", gzip.open)
            )
            try:
                with os.fdopen(fd, "wb") as fout, opener(origin, "rb") as fin:
                    shutil.copyfileobj(fin, fout)
            except (OSError, EOFError) as err:  # not gzip, truncated
                raise ConfigError("data.source_dir", f"{origin} cannot be unpacked: {err}") from None
            why = idx_problem(tmp, f)
            if why:
                raise ConfigError("data.source_dir", f"{origin} is no Fashion-MNIST idx file: {why}")
            os.replace(tmp, raw / f)
        finally:
            tmp.unlink(missing_ok=True)
    log.info("Fashion-MNIST idx files unpacked from %s into %s", source_dir, raw)
    return True


def idx_problem(path: Path, name: str | None = None) -> str | None:
    """Why ``path`` is not a whole Fashion-MNIST idx file (``None`` when it is): its magic number
    (images: 3 dimensions of 28 x 28 pixels; labels: 1) and its size against its header.

    Args:
        path: the file.
        name: the idx file it should be (one of the four names; default: ``path``'s name).
    """
    dims = 3 if "images" in (name or path.name) else 1
    header = 4 + 4 * dims
    with open(path, "rb") as f:
        head = f.read(header)
    if len(head) < header:
        return f"{len(head)} bytes, shorter than an idx header"
    magic = int.from_bytes(head[:4], "big")
    if magic != 0x800 + dims:
        return f"magic number {magic:#010x}, expected {0x800 + dims:#010x} (unsigned bytes, {dims} dimension(s))"
    sizes = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    if dims == 3 and sizes[1:] != [28, 28]:
        return f"images of {sizes[1]} x {sizes[2]} pixels, expected 28 x 28"
    expected = header + math.prod(sizes)
    actual = path.stat().st_size
    return None if actual == expected else f"{actual} bytes where its header promises {expected}"


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST, 28x28 grayscale, 10 classes, held in memory as normalised tensors.

    Args:
        data_dir: cache folder (``data_dir/FashionMNIST/raw``).
        source_dir: where the Debian package puts the idx files.
        download: allow torchvision to download when neither folder has the files.
        image_size: resize to this size (28 keeps the originals).
        **kwargs: see ``SplitDataModule``.
    """

    CLASSES: tuple[str, ...] = (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )

    def __init__(
        self,
        data_dir: str = "data",
        source_dir: str = DEBIAN_DIR,
        download: bool = False,
        image_size: int = 28,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir)
        self.source_dir = Path(source_dir)
        self.download = download
        self.image_size = image_size
        self.check_available()

    def check_available(self) -> None:
        """Fail at start, naming the paths looked at, when the data cannot be had."""
        if self.download or prepare_raw_folder(self.data_dir, self.source_dir):
            return
        raise FileNotFoundError(
            f"Fashion-MNIST not found: neither {self.data_dir / 'FashionMNIST' / 'raw'} nor {self.source_dir} "
            "holds the idx files. Install the Debian package 'dataset-fashion-mnist', set data.source_dir, "
            "or allow data.download=true where there is internet."
        )

    @property
    def info(self) -> DataInfo:
        return DataInfo("fashion_mnist", 10, 1, self.image_size, [MEAN], [STD], list(self.CLASSES))

    def _tensors(self, train: bool) -> Dataset:
        ds = FashionMNIST(str(self.data_dir), train=train, download=self.download)
        x = ds.data.unsqueeze(1).float().div_(255.0)
        if self.image_size != x.shape[-1]:
            x = torch.nn.functional.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
            )
        x = (x - MEAN) / STD
        return TensorDataset(x, ds.targets.clone())

    def load_pool(self) -> Dataset:
        return self._tensors(train=True)

    def load_test(self) -> Dataset:
        return self._tensors(train=False)
