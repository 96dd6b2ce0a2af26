"""Grad-CAM overlays of a fixed set of validation images, logged to W&B as training goes.

The attention-consistency loss is meant to make the early exits look where HEAVY looks; a grid
of the four exits' cams on the same images, epoch after epoch, shows whether it does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger


class CamOverlayLogger(pl.Callback):
    """At the end of every ``every_n_epochs``-th validation epoch, log one figure to every W&B
    logger of the run (key ``val/cams``): the first ``num_images`` validation images (the same
    ones every epoch), each with its four exits' Grad-CAMs for its label.

    Does nothing without a W&B logger (``logger=csv`` runs write no figures), in the sanity check
    and on ranks other than zero.

    Args:
        num_images: validation images in the grid.
        every_n_epochs: log every this many epochs.
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1) -> None:
        super().__init__()
        if num_images < 1 or every_n_epochs < 1:
            raise ValueError(f"num_images and every_n_epochs must be >= 1, got {num_images} and {every_n_epochs}")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        data = getattr(trainer.datamodule, "data_val", None)
        if data is None or len(data) == 0:
            return
        from eexit.evaluation.plots import for_display, heatmap_grid, upsampled

        items = [data[i] for i in range(min(self.num_images, len(data)))]
        x = torch.stack([torch.as_tensor(img) for img, _ in items]).to(pl_module.device)
        y = torch.as_tensor([int(label) for _, label in items], device=x.device)
        with torch.no_grad():
            out = pl_module.net(x, with_cams=True, targets=y)
        cams = upsampled(out.cams, tuple(x.shape[-2:]))
        info = trainer.datamodule.info
        names = info.class_names
        titles = [names[i] if i < len(names) else str(i) for i in y.tolist()]
        with tempfile.TemporaryDirectory() as tmp:
            images = for_display(x, info.mean, info.std)
            path = heatmap_grid(images, {"model": cams}, Path(tmp) / "cams.png", titles=titles)
            caption = f"epoch {trainer.current_epoch}: cams of TINY .. HEAVY for the label"
            for lg in loggers:  # W&B copies the file into the run when the image is made
                lg.log_image("val/cams", [str(path)], step=trainer.global_step, caption=[caption])
