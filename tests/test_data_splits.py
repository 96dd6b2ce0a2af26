"""The seeded train / val / calibration split: disjoint, and only the training split augmented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eexit.data.image_folder import ImageFolderDataModule, load_image
from tests.conftest import needs_fashion


def _folder(root: Path, per_class: int = 12) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_only_the_training_split_is_augmented(tmp_path: Path) -> None:
    _folder(tmp_path)
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, augment=True, val_size=6, calib_size=6, seed=0)
    dm.setup("calibrate")
    plain = dm.transform(train=False)
    pool = dm.data_train.dataset
    for split in (dm.data_val, dm.data_calib):
        for i in range(len(split)):
            path = pool.samples[split.indices[i]][0]
            x, _ = split[i]
            assert torch.equal(x, plain(load_image(path))), path  # as the test set reads it, every time
            assert torch.equal(x, split[i][0])
    # the training images are still augmented (random crop with zero padding, flip)
    differs = [
        not torch.equal(dm.data_train[i][0], plain(load_image(pool.samples[dm.data_train.indices[i]][0])))
        for i in range(len(dm.data_train))
    ]
    assert sum(differs) > len(differs) // 2
    # the three splits partition the pool
    idx = [set(s.indices) for s in (dm.data_train, dm.data_val, dm.data_calib)]
    assert sum(map(len, idx)) == len(set.union(*idx)) == len(pool)


def test_test_split_is_labelled_by_the_training_classes(tmp_path: Path) -> None:
    _folder(tmp_path, per_class=4)
    (tmp_path / "train" / "c").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "c" / "0.png")
    # the test split has no folder for "b": torchvision alone would number its "c" as 1
    for f in (tmp_path / "test" / "b").iterdir():
        f.rename(tmp_path / "test" / "a" / f"b{f.name}")
    (tmp_path / "test" / "b").rmdir()
    (tmp_path / "test" / "c").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "test" / "c" / "0.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, augment=False, val_size=2, calib_size=2, seed=0)
    dm.setup("test")
    test = dm.data_test
    assert dm.info.class_names == ["a", "b", "c"]
    assert {Path(p).parent.name: t for p, t in test.samples} == {"a": 0, "c": 2}
    # an empty class folder in the training split stays an error (torchvision's, naming it)
    (tmp_path / "train" / "zempty").mkdir()
    with pytest.raises(FileNotFoundError, match="zempty"):
        ImageFolderDataModule(str(tmp_path), image_size=16, augment=False, val_size=2, calib_size=2).setup("fit")
    (tmp_path / "train" / "zempty").rmdir()
    # a class the training split does not have is an error naming the folder and the class
    (tmp_path / "test" / "d").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "test" / "d" / "0.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, augment=False, val_size=2, calib_size=2, seed=0)
    with pytest.raises(ValueError, match=r"test has class folders the training split does not have: \['d'\]"):
        dm.setup("test")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_chans": 1}, r"data.mean has 3 values, data.in_chans=1 needs 1"),
        ({"in_chans": 1, "mean": [0.5], "std": [0.2, 0.2]}, r"data.std has 2 values"),
        ({"in_chans": 2}, r"data.in_chans must be 1 \(grayscale\) or 3"),
        ({"std": [0.2, 0.0, 0.2]}, r"data.std must be positive"),
    ],
)
def test_image_folder_checks_channels_against_normalisation(tmp_path: Path, kwargs: dict, message: str) -> None:
    _folder(tmp_path, per_class=2)
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(str(tmp_path), image_size=16, **kwargs)


@needs_fashion
def test_fashion_mnist_unpacks_safely_when_ranks_start_together(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from eexit.data.fashion_mnist import _FILES, DEBIAN_DIR, prepare_raw_folder

    for trial in range(3):  # ranks of torchrun / SLURM all unpack into one empty cache at once
        root = tmp_path / str(trial)
        with ThreadPoolExecutor(4) as pool:
            done = list(pool.map(prepare_raw_folder, [root] * 4, [Path(DEBIAN_DIR)] * 4))
        assert done == [True] * 4
        raw = root / "FashionMNIST" / "raw"
        assert sorted(p.name for p in raw.iterdir()) == sorted(_FILES)  # no temporary files left
        assert (raw / "t10k-labels-idx1-ubyte").stat().st_size == 10008


def test_a_recorded_split_is_reproduced_by_a_module_with_another_seed() -> None:
    from eexit.data import SyntheticDataModule

    trained = SyntheticDataModule(num_train=256, num_test=32, val_size=0.25, calib_size=32, seed=7)
    trained.setup("calibrate")
    record = trained.split_record()
    assert record == {"seed": 7, "val_size": 0.25, "calib_size": 32, "pool_size": 256}
    later = SyntheticDataModule(num_train=256, num_test=32, seed=42)  # evaluate.py's default seed
    assert later.split_differences(record) == [
        "seed: 7 there, 42 here",
        "val_size: 0.25 there, 0.125 here",
        "calib_size: 32 there, 0.125 here",
    ]
    later.use_split(record)
    assert later.split_differences(record) == []
    later.setup("calibrate")
    assert later.data_calib.indices == trained.data_calib.indices and len(later.data_calib) == 32
    with pytest.raises(RuntimeError, match="before setup"):
        later.use_split(record)


def test_evaluation_refuses_to_recalibrate_on_another_pool(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from eexit.checkpoint import LoadedCheckpoint
    from eexit.config import ConfigError
    from eexit.data import SyntheticDataModule
    from eexit.evaluation.pipeline import _calibration
    from eexit.models import create_model

    net = create_model("resnet_micro", in_chans=1, num_classes=4).eval()
    split = {"seed": 0, "val_size": 0.125, "calib_size": 0.125, "pool_size": 1024}  # trained on 1024 images
    loaded = LoadedCheckpoint(net, {"split": split}, {}, tmp_path / "model.ckpt")
    dm = SyntheticDataModule(num_train=512, num_test=32, seed=0)
    cfg = OmegaConf.create({"router": {}})
    with pytest.raises(ConfigError, match=r"trained on a pool of 1024 images, this data config gives 512"):
        _calibration(loaded, dm, cfg, torch.zeros(2, 1, 16, 16))


@pytest.mark.parametrize("size", [-1, 2.5, float("nan"), "100"])
def test_split_sizes_that_are_neither_counts_nor_fractions_are_refused(size) -> None:
    from eexit.data import SyntheticDataModule

    dm = SyntheticDataModule(num_train=64, num_test=8, val_size=size, calib_size=8, seed=0)
    with pytest.raises(ValueError, match=r"val_size must be a number of images .* got"):
        dm.setup("fit")


def test_hidden_folders_are_no_classes(tmp_path: Path) -> None:
    _folder(tmp_path, per_class=4)
    for split in ("train", "test"):  # a notebook's checkpoint copies, a macOS archive's debris
        for hidden in (".ipynb_checkpoints", "__MACOSX"):
            (tmp_path / split / hidden).mkdir()
            Image.new("RGB", (16, 16)).save(tmp_path / split / hidden / "0-checkpoint.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, augment=False, val_size=2, calib_size=2, seed=0)
    assert dm.info.class_names == ["a", "b"]
    dm.setup("test")
    assert sorted(set(dm.data_train.dataset.targets)) == [0, 1] and len(dm.data_train.dataset) == 8
    assert dm.data_test.classes == ["a", "b"] and len(dm.data_test) == 8


def test_skipping_unreadable_files_may_not_empty_a_class(tmp_path: Path) -> None:
    _folder(tmp_path, per_class=4)
    (tmp_path / "train" / "c").mkdir()
    for i in range(3):
        (tmp_path / "train" / "c" / f"{i}.png").write_bytes(b"not a png")
    dm = ImageFolderDataModule(
        str(tmp_path), image_size=16, augment=False, val_size=2, calib_size=2, seed=0, bad_files="skip"
    )
    with pytest.raises(FileNotFoundError, match=r"class folder\(s\) c of .*train hold no readable image"):
        dm.setup("fit")


def test_a_split_that_leaves_a_class_without_training_images_is_refused(tmp_path: Path) -> None:
    # a class with one image, which the split sends to validation or calibration: its exit
    # outputs would never be trained (random_split is not stratified)
    from eexit.config import ConfigError

    _folder(tmp_path, per_class=6)
    (tmp_path / "train" / "rare").mkdir()
    Image.new("L", (16, 16), 200).save(tmp_path / "train" / "rare" / "0.png")
    refused = 0
    for seed in range(6):
        dm = ImageFolderDataModule(str(tmp_path), image_size=16, augment=False, val_size=4, calib_size=4, seed=seed)
        pool_index = len(dm.load_pool()) - 1  # 'rare' sorts last: its image is the pool's last
        try:
            dm.setup("fit")
        except ConfigError as err:
            assert "'rare' (1 image(s) in the training pool) without a training image" in str(err)
            refused += 1
            # evaluating or calibrating a trained model on such a pool trains nothing: allowed
            again = ImageFolderDataModule(
                str(tmp_path), image_size=16, augment=False, val_size=4, calib_size=4, seed=seed
            )
            again.setup("test")
            assert pool_index not in again.data_train.indices and len(again.data_test) == 12
        else:
            assert pool_index in dm.data_train.indices
    assert 0 < refused < 6  # some seeds send the image to training, some do not


def test_a_cifar_tarball_without_a_test_split_is_refused_before_it_is_kept(tmp_path: Path) -> None:
    import tarfile

    from eexit.data.image_folder import CIFAR10DataModule

    src = tmp_path / "src" / "cifar10" / "train" / "cat"
    src.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(src / "0.png")
    tarball = tmp_path / "c.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar10", arcname="cifar10")
    with pytest.raises(FileNotFoundError, match=r"does not unpack to one folder with train/ and test/"):
        CIFAR10DataModule(source=str(tarball), data_dir=str(tmp_path / "data"))
    assert not (tmp_path / "data" / "cifar10").exists()  # no half data set left for the next run


def test_a_cifar_tarball_without_images_or_no_tarball_is_refused_and_a_bad_cache_is_named(tmp_path: Path) -> None:
    import tarfile

    from eexit.config import ConfigError
    from eexit.data.image_folder import CIFAR10DataModule

    for split in ("train", "test"):
        (tmp_path / "src" / "cifar10" / split).mkdir(parents=True)  # split folders without classes
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar10", arcname="cifar10")
    data = tmp_path / "data"
    with pytest.raises(ConfigError, match=r"data\.source.*without class folders of images"):
        CIFAR10DataModule(source=str(empty), data_dir=str(data))
    assert not (data / "cifar10").exists()
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(ConfigError, match=r"data\.source.*junk\.tar\.gz cannot be unpacked"):
        CIFAR10DataModule(source=str(junk), data_dir=str(data))
    # a folder left by an earlier unpack (before this check) is named, not used silently
    for split in ("train", "test"):
        (data / "cifar10" / split).mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holds no class folders with images.*delete it to unpack"):
        CIFAR10DataModule(source=str(empty), data_dir=str(data))


def _idx(n: int, images: bool) -> bytes:
    dims = [n, 28, 28] if images else [n]
    header = (0x800 + len(dims)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + bytes(int(np.prod(dims)))


def test_fashion_mnist_refuses_source_files_that_are_no_idx_files_and_repairs_a_broken_cache(tmp_path: Path) -> None:
    import gzip

    from eexit.config import ConfigError
    from eexit.data.fashion_mnist import _FILES, idx_problem, prepare_raw_folder

    source = tmp_path / "source"
    source.mkdir()
    for f in _FILES:
        (source / f"{f}.gz").write_bytes(gzip.compress(_idx(3, "images" in f)))
    root = tmp_path / "cache"
    raw = root / "FashionMNIST" / "raw"
    assert prepare_raw_folder(root, source) and all(idx_problem(raw / f) is None for f in _FILES)
    # a cached file cut short (an earlier unpack of a wrong source) is unpacked again, not kept
    (raw / _FILES[0]).write_bytes((raw / _FILES[0]).read_bytes()[:100])
    assert "bytes where its header promises" in idx_problem(raw / _FILES[0])
    assert prepare_raw_folder(root, source) and idx_problem(raw / _FILES[0]) is None
    # without a source to repair it from, the broken cached file is named
    (raw / _FILES[1]).write_bytes(b"junk")
    with pytest.raises(ConfigError, match=rf"data\.data_dir.*{_FILES[1]} is no idx file"):
        prepare_raw_folder(root, tmp_path / "nowhere")
    # sources that are not gzip, or no idx file inside, are named and leave nothing behind
    for name, content, message in (
        ("junk", b"not gzip at all", "cannot be unpacked"),
        ("labels_as_images", gzip.compress(_idx(3000, False)), "magic number 0x00000801, expected 0x00000803"),
    ):
        bad = tmp_path / name
        bad.mkdir()
        for f in _FILES:
            (bad / f"{f}.gz").write_bytes(content if "train-images" in f else gzip.compress(_idx(3, "images" in f)))
        fresh = tmp_path / f"cache_{name}"
        with pytest.raises(ConfigError, match=rf"data\.source_dir.*train-images-idx3-ubyte\.gz.*{message}"):
            prepare_raw_folder(fresh, bad)
        assert not (fresh / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
        assert not list((fresh / "FashionMNIST" / "raw").glob(".*partial"))


def test_gif_images_train_as_eexit_predict_serves_them(tmp_path: Path) -> None:
    # torchvision's ImageFolder leaves .gif files out, silently
    _folder(tmp_path, per_class=4)
    Image.new("P", (16, 16), 7).save(tmp_path / "train" / "a" / "anim.gif")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, augment=False, val_size=2, calib_size=2, seed=0)
    pool = dm.load_pool()
    assert str(tmp_path / "train" / "a" / "anim.gif") in [p for p, _ in pool.samples] and len(pool) == 9
    x, y = pool[[p for p, _ in pool.samples].index(str(tmp_path / "train" / "a" / "anim.gif"))]
    assert x.shape == (3, 16, 16) and y == 0


def test_synthetic_images_smaller_than_a_shape_are_refused() -> None:
    from eexit.data.synthetic import make_shapes

    with pytest.raises(ValueError, match="image_size must be at least 4"):
        make_shapes(2, image_size=3)
    assert make_shapes(2, image_size=4)[0].shape == (2, 1, 4, 4)


def test_training_reads_the_files_predict_reads_and_skips_the_hidden_ones(tmp_path: Path) -> None:
    # macOS's ._ resource files (hidden, ending in .png) stopped training with bad_files=fail while
    # predict skipped them; .jfif JPEGs were left out of training without a word
    _folder(tmp_path, per_class=4)
    a = tmp_path / "train" / "a"
    (a / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (a / ".notes").mkdir()
    Image.new("RGB", (16, 16)).save(a / ".notes" / "x.png")
    Image.new("RGB", (16, 16)).save(a / "photo.jfif", format="JPEG")
    (a / "readme.txt").write_text("not an image")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, augment=False, val_size=2, calib_size=2, seed=0)
    names = sorted(Path(p).name for p, _ in dm.load_pool().samples)
    assert names == sorted([*(f"{i}.png" for i in range(4)), *(f"{i}.png" for i in range(4)), "photo.jfif"])
    # a class folder without any file read is named with what is read
    (tmp_path / "train" / "c").mkdir()
    (tmp_path / "train" / "c" / "scan.pdf").write_bytes(b"%PDF-1.4")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, augment=False, val_size=2, calib_size=2, seed=0)
    with pytest.raises(
        FileNotFoundError, match=r"class folder\(s\) 'c' of .*train hold no image file \(read: .*\.jfif"
    ):
        dm.setup("fit")


def test_an_unreadable_held_out_image_is_found_before_training(tmp_path: Path) -> None:
    # the test and calibration images were read only after the fit: a bad one ended a finished
    # training without its test, calibration and bundle
    from eexit.data.image_folder import CorruptImageError

    _folder(tmp_path, per_class=6)
    (tmp_path / "test" / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, augment=False, val_size=2, calib_size=2, seed=0)
    with pytest.raises(
        CorruptImageError, match=r"1 unreadable image\(s\) among the 16 held out .*3\.png.*bad_files=skip"
    ):
        dm.setup("fit")
    # a bad training image is left to the epoch that reads it (its message says what to do)
    (tmp_path / "test" / "b" / "3.png").unlink()
    (tmp_path / "train" / "a" / "5.png").write_bytes(b"")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, augment=False, val_size=0, calib_size=0, seed=0)
    dm.setup("fit")
    pool = dm.data_train.dataset
    with pytest.raises(CorruptImageError, match=r"5\.png: .*data\.bad_files=skip"):
        pool[[Path(p).name for p, _ in pool.samples].index("5.png")]


def test_a_folder_of_class_folders_holds_its_test_split_out(tmp_path: Path) -> None:
    from eexit.config import ConfigError

    _folder(tmp_path, per_class=10)
    plain = tmp_path / "train"  # root/<class>/*.png, no test folder of its own
    with pytest.raises(
        FileNotFoundError, match=r"holds the class folders itself: data\.train_dir=\. data\.test_dir=null"
    ):
        ImageFolderDataModule(str(plain), image_size=16)
    with pytest.raises(ConfigError, match=r"data\.test_dir.*is the training folder"):
        ImageFolderDataModule(str(plain), image_size=16, train_dir=".", test_dir=".")
    kwargs = {"image_size": 16, "augment": False, "val_size": 2, "calib_size": 3, "seed": 0}
    dm = ImageFolderDataModule(str(plain), train_dir=".", test_dir=None, test_size=0.25, **kwargs)
    dm.setup("fit")
    parts = [set(s.indices) for s in (dm.data_train, dm.data_val, dm.data_calib, dm.data_test)]
    assert [len(p) for p in parts] == [10, 2, 3, 5] and len(set.union(*parts)) == 20  # disjoint, the whole pool
    assert dm.split_record()["test_size"] == 0.25 and len(dm.test_dataloader().dataset) == 5
    # an evaluation with a test folder of its own cannot rebuild that split
    other = ImageFolderDataModule(str(tmp_path), **kwargs)
    assert other.split_differences(dm.split_record()) == ["test_size: 0.25 there, None here"]
    with pytest.raises(ConfigError, match=r"data\.test_size.*held out of the training pool"):
        other.use_split(dm.split_record())
    # a module with a test set of its own records no test_size (as records did before it)
    assert "test_size" not in other.split_record() and other.split_differences(other.split_record()) == []


def test_a_validation_folder_that_is_not_read_is_named(tmp_path: Path, caplog) -> None:
    _folder(tmp_path, per_class=4)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with caplog.at_level("WARNING", logger="eexit.data.image_folder"):
        ImageFolderDataModule(str(tmp_path), image_size=16)
    assert "val is not read: the validation and calibration images are held out of" in caplog.text


def test_under_ddp_each_rank_reads_its_share_of_the_validation_and_test_images_once() -> None:
    """Lightning's DistributedSampler pads an evaluation split to a multiple of the processes with
    repeated images (counted twice in the metrics); the data module's sampler gives each image to
    one rank, once, and being a DistributedSampler it is kept by Lightning as it is."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    from eexit.data import SyntheticDataModule

    dm = SyntheticDataModule(num_train=96, num_test=33, val_size=17, calib_size=16, seed=0)
    dm.setup("fit")
    dm.setup("test")
    for loader_of, n in ((dm.val_dataloader, 17), (dm.test_dataloader, 33)):
        seen = []
        for rank in range(2):
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
            loader = loader_of()
            assert isinstance(loader.sampler, DistributedSampler)
            seen += [float(v) for x, _ in loader for v in x.flatten(1).double().sum(1)]
        dm.trainer = None
        single = [float(v) for x, _ in loader_of() for v in x.flatten(1).double().sum(1)]
        assert len(seen) == n and sorted(seen) == sorted(single)
    dm.trainer = SimpleNamespace(world_size=40, global_rank=0)  # fewer images than processes: Lightning's
    assert not isinstance(dm.val_dataloader().sampler, DistributedSampler)
    # a fraction of the batches: Lightning's (equal shares; a fraction of an uneven share could
    # leave one rank less than a batch, which Lightning refuses on that rank alone)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, limit_val_batches=0.5, limit_test_batches=1.0)
    assert not isinstance(dm.val_dataloader().sampler, DistributedSampler)
    assert isinstance(dm.test_dataloader().sampler, DistributedSampler)


