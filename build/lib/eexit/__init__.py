"""eexit: explainable early-exit image classification."""

from eexit.types import EXIT_KEYS, ExitLevel, MultiExitOutput

__version__ = "0.1.0"
__all__ = ["EXIT_KEYS", "ExitLevel", "MultiExitOutput", "__version__"]
