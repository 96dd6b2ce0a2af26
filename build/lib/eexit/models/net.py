"""The multi-exit network: a backbone whose four stages each feed an exit head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from eexit.explain.gradcam import gradcam
from eexit.models.backbone import ResNetBackbone
from eexit.models.heads import CamTarget, ExitHead, HeadOutput, class_indices
from eexit.types import ExitLevel, MultiExitOutput


class MultiExitNet(nn.Module):
    """Backbone plus one ``ExitHead`` per stage (TINY after stage 1 ... HEAVY after stage 4).

    Args:
        backbone: a four-stage backbone with ``forward_features`` and ``feature_info``.
        heads: one head per stage, cheapest first.
        spec: the keyword arguments that rebuild this network with ``create_model`` (kept for
            export).
    """

    def __init__(self, backbone: ResNetBackbone, heads: Sequence[ExitHead], spec: dict | None = None) -> None:
        super().__init__()
        if len(heads) != len(ExitLevel):
            raise ValueError(f"expected {len(ExitLevel)} heads, got {len(heads)}")
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        self.spec = dict(spec or {})

    @property
    def num_classes(self) -> int:
        return self.heads[0].num_classes

    @property
    def min_input_size(self) -> int:
        return self.backbone.min_input_size

    def cam_layer(self, level: ExitLevel | int) -> nn.Module:
        """The module whose output Grad-CAM explains for an exit (for Captum's LayerGradCam)."""
        return self.heads[int(level)].attention

    def forward_heads(self, x: Tensor) -> list[HeadOutput]:
        """``(B, C, H, W)`` -> every exit's attention, pooled vector and logits."""
        feats = self.backbone.forward_features(x)
        return [head.forward_parts(f) for head, f in zip(self.heads, feats, strict=True)]

    def forward(
        self, x: Tensor, with_cams: bool = False, targets: CamTarget = None, create_graph: bool = False
    ) -> MultiExitOutput:
        """Run every exit once; optionally add every exit's Grad-CAM from the same pass.

        Args:
            x: images ``(B, C, H, W)``.
            with_cams: also return the cams.
            targets: class per image ``(B,)`` for all exits (or one class for all images),
                ``None`` for each exit's own prediction, or a callable on logits (see
                ``eexit.explain.gradcam``).
            create_graph: keep the cams differentiable (training).

        Returns:
            logits ``[(B, K)] * 4`` and, with ``with_cams``, cams ``[(B, h_k, w_k)] * 4``.
        """
        outs = self.forward_heads(x)
        logits = [o.logits for o in outs]
        if not with_cams:
            return MultiExitOutput(logits)
        if targets is not None and (isinstance(targets, Tensor) or not callable(targets)):
            targets = class_indices(targets, logits[0])  # (B,) int64: what the output records
        cams = [gradcam(head, o, targets, create_graph) for head, o in zip(self.heads, outs, strict=True)]
        return MultiExitOutput(logits, cams, targets if isinstance(targets, Tensor) else None)

    @torch.no_grad()
    def predict_exit(self, x: Tensor, level: ExitLevel | int) -> Tensor:
        """Logits ``(B, K)`` of one exit (an ``ExitLevel``, its index 0-3 or its name), running
        only the stages it needs.

        Raises:
            ValueError: ``level`` names no exit (-1 would silently run no stage at all).
        """
        level = int(ExitLevel.parse(level))
        h = self.backbone.forward_stem(x)
        for i in range(level + 1):
            h = self.backbone.forward_stage(i, h)
        return self.heads[level](h)
