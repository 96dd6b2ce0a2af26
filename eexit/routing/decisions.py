"""One routing decision per image: tier, confidence, cost, prediction, features, attributions."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import Tensor

from eexit.explain.gate_attribution import DEFAULT_METHOD, ExpectedTier, GateAttribution, explain_gate
from eexit.routing.calibrate import Calibration
from eexit.routing.costs import TierCost
from eexit.routing.engine import RoutedOutput
from eexit.routing.features import FEATURE_NAMES, NUM_FEATURES
from eexit.types import ExitLevel


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


@dataclass
class RoutingDecision:
    """What the router decided for one image, and why.

    Attributes:
        tier: exit name (``"tiny"`` ... ``"heavy"``) that gave the prediction.
        confidence: the router's probability for ``tier`` (its own decision, or the forced exit).
        latency_ms: expected milliseconds per image of that tier (measured at calibration).
        mflops: FLOPs of that tier's path / 1e6, router included.
        label: predicted class name.
        label_index: predicted class index.
        probability: softmax probability of the predicted class at the deciding exit.
        features: the seven complexity features the router saw (``None`` for the cascade, which routes
            on confidence alone).
        attributions: per-feature attribution of the router's output (positive = toward more
            compute), or ``None`` when not explained.
        attribution_delta: completeness gap of the attributions, or ``None``.
        router: the router kind.
        forced: the tier was forced (``--tier``) instead of chosen by the router.
        router_tier: the exit the router chose itself (``decisions_from_output`` gives ``tier``
            unless forced); ``None`` when unknown: forced to an exit before the staged gate's or
            the cascade's stop rule fired (they decide exit by exit, so their choice past the
            forced exit is not known).
    """

    tier: str
    confidence: float
    latency_ms: float
    mflops: float
    label: str
    label_index: int
    probability: float
    features: dict[str, float] | None
    attributions: dict[str, float] | None = None
    attribution_delta: float | None = None
    router: str = "gate"
    forced: bool = False
    router_tier: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)


def attribute_output(
    calibration: Calibration, kind: str, out: RoutedOutput, method: str = DEFAULT_METHOD, **method_kwargs
) -> GateAttribution | None:
    """Captum attributions of each routing decision of a batch to the seven features.

    One-shot gate: the expected tier ``sum_t t p_t(f)`` against the mean features of images
    whose oracle tier is TINY. Staged gate: the continue-probability at the exit that decided,
    against the mean features of images that exit gets right. Positive = toward more compute.
    The cascade uses no features: ``None``.

    Args:
        calibration: the calibration holding the routers and baselines.
        kind: ``"gate"``, ``"staged"`` or ``"cascade"``.
        out: the routed batch (its ``features`` and ``decided_at``).
        method: one of ``eexit.explain.gate_attribution.METHODS``.
    """
    router = calibration.routers[kind]
    if kind == "gate":
        return explain_gate(
            ExpectedTier(router.logits_module()), out.features, calibration.baseline_features, method, **method_kwargs
        )
    if kind != "staged":
        return None
    if calibration.exit_baselines is None:
        raise ValueError(
            "the staged router's decisions cannot be explained: this calibration stores no per-exit "
            "explanation baselines (exit_baselines); recalibrate, or pass --no-attributions"
        )
    b = len(out.tier)
    attributions, deltas = out.features.new_zeros(b, NUM_FEATURES), out.features.new_zeros(b)
    outputs, base_out = out.features.new_zeros(b), out.features.new_zeros(b)
    for k in out.decided_at.unique().tolist():
        sel = out.decided_at == k
        res = explain_gate(
            router.continue_module(k), out.features[sel], calibration.exit_baselines[k], method, **method_kwargs
        )
        attributions[sel], deltas[sel], outputs[sel] = res.attributions, res.delta, res.output
        base_out[sel] = res.baseline_output
    return GateAttribution(attributions, deltas, outputs, base_out, method)


def decisions_from_output(
    out: RoutedOutput,
    costs: Sequence[TierCost],
    class_names: Sequence[str] | None = None,
    router: str = "gate",
    attributions: Tensor | None = None,
    deltas: Tensor | None = None,
) -> list[RoutingDecision]:
    """Turn a routed batch into one ``RoutingDecision`` per image (input order).

    Args:
        out: the routed batch.
        costs: the router's four tier costs.
        class_names: names of the classes (default: the indices as strings).
        router: the router kind recorded in each decision.
        attributions: ``(B, 7)`` feature attributions, optional.
        deltas: ``(B,)`` completeness gaps, optional.
    """
    conf_t, label_t = out.probs.max(dim=1)
    # plain Python lists once per batch: per-element tensor indexing dominates otherwise
    tiers, labels, probs = out.tier.tolist(), label_t.tolist(), conf_t.tolist()
    confidence, features = out.confidence.tolist(), out.features.tolist()
    own = tiers if out.router_tier is None else out.router_tier.tolist()
    attr = None if attributions is None else attributions.tolist()
    delta = None if deltas is None else deltas.tolist()
    decisions = []
    for i, (t, li) in enumerate(zip(tiers, labels, strict=True)):
        decisions.append(
            RoutingDecision(
                tier=ExitLevel(t).key,
                confidence=_finite(confidence[i]) or 0.0,
                latency_ms=costs[t].latency_ms,
                mflops=costs[t].mflops,
                label=class_names[li] if class_names else str(li),
                label_index=li,
                probability=_finite(probs[i]) or 0.0,
                features=None
                if router == "cascade"  # it routes on confidence alone: no features were computed
                else {n: _finite(v) for n, v in zip(FEATURE_NAMES, features[i], strict=True)},
                attributions=None
                if attr is None
                else {n: _finite(v) for n, v in zip(FEATURE_NAMES, attr[i], strict=True)},
                attribution_delta=None if delta is None else _finite(delta[i]),
                router=router,
                forced=out.forced,
                router_tier=ExitLevel(own[i]).key if own[i] >= 0 else None,
            )
        )
    return decisions
