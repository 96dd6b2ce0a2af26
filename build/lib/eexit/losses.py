"""Training losses: per-exit cross-entropy and the Grad-CAM attention-consistency (EGT) KL."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eexit.explain.gradcam import normalize_per_image
from eexit.types import ExitLevel


def cam_to_distribution(
    cam: Tensor, size: tuple[int, int] | None = None, eps: float = 1e-3, temperature: float | None = None
) -> Tensor:
    """Turn cams into spatial probability distributions.

    Args:
        cam: non-negative maps ``(B, h, w)``.
        size: resample to ``(H, W)`` first (bilinear); ``None`` keeps ``(h, w)``.
        eps: added to the max-normalised map before normalising, so no position has zero
            probability (``P = (cam / max + eps) / sum(cam / max + eps)``).
        temperature: if given, use ``softmax(cam / max / temperature)`` instead.

    Returns:
        ``(B, H * W)`` rows that sum to 1, in float32 at least (half-precision cams, as under
        mixed precision, are converted first: ``eps`` and the KL's log need the range).
    """
    if cam.dtype in (torch.float16, torch.bfloat16):
        cam = cam.float()
    if size is not None and tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    flat = normalize_per_image(cam).flatten(1)
    if temperature is not None:
        return torch.softmax(flat / temperature, dim=1)
    flat = flat + eps
    return flat / flat.sum(dim=1, keepdim=True)


def attention_kl(teacher: Tensor, student: Tensor) -> Tensor:
    """Per-image ``KL(teacher || student)`` of distributions ``(B, N)`` -> ``(B,)``."""
    return F.kl_div(student.clamp_min(1e-12).log(), teacher, reduction="none").sum(dim=1)


@dataclass
class LossOutput:
    """The total loss and its parts (all scalars), keyed by exit name."""

    total: Tensor
    ce: dict[str, Tensor]
    attn_kl: dict[str, Tensor]

    @property
    def ce_total(self) -> Tensor:
        """The per-exit cross-entropies summed, unweighted (``total`` weighs them by ``w_k``)."""
        return torch.stack(list(self.ce.values())).sum()

    @property
    def attn_kl_mean(self) -> Tensor:
        """The mean KL over the consistency exits (``total`` adds ``lambda`` times their sum)."""
        if not self.attn_kl:
            return self.total.new_zeros(())
        return torch.stack(list(self.attn_kl.values())).mean()


class MultiExitLoss(nn.Module):
    """``sum_k w_k CE(logits_k, y) + lambda * sum_{k < HEAVY} KL(P_HEAVY.detach() || P_k)``.

    Args:
        exit_weights: cross-entropy weight per exit name (missing exits weigh 1).
        attn_weight: ``lambda``; 0 is the plain multi-exit baseline.
        consistency_exits: the early exits that get the KL term (default: all but HEAVY).
        cam_size: common ``(H, W)`` for the distributions (one int: square); ``None`` uses the
            largest cam's size.
        eps: see ``cam_to_distribution``.
        temperature: see ``cam_to_distribution``.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        exit_weights: Mapping[str, float] | None = None,
        attn_weight: float = 1.0,
        consistency_exits: Sequence[str] | None = None,
        cam_size: int | Sequence[int] | None = None,
        eps: float = 1e-3,
        temperature: float | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        weights = {level.key: 1.0 for level in ExitLevel}
        for name, w in (exit_weights or {}).items():
            level = ExitLevel.parse(name)
            if w < 0:
                raise ValueError(f"exit weight for {level.key} must be >= 0, got {w}")
            weights[level.key] = float(w)
        if attn_weight < 0:
            raise ValueError(f"attn_weight (lambda) must be >= 0, got {attn_weight}")
        students = consistency_exits if consistency_exits is not None else [lv.key for lv in ExitLevel][:-1]
        self.students = [ExitLevel.parse(s) for s in students]
        if ExitLevel.HEAVY in self.students:
            raise ValueError("HEAVY is the teacher and cannot be a consistency exit")
        self.exit_weights = weights
        self.attn_weight = float(attn_weight)
        if isinstance(cam_size, int):
            cam_size = (cam_size, cam_size)
        self.cam_size = tuple(cam_size) if cam_size is not None else None
        if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0 (or None for eps smoothing), got {temperature}")
        if not (math.isfinite(eps) and (eps > 0 or (temperature is not None and eps >= 0))):
            # eps = 0 turns an all-zero cam (common at initialisation) into 0 / 0 = NaN
            raise ValueError(f"eps must be > 0 (an all-zero cam would be 0 / 0), got {eps}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.eps = eps
        self.temperature = temperature
        self.label_smoothing = label_smoothing

    @property
    def settings(self) -> dict:
        """The loss's settings under their config names (``model.loss.<name>``), plain values."""
        return {
            "exit_weights": dict(self.exit_weights),
            "attn_weight": self.attn_weight,
            "consistency_exits": [s.key for s in self.students],
            "cam_size": None if self.cam_size is None else list(self.cam_size),
            "eps": float(self.eps),
            "temperature": None if self.temperature is None else float(self.temperature),
            "label_smoothing": float(self.label_smoothing),
        }

    @property
    def needs_cams(self) -> bool:
        return self.attn_weight > 0

    def consistency(self, cams: Sequence[Tensor]) -> dict[str, Tensor]:
        """Per-image KL of every student exit against the detached HEAVY cam.

        Args:
            cams: four maps ``(B, h_k, w_k)``, cheapest first.

        Returns:
            ``{exit name: (B,)}`` for each consistency exit.
        """
        size = self.cam_size or max((tuple(c.shape[-2:]) for c in cams), key=lambda s: s[0] * s[1])
        teacher = cam_to_distribution(cams[ExitLevel.HEAVY].detach(), size, self.eps, self.temperature)
        return {
            s.key: attention_kl(teacher, cam_to_distribution(cams[s], size, self.eps, self.temperature))
            for s in self.students
        }

    def forward(self, logits: Sequence[Tensor], target: Tensor, cams: Sequence[Tensor] | None = None) -> LossOutput:
        """Total loss for a batch.

        Args:
            logits: four ``(B, K)`` tensors.
            target: labels ``(B,)``.
            cams: four ``(B, h_k, w_k)`` cams for the labels (required when ``attn_weight > 0``).
        """
        ce = {
            level.key: F.cross_entropy(logits[level], target, label_smoothing=self.label_smoothing)
            for level in ExitLevel
        }
        total = sum(self.exit_weights[k] * v for k, v in ce.items())
        kl: dict[str, Tensor] = {}
        if cams is not None:
            kl = {k: v.mean() for k, v in self.consistency(cams).items()}
            if self.attn_weight > 0:
                total = total + self.attn_weight * sum(kl.values())
        elif self.attn_weight > 0:
            raise ValueError("attn_weight > 0 needs the cams of every exit")
        return LossOutput(total, ce, kl)
