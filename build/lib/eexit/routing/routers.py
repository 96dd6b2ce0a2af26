"""Three routers behind one interface, each with one monotone compute/accuracy knob.

* ``OneShotGate``: right after TINY, an MLP on the standardised TINY features predicts the
  oracle tier; the tier is the smallest ``t`` with ``P(oracle <= t) >= knob``. The tier, its
  latency and its cost are known before any further compute.
* ``StagedGate``: at each exit reached, a small model on that exit's standardised features
  predicts "stopping here loses nothing" (this exit is right, or no later exit is); the image
  stops when that probability is ``>= knob``.
* ``ConfidenceCascade``: stop at the first exit whose max softmax is ``>= knob`` (the standard
  baseline).

A higher knob never routes an image to a cheaper tier (monotone), so sweeping it traces the
accuracy/compute trade-off.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eexit.types import ExitLevel

NUM_TIERS = len(ExitLevel)


class Standardize(nn.Module):
    """``(x - mean) / std`` with the statistics stored as buffers (saved with the router)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def fit(self, x: Tensor) -> Standardize:
        """Set the statistics from ``(N, F)`` samples (``N >= 1``).

        A feature that is (nearly) constant on the samples (std at most 1e-6 of its magnitude,
        or of 1) keeps its natural unit (std 1) instead of a tiny std that would blow small
        serve-time changes up to huge inputs.
        """
        if x.dim() != 2 or x.shape[0] < 1:
            raise ValueError(f"expected samples of shape (N >= 1, F), got {tuple(x.shape)}")
        x64 = x.double()  # float32 rounding alone gives a constant of ~100 a std above 1e-6
        mean, std = x64.mean(0), x64.std(0, correction=0)
        self.mean.copy_(mean)
        self.std.copy_(torch.where(std > 1e-6 * mean.abs().clamp_min(1.0), std, torch.ones_like(std)))
        return self

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _mlp(num_in: int, hidden: int, num_out: int) -> nn.Sequential:
    # nn.ReLU modules, not in place: Captum's DeepLift explains this network
    return nn.Sequential(nn.Linear(num_in, hidden), nn.ReLU(), nn.Linear(hidden, num_out))


def _fit_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn,
    epochs: int = 300,
    lr: float = 0.01,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> None:
    """Full-batch training of a small model (calibration sets are a few thousand rows).

    The model's layers are re-initialised from ``seed`` first, so the fit depends on the data
    and the seed alone; the caller's global random state is left as it was.
    """
    device = next(model.parameters()).device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    # only the generator the initialisation draws from is seeded (and restored after):
    # torch.manual_seed would also reseed every CUDA generator, which fork_rng(devices=[]) leaves
    with torch.random.fork_rng(devices=cuda):
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        with torch.enable_grad():
            for _ in range(epochs):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    model.zero_grad(set_to_none=True)


