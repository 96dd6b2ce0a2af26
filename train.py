"""Train an early-exit network: ``python train.py [experiment=egt|baseline|cifar10] [key=value ...]``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eexit.cli_output import print_exit_table
from eexit.config import register_resolvers
from eexit.training import train

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    print_exit_table(metrics, title=f"{cfg.task_name}: per-exit accuracy")
    return metrics.get("val/acc/heavy")


if __name__ == "__main__":
    main()
