"""Resume after SIGKILL in the middle of an epoch: the same weights and metrics as an uninterrupted run."""

from __future__ import annotations

import csv
import functools
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from eexit.config import ConfigError
from eexit.lit.last_checkpoint import LastCheckpoint
from eexit.lit.multi_exit import _partial_differences
from eexit.lit.resume import run_checkpoints_folder
from eexit.losses import MultiExitLoss
from eexit.training import train
from tests.conftest import ROOT, compose_train, micro_module, stand_in_trainer

# synthetic: 384 training images / 32 = 12 steps an epoch; last.ckpt every 5 steps (and at each
# epoch end); killed before step 17, so the newest checkpoint is step 15: epoch 1, after 3 batches
STEPS_PER_EPOCH = 12
COMMON = [
    "data=synthetic",
    "model=micro",
    "experiment=egt",
    "logger=csv",
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "seed=11",
    "callbacks.last_checkpoint.every_n_train_steps=5",
    "router.latency_min_run_time=0.01",
    "router.latency_batch=16",
]
KILL_AT = 17


class KillAtStep(pl.Callback):
    """Fault injection: the process SIGKILLs itself before the given global step (no cleanup runs)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _train_py(log_dir: Path, run: str, extra: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "train.py",
            *COMMON,
            f"paths.log_dir={log_dir}",
            f"hydra.run.dir={log_dir}/train/runs/{run}",
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _final_metrics(run_dir: Path) -> dict[str, float]:
    (path,) = run_dir.glob("csv/*/metrics.csv")
    last: dict[str, float] = {}
    for row in csv.DictReader(path.open()):
        last.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return {k: v for k, v in last.items() if k.startswith(("val/", "test/"))}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.slow
def test_run_killed_mid_epoch_and_resumed_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    a = _train_py(tmp_path / "a", "a", [])
    assert a.returncode == 0, a.stderr[-3000:]

    killed = _train_py(
        tmp_path / "b",
        "killed",
        ["+callbacks.kill._target_=tests.test_resume.KillAtStep", f"+callbacks.kill.step={KILL_AT}"],
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "b/train/runs/killed/checkpoints/last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 15 and state["epoch"] == 1, "the newest checkpoint must be in the middle of epoch 1"
    assert state["global_step"] % STEPS_PER_EPOCH != 0
    assert "combined_loader" in state["loops"]["fit_loop"]["state_dict"], "the loader position must be saved"

    resumed = _train_py(tmp_path / "b", "resumed", ["ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ended before the epoch ended" not in resumed.stderr  # Lightning's non-resumable-loader warning
    assert f"Restoring states from the checkpoint path at {last}" in resumed.stdout + resumed.stderr

    # the same final weights (checkpoints of the resumed run go on in the killed run's folder)
    final_a = torch.load(tmp_path / "a/train/runs/a/checkpoints/last.ckpt", weights_only=False)
    final_b = torch.load(last, weights_only=False)
    assert final_a["global_step"] == final_b["global_step"] == 3 * STEPS_PER_EPOCH
    assert _max_diff(final_a["state_dict"], final_b["state_dict"]) <= 1e-6
    for key in ("optimizer_states", "lr_schedulers"):
        assert repr(final_a[key]) == repr(final_b[key]), key

    # the same final validation and test metrics (test from the same best epoch)
    metrics_a = _final_metrics(tmp_path / "a/train/runs/a")
    metrics_b = _final_metrics(tmp_path / "b/train/runs/resumed")
    assert metrics_a.keys() == metrics_b.keys() and any(k.startswith("test/") for k in metrics_a)
    assert max(abs(metrics_a[k] - metrics_b[k]) for k in metrics_a) <= 1e-6

    # calibration ran after the resumed fit, into the same best checkpoint, with the same routers
    (best_a,) = (tmp_path / "a/train/runs/a/checkpoints").glob("epoch_*.ckpt")
    (best_b,) = (tmp_path / "b/train/runs/killed/checkpoints").glob("epoch_*.ckpt")
    assert best_a.name == best_b.name
    calib_a = torch.load(best_a, weights_only=False)["eexit"]["calibration"]
    calib_b = torch.load(best_b, weights_only=False)["eexit"]["calibration"]
    assert calib_a["routers"] == calib_b["routers"]


class FailAtStep(pl.Callback):
    """Fault injection in-process: an exception before the given global step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")


