"""The seeded train / val / calibration split: disjoint, and only the training split augmented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eexit.data.image_folder import ImageFolderDataModule, load_image


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
