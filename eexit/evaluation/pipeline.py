"""``evaluate(cfg)``: every evaluation figure of a trained model, as ``metrics.json``, PNG plots
and one self-contained ``report.html`` in the output folder (importable for tests).

Sections (keys in ``metrics.json``):

* fixed exits: ``test/acc|mflops|latency_ms|flops_ratio/{exit}``;
* routing: ``heavy/*``, ``oracle/*``, ``routed/{gate,staged,cascade}/*`` at the calibrated knob
  (``oracle_saving_fraction``: share of the oracle's FLOPs saving achieved),
  ``tradeoff/{router}`` curves, ``routing/{gate,staged}/tier_accuracy|confusion_matrix``,
  ``routing/tier_distribution``, ``routing/tier_feature_ranges``;
* attention consistency: ``consistency/{kl,cosine,iou_top20}/{early exit}`` and, with
  ``baseline_ckpt_path``, ``baseline/consistency/...``, ``baseline/test/acc/{exit}``,
  ``baseline/faithfulness/...`` and ``baseline/cluttered/...``;
* faithfulness: ``faithfulness/{deletion,insertion}_auc[_random]/{exit}``;
* gate explanations: ``gate_explanation/{gate,staged}/{infidelity,sensitivity_max,...}``;
* cluttered scenes: ``cluttered/{acc,pointing_game,energy,iou@k,dice@k,...}/{exit}``.
"""

from __future__ import annotations

import json
import logging
import math
import unicodedata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from eexit.checkpoint import LoadedCheckpoint, load_checkpoint
from eexit.config import ConfigError, check_calibration_size, trusts_checkpoints, validate_eval_config
from eexit.data.base import SplitDataModule
from eexit.evaluation import plots
from eexit.evaluation.cluttered import cluttered_localization, scenes_from_test
from eexit.evaluation.consistency import consistency_metrics, exit_cams
from eexit.evaluation.faithfulness import exit_faithfulness
from eexit.evaluation.gate_quality import gate_explanation_quality, gate_score_and_baseline
from eexit.evaluation.report import metric_tables, write_report
from eexit.evaluation.routing_eval import exit_costs, routing_metrics
from eexit.explain.gate_attribution import explain_gate
from eexit.routing.calibrate import Calibration, calibrate, calibration_settings
from eexit.routing.calibration import collect_records
from eexit.routing.costs import measure_routed_tier_costs
from eexit.types import ExitLevel

log = logging.getLogger(__name__)


def load_model(cfg: DictConfig, key: str = "ckpt_path") -> LoadedCheckpoint:
    """The network to evaluate, from ``cfg[key]``: a Lightning checkpoint file or an exported
    bundle directory (``eexit export``; verified by ``eexit.bundle.load_bundle``).
    ``bundle_path`` is the same as ``ckpt_path`` given a bundle directory."""
    if key == "ckpt_path" and cfg.get("bundle_path"):
        key = "bundle_path"
    path = cfg.get(key)
    if not path:
        raise ConfigError(key, f"give the model to evaluate: evaluate.py {key}=<checkpoint file or bundle directory>")
    path = Path(path)
    if path.is_dir():
        from eexit.bundle import BundleError, load_bundle

        try:
            bundle = load_bundle(path)
        except (BundleError, FileNotFoundError) as err:
            raise ConfigError(key, str(err)) from err
        extra = {"calibration": bundle.calibration.to_state(), "bundle": bundle.manifest}
        data = {**bundle.manifest.get("data", {}), "class_names": bundle.class_names}
        return LoadedCheckpoint(bundle.net, data, extra, path)
    if key == "bundle_path":
        raise ConfigError(key, f"bundle directory not found: {path}")
    if not path.is_file():
        raise ConfigError(key, f"checkpoint not found: {path}")
    try:
        return load_checkpoint(path, trust=trusts_checkpoints(cfg))
    except ValueError as err:
        raise ConfigError(key, str(err)) from None


