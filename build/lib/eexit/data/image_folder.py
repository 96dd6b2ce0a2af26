"""Any ``ImageFolder`` (``root/<split>/<class>/*.png``), and CIFAR-10 stored that way."""

from __future__ import annotations

import copy
import logging
import tarfile
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.vision import StandardTransform

from eexit.config import ConfigError
from eexit.data.base import DataInfo, SplitDataModule
from eexit.serve.images import ImageError, decode, to_model_mode

log = logging.getLogger(__name__)


EXTENSIONS: tuple[str, ...] = (*datasets.folder.IMG_EXTENSIONS, ".gif")
"""File endings of the images an image folder trains on: torchvision's list and GIF (which
``eexit predict`` serves too; torchvision's list leaves GIFs out, silently)."""


def _is_image_file(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


class CorruptImageError(RuntimeError):
    """An image file that cannot be read; the message names the file and the reason."""


def load_image(path: str) -> Image.Image:
    """Open an image fully (``ImageFolder``'s loader), EXIF orientation applied as when serving
    (``eexit.serve.images.decode``), naming the file on failure."""
    try:
        return decode(path)
    except ImageError as err:
        raise CorruptImageError(f"cannot read image {path}: {err.reason}") from err


def readable(path: str) -> bool:
    try:
        load_image(path)
        return True
    except CorruptImageError:
        return False


class CheckedImageFolder(datasets.ImageFolder):
    """``ImageFolder`` whose loader names the file it cannot read, and whose labels can follow
    another split's classes.

    Args:
        root: split folder.
        transform: image transform.
        bad_files: ``"fail"`` raises ``CorruptImageError`` on the first unreadable file;
            ``"skip"`` checks every file once up front and leaves the unreadable ones out
            (``skipped`` lists them).
        classes: number the classes as in this list (the training split's), not by this
            folder's own subfolders: a test split that lacks a class (or whose folder for it is
            empty) keeps every other label right. A subfolder not in the list is an error.
        allow_empty: accept classes of ``classes`` without images here (a test split may lack
            one; a training split may not: torchvision refuses it, naming the class).
    """

    def __init__(
        self,
        root: str,
        transform=None,
        bad_files: str = "fail",
        classes: Sequence[str] | None = None,
        allow_empty: bool = False,
    ) -> None:
        if bad_files not in ("fail", "skip"):
            raise ValueError(f"bad_files must be 'fail' or 'skip', got {bad_files!r}")
        self._given_classes = None if classes is None else list(classes)
        super().__init__(
            root, transform=transform, loader=load_image, is_valid_file=_is_image_file, allow_empty=allow_empty
        )
        self.skipped: list[str] = []
        if bad_files == "skip":
            keep = [(p, t) for p, t in self.samples if readable(p)]
            self.skipped = sorted({p for p, _ in self.samples} - {p for p, _ in keep})
            self.samples = self.imgs = keep
            self.targets = [t for _, t in keep]
            if self.skipped:
                log.warning("skipped %d unreadable images in %s, e.g. %s", len(self.skipped), root, self.skipped[0])
            left = set(self.targets)
            emptied = [c for c, i in self.class_to_idx.items() if i not in left]
            if emptied and self.samples and not allow_empty:  # an exit output no image would train
                raise FileNotFoundError(
                    f"class folder(s) {', '.join(emptied)} of {root} hold no readable image once the unreadable "
                    "ones are skipped"
                )
        if not self.samples:
            raise FileNotFoundError(f"no image files in the class folders of {root}")

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        found, _ = super().find_classes(directory)
        found = [c for c in found if not _hidden_folder(c)]
        if not found:
            raise FileNotFoundError(f"no class folders in {directory} (hidden folders do not count)")
        if self._given_classes is None:
            return found, {c: i for i, c in enumerate(found)}
        extra = sorted(set(found) - set(self._given_classes))
        if extra:
            raise ValueError(
                f"{directory} has class folders the training split does not have: {extra} "
                f"(training classes: {self._given_classes})"
            )
        return list(self._given_classes), {c: i for i, c in enumerate(self._given_classes)}


def _hidden_folder(name: str) -> bool:
    """A folder that is no class: hidden (``.ipynb_checkpoints``, ``.git``) or a macOS archive's
    ``__MACOSX``."""
    return name.startswith(".") or name == "__MACOSX"


class ImageFolderDataModule(SplitDataModule):
    """Images in ``root/<train_dir>/<class>/...`` and ``root/<test_dir>/<class>/...``.

    Args:
        root: the folder holding the splits.
        image_size: images are resized (and centre-cropped) to this square size.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        in_chans: 1 reads images as grayscale, 3 as RGB.
        augment: random crop (padding 4) and horizontal flip for training.
        train_dir: name of the training split folder.
        test_dir: name of the test split folder.
        name: data set name recorded with the model.
        bad_files: ``"fail"`` (default) stops at the first unreadable image, naming it;
            ``"skip"`` leaves unreadable images out and counts them (``skipped_files``).
        **kwargs: see ``SplitDataModule``.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        in_chans: int = 3,
        augment: bool = True,
        train_dir: str = "train",
        test_dir: str = "test",
        name: str = "image_folder",
        bad_files: str = "fail",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if bad_files not in ("fail", "skip"):
            raise ValueError(f"data.bad_files must be 'fail' or 'skip', got {bad_files!r}")
        self.bad_files = bad_files
        self.skipped_files: list[str] = []
        self.root = Path(root)
        self.image_size = image_size
        self.mean, self.std = list(mean), list(std)
        if in_chans not in (1, 3):
            raise ValueError(f"data.in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != in_chans:
                raise ValueError(f"data.{key} has {len(values)} values, data.in_chans={in_chans} needs {in_chans}")
        if any(v <= 0 for v in self.std):
            raise ValueError(f"data.std must be positive, got {self.std}")
        self.in_chans = in_chans
        self.augment = augment
        self.train_dir, self.test_dir = train_dir, test_dir
        self.name = name
        self.prepare_root()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder not found: {self.root} (set data.root)")
        for key, split in (("train_dir", train_dir), ("test_dir", test_dir)):
            if not (self.root / split).is_dir():
                raise FileNotFoundError(
                    f"data folder not found: {self.root / split} (data.{key}={split!r} under data.root={str(self.root)!r})"
                )
        # hidden folders (.ipynb_checkpoints, .git) and macOS archive debris are no classes
        self._classes = sorted(
            p.name for p in (self.root / train_dir).iterdir() if p.is_dir() and not _hidden_folder(p.name)
        )
        if not self._classes:
            raise FileNotFoundError(f"no class folders in {self.root / train_dir}")

    def prepare_root(self) -> None:
        """Hook for subclasses that unpack or download into ``root`` first."""

    @property
    def info(self) -> DataInfo:
        return DataInfo(
            self.name, len(self._classes), self.in_chans, self.image_size, self.mean, self.std, self._classes
        )

    def transform(self, train: bool) -> transforms.Compose:
        # the serving conversions (alpha over black, palette, 16-bit scaling; eexit.serve.images)
        ops: list = [transforms.Lambda(partial(to_model_mode, channels=self.in_chans))]
        ops += [transforms.Resize(self.image_size), transforms.CenterCrop(self.image_size)]
        if train and self.augment:
            ops += [transforms.RandomCrop(self.image_size, padding=4), transforms.RandomHorizontalFlip()]
        ops += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(ops)

    def _folder(self, split: str, train: bool) -> Dataset:
        # every split is labelled by the training split's classes (self._classes); only the test
        # split may lack some of them
        allow_empty = split != self.train_dir
        ds = CheckedImageFolder(
            str(self.root / split), self.transform(train), self.bad_files, self._classes, allow_empty
        )
        self.skipped_files += ds.skipped
        return ds

    def load_pool(self) -> Dataset:
        return self._folder(self.train_dir, train=True)

    def eval_view(self, pool: Dataset) -> Dataset:
        """The pool's files (listed and checked once) with the evaluation transform."""
        if not self.augment:
            return pool
        view = copy.copy(pool)
        view.transform = self.transform(train=False)
        view.transforms = StandardTransform(view.transform, view.target_transform)
        return view

    def load_test(self) -> Dataset:
        return self._folder(self.test_dir, train=False)


class CIFAR10DataModule(ImageFolderDataModule):
    """CIFAR-10 from the offline ImageFolder tarball (``../shared/data/cifar10``) or a folder.

    The tarball is unpacked once into ``data_dir``. Its train images are JPEG q75 copies and its
    test split is the official test set (report as "CIFAR-10 (train images JPEG q75), official
    test set").

    Args:
        source: the tarball ``cifar10-imagefolder.tar.gz`` or an unpacked folder with
            ``train/`` and ``test/``.
        data_dir: where the tarball is unpacked.
        **kwargs: see ``ImageFolderDataModule``.
    """

    # per-channel statistics of the 50,000 training images as stored (JPEG q75), over all pixels
    # (the values before 2026-12-04 were the test split's: a leak, if a small one)
    MEAN = (0.49125, 0.48209, 0.44652)
    STD = (0.24523, 0.24278, 0.26063)

    def __init__(self, source: str, data_dir: str = "data", **kwargs) -> None:
        self.source = Path(source)
        kwargs.setdefault("mean", self.MEAN)
        kwargs.setdefault("std", self.STD)
        kwargs.setdefault("name", "cifar10")
        root = self.source if self.source.is_dir() else Path(data_dir) / "cifar10"
        super().__init__(root=str(root), **kwargs)

    def _has_images(self, root: Path) -> bool:
        """Whether both splits of ``root`` hold a visible class folder with a file in it."""
        return all(
            any(
                c.is_dir() and not _hidden_folder(c.name) and any(f.is_file() for f in c.iterdir())
                for c in (root / d).iterdir()
            )
            for d in (self.train_dir, self.test_dir)
        )

    def prepare_root(self) -> None:
        if (self.root / self.train_dir).is_dir() and (self.root / self.test_dir).is_dir():
            if self.root != self.source and self.source.is_file() and not self._has_images(self.root):
                # an earlier unpack of another tarball: not deleted here (it is a folder on disk)
                raise ConfigError(
                    "data.source",
                    f"{self.root} (unpacked earlier) holds no class folders with images in {self.train_dir}/ and "
                    f"{self.test_dir}/: delete it to unpack {self.source} again",
                )
            return
        if not self.source.is_file():
            raise FileNotFoundError(
                f"CIFAR-10 not found: {self.source} is neither the tarball nor a folder with train/ and test/ "
                "(set data.source)"
            )
        log.info("unpacking %s into %s", self.source, self.root)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        # unpack beside the target, then rename: an interrupted unpack never looks complete
        with tempfile.TemporaryDirectory(dir=self.root.parent, prefix=".unpack-") as tmp:
            try:
                with tarfile.open(self.source) as tar:
                    tar.extractall(tmp, filter="data")
            except (tarfile.TarError, OSError, EOFError) as err:  # not a tarball, truncated, corrupt
                raise ConfigError("data.source", f"{self.source} cannot be unpacked: {err}") from None
            unpacked = [p for p in Path(tmp).iterdir() if p.is_dir()]
            if len(unpacked) != 1 or not all((unpacked[0] / d).is_dir() for d in (self.train_dir, self.test_dir)):
                raise FileNotFoundError(
                    f"{self.source} does not unpack to one folder with {self.train_dir}/ and {self.test_dir}/"
                )
            if not self._has_images(unpacked[0]):  # refused before it is kept (and found every run)
                raise ConfigError(
                    "data.source",
                    f"{self.source} unpacks to {self.train_dir}/ and {self.test_dir}/ without class folders of images",
                )
            if not self.root.exists():
                unpacked[0].rename(self.root)
