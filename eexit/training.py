"""``train(cfg)``: build everything from a Hydra config, fit, test; importable for tests."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from eexit.checkpoint import checkpoint_globals, read_checkpoint
from eexit.config import (
    ConfigError,
    check_calibration_size,
    check_image_size,
    trusts_checkpoints,
    validate_train_config,
)
from eexit.data.base import SplitDataModule
from eexit.lit.multi_exit import MultiExitModule
from eexit.lit.resume import run_checkpoints_folder
from eexit.models.net import MultiExitNet

log = logging.getLogger(__name__)


def _instantiate_dict(section: DictConfig | None) -> list:
    """Instantiate every entry with a ``_target_`` of a dict-of-configs section."""
    if not section:
        return []
    return [hydra.utils.instantiate(c) for c in section.values() if c is not None and "_target_" in c]


def instantiate_named(node: DictConfig, key: str, **kwargs):
    """``hydra.utils.instantiate`` that re-raises the constructor's own error, naming ``key``.

    A missing file keeps its ``FileNotFoundError`` (its message names the path); a bad value
    (including Lightning's ``MisconfigurationException``: no GPU, ``devices=0``) becomes a
    ``ConfigError`` for ``key``.
    """
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (FileNotFoundError, ConfigError)):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
            raise ConfigError(key, str(cause)) from cause
        raise


def build_datamodule(cfg: DictConfig) -> SplitDataModule:
    return instantiate_named(cfg.data, "data")


def _plain_partial(node: DictConfig, key: str) -> functools.partial:
    """Hydra's partial of an optimizer or scheduler config as a plain ``functools.partial`` of
    plain lists and dicts: checkpoints save it among the hyperparameters, and they then hold no
    omegaconf objects (which a safe load, ``weights_only=True``, refuses) and no Hydra class
    (Hydra >= 1.3.6 makes a private ``_DeferredTarget``, which other Hydra versions cannot load)."""
    if not node.get("_partial_", False):  # the optimizer needs the parameters, the scheduler the optimizer
        raise ConfigError(key, "needs _partial_: true (it is called later with the parameters / optimizer)")
    made = hydra.utils.instantiate(node, _convert_="all")
    return functools.partial(made.func, *made.args, **made.keywords)


def build_module(cfg: DictConfig, dm: SplitDataModule) -> MultiExitModule:
    """Build the network for the data (classes, channels) and wrap it in the LightningModule."""
    info = dm.info
    if info.num_classes < 2:
        raise ConfigError("data", f"{info.name} has {info.num_classes} class(es); a classifier needs at least 2")
    net: MultiExitNet = instantiate_named(
        cfg.model.net, "model.net", num_classes=info.num_classes, in_chans=info.in_chans
    )
    check_image_size(info.image_size, net.min_input_size, cfg.model.net.name)
    loss = instantiate_named(cfg.model.loss, "model.loss")
    module = MultiExitModule(
        net=net,
        loss=loss,
        optimizer=_plain_partial(cfg.model.optimizer, "model.optimizer"),
        scheduler=_plain_partial(cfg.model.scheduler, "model.scheduler") if cfg.model.get("scheduler") else None,
        log_train_kl=cfg.model.get("log_train_kl", False),
    )
    # Lightning's model summary runs it (in eval mode, without gradients) to show the FLOPs and
    # the input and output sizes of each module instead of "Total FLOPs: 0"
    module.example_input_array = torch.zeros(1, info.in_chans, info.image_size, info.image_size)
    return module


def resolve_ckpt_path(ckpt_path: str | None, cfg: DictConfig) -> tuple[str | None, dict]:
    """``"last"`` -> the newest ``last.ckpt`` under this task's log folder; a given file must be
    a checkpoint that unpickles safely (or ``trust_checkpoint=true``).

    Returns:
        The checkpoint's path (``None``: a fresh run) and its ``eexit`` entry (the run's
        description: spec, data split, W&B run; empty for a fresh run).
    """
    if ckpt_path in (None, "", "null"):
        return None, {}
    if ckpt_path == "last":
        root = Path(cfg.paths.log_dir) / cfg.task_name
        found = sorted(root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError("ckpt_path", f"'last' asked for, but no last.ckpt under {root}")
        ckpt_path = str(found[-1])
    elif not Path(ckpt_path).is_file():
        raise ConfigError("ckpt_path", f"checkpoint not found: {ckpt_path}")
    try:  # the same safe unpickling as the resume itself, with the file and the reason named
        ckpt = read_checkpoint(ckpt_path, trust=trusts_checkpoints(cfg))
    except ValueError as err:
        raise ConfigError("ckpt_path", str(err)) from None
    required = ("state_dict", "pytorch-lightning_version", "eexit")
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ConfigError(
            "ckpt_path", f"{ckpt_path} is no eexit training checkpoint to resume from (it lacks {', '.join(missing)})"
        )
    return ckpt_path, dict(ckpt["eexit"] or {})


def instantiate_loggers(section: DictConfig | None, resumed_wandb_run: str | None = None) -> list:
    """The loggers of ``cfg.logger``; a resumed run's W&B logger continues the W&B run of the
    checkpoint (its id, ``resume="allow"``) unless ``logger.wandb.id`` names one.

    Online the resumed run goes on in the same W&B run; offline each part is a local run with
    the same id, which ``wandb sync`` uploads, in order of start time, into one run.
    """
    loggers = []
    for node in (section or {}).values():
        if node is None or "_target_" not in node:
            continue
        kwargs = {}
        if resumed_wandb_run and node.get("id") is None and _is_wandb_logger(node):
            kwargs = {"id": resumed_wandb_run, "resume": "allow"}
            log.info("resuming: logging into W&B run %s", resumed_wandb_run)
        loggers.append(hydra.utils.instantiate(node, **kwargs))
    return loggers


def _is_wandb_logger(node: DictConfig) -> bool:
    try:
        cls = hydra.utils.get_class(node._target_)
    except (ImportError, ValueError):  # instantiate reports what is wrong with the target
        return False
    return isinstance(cls, type) and issubclass(cls, pl.loggers.WandbLogger)


def continue_checkpoints_in(callbacks: list, ckpt_path: str, default_dir: str) -> None:
    """Resuming a run: its checkpoint callbacks go on writing into the resumed run's folder.

    ``ModelCheckpoint`` restores its best / top-k bookkeeping only when its folder is the one
    in the checkpoint; a fresh run folder would forget the best epoch before the crash. Only a
    checkpoint inside a ``checkpoints/`` folder (one of our runs) moves the callbacks, and only
    those writing to this run's own ``default_dir`` (a callback given another folder keeps it).
    """
    folder = run_checkpoints_folder(ckpt_path)
    if folder is None:
        return
    default = os.path.realpath(default_dir)
    moved = [cb for cb in callbacks if isinstance(cb, pl.callbacks.ModelCheckpoint) and cb.dirpath == default]
    for cb in moved:
        cb.dirpath = folder
    if moved:
        log.info("resuming: checkpoints go on in %s", folder)


def refuse_relaunch_in_multirun(trainer: pl.Trainer) -> None:
    """Lightning starts the further processes of DDP (``ddp``, and ``auto`` on several devices)
    by running the command line again: in a Hydra multirun (``-m``) each process ran the whole
    sweep, and the processes of a job paired up only because the sweeps went through the jobs in
    the same order (a sampling sweeper would give them different settings). Refused, naming the
    key, before any process starts."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, _SubprocessScriptLauncher) and trainer.world_size > 1:
        raise ConfigError(
            "trainer.strategy",
            f"{type(trainer.strategy).__name__} with {trainer.world_size} processes cannot run inside a Hydra multirun "
            "(-m): Lightning starts the further processes by running the command line again, so each would run "
            "the whole sweep; run the sweep's jobs one by one without -m, or each job on one device",
        )


