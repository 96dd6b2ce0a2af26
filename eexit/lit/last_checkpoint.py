"""``last.ckpt`` that always holds the newest state: every N training steps and at every epoch's end."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for ``last.ckpt`` alone, written every ``every_n_train_steps`` steps
    (mid-epoch, for resuming after a crash) and at the end of every training epoch.

    Lightning (2.6) writes ``save_last`` at an epoch's end only when a top-k checkpoint was
    written at that step, and at the end of training only when no ``last.ckpt`` was written
    before: with the step trigger on and a final epoch that did not improve the monitored
    metric, ``last.ckpt`` kept a state up to ``every_n_train_steps`` steps old and the final
    weights were saved nowhere.

    Args:
        **kwargs: ``ModelCheckpoint``'s (``dirpath``, ``every_n_train_steps``, ...); ``save_last``
            is on and ``save_top_k`` is 0.
    """

    def __init__(self, **kwargs) -> None:
        kwargs.update(save_last=True, save_top_k=0)
        super().__init__(**kwargs)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # a run that stops in the middle of an epoch (max_steps, max_time, should_stop): its last
        # state is this step's, saved as mid-epoch (Lightning still calls the epoch's end after it,
        # with the epoch counted as done: a resume from there skipped the rest of the epoch)
        stopping = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
        if (
            stopping
            and self._saving(trainer)
            and not _epoch_finished(trainer)
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # also when this step was saved already by the step trigger (mid-epoch state): the epoch's
        # end state (its validation metrics, the loop counters at the boundary) replaces it; not
        # after a stop in the middle of the epoch (saved at that step, above)
        if self._saving(trainer) and _epoch_finished(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @staticmethod
    def _saving(trainer: pl.Trainer) -> bool:
        return not (trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking)


def _epoch_finished(trainer: pl.Trainer) -> bool:
    """Whether the training epoch ran all its batches (not stopped in the middle)."""
    return trainer.fit_loop.epoch_loop._num_ready_batches_reached()
