"""LightningModules."""

from eexit.lit.multi_exit import MultiExitModule

__all__ = ["MultiExitModule"]
