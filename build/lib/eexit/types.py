"""Shared types: the exit levels and the outputs of a multi-exit forward pass."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: `import eexit` (and `eexit --help`) need not load torch
    from torch import Tensor


class ExitLevel(IntEnum):
    """The four exits of the network, cheapest first. The one source of exit names."""

    TINY = 0
    LIGHT = 1
    MEDIUM = 2
    HEAVY = 3

    @property
    def key(self) -> str:
        """Lower-case name used in configs and metric keys, e.g. ``"tiny"``."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | int | ExitLevel) -> ExitLevel:
        """Turn a name (any case), an index or an ``ExitLevel`` into an ``ExitLevel``.

        Raises:
            ValueError: if the value names no exit; the message lists the valid names.
        """
        if isinstance(value, ExitLevel):
            return value
        if isinstance(value, str):
            if value.upper() in cls.__members__:
                return cls[value.upper()]
        elif not isinstance(value, bool):  # True is no exit index
            try:  # any integer: int, NumPy's, a 0-d integer tensor
                index = operator.index(value)
            except TypeError:
                index = None
            if index is not None and 0 <= index < len(cls):
                return cls(index)
        valid = ", ".join(level.key for level in cls)
        raise ValueError(f"unknown exit {value!r}; expected one of: {valid}")


EXIT_KEYS: tuple[str, ...] = tuple(level.key for level in ExitLevel)

ROUTER_KINDS: tuple[str, ...] = ("gate", "staged", "cascade")
"""The router kinds (``eexit.routing.routers.ROUTERS`` keys), here so that the CLI's parser
names them without importing torch."""


@dataclass
class MultiExitOutput:
    """What one forward pass of a multi-exit network returns.

    Attributes:
        logits: one tensor per exit, cheapest first, each ``(B, num_classes)``.
        cams: Grad-CAM maps per exit, each ``(B, h_k, w_k)``, or ``None`` when not asked for.
        targets: the class each cam explains, ``(B,)``, or ``None``.
    """

    logits: list[Tensor]
    cams: list[Tensor] | None = None
    targets: Tensor | None = None

    def __getitem__(self, level: ExitLevel | int) -> Tensor:
        return self.logits[int(level)]