@pytest.mark.parametrize(
    ("fail_at", "resume_step", "extra"),
    [
        (12, 12, []),
        (17, 15, []),
        # loader workers take their indices when the iterator is made, so the sampler's epoch
        # must be set before resume_train_loader makes it (without workers the first batch does)
        (12, 12, ["data.num_workers=2"]),
        (17, 15, ["data.num_workers=2"]),
    ],
    ids=["epoch_boundary", "mid_epoch", "epoch_boundary_workers", "mid_epoch_workers"],
)
def test_resume_in_process_gives_the_weights_of_an_uninterrupted_run(
    tmp_path: Path, fail_at: int, resume_step: int, extra: list[str]
) -> None:
    """Pins the resume of ``resume_train_loader``: the run resumed from the ``last.ckpt`` of a run
    that failed at an epoch's boundary or in the middle of an epoch ends with the weights of an
    uninterrupted run, also with loader workers (which take the epoch's order when the iterator
    is made: a wrong or missing sampler epoch, or the iterator made before the restore, shows)."""
    overrides = [
        "data=synthetic",
        "model=micro",
        "experiment=egt",
        "logger=none",
        "trainer.max_epochs=2",
        "trainer.deterministic=true",
        "seed=11",
        "callbacks.last_checkpoint.every_n_train_steps=5",
        "router.calibrate=false",
        "test=false",
        *extra,
    ]
    _, objs = train(compose_train(tmp_path / "a", overrides))
    weights_a = {k: v.clone() for k, v in objs["model"].state_dict().items()}

    last = _killed_run_last_checkpoint(tmp_path / "b", overrides, fail_at, resume_step)

    _, objs = train(compose_train(tmp_path / "c", [*overrides, f"ckpt_path={last}"]))
    weights_b = objs["model"].state_dict()
    assert objs["trainer"].global_step == 2 * STEPS_PER_EPOCH
    assert _max_diff(weights_a, weights_b) <= 1e-6
    # the resumed run's checkpoints went on in the failed run's folder
    assert torch.load(last, weights_only=False)["global_step"] == 2 * STEPS_PER_EPOCH
    assert not (tmp_path / "c" / "out" / "checkpoints").exists()


def _killed_run_last_checkpoint(folder: Path, overrides: list[str], fail_at: int, resume_step: int) -> Path:
    """Train with ``overrides`` into ``folder``, failing at step ``fail_at``; the ``last.ckpt`` left,
    checked to hold step ``resume_step``."""
    failing = [*overrides, "+callbacks.fail._target_=tests.test_resume.FailAtStep", f"+callbacks.fail.step={fail_at}"]
    with pytest.raises(RuntimeError, match="injected failure"):
        train(compose_train(folder, failing))
    last = folder / "out" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == resume_step
    return last