def _test_tensors(dm: SplitDataModule, limit: int | None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The test split as tensors; with ``limit``, a seeded random subset of ``limit`` images (in
    split order): the first images of a class-sorted folder such as CIFAR-10's would cover only
    one or two classes."""
    dm.setup("test")
    loader = dm.test_dataloader()
    dataset = loader.dataset
    if limit is not None and limit < len(dataset):
        pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
        loader = DataLoader(
            Subset(dataset, pick.tolist()), batch_size=loader.batch_size, num_workers=loader.num_workers
        )
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _batches(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _calibration(
    loaded: LoadedCheckpoint, dm: SplitDataModule, cfg: DictConfig, example_size: int
) -> Calibration | None:
    """The checkpoint's stored calibration, or a new one fitted on the held-out calibration split
    (its latencies timed on ``example_size`` images of that split); ``None`` for a checkpoint
    that stores none and was trained without a calibration split (``data.calib_size=0``,
    ``router.calibrate=false``): then the routers are not evaluated."""
    state = loaded.extra.get("calibration")
    recalibrate = bool(cfg.get("recalibrate", False))
    if state and not recalibrate:
        ignored = _router_overrides()
        if ignored:
            log.warning(
                "%s stores its calibration, so these settings are not used: %s (recalibrate=true fits the "
                "routers anew with them)",
                loaded.path,
                " ".join(ignored),
            )
        return Calibration.from_state(state)
    dm.setup("calibrate")
    trained_pool = ((loaded.data or {}).get("split") or {}).get("pool_size")
    if trained_pool is not None and trained_pool != dm.pool_size:
        raise ConfigError(
            "data",
            f"{loaded.path} was trained on a pool of {trained_pool} images, this data config gives {dm.pool_size}: "
            "its calibration split would not be the images training held out (evaluate with the training run's "
            "data config, or a checkpoint that stores its calibration)",
        )
    rc = cfg.router
    batches = list(dm.calib_dataloader())
    if not batches and not state and not recalibrate:
        log.warning(
            "%s holds no calibration and was trained without a calibration split: the routers are not "
            "evaluated (fixed exits, oracle, attention and explanation figures only)",
            loaded.path,
        )
        return None
    if not batches:
        raise ConfigError("data.calib_size", "the calibration split is empty: nothing to calibrate the routers on")
    if state:
        log.info("recalibrate=true: fitting the routers anew on the held-out calibration split")
    else:
        log.warning("%s holds no calibration: calibrating on the held-out calibration split now", loaded.path)
    check_calibration_size(
        sum(len(y) for _, y in batches),
        f"the routers are fitted on the images training held out, as recorded in {loaded.path}: train with "
        "data.calib_size of at least that many images",
    )
    # the timing batch comes from the calibration split too: nothing of the fit sees test images
    timing, have = [], 0
    for x, _ in batches:
        if have >= example_size:
            break
        timing.append(x)
        have += len(x)
    return calibrate(loaded.net, batches, torch.cat(timing)[:example_size], **calibration_settings(rc, cfg.get("seed")))


def _calibration_source(loaded: LoadedCheckpoint, cfg: DictConfig, cal: Calibration | None) -> str:
    """Where the routers evaluated come from, for the report's meta line."""
    if cal is None:
        return "none (no stored calibration, no calibration split): routers not evaluated"
    if not loaded.extra.get("calibration") or cfg.get("recalibrate", False):
        return "fitted at evaluation"
    return "stored in the bundle" if "bundle" in loaded.extra else "stored in the checkpoint"


def _export(cfg: DictConfig, loaded: LoadedCheckpoint, cal: Calibration | None) -> Path | None:
    """With ``export_bundle=DIR``: the serving bundle of the evaluated network with the
    calibration used here (the stored one, or the one fitted now: ``last.ckpt``, another epoch,
    ``recalibrate=true``), written before the test images are used; its folder, else ``None``."""
    out = cfg.get("export_bundle")
    if not out:
        return None
    if cal is None:
        raise ConfigError(
            "export_bundle",
            f"{loaded.path} has no calibrated routers and no calibration split to fit them on: a bundle serves "
            "routed inference, so it cannot be exported (train with a calibration split)",
        )
    from eexit.bundle import write_bundle

    bundle = write_bundle(
        loaded.net, loaded.data, cal, out, serve=cfg.router.get("serve", "gate"), source=Path(loaded.path).name
    )
    log.info("bundle of %s written to %s", loaded.path, bundle)
    return bundle


def _router_overrides() -> list[str]:
    """The command line's ``router.*`` overrides (empty outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    keys = ((o, o.lstrip("+~").split("=", 1)[0]) for o in HydraConfig.get().overrides.task)
    return [o for o, key in keys if key == "router" or key.startswith("router.")]


def check_data_matches(loaded: LoadedCheckpoint, info, key: str) -> None:
    """Refuse test data the model was not trained for (classes, channels, size, normalisation)."""
    trained = loaded.data or {}
    if loaded.net.num_classes != info.num_classes:
        source = f" (it was trained on data named {trained['name']!r})" if trained.get("name") else ""
        raise ConfigError(
            "data",
            f"{info.num_classes} classes in {info.name!r}, but {key} has {loaded.net.num_classes}{source}: evaluate "
            "with the training run's data config (data=..., data.root=...)",
        )
    names = [_nfc(n) for n in trained.get("class_names") or []]
    here = [_nfc(n) for n in info.class_names]
    if names and here and names != here:
        # the same number of classes, numbered otherwise (an ImageFolder sorts its folder names):
        # every accuracy would compare labels of one numbering with predictions of another.
        # Compared in Unicode's composed form (a folder copied from macOS may spell ü as u + ¨);
        # shown escaped, so that names that look alike show where they differ
        diff = [f"{i}: {a!a} vs {b!a}" for i, (a, b) in enumerate(zip(names, here, strict=False)) if a != b]
        raise ConfigError(
            "data",
            f"{key} was trained on classes numbered otherwise than this data's (trained vs here: "
            f"{'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}): evaluate on data with the same class order",
        )
    for field_name in ("in_chans", "image_size"):
        if field_name in trained and int(trained[field_name]) != int(getattr(info, field_name)):
            raise ConfigError(
                f"data.{field_name}",
                f"{key} was trained on {field_name}={trained[field_name]}, the data gives {getattr(info, field_name)}",
            )
    for field_name in ("mean", "std"):
        want, got = trained.get(field_name), getattr(info, field_name)
        if want is not None and (
            len(want) != len(got) or any(abs(float(a) - float(b)) > 1e-4 for a, b in zip(want, got, strict=False))
        ):
            raise ConfigError(f"data.{field_name}", f"{key} was trained with {field_name}={want}, the data gives {got}")


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", str(name))


def _warn_if_scenes_are_not_recognised(loc: dict[str, float], test_acc: float, canvas_factor: float) -> None:
    """Warn when HEAVY classifies the clean (level 0) cluttered scenes at under half its test
    accuracy: the localisation scores then describe the cams of a network that does not
    recognise the objects on such canvases (a network trained on centred single objects sees a
    larger canvas, even a clean one, as another input distribution)."""
    clean = loc.get("cluttered/acc_level0/heavy")
    if clean is not None and clean < 0.5 * test_acc:
        log.warning(
            "HEAVY classifies the clean cluttered scenes (level 0, canvas %.2gx the image) at %.1f%% against "
            "%.1f%% on the test split: their localisation scores describe cams of a network that does not "
            "recognise the objects there (eval.cluttered.canvas_factor=1 keeps the training scale, but a photograph "
            "then fills the canvas and hides the harder levels' distractors and texture: only contrast varies)",
            canvas_factor,
            100 * clean,
            100 * test_acc,
        )


def _examples_per_tier(tier: Tensor, per_tier: int = 1) -> list[int]:
    """The first image routed to each tier (up to ``per_tier`` each), in tier order."""
    picks = []
    for level in ExitLevel:
        picks += torch.nonzero(tier == int(level)).flatten()[:per_tier].tolist()
    return picks


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.data``'s test split (with ``cfg.limit``, a seeded
    random subset of that many images).

    Writes ``metrics.json``, ``plots/*.png`` and ``report.html`` into ``cfg.paths.output_dir``
    and, with a ``logger``, logs the scalars (and, to W&B, the figures and tables).

    Returns:
        The metrics (see the module docstring for the keys).
    """
    validate_eval_config(cfg)
    loaded = load_model(cfg)
    baseline = load_model(cfg, "baseline_ckpt_path") if cfg.get("baseline_ckpt_path") else None
    from eexit.training import build_datamodule

    dm = build_datamodule(cfg)
    split = (loaded.data or {}).get("split")
    differs = dm.split_differences(split) if split else []
    if differs:
        # recalibrating (and the report's split sizes) must use the images training held out
        log.warning("splitting the data as %s was trained: %s", loaded.path, "; ".join(differs))
        dm.use_split(split)
    info = dm.info
    net = loaded.net.eval()
    for name, model in (("ckpt_path", loaded), ("baseline_ckpt_path", baseline)):
        if model is not None:
            check_data_matches(model, info, name)
    try:
        dm.setup("test")  # splits the pool too (the calibration split may be needed)
    except ValueError as err:  # the checkpoint's split sizes do not fit this data's pool
        if isinstance(err, ConfigError) and err.key != "data.val_size":
            raise
        pool = (split or {}).get("pool_size")
        trained = (
            f" ({loaded.path} was trained on a pool of {pool} images: evaluate with its data config)" if pool else ""
        )
        raise ConfigError("data", f"{getattr(err, 'problem', err)}{trained}") from None
    limit = cfg.get("limit")
    x, y = _test_tensors(dm, limit, cfg.get("seed") or 0)
    subset = limit is not None and limit < len(dm.data_test)  # limit >= the split: all of it
    bs = int(cfg.get("batch_size") or 256)
    batches = _batches(x, y, bs)
    out_dir = Path(cfg.paths.output_dir)
    plot_dir = out_dir / "plots"
    ec = cfg.eval
    torch.manual_seed(cfg.get("seed") or 0)

    cal = _calibration(loaded, dm, cfg, min(ec.latency_batch, len(x)))
    bundle_dir = _export(cfg, loaded, cal)
    log.info("evaluating %s on %d test images", loaded.path, len(y))
    records = collect_records(net, batches, cal.feature_kwargs if cal is not None else None)
    example = x[: ec.latency_batch]
    costs = exit_costs(net, example, ec.latency_min_run_time)
    if ec.remeasure_tier_latency and cal is not None:  # routed and fixed-exit times from the same machine and batch
        for kind in cal.routers:
            served = cal.routed(net, kind, optimize=True)
            cal.tier_costs[kind] = measure_routed_tier_costs(served, example, ec.latency_min_run_time)
    metrics, tiers = routing_metrics(cal, records, costs)

    consistency = consistency_metrics(net, batches, ec.top_fraction)
    metrics.update({f"consistency/{k}": v for k, v in consistency.items() if not k.startswith("acc/")})
    if baseline is not None:
        base = consistency_metrics(baseline.net.eval(), batches, ec.top_fraction)
        metrics.update({f"baseline/consistency/{k}": v for k, v in base.items() if not k.startswith("acc/")})
        metrics.update({f"baseline/test/{k}": v for k, v in base.items() if k.startswith("acc/")})

    # the sections that use only some test images draw them in one seeded random order: the first
    # images of a class-sorted split (CIFAR-10's folders) are of one class
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.get("seed") or 0))
    x_mixed = x[order]
    n_faith = min(len(y), ec.faithfulness.num_images)
    faith, curves = exit_faithfulness(
        net, x_mixed[:n_faith], ec.faithfulness.steps, ec.faithfulness.baseline, cfg.seed or 0
    )
    metrics.update({f"faithfulness/{k}": v for k, v in faith.items()})

    feats = records.features[order[: ec.gate_quality.num_images], 0]
    metrics["gate_explanation/perturb_radius"] = float(ec.gate_quality.perturb_radius)
    for kind in ("gate", "staged"):
        if cal is not None and kind in cal.routers:
            q = gate_explanation_quality(
                cal,
                kind,
                feats,
                n_perturb_samples=ec.gate_quality.n_perturb_samples,
                perturb_radius=ec.gate_quality.perturb_radius,
            )
            metrics.update({f"gate_explanation/{kind}/{k}": v for k, v in q.items()})

    cc = ec.cluttered
    scenes = clutter_cams = None
    if y.unique().numel() >= 2:  # distractors are objects of another class
        scenes = scenes_from_test(x, y, info.mean, info.std, cc.num_images, cc.canvas_factor, cc.seed)
        loc, clutter_cams = cluttered_localization(net, scenes, info.mean, info.std, tuple(cc.fractions), bs)
        metrics.update(loc)
        _warn_if_scenes_are_not_recognised(loc, metrics["test/acc/heavy"], cc.canvas_factor)
    else:
        log.warning("the evaluated test images hold one class: no cluttered scenes (their distractors need two)")
    if baseline is not None:  # the same explanation-quality figures for the second model
        faith_b, _ = exit_faithfulness(
            baseline.net, x_mixed[:n_faith], ec.faithfulness.steps, ec.faithfulness.baseline, cfg.seed or 0
        )
        metrics.update({f"baseline/faithfulness/{k}": v for k, v in faith_b.items()})
        if scenes is not None:
            loc_b, _ = cluttered_localization(baseline.net, scenes, info.mean, info.std, tuple(cc.fractions), bs)
            metrics.update({f"baseline/{k}": v for k, v in loc_b.items() if k != "cluttered/mask_fraction"})

    figures = _figures(
        cfg, info, metrics, curves, net, baseline, cal, records, tiers, x_mixed, y, scenes, clutter_cams, plot_dir
    )
    for key, value in list(metrics.items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise FloatingPointError(f"evaluation produced a non-finite value for {key}")
    meta = {
        "checkpoint": str(loaded.path),
        "baseline checkpoint": str(baseline.path) if baseline else "-",
        "data": f"{info.name} test split, {len(y)} images"
        + (f" (a random subset: limit={limit}, seed={cfg.seed})" if limit and subset else ""),
        "cluttered scenes": f"{len(scenes)} synthetic layouts of test objects, canvas {scenes.images.shape[-1]} px"
        if scenes is not None
        else "none (one class among the test images)",
        "calibration": _calibration_source(loaded, cfg, cal),
        "exported bundle": str(bundle_dir) if bundle_dir is not None else "-",
        "latency": f"ms per image in batches of {len(example)}, measured now on this machine"
        + ("" if ec.remeasure_tier_latency else " (routed tiers: as measured at calibration)"),
    }
    metrics["meta"] = meta
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True, allow_nan=False))
    write_report(out_dir / "report.html", metrics, figures, f"eexit evaluation: {info.name}", meta)
    log.info("metrics, plots and report written to %s", out_dir)
    _log_to_loggers(cfg, metrics, figures)
    return metrics


