"""Load a trained network from a Lightning checkpoint without the LightningModule."""

from __future__ import annotations

import re
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


# schedulers that call a function given to them: no reason to let an unpickler build them
_CALLS_ITS_ARGUMENTS = ("LambdaLR", "MultiplicativeLR")


def checkpoint_globals() -> list:
    """The Python objects besides tensors that eexit's Lightning checkpoints hold, which
    ``torch.load(weights_only=True)`` may rebuild: the optimizer and scheduler classes of
    ``torch.optim`` (the hyperparameters; not the schedulers that call a given function), Hydra's
    partial-call holder for them, and numpy arrays (the saved random states)."""
    import functools

    import numpy as np

    found: list = [np.ndarray, np.dtype, *{type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.uint8)}]
    core = getattr(np, "_core", None) or np.core
    found.append(core.multiarray._reconstruct)
    for module in (torch.optim, torch.optim.lr_scheduler):
        found += [
            v
            for v in vars(module).values()
            if isinstance(v, type) and v.__module__.startswith("torch.optim") and v.__name__ not in _CALLS_ITS_ARGUMENTS
        ]
    try:
        from hydra._internal.target_policy import _DeferredTarget

        found.append(_DeferredTarget)
    except ImportError:  # an older Hydra stores functools.partial
        pass
    found.append(functools.partial)
    return found


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)")


def first_line(text: str, default: str = "") -> str:
    """The first non-blank line of an error's text (torch's are paragraphs)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), default)


_CONTAINERS = (b"PK\x03\x04", b"\x80")
"""How a ``torch.save`` file starts: a zip archive (the default format) or a pickle (protocol 2+,
the legacy format)."""


def _check_container(path: Path) -> None:
    """Refuse a file that is no ``torch.save`` output at all, before the unpickler (whose message
    for, say, a PNG is about ``weights_only`` and suggests disabling it) sees it."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as err:
        raise ValueError(f"{path} is not a readable checkpoint: {err.strerror or err}") from None
    if not head:
        raise ValueError(f"{path} is not a checkpoint: the file is empty")
    if not head.startswith(_CONTAINERS):
        raise ValueError(
            f"{path} is not a checkpoint: a torch.save file is a zip archive or a pickle, this one starts with {head!r}"
        )


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", trust: bool = False) -> dict:
    """``torch.load`` of a checkpoint that refuses to run code from an untrusted file.

    With ``trust=False`` the file is unpickled with ``weights_only=True``: tensors, plain
    containers and ``checkpoint_globals()`` only, so a crafted checkpoint cannot execute code
    (a full unpickle can, by design of pickle).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds other objects (the first one named), or is not a readable
            checkpoint at all (the reason given).
    """
    path = Path(path)
    if path.is_dir():
        from eexit.bundle import MANIFEST_NAME  # here: eexit.bundle imports this module

        hint = " (a bundle: it is already exported; `eexit info` shows it)" if (path / MANIFEST_NAME).is_file() else ""
        raise ValueError(f"{path} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _check_container(path)
    try:
        if trust:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        else:
            with torch.serialization.safe_globals(checkpoint_globals()):
                ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # whatever a crafted or corrupt file makes the unpickler raise
        text = _ANSI.sub("", str(err))
        found = _UNSUPPORTED.search(text)
        if found and not trust:
            raise ValueError(
                f"{path}: refused to unpickle {found.group(1)}, which an eexit checkpoint does not hold (a pickle "
                "can run code); if you trust where the file comes from, load it with trust=True (CLI: "
                "--trust-checkpoint, train.py and evaluate.py: trust_checkpoint=true)"
            ) from None
        raise ValueError(f"{path} is not a readable checkpoint: {type(err).__name__}: {first_line(text)}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", trust: bool = False
) -> LoadedCheckpoint:
    """Read a checkpoint written by ``eexit.lit.MultiExitModule``.

    Args:
        path: the checkpoint file.
        map_location: device of the weights.
        trust: unpickle everything the file holds (``read_checkpoint``); only for files from a
            trusted source.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not an eexit checkpoint (names what is missing) or holds objects
            that are not safe to load.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, map_location, trust)
    meta = ckpt.get("eexit")
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("spec"), dict)
        or not isinstance(ckpt.get("state_dict"), dict)
    ):
        raise ValueError(f"{path} is not an eexit checkpoint (no 'eexit.spec' or 'state_dict' entry)")
    try:
        net = build_from_spec(meta["spec"])
        state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        net.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        # load_state_dict names the missing and unexpected keys on the lines after its first
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        said = " ".join(lines)[:400] if lines else first_line(str(err), type(err).__name__)
        raise ValueError(f"{path}: its spec and weights do not build a network: {said}") from None
    net.eval()
    extra = {k: v for k, v in meta.items() if k not in ("spec", "data")}
    return LoadedCheckpoint(net, meta.get("data"), extra, path)
