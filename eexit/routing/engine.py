"""Batched routed inference: stages run once per image on shrinking sub-batches.

S1 runs for the whole batch, S2 only for the images routed past TINY, S3 only for those past
LIGHT, and so on; every image gets the logits of exactly the exit that decided, in input order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eexit.explain.gradcam import cam_from_gradient
from eexit.models.heads import HeadOutput
from eexit.models.net import MultiExitNet
from eexit.routing.features import complexity_features
from eexit.routing.routers import NUM_TIERS, Router
from eexit.types import ExitLevel


@dataclass
class RoutedOutput:
    """One routed batch, in input order.

    Attributes:
        logits: ``(B, K)`` logits of the exit each image stopped at.
        tier: ``(B,)`` that exit (0 = TINY ... 3 = HEAVY).
        confidence: ``(B,)`` the router's probability for its decision.
        features: ``(B, 7)`` the features the deciding router step saw (TINY's for the one-shot
            gate, the deciding exit's for the staged gate; zeros for the cascade).
        decided_at: ``(B,)`` the exit where the decision was taken (TINY for the one-shot gate).
        heatmap: ``(B, H, W)`` Grad-CAM of the deciding exit, upsampled to the input size, or
            ``None``.
    """

    logits: Tensor
    tier: Tensor
    confidence: Tensor
    features: Tensor
    decided_at: Tensor
    heatmap: Tensor | None = None

    @property
    def probs(self) -> Tensor:
        return torch.softmax(self.logits, dim=1)


def exit_features(
    image: Tensor, stage_map: Tensor, out: HeadOutput, head: nn.Module, **kwargs
) -> tuple[Tensor, Tensor]:
    """The seven complexity features of one exit for its predicted class, and its cam.

    Returns:
        features ``(B, 7)`` and cam ``(B, h, w)``.
    """
    grad = head.logit_gradient(out, None)
    cam = cam_from_gradient(out.attention, grad)
    return complexity_features(image, stage_map, cam, out.logits, grad, **kwargs), cam


class RoutedClassifier(nn.Module):
    """A multi-exit network and a router, run stage by stage.

    Args:
        net: the trained network.
        router: any ``Router``.
        feature_kwargs: keyword arguments of ``complexity_features`` (grid, edge threshold).
    """

    def __init__(self, net: MultiExitNet, router: Router, feature_kwargs: dict | None = None) -> None:
        super().__init__()
        self.net = net
        self.router = router
        self.feature_kwargs = dict(feature_kwargs or {})

    @torch.no_grad()
    def forward(self, x: Tensor, force_tier: int | None = None, with_heatmap: bool = False) -> RoutedOutput:
        """Route a batch ``(B, C, H, W)``.

        Args:
            x: images.
            force_tier: send every image to this tier (the router still runs, so its cost is
                counted; used to measure each tier's cost).
            with_heatmap: also return the deciding exit's cam, upsampled to ``(H, W)``.
        """
        net, router = self.net, self.router
        b = x.shape[0]
        num_classes = net.num_classes
        logits = x.new_zeros(b, num_classes)
        tier = torch.full((b,), NUM_TIERS - 1, dtype=torch.long, device=x.device)
        confidence = x.new_ones(b)
        features = x.new_zeros(b, 7)
        decided_at = torch.zeros(b, dtype=torch.long, device=x.device)
        heatmap = x.new_zeros(b, *x.shape[-2:]) if with_heatmap else None

        active = torch.arange(b, device=x.device)  # images still running, as indices into the batch
        planned: Tensor | None = None  # one-shot: the tier chosen at TINY, for the active images
        last_score: Tensor | None = None
        h = net.backbone.forward_stem(x)
        for level in ExitLevel:
            k = int(level)
            h = net.backbone.forward_stage(k, h)
            head = net.heads[k]
            out = head.forward_parts(h)
            probs = torch.softmax(out.logits, dim=1)
            image = x[active]
            need_feats = router.needs_features and k < NUM_TIERS - 1 and (k == 0 or not router.one_shot)
            cam = None
            if need_feats:
                f, cam = exit_features(image, h, out, head, **self.feature_kwargs)
            if k == NUM_TIERS - 1:
                stop = torch.ones(len(active), dtype=torch.bool, device=x.device)
                conf_here = 1.0 - last_score if last_score is not None and not router.one_shot else None
            elif router.one_shot:
                if k == 0:
                    planned, plan_conf = router.choose_tier(f, probs)
                    if force_tier is not None:
                        planned = torch.full_like(planned, force_tier)
                    features[active] = f
                    confidence[active] = plan_conf
                stop = planned == k
                conf_here = None
            else:
                score = router.stop_score(level, f if need_feats else None, probs)
                stop = (
                    score >= router.knob
                    if force_tier is None
                    else torch.full_like(score, force_tier == k, dtype=torch.bool)
                )
                conf_here = score
                if need_feats:
                    features[active] = f
                    decided_at[active] = k
                last_score = score
            idx = active[stop]
            logits[idx] = out.logits[stop]
            tier[idx] = k
            if conf_here is not None:
                confidence[idx] = conf_here[stop]
            if with_heatmap:
                if cam is None:
                    grad = head.logit_gradient(out, None)
                    cam = cam_from_gradient(out.attention, grad)
                up = torch.nn.functional.interpolate(
                    cam[stop].unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False
                )
                heatmap[idx] = up.squeeze(1)
            keep = ~stop
            if not keep.any():
                break
            active, h = active[keep], h[keep]
            if planned is not None:
                planned = planned[keep]
            if last_score is not None:
                last_score = last_score[keep]
        return RoutedOutput(logits, tier, confidence, features, decided_at, heatmap)