class _RandomlyAugmented(torch.utils.data.Dataset):
    """Test helper: item ``i`` is ``(i, a draw of torch's default generator)``, as a random
    augmentation draws."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int):
        return i, torch.rand(())


def _draws(loader) -> list[tuple[int, float]]:
    return [(int(i), float(v)) for idx, vals in loader for i, v in zip(idx, vals, strict=True)]


def test_training_augmentation_is_drawn_per_image_whatever_the_workers_and_after_a_resume() -> None:
    """An image's augmentation depends on the seed, the epoch and the image alone: the same with 0
    or 2 loader workers, the same when a loader resumed in the middle of an epoch starts fresh
    workers, different in the next epoch; reading in the main process leaves the global random
    stream where it was."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from eexit.data import SyntheticDataModule

    def loader(workers: int, epoch: int = 0, dataset=None) -> StatefulDataLoader:
        dm = SyntheticDataModule(num_train=64, num_test=8, seed=3, batch_size=4, num_workers=workers)
        dm.data_train = _RandomlyAugmented() if dataset is None else dataset
        out = dm.train_dataloader()
        out.sampler.set_epoch(epoch)
        return out

    torch.manual_seed(0)
    in_main = _draws(loader(0))
    after_augmenting = torch.get_rng_state()
    torch.manual_seed(0)
    _draws(loader(0, dataset=[(i, 0.0) for i in range(24)]))  # the loader's own seed draw only
    assert torch.equal(torch.get_rng_state(), after_augmenting)
    assert len({v for _, v in in_main}) == 24 and sorted(i for i, _ in in_main) == list(range(24))
    assert _draws(loader(2)) == in_main
    assert dict(_draws(loader(0, epoch=1))).keys() == dict(in_main).keys()
    assert all(dict(_draws(loader(0, epoch=1)))[i] != v for i, v in in_main)
    # resumed after 2 of 6 batches, with 2 workers started afresh
    killed = loader(2)
    it = iter(killed)
    next(it), next(it)
    state = killed.state_dict()
    resumed = loader(2)
    resumed.load_state_dict(state)
    assert _draws(resumed) == in_main[8:]


