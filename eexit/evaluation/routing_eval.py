"""Accuracy and cost of fixed exits, routers at their calibrated knobs, always-HEAVY and the
oracle, trade-off curves, and how the gate's tiers compare with the oracle's, on test records.

Routing is replayed with ``eexit.routing.calibration.simulate`` on recorded exit outputs (the
same tiers as the batched engine, see tests/test_routing.py); tier costs are the calibration's
``tier_costs`` (router included; ``evaluate`` re-times them on the evaluation machine by
default), fixed-exit costs are measured here without a router.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_confusion_matrix

from eexit.models.inference import inference_copy
from eexit.models.net import MultiExitNet
from eexit.routing.calibrate import Calibration, tier_profiles
from eexit.routing.calibration import ExitRecords, evaluate_tiers, oracle_tiers, simulate, sweep
from eexit.routing.costs import count_flops, measure_latencies
from eexit.routing.engine import predict_exit_chunked
from eexit.routing.routers import NUM_TIERS
from eexit.types import ExitLevel


@torch.no_grad()
def exit_costs(net: MultiExitNet, example: Tensor, min_run_time: float = 0.2) -> list[dict[str, float]]:
    """FLOPs (``FlopCounterMode``) and latency (``torch.utils.benchmark``) per image of each
    fixed exit, without a router: timed on the inference copy the routers are served on
    (BatchNorm folded, channels-last) and in the routed engine's chunks, like the routers.

    Args:
        net: the network (eval mode).
        example: a batch ``(B, C, H, W)`` to time.
        min_run_time: seconds of timing per exit.

    Returns:
        ``[{"exit", "mflops", "latency_ms"}] * 4``, cheapest first.
    """
    fast = inference_copy(net)
    served = example.contiguous(memory_format=torch.channels_last)
    flops = [count_flops(net.predict_exit, example[:1], level) for level in ExitLevel]
    seconds = measure_latencies(
        [lambda level=level: predict_exit_chunked(fast, served, level) for level in ExitLevel], min_run_time
    )
    return [
        {"exit": level.key, "mflops": f / 1e6, "latency_ms": 1e3 * t / len(example)}
        for level, f, t in zip(ExitLevel, flops, seconds, strict=True)
    ]


def _thin(points: list[dict], max_points: int) -> list[dict]:
    if len(points) <= max_points:
        return points
    idx = torch.linspace(0, len(points) - 1, max_points).round().long().unique().tolist()
    return [points[i] for i in idx]


def routing_metrics(
    cal: Calibration | None, records: ExitRecords, costs: Sequence[dict[str, float]], max_curve_points: int = 101
) -> tuple[dict, dict[str, Tensor]]:
    """Every accuracy/cost and routing figure on the test records.

    Args:
        cal: the calibration (routers at their knobs, tier costs); ``None``: the fixed exits and
            the oracle only.
        records: test-split records of every exit (``collect_records``).
        costs: fixed-exit costs from ``exit_costs``.
        max_curve_points: points kept per trade-off curve.

    Returns:
        The metrics (flat keys; curves, confusion matrices, distributions and feature tables as
        lists/dicts) and the tiers each router and the oracle chose ``{name: (N,)}``.
    """
    m: dict = {}
    correct = records.correct
    heavy = costs[ExitLevel.HEAVY]
    for level in ExitLevel:
        c = costs[level]
        m[f"test/acc/{level.key}"] = correct[:, level].float().mean().item()
        m[f"test/mflops/{level.key}"] = c["mflops"]
        m[f"test/latency_ms/{level.key}"] = c["latency_ms"]
        m[f"test/flops_ratio/{level.key}"] = c["mflops"] / heavy["mflops"]
    m["heavy/accuracy"] = m["test/acc/heavy"]
    m["heavy/mflops"], m["heavy/latency_ms"] = heavy["mflops"], heavy["latency_ms"]

    oracle = oracle_tiers(correct)
    tiers: dict[str, Tensor] = {"oracle": oracle}
    acc, mflops, frac = evaluate_tiers(oracle, records, [c["mflops"] for c in costs])
    m["oracle/accuracy"], m["oracle/mflops"] = acc, mflops
    m["oracle/latency_ms"] = evaluate_tiers(oracle, records, [c["latency_ms"] for c in costs])[1]
    m["oracle/flops_ratio"] = mflops / heavy["mflops"]
    distribution = {"oracle": frac}
    saving_oracle = heavy["mflops"] - mflops

    for kind, router in (cal.routers if cal is not None else {}).items():
        tier_mflops = [c.mflops for c in cal.tier_costs[kind]]
        tier = simulate(router, records, float(router.knob))
        tiers[kind] = tier
        acc, mflops, frac = evaluate_tiers(tier, records, tier_mflops)
        p = f"routed/{kind}"
        m[f"{p}/knob"] = float(router.knob)
        m[f"{p}/accuracy"], m[f"{p}/mflops"] = acc, mflops
        m[f"{p}/latency_ms"] = evaluate_tiers(tier, records, [c.latency_ms for c in cal.tier_costs[kind]])[1]
        m[f"{p}/flops_ratio"] = mflops / heavy["mflops"]
        m[f"{p}/accuracy_drop"] = m["heavy/accuracy"] - acc
        m[f"{p}/oracle_saving_fraction"] = (heavy["mflops"] - mflops) / saving_oracle if saving_oracle > 0 else 0.0
        for level, f in zip(ExitLevel, frac, strict=True):
            m[f"{p}/tier_fraction/{level.key}"] = f
        distribution[kind] = frac
        curve = [
            {
                "knob": pt.knob,
                "accuracy": pt.accuracy,
                "mflops": pt.mean_cost,
                "flops_ratio": pt.mean_cost / heavy["mflops"],
            }
            for pt in sweep(router, records, tier_mflops)
        ]
        m[f"tradeoff/{kind}"] = _thin(curve, max_curve_points)
        if kind != "cascade":
            m[f"routing/{kind}/tier_accuracy"] = (tier == oracle).float().mean().item()
            m[f"routing/{kind}/confusion_matrix"] = multiclass_confusion_matrix(tier, oracle, NUM_TIERS).tolist()
    m["routing/tier_distribution"] = distribution
    if cal is not None:
        m["routing/tier_feature_ranges"] = tier_profiles(records.features[:, 0], tiers["gate"])
        m["routing/tier_feature_ranges_calibration"] = cal.tier_profiles
    return m, tiers
