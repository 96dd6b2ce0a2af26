"""Evaluate a trained checkpoint: ``python evaluate.py ckpt_path=... [data=...] [baseline_ckpt_path=...]``.

Writes metrics.json, plots/*.png and a self-contained report.html into the run folder.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from eexit.cli_output import config_errors_exit, print_eval_summary, print_plain
from eexit.config import register_resolvers
from eexit.evaluation import evaluate

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with config_errors_exit():
        metrics = evaluate(cfg)
    print_eval_summary(metrics)
    print_plain(f"report: {Path(cfg.paths.output_dir) / 'report.html'}")
    if cfg.get("export_bundle"):
        bundle = cfg.export_bundle
        print_plain(f"bundle: {bundle}  (eexit predict --bundle {bundle} IMAGES...)")


if __name__ == "__main__":
    main()