def test_fractional_split_sizes_round_to_the_nearest_image_and_limit_train_keeps_the_first_images() -> None:
    from eexit.data import SyntheticDataModule

    dm = SyntheticDataModule(num_train=20, num_test=4, val_size=0.19, calib_size=0.26, seed=0)
    dm.setup("calibrate")
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_calib)) == (11, 4, 5)  # 3.8 -> 4, 5.2 -> 5
    full = SyntheticDataModule(num_train=64, num_test=4, val_size=8, calib_size=8, seed=0)
    full.setup("fit")
    limited = SyntheticDataModule(num_train=64, num_test=4, val_size=8, calib_size=8, seed=0, limit_train=10)
    limited.setup("fit")
    assert len(limited.data_train) == 10
    assert [limited.data_train.dataset.indices[i] for i in limited.data_train.indices] == full.data_train.indices[:10]


def test_held_out_splits_that_take_the_whole_pool_are_refused() -> None:
    from eexit.config import ConfigError
    from eexit.data import SyntheticDataModule

    with pytest.raises(ConfigError, match=r"val_size \+ calib_size \(16 \+ 16\) leave no training images out of 32"):
        SyntheticDataModule(num_train=32, num_test=4, val_size=16, calib_size=16).setup("calibrate")
    SyntheticDataModule(num_train=33, num_test=4, val_size=16, calib_size=16).setup("calibrate")  # one left


