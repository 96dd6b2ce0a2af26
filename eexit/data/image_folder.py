"""Any ``ImageFolder`` (``root/<split>/<class>/*.png``), and CIFAR-10 stored that way."""

from __future__ import annotations

import copy
import logging
import os
import tarfile
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms
from torchvision.datasets.vision import StandardTransform

from eexit.config import ConfigError
from eexit.data.base import DataInfo, SplitDataModule
from eexit.serve.images import ImageError, decode, hidden_entry, image_extensions, to_model_mode

log = logging.getLogger(__name__)


def _is_image_file(path: str, root: str) -> bool:
    """An image file of a class folder: an ending of a format ``eexit predict`` decodes
    (``image_extensions``), and no hidden file or folder below ``root`` on its way (``.DS_Store``,
    macOS's ``._photo.jpg`` resource files, ``.ipynb_checkpoints/``): what predict skips too."""
    if not path.lower().endswith(image_extensions()):
        return False
    parts = os.path.relpath(path, root).split(os.sep)
    return not any(hidden_entry(part) for part in parts)


BAD_FILES_HINT = "data.bad_files=skip leaves unreadable images out"


class CorruptImageError(RuntimeError):
    """An image file that cannot be read; the message names the file and the reason."""


def load_image(path: str) -> Image.Image:
    """Open an image fully (``ImageFolder``'s loader), EXIF orientation applied as when serving
    (``eexit.serve.images.decode``), naming the file on failure."""
    try:
        return decode(path)
    except ImageError as err:
        raise CorruptImageError(f"cannot read image {path}: {err.reason} ({BAD_FILES_HINT})") from err


def unreadable_reason(path: str) -> str | None:
    """Why the image file cannot be used (``None``: it decodes)."""
    try:
        decode(path)
        return None
    except ImageError as err:
        return err.reason


