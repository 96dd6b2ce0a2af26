"""Config helpers: the ``eexit_root`` resolver and start-of-run validation that names the key."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from eexit.types import ExitLevel


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key '{key}': {problem}")
        self.key = key


def project_root() -> Path:
    """The folder holding ``conf/`` (the repo checkout), else the working directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "conf").is_dir() else Path.cwd()


def register_resolvers() -> None:
    """Register ``${eexit_root:}`` once."""
    if not OmegaConf.has_resolver("eexit_root"):
        OmegaConf.register_new_resolver("eexit_root", lambda: str(project_root()))


register_resolvers()


def _exit_names(cfg: DictConfig, key: str, values) -> None:
    for name in values:
        try:
            ExitLevel.parse(name)
        except ValueError as err:
            raise ConfigError(key, str(err)) from None


def validate_train_config(cfg: DictConfig) -> None:
    """Check the values that would otherwise fail late or deep inside torch.

    Raises:
        ConfigError: naming the first bad key.
    """
    loss = cfg.model.loss
    if loss.attn_weight is None or loss.attn_weight < 0:
        raise ConfigError("model.loss.attn_weight", f"lambda must be >= 0, got {loss.attn_weight}")
    weights = loss.get("exit_weights") or {}
    _exit_names(cfg, "model.loss.exit_weights", weights.keys())
    for name, w in weights.items():
        if w is None or w < 0:
            raise ConfigError(f"model.loss.exit_weights.{name}", f"must be >= 0, got {w}")
    if loss.get("consistency_exits") is not None:
        _exit_names(cfg, "model.loss.consistency_exits", loss.consistency_exits)
        if any(ExitLevel.parse(n) == ExitLevel.HEAVY for n in loss.consistency_exits):
            raise ConfigError("model.loss.consistency_exits", "HEAVY is the teacher and cannot be listed")
    from eexit.models import list_models

    if cfg.model.net.name not in list_models():
        raise ConfigError(
            "model.net.name", f"unknown model {cfg.model.net.name!r}; registered: {', '.join(list_models())}"
        )
    if cfg.data.get("batch_size", 1) < 1:
        raise ConfigError("data.batch_size", f"must be >= 1, got {cfg.data.batch_size}")
    if cfg.data.get("image_size", 1) < 1:
        raise ConfigError("data.image_size", f"must be >= 1, got {cfg.data.image_size}")


def check_image_size(image_size: int, min_size: int, model_name: str) -> None:
    """Refuse an image size the backbone cannot take (smaller than its total stride)."""
    if image_size < min_size:
        raise ConfigError(
            "data.image_size",
            f"{image_size} px is too small for model.net '{model_name}', whose stages reduce by {min_size}: "
            f"use at least {min_size}",
        )