def _expected_sample_seed(seed: int, epoch: int, index: int) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest(), "little") >> 1


def test_the_training_order_follows_the_data_seed_and_epoch_and_each_rank_takes_its_share() -> None:
    """The training sampler shuffles as torch's DistributedSampler does, with the data module's
    seed plus the epoch (``randperm`` of a generator seeded so), rank ``r`` of 2 taking positions
    ``r, r + 2, ...``, and pairs each index with the hash of (seed, epoch, index)."""
    from types import SimpleNamespace

    from eexit.data import SyntheticDataModule

    def pairs(seed: int, epoch: int, world: int = 1, rank: int = 0) -> list[tuple[int, int]]:
        dm = SyntheticDataModule(num_train=64, num_test=4, seed=seed, batch_size=4)
        dm.data_train = [(i, 0) for i in range(48)]
        if world > 1:
            dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        sampler = dm.train_dataloader().sampler
        sampler.set_epoch(epoch)
        return list(sampler)

    for seed, epoch in ((5, 0), (5, 1), (9, 0)):
        order = torch.randperm(48, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        assert pairs(seed, epoch) == [(i, _expected_sample_seed(seed, epoch, i)) for i in order]
        for rank in (0, 1):
            assert [i for i, _ in pairs(seed, epoch, world=2, rank=rank)] == order[rank::2]
    assert pairs(5, 0) != pairs(9, 0)


def test_the_generated_test_set_shares_no_image_with_the_training_pool() -> None:
    from eexit.data import SyntheticDataModule

    dm = SyntheticDataModule(num_train=32, num_test=32, seed=3)  # equal sizes: one seed would draw the same images
    pool, test = dm.load_pool().tensors[0].flatten(1), dm.load_test().tensors[0].flatten(1)
    assert torch.cdist(test, pool).min() > 1.0  # noise alone puts two images far apart


@needs_fashion
def test_fashion_mnist_is_normalised_by_the_training_mean_and_std() -> None:
    from eexit.data import FashionMNISTDataModule
    from eexit.data.fashion_mnist import DEBIAN_DIR
    from tests.conftest import ROOT

    dm = FashionMNISTDataModule(data_dir=str(ROOT / "data"), source_dir=DEBIAN_DIR)
    x = dm.load_test().tensors[0]
    assert x.shape == (10_000, 1, 28, 28)
    # black pixels (0) and white ones (255) after (x / 255 - 0.2860) / 0.3530
    assert float(x.min()) == pytest.approx(-0.2860 / 0.3530, abs=1e-6)
    assert float(x.max()) == pytest.approx((1 - 0.2860) / 0.3530, abs=1e-6)
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01  # the test set's statistics are close


def test_training_with_overfit_batches_reads_the_items_lightning_asks_for(tmp_path) -> None:
    """``trainer.overfit_batches`` rebuilds the training loader with Lightning's own sequential
    sampler, which gives plain indices: the seeded items take them as they are."""
    from eexit.data.base import SeededItems
    from eexit.training import train
    from tests.conftest import compose_train

    items = SeededItems([(i, -i) for i in range(4)])
    assert items[2] == (2, -2) and items[(3, 7)] == (3, -3)
    cfg = compose_train(
        tmp_path,
        [
            "data=synthetic",
            "model=micro",
            "debug=fdr",
            "logger=none",
            "callbacks=none",
            "test=false",
            "router.calibrate=false",
            "+trainer.overfit_batches=2",
        ],
    )
    _, objs = train(cfg)
    assert objs["trainer"].global_step == 1


# ---------------------------------------------- mutation audit: which files and labels a folder gives


def test_image_endings_are_read_whatever_their_case(tmp_path: Path) -> None:
    _folder(tmp_path, per_class=2)
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "a" / "CAMERA.JPG", format="JPEG")
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "b" / "Scan.Png", format="PNG")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, augment=False, val_size=0, calib_size=0, seed=0)
    files = {Path(p).relative_to(tmp_path / "train").as_posix(): t for p, t in dm.load_pool().samples}
    assert files == {"a/0.png": 0, "a/1.png": 0, "a/CAMERA.JPG": 0, "b/0.png": 1, "b/1.png": 1, "b/Scan.Png": 1}


