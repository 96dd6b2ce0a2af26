"""Helpers shared by the benchmarks: machine description and JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def compose_train_cfg(overrides: list[str], out_dir: Path):
    """Compose ``conf/train.yaml`` with overrides (Hydra compose API); outputs under ``out_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from eexit.config import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def machine() -> dict:
    """Where the figures were measured."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def emit(result: dict) -> None:
    """Print the result as one JSON object on the last line."""
    print(json.dumps(result, sort_keys=True))
