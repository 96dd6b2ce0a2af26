"""Calibration on the held-out split: per-exit records, oracle tiers, knob sweeps and fits.

Knobs are fitted here and nowhere else; the test split is never used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from eexit.models.net import MultiExitNet
from eexit.routing.engine import exit_features
from eexit.routing.routers import NUM_TIERS, Router
from eexit.types import ExitLevel


@dataclass
class ExitRecords:
    """What every exit says about every image of a split.

    Attributes:
        features: ``(N, 4, 7)`` complexity features of each exit (for its predicted class).
        probs: ``(N, 4, K)`` softmax of each exit.
        labels: ``(N,)``.
    """

    features: Tensor
    probs: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def correct(self) -> Tensor:
        """``(N, 4)`` bool: exit k predicts the label."""
        return self.probs.argmax(dim=2) == self.labels.unsqueeze(1)

    def subset(self, idx: Tensor) -> ExitRecords:
        return ExitRecords(self.features[idx], self.probs[idx], self.labels[idx])

    def to(self, device: torch.device | str) -> ExitRecords:
        """The records on ``device`` (``self`` when they are there already)."""
        return ExitRecords(self.features.to(device), self.probs.to(device), self.labels.to(device))


@torch.no_grad()
def collect_records(
    net: MultiExitNet, batches: Iterable[tuple[Tensor, Tensor]], feature_kwargs: dict | None = None
) -> ExitRecords:
    """Run every exit on every image of ``batches`` and keep features, softmax and labels.

    The batches are moved to the network's device (the records are on that device)."""
    feats, probs, labels = [], [], []
    net.eval()
    device = next(net.parameters()).device
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        maps = net.backbone.forward_features(x)
        f_img, p_img = [], []
        for head, stage_map in zip(net.heads, maps, strict=True):
            out = head.forward_parts(stage_map)
            f, _ = exit_features(x, stage_map, out, head, **(feature_kwargs or {}))
            f_img.append(f)
            p_img.append(torch.softmax(out.logits, dim=1))
        feats.append(torch.stack(f_img, dim=1))
        probs.append(torch.stack(p_img, dim=1))
        labels.append(y)
    return ExitRecords(torch.cat(feats), torch.cat(probs), torch.cat(labels))


def oracle_tiers(correct: Tensor) -> Tensor:
    """Smallest exit that is right, ``(N,)``; an image no exit gets right is labelled TINY
    (more compute gains it nothing)."""
    any_right = correct.any(dim=1)
    first = correct.float().argmax(dim=1)
    return torch.where(any_right, first, torch.zeros_like(first))


@torch.no_grad()
def simulate(router: Router, records: ExitRecords, knob: float) -> Tensor:
    """The tier each image would be routed to at ``knob`` ``(N,)``, from recorded exit outputs."""
    n = len(records)
    if router.one_shot:
        tier, _ = router.choose_tier(records.features[:, 0], records.probs[:, 0], knob=knob)
        return tier
    device = records.probs.device
    tier = torch.full((n,), NUM_TIERS - 1, dtype=torch.long, device=device)
    undecided = torch.ones(n, dtype=torch.bool, device=device)
    for level in list(ExitLevel)[:-1]:
        k = int(level)
        score = router.stop_score(level, records.features[:, k], records.probs[:, k])
        stop = undecided & (score >= knob)
        tier[stop] = k
        undecided &= ~stop
    return tier


@dataclass
class SweepPoint:
    """One knob setting on a split.

    Attributes:
        knob: the router's knob.
        accuracy: routed accuracy.
        mean_cost: mean tier cost per image.
        tier_fractions: fraction of images per tier ``[TINY, LIGHT, MEDIUM, HEAVY]``.
        drop_se: standard error of the accuracy drop against HEAVY (paired, per image).
    """

    knob: float
    accuracy: float
    mean_cost: float
    tier_fractions: list[float]
    drop_se: float = 0.0


def evaluate_tiers(tier: Tensor, records: ExitRecords, tier_cost: Sequence[float]) -> tuple[float, float, list[float]]:
    """Accuracy, mean cost and tier distribution of a routing ``(N,)``."""
    acc = records.correct.gather(1, tier.view(-1, 1)).float().mean().item()
    cost = torch.as_tensor(tier_cost, dtype=torch.float64, device=tier.device)[tier].mean().item()
    fractions = torch.bincount(tier, minlength=NUM_TIERS).float().div(len(tier)).tolist()
    return acc, cost, fractions


_ABOVE_ONE = float(torch.tensor(1.0 + 1e-6, dtype=torch.float32))
"""A knob above every score (all scores are <= 1): everything goes to HEAVY; a float32 value."""