def test_an_image_that_is_not_square_is_resized_and_centre_cropped(tmp_path: Path) -> None:
    _folder(tmp_path, per_class=2)
    wide = np.zeros((16, 48, 3), dtype=np.uint8)
    wide[:, 16:32] = 255  # the middle third is white: the centre crop of the 16 x 16 resize
    Image.fromarray(wide).save(tmp_path / "train" / "a" / "wide.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, augment=False, val_size=0, calib_size=0, seed=0)
    pool = dm.load_pool()
    x, _ = pool[[Path(p).name for p, _ in pool.samples].index("wide.png")]
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x, torch.full_like(x, (1.0 - 0.5) / 0.25))  # all white, normalised


def test_a_folder_refuses_an_unknown_bad_files_setting(tmp_path: Path) -> None:
    from eexit.data.image_folder import CheckedImageFolder

    _folder(tmp_path, per_class=2)
    with pytest.raises(ValueError, match=r"bad_files must be 'fail' or 'skip', got 'ignore'"):
        CheckedImageFolder(str(tmp_path / "train"), bad_files="ignore")
    with pytest.raises(ValueError, match=r"data\.bad_files must be 'fail' or 'skip', got 'ignore'"):
        ImageFolderDataModule(str(tmp_path), image_size=16, bad_files="ignore")


