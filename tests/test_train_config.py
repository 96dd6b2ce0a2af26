"""Hydra compose API: every experiment runs a real fast_dev_run; bad values fail at start."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue
from torch.utils.data import DataLoader, TensorDataset

from eexit.checkpoint import load_checkpoint
from eexit.config import (
    ConfigError,
    check_calibration_size,
    check_image_size,
    check_split_size,
    trusts_checkpoints,
    validate_eval_config,
    validate_train_config,
)
from eexit.lit.multi_exit import MultiExitModule
from eexit.losses import MultiExitLoss
from eexit.routing.calibrate import MIN_CALIBRATION_IMAGES
from eexit.routing.costs import count_flops
from eexit.training import train
from eexit.types import ExitLevel
from tests.conftest import ROOT, compose_train, micro_module, needs_cifar, needs_fashion, stand_in_trainer

FAST = ["debug=fdr", "logger=csv"]


@pytest.mark.parametrize("experiment", ["egt", "baseline"])
def test_experiment_fast_dev_run_on_synthetic(tmp_path: Path, experiment: str) -> None:
    cfg = compose_train(tmp_path, [f"experiment={experiment}", "data=synthetic", "model=micro", *FAST])
    assert (cfg.model.loss.attn_weight > 0) == (experiment == "egt")
    metrics, objs = train(cfg)
    for key in ("train/loss", "val/acc/tiny", "val/acc/heavy", "test/acc/heavy", "test/attn_kl/tiny"):
        assert key in metrics, key
    if experiment == "egt":
        assert "train/loss/attn_kl" in metrics
    assert Path(objs["best_ckpt"]).is_file()
    # calibration ran on the held-out split and is stored with the model
    stored = load_checkpoint(objs["best_ckpt"]).extra["calibration"]
    assert set(stored["routers"]) == {"gate", "staged", "cascade"}
    assert objs["calibration"].fit_summary.keys() == stored["fit_summary"].keys()


@needs_fashion
def test_default_config_is_fashion_mnist_with_egt(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, FAST)
    assert cfg.data._target_.endswith("FashionMNISTDataModule")
    assert cfg.model.loss.attn_weight > 0
    metrics, _ = train(cfg)
    assert 0 <= metrics["test/acc/heavy"] <= 1


@needs_cifar
def test_cifar10_experiment_fast_dev_run(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["experiment=cifar10", *FAST, "data.num_workers=0"])
    assert cfg.model.net.name == "resnet18"
    metrics, objs = train(cfg)
    assert objs["datamodule"].info.num_classes == 10
    assert "test/acc/heavy" in metrics


@pytest.mark.parametrize(
    ("override", "error", "names"),
    [
        ("model.loss.attn_weight=-0.5", ConfigError, "model.loss.attn_weight"),
        ("+model.loss.exit_weights.huge=1.0", ConfigError, "model.loss.exit_weights"),
        ("model.loss.consistency_exits=[tiny,colossal]", ConfigError, "model.loss.consistency_exits"),
        ("model.loss.exit_weights.tiny=-1", ConfigError, "model.loss.exit_weights.tiny"),
        ("data.image_size=3", ConfigError, "data.image_size"),
        ("model.net.name=resnet999", ConfigError, "model.net"),
        ("model.loss.attn_weight=nan", ConfigError, "model.loss.attn_weight"),  # nan < 0 is False
        ("model.loss.attn_weight=inf", ConfigError, "model.loss.attn_weight"),
        ("model.loss.attn_weight=abc", ConfigError, "model.loss.attn_weight"),
        ("model.loss.eps=0", ConfigError, "model.loss.eps"),
        ("model.loss.temperature=0", ConfigError, "model.loss.temperature"),
        ("model.optimizer.lr=-0.1", ConfigError, "model.optimizer.lr"),
        ("trainer.max_epochs=abc", ConfigError, "trainer.max_epochs"),
        ("data.batch_size=abc", ConfigError, "data.batch_size"),
        ("data.val_size=-10", ConfigError, "data.val_size"),
        ("data.calib_size=2.5", ConfigError, "data.calib_size"),
        # the router group is used only after the fit: checked before it
        ("router.cost=flops", ConfigError, "router.cost"),
        ("router.serve=oracle", ConfigError, "router.serve"),
        ("router.max_drop=-0.01", ConfigError, "router.max_drop"),
        ("router.max_drop=5", ConfigError, "router.max_drop"),
        ("router.margin_se=nan", ConfigError, "router.margin_se"),
        ("router.monotone=sometimes", ConfigError, "router.monotone"),
        ("router.latency_batch=0", ConfigError, "router.latency_batch"),
        ("router.latency_min_run_time=0", ConfigError, "router.latency_min_run_time"),
        # found only inside the fit, after the test or in a reshape before
        ("seed=null", ConfigError, "seed"),
        ("data.num_workers=-1", ConfigError, "data.num_workers"),
        ("model.loss.cam_size=[7]", ConfigError, "model.loss.cam_size"),
        ("model.loss.cam_size=[7,0]", ConfigError, "model.loss.cam_size"),
        ("data.calib_size=0", ConfigError, "data.calib_size"),
        ("data.calib_size=8", ConfigError, "data.calib_size"),
        ("data.calib_size=0.01", ConfigError, "data.calib_size"),  # 5 of 512: known once the pool is
        # failed inside torch or the scheduler, or were silently ignored (-0.5)
        ("model.loss.label_smoothing=1.5", ConfigError, "model.loss.label_smoothing"),
        ("model.loss.label_smoothing=-0.5", ConfigError, "model.loss.label_smoothing"),
        ("model.loss.label_smoothing=1.0", ConfigError, "model.loss.label_smoothing"),
        ("model.optimizer.weight_decay=-1", ConfigError, "model.optimizer.weight_decay"),
        ("data.limit_train=0", ConfigError, "data.limit_train"),
        ("data.limit_train=abc", ConfigError, "data.limit_train"),
        ("data.num_classes=1", ConfigError, "data.num_classes"),
        ("trainer.max_epochs=0", ConfigError, "trainer.max_epochs"),  # an untrained checkpoint
        ("model.loss.consistency_exits=tiny", ConfigError, "consistency_exits': must be a list of exit names"),
        ("trainer.devices=0", ConfigError, "key 'trainer'"),  # Lightning's MisconfigurationException
        # torch's own checks, when the optimizer and scheduler are built inside the fit
        ("+model.optimizer.betas=[0.9,1.5]", ConfigError, "key 'model.optimizer'"),
        ("model.scheduler.pct_start=2", ConfigError, "key 'model.scheduler'"),
    ],
)
def test_bad_values_fail_at_start_naming_the_key(tmp_path: Path, override: str, error, names: str) -> None:
    cfg = compose_train(tmp_path, ["data=synthetic", "model=micro", *FAST, override])
    with pytest.raises(error, match=names.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "out" / "checkpoints").exists(), "nothing should have run"


def test_an_unlimited_run_with_a_schedule_that_needs_its_length_names_the_key(tmp_path: Path) -> None:
    # OneCycleLR's total_steps is filled in from the run's length: with no limit it is infinite
    # (an OverflowError deep in Lightning before)
    unlimited = ["data=synthetic", "model=micro", "logger=none", "trainer.max_epochs=-1"]
    with pytest.raises(ConfigError, match=r"'trainer\.max_epochs'.*OneCycleLR needs the run's length \(total_steps\)"):
        train(compose_train(tmp_path / "a", unlimited))
    _, objs = train(
        compose_train(tmp_path / "b", [*unlimited, "+trainer.max_steps=3", "router.calibrate=false", "test=false"])
    )
    assert objs["trainer"].global_step == 3


def test_a_square_cam_size_is_one_number(tmp_path: Path) -> None:
    cfg = compose_train(
        tmp_path, ["data=synthetic", "model=micro", *FAST, "model.loss.cam_size=4", "router.calibrate=false"]
    )
    _, objs = train(cfg)
    assert objs["model"].loss_fn.cam_size == (4, 4)


def test_a_missing_data_folder_ends_train_py_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "data=image_folder",
            f"data.root={missing}",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


def test_missing_data_directory_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    cfg = compose_train(tmp_path, ["data=image_folder", f"data.root={missing}", *FAST])
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        train(cfg)
    cfg = compose_train(
        tmp_path, ["data=fashion_mnist", f"data.source_dir={missing}", f"paths.data_dir={missing}", *FAST]
    )
    with open_dict(cfg):
        cfg.paths.data_dir = str(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        train(cfg)
    cfg = compose_train(tmp_path, ["data=cifar10", f"data.source={missing}/c.tar.gz", *FAST])
    with open_dict(cfg):
        cfg.paths.data_dir = str(missing)
    with pytest.raises(FileNotFoundError, match=r"data\.source"):
        train(cfg)


def test_image_folder_without_root_names_the_key(tmp_path: Path, capsys) -> None:
    from eexit.cli_output import config_errors_exit

    cfg = compose_train(tmp_path, ["data=image_folder", *FAST])
    with pytest.raises(MissingMandatoryValue, match="root"):
        train(cfg)
    with pytest.raises(SystemExit) as stop, config_errors_exit():  # the entry points: one line
        train(cfg)
    assert stop.value.code == 2
    assert " ".join(capsys.readouterr().err.split()) == (
        "error: config key 'data.root': has no value; set it on the command line (data.root=...)"
    )


def test_an_unreadable_image_met_in_a_loader_worker_is_one_line(capsys) -> None:
    # a DataLoader worker's exception comes back with the worker's whole traceback as its message
    from torch._utils import ExceptionWrapper

    from eexit.cli_output import config_errors_exit
    from eexit.data.image_folder import CorruptImageError

    try:
        raise CorruptImageError("cannot read image /data/train/a/1.png: empty file (data.bad_files=skip ...)")
    except CorruptImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(SystemExit) as stop, config_errors_exit():
        wrapped.reraise()
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: cannot read image /data/train/a/1.png: empty file (data.bad_files=skip ...)"
    )


def test_image_folder_split_folder_not_found_names_its_key(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    cfg = compose_train(tmp_path, ["data=image_folder", f"data.root={tmp_path / 'imgs'}", "data.test_dir=tst", *FAST])
    with pytest.raises(FileNotFoundError, match=r"imgs/tst \(data\.test_dir='tst' under data\.root="):
        train(cfg)


def test_image_folder_trains_on_user_data(tmp_path: Path) -> None:
    from PIL import Image

    from eexit.data.synthetic import make_shapes

    x, y, _ = make_shapes(48, num_classes=3, image_size=16, seed=3)
    for split in ("train", "test"):
        for i in range(len(y)):
            d = tmp_path / "imgs" / split / f"class_{int(y[i])}"
            d.mkdir(parents=True, exist_ok=True)
            arr = ((x[i, 0].clamp(-1, 2) + 1) / 3 * 255).byte().numpy()
            Image.fromarray(arr).convert("RGB").save(d / f"{i}.png")
    cfg = compose_train(
        tmp_path,
        [
            "data=image_folder",
            f"data.root={tmp_path / 'imgs'}",
            "data.image_size=16",
            "data.num_workers=0",
            "data.batch_size=8",
            "data.calib_size=16",  # the fewest images router calibration accepts
            "model=micro",
            *FAST,
        ],
    )
    metrics, objs = train(cfg)
    assert objs["datamodule"].info.class_names == ["class_0", "class_1", "class_2"]
    assert "test/acc/heavy" in metrics


def test_evaluate_writes_per_exit_metrics_of_a_checkpoint(tmp_path: Path) -> None:
    import json

    from eexit.evaluation import evaluate

    cfg = compose_train(tmp_path / "train", ["data=synthetic", "model=micro", *FAST])
    _, objs = train(cfg)
    cfg = compose_train(
        tmp_path / "eval",
        ["data=synthetic", f"ckpt_path={objs['best_ckpt']}", "eval.latency_min_run_time=0.01"],
        config_name="eval",
    )
    metrics = evaluate(cfg)
    written = json.loads((tmp_path / "eval" / "out" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert {f"test/acc/{k}" for k in ("tiny", "light", "medium", "heavy")} <= written.keys()
    cfg = compose_train(
        tmp_path / "eval2", ["data=synthetic", f"ckpt_path={tmp_path / 'nope.ckpt'}"], config_name="eval"
    )
    with pytest.raises(ConfigError, match="ckpt_path"):
        evaluate(cfg)


def test_list_hyperparameters_keep_the_checkpoint_safe_to_load(tmp_path: Path) -> None:
    # Hydra leaves list values as omegaconf ListConfig, which weights_only loading refuses
    overrides = ["data=synthetic", "model=micro", *FAST, "+model.optimizer.betas=[0.8,0.95]", "router.calibrate=false"]
    _, objs = train(compose_train(tmp_path, overrides))
    loaded = load_checkpoint(objs["best_ckpt"])  # no trust needed
    hparams = torch.load(objs["best_ckpt"], weights_only=False)["hyper_parameters"]
    assert (
        hparams["optimizer"].keywords["betas"] == [0.8, 0.95] and type(hparams["optimizer"].keywords["betas"]) is list
    )
    assert loaded.net.num_classes == 4


def test_an_empty_calibration_split_names_the_key() -> None:
    from omegaconf import OmegaConf

    from eexit.data.synthetic import SyntheticDataModule
    from eexit.training import run_calibration

    dm = SyntheticDataModule(num_train=64, num_test=16, val_size=0.25, calib_size=0, seed=0)
    with pytest.raises(ConfigError, match=r"data\.calib_size.*0 held-out calibration images"):
        run_calibration("never-read.ckpt", dm, OmegaConf.create({}))


@pytest.mark.parametrize(
    ("script", "override", "message"),
    [
        ("train.py", "model.loss.attn_weight=-1", "error: config key 'model.loss.attn_weight': lambda must be"),
        ("evaluate.py", "limit=0", "error: config key 'limit': (null: the whole test split) must be"),
    ],
)
def test_entry_points_report_a_bad_key_in_one_line_with_status_2(
    tmp_path: Path, script: str, override: str, message: str
) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, script, "data=synthetic", "logger=none", f"hydra.run.dir={tmp_path}", override],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr


def test_a_bad_key_in_a_multirun_is_left_to_hydra_so_every_job_is_launched(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = ["-m", "data=synthetic", "logger=none", "model.loss.attn_weight=-1,-2", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=root, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "#1 : data=synthetic logger=none model.loss.attn_weight=-2" in out  # the sweep was not cut short
    assert "config key 'model.loss.attn_weight': lambda must be" in out


def test_ddp_inside_a_multirun_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    # Lightning starts DDP's further processes by running the command line again, -m included:
    # each process ran the whole sweep (the ranks paired up only by the sweeps' common order)
    args = ["-m", "data=synthetic", "logger=none", "trainer=ddp", "trainer.accelerator=cpu", "seed=1,2"]
    # (also strategy=auto on 2 devices, which Lightning makes DDP with the same launcher)
    proc = subprocess.run(
        [sys.executable, "train.py", *args, f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config key 'trainer.strategy': DDPStrategy with 2 processes cannot run inside a Hydra multirun (-m)" in out
    assert "#1 : data=synthetic logger=none trainer=ddp trainer.accelerator=cpu seed=2" in out
    assert not list(tmp_path.glob("*/checkpoints"))  # no job trained


def test_the_model_summary_counts_the_flops_of_an_example_input(tmp_path: Path) -> None:
    from pytorch_lightning.utilities.model_summary import ModelSummary

    from eexit.training import build_datamodule, build_module

    cfg = compose_train(tmp_path, ["data=synthetic", "model=micro", *FAST])
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    assert tuple(module.example_input_array.shape) == (1, dm.info.in_chans, dm.info.image_size, dm.info.image_size)
    summary = ModelSummary(module, max_depth=1)
    heavy = count_flops(module.net.predict_exit, module.example_input_array, ExitLevel.HEAVY)
    assert summary.total_flops >= heavy > 0  # every exit runs in forward: at least HEAVY's path
    assert module.training  # the summary's forward left the module in train mode


def test_split_sizes_that_leave_no_training_images_name_the_key(tmp_path: Path) -> None:
    # the pool's size is known only once the data is loaded (inside the fit): still one ConfigError
    cfg = compose_train(tmp_path, ["data=synthetic", "model=micro", *FAST, "data.val_size=500", "data.calib_size=64"])
    with pytest.raises(ConfigError, match=r"data\.val_size.*leave no training images"):
        train(cfg)


def test_resuming_from_a_torch_file_that_is_no_training_checkpoint_names_the_key(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"a": torch.ones(2)}, foreign)
    cfg = compose_train(tmp_path, ["data=synthetic", "model=micro", *FAST, f"ckpt_path={foreign}"])
    with pytest.raises(ConfigError, match=r"ckpt_path.*is no eexit training checkpoint to resume from"):
        train(cfg)


def test_a_dataset_of_one_class_names_the_data(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        d = tmp_path / "imgs" / split / "only"
        d.mkdir(parents=True)
        for i in range(4):
            Image.new("L", (16, 16), 40 * i).save(d / f"{i}.png")
    cfg = compose_train(
        tmp_path, ["data=image_folder", f"data.root={tmp_path / 'imgs'}", "data.image_size=16", "model=micro", *FAST]
    )
    with pytest.raises(ConfigError, match=r"'data'.*has 1 class\(es\); a classifier needs at least 2"):
        train(cfg)


def test_an_unreadable_training_image_ends_the_entry_point_in_one_line(capsys) -> None:
    from eexit.cli_output import config_errors_exit
    from eexit.data.image_folder import CorruptImageError

    with pytest.raises(SystemExit) as stop, config_errors_exit():
        raise CorruptImageError("cannot read /data/cats/[1].png: truncated")
    assert stop.value.code == 2
    assert " ".join(capsys.readouterr().err.split()) == "error: cannot read /data/cats/[1].png: truncated"


def test_a_loss_that_trains_nothing_is_refused(tmp_path: Path) -> None:
    zero = "{tiny: 0, light: 0, medium: 0, heavy: 0}"
    cfg = compose_train(
        tmp_path,
        ["data=synthetic", "model=micro", *FAST, f"model.loss.exit_weights={zero}", "model.loss.attn_weight=0"],
    )
    with pytest.raises(ConfigError, match=r"exit_weights.*all 0 and attn_weight is 0"):
        train(cfg)


def test_double_precision_trains_with_the_model_summary(tmp_path: Path) -> None:
    # the summary's example input was float32 while precision=64 converts the module to float64
    cfg = compose_train(
        tmp_path, ["data=synthetic", "model=micro", *FAST, "trainer.precision=64", "router.calibrate=false"]
    )
    metrics, objs = train(cfg)
    assert next(objs["model"].parameters()).dtype == torch.float64
    assert 0 <= metrics["test/acc/heavy"] <= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_sync_batchnorm_on_the_cpu_is_refused_before_the_processes_start(tmp_path: Path) -> None:
    for accelerator in ("auto", "cpu"):
        overrides = ["data=synthetic", "model=micro", "trainer=ddp", "trainer.sync_batchnorm=true", *FAST]
        cfg = compose_train(tmp_path, [*overrides, f"trainer.accelerator={accelerator}"])
        with pytest.raises(ConfigError, match=r"trainer\.sync_batchnorm.*needs GPUs"):
            train(cfg)


def test_eps_zero_is_refused_only_where_it_is_used(tmp_path: Path) -> None:
    from eexit.config import validate_train_config

    with pytest.raises(ConfigError, match=r"model\.loss\.eps"):
        validate_train_config(compose_train(tmp_path, ["data=synthetic", "model=micro", "model.loss.eps=0"]))
    # with a temperature softmax eps is not used: 0 is fine (MultiExitLoss takes it too)
    validate_train_config(
        compose_train(tmp_path, ["data=synthetic", "model=micro", "model.loss.eps=0", "model.loss.temperature=0.5"])
    )


def test_a_sweeper_gets_the_best_checkpoints_heavy_accuracy_not_the_last_epochs() -> None:
    from eexit.training import optimized_metric

    best = pl.callbacks.ModelCheckpoint(monitor="val/acc/heavy", mode="max")
    best.best_model_score = torch.tensor(0.93)
    last_epoch = {"val/acc/heavy": 0.91}
    assert optimized_metric(last_epoch, SimpleNamespace(checkpoint_callbacks=[best])) == pytest.approx(0.93)
    other = pl.callbacks.ModelCheckpoint(monitor="epoch", mode="min")
    other.best_model_score = torch.tensor(0.0)
    assert optimized_metric(last_epoch, SimpleNamespace(checkpoint_callbacks=[other])) == 0.91
    assert optimized_metric({}, SimpleNamespace(checkpoint_callbacks=[])) is None


def test_each_exits_accuracy_is_measured_on_its_own_logits(tmp_path: Path) -> None:
    """Pins ``{stage}/acc/{exit}`` to that exit's logits: each exit's head is set to answer one
    class of its own for every image (exit i says class i), so its validation accuracy is exactly
    the share of validation images of class i, different for each exit (HEAVY's logits for all
    of them gave four equal accuracies)."""
    import pytorch_lightning as pl

    from eexit.training import build_datamodule, build_module

    cfg = compose_train(tmp_path, ["data=synthetic", "model=micro", *FAST])
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    with torch.no_grad():
        for level, head in zip(ExitLevel, module.net.heads, strict=True):
            last = head.classifier[-1]  # the MLP head's output layer
            last.weight.mul_(1e-3)  # small logits from the features (the cams stay defined) ...
            last.bias.zero_()
            last.bias[int(level)] = 10.0  # ... under one class's large bias: always class `level`
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    (logged,) = trainer.validate(module, datamodule=dm, verbose=False)
    labels = torch.cat([y for _, y in dm.val_dataloader()])
    share = {lv.key: (labels == int(lv)).double().mean().item() for lv in ExitLevel}
    assert len(set(share.values())) == 4, share  # the classes' shares differ: a swapped exit shows
    for lv in ExitLevel:
        assert logged[f"val/acc/{lv.key}"] == pytest.approx(share[lv.key], abs=1e-6), lv.key


def test_the_test_split_is_scored_with_the_best_checkpoint_not_the_last_weights(tmp_path: Path) -> None:
    """Pins ``train``'s test stage to the best checkpoint: with epoch 0 the best (monitor=epoch,
    mode=min) of two epochs, the ``test/...`` metrics it returns are those of ``epoch_000.ckpt``'s
    weights, scored again here, and not those of the final weights (``last.ckpt``), which score
    differently; the module is left holding the tested weights."""
    import pytorch_lightning as pl

    from eexit.training import build_datamodule, build_module

    overrides = [
        "data=synthetic",
        "data.num_train=192",  # 144 training images: 5 steps an epoch
        "data.num_test=64",
        "model=micro",
        "experiment=baseline",
        "logger=none",
        "trainer.max_epochs=2",
        "callbacks.model_checkpoint.monitor=epoch",  # epoch 0 is the best, once and for all
        "callbacks.model_checkpoint.mode=min",
        "router.calibrate=false",
    ]
    cfg = compose_train(tmp_path, overrides)
    metrics, objs = train(cfg)
    folder = tmp_path / "out" / "checkpoints"
    assert objs["best_ckpt"] == str(folder / "epoch_000.ckpt")

    def scores(ckpt: Path) -> dict[str, float]:
        dm = build_datamodule(cfg)
        module = build_module(cfg, dm)
        module.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
        trainer = pl.Trainer(
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
        )
        (logged,) = trainer.test(module, datamodule=dm, verbose=False)
        return logged

    best, last = scores(folder / "epoch_000.ckpt"), scores(folder / "last.ckpt")
    assert best["test/loss"] != pytest.approx(last["test/loss"], rel=1e-3)  # the two weights tell apart
    assert best.keys() <= metrics.keys()
    for key, value in best.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    saved = torch.load(folder / "epoch_000.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in objs["model"].state_dict().items())


# MultiExitModule's steps and optimizers, unit tests on the micro network


def _logged_names(module: MultiExitModule, stage: str) -> dict[str, float]:
    logged: dict[str, float] = {}

    def log(name, value, **kwargs) -> None:
        logged[name] = value.detach() if isinstance(value, torch.Tensor) else value

    module.log = log  # type: ignore[method-assign]
    torch.manual_seed(1)
    module._batch_idx = 0
    module._step((torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])), stage)
    return logged


def test_training_kl_is_logged_at_lambda_zero_only_with_log_train_kl() -> None:
    """Pins ``log_train_kl``: at lambda 0 the training step measures the KL (``train/attn_kl/*``)
    only when asked to; validation always does."""
    plain = MultiExitLoss(attn_weight=0.0)
    assert not any("attn_kl" in k for k in _logged_names(micro_module(plain), "train"))
    asked = _logged_names(micro_module(plain, log_train_kl=True), "train")
    assert {"train/loss/attn_kl", "train/attn_kl/tiny", "train_step/loss/attn_kl"} <= asked.keys()
    assert "val/attn_kl/tiny" in _logged_names(micro_module(plain), "val")


def test_loss_ce_is_logged_as_the_unweighted_ce_sum_not_the_total() -> None:
    """Pins ``{stage}/loss/ce`` to ``LossOutput.ce_total`` (``{stage}/loss`` is the total)."""
    logged = _logged_names(micro_module(MultiExitLoss(attn_weight=1.0)), "train")
    ce = sum(float(logged[f"train/loss/ce/{lv.key}"]) for lv in ExitLevel)
    assert float(logged["train/loss/ce"]) == pytest.approx(ce, abs=1e-5)
    assert float(logged["train/loss"]) > float(logged["train/loss/ce"])  # the KL term on top


def test_training_step_backpropagates_the_kl_through_the_cams_gradients() -> None:
    """Pins ``create_graph`` in training with lambda > 0: Grad-CAM's channel weights are
    gradients through the exit's classifier, so the KL alone moves the students' classifiers
    (with a detached graph they got no gradient from it)."""
    loss = MultiExitLoss(exit_weights={lv.key: 0.0 for lv in ExitLevel}, attn_weight=1.0)
    module = micro_module(loss)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    torch.manual_seed(1)
    module.training_step((torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])), 0).backward()
    for level in (ExitLevel.TINY, ExitLevel.LIGHT, ExitLevel.MEDIUM):
        grads = [p.grad for p in module.net.heads[level].classifier.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, level.name


@pytest.mark.parametrize(
    ("scheduler", "interval", "length"),
    [
        (functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1), "step", ("total_steps", 10)),
        (functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=7), "step", ("total_steps", 7)),
        (functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR), "step", ("T_max", 10)),
        (functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=3), "epoch", ("T_max", 3)),
        (functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2), "epoch", None),
    ],
    ids=["onecycle", "onecycle_given", "cosine", "cosine_given", "step_lr"],
)
def test_a_schedule_length_is_filled_in_only_when_the_config_leaves_it_out(scheduler, interval, length) -> None:
    """Pins ``configure_optimizers``: ``total_steps`` / ``T_max`` become the run's step count
    (10 here) only when not given, the scheduler then steps every batch (OneCycleLR always),
    others every epoch."""
    module = micro_module(scheduler=scheduler)
    module._trainer = stand_in_trainer(estimated_stepping_batches=10)
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == interval
    if length is not None:
        assert getattr(config["lr_scheduler"]["scheduler"], length[0]) == length[1]


def _hand_set_heads(net, label: int) -> None:
    with torch.no_grad():
        for head in net.heads:
            last = head.classifier[-1]
            last.weight.mul_(1e-3)
            last.bias.zero_()
            last.bias[label] = 10.0  # every exit answers `label` for every image


def test_epoch_metrics_are_kept_per_stage_and_the_kl_is_a_per_image_mean() -> None:
    """Pins the per-stage metric objects and the KL's batch weighting in a real fit: the heads
    answer class 0, training images are all class 0 and validation images class 1, so train
    accuracy is 1 and validation accuracy 0 (a metric shared across stages mixes them); the
    validation KL, over batches of 2, 2 and 1 images, is the mean over the 5 images (an
    unweighted mean of batch means differs)."""
    module = micro_module(MultiExitLoss(attn_weight=0.5), lr=0.0)
    _hand_set_heads(module.net, 0)
    g = torch.Generator().manual_seed(2)
    train = TensorDataset(torch.randn(4, 1, 16, 16, generator=g), torch.zeros(4, dtype=torch.long))
    val_x, val_y = torch.randn(5, 1, 16, 16, generator=g), torch.ones(5, dtype=torch.long)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, DataLoader(train, batch_size=4), DataLoader(TensorDataset(val_x, val_y), batch_size=2))
    metrics = trainer.callback_metrics
    for lv in ExitLevel:
        assert float(metrics[f"train/acc/{lv.key}"]) == 1.0 and float(metrics[f"val/acc/{lv.key}"]) == 0.0, lv.key
    module.net.eval()
    out = module.net(val_x, with_cams=True, targets=val_y)
    per_image = module.loss_fn.consistency(out.cams)
    for key, kl in per_image.items():
        assert float(metrics[f"val/attn_kl/{key}"]) == pytest.approx(float(kl.mean()), rel=1e-4), key


def _printed_lines(print_table, metrics: dict) -> list[str]:
    """The lines a ``cli_output`` table printer writes for ``metrics``."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), record=True, width=200)
    print_table(metrics, console=console)
    return console.export_text().splitlines()


def test_the_exit_table_shows_accuracies_in_percent_and_only_the_splits_measured() -> None:
    """train.py's per-exit table: accuracy in percent, attention KL to 4 places, ``-`` for a missing
    value; a split without accuracies (no test run) gets no columns."""
    from eexit.cli_output import print_exit_table

    lines = _printed_lines(print_exit_table, {"val/acc/tiny": 0.5, "val/attn_kl/tiny": 0.125, "val/acc/heavy": 0.9876})
    assert any("val acc" in line for line in lines) and not any("test acc" in line for line in lines)
    tiny = next(line for line in lines if "TINY" in line)
    light = next(line for line in lines if "LIGHT" in line)
    assert "50.00%" in tiny and "0.1250" in tiny and "98.76%" in next(line for line in lines if "HEAVY" in line)
    assert light.count("-") >= 2 and "%" not in light


def test_the_evaluation_summary_gives_the_oracle_its_full_saving() -> None:
    """evaluate.py's routing table: the oracle saves all it can (1.00), a router its measured
    fraction; accuracies in percent; a router not evaluated has no row."""
    from eexit.cli_output import print_eval_summary

    metrics = {
        "heavy/accuracy": 0.9,
        "heavy/latency_ms": 2.0,
        "routing/tier_distribution": {"oracle": [0.5, 0.2, 0.2, 0.1], "gate": [0.4, 0.3, 0.2, 0.1]},
        "oracle/accuracy": 0.95,
        "oracle/flops_ratio": 0.3,
        "oracle/latency_ms": 0.5,
        "routed/gate/accuracy": 0.875,
        "routed/gate/flops_ratio": 0.5,
        "routed/gate/latency_ms": 1.0,
        "routed/gate/oracle_saving_fraction": 0.25,
    }
    lines = _printed_lines(print_eval_summary, metrics)
    oracle = next(line for line in lines if "oracle" in line and "%" in line).split()
    gate = next(line for line in lines if "gate" in line and "%" in line).split()
    assert "95.00%" in oracle and "1.00" in oracle and "50%/20%/20%/10%" in oracle
    assert "87.50%" in gate and "0.25" in gate and "40%/30%/20%/10%" in gate
    assert not any("staged" in line or "cascade" in line for line in lines)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("model.loss.consistency_exits=[tiny,heavy]", r"'model\.loss\.consistency_exits': HEAVY is the teacher"),
        ("seed=1.5", r"'seed': \(it seeds the split.*must be a finite integer >= 0, got 1\.5"),
        ("router.max_drop=1", r"'router\.max_drop': is a share of accuracy, in \[0, 1\); got 1"),
        ("data.calib_size=0.0", r"'data\.calib_size': 0 held-out calibration images"),
        ("data.batch_size=true", r"'data\.batch_size': must be a finite integer >= 1, got True"),
        ("model.loss.attn_weight=false", r"'model\.loss\.attn_weight': lambda must be a finite number >= 0, got False"),
    ],
)
def test_more_bad_training_values_name_the_key(tmp_path: Path, override: str, names: str) -> None:
    """Boundary and type cases of the start-of-run check: HEAVY as a consistency exit, a
    fractional seed, a max_drop of the whole accuracy, a calibration split of 0.0 images, and
    booleans (which Python counts as numbers) are each refused naming the key."""
    cfg = compose_train(tmp_path, ["data=synthetic", "model=micro", override])
    with pytest.raises(ConfigError, match=names):
        validate_train_config(cfg)


@pytest.mark.parametrize(
    ("value", "trusted"), [(None, False), (False, False), (True, True), ("no", ConfigError), ("yes", ConfigError)]
)
def test_trust_checkpoint_is_a_real_boolean_and_null_trusts_nothing(value, trusted) -> None:
    """``trust_checkpoint``: null or false keeps the safe unpickling, only true turns it off; a
    string (truthy whatever it says) is refused naming the key."""
    cfg = OmegaConf.create({"trust_checkpoint": value})
    if trusted is ConfigError:
        with pytest.raises(ConfigError, match=r"'trust_checkpoint': must be true or false"):
            trusts_checkpoints(cfg)
    else:
        assert trusts_checkpoints(cfg) is trusted
    assert trusts_checkpoints(OmegaConf.create({})) is False


def test_the_smallest_allowed_calibration_split_and_image_size_pass() -> None:
    """The bounds are inclusive: exactly ``MIN_CALIBRATION_IMAGES`` calibration images and an image
    size equal to the backbone's total stride are accepted, one less is refused."""
    check_calibration_size(MIN_CALIBRATION_IMAGES)
    with pytest.raises(ConfigError, match=r"'data\.calib_size'"):
        check_calibration_size(MIN_CALIBRATION_IMAGES - 1)
    check_image_size(16, 16, "micro")
    with pytest.raises(ConfigError, match=r"'data\.image_size': 15 px is too small for model\.net 'micro'"):
        check_image_size(15, 16, "micro")


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("recalibrate=yes", r"'recalibrate': must be true or false"),
        ("eval.faithfulness.baseline=noise", r"'eval\.faithfulness\.baseline': must be 'mean' or 'blur'"),
        ("limit=2.5", r"'limit': \(null: the whole test split\) must be a finite integer >= 1"),
        ("eval.cluttered.num_images=0", r"'eval\.cluttered\.num_images'"),
        ("eval.gate_quality.num_images=1.5", r"'eval\.gate_quality\.num_images'"),
        ("eval.plots.num_heatmap_images=0", r"'eval\.plots\.num_heatmap_images'"),
        ("eval.top_fraction=0", r"'eval\.top_fraction'"),
        ("trust_checkpoint=maybe", r"'trust_checkpoint'"),
        ("router.serve=oracle", r"'router\.serve'"),
        ("data.num_workers=-1", r"'data\.num_workers'"),
    ],
)
def test_evaluate_keys_are_checked_before_anything_loads(tmp_path: Path, override: str, names: str) -> None:
    """``validate_eval_config`` alone (no checkpoint, no data) refuses each bad evaluate.py key,
    naming it."""
    cfg = compose_train(tmp_path, ["data=synthetic", override], config_name="eval")
    with pytest.raises(ConfigError, match=names):
        validate_eval_config(cfg)


def test_evaluate_takes_a_top_fraction_of_one_and_refuses_a_file_as_the_bundle_folder(tmp_path: Path) -> None:
    """``eval.top_fraction=1`` (every pixel) is allowed; ``export_bundle`` naming an existing file
    is refused as such, a folder path is taken."""
    validate_eval_config(compose_train(tmp_path, ["data=synthetic", "eval.top_fraction=1"], config_name="eval"))
    taken = tmp_path / "taken"
    taken.write_text("x")
    cfg = compose_train(tmp_path, ["data=synthetic", f"export_bundle={taken}"], config_name="eval")
    with pytest.raises(ConfigError, match=r"'export_bundle': is a file"):
        validate_eval_config(cfg)
    validate_eval_config(
        compose_train(tmp_path, ["data=synthetic", f"export_bundle={tmp_path / 'b'}"], config_name="eval")
    )


@pytest.mark.parametrize("size", [0, 0.0, 0.25, 100])
def test_a_split_of_zero_images_or_a_fraction_or_a_count_is_a_split_size(size) -> None:
    """``check_split_size`` takes 0 (no such split), a fraction in [0, 1) and a whole count."""
    check_split_size("data.val_size", size)
