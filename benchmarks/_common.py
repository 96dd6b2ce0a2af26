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
