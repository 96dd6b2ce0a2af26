"""Exact mid-epoch resume: the training loader's position and the global random state.

Lightning restores the model, optimizer, scheduler, loop counters and callback states from a
checkpoint, and the position of a *stateful* training loader (one with ``state_dict`` /
``load_state_dict``, such as torchdata's ``StatefulDataLoader``). Two gaps remain, and the
helpers here close them:

* The loader's state is dropped when ``configure_optimizers`` asks for
  ``trainer.estimated_stepping_batches`` (our ``OneCycleLR`` does): the training loader is then
  built before the checkpoint is restored and never loads the saved position
  (Lightning issue #20550). ``resume_train_loader`` loads the pending state and re-creates the
  loader's iterator, as the proposed fix (Lightning PR #21765) does inside the loop.
* The global random state (torch, numpy, Python) is not saved, so random augmentation after a
  resume would differ. ``collect_rng_states`` goes into the checkpoint and
  ``resume_train_loader`` puts it back just before the first resumed batch.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.data import _set_sampler_epoch
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states

log = logging.getLogger(__name__)

RNG_KEY = "eexit_rng_states"


def collect_rng_states() -> dict[str, Any]:
    """The global random states of torch, numpy and Python (CUDA too when present)."""
    return _collect_rng_states(include_cuda=True)


def run_checkpoints_folder(ckpt_path: str | os.PathLike) -> str | None:
    """The real path of the ``checkpoints/`` folder of one of our runs that holds ``ckpt_path``,
    where a run resumed from it goes on writing its checkpoints; ``None`` for a file elsewhere."""
    folder = os.path.dirname(os.path.realpath(ckpt_path))
    return folder if os.path.basename(folder) == "checkpoints" else None


def resumes_mid_epoch(trainer: pl.Trainer) -> bool:
    """Whether a fit restored from a checkpoint goes on in the middle of an epoch (valid from
    ``on_train_start`` until the first resumed batch)."""
    fit_loop = trainer.fit_loop
    progress = fit_loop.epoch_progress.current
    return fit_loop.restarting and progress.processed < progress.started


def resume_train_loader(trainer: pl.Trainer, rng_states: dict[str, Any] | None) -> None:
    """Put the training loader and the random state where the checkpoint left them.

    Call from ``on_train_start`` of a run started with ``ckpt_path``: after Lightning has
    restored the checkpoint and before the first training batch is fetched.

    Args:
        trainer: the trainer, in ``fit`` after the restore.
        rng_states: the states saved by ``collect_rng_states`` in the checkpoint (``None``:
            a checkpoint from before they were saved; the random state is left alone).
    """
    fit_loop = trainer.fit_loop
    loader, fetcher = fit_loop._combined_loader, fit_loop._data_fetcher
    if loader is None or fetcher is None:
        return
    epoch = fit_loop.epoch_progress.current.processed
    if resumes_mid_epoch(trainer):
        # mid-epoch: the saved position (when Lightning has not loaded it yet), then the random
        # state, as creating the iterator draws a seed from it
        if fit_loop._combined_loader_states_to_load:
            for dl in loader.flattened:
                _set_sampler_epoch(dl, epoch)
            fit_loop._load_combined_loader_states()
            iter(fetcher)
        done = fit_loop.epoch_loop.batch_progress.current.processed
        log.info("resuming epoch %d after %d training batches", epoch, done)
        if rng_states is not None:
            _set_rng_states(rng_states)
        return
    # at an epoch boundary: the random state, then a fresh iterator in this epoch's order
    fit_loop._combined_loader_states_to_load = []
    if rng_states is not None:
        _set_rng_states(rng_states)
    for dl in loader.flattened:
        _set_sampler_epoch(dl, epoch)
    iter(fetcher)