def finish_wandb_runs(loggers: list) -> None:
    """Close the W&B runs that these loggers started, so that their files are complete when
    ``train`` / ``evaluate`` returns and the next job of a Hydra multirun (``-m``) starts a run of
    its own instead of reusing this one (Lightning's ``WandbLogger`` leaves its run open)."""
    for lg in loggers:
        run = getattr(lg, "_experiment", None)  # None: the run was never started (or not rank zero)
        if isinstance(lg, pl.loggers.WandbLogger) and run is not None and hasattr(run, "finish"):
            run.finish()


def optimized_metric(metrics: dict[str, float], trainer: pl.Trainer) -> float | None:
    """What ``train.py`` returns to a Hydra sweeper: the HEAVY validation accuracy of the best
    checkpoint (the one tested, calibrated and exported), or of the last epoch when no
    checkpoint callback monitors it."""
    best = next(
        (
            cb.best_model_score
            for cb in trainer.checkpoint_callbacks
            if isinstance(cb, pl.callbacks.ModelCheckpoint)
            and cb.monitor == "val/acc/heavy"
            and cb.best_model_score is not None
        ),
        None,
    )
    return float(best) if best is not None else metrics.get("val/acc/heavy")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict]:
    """Fit and test the model described by ``cfg``.

    The W&B run (``logger=wandb``) is finished before returning, also when training fails.

    Returns:
        The metrics (``train/...``, ``val/...``, ``test/...``) and a dict of the objects used
        (``datamodule``, ``model``, ``trainer``, ``best_ckpt``, ``calibration``, ``bundle``: the
        directory of the exported serving bundle, or ``None`` without calibration).
    """
    validate_train_config(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    model = build_module(cfg, dm)
    ckpt_path, resumed = resolve_ckpt_path(cfg.get("ckpt_path"), cfg)
    if (cfg.get("router") or {}).get("calibrate"):
        # split now (Lightning's setup then finds it done): a calibration split too small for
        # the routers, given as a fraction of a pool known only here, is named before the fit
        # rather than after it
        dm.setup("fit")
        check_calibration_size(len(dm.data_calib))
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"), resumed.get("wandb_run"))
    if not loggers:  # nothing to monitor into (logger=none)
        callbacks = [cb for cb in callbacks if not isinstance(cb, pl.callbacks.LearningRateMonitor)]
    trainer: pl.Trainer = instantiate_named(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    refuse_relaunch_in_multirun(trainer)
    try:
        return _fit_test_calibrate_export(cfg, dm, model, trainer, callbacks, loggers, ckpt_path)
    finally:
        finish_wandb_runs(loggers)


def _fit_test_calibrate_export(
    cfg: DictConfig,
    dm: SplitDataModule,
    model: MultiExitModule,
    trainer: pl.Trainer,
    callbacks: list,
    loggers: list,
    ckpt_path: str | None,
) -> tuple[dict[str, float], dict]:
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        try:
            lg.log_hyperparams(hparams)  # W&B starts its run here
        except Exception as err:
            if isinstance(lg, pl.loggers.WandbLogger) and type(err).__module__.startswith("wandb"):
                raise ConfigError(
                    "logger.wandb",
                    f"W&B could not start the run: {err} (log in with `wandb login`, or log offline with "
                    "logger.wandb.offline=true)",
                ) from err
            raise

    if ckpt_path is not None:
        continue_checkpoints_in(callbacks, ckpt_path, str(Path(cfg.paths.output_dir) / "checkpoints"))
    # a safe unpickling (what an eexit checkpoint holds) unless the file is trusted
    with torch.serialization.safe_globals(checkpoint_globals()):
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=not trusts_checkpoints(cfg))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
    if not best:
        # fast_dev_run and runs without a checkpoint callback: keep the final weights anyway
        best = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
        trainer.save_checkpoint(best)
    if cfg.get("test"):  # the best checkpoint (or the final weights just saved)
        with torch.serialization.safe_globals(checkpoint_globals()):  # the file this run just wrote
            trainer.test(model, datamodule=dm, ckpt_path=best, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    calibration = None
    router_cfg = cfg.get("router") or {}
    if router_cfg.get("calibrate") and trainer.is_global_zero:
        calibration = run_calibration(best, dm, router_cfg, cfg.get("seed"))
        for kind, summary in calibration.fit_summary.items():
            for key, value in summary.items():
                if isinstance(value, float):
                    metrics[f"calib/{kind}/{key}"] = value
        for lg in loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if k.startswith("calib/")})
    bundle = None
    if calibration is not None:  # rank zero: the serving bundle of the calibrated best checkpoint
        from eexit.bundle import export_bundle

        bundle = str(export_bundle(best, Path(cfg.paths.output_dir) / "bundle", serve=router_cfg.get("serve", "gate")))
    return metrics, {
        "datamodule": dm,
        "model": model,
        "trainer": trainer,
        "best_ckpt": best,
        "calibration": calibration,
        "bundle": bundle,
    }


def run_calibration(ckpt_path: str, dm: SplitDataModule, router_cfg: DictConfig, seed: int | None = None):
    """Calibrate the routers on the datamodule's calibration split (the cross-fit split and the
    gates' fits seeded by ``seed``, the run's); store them in the checkpoint."""
    from eexit.routing.calibrate import calibrate_checkpoint, calibration_settings

    dm.setup("calibrate")
    calib = list(dm.calib_dataloader())
    n = sum(len(b[1]) for b in calib)
    check_calibration_size(n)  # before the cat, which fails on an empty split
    x = torch.cat([b[0] for b in calib])[: router_cfg.get("latency_batch", 256)]
    log.info("calibrating routers on %d held-out images", n)
    return calibrate_checkpoint(ckpt_path, calib, x, **calibration_settings(router_cfg, seed))
