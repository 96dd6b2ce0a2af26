"""NaN guard and unreadable training images."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from eexit.checkpoint import load_checkpoint
from eexit.data.image_folder import CorruptImageError
from eexit.training import train
from tests.conftest import compose_train


class PoisonWeightsAt(pl.Callback):
    """Test helper: sets the stem's weights to NaN before the given global step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net.backbone.stem[0].weight.fill_(float("nan"))


def test_non_finite_loss_stops_training_naming_step_and_term_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    # synthetic: 384 training images / 32 = 12 steps an epoch; a checkpoint each epoch; NaN at step 15
    overrides = [
        "data=synthetic",
        "model=micro",
        "logger=csv",
        "trainer.max_epochs=3",
        "router.calibrate=false",
        "+callbacks.poison._target_=tests.test_reliability.PoisonWeightsAt",
        "+callbacks.poison.step=15",
    ]
    cfg = compose_train(tmp_path, overrides)
    with pytest.raises(FloatingPointError, match=r"non-finite train loss at global step 15 .*bad terms: .*ce/tiny"):
        train(cfg)
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    assert last.is_file(), "the checkpoint of the last good epoch must survive"
    loaded = load_checkpoint(last)
    assert all(torch.isfinite(p).all() for p in loaded.net.parameters())
    assert torch.load(last, weights_only=False)["global_step"] == 12


def _image_folder(root: Path, broken: dict[str, bytes]) -> None:
    for split in ("train", "test"):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (16, 16), (40 * i, 100 * c, 0)).save(d / f"{i}.png")
    for name, content in broken.items():
        (root / "train" / "c0" / name).write_bytes(content)


def _folder_overrides(root: Path) -> list[str]:
    return [
        "data=image_folder",
        f"data.root={root}",
        "data.image_size=16",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.val_size=2",
        "data.calib_size=2",
        "model=micro",
        "logger=none",
        "router.calibrate=false",
        "trainer.max_epochs=1",
    ]


def test_corrupt_training_image_is_named_in_the_error(tmp_path: Path) -> None:
    _image_folder(tmp_path / "imgs", {"broken.png": b"\x89PNG\r\n\x1a\n not really"})
    cfg = compose_train(tmp_path, _folder_overrides(tmp_path / "imgs"))
    with pytest.raises(CorruptImageError, match=re.escape(str(tmp_path / "imgs" / "train" / "c0" / "broken.png"))):
        train(cfg)


def test_skip_policy_leaves_out_and_counts_unreadable_images(tmp_path: Path) -> None:
    _image_folder(tmp_path / "imgs", {"broken.png": b"garbage", "empty.jpg": b""})
    cfg = compose_train(tmp_path, [*_folder_overrides(tmp_path / "imgs"), "debug=fdr", "data.bad_files=skip"])
    _, objs = train(cfg)
    skipped = objs["datamodule"].skipped_files
    assert sorted(Path(p).name for p in skipped) == ["broken.png", "empty.jpg"]


def test_same_seed_and_deterministic_flag_give_identical_weights(tmp_path: Path) -> None:
    overrides = [
        "data=synthetic",
        "model=micro",
        "logger=none",
        "router.calibrate=false",
        "trainer.max_epochs=2",
        "trainer.deterministic=true",
        "seed=123",
        "test=false",
    ]
    weights = []
    for run in ("a", "b"):
        cfg = compose_train(tmp_path / run, overrides)
        _, objs = train(cfg)
        weights.append({k: v.clone() for k, v in objs["model"].net.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    cfg = compose_train(tmp_path / "c", [*overrides[:-2], "seed=124", "test=false"])
    _, objs = train(cfg)
    other = objs["model"].net.state_dict()
    assert not all(torch.equal(weights[0][k], other[k]) for k in weights[0]), "the seed must matter"