def knob_candidates(router: Router, records: ExitRecords, num: int = 201) -> list[float]:
    """Knob values worth trying: quantiles of the router's own scores, plus both ends."""
    if router.one_shot:
        scores = router.tier_probs(records.features[:, 0]).cumsum(dim=1)[:, :-1].flatten()
    else:
        scores = torch.cat(
            [
                router.stop_score(lv, records.features[:, int(lv)], records.probs[:, int(lv)])
                for lv in list(ExitLevel)[:-1]
            ]
        )
    scores = scores.double()
    scores = scores[torch.isfinite(scores)]  # one NaN score (a corrupt image) would make every quantile NaN
    if not len(scores):
        return [0.0, _ABOVE_ONE]
    qs = torch.quantile(scores, torch.linspace(0, 1, num, dtype=torch.float64, device=scores.device))
    # float32 values: the knob is served from a float32 buffer, so the knob swept is the knob served
    return sorted({0.0, *qs.float().tolist(), _ABOVE_ONE})


Folds = Sequence[tuple[Router, ExitRecords]]


@torch.no_grad()
def sweep_folds(folds: Folds, tier_cost: Sequence[float], knobs: Sequence[float] | None = None) -> list[SweepPoint]:
    """Sweep one knob over several (router, records) pairs evaluated together, e.g. out-of-fold
    routers of a cross-fit, each on the records it did not learn from."""
    if knobs is None:
        knobs = sorted({q for router, records in folds for q in knob_candidates(router, records)})
    records = ExitRecords(
        torch.cat([r.features for _, r in folds]),
        torch.cat([r.probs for _, r in folds]),
        torch.cat([r.labels for _, r in folds]),
    )
    points = []
    heavy_right = records.correct[:, -1].float()
    for q in sorted(knobs):
        tier = torch.cat([simulate(router, recs, q) for router, recs in folds])
        acc, cost, frac = evaluate_tiers(tier, records, tier_cost)
        drop = heavy_right - records.correct.gather(1, tier.view(-1, 1)).squeeze(1).float()
        drop_se = drop.std().item() / len(drop) ** 0.5 if len(drop) > 1 else 0.0
        points.append(SweepPoint(float(q), acc, cost, frac, drop_se))
    return points


def sweep(
    router: Router, records: ExitRecords, tier_cost: Sequence[float], knobs: Sequence[float] | None = None
) -> list[SweepPoint]:
    """Accuracy and mean cost for each knob (ascending knobs -> non-decreasing cost)."""
    return sweep_folds([(router, records)], tier_cost, knob_candidates(router, records) if knobs is None else knobs)


def monotone_drops(points: Sequence[SweepPoint], heavy_accuracy: float) -> list[float]:
    """The accuracy drops against HEAVY of ``points``, fitted non-increasing in cost (isotonic
    regression, pool-adjacent-violators, equal weights; points of equal cost share one value, their mean).

    More compute should not lose accuracy: on a split of a few thousand images the swept drops
    wobble by their standard error around that trend, and the cheapest point inside the target
    is then often one the noise lifted in (on CIFAR-10 such a knob kept 0.2 points on calibration
    and lost 0.8 on test). The fit pools each such dip with its neighbours.

    Returns:
        One fitted drop per point, in the order of ``points``.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i].mean_cost, -points[i].accuracy))
    blocks: list[tuple[float, int]] = []  # (mean drop, count) per pooled run of points, cost ascending
    for i in order:
        blocks.append((heavy_accuracy - points[i].accuracy, 1))
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:  # a costlier run drops more: pool
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append(((m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2))
    fitted = [m for m, n in blocks for _ in range(n)]
    out = [0.0] * len(points)
    for rank, i in enumerate(order):
        out[i] = fitted[rank]
    return out


def choose_knob(
    points: Sequence[SweepPoint],
    heavy_accuracy: float,
    max_drop: float = 0.005,
    margin_se: float = 0.0,
    monotone: bool = True,
) -> SweepPoint:
    """The cheapest sweep point whose accuracy drop against HEAVY, plus ``margin_se`` standard
    errors of that drop, is within ``max_drop`` (the most accurate point when none is).

    ``margin_se`` > 0 keeps a statistical margin so that the target also holds on unseen images
    (1.0: a one-sided bound at about 84% confidence); 0 fits the split exactly. ``monotone``
    also holds each point's drop as fitted non-increasing in cost (``monotone_drops``) to the
    target, so that a dip of noise below it does not set the knob; the larger of the two drops
    counts (the fit lowers the drops of the costlier points it pools with a dip, and those,
    with their own smaller standard errors, must not pass for that).
    """
    drops = [heavy_accuracy - p.accuracy for p in points]
    if monotone:  # the fit only tightens the check: a point also needs its own drop inside the target
        drops = [max(d, f) for d, f in zip(drops, monotone_drops(points, heavy_accuracy), strict=True)]
    ok = [p for p, d in zip(points, drops, strict=True) if d + margin_se * p.drop_se <= max_drop + 1e-9]
    return min(ok, key=lambda p: (p.mean_cost, -p.accuracy)) if ok else max(points, key=lambda p: p.accuracy)