def _figures(
    cfg, info, metrics, curves, net, baseline, cal, records, tiers, x, y, scenes, clutter_cams, plot_dir
) -> dict:
    """Draw every figure; ``{caption: png path}``."""
    figs = {"Accuracy vs compute": plots.tradeoff_plot(metrics, plot_dir / "tradeoff.png")}
    figs["Tier distribution"] = plots.tier_distribution_plot(
        metrics["routing/tier_distribution"], plot_dir / "tiers.png"
    )
    if "routing/gate/confusion_matrix" in metrics:
        figs["One-shot gate tier vs oracle tier"] = plots.confusion_plot(
            metrics["routing/gate/confusion_matrix"], plot_dir / "gate_confusion.png"
        )
    n = min(len(y), cfg.eval.plots.num_heatmap_images)
    xs = x[:n]
    size = tuple(x.shape[-2:])
    cams = {"model": plots.upsampled(exit_cams(net, xs)[1], size)}  # ckpt_path (EGT or not)
    if baseline is not None:
        cams["baseline"] = plots.upsampled(exit_cams(baseline.net, xs)[1], size)
    figs["Grad-CAM of each exit (HEAVY's class)"] = plots.heatmap_grid(
        plots.for_display(xs, info.mean, info.std), cams, plot_dir / "heatmaps.png"
    )
    if scenes is not None:
        m = min(len(scenes), cfg.eval.plots.num_heatmap_images, len(clutter_cams[0]))  # cams of the first batch
        figs["Cluttered scenes: Grad-CAM of each exit (target class)"] = plots.heatmap_grid(
            scenes.images[:m],
            {"model": [c[:m] for c in clutter_cams]},
            plot_dir / "cluttered_heatmaps.png",
            masks=scenes.masks[:m],
        )
    for kind in ("deletion", "insertion"):
        figs[f"Mean {kind} curve per exit"] = plots.curve_plot(
            curves[kind], plot_dir / f"{kind}.png", f"{kind} (most relevant pixels first)", "probability of the class"
        )
    picks = _examples_per_tier(tiers["gate"]) if cal is not None else []
    if picks:
        labels = [f"#{i} -> {ExitLevel(int(tiers['gate'][i])).name}" for i in picks]
        feats = records.features[picks, 0]
        figs["Complexity features vs tier profiles"] = plots.radar_plot(
            feats, cal.tier_profiles, plot_dir / "radar.png", labels
        )
        score, base, _ = gate_score_and_baseline(cal, "gate")
        attr = explain_gate(score, feats, base)
        p_tiny = cal.routers["gate"].tier_probs(feats)[:, 0].tolist()
        titles = [
            f"{lab}: E[tier] {o:.2f}, P(TINY) {p:.2f}, knob {float(cal.routers['gate'].knob):.2f}"
            for lab, o, p in zip(labels, attr.output.tolist(), p_tiny, strict=True)
        ]
        figs["Gate attributions (red: heavier, blue: lighter)"] = plots.attribution_bars(
            attr.attributions, plot_dir / "attributions.png", titles
        )
    return figs


def _log_to_loggers(cfg: DictConfig, metrics: dict, figures: dict) -> None:
    """Scalars to every configured logger; figures (``wandb.Image``) and tables
    (``wandb.Table``) to W&B as well."""
    from eexit.training import _instantiate_dict, finish_wandb_runs

    loggers = _instantiate_dict(cfg.get("logger"))
    try:
        _log_scalars_figures_tables(loggers, cfg, metrics, figures)
    finally:
        finish_wandb_runs(loggers)


def _log_scalars_figures_tables(loggers: list, cfg: DictConfig, metrics: dict, figures: dict) -> None:
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        lg.log_metrics(scalars)
        if type(lg).__name__ == "WandbLogger":
            import wandb

            lg.experiment.log({f"eval/{p.stem}": wandb.Image(str(p), caption=c) for c, p in figures.items()})
            for t in metric_tables(metrics):
                rows = [[str(v) for v in row] for row in t.rows]
                lg.experiment.log({f"eval_tables/{t.slug}": wandb.Table(columns=t.header, data=rows)})
        lg.finalize("success")