class DrawRandom(pl.Callback):
    """Stands for random augmentation or dropout: draws from the global torch, NumPy and Python
    random streams before each training batch, and records the draws by global step."""

    def __init__(self) -> None:
        self.draws: dict[int, tuple[float, float, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.draws[trainer.global_step] = (torch.rand(()).item(), float(np.random.rand()), random.random())


def _draws(objs: dict) -> dict[int, tuple[float, float, float]]:
    # (Hydra imports the callback as tests.test_resume, maybe another module object than this one)
    (drawer,) = [cb for cb in objs["trainer"].callbacks if type(cb).__name__ == "DrawRandom"]
    return drawer.draws


@pytest.mark.parametrize(("fail_at", "resume_step"), [(5, 5), (7, 6)], ids=["epoch_boundary", "mid_epoch"])
def test_a_resumed_run_draws_the_random_numbers_of_an_uninterrupted_run(
    tmp_path: Path, fail_at: int, resume_step: int
) -> None:
    """Pins the restore of the global random state (torch, NumPy, Python) saved in ``last.ckpt``,
    from a checkpoint written at an epoch's end (step 5, the first of epoch 1, 5 steps an epoch)
    and from one in the middle of an epoch (step 6): the resumed run draws, batch by batch, the
    numbers the uninterrupted run drew (without the restore it goes on from the seeded state of
    its own start). The training data here draws nothing at random, so the weights cannot tell."""
    overrides = [
        "data=synthetic",
        "data.num_train=192",  # 144 training images: 5 steps an epoch
        "model=micro",
        "experiment=baseline",
        "logger=none",
        "trainer.max_epochs=2",
        "seed=11",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "router.calibrate=false",
        "test=false",
        "+callbacks.draw._target_=tests.test_resume.DrawRandom",
    ]
    _, objs = train(compose_train(tmp_path / "a", overrides))
    whole = _draws(objs)
    assert sorted(whole) == list(range(10))

    last = _killed_run_last_checkpoint(tmp_path / "b", overrides, fail_at, resume_step)

    _, objs = train(compose_train(tmp_path / "c", [*overrides, f"ckpt_path={last}"]))
    resumed = _draws(objs)
    assert sorted(resumed) == list(range(resume_step, 10))
    for step, drawn in resumed.items():
        assert drawn == whole[step], step


def test_ckpt_path_last_without_a_last_checkpoint_names_the_key(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["data=synthetic", "model=micro", "logger=none", "ckpt_path=last"])
    with pytest.raises(ConfigError, match=r"ckpt_path.*no last\.ckpt"):
        train(cfg)


def test_ckpt_path_that_does_not_exist_names_the_key_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    cfg = compose_train(tmp_path, ["data=synthetic", "model=micro", "logger=none", f"ckpt_path={missing}"])
    with pytest.raises(ConfigError, match=rf"ckpt_path.*{missing}"):
        train(cfg)


class _RunsCode:
    """Stands for what a crafted pickle rebuilds (any class outside the checkpoint globals)."""


def test_ckpt_path_that_is_not_a_safe_checkpoint_is_refused_before_training(tmp_path: Path) -> None:
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode()}, crafted)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    base = ["data=synthetic", "model=micro", "logger=none"]
    with pytest.raises(ConfigError, match=r"ckpt_path.*crafted\.ckpt: refused to unpickle .*_RunsCode.*trust"):
        train(compose_train(tmp_path / "a", [*base, f"ckpt_path={crafted}"]))
    with pytest.raises(ConfigError, match=r"ckpt_path.*notes\.ckpt is not a checkpoint"):
        train(compose_train(tmp_path / "b", [*base, f"ckpt_path={text}"]))


