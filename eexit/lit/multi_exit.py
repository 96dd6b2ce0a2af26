"""LightningModule that trains every exit with cross-entropy plus attention consistency (EGT)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from eexit.lit.resume import RNG_KEY, collect_rng_states, resume_train_loader
from eexit.losses import MultiExitLoss
from eexit.models.net import MultiExitNet
from eexit.types import ExitLevel

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test")


class MultiExitModule(pl.LightningModule):
    """Train a ``MultiExitNet`` with ``MultiExitLoss``.

    Logged per stage (``train``, ``val``, ``test``): ``{stage}/loss``, ``{stage}/loss/ce``,
    ``{stage}/loss/attn_kl``, ``{stage}/loss/ce/{exit}``, ``{stage}/acc/{exit}`` and
    ``{stage}/attn_kl/{exit}`` (KL of each early exit's cam distribution against HEAVY's; also
    measured when lambda is 0, so the baseline can be compared).

    Args:
        net: the network.
        loss: the loss.
        optimizer: partial optimizer, called with the parameters.
        scheduler: partial LR scheduler, called with the optimizer; ``total_steps`` / ``T_max``
            are filled with the number of training steps when the scheduler takes them and the
            config leaves them out (it then steps every batch).
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
                for k, v in {**parts.ce, **{f"attn_kl/{k}": v for k, v in parts.attn_kl.items()}}.items()
                if not torch.isfinite(v)
            ]
            raise FloatingPointError(
                f"non-finite {stage} loss at global step {self.global_step} (batch {self._batch_idx}); "
                f"bad terms: {', '.join(bad) or 'total'}"
            )
        bs = x.shape[0]
        on_step = training
        self.log(
            f"{stage}/loss",
            parts.total,
            on_step=on_step,
            on_epoch=True,
            prog_bar=True,
            batch_size=bs,
            sync_dist=not training,
        )
        self.log(
            f"{stage}/loss/ce", parts.ce_total, on_step=on_step, on_epoch=True, batch_size=bs, sync_dist=not training
        )
        if parts.attn_kl:
            self.log(
                f"{stage}/loss/attn_kl",
                parts.attn_kl_mean,
                on_step=on_step,
                on_epoch=True,
                batch_size=bs,
                sync_dist=not training,
            )
        for lv in ExitLevel:
            key = f"{stage}_{lv.key}"
            self.log(
                f"{stage}/loss/ce/{lv.key}",
                parts.ce[lv.key],
                on_step=False,
                on_epoch=True,
                batch_size=bs,
                sync_dist=not training,
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
        opt = self.hparams.optimizer(params=self.parameters())
        factory = self.hparams.scheduler
        if factory is None:
            return opt
        params = inspect.signature(getattr(factory, "func", factory)).parameters
        given = getattr(factory, "keywords", {})
        extra = {}
        for name in ("total_steps", "T_max"):
            if name in params and name not in given:
                extra[name] = int(self.trainer.estimated_stepping_batches)
        interval = "step" if extra else "epoch"
        return {"optimizer": opt, "lr_scheduler": {"scheduler": factory(optimizer=opt, **extra), "interval": interval}}

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "info"):
            self.data_info = dm.info.to_dict()

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path:  # resuming: loader position and random state as saved
            resume_train_loader(self.trainer, self._resume_rng)
            self._resume_rng = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["eexit"] = {"spec": self.net.spec, "data": self.data_info, **self.extra_state}
        checkpoint[RNG_KEY] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume_rng = checkpoint.get(RNG_KEY)
        meta = checkpoint.get("eexit", {})
        self.data_info = meta.get("data")
        self.extra_state = {k: v for k, v in meta.items() if k not in ("spec", "data")}
