"""Evaluate a trained checkpoint: ``python evaluate.py ckpt_path=... [data=...]``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eexit.cli_output import print_exit_table
from eexit.config import register_resolvers
from eexit.evaluation import evaluate

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    metrics = evaluate(cfg)
    print_exit_table(metrics, title=f"{cfg.ckpt_path}: per-exit test accuracy")


if __name__ == "__main__":
    main()