def test_resume_unpickles_safely_unless_the_checkpoint_is_trusted(tmp_path: Path, monkeypatch) -> None:
    base = [
        "data=synthetic",
        "model=micro",
        "logger=none",
        "router.calibrate=false",
        "test=false",
        "trainer.max_epochs=2",
        "callbacks.last_checkpoint.every_n_train_steps=5",
    ]
    with pytest.raises(RuntimeError, match="injected failure"):
        train(
            compose_train(
                tmp_path / "a",
                [*base, "+callbacks.fail._target_=tests.test_resume.FailAtStep", "+callbacks.fail.step=17"],
            )
        )
    last = tmp_path / "a" / "out" / "checkpoints" / "last.ckpt"
    loads: list[tuple[str, object]] = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        loads.append((str(f), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for trust, safe in ((False, True), (True, False)):
        loads.clear()
        extra = [f"ckpt_path={last}", f"trust_checkpoint={str(trust).lower()}"]
        train(compose_train(tmp_path / f"b{trust}", [*base, *extra]))
        of_last = [w for f, w in loads if f == str(last)]
        assert of_last and all(w is safe for w in of_last), loads  # the pre-check and Lightning's restore
    with pytest.raises(ConfigError, match=r"'trust_checkpoint': must be true or false, got 'no'"):
        train(compose_train(tmp_path / "c", [*base, f"ckpt_path={last}", "trust_checkpoint=no"]))


def test_ckpt_path_last_is_checked_like_a_named_file(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    crafted = logs / "train" / "runs" / "x" / "checkpoints" / "last.ckpt"
    crafted.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "payload": _RunsCode()}, crafted)
    cfg = compose_train(
        tmp_path, ["data=synthetic", "model=micro", "logger=none", "ckpt_path=last", f"paths.log_dir={logs}"]
    )
    with pytest.raises(ConfigError, match=r"ckpt_path.*last\.ckpt: refused to unpickle .*_RunsCode"):
        train(cfg)


# two uncalibrated epochs, last.ckpt every 5 steps
TWO_EPOCHS = [
    "data=synthetic",
    "model=micro",
    "logger=none",
    "trainer.max_epochs=2",
    "callbacks.last_checkpoint.every_n_train_steps=5",
    "router.calibrate=false",
    "test=false",
]


def _failed_mid_epoch(folder: Path) -> Path:
    """A ``TWO_EPOCHS`` run that fails before step 17; its ``last.ckpt`` (step 15, mid-epoch 1)."""
    failing = [*TWO_EPOCHS, "+callbacks.fail._target_=tests.test_resume.FailAtStep", "+callbacks.fail.step=17"]
    with pytest.raises(RuntimeError, match="injected failure"):
        train(compose_train(folder, failing))
    return folder / "out" / "checkpoints" / "last.ckpt"


def test_resume_drops_the_old_calibration_and_refuses_a_changed_schedule_length(tmp_path: Path) -> None:
    overrides = TWO_EPOCHS
    last = _failed_mid_epoch(tmp_path / "a")
    state = torch.load(last, weights_only=False)
    state["eexit"]["calibration"] = {"routers": "fitted to the weights of step 15"}
    torch.save(state, last)
    # OneCycleLR's length (total_steps, filled in from the run) comes back from the checkpoint
    assert state["eexit"]["data"]["split"]["seed"] == 42  # the default seed; recorded for resumes and evaluation
    with pytest.raises(ConfigError, match=r"'seed'.*another split of the data \(seed: 42 there, 5 here\)"):
        train(compose_train(tmp_path / "b", [*overrides, "seed=5", f"ckpt_path={last}"]))
    longer = [*overrides, "trainer.max_epochs=3", f"ckpt_path={last}"]
    with pytest.raises(ConfigError, match=r"trainer.max_epochs.*OneCycleLR was built for 24 steps.*this run has 36"):
        train(compose_train(tmp_path / "b", longer))
    _, objs = train(compose_train(tmp_path / "c", [*overrides, f"ckpt_path={last}"]))
    assert objs["trainer"].global_step == 2 * STEPS_PER_EPOCH
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 2 * STEPS_PER_EPOCH
    assert "calibration" not in resumed["eexit"]  # stale: it fitted the step-15 weights
    assert all("calibration" not in torch.load(p, weights_only=False)["eexit"] for p in last.parent.glob("*.ckpt"))


def test_resume_refuses_new_optimizer_values_and_another_process_count_mid_epoch(tmp_path: Path, caplog) -> None:
    overrides = TWO_EPOCHS
    last = _failed_mid_epoch(tmp_path / "a")
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 15 and state["eexit"]["world_size"] == 1
    # restored from the checkpoint, a new learning rate would not take effect: refused
    with pytest.raises(ConfigError, match=r"'model.optimizer.lr'.*trained with lr=0.003, this run sets lr=0.03"):
        train(compose_train(tmp_path / "b", [*overrides, "model.optimizer.lr=0.03", f"ckpt_path={last}"]))
    scheduler = [*overrides, "model.scheduler.pct_start=0.5", f"ckpt_path={last}"]
    with pytest.raises(ConfigError, match=r"'model.scheduler.pct_start'.*pct_start=0.2, this run sets pct_start=0.5"):
        train(compose_train(tmp_path / "b", scheduler))
    dropped = [*overrides, "model.scheduler=null", f"ckpt_path={last}"]  # the LR would stay frozen where it was
    with pytest.raises(ConfigError, match=r"'model.scheduler'.*trained with a scheduler, this run sets no scheduler"):
        train(compose_train(tmp_path / "b", dropped))
    # written mid-epoch by 2 processes (the loader's position is per process): refused in 1
    two = tmp_path / "two.ckpt"
    state["eexit"]["world_size"] = 2
    torch.save(state, two)
    with pytest.raises(
        ConfigError, match=r"'trainer.devices'.*middle of an epoch by 2 training process.*this run has 1"
    ):
        train(compose_train(tmp_path / "b", [*overrides, f"ckpt_path={two}"]))
    # a new loss weight takes effect from the resumed step on: a warning names it
    caplog.set_level(logging.INFO)
    _, objs = train(compose_train(tmp_path / "c", [*overrides, "model.loss.attn_weight=0.5", f"ckpt_path={last}"]))
    assert objs["trainer"].global_step == 2 * STEPS_PER_EPOCH and objs["model"].loss_fn.attn_weight == 0.5
    assert "resuming with model.loss.attn_weight=0.5 (the checkpoint's run trained with 0.25)" in caplog.text
    assert "resuming epoch 1 after 3 training batches" in caplog.text  # step 15 = 12 + 3


def test_last_checkpoint_holds_the_final_state_when_the_last_epoch_did_not_improve(tmp_path: Path) -> None:
    # Lightning writes save_last at an epoch's end only with a top-k save at that step: with the
    # step trigger and a last epoch that did not improve, last.ckpt stayed at the last multiple
    # of every_n_train_steps (step 20 of 24) and the final weights were saved nowhere
    overrides = [
        "data=synthetic",
        "model=micro",
        "logger=none",
        "trainer.max_epochs=2",
        "callbacks.last_checkpoint.every_n_train_steps=5",
        "callbacks.model_checkpoint.monitor=epoch",  # epoch 0 is the best, once and for all
        "callbacks.model_checkpoint.mode=min",
        "router.calibrate=false",
        "test=false",
    ]
    _, objs = train(compose_train(tmp_path, overrides))
    folder = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    last = torch.load(folder / "last.ckpt", weights_only=False)
    assert last["global_step"] == objs["trainer"].global_step == 2 * STEPS_PER_EPOCH
    final = objs["model"].state_dict()
    assert all(torch.equal(last["state_dict"][k], v) for k, v in final.items())


def test_a_run_stopped_mid_epoch_by_max_steps_resumes_where_it_stopped(tmp_path: Path) -> None:
    # Lightning calls the epoch's end after such a stop with the epoch counted as done: a last.ckpt
    # written there made the resumed run skip the rest of the epoch (step 24 instead of 30)
    overrides = [
        "data=synthetic",
        "model=micro",
        "model.scheduler=null",
        "logger=none",
        "trainer.max_epochs=3",
        "trainer.deterministic=true",
        "seed=11",
        "callbacks.last_checkpoint.every_n_train_steps=5",
        "router.calibrate=false",
        "test=false",
    ]
    _, whole = train(compose_train(tmp_path / "a", [*overrides, "+trainer.max_steps=30"]))
    _, stopped = train(compose_train(tmp_path / "b", [*overrides, "+trainer.max_steps=17"]))
    last = tmp_path / "b" / "out" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == stopped["trainer"].global_step == 17
    _, resumed = train(compose_train(tmp_path / "c", [*overrides, "+trainer.max_steps=30", f"ckpt_path={last}"]))
    assert resumed["trainer"].global_step == whole["trainer"].global_step == 30
    assert _max_diff(whole["model"].state_dict(), resumed["model"].state_dict()) <= 1e-6


def test_a_run_folder_moved_before_the_resume_keeps_its_best_checkpoint(tmp_path: Path) -> None:
    # Lightning drops a checkpoint callback's best score when its saved folder is not the one it
    # writes to: after a move, a worse later epoch became the best one (tested, exported)
    import shutil
    import warnings

    epoch_0_best = ["callbacks.model_checkpoint.monitor=epoch", "callbacks.model_checkpoint.mode=min"]
    overrides = [*TWO_EPOCHS, "model.scheduler=null", *epoch_0_best]  # (no schedule: its length changes)
    train(compose_train(tmp_path / "a", [*overrides, "trainer.max_epochs=1"]))
    shutil.move(tmp_path / "a" / "out", tmp_path / "moved")
    folder = tmp_path / "moved" / "checkpoints"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The dirpath has changed")
        _, objs = train(compose_train(tmp_path / "b", [*overrides, f"ckpt_path={folder / 'last.ckpt'}"]))
    best = objs["trainer"].checkpoint_callback
    assert best.best_model_path == str(folder.resolve() / "epoch_000.ckpt") and float(best.best_model_score) == 0.0
    assert objs["best_ckpt"] == best.best_model_path and sorted(p.name for p in folder.iterdir()) == [
        "epoch_000.ckpt",
        "last.ckpt",
    ]


# one uncalibrated epoch, no LR schedule (no schedule length to catch a change by chance)
ONE_EPOCH = [
    "data=synthetic",
    "model=micro",
    "model.scheduler=null",
    "logger=none",
    "trainer.max_epochs=1",
    "router.calibrate=false",
    "test=false",
]


def _one_epoch_checkpoint(tmp_path: Path) -> Path:
    """Train ``ONE_EPOCH`` into ``tmp_path / "a"``; its ``last.ckpt``."""
    train(compose_train(tmp_path / "a", ONE_EPOCH))
    return tmp_path / "a" / "out" / "checkpoints" / "last.ckpt"


def test_resume_on_a_pool_that_grew_is_refused(tmp_path: Path) -> None:
    # the same seed and split fractions on a larger pool put other images into training: the
    # resumed epochs would train on the old run's validation and calibration images
    overrides = ONE_EPOCH
    last = _one_epoch_checkpoint(tmp_path)
    assert torch.load(last, weights_only=False)["eexit"]["data"]["split"]["pool_size"] == 512
    grown = [*overrides, "trainer.max_epochs=2", "data.num_train=576", f"ckpt_path={last}"]
    with pytest.raises(ConfigError, match=r"'data'.*a pool of 512 images, this data config gives 576"):
        train(compose_train(tmp_path / "b", grown))
    _, objs = train(compose_train(tmp_path / "c", [*overrides, "trainer.max_epochs=2", f"ckpt_path={last}"]))
    assert objs["trainer"].current_epoch == 2


def test_resume_with_another_network_names_the_key_instead_of_a_size_mismatch(tmp_path: Path) -> None:
    last = _one_epoch_checkpoint(tmp_path)
    resume = [*ONE_EPOCH, "trainer.max_epochs=2", f"ckpt_path={last}"]
    with pytest.raises(ConfigError, match=r"'data'.*another network.*num_classes: 4 there, 3 here"):
        train(compose_train(tmp_path / "b", [*resume, "data.num_classes=3"]))
    with pytest.raises(ConfigError, match=r"'model.net.widths'.*widths: \[8, 8, 16, 16\] there, \[8, 8, 16, 32\] here"):
        train(compose_train(tmp_path / "c", [*resume, "+model.net.widths=[8,8,16,32]"]))


def test_resume_checks_hold_for_a_finished_run_and_another_image_size(tmp_path: Path) -> None:
    # a checkpoint whose run has no epoch left never reaches on_train_start: the split is still
    # checked (calibrating it on another split would score it on its own training images)
    last = _one_epoch_checkpoint(tmp_path)
    finished = [*ONE_EPOCH, f"ckpt_path={last}"]
    with pytest.raises(ConfigError, match=r"'seed'.*another split of the data"):
        train(compose_train(tmp_path / "b", [*finished, "seed=7"]))
    # the spec holds no image size (the network takes any): compared with the run's data
    with pytest.raises(ConfigError, match=r"'data\.image_size'.*trained on 16 px images, this run gives 20 px"):
        train(
            compose_train(
                tmp_path / "c", [*ONE_EPOCH, "trainer.max_epochs=2", "data.image_size=20", f"ckpt_path={last}"]
            )
        )


# the resume checks of MultiExitModule, unit tests with a stand-in trainer


def _mid_epoch_loop(mid_epoch: bool) -> SimpleNamespace:
    current = SimpleNamespace(processed=1, started=2 if mid_epoch else 1)
    return SimpleNamespace(restarting=True, epoch_progress=SimpleNamespace(current=current))


@pytest.mark.parametrize("mid_epoch", [True, False])
def test_another_process_count_is_refused_only_in_the_middle_of_an_epoch(mid_epoch: bool) -> None:
    """Pins the world-size check to mid-epoch checkpoints: at an epoch's end the loader's
    position is not restored, so another process count resumes fine."""
    module = micro_module()
    module._trainer = stand_in_trainer(world_size=1, fit_loop=_mid_epoch_loop(mid_epoch))
    module._resume_world_size = 2
    if mid_epoch:
        with pytest.raises(ConfigError, match=r"trainer\.devices"):
            module._check_resumed_world_size()
    else:
        module._check_resumed_world_size()


def test_another_optimizer_class_is_refused_naming_the_target() -> None:
    """Pins the ``_target_`` comparison: AdamW -> SGD with the same keywords is a change the
    restored optimizer state would silently undo."""
    adamw, sgd = functools.partial(torch.optim.AdamW, lr=0.1), functools.partial(torch.optim.SGD, lr=0.1)
    assert _partial_differences(adamw, sgd) == [("_target_", "torch.optim.adamw.AdamW", "torch.optim.sgd.SGD")]
    module = micro_module()  # SGD
    module._trainer = stand_in_trainer()
    with pytest.raises(ConfigError, match=r"'model.optimizer._target_'.*torch.optim.adamw.AdamW"):
        module._check_resumed_settings({"optimizer": adamw, "scheduler": None}, None)


def test_a_checkpoint_records_this_runs_loss_and_process_count_and_keeps_extra_state() -> None:
    """Pins ``on_save_checkpoint`` after ``on_load_checkpoint``: the ``eexit`` entry records the
    process count and the loss of this run (not the resumed checkpoint's), and carries the
    entries that do not describe the run (calibration)."""
    module = micro_module(MultiExitLoss(attn_weight=0.5))
    old_loss = {**module.loss_fn.settings, "attn_weight": 0.25}
    module.on_load_checkpoint(
        {"eexit": {"spec": module.net.spec, "loss": old_loss, "world_size": 2, "calibration": {"x": 1}}}
    )
    module._trainer = SimpleNamespace(world_size=3, loggers=[])
    saved: dict = {}
    module.on_save_checkpoint(saved)
    assert saved["eexit"]["loss"]["attn_weight"] == 0.5
    assert saved["eexit"]["world_size"] == 3
    assert saved["eexit"]["calibration"] == {"x": 1}


def test_resuming_with_loader_workers_and_augmentation_warns(caplog) -> None:
    """Pins the warning that a resume with workers and augmentation is not exact."""
    module = micro_module()
    for workers, augment, warned in ((2, True, True), (0, True, False), (2, False, False)):
        dm = SimpleNamespace(split_differences=lambda r: [], num_workers=workers, augment=augment, pool_size=None)
        module._trainer = stand_in_trainer(datamodule=dm)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="eexit.lit.multi_exit"):
            module._check_resumed_split()
        assert ("not exact" in caplog.text or "augment differently" in caplog.text) == warned, (workers, augment)


