"""Common datamodule logic: a seeded train / val / calibration split and the loaders."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, random_split
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from eexit.config import ConfigError, check_split_size

log = logging.getLogger(__name__)


@dataclass
class DataInfo:
    """What a trained model must remember about its data (stored in checkpoints and bundles)."""

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: list[float]
    std: list[float]
    class_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class SplitDataModule(pl.LightningDataModule):
    """Base datamodule: the training pool is split, with a seed, into train / val / calib.

    The calibration split (for the router) is never used for training or model selection, and
    the test split is never used for calibration. Only the training split is augmented: the
    validation and calibration splits read the pool through ``eval_view``, as the test set is
    read (a calibration on augmented images would fit the router's knob and features to images
    it never serves).

    The training loader is resumable: a ``StatefulDataLoader`` (torchdata) over a
    ``StatefulDistributedSampler`` that shuffles with a generator seeded by ``seed + epoch``, so
    the order of an epoch depends only on the seed and the epoch, and a checkpoint taken in the
    middle of an epoch stores how many samples were drawn (Lightning saves and restores the
    loader's ``state_dict``). Under DDP the sampler takes the trainer's world size and rank, so
    the ranks of one step together see the single-process batch of that step. Each training
    image is augmented from a seed of its own (``SeededItems``): the same draws whatever the
    number of loader workers or processes, and after a resume.

    Args:
        batch_size: batch size of every loader.
        val_size: images (int) or fraction (float < 1) of the pool for validation.
        calib_size: images or fraction of the pool for calibration.
        seed: seed of the split.
        num_workers: loader worker processes.
        limit_train: keep only this many training images (``None``: all), for quick runs.
        test_size: images or fraction of the pool held out as the test split, for data without
            a test set of its own (``None``: ``load_test`` gives the test set).
    """

    def __init__(
        self,
        batch_size: int = 128,
        val_size: int | float = 5000,
        calib_size: int | float = 5000,
        seed: int = 0,
        num_workers: int = 0,
        limit_train: int | None = None,
        test_size: int | float | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_size = val_size
        self.calib_size = calib_size
        self.test_size = test_size
        self.split_seed = seed
        self.num_workers = num_workers
        self.limit_train = limit_train
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.data_calib: Dataset | None = None
        self.data_test: Dataset | None = None
        self._pool_size: int | None = None

    # subclasses provide these
    @property
    def info(self) -> DataInfo:
        raise NotImplementedError

    def load_pool(self) -> Dataset:
        """The labelled training pool that is split into train / val / calib."""
        raise NotImplementedError

    def load_test(self) -> Dataset:
        """The held-out test set."""
        raise NotImplementedError

    def eval_view(self, pool: Dataset) -> Dataset:
        """The pool as the validation and calibration splits read it.

        Args:
            pool: ``load_pool()``'s dataset (its items may be augmented).

        Returns:
            A dataset with the same items in the same order, read without the training
            augmentation, like the test set (the default: ``pool`` itself, for pools without one).
        """
        return pool

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def _sizes(self, n: int) -> list[int]:
        def count(name: str, size: int | float) -> int:
            check_split_size(name, size)
            return round(size * n) if isinstance(size, float) and size < 1 else int(size)

        n_val, n_calib = count("val_size", self.val_size), count("calib_size", self.calib_size)
        held = [n_val, n_calib]
        if self.test_size is not None:
            held.append(count("test_size", self.test_size))
            if held[-1] == 0:
                raise ConfigError("data.test_size", f"holds out no test image of the {n} in the pool")
        if sum(held) >= n:
            names = " + ".join(("val_size", "calib_size", "test_size")[: len(held)])
            raise ConfigError(
                "data.val_size",
                f"{names} ({' + '.join(map(str, held))}) leave no training images out of {n}",
            )
        return [n - sum(held), *held]

    def _split_settings(self) -> dict:
        """The settings that decide the split (what ``use_split`` sets)."""
        return {
            "seed": self.split_seed,
            "val_size": self.val_size,
            "calib_size": self.calib_size,
            "test_size": self.test_size,
        }

    def split_record(self) -> dict:
        """How the pool is split into train / val / calib: stored with the model (checkpoint and
        bundle ``data.split``), so that an evaluation recalibrates on the images training held
        out and a resumed run splits as the run it continues; with the pool's size once set up."""
        record = self._split_settings()
        if record["test_size"] is None:  # a test set of its own, as in the records before test_size
            del record["test_size"]
        if self._pool_size is not None:
            record["pool_size"] = self._pool_size
        return record

    def split_differences(self, record: dict) -> list[str]:
        """``key: recorded vs here`` for each split setting of ``record`` (a ``split_record``;
        the pool's size is not a setting) that this module has otherwise."""
        here = self._split_settings()
        # records from before test_size was recorded: the test set was a separate one
        there = {"test_size": None, **record}
        return [f"{k}: {there[k]!r} there, {here[k]!r} here" for k in here if k in there and there[k] != here[k]]

    @property
    def pool_size(self) -> int | None:
        """Images in the training pool (``None`` before ``setup``)."""
        return self._pool_size

    def use_split(self, record: dict) -> None:
        """Split as ``record`` says (another run's ``split_record``); only before ``setup``."""
        if self.data_train is not None:
            raise RuntimeError("use_split() must come before setup()")
        self.split_seed = int(record.get("seed", self.split_seed))
        self.val_size = record.get("val_size", self.val_size)
        self.calib_size = record.get("calib_size", self.calib_size)
        if (record.get("test_size") is None) != (self.test_size is None):
            # a test split held out of the pool there and a test set of its own here (or the
            # reverse): the other splits could not be the ones training used
            raise ConfigError(
                "data.test_size",
                f"the model's test split was {_test_source(record.get('test_size'))}, this data config's is "
                f"{_test_source(self.test_size)}: evaluate with the training run's data config",
            )
        self.test_size = record.get("test_size")

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is None:
            pool = self.load_pool()
            self._pool_size = len(pool)
            generator = torch.Generator().manual_seed(self.split_seed)
            self.data_train, val, calib, *test = random_split(pool, self._sizes(len(pool)), generator)
            if stage == "fit":  # training only: evaluating or calibrating a trained model trains nothing
                self._check_every_class_trains(pool, self.data_train.indices)
            # model selection and router calibration see images as the test set and serving do
            plain = self.eval_view(pool)
            self.data_val, self.data_calib = Subset(plain, val.indices), Subset(plain, calib.indices)
            if test:  # test_size: the test split is held out of the pool too
                self.data_test = Subset(plain, test[0].indices)
            if self.limit_train is not None and self.limit_train < len(self.data_train):
                self.data_train = torch.utils.data.Subset(self.data_train, range(self.limit_train))
        if self.data_test is None and stage in (None, "test", "predict", "calibrate"):
            self.data_test = self.load_test()

    def _check_every_class_trains(self, pool: Dataset, train_indices: list[int]) -> None:
        """Refuse a split that leaves a class of the pool without training images (a class with
        few images whose every image went to the validation or calibration split): its exit
        outputs would never be trained, silently."""
        targets = _labels(pool)
        if targets is None:
            return
        in_pool = set(targets.tolist())
        missing = sorted(in_pool - set(targets[torch.as_tensor(train_indices, dtype=torch.long)].tolist()))
        if missing:
            names = self.info.class_names
            named = [names[c] if c < len(names) else str(c) for c in missing]
            counts = [int((targets == c).sum()) for c in missing]
            raise ConfigError(
                "data",
                f"the split leaves class(es) {', '.join(map(repr, named))} ({', '.join(map(str, counts))} image(s) in the "
                "training pool) without a training image: their images all went to the validation or calibration "
                "split; add images of them, or lower data.val_size / data.calib_size, or change seed",
            )

    def _processes(self) -> tuple[int, int]:
        """The attached trainer's ``(world_size, global_rank)``; ``(1, 0)`` without a trainer."""
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: Dataset | None, limit_key: str | None = None) -> DataLoader:
        """An evaluation loader of ``dataset``, in order; with ``limit_key`` (the trainer's
        ``limit_*_batches`` of the stage), under a trainer of several processes each rank reads
        its share of the images once (``_unrepeated_sampler``)."""
        if dataset is None:
            raise RuntimeError("call setup() before asking for a loader")
        sampler = self._unrepeated_sampler(dataset, limit_key) if limit_key else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _unrepeated_sampler(self, dataset: Dataset, limit_key: str) -> UnrepeatedDistributedSampler | None:
        """Under DDP, rank ``r`` of ``n`` reads images ``r, r + n, ...``: every validation and test
        image counted once. (Lightning's own ``DistributedSampler`` pads the split with repeated
        images up to a multiple of ``n``, so the metrics counted some twice.) The ranks then run
        batch counts that differ by at most one, which evaluation allows: the metrics are reduced
        once, at the epoch's end. ``None`` (the plain loader) with one process, with a fraction of
        the batches (``trainer.<limit_key>`` < 1.0: Lightning refuses a fraction that leaves a rank
        less than one batch, which uneven ranks could meet on one rank alone), or with fewer images
        than processes (a rank without a batch would wait forever at that reduction)."""
        replicas, rank = self._processes()
        if replicas < 2:
            return None
        limit = getattr(self.trainer, limit_key, 1.0)
        if isinstance(limit, float) and limit < 1.0:
            return None
        if len(dataset) < replicas:
            if len(dataset):
                log.warning(
                    "%d evaluation image(s) for %d processes: Lightning's sampler repeats some so that every "
                    "process gets one",
                    len(dataset),
                    replicas,
                )
            return None
        return UnrepeatedDistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)

    def train_dataloader(self) -> StatefulDataLoader:
        """The shuffled, resumable training loader (see the class docstring); each image's random
        augmentation is drawn from a seed of its own (``SeededItems``)."""
        if self.data_train is None:
            raise RuntimeError("call setup() before asking for a loader")
        replicas, rank = self._processes()
        sampler = SeededSampler(self.data_train, num_replicas=replicas, rank=rank, shuffle=True, seed=self.split_seed)
        return StatefulDataLoader(
            SeededItems(self.data_train),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, limit_key="limit_val_batches")

    def calib_dataloader(self) -> DataLoader:
        return self._loader(self.data_calib)

    def test_dataloader(self) -> DataLoader:
        if self.data_test is None:
            self.setup("test")
        return self._loader(self.data_test, limit_key="limit_test_batches")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch: a 63-bit hash of the three numbers."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSampler(StatefulDistributedSampler):
    """``StatefulDistributedSampler`` (resumable, shuffled by ``seed + epoch``, sharded across DDP
    ranks) that yields ``(index, sample_seed(seed, epoch, index))`` pairs for ``SeededItems``."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, seed = self.epoch, self.seed
        for index in super().__iter__():
            yield index, sample_seed(seed, epoch, index)


class SeededItems(Dataset):
    """``dataset`` read by ``(index, seed)`` keys: each item is loaded (and randomly augmented)
    with torch's default generator seeded by its own seed, and the generator's state is put back
    afterwards.

    So an image's augmentation depends on the seed, the epoch and the image alone: not on the
    loader worker that reads it nor on the images read before it. A run resumed in the middle of
    an epoch with ``data.num_workers > 0`` (whose workers start afresh) draws the augmentations of
    the uninterrupted run, any worker count draws the same, and in the main process reading does
    not advance the training's random stream. (``Generator.manual_seed`` costs about a
    microsecond; ``torch.manual_seed``, which also seeds every accelerator, 80 times that.)
    Transforms that draw from Python's ``random`` or NumPy are not covered (torchvision's draw
    from torch).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int):
        if not isinstance(key, tuple):  # a loader Lightning rebuilt with its own sampler (overfit_batches)
            return self.dataset[key]
        index, seed = key
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


def _test_source(test_size: int | float | None) -> str:
    return "the data's own test set" if test_size is None else f"held out of the training pool (test_size={test_size})"


def _labels(pool: Dataset) -> Tensor | None:
    """The labels of a training pool ``(N,)`` int64, where the dataset holds them (an
    ``ImageFolder``'s ``targets``, a ``TensorDataset``'s second tensor), else ``None``."""
    if isinstance(pool, torch.utils.data.TensorDataset) and len(pool.tensors) > 1:
        return pool.tensors[1].long()
    targets = getattr(pool, "targets", None)
    return None if targets is None else torch.as_tensor(targets, dtype=torch.long)