def test_skipped_files_leave_the_labels_in_step_with_the_images_and_are_counted_over_the_splits(
    tmp_path: Path,
) -> None:
    from eexit.data.image_folder import CheckedImageFolder

    _folder(tmp_path, per_class=3)
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"not a png")
    (tmp_path / "test" / "b" / "2.png").write_bytes(b"")
    folder = CheckedImageFolder(str(tmp_path / "train"), bad_files="skip")
    assert folder.skipped == [str(tmp_path / "train" / "a" / "1.png")]
    assert folder.targets == [t for _, t in folder.samples] == [0, 0, 1, 1, 1]
    dm = ImageFolderDataModule(
        str(tmp_path), image_size=16, augment=False, val_size=1, calib_size=1, seed=0, bad_files="skip"
    )
    dm.setup("test")  # the training pool and the test folder are both read
    assert sorted(Path(p).relative_to(tmp_path).as_posix() for p in dm.skipped_files) == [
        "test/b/2.png",
        "train/a/1.png",
    ]


def test_skipping_may_leave_a_test_class_without_images(tmp_path: Path) -> None:
    """A test split may lack a class (allow_empty), also once its unreadable files are skipped;
    the training split may not (``test_skipping_unreadable_files_may_not_empty_a_class``)."""
    _folder(tmp_path, per_class=3)
    for f in (tmp_path / "test" / "b").iterdir():
        f.write_bytes(b"broken")
    dm = ImageFolderDataModule(
        str(tmp_path), image_size=16, augment=False, val_size=1, calib_size=1, seed=0, bad_files="skip"
    )
    dm.setup("test")
    assert [t for _, t in dm.data_test.samples] == [0, 0, 0] and len(dm.data_test.skipped) == 3


def test_an_unreadable_calibration_image_is_found_before_training(tmp_path: Path) -> None:
    """The held-out check reads the files of the validation and calibration subsets of the pool
    (their indices into it), not the pool's first files."""
    from eexit.data.image_folder import CorruptImageError

    _folder(tmp_path, per_class=6)
    kwargs = {"image_size": 16, "augment": False, "val_size": 2, "calib_size": 2, "seed": 0}
    probe = ImageFolderDataModule(str(tmp_path), **kwargs)
    probe.setup("test")
    pool = probe.data_train.dataset
    index = max(probe.data_calib.indices)
    assert index >= 4 and index not in probe.data_val.indices  # not among the pool's first files
    path = pool.samples[index][0]
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n cut")
    with pytest.raises(CorruptImageError, match=rf"1 unreadable image\(s\) among the 16 held out .*{Path(path).name}"):
        ImageFolderDataModule(str(tmp_path), **kwargs).setup("fit")