def test_a_moved_run_folder_moves_only_the_bookkeeping_of_its_checkpoints_folder(tmp_path: Path) -> None:
    """Pins ``_follow_moved_run_folder``: the states of callbacks that wrote into the old run's
    ``checkpoints/`` folder (dirpath, best and last paths, the top-k keys) follow the checkpoint
    to its new folder; a callback writing elsewhere is left alone."""
    new = tmp_path / "new" / "checkpoints"
    new.mkdir(parents=True)
    old = "/old/run/checkpoints"
    mine = {
        "dirpath": old,
        "best_model_path": f"{old}/epoch_000.ckpt",
        "last_model_path": f"{old}/last.ckpt",
        "best_k_models": {f"{old}/epoch_000.ckpt": 0.5},
    }
    other = {"dirpath": "/elsewhere/ckpts", "best_model_path": "/elsewhere/ckpts/a.ckpt"}
    checkpoint = {"callbacks": {"mine": dict(mine), "other": dict(other)}}
    module = micro_module()
    module._trainer = SimpleNamespace(ckpt_path=str(new / "last.ckpt"))
    module._follow_moved_run_folder(checkpoint)
    moved = checkpoint["callbacks"]["mine"]
    assert moved["dirpath"] == str(new.resolve())
    assert moved["best_model_path"] == str(new.resolve() / "epoch_000.ckpt")
    assert moved["last_model_path"] == str(new.resolve() / "last.ckpt")
    assert moved["best_k_models"] == {str(new.resolve() / "epoch_000.ckpt"): 0.5}
    assert checkpoint["callbacks"]["other"] == other


