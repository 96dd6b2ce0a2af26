"""One routing decision per image: tier, confidence, cost, prediction, features, attributions."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from eexit.explain.gate_attribution import DEFAULT_METHOD, ExpectedTier, GateAttribution, explain_gate
from eexit.routing.calibrate import Calibration
from eexit.routing.costs import TierCost
from eexit.routing.engine import RoutedOutput
from eexit.routing.features import FEATURE_NAMES, NUM_FEATURES
from eexit.routing.routers import Router
from eexit.types import ExitLevel


@dataclass
class RoutingDecision:
    """What the router decided for one image, and why.

    Attributes:
        tier: exit name (``"tiny"`` ... ``"heavy"``) that gave the prediction.
        confidence: the router's probability for ``tier`` (its own decision, or the forced exit).
        latency_ms: expected milliseconds per image of that tier (measured at calibration).
        mflops: FLOPs of that tier's path / 1e6, router included.
        label: predicted class name; ``None`` when the image has no prediction (its logits are
            not finite: an image with a NaN or infinite pixel, which is not run, or logits that
            overflowed).
        label_index: predicted class index (``None`` likewise).
        probability: softmax probability of the predicted class at the deciding exit (0 when
            there is no prediction).
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
    label: str | None
    label_index: int | None
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
    if kind not in ("gate", "staged"):
        return None
    # explained where the calibration's router sits (the routed batch may have run elsewhere),
    # in its dtype; the results come back to the batch's device
    weight = next(router.parameters())
    home = out.features.device
    result = _attribute_on(calibration, router, kind, out, out.features.to(weight), method, **method_kwargs)
    return result if home == weight.device else result.to(home)


def _attribute_on(
    calibration: Calibration,
    router: Router,
    kind: str,
    out: RoutedOutput,
    features: Tensor,
    method: str,
    **method_kwargs,
) -> GateAttribution:
    """``attribute_output`` with ``features`` ``(B, 7)`` on the device and dtype of ``router``
    (the calibration's ``kind`` router)."""
    if kind == "gate":
        return explain_gate(
            ExpectedTier(router.logits_module()), features, calibration.baseline_features, method, **method_kwargs
        )
    if calibration.exit_baselines is None:
        raise ValueError(
            "the staged router's decisions cannot be explained: this calibration stores no per-exit "
            "explanation baselines (exit_baselines); recalibrate, or pass --no-attributions"
        )
    b = len(out.tier)
    attributions, deltas = features.new_zeros(b, NUM_FEATURES), features.new_zeros(b)
    outputs, base_out = features.new_zeros(b), features.new_zeros(b)
    decided_at = out.decided_at.to(features.device)
    for k in decided_at.unique().tolist():
        sel = decided_at == k
        res = explain_gate(
            router.continue_module(k), features[sel], calibration.exit_baselines[k], method, **method_kwargs
        )
        attributions[sel], deltas[sel], outputs[sel] = res.attributions, res.delta, res.output
        base_out[sel] = res.baseline_output
    return GateAttribution(attributions, deltas, outputs, base_out, method)


