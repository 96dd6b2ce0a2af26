"""Config helpers: the ``eexit_root`` resolver and start-of-run validation that names the key."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from eexit.types import ExitLevel


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key '{key}': {problem}")
        self.key = key
        self.problem = problem


def project_root() -> Path:
    """The checkout holding this package and ``conf/train.yaml``, else the working directory
    (an installed package: its parent is site-packages, where another package's ``conf/``
    folder must not count)."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "conf" / "train.yaml").is_file() else Path.cwd()


def register_resolvers() -> None:
    """Register ``${eexit_root:}`` once."""
    if not OmegaConf.has_resolver("eexit_root"):
        OmegaConf.register_new_resolver("eexit_root", lambda: str(project_root()))


register_resolvers()


def _exit_names(cfg: DictConfig, key: str, values) -> None:
    if isinstance(values, str):  # `consistency_exits=tiny` would be read letter by letter
        raise ConfigError(key, f"must be a list of exit names, e.g. [{values}], got the string {values!r}")
    for name in values:
        try:
            ExitLevel.parse(name)
        except ValueError as err:
            raise ConfigError(key, str(err)) from None


def _number(key: str, value, minimum: float, *, above: bool = False, integer: bool = False, what: str = "") -> None:
    """Refuse a value that is not a finite number (an int where ``integer``) ``>= minimum`` (``>``
    where ``above``): a string, NaN or inf would otherwise pass a comparison silently or fail deep
    inside torch or Lightning."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > minimum if above else value >= minimum):
        return
    bound = f"{'>' if above else '>='} {minimum}"
    raise ConfigError(key, f"{what}must be a finite {'integer' if integer else 'number'} {bound}, got {value!r}")


def trusts_checkpoints(cfg: DictConfig) -> bool:
    """``trust_checkpoint``: a real boolean (a string such as ``"no"`` would be truthy and turn
    the safe unpickling off)."""
    value = cfg.get("trust_checkpoint", False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError("trust_checkpoint", f"must be true or false, got {value!r}")
    return value


def check_split_size(name: str, size) -> None:
    """A split size is a number of images (an integer >= 0) or a fraction of the pool in [0, 1);
    2.5, a negative, NaN or a string is neither.

    Raises:
        ValueError: naming ``name`` and the value.
    """
    ok = isinstance(size, (int, float)) and not isinstance(size, bool) and math.isfinite(size) and size >= 0
    if not (ok and (size < 1 or float(size).is_integer())):
        raise ValueError(
            f"{name} must be a number of images (an integer >= 0) or a fraction of the pool in [0, 1), got {size!r}"
        )


def _check_sync_batchnorm(trainer: DictConfig | None) -> None:
    """``trainer.sync_batchnorm=true`` needs GPUs: on the CPU torch refuses it only once the DDP
    processes have started, in a traceback from each of them."""
    if not trainer or not trainer.get("sync_batchnorm"):
        return
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator == "cpu" or (accelerator == "auto" and not _cuda_available()):
        raise ConfigError(
            "trainer.sync_batchnorm",
            f"needs GPUs (SyncBatchNorm runs on CUDA only); accelerator={accelerator} runs on the CPU",
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def validate_train_config(cfg: DictConfig) -> None:
    """Check the values that would otherwise fail late or deep inside torch.

    Raises:
        ConfigError: naming the first bad key.
    """
    loss = cfg.model.loss
    trusts_checkpoints(cfg)
    validate_router_config(cfg)
    _number("model.loss.attn_weight", loss.attn_weight, 0, what="lambda ")
    weights = loss.get("exit_weights") or {}
    _exit_names(cfg, "model.loss.exit_weights", weights.keys())
    for name, w in weights.items():
        _number(f"model.loss.exit_weights.{name}", w, 0)
    all_weights = [weights.get(lv.key, 1.0) for lv in ExitLevel]
    if not any(all_weights) and loss.attn_weight == 0:
        raise ConfigError("model.loss.exit_weights", "are all 0 and attn_weight is 0: no loss would train anything")
    if "eps" in loss:  # eps = 0 makes an all-zero cam 0 / 0 (unused with a temperature)
        _number("model.loss.eps", loss.eps, 0, above=loss.get("temperature") is None)
    if loss.get("temperature") is not None:
        _number("model.loss.temperature", loss.temperature, 0, above=True)
    if cfg.model.get("optimizer") is not None and "lr" in cfg.model.optimizer:
        _number("model.optimizer.lr", cfg.model.optimizer.lr, 0, above=True)
    if cfg.get("trainer") is not None and cfg.trainer.get("max_epochs") is not None:
        _number("trainer.max_epochs", cfg.trainer.max_epochs, -1, integer=True, what="(-1: no limit) ")
        if cfg.trainer.max_epochs == 0:  # would save an untrained checkpoint and calibrate it
            raise ConfigError("trainer.max_epochs", "must be -1 (no limit) or >= 1, got 0: nothing would be trained")
    if loss.get("consistency_exits") is not None:
        _exit_names(cfg, "model.loss.consistency_exits", loss.consistency_exits)
        if any(ExitLevel.parse(n) == ExitLevel.HEAVY for n in loss.consistency_exits):
            raise ConfigError("model.loss.consistency_exits", "HEAVY is the teacher and cannot be listed")
    from eexit.models import list_models

    if cfg.model.net.name not in list_models():
        raise ConfigError(
            "model.net.name", f"unknown model {cfg.model.net.name!r}; registered: {', '.join(list_models())}"
        )
    validate_data_config(cfg)
    _check_sync_batchnorm(cfg.get("trainer"))
    smoothing = loss.get("label_smoothing", 0.0)
    _number("model.loss.label_smoothing", smoothing, 0)
    if smoothing >= 1:
        raise ConfigError(
            "model.loss.label_smoothing", f"must be in [0, 1) (1 trains on uniform targets), got {smoothing}"
        )
    if cfg.model.get("optimizer") is not None and cfg.model.optimizer.get("weight_decay") is not None:
        _number("model.optimizer.weight_decay", cfg.model.optimizer.weight_decay, 0)
    if "seed" in cfg:  # it seeds the data split too: null cannot do that
        _number("seed", cfg.seed, 0, integer=True, what="(it seeds the split, the initialisation and the shuffling) ")
    cam_size = loss.get("cam_size")
    if cam_size is not None:
        if OmegaConf.is_list(cam_size) and len(cam_size) == 2:
            sizes = list(cam_size)
        elif isinstance(cam_size, int) and not isinstance(cam_size, bool):
            sizes = [cam_size]
        else:
            raise ConfigError("model.loss.cam_size", f"must be null, a size or [height, width], got {cam_size!r}")
        for size in sizes:
            _number("model.loss.cam_size", size, 1, integer=True)
    for key in ("val_size", "calib_size", "test_size"):
        if cfg.data.get(key) is not None:
            try:
                check_split_size(key, cfg.data[key])
            except ValueError as err:
                raise ConfigError(f"data.{key}", str(err)) from None
    calib_size = cfg.data.get("calib_size")
    # found only after the fit otherwise; a fraction is checked once the pool is known
    counted = calib_size == 0 or (isinstance(calib_size, int) and not isinstance(calib_size, bool))
    if (cfg.get("router") or {}).get("calibrate", False) and calib_size is not None and counted:
        check_calibration_size(int(calib_size))


def check_calibration_size(n: int, hint: str | None = None) -> None:
    """Refuse a calibration split of ``n`` images, too few for router calibration.

    Args:
        n: images in the calibration split.
        hint: what to do, in the message (default: the training run's choices).

    Raises:
        ConfigError: naming ``data.calib_size``.
    """
    from eexit.routing.calibrate import MIN_CALIBRATION_IMAGES

    if n < MIN_CALIBRATION_IMAGES:
        hint = hint or (
            f"hold out more: data.calib_size={MIN_CALIBRATION_IMAGES} or more images (or a larger fraction); "
            "router.calibrate=false with data.calib_size=0 trains without routers: such a model is evaluated "
            "without them and cannot be exported for serving"
        )
        raise ConfigError(
            "data.calib_size",
            f"{n} held-out calibration images; router calibration needs at least {MIN_CALIBRATION_IMAGES} ({hint})",
        )


def validate_router_config(cfg: DictConfig) -> None:
    """Check the ``router`` group (calibration after training, recalibration in ``evaluate.py``)
    before any training: a bad value there would otherwise fail only after the fit.

    Raises:
        ConfigError: naming the first bad key.
    """
    from eexit.routing.calibrate import DEFAULT_MARGIN_SE
    from eexit.routing.costs import COST_KEYS
    from eexit.routing.routers import ROUTERS

    rc = cfg.get("router")
    if rc is None:
        return
    if rc.get("cost", "mflops") not in COST_KEYS:
        raise ConfigError("router.cost", f"must be one of {', '.join(COST_KEYS)}, got {rc.cost!r}")
    if rc.get("serve", "gate") not in ROUTERS:
        raise ConfigError("router.serve", f"must be one of {', '.join(sorted(ROUTERS))}, got {rc.serve!r}")
    drop = rc.get("max_drop", 0.005)
    _number("router.max_drop", drop, 0, what="(an accuracy share, 0.005 = 0.5 points) ")
    if drop >= 1:
        raise ConfigError("router.max_drop", f"is a share of accuracy, in [0, 1); got {drop!r}")
    _number("router.margin_se", rc.get("margin_se", DEFAULT_MARGIN_SE), 0)
    if not isinstance(rc.get("monotone", True), bool):
        raise ConfigError("router.monotone", f"must be true or false, got {rc.monotone!r}")
    _number("router.latency_batch", rc.get("latency_batch", 1), 1, integer=True)
    _number("router.latency_min_run_time", rc.get("latency_min_run_time", 1.0), 0, above=True, what="(seconds) ")


def validate_data_config(cfg: DictConfig) -> None:
    """Check the data group's loader and size keys (``train.py`` and ``evaluate.py`` alike).

    Raises:
        ConfigError: naming the first bad key.
    """
    data = cfg.get("data")
    if data is None:
        return
    _number("data.batch_size", data.get("batch_size", 1), 1, integer=True)
    _number("data.image_size", data.get("image_size", 1), 1, integer=True)
    _number("data.num_workers", data.get("num_workers", 0), 0, integer=True, what="(0: load in the main process) ")
    if data.get("limit_train") is not None:
        _number("data.limit_train", data.limit_train, 1, integer=True, what="(null: every training image) ")
    if data.get("num_classes") is not None:
        _number("data.num_classes", data.num_classes, 2, integer=True, what="(a classifier needs two) ")


def validate_eval_config(cfg: DictConfig) -> None:
    """Check ``evaluate.py``'s own keys before any model or data is loaded.

    Raises:
        ConfigError: naming the first bad key.
    """
    trusts_checkpoints(cfg)
    validate_router_config(cfg)
    validate_data_config(cfg)
    if not isinstance(cfg.get("recalibrate", False), bool):
        raise ConfigError("recalibrate", f"must be true or false, got {cfg.recalibrate!r}")
    export = cfg.get("export_bundle")
    if export is not None and (not isinstance(export, str) or not export or Path(export).is_file()):
        why = "is a file" if isinstance(export, str) and export and Path(export).is_file() else "must be a folder path"
        raise ConfigError("export_bundle", f"{why}: give the folder to write the bundle into (null: no export)")
    if cfg.get("limit") is not None:
        _number("limit", cfg.limit, 1, integer=True, what="(null: the whole test split) ")
    if cfg.get("batch_size") is not None:  # null: 256
        _number("batch_size", cfg.batch_size, 1, integer=True)
    ec = cfg.get("eval") or {}
    _number("eval.latency_batch", ec.get("latency_batch", 1), 1, integer=True)
    _number("eval.latency_min_run_time", ec.get("latency_min_run_time", 1.0), 0, above=True, what="(seconds) ")
    top = ec.get("top_fraction", 0.5)
    _number("eval.top_fraction", top, 0, above=True)
    if top > 1:
        raise ConfigError("eval.top_fraction", f"is a share of the pixels, in (0, 1]; got {top!r}")
    for group in ("faithfulness", "gate_quality", "cluttered"):
        if "num_images" in (ec.get(group) or {}):
            _number(f"eval.{group}.num_images", ec[group].num_images, 1, integer=True)
    faith = ec.get("faithfulness") or {}
    _number("eval.faithfulness.steps", faith.get("steps", 1), 1, integer=True)
    if faith.get("baseline", "mean") not in ("mean", "blur"):
        raise ConfigError("eval.faithfulness.baseline", f"must be 'mean' or 'blur', got {faith.baseline!r}")
    plots = ec.get("plots") or {}
    _number("eval.plots.num_heatmap_images", plots.get("num_heatmap_images", 1), 1, integer=True)


def check_image_size(image_size: int, min_size: int, model_name: str) -> None:
    """Refuse an image size the backbone cannot take (smaller than its total stride)."""
    if image_size < min_size:
        raise ConfigError(
            "data.image_size",
            f"{image_size} px is too small for model.net '{model_name}', whose stages reduce by {min_size}: "
            f"use at least {min_size}",
        )
