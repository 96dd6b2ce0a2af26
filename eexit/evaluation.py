"""``evaluate(cfg)``: per-exit test metrics of a trained checkpoint (importable for tests)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from eexit.checkpoint import load_checkpoint
from eexit.config import ConfigError
from eexit.lit.multi_exit import MultiExitModule
from eexit.losses import MultiExitLoss

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test every exit of ``cfg.ckpt_path`` on ``cfg.data``'s test split; write ``metrics.json``.

    Returns:
        ``test/acc/{exit}``, ``test/attn_kl/{exit}`` and the loss terms.
    """
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path", "give the checkpoint to evaluate: evaluate.py ckpt_path=...")
    if not Path(cfg.ckpt_path).is_file():
        raise ConfigError("ckpt_path", f"checkpoint not found: {cfg.ckpt_path}")
    loaded = load_checkpoint(cfg.ckpt_path)
    dm = hydra.utils.instantiate(cfg.data)
    if dm.info.num_classes != loaded.net.num_classes:
        raise ConfigError("data", f"{dm.info.num_classes} classes, but the checkpoint has {loaded.net.num_classes}")
    module = MultiExitModule(loaded.net, MultiExitLoss(attn_weight=0.0), optimizer=None)
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    trainer.test(module, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    log.info("metrics written to %s", out_dir / "metrics.json")
    return metrics