def find_unreadable(paths: Sequence[str], workers: int = 4) -> list[tuple[str, str]]:
    """``(path, reason)`` of each file of ``paths`` that does not decode, in their order;
    decoded by ``workers`` threads (Pillow's decoders release the GIL)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(pool.map(unreadable_reason, paths, chunksize=64))
    return [(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None]


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
        # allow_empty: the classes without an image file are named below, with what is read
        super().__init__(
            root,
            transform=transform,
            loader=load_image,
            is_valid_file=partial(_is_image_file, root=root),
            allow_empty=True,
        )
        if not allow_empty:
            counted = set(self.targets)
            empty = [c for c, i in self.class_to_idx.items() if i not in counted]
            if empty:
                raise FileNotFoundError(
                    f"class folder(s) {', '.join(map(repr, empty))} of {root} hold no image file (read: "
                    f"{' '.join(image_extensions())}; hidden files skipped)"
                )
        self.skipped: list[str] = []
        if bad_files == "skip":
            bad = {p for p, _ in find_unreadable([p for p, _ in self.samples], os.cpu_count() or 1)}
            keep = [(p, t) for p, t in self.samples if p not in bad]
            self.skipped = sorted(bad)
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
        found = [c for c in found if not hidden_entry(c)]
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


def _holds_class_folders(root: Path) -> bool:
    """Whether ``root`` itself looks like a training folder: a visible subfolder with an image file."""
    try:
        return any(
            d.is_dir() and not hidden_entry(d.name) and any(_is_image_file(str(f), str(root)) for f in d.iterdir())
            for d in root.iterdir()
        )
    except OSError:
        return False


class ImageFolderDataModule(SplitDataModule):
    """Images in ``root/<train_dir>/<class>/...`` and ``root/<test_dir>/<class>/...``.

    Args:
        root: the folder holding the splits.
        image_size: images are resized (and centre-cropped) to this square size.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        in_chans: 1 reads images as grayscale, 3 as RGB.
        augment: random crop (padding 4) and horizontal flip for training.
        train_dir: name of the training split folder (``"."``: ``root`` itself holds the class
            folders).
        test_dir: name of the test split folder; ``None``: there is none, and ``test_size`` of
            the training folder is held out (seeded) as the test split.
        test_size: images or fraction of the training folder held out as the test split when
            ``test_dir`` is ``None`` (unused otherwise).
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
        test_dir: str | None = "test",
        test_size: int | float = 0.1,
        name: str = "image_folder",
        bad_files: str = "fail",
        **kwargs,
    ) -> None:
        super().__init__(test_size=test_size if test_dir is None else None, **kwargs)
        if bad_files not in ("fail", "skip"):
            raise ValueError(f"data.bad_files must be 'fail' or 'skip', got {bad_files!r}")
        self.bad_files = bad_files
        self.skipped_files: list[str] = []
        self._held_out_checked = False
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
        self._check_split_folders()
        # hidden folders (.ipynb_checkpoints, .git) and macOS archive debris are no classes
        self._classes = sorted(
            p.name for p in (self.root / train_dir).iterdir() if p.is_dir() and not hidden_entry(p.name)
        )
        if not self._classes:
            raise FileNotFoundError(f"no class folders in {self.root / train_dir}")

    def prepare_root(self) -> None:
        """Hook for subclasses that unpack or download into ``root`` first."""

    def _check_split_folders(self) -> None:
        """The split folders exist, the test folder is not the training folder, and a folder the
        splits do not read (``val/``) is named in a warning."""
        for key, split in (("train_dir", self.train_dir), ("test_dir", self.test_dir)):
            if split is not None and not (self.root / split).is_dir():
                hint = ""
                if split == self.train_dir and _holds_class_folders(self.root):
                    hint = (
                        f"; {self.root} holds the class folders itself: data.train_dir=. data.test_dir=null trains on "
                        "them and holds a test split out of them (data.test_size)"
                    )
                raise FileNotFoundError(
                    f"data folder not found: {self.root / split} (data.{key}={split!r} under "
                    f"data.root={str(self.root)!r}){hint}"
                )
        train = (self.root / self.train_dir).resolve()
        if self.test_dir is not None and (self.root / self.test_dir).resolve() == train:
            raise ConfigError(
                "data.test_dir",
                f"{self.test_dir!r} is the training folder {train}: the test accuracy would be measured on training "
                "images; data.test_dir=null holds a test split out of the training folder (data.test_size)",
            )
        used = {train} | ({(self.root / self.test_dir).resolve()} if self.test_dir is not None else set())
        for name in ("val", "valid", "validation"):
            folder = self.root / name
            if folder.is_dir() and folder.resolve() not in used:
                log.warning(
                    "%s is not read: the validation and calibration images are held out of %s (data.val_size, "
                    "data.calib_size)",
                    folder,
                    self.root / self.train_dir,
                )

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

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage == "fit" and self.bad_files == "fail" and not self._held_out_checked:
            self._check_held_out_files()

    def _check_held_out_files(self) -> None:
        """Decode the validation, calibration and test images before training: they are read
        only after a training epoch or after the fit, where an unreadable one ended a finished
        training without its test, calibration and bundle. (Training images are read in the
        first epoch; ``bad_files=skip`` checks every file.)"""
        if self.data_test is None:
            self.data_test = self.load_test()
        paths = [p for split in (self.data_val, self.data_calib, self.data_test) for p in _files(split)]
        start = time.perf_counter()
        bad = find_unreadable(paths, os.cpu_count() or 1)
        log.info("checked the %d held-out images in %.1f s", len(paths), time.perf_counter() - start)
        self._held_out_checked = True
        if bad:
            examples = "; ".join(f"{p}: {r}" for p, r in bad[:3])
            raise CorruptImageError(
                f"{len(bad)} unreadable image(s) among the {len(paths)} held out for validation, calibration and "
                f"test: {examples}{' ...' if len(bad) > 3 else ''} ({BAD_FILES_HINT})"
            )

    def eval_view(self, pool: Dataset) -> Dataset:
        """The pool's files (listed and checked once) with the evaluation transform."""
        if not self.augment:
            return pool
        view = copy.copy(pool)
        view.transform = self.transform(train=False)
        view.transforms = StandardTransform(view.transform, view.target_transform)
        return view

    def load_test(self) -> Dataset:
        if self.test_dir is None:
            raise RuntimeError("the test split is held out of the training folder: call setup() first")
        return self._folder(self.test_dir, train=False)


def _files(split: Dataset) -> list[str]:
    """The image files of a split: a ``CheckedImageFolder`` or a ``Subset`` of one."""
    if isinstance(split, Subset):
        samples = split.dataset.samples
        return [samples[i][0] for i in split.indices]
    return [p for p, _ in split.samples]


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
                c.is_dir() and not hidden_entry(c.name) and any(f.is_file() for f in c.iterdir())
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
