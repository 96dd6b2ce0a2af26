"""Load a trained network from a Lightning checkpoint without the LightningModule."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from eexit.models.net import MultiExitNet
from eexit.models.registry import create_model


def build_from_spec(spec: dict) -> MultiExitNet:
    """Rebuild a network from the ``spec`` it recorded (``MultiExitNet.spec``)."""
    kwargs = dict(spec)
    name = kwargs.pop("name")
    return create_model(name, **kwargs)


@dataclass
class LoadedCheckpoint:
    """A network in eval mode and what the checkpoint says about its data and calibration."""

    net: MultiExitNet
    data: dict | None
    extra: dict = field(default_factory=dict)
    path: Path | None = None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Read a checkpoint written by ``eexit.lit.MultiExitModule``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not an eexit checkpoint (names what is missing).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    meta = ckpt.get("eexit") if isinstance(ckpt, dict) else None
    if not meta or "spec" not in meta or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not an eexit checkpoint (no 'eexit.spec' or 'state_dict' entry)")
    net = build_from_spec(meta["spec"])
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    net.eval()
    extra = {k: v for k, v in meta.items() if k not in ("spec", "data")}
    return LoadedCheckpoint(net, meta.get("data"), extra, path)
