"""LightningModule that trains every exit with cross-entropy plus attention consistency (EGT)."""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from eexit.config import ConfigError
from eexit.lit.resume import (
    RNG_KEY,
    collect_rng_states,
    resume_train_loader,
    resumes_mid_epoch,
    run_checkpoints_folder,
)
from eexit.losses import MultiExitLoss
from eexit.models.net import MultiExitNet
from eexit.types import ExitLevel

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test")
RUN_KEYS = ("spec", "data", "world_size", "loss", "wandb_run")
"""The entries of ``checkpoint["eexit"]`` that describe the run; the others are ``extra_state``
(the calibration)."""


class MultiExitModule(pl.LightningModule):
    """Train a ``MultiExitNet`` with ``MultiExitLoss``.

    Logged per stage (``train``, ``val``, ``test``), as epoch means: ``{stage}/loss``,
    ``{stage}/loss/ce``, ``{stage}/loss/attn_kl``, ``{stage}/loss/ce/{exit}``, ``{stage}/acc/{exit}``
    and ``{stage}/attn_kl/{exit}`` (KL of each early exit's cam distribution against HEAVY's; also
    measured when lambda is 0, so the baseline can be compared); and per training batch
    ``train_step/loss``, ``train_step/loss/ce`` and ``train_step/loss/attn_kl``.

    Args:
        net: the network.
        loss: the loss.
        optimizer: partial optimizer, called with the parameters.
        scheduler: partial LR scheduler, called with the optimizer; ``total_steps`` / ``T_max``
            are filled with the number of training steps when the scheduler takes them and the
            config leaves them out (it then steps every batch; OneCycleLR always does).
        log_train_kl: measure the attention KL in training also when lambda is 0.
    """

    def __init__(
        self,
        net: MultiExitNet,
        loss: MultiExitLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        log_train_kl: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss"], logger=False)
        self.net = net
        self.loss_fn = loss
        num_classes = net.num_classes
        self.acc = nn.ModuleDict(
            {
                f"{stage}_{lv.key}": MulticlassAccuracy(num_classes=num_classes, average="micro")
                for stage in STAGES
                for lv in ExitLevel
            }
        )
        self.kl = nn.ModuleDict(
            {f"{stage}_{lv.key}": MeanMetric() for stage in STAGES for lv in ExitLevel if lv != ExitLevel.HEAVY}
        )
        self.data_info: dict | None = None
        self.extra_state: dict = {}
        self._resume_rng: dict | None = None
        self._resume_split: dict | None = None
        self._resume_world_size: int | None = None
        self._resumed_wandb_run: str | None = None  # the W&B run of the resumed checkpoint
        self._schedule_length: tuple[str, int] | None = None

    @property
    def example_input_array(self) -> Tensor | None:
        """The summary's example images, in the parameters' dtype (``trainer.precision=64``
        converts the module after the example was made in float32)."""
        example = self._example_input_array
        if isinstance(example, Tensor) and example.is_floating_point():
            return example.to(next(self.parameters()).dtype)
        return example

    @example_input_array.setter
    def example_input_array(self, example: Tensor | None) -> None:
        self._example_input_array = example

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, C, H, W)`` -> four ``(B, K)`` logits."""
        return self.net(x).logits

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        training = stage == "train"
        want_cams = self.loss_fn.needs_cams or not training or self.hparams.log_train_kl
        out = self.net(x, with_cams=want_cams, targets=y, create_graph=training and self.loss_fn.needs_cams)
        parts = self.loss_fn(out.logits, y, out.cams if want_cams else None)
        if not torch.isfinite(parts.total):
            bad = [
                k
                for k, v in {
                    **{f"ce/{k}": v for k, v in parts.ce.items()},
                    **{f"attn_kl/{k}": v for k, v in parts.attn_kl.items()},
                }.items()
                if not torch.isfinite(v)
            ]
            raise FloatingPointError(
                f"non-finite {stage} loss at global step {self.global_step} (batch {self._batch_idx}); "
                f"bad terms: {', '.join(bad) or 'total'}"
            )
        bs = x.shape[0]
        losses = {"loss": parts.total, "loss/ce": parts.ce_total}
        if parts.attn_kl:
            losses["loss/attn_kl"] = parts.attn_kl_mean
        for name, value in losses.items():
            # the epoch mean under the same key in every stage (train/loss, val/loss, ...), reduced
            # across DDP ranks once at the epoch's end; training also logs every batch's value
            self.log(
                f"{stage}/{name}",
                value,
                on_step=False,
                on_epoch=True,
                prog_bar=name == "loss" and not training,
                batch_size=bs,
                sync_dist=True,
            )
            if training:
                self.log(f"train_step/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss")
        for lv in ExitLevel:
            key = f"{stage}_{lv.key}"
            self.log(
                f"{stage}/loss/ce/{lv.key}",
                parts.ce[lv.key],
                on_step=False,
                on_epoch=True,
                batch_size=bs,
                sync_dist=True,
            )
            acc = self.acc[key]
            acc(out.logits[lv].detach(), y)
            self.log(
                f"{stage}/acc/{lv.key}",
                acc,
                on_step=False,
                on_epoch=True,
                prog_bar=lv in (ExitLevel.TINY, ExitLevel.HEAVY),
            )
            if lv.key in parts.attn_kl:
                kl = self.kl[key]
                kl(parts.attn_kl[lv.key].detach(), weight=bs)
                self.log(f"{stage}/attn_kl/{lv.key}", kl, on_step=False, on_epoch=True)
        return parts.total

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self._batch_idx = batch_idx
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._batch_idx = batch_idx
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._batch_idx = batch_idx
        self._step(batch, "test")

    def configure_optimizers(self):
        try:  # torch's own check of a value (weight decay, betas, ...), named by its group
            opt = self.hparams.optimizer(params=self.parameters())
        except (ValueError, TypeError) as err:
            raise ConfigError("model.optimizer", str(err)) from None
        factory = self.hparams.scheduler
        if factory is None:
            return opt
        params = inspect.signature(getattr(factory, "func", factory)).parameters
        given = getattr(factory, "keywords", {})
        extra = {}
        for name in ("total_steps", "T_max"):
            if name in params and name not in given:
                steps = self.trainer.estimated_stepping_batches
                if not math.isfinite(steps):
                    raise ConfigError(
                        "trainer.max_epochs",
                        f"{getattr(factory, 'func', factory).__name__} needs the run's length ({name}), but the run "
                        "has no limit (trainer.max_epochs=-1 and no trainer.max_steps): set one of them (+trainer.max_steps=N), or "
                        f"model.scheduler.{name}, or model.scheduler=null",
                    )
                extra[name] = int(steps)
        self._schedule_length = next(iter(extra.items()), None)
        # OneCycleLR counts steps whoever gives its length; other schedulers step per batch when
        # their length was filled in from the step count here, per epoch otherwise
        interval = "step" if extra or "total_steps" in params else "epoch"
        try:
            scheduler = factory(optimizer=opt, **extra)
        except (ValueError, TypeError) as err:  # pct_start=2, a negative step count, ...
            raise ConfigError("model.scheduler", str(err)) from None
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def _check_resumed_schedule(self) -> None:
        """A scheduler whose length was filled in must have the restored run's length: the
        checkpoint's state overrides the new value (OneCycleLR then fails past its last step)."""
        if self._schedule_length is None:
            return
        name, wanted = self._schedule_length
        for config in self.trainer.lr_scheduler_configs:
            restored = getattr(config.scheduler, name, wanted)
            if restored != wanted:
                raise ConfigError(
                    "trainer.max_epochs",
                    f"the checkpoint's {type(config.scheduler).__name__} was built for {restored} steps ({name}); "
                    f"this run has {wanted}: a resumed run cannot change the schedule's length (keep "
                    "trainer.max_epochs, data sizes and batch size as in the checkpoint's run)",
                )

    def _check_resumed_split(self) -> None:
        """The resumed run must split the data as the checkpoint's run did (``data.split``), or
        its epochs would train on that run's validation and calibration images. Also warns that
        a resume with loader workers and augmentation is not exact."""
        record, self._resume_split = self._resume_split, None
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "split_differences"):
            return
        if dm.num_workers > 0 and getattr(dm, "augment", False):
            log.warning(
                "resuming with data.num_workers=%d and augmentation: the loader workers' random state is not in "
                "the checkpoint, so the resumed epochs augment differently from an uninterrupted run (exact "
                "resume: data.num_workers=0)",
                dm.num_workers,
            )
        differs = dm.split_differences(record) if record else []
        pool = (record or {}).get("pool_size")
        if not differs and pool is not None and dm.pool_size is not None and pool != dm.pool_size:
            # the same settings split another pool into other images (a folder that grew)
            raise ConfigError(
                "data",
                f"{self.trainer.ckpt_path} was trained on a pool of {pool} images, this data config gives "
                f"{dm.pool_size}: its split would put that run's validation and calibration images into training "
                "(resume on the same data, or start a new run)",
            )
        if differs:
            key = differs[0].split(":")[0]
            raise ConfigError(
                key if key == "seed" else f"data.{key}",
                f"{self.trainer.ckpt_path} was trained on another split of the data ({'; '.join(differs)}); resume "
                "with the same seed, data.val_size and data.calib_size",
            )

    def _check_resumed_spec(self, saved: dict | None) -> None:
        """A resumed checkpoint must hold the network this run builds: another architecture or
        class count would otherwise fail in ``load_state_dict`` with a size mismatch deep in torch.
        The first difference is named with its config key (``data`` for the class and channel
        counts, which the data set decides)."""
        if not saved:
            return
        current = self.net.spec
        differs = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        if not differs:
            return
        key = differs[0]
        where = "data" if key in ("num_classes", "in_chans") else f"model.net.{key}"
        detail = "; ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} here" for k in differs)
        ckpt = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        raise ConfigError(
            where,
            f"{ckpt} holds another network than this run builds ({detail}); resume with the checkpoint's "
            "model and data, or start a new run",
        )

    def _check_resumed_image_size(self) -> None:
        """The resumed run must see images of the checkpoint run's size (the spec does not hold
        it: the network takes any size, so another one would silently train on other images)."""
        dm = getattr(self.trainer, "datamodule", None)
        saved = (self.data_info or {}).get("image_size")
        if dm is None or not hasattr(dm, "info") or saved is None or saved == dm.info.image_size:
            return
        raise ConfigError(
            "data.image_size",
            f"{self.trainer.ckpt_path} was trained on {saved} px images, this run gives {dm.info.image_size} px: "
            "resume with the checkpoint's data.image_size, or start a new run",
        )

    def on_fit_start(self) -> None:
        # resuming: checked here, before the fit loop, so that a checkpoint whose run has already
        # finished (no epoch left, no on_train_start) is refused as well
        if self.trainer.ckpt_path:
            self._check_resumed_image_size()
            self._check_resumed_split()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "info"):
            self.data_info = dm.info.to_dict()
            if hasattr(dm, "split_record"):
                self.data_info["split"] = dm.split_record()

    def _follow_moved_run_folder(self, checkpoint: dict) -> None:
        """A run folder moved or copied before the resume: the checkpoint callbacks' saved states
        name the old ``checkpoints/`` folder, and Lightning then drops their best score and top-k
        bookkeeping (a worse later epoch became the best one, tested and exported) and keeps a
        best path into the old folder. Their paths are moved to the folder the checkpoint is in,
        where ``continue_checkpoints_in`` points the callbacks."""
        ckpt = getattr(self._trainer, "ckpt_path", None)
        folder = run_checkpoints_folder(ckpt) if ckpt else None
        if folder is None:
            return
        for state in (checkpoint.get("callbacks") or {}).values():
            old = state.get("dirpath") if isinstance(state, dict) else None
            if not isinstance(old, str) or old == folder or os.path.basename(old) != "checkpoints":
                continue

            def moved(path, old=old):
                return folder + path[len(old) :] if isinstance(path, str) and path.startswith(old + os.sep) else path

            state["dirpath"] = folder
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if key in state:
                    state[key] = moved(state[key])
            if isinstance(state.get("best_k_models"), dict):
                state["best_k_models"] = {moved(k): v for k, v in state["best_k_models"].items()}
            log.info("resuming: the checkpoints' bookkeeping follows the run from %s to %s", old, folder)

    def _check_resumed_world_size(self) -> None:
        """A checkpoint written in the middle of an epoch resumes with as many processes as wrote
        it: the training loader's position is kept per process (images yielded by each), so
        another count skipped or repeated images (1 -> 2 processes trained no step at all)."""
        saved, self._resume_world_size = self._resume_world_size, None
        now = self.trainer.world_size
        if saved is None or saved == now or not resumes_mid_epoch(self.trainer):
            return
        raise ConfigError(
            "trainer.devices",
            f"{self.trainer.ckpt_path} was written in the middle of an epoch by {saved} training process(es); this "
            f"run has {now}: the loader's position is kept per process, so the rest of the epoch would skip or "
            f"repeat images (resume with {saved} process(es), trainer.devices x trainer.num_nodes, or from a "
            "checkpoint written at an epoch's end)",
        )

    def _check_resumed_settings(self, hparams: dict | None, loss: dict | None) -> None:
        """A resumed run restores the optimizer and the scheduler from the checkpoint (their
        learning rate, weight decay, ... included): new settings of theirs would not take effect,
        while this run's config, logs and W&B run would record them. They are refused, naming the
        key. A changed loss does take effect from the resumed step on: a warning names it."""
        ckpt = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        for name in ("optimizer", "scheduler"):
            if hparams is None or name not in hparams:  # a checkpoint of another module
                continue
            saved, current = hparams[name], self.hparams.get(name)
            if (saved is None) != (current is None):  # a scheduler dropped or added
                differs = [
                    ("", f"{'no ' if saved is None else 'a '}{name}", f"{'no ' if current is None else 'a '}{name}")
                ]
            elif saved is None or not callable(saved):
                continue
            else:
                differs = _partial_differences(saved, current)
            if differs:
                key, was, now = differs[0]
                raise ConfigError(
                    f"model.{name}" + (f".{key}" if key else ""),
                    f"{ckpt} was trained with {was}, this run sets {now}: a resumed run restores the optimizer "
                    "and the scheduler from the checkpoint, so the new value would not take effect (resume with "
                    "the checkpoint's settings, or start a new run)",
                )
        if loss:
            now_loss = self.loss_fn.settings
            for key in sorted(set(loss) | set(now_loss)):
                if loss.get(key) != now_loss.get(key):
                    log.warning(
                        "resuming with model.loss.%s=%r (the checkpoint's run trained with %r): the resumed steps "
                        "train with the new value",
                        key,
                        now_loss.get(key),
                        loss.get(key),
                    )

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path:  # resuming: loader position and random state as saved
            self._check_resumed_world_size()
            self._check_resumed_schedule()
            resume_train_loader(self.trainer, self._resume_rng)
            self._resume_rng = None
            if self.extra_state.pop("calibration", None) is not None:
                log.info(
                    "resuming from a calibrated checkpoint: its calibration fits the old weights and is not "
                    "carried into the new checkpoints (train.py calibrates the best one after fitting)"
                )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        world_size = self._trainer.world_size if self._trainer is not None else 1
        checkpoint["eexit"] = {
            "spec": self.net.spec,
            "data": self.data_info,
            "world_size": world_size,
            "loss": self.loss_fn.settings,
            "wandb_run": self._wandb_run_id(),
            **self.extra_state,
        }
        checkpoint[RNG_KEY] = collect_rng_states()

    def _wandb_run_id(self) -> str | None:
        """The id of the W&B run this fit logs to, else the one of the run it resumed (a part
        resumed without ``logger=wandb`` keeps the id, so a later part continues that run)."""
        loggers = self._trainer.loggers if self._trainer is not None else []
        for lg in loggers:
            if isinstance(lg, pl.loggers.WandbLogger) and lg.version:
                return str(lg.version)
        return self._resumed_wandb_run

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume_rng = checkpoint.get(RNG_KEY)
        meta = checkpoint.get("eexit", {})
        self._check_resumed_spec(meta.get("spec"))
        self._check_resumed_settings(checkpoint.get("hyper_parameters"), meta.get("loss"))
        self._follow_moved_run_folder(checkpoint)
        self.data_info = meta.get("data")
        self._resume_split = (self.data_info or {}).get("split")
        self._resume_world_size = meta.get("world_size")
        self._resumed_wandb_run = meta.get("wandb_run")
        self.extra_state = {k: v for k, v in meta.items() if k not in RUN_KEYS}


def _partial_differences(saved: Callable, current: Callable) -> list[tuple[str, str, str]]:
    """``(key, saved, current)`` of each setting in which two optimizer or scheduler factories
    (``functools.partial``, as Hydra's ``_partial_`` makes them) differ; ``_target_`` for the class."""

    def parts(factory: Callable) -> tuple[str, dict]:
        func = getattr(factory, "func", factory)
        return f"{func.__module__}.{func.__qualname__}", dict(getattr(factory, "keywords", {}) or {})

    (saved_target, saved_kw), (target, kw) = parts(saved), parts(current)
    if saved_target != target:
        return [("_target_", saved_target, target)]
    return [
        (k, f"{k}={saved_kw.get(k)!r}", f"{k}={kw.get(k)!r}")
        for k in sorted(set(saved_kw) | set(kw))
        if saved_kw.get(k) != kw.get(k)
    ]