def decision_rows(
    out: RoutedOutput,
    costs: Sequence[TierCost],
    class_names: Sequence[str] | None = None,
    router: str = "gate",
    attributions: Tensor | None = None,
    deltas: Tensor | None = None,
    digits: int | None = None,
) -> list[dict]:
    """One ``RoutingDecision``'s fields per image of a routed batch, as plain dicts (input order):
    what ``eexit predict`` writes, without building the dataclasses.

    Args:
        out: the routed batch.
        costs: the router's four tier costs.
        class_names: names of the classes (default: the indices as strings).
        router: the router kind recorded in each row.
        attributions: ``(B, 7)`` feature attributions, optional.
        deltas: ``(B,)`` completeness gaps, optional.
        digits: round every float to this many significant digits (``None``: as computed). The
            model computes in float32: ``digits=9`` still gives back every float32 value exactly
            and drops only the float64 text's extra digits (JSON encoding gets about a quarter
            faster); fewer digits lose information (7 digits print some neighbouring float32
            values alike).

    Returns:
        ``B`` dicts with the keys of ``RoutingDecision``; non-finite values become ``None``
        (``0.0`` for ``confidence`` and ``probability``). An image whose logits are not all
        finite has no prediction: ``label``, ``label_index``, ``router_tier``, ``attributions``
        and ``attribution_delta`` are ``None`` and ``confidence`` and ``probability`` 0 (whatever
        its router's own score said; its features are placeholders, nothing to explain).
    """
    conf_t, label_t = out.probs.max(dim=1)
    predicted = torch.isfinite(out.logits).all(dim=1).tolist()
    # plain Python lists once per batch: per-element tensor indexing dominates otherwise; every
    # float column in one (B, n) matrix, so that it is rounded and converted once
    columns = [conf_t[:, None], out.confidence[:, None]]
    with_features = router != "cascade"  # the cascade routes on confidence alone: no features
    columns += [out.features] if with_features else []
    columns += [] if attributions is None else [attributions]
    columns += [] if deltas is None else [deltas[:, None]]
    floats = _floats(torch.cat([c.to(torch.float64) for c in columns], dim=1), digits)
    n_feat = NUM_FEATURES if with_features else 0
    a0, a1 = 2 + n_feat, 2 + n_feat + (0 if attributions is None else NUM_FEATURES)
    tiers, labels = out.tier.tolist(), label_t.tolist()
    own = tiers if out.router_tier is None else out.router_tier.tolist()
    keys = [lv.key for lv in ExitLevel]
    tier_cost = _floats(torch.tensor([[c.latency_ms, c.mflops] for c in costs], dtype=torch.float64), digits)
    rows = []
    for t, li, own_t, f, ok in zip(tiers, labels, own, floats, predicted, strict=True):
        latency_ms, mflops = tier_cost[t]
        if not ok:  # not run (or overflowed): no prediction, and no explanation of its placeholder features
            li, own_t, f[0], f[1] = None, -1, None, None
        explained = attributions is not None and ok
        rows.append(
            {
                "tier": keys[t],
                "confidence": 0.0 if f[1] is None else f[1],
                "latency_ms": latency_ms,
                "mflops": mflops,
                "label": None if li is None else class_names[li] if class_names else str(li),
                "label_index": li,
                "probability": 0.0 if f[0] is None else f[0],
                "features": dict(zip(FEATURE_NAMES, f[2:a0], strict=True)) if with_features else None,
                "attributions": dict(zip(FEATURE_NAMES, f[a0:a1], strict=True)) if explained else None,
                "attribution_delta": f[a1] if deltas is not None and ok else None,
                "router": router,
                "forced": out.forced,
                "router_tier": keys[own_t] if own_t >= 0 else None,
            }
        )
    return rows


def decisions_from_output(
    out: RoutedOutput,
    costs: Sequence[TierCost],
    class_names: Sequence[str] | None = None,
    router: str = "gate",
    attributions: Tensor | None = None,
    deltas: Tensor | None = None,
) -> list[RoutingDecision]:
    """Turn a routed batch into one ``RoutingDecision`` per image (input order); the arguments
    are ``decision_rows``'s (values not rounded)."""
    return [RoutingDecision(**row) for row in decision_rows(out, costs, class_names, router, attributions, deltas)]


def round_significant(values: Tensor, digits: int) -> Tensor:
    """``values`` rounded to ``digits`` significant digits, as float64 whose text is that short.

    ``k / 10**p`` (``k * 10**-p`` for large values), ``k`` an integer of ``digits`` digits: where
    the power of ten and the result are exact in float64 (``-12 <= p <= 22``) the quotient is
    correctly rounded, i.e. the float64 nearest to the decimal, which Python prints as the
    decimal itself; the few values outside that range (below about ``1e-16`` or above ``1e18``
    for 7 digits) go through Python's own formatting. Zeros and non-finite values stay as they
    are. Equal to ``float(f"{v:.{digits}g}")`` but where the value lies within float64 rounding
    of a rounding midpoint.

    Args:
        values: any shape, any float dtype.
        digits: significant digits, 1 to 15 (``k`` stays exact in float64).

    Returns:
        float64, the shape of ``values``.
    """
    if not 1 <= digits <= 15:
        raise ValueError(f"digits must be between 1 and 15, got {digits}")
    x = values.double()
    mag = x.abs()
    finite_nonzero = torch.isfinite(x) & (mag > 0)
    p = (digits - 1) - torch.where(finite_nonzero, mag, torch.ones_like(mag)).log10().floor()
    scale = torch.pow(10.0, p.abs())
    rounded = torch.where(p >= 0, (x * scale).round() / scale, (x / scale).round() * scale)
    out = torch.where(finite_nonzero, rounded, x)
    inexact = finite_nonzero & ((p > 22) | (p < -12))
    if bool(inexact.any()):
        flat, src = out.flatten(), x.flatten()
        for i in inexact.flatten().nonzero().squeeze(1).tolist():
            flat[i] = float(f"{float(src[i]):.{digits}g}")
        out = flat.view_as(x)
    return out


def _floats(values: Tensor, digits: int | None) -> list:
    """``values`` as (nested lists of) Python floats, rounded (``round_significant``) when
    ``digits`` is given; non-finite entries become ``None``."""
    x = values.double() if digits is None else round_significant(values, digits)
    if bool(torch.isfinite(x).all()):
        return x.tolist()
    return _replace(x.tolist())


def _replace(values: list) -> list:
    return [_replace(v) if isinstance(v, list) else (v if math.isfinite(v) else None) for v in values]
