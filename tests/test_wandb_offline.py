"""W&B in offline mode into a temp dir: the run's files hold the logged metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import eexit.evaluation.plots as plots
import eexit.lit.cam_logging as cam_logging
from eexit.lit.cam_logging import CamOverlayLogger
from eexit.models import create_model
from eexit.training import train
from tests.conftest import compose_train


def _records(run_file: Path):
    """Yield the protobuf records of a ``.wandb`` file (LevelDB-log framing: 32 KiB blocks of
    chunks with a 7-byte header: crc32, little-endian length, type FULL/FIRST/MIDDLE/LAST)."""
    data, block, pos, pending = run_file.read_bytes(), 32768, 7, b""  # 7-byte file header ":W&B"
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # trailer too small for a header: skip to the next block
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def _parse_values(run_file: Path) -> dict[str, float] | None:
    """The last logged value of every history and summary key, or ``None`` while the file does
    not yet end in the run's exit record (W&B's service may still be writing it)."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    values: dict[str, float] = {}
    exited = False
    try:
        for raw in _records(run_file):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            exited = exited or record.HasField("exit")
            items = []
            if record.HasField("history"):
                items = record.history.item
            elif record.HasField("summary"):
                items = record.summary.update
            for item in items:
                key = item.key or "/".join(item.nested_key)
                try:
                    values[key] = json.loads(item.value_json)
                except ValueError:
                    continue
    except DecodeError:  # a record cut short: the writer has not flushed it yet
        return None
    return values if exited else None


def _read_offline_run(run_file: Path, timeout_s: float = 60.0) -> dict[str, float]:
    """The last logged value of every key of a finished offline run; waits for W&B's service
    to finish writing the file (``run.finish()`` can return before the last records land)."""
    deadline = time.monotonic() + timeout_s
    while (values := _parse_values(run_file)) is None:
        assert time.monotonic() < deadline, f"{run_file} has no exit record after {timeout_s} s"
        time.sleep(0.2)
    return values


