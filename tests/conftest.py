"""Shared fixtures: Hydra configs composed through the compose API, writing into tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from eexit.config import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CIFAR_TARBALL = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-imagefolder.tar.gz"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
register_resolvers()

needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST idx files not installed (apt-get install dataset-fashion-mnist)",
)
needs_cifar = pytest.mark.skipif(not CIFAR_TARBALL.exists(), reason=f"CIFAR-10 tarball absent: {CIFAR_TARBALL}")


def compose_train(tmp_path: Path, overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides; outputs go under ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.log_dir = str(tmp_path / "logs")
        if "data_dir" in cfg.paths and config_name == "train":
            # Keep unpacked data sets shared across tests (not per tmp dir)
            cfg.paths.data_dir = str(ROOT / "data")
    return cfg


@pytest.fixture
def quick_overrides() -> list[str]:
    """A run on the generated shapes with the micro network, one batch of each split."""
    return ["data=synthetic", "model=micro", "debug=fdr", "logger=none", "callbacks=none"]


@pytest.fixture(scope="session")
def calibrated_run(tmp_path_factory) -> dict:
    """One real ``train()`` run (micro network, generated shapes, fast_dev_run) whose best
    checkpoint is calibrated and exported as a bundle: ``{"ckpt", "bundle", "data"}``."""
    from eexit.training import train

    tmp = tmp_path_factory.mktemp("calibrated_run")
    cfg = compose_train(tmp, ["data=synthetic", "model=micro", "debug=fdr", "logger=none", "callbacks=none"])
    _, objs = train(cfg)
    return {"ckpt": objs["best_ckpt"], "bundle": objs["bundle"], "data": objs["datamodule"].info}


def micro_module(loss=None, lr: float = 0.1, **kwargs):
    """``MultiExitModule`` around the micro network (1 channel, 3 classes, MLP heads) with plain
    SGD; ``loss`` defaults to ``MultiExitLoss(attn_weight=0.5)``."""
    import functools

    import torch

    from eexit.lit.multi_exit import MultiExitModule
    from eexit.losses import MultiExitLoss
    from eexit.models import create_model

    torch.manual_seed(0)
    net = create_model("resnet_micro", in_chans=1, num_classes=3, head="mlp")
    return MultiExitModule(
        net, loss or MultiExitLoss(attn_weight=0.5), functools.partial(torch.optim.SGD, lr=lr), **kwargs
    )


def stand_in_trainer(**kwargs):
    """A stand-in for the trainer a ``MultiExitModule`` reads in its checks (``module._trainer``):
    resuming from ``run/checkpoints/last.ckpt``, with the given attributes."""
    from types import SimpleNamespace

    return SimpleNamespace(ckpt_path="run/checkpoints/last.ckpt", **kwargs)