class Router(nn.Module):
    """Common interface. ``one_shot`` routers decide from TINY alone (``choose_tier``); staged
    routers decide at each exit (``stop_score`` compared with the knob)."""

    kind: ClassVar[str] = "router"
    one_shot: ClassVar[bool] = False
    needs_features: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("knob", torch.tensor(0.5))

    def set_knob(self, value: float) -> None:
        """Set the compute/accuracy knob (a stop-score threshold).

        Raises:
            ValueError: a value that is not a finite number (NaN would send every image to TINY
                through the one-shot gate but to HEAVY through the others).
        """
        self.knob.fill_(_finite_knob(value))

    def stop_score(self, level: ExitLevel, features: Tensor, probs: Tensor) -> Tensor:
        """``(B,)`` score in [0, 1]; the image stops at ``level`` when it is ``>= knob``."""
        raise NotImplementedError

    def choose_tier(
        self, features: Tensor, probs: Tensor, knob: float | None = None, cdf: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One-shot routers: ``(tier (B,), confidence (B,))`` from the TINY features (``cdf``:
        their ``tier_cdf`` if already computed)."""
        raise NotImplementedError

    def tier_cdf(self, features: Tensor) -> Tensor:
        """One-shot routers: ``(B, 4)`` probability that an image needs at most each tier."""
        raise NotImplementedError

    def config(self) -> dict:
        """What rebuilds this router (with its ``state_dict``)."""
        return {"kind": self.kind, "knob": float(self.knob)}


def _finite_knob(value: float) -> float:
    """``value`` as a float, refused unless it is a finite number."""
    knob = float(value)
    if not math.isfinite(knob):
        raise ValueError(f"the router's knob must be a finite number, got {value!r}")
    return knob


def _in_dtype_of(features: Tensor, model: nn.Module) -> Tensor:
    """``features`` in the dtype of ``model``'s parameters (a float64 batch for a float32 gate)."""
    dtype = next(model.parameters()).dtype
    return features if features.dtype == dtype else features.to(dtype)


class _ContinueProbability(nn.Module):
    """``(B, 1)`` stop logit -> ``(B,)`` ``1 - sigmoid(logit) = sigmoid(-logit)``, with an
    ``nn.Sigmoid`` module so that DeepLift applies its non-linear rule (exact completeness)."""

    def __init__(self) -> None:
        super().__init__()
        self.sigmoid = nn.Sigmoid()

    def forward(self, logit: Tensor) -> Tensor:
        return self.sigmoid(-logit).squeeze(1)


class OneShotGate(Router):
    """MLP over the standardised TINY features -> oracle-tier probabilities ``(B, 4)``.

    Args:
        num_features: features per image (7).
        hidden: hidden width.
    """

    kind = "gate"
    one_shot = True

    def __init__(self, num_features: int = 7, hidden: int = 32) -> None:
        super().__init__()
        self.num_features, self.hidden = num_features, hidden
        self.scale = Standardize(num_features)
        self.net = _mlp(num_features, hidden, NUM_TIERS)
        self.set_knob(0.5)

    def logits(self, features: Tensor) -> Tensor:
        """``(B, F)`` raw features (any float dtype) -> ``(B, 4)`` tier logits."""
        return self.net(self.scale(_in_dtype_of(features, self.net)))

    def logits_module(self) -> nn.Module:
        """A module ``(B, F)`` raw features -> ``(B, 4)`` tier logits (what Captum explains)."""
        return nn.Sequential(self.scale, self.net)

    def tier_probs(self, features: Tensor) -> Tensor:
        return torch.softmax(self.logits(features), dim=1)

    def tier_cdf(self, features: Tensor) -> Tensor:
        """Probability that the oracle tier is at most each tier.

        Args:
            features: ``(B, F)`` raw TINY features.

        Returns:
            ``(B, 4)`` cumulative tier probabilities, the last column exactly 1.
        """
        cum = self.tier_probs(features).cumsum(dim=1)
        cum[:, -1] = 1.0
        return cum

    def choose_tier(
        self, features: Tensor, probs: Tensor | None = None, knob: float | None = None, cdf: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The cheapest tier whose cumulative probability reaches the knob.

        Args:
            features: ``(B, F)`` raw TINY features.
            probs: unused (the gate reads the features alone).
            knob: the quantile (default: the calibrated ``knob``); higher = more compute; a
                finite number (refused otherwise, as by ``set_knob``).
            cdf: ``tier_cdf(features)`` if already computed.

        Returns:
            ``tier (B,)`` and its confidence ``(B,)``: the probability that the image needs no
            more than that tier (``cdf[:, tier]``; for any other tier, e.g. a forced one, read
            that column of ``tier_cdf``).
        """
        q = float(self.knob) if knob is None else _finite_knob(knob)
        cum = self.tier_cdf(features) if cdf is None else cdf
        tier = (cum < q).sum(dim=1).clamp_max(NUM_TIERS - 1)
        return tier, cum.gather(1, tier.view(-1, 1)).squeeze(1)

    def fit(self, features: Tensor, oracle_tier: Tensor, **kwargs) -> OneShotGate:
        """Fit on calibration features ``(N, F)`` and oracle tiers ``(N,)``."""
        self.scale.fit(features)
        _fit_classifier(self.net, self.scale(features), oracle_tier, F.cross_entropy, **kwargs)
        return self

    def config(self) -> dict:
        return {**super().config(), "num_features": self.num_features, "hidden": self.hidden}


def safe_to_stop(correct: Tensor) -> Tensor:
    """``(N, 4)`` bool correctness -> ``(N, 3)`` bool: stopping at early exit ``k`` loses
    nothing, because exit ``k`` is right or no later exit is.

    This is the staged gate's target. Unlike "exit ``k`` is right" (what a confidence cascade
    estimates), it also stops images that more compute cannot fix.
    """
    later_right = correct.flip(1).cummax(dim=1).values.flip(1)[:, 1:]  # any exit > k is right
    return correct[:, :-1] | ~later_right


class StagedGate(Router):
    """At each early exit, a small MLP on that exit's standardised features predicts
    ``P(stopping here loses nothing)`` (see ``safe_to_stop``); the image stops when it is
    ``>= knob``.

    Args:
        num_features: features per image (7).
        hidden: hidden width of each exit's model.
    """

    kind = "staged"

    def __init__(self, num_features: int = 7, hidden: int = 16) -> None:
        super().__init__()
        self.num_features, self.hidden = num_features, hidden
        early = NUM_TIERS - 1
        self.scales = nn.ModuleList(Standardize(num_features) for _ in range(early))
        self.nets = nn.ModuleList(_mlp(num_features, hidden, 1) for _ in range(early))
        self.set_knob(0.5)

    def stop_logit(self, level: ExitLevel | int, features: Tensor) -> Tensor:
        """``(B,)`` logit of "stopping at exit ``level`` loses nothing" from ``(B, F)`` raw features
        (any float dtype)."""
        net = self.nets[int(level)]
        return net(self.scales[int(level)](_in_dtype_of(features, net))).squeeze(1)

    def stop_score(self, level: ExitLevel, features: Tensor, probs: Tensor | None = None) -> Tensor:
        return torch.sigmoid(self.stop_logit(level, features))

    def continue_module(self, level: ExitLevel | int) -> nn.Module:
        """A module ``(B, F)`` raw features -> ``(B,)`` continue-probability at ``level``."""
        return nn.Sequential(self.scales[int(level)], self.nets[int(level)], _ContinueProbability())

    def fit(self, features: Tensor, correct: Tensor, **kwargs) -> StagedGate:
        """Fit on per-exit calibration features ``(N, 4, F)`` and correctness ``(N, 4)``."""
        target = safe_to_stop(correct)
        for k in range(NUM_TIERS - 1):
            self.scales[k].fit(features[:, k])
            _fit_classifier(
                self.nets[k],
                self.scales[k](features[:, k]),
                target[:, k].float().unsqueeze(1),
                F.binary_cross_entropy_with_logits,
                **kwargs,
            )
        return self

    def config(self) -> dict:
        return {**super().config(), "num_features": self.num_features, "hidden": self.hidden}


class ConfidenceCascade(Router):
    """Stop at the first exit whose max softmax probability is ``>= knob``."""

    kind = "cascade"
    needs_features = False

    def __init__(self) -> None:
        super().__init__()
        self.set_knob(0.9)

    def stop_score(self, level: ExitLevel, features: Tensor | None, probs: Tensor) -> Tensor:
        return probs.max(dim=1).values

    def fit(self, *args, **kwargs) -> ConfidenceCascade:
        return self


ROUTERS: dict[str, type[Router]] = {cls.kind: cls for cls in (OneShotGate, StagedGate, ConfidenceCascade)}


def build_router(config: dict) -> Router:
    """Rebuild a router from ``Router.config()`` (load its ``state_dict`` afterwards)."""
    config = dict(config)
    kind = config.pop("kind")
    if kind not in ROUTERS:
        raise ValueError(f"unknown router kind {kind!r}; expected one of {sorted(ROUTERS)}")
    knob = config.pop("knob", None)
    router = ROUTERS[kind](**config)
    if knob is not None:
        router.set_knob(knob)
    return router