def test_wandb_offline_run_contains_logged_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # fast_dev_run silences loggers, so this is a short real run
    overrides = ["data=synthetic", "model=micro", "debug=quick", "logger=wandb", "trainer.log_every_n_steps=5"]
    metrics, _objs = train(compose_train(tmp_path, overrides))
    import wandb

    assert wandb.run is None, "train() finishes the W&B run it started"
    run_files = list((tmp_path / "out").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, list((tmp_path / "out").rglob("*"))
    logged = _read_offline_run(run_files[0])
    for key in (
        "val/acc/heavy",
        "val/acc/tiny",
        "test/acc/heavy",
        "train/loss/attn_kl",
        "train_step/loss/attn_kl",
        "val/attn_kl/tiny",
    ):
        assert key in logged, f"{key} missing from the W&B run; logged: {sorted(logged)[:20]}"
    assert logged["test/acc/heavy"] == pytest.approx(metrics["test/acc/heavy"], abs=1e-6)
    # the cam overlays of fixed validation images, one figure per epoch (CamOverlayLogger;
    # debug=quick trains one epoch)
    (cam_figure,) = run_files[0].parent.glob("files/media/images/val/cams_*.png")
    from PIL import Image

    with Image.open(cam_figure) as im:  # a grid: the image and 4 exits across, 8 images down
        assert 0.4 < im.width / im.height < 0.9, im.size
    csv_files = list((tmp_path / "out").glob("csv/**/metrics.csv"))
    assert csv_files and "val/acc/heavy" in csv_files[0].read_text(), "the CSV log is kept beside W&B"


def test_each_job_of_a_multirun_gets_its_own_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ``train`` calls in one process (what ``train.py -m`` does): two runs, not one reused."""
    for name, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(name, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    overrides = ["data=synthetic", "model=micro", "debug=quick", "logger=wandb", "router.calibrate=false"]
    results = {}
    for weight in (0.0, 0.5):
        job = tmp_path / f"job_{weight}"
        metrics, _ = train(compose_train(job, [*overrides, f"model.loss.attn_weight={weight}"]))
        (run_file,) = (job / "out").glob("wandb/offline-run-*/run-*.wandb")
        results[weight] = (run_file.parent.name, metrics, _read_offline_run(run_file))
    assert results[0.0][0] != results[0.5][0]
    for _, metrics, logged in results.values():
        assert logged["test/acc/heavy"] == pytest.approx(metrics["test/acc/heavy"], abs=1e-6)


def test_online_wandb_without_a_login_is_a_config_error(tmp_path: Path) -> None:
    """``logger.wandb.offline=false`` without ``wandb login``: one error line naming the key and
    the two ways out, not W&B's traceback from inside the first log call. (In a child process:
    W&B keeps its settings per process, so an offline run before would make this one offline.)"""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "config"))
    overrides = ["data=synthetic", "model=micro", "debug=fdr", "router.calibrate=false", "logger=wandb"]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *overrides,
            "logger.wandb.offline=false",
            f"hydra.run.dir={tmp_path}/o",  # not the project's logs/ (paths.output_dir follows it)
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config key 'logger.wandb': W&B could not start the run" in proc.stderr, proc.stderr[-2000:]
    assert "logger.wandb.offline=true" in proc.stderr and "Traceback" not in proc.stderr


def test_a_resumed_run_continues_the_wandb_run_of_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """The checkpoint records its W&B run; the resume logs into it (offline: a second local part
    with the same id, which ``wandb sync`` uploads into one run), also after a part without W&B."""
    import torch

    for name, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(name, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    overrides = [
        "data=synthetic",
        "model=micro",
        "model.scheduler=null",
        "trainer.max_epochs=3",
        "+trainer.limit_train_batches=4",
        "+trainer.limit_val_batches=2",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "router.calibrate=false",
        "test=false",
    ]

    def run(part: str, extra: list[str]) -> str | None:
        train(compose_train(tmp_path / part, [*overrides, *extra]))
        runs = sorted((tmp_path / part / "out").glob("wandb/offline-run-*"))
        return runs[0].name.rsplit("-", 1)[1] if runs else None

    last = tmp_path / "a" / "out" / "checkpoints" / "last.ckpt"  # the resumed parts write there too
    first_id = run("a", ["logger=wandb", "+trainer.max_steps=3"])
    assert first_id and torch.load(last, weights_only=False)["eexit"]["wandb_run"] == first_id
    # a part without W&B keeps the id in its checkpoints
    assert run("b", ["logger=csv", "+trainer.max_steps=6", f"ckpt_path={last}"]) is None
    assert torch.load(last, weights_only=False)["eexit"]["wandb_run"] == first_id
    assert run("c", ["logger=wandb", "+trainer.max_steps=9", f"ckpt_path={last}"]) == first_id
    logged = _read_offline_run(next((tmp_path / "c" / "out").glob("wandb/offline-run-*/run-*.wandb")))
    assert logged["trainer/global_step"] >= 6, "the resumed part logs the global steps after the resume"
    # an id given in the config wins over the checkpoint's
    own = run("d", ["logger=wandb", "logger.wandb.id=myownrun1", "+trainer.max_steps=12", f"ckpt_path={last}"])
    assert own == "myownrun1"


class _FakeWandb:
    """Stands for a ``WandbLogger``: records ``log_image`` calls."""

    def __init__(self) -> None:
        self.images: list[dict] = []

    def log_image(self, key, images, step=None, caption=None) -> None:
        self.images.append({"key": key, "images": images, "step": step, "caption": caption})


def _trainer(logger: _FakeWandb, epoch: int, sanity: bool = False) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    data_val = [(torch.randn(1, 16, 16, generator=g), i % 3) for i in range(5)]
    info = SimpleNamespace(class_names=["circle", "square"], mean=(0.5,), std=(0.25,))
    return SimpleNamespace(
        loggers=[logger],
        sanity_checking=sanity,
        is_global_zero=True,
        current_epoch=epoch,
        global_step=7,
        datamodule=SimpleNamespace(data_val=data_val, info=info),
    )


@pytest.fixture
def grids(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The ``heatmap_grid`` calls (images and titles), with W&B replaced by ``_FakeWandb``."""
    calls: list[dict] = []

    def grid(images, cams, path, titles=None):
        calls.append({"images": images, "titles": titles})
        return Path(path)

    monkeypatch.setattr(cam_logging, "WandbLogger", _FakeWandb)
    monkeypatch.setattr(plots, "heatmap_grid", grid)
    return calls


def test_cam_overlays_every_n_epochs_in_the_nth_epochs_only(grids: list[dict]) -> None:
    """Pins the epoch rule: with ``every_n_epochs=2`` the figure is logged after epochs 1 and 3
    (the 2nd and 4th), not 0 and 2, and never in the sanity check; the grid holds the first
    ``num_images`` validation images, titled by class name (the index past the names)."""
    torch.manual_seed(0)
    module = SimpleNamespace(net=create_model("resnet_micro", in_chans=1, num_classes=3, head="mlp"), device="cpu")
    callback = CamOverlayLogger(num_images=4, every_n_epochs=2)
    logger = _FakeWandb()
    for epoch in range(4):
        callback.on_validation_epoch_end(_trainer(logger, epoch), module)
    callback.on_validation_epoch_end(_trainer(logger, 1, sanity=True), module)
    assert [c["caption"] for c in logger.images] == [
        ["epoch 1: cams of TINY .. HEAVY for the label"],
        ["epoch 3: cams of TINY .. HEAVY for the label"],
    ]
    assert all(c["key"] == "val/cams" and c["step"] == 7 for c in logger.images)
    assert len(grids) == 2 and grids[0]["images"].shape[0] == 4
    assert grids[0]["titles"] == ["circle", "square", "2", "circle"]


@pytest.mark.parametrize("kwargs", [{"num_images": 0}, {"every_n_epochs": 0}])
def test_cam_overlays_need_one_image_and_one_epoch(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        CamOverlayLogger(**kwargs)
