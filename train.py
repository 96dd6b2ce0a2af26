"""Train an early-exit network: ``python train.py [experiment=egt|baseline|cifar10] [key=value ...]``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eexit.cli_output import config_errors_exit, print_exit_table, print_plain, print_router_table
from eexit.config import register_resolvers
from eexit.training import optimized_metric, train

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with config_errors_exit():
        metrics, objs = train(cfg)
    if not objs["trainer"].is_global_zero:  # DDP: one report, from rank zero
        return None
    print_exit_table(metrics, title=f"{cfg.task_name}: per-exit accuracy")
    if objs["calibration"] is not None:
        print_router_table(objs["calibration"].fit_summary)
    print_plain(f"checkpoint: {objs['best_ckpt']}")
    if objs.get("bundle"):
        print_plain(f"bundle: {objs['bundle']}  (eexit predict --bundle {objs['bundle']} IMAGES...)")
    return optimized_metric(metrics, objs["trainer"])


if __name__ == "__main__":
    main()