# LastCheckpoint and the run folder, on the smallest module


class _Linear(pl.LightningModule):
    """The smallest trainable module: one linear layer on 4 features."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _StopAt(pl.Callback):
    """Sets ``trainer.should_stop`` after the given global step (as ``max_time`` does)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit(folder: Path, *callbacks: pl.Callback, ckpt_path: Path | None = None) -> pl.Trainer:
    """Two epochs of 5 steps with ``last.ckpt`` every 100 steps (never, by the step trigger)."""
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LastCheckpoint(dirpath=folder, every_n_train_steps=100), *callbacks],
    )
    trainer.fit(_Linear(), DataLoader(TensorDataset(torch.randn(10, 4)), batch_size=2), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(("stop_at", "epochs_done"), [(3, 0), (7, 1)], ids=["first_epoch", "after_an_epoch_end"])
def test_a_run_stopped_mid_epoch_by_a_callback_saves_that_step_as_mid_epoch(
    tmp_path: Path, stop_at: int, epochs_done: int
) -> None:
    """Pins ``LastCheckpoint``'s save on ``should_stop`` (``max_time``, a callback) in the middle
    of an epoch: ``last.ckpt`` holds that step with its epoch still running, so the resumed run
    trains the rest of it and all of epoch 1 (10 steps in all). In epoch 0, Lightning's own save
    at the end of training would count the epoch as done (8 steps); in epoch 1, after epoch 0's
    end wrote ``last.ckpt`` at step 5, Lightning does not save at all (it would stay at step 5)."""
    trainer = _fit(tmp_path / "a", _StopAt(stop_at))
    assert trainer.global_step == stop_at
    last = tmp_path / "a" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == stop_at
    epoch = state["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert epoch["processed"] == epochs_done and epoch["started"] == epochs_done + 1
    assert _fit(tmp_path / "b", ckpt_path=last).global_step == 10


def test_the_run_folder_of_a_checkpoint_reached_through_a_link_is_its_real_path(tmp_path: Path) -> None:
    """Pins ``run_checkpoints_folder`` to the real path (what the checkpoint callbacks compare),
    not the linked one; a file outside a ``checkpoints/`` folder has none."""
    real = tmp_path / "real" / "checkpoints"
    real.mkdir(parents=True)
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert run_checkpoints_folder(tmp_path / "link" / "checkpoints" / "last.ckpt") == str(real.resolve())
    assert run_checkpoints_folder(tmp_path / "real" / "last.ckpt") is None
