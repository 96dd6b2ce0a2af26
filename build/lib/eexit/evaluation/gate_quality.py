"""Quality of the gate explanations with Captum's metrics: infidelity and max-sensitivity.

* ``infidelity`` (Yeh et al. 2019): perturbations that set a random subset ``S`` of the
  features to the explanation baseline; the squared gap between ``sum_{i in S} attr_i`` and
  the gate's output change ``s(f) - s(f_S<-baseline)``, averaged (0 = the attributions predict
  every such change; lower is better).
* ``sensitivity_max``: the largest relative change of the attributions when the features move
  within ``radius`` feature standard deviations (uniform, L-infinity ball); lower is steadier.
"""

from __future__ import annotations

import torch
from captum.metrics import infidelity, sensitivity_max
from torch import Tensor, nn

from eexit.explain.gate_attribution import DEFAULT_METHOD, ExpectedTier, explain_gate
from eexit.routing.calibrate import Calibration


def gate_score_and_baseline(cal: Calibration, kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    """The explained score module, its baseline ``(7,)`` and the feature scale ``(7,)``.

    One-shot gate: expected tier against the mean features of oracle-TINY images. Staged
    gate: continue-probability at TINY against the mean TINY features of images TINY gets right.
    """
    router = cal.routers[kind]
    if kind == "gate":
        return ExpectedTier(router.logits_module()).eval(), cal.baseline_features, router.scale.std
    if kind == "staged":
        if cal.exit_baselines is None:
            raise ValueError("the calibration has no exit baselines for the staged gate")
        return router.continue_module(0).eval(), cal.exit_baselines[0], router.scales[0].std
    raise ValueError(f"{kind!r} has no feature attributions (only 'gate' and 'staged' do)")


def gate_explanation_quality(
    cal: Calibration,
    kind: str,
    features: Tensor,
    method: str = DEFAULT_METHOD,
    n_perturb_samples: int = 10,
    perturb_radius: float = 0.1,
    seed: int = 0,
) -> dict[str, float]:
    """Mean infidelity and max-sensitivity of a gate's attributions over a batch of features.

    Args:
        cal: the calibration holding the gates and baselines.
        kind: ``"gate"`` or ``"staged"``.
        features: ``(B, 7)`` TINY features.
        method: attribution method (see ``eexit.explain.gate_attribution.METHODS``).
        n_perturb_samples: perturbations per image for both metrics.
        perturb_radius: sensitivity radius in feature standard deviations.
        seed: seed of the perturbations.

    Returns:
        ``{"infidelity", "sensitivity_max", "completeness_delta_max"}``.
    """
    score, baseline, scale = gate_score_and_baseline(cal, kind)
    features = features.detach().float()
    res = explain_gate(score, features, baseline, method)
    g = torch.Generator().manual_seed(seed)

    def subset_to_baseline(inputs: Tensor, baselines: Tensor) -> tuple[Tensor, Tensor]:
        keep = torch.rand(inputs.shape, generator=g).to(inputs.device) < 0.5  # True: feature set to the baseline
        # perturbation in attribution units: attributions already carry (f - baseline)
        return keep.float(), torch.where(keep, baselines, inputs)

    def jitter(inputs: Tensor | tuple[Tensor, ...], radius: float) -> Tensor:
        x = inputs[0] if isinstance(inputs, tuple) else inputs  # Captum passes 1-tuples
        return x + (torch.rand(x.shape, generator=g).to(x.device) * 2 - 1) * radius * scale

    def explain(inputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor]:
        x = inputs[0] if isinstance(inputs, tuple) else inputs
        return (explain_gate(score, x, baseline, method).attributions,)  # a tuple, as Captum expects

    with torch.no_grad():
        infid = infidelity(
            score,
            subset_to_baseline,
            features,
            res.attributions,
            baselines=baseline.unsqueeze(0).expand_as(features),
            n_perturb_samples=n_perturb_samples,
        )
        sens = sensitivity_max(
            explain, features, perturb_func=jitter, perturb_radius=perturb_radius, n_perturb_samples=n_perturb_samples
        )
    return {
        "infidelity": float(infid.mean()),
        "sensitivity_max": float(sens.mean()),
        "completeness_delta_max": float(res.delta.max()),
    }
