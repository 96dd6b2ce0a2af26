"""Models: registry, backbone, exit heads and the multi-exit network."""

from eexit.models import zoo as _zoo  # noqa: F401  (registers the models)
from eexit.models.backbone import ResNetBackbone
from eexit.models.heads import ExitHead, HeadOutput
from eexit.models.net import MultiExitNet
from eexit.models.registry import create_model, list_models, register_model
from eexit.models.zoo import build_multi_exit

__all__ = [
    "ExitHead",
    "HeadOutput",
    "MultiExitNet",
    "ResNetBackbone",
    "build_multi_exit",
    "create_model",
    "list_models",
    "register_model",
]
