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
from eexit.models.inference import inference_copy, without_autocast
from eexit.models.net import MultiExitNet
from eexit.routing.features import FEATURE_NAMES, complexity_features
from eexit.routing.routers import NUM_TIERS, Router
from eexit.types import ExitLevel


@dataclass
class RoutedOutput:
    """One routed batch, in input order.

    Attributes:
        logits: ``(B, K)`` logits of the exit each image stopped at.
        tier: ``(B,)`` that exit (0 = TINY ... 3 = HEAVY).
        confidence: ``(B,)`` float32, the router's probability for the tier in ``tier``: for its own
            decision, or under ``force_tier`` for the forced exit (one-shot gate: the probability
            that the image needs no more than that exit; staged gate and cascade: the stop score
            there, the staged gate's sigmoid or the exit's top softmax probability; at HEAVY, one
            minus MEDIUM's stop score); 0 where that score is NaN (logits that overflowed).
        features: ``(B, 7)`` float32, the features the deciding router step saw (TINY's for the one-shot
            gate, the deciding exit's for the staged gate; zeros for the cascade).
        decided_at: ``(B,)`` the exit where the decision was taken (TINY for the one-shot gate;
            for the staged gate and the cascade the exit where the stop rule fired, MEDIUM for an
            image sent on to HEAVY). Under ``force_tier`` the staged gate's and the cascade's
            ``decided_at`` (and the staged gate's ``features``) are those of the exit where its own
            stop rule fired, else of the last exit it passed.
        heatmap: ``(B, H, W)`` Grad-CAM of the deciding exit, upsampled to the input size, or
            ``None``.
        router_tier: ``(B,)`` under ``force_tier``, the exit the router itself would have chosen,
            ``-1`` where the forced exit came before the router's stop rule fired (the staged
            gate and the cascade decide exit by exit, so their choice past the forced exit is
            unknown); ``None`` when nothing was forced (the router's choice is ``tier``).

    An image with a NaN or infinite pixel is not run at all (the fused kernels of the inference
    copy would turn its NaN into confident logits): its logits are NaN, its tier is HEAVY (the
    forced tier under ``force_tier``, with ``router_tier`` -1), its confidence, features,
    ``decided_at`` and heatmap are 0; the other images of the batch are routed as without it.
    """

    logits: Tensor
    tier: Tensor
    confidence: Tensor
    features: Tensor
    decided_at: Tensor
    heatmap: Tensor | None = None
    router_tier: Tensor | None = None

    @property
    def forced(self) -> bool:
        """Whether the tiers were forced (``force_tier``) rather than chosen by the router."""
        return self.router_tier is not None

    @property
    def probs(self) -> Tensor:
        return torch.softmax(self.logits, dim=1)


def exit_features(
    image: Tensor | None,
    stage_map: Tensor,
    out: HeadOutput,
    head: nn.Module,
    probs: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """The seven complexity features of one exit for its predicted class, and its cam.

    Args:
        image: ``(B, C, H, W)`` the input images (``None`` when ``spatial`` is given).
        stage_map: ``(B, C_k, h_k, w_k)`` the stage output the exit reads.
        out: the exit head's output.
        head: the exit head.
        probs: ``softmax(out.logits)`` ``(B, K)`` if already computed.
        **kwargs: keyword arguments of ``complexity_features`` (``spatial``, thresholds).

    Returns:
        features ``(B, 7)`` and cam ``(B, h, w)``.
    """
    grad = head.logit_gradient(out, None)  # for the predicted class
    cam = cam_from_gradient(out.attention, grad)
    return complexity_features(image, stage_map, cam, out.logits, grad, probs=probs, **kwargs), cam


_SPATIAL = FEATURE_NAMES.index("spatial_complexity")

DEFAULT_CHUNK_SIZE = 256
"""Images per stage call. A stage runs on the images that reached it, regrouped across the
input batch and cut into chunks of at most this size, so that a large batch keeps its
activations bounded and the later stages get full chunks instead of small remnants of each
input batch. (On the 2-core CPU, chunks of 128 and 256 and whole batches of 1024 timed within
the machine's run-to-run noise of about 20%.)"""


@torch.no_grad()
def predict_exit_chunked(
    net: MultiExitNet, x: Tensor, level: ExitLevel | int, chunk_size: int | None = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """Logits ``(B, K)`` of one fixed exit, run in chunks of ``chunk_size`` images: the batch
    layout of routed inference, so that fixed exits and routers are timed alike."""
    if chunk_size is None or len(x) <= chunk_size:
        return net.predict_exit(x, level)
    return torch.cat([net.predict_exit(c, level) for c in x.split(chunk_size)])


class RoutedClassifier(nn.Module):
    """A multi-exit network and a router, run stage by stage.

    Each stage runs once per image that reaches it: on the images still active, in chunks of at
    most ``chunk_size``; the images that go on are regrouped before the next stage.

    Args:
        net: the trained network.
        router: any ``Router``.
        feature_kwargs: keyword arguments of ``complexity_features`` (grid, edge threshold).
        chunk_size: images per stage call (``None``: the whole batch at once).
        optimize: run an inference copy of ``net`` (``eexit.models.inference.inference_copy``:
            BatchNorm folded, channels-last) instead of ``net`` itself: the serving path, where
            time follows FLOPs; same decisions up to float rounding.
        input_size: ``(H, W)`` the images must have (the size the router was calibrated at), or
            ``None`` to accept any size.

    ``forward`` refuses, with a message naming the problem, a network in training mode (BatchNorm
    would use each chunk's statistics) and what is not a ``(B, C, H, W)`` floating-point batch
    with the network's channel count (and ``input_size``, if given); it casts the images to the
    network's dtype and device.
    """

    def __init__(
        self,
        net: MultiExitNet,
        router: Router,
        feature_kwargs: dict | None = None,
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        optimize: bool = False,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (or None), got {chunk_size}")
        first_conv = next((m for m in net.backbone.stem.modules() if isinstance(m, nn.Conv2d)), None)
        self.in_chans: int | None = None if first_conv is None else first_conv.in_channels
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        self.net = inference_copy(net) if optimize else net
        self.router = router
        self.feature_kwargs = dict(feature_kwargs or {})
        self.chunk_size = chunk_size
        self.optimized = optimize

    @torch.no_grad()
    def forward(self, x: Tensor, force_tier: int | None = None, with_heatmap: bool = False) -> RoutedOutput:
        """Route a batch ``(B, C, H, W)``.

        Args:
            x: images.
            force_tier: send every image to this tier (the router still runs, so its cost is
                counted; used to measure each tier's cost).
            with_heatmap: also return the deciding exit's cam, upsampled to ``(H, W)``.
        """
        if force_tier is not None:  # 7 or -1 would silently mean HEAVY (or fail deep in indexing)
            force_tier = int(ExitLevel.parse(force_tier))
        if self.net.training:
            raise ValueError(
                "the network is in training mode: its BatchNorm layers would normalise each chunk with that "
                "chunk's own statistics (answers would depend on the batch) and update their running "
                "statistics; call .eval() on the network (or on this RoutedClassifier) first"
            )
        x = self._checked(x)
        with without_autocast(x.device):
            return self._finite_route(x, force_tier, with_heatmap)

    def _finite_route(self, x: Tensor, force_tier: int | None, with_heatmap: bool) -> RoutedOutput:
        """``forward`` on a checked batch: images with a NaN or an infinity set apart."""
        # one reduction over the batch: a NaN or an infinity anywhere makes the sum non-finite
        # (a finite sum that overflows only costs the exact check below)
        if not bool(torch.isfinite(x.sum())):
            finite = torch.isfinite(x.flatten(1)).all(dim=1)
            if not bool(finite.all()):
                return self._without_non_finite(x, finite, force_tier, with_heatmap)
        return self._route(x, force_tier, with_heatmap)

    def _route(self, x: Tensor, force_tier: int | None, with_heatmap: bool) -> RoutedOutput:
        """``forward`` on a checked batch of finite images."""
        if self.optimized:
            x = x.contiguous(memory_format=torch.channels_last)
        b = x.shape[0]
        result = RoutedOutput(
            logits=x.new_zeros(b, self.net.num_classes),
            tier=torch.full((b,), NUM_TIERS - 1, dtype=torch.long, device=x.device),
            # float32 whatever the network's dtype: the features and the router are float32
            confidence=torch.ones(b, dtype=torch.float32, device=x.device),
            features=torch.zeros(b, len(FEATURE_NAMES), dtype=torch.float32, device=x.device),
            decided_at=torch.zeros(b, dtype=torch.long, device=x.device),
            heatmap=x.new_zeros(b, *x.shape[-2:]) if with_heatmap else None,
            router_tier=None if force_tier is None else torch.full((b,), -1, dtype=torch.long, device=x.device),
        )
        # the active images (indices into the batch), their input to the next stage and the
        # router's state for them (one-shot: the planned tier; staged: the last stop score)
        active, h, carry = torch.arange(b, device=x.device), x, None
        for level in ExitLevel:
            chunk = self.chunk_size or max(len(active), 1)
            kept = [
                self._step(
                    level, x, h[i : i + chunk], active[i : i + chunk], _part(carry, i, chunk), force_tier, result
                )
                for i in range(0, len(active), chunk)
            ]
            kept = [k for k in kept if len(k[1])]
            if not kept:
                break
            if len(kept) == 1:  # one chunk: nothing to regroup (and no copy)
                h, active, carry = kept[0]
            else:
                h = torch.cat([k[0] for k in kept])
                active = torch.cat([k[1] for k in kept])
                carry = None if kept[0][2] is None else torch.cat([k[2] for k in kept])
        result.confidence.nan_to_num_(nan=0.0)  # finite pixels large enough to overflow the logits
        return result

    def _checked(self, x: Tensor) -> Tensor:
        """``x`` on the network's device and dtype, after checking that it is a batch of images
        this network and router can take (see the class docstring)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a tensor of images (B, C, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            hint = " (one image: add the batch dimension, x.unsqueeze(0))" if x.dim() == 3 else ""
            raise ValueError(f"expected images of shape (B, C, H, W), got shape {tuple(x.shape)}{hint}")
        if self.in_chans is not None and x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images with {self.in_chans} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            h, w = self.input_size
            raise ValueError(
                f"expected images of {h}x{w} pixels (the size the router was calibrated at), got "
                f"{x.shape[-2]}x{x.shape[-1]}: resize them first"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"expected normalised floating-point images, got {x.dtype} (convert to float and "
                "normalise with the data's mean and std first)"
            )
        weight = next(self.net.parameters())
        return x.to(device=weight.device, dtype=weight.dtype)

    def _without_non_finite(
        self, x: Tensor, finite: Tensor, force_tier: int | None, with_heatmap: bool
    ) -> RoutedOutput:
        """Route the images of ``x`` whose ``finite`` is set; the others get the output of an
        image that is not run (see ``RoutedOutput``)."""
        b, dev = x.shape[0], x.device
        rows = finite.nonzero().squeeze(1)
        tier = NUM_TIERS - 1 if force_tier is None else force_tier
        result = RoutedOutput(
            logits=x.new_full((b, self.net.num_classes), float("nan")),
            tier=torch.full((b,), tier, dtype=torch.long, device=dev),
            confidence=torch.zeros(b, dtype=torch.float32, device=dev),
            features=torch.zeros(b, len(FEATURE_NAMES), dtype=torch.float32, device=dev),
            decided_at=torch.zeros(b, dtype=torch.long, device=dev),
            heatmap=x.new_zeros(b, *x.shape[-2:]) if with_heatmap else None,
            router_tier=None if force_tier is None else torch.full((b,), -1, dtype=torch.long, device=dev),
        )
        if len(rows):
            part = self._route(x[rows], force_tier, with_heatmap)
            for name in ("logits", "tier", "confidence", "features", "decided_at", "heatmap", "router_tier"):
                target = getattr(result, name)
                if target is not None:
                    target[rows] = getattr(part, name)
        return result

    def _step(
        self,
        level: ExitLevel,
        x: Tensor,
        h: Tensor,
        idx: Tensor,
        carry: Tensor | None,
        force_tier: int | None,
        result: RoutedOutput,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One stage (and exit) for one chunk of active images; writes the images that stop here
        into ``result``.

        Args:
            level: the stage / exit.
            x: the whole input batch (its size sets the heatmaps'; TINY reads its own chunk).
            h: ``(n, ...)`` the chunk's input to this stage (the images themselves for TINY).
            idx: ``(n,)`` the chunk's positions in the batch.
            carry: ``(n,)`` the router's state for the chunk (planned tier or last stop score).

        Returns:
            The stage map, positions and router state of the images that go on.
        """
        net, router = self.net, self.router
        k = int(level)
        last = k == NUM_TIERS - 1
        image = h if k == 0 else None  # TINY's chunk of images is a slice of x (no gather)
        if k == 0:
            h = net.backbone.forward_stem(h)
        h = net.backbone.forward_stage(k, h)
        head = net.heads[k]
        cam = None
        conf_here = None
        if router.one_shot and k > 0:
            # the tier was planned at TINY: only the images stopping here need this exit's head
            stop = None if last else carry == k
            stop_i = _positions(stop)
            out = head.forward_parts(_take(h, stop_i))
            stopped_logits = out.logits
        else:
            out = head.forward_parts(h)
            probs = torch.softmax(out.logits.float(), dim=1)  # float32: the router's stop scores and confidences
            need_feats = router.needs_features and not last
            if need_feats:
                # spatial complexity depends on the image alone: later exits reuse TINY's value
                spatial = None if k == 0 else result.features[idx, _SPATIAL]
                f, cam = exit_features(image, h, out, head, probs, spatial=spatial, **self.feature_kwargs)
            if last:
                stop = None
                conf_here = None if carry is None else 1.0 - carry
                if result.router_tier is not None and not router.one_shot:
                    own = result.router_tier[idx]  # -1: no stop rule fired before HEAVY
                    result.router_tier[idx] = torch.where(own < 0, k, own)
            elif router.one_shot:  # TINY: plan the tier of every image
                if force_tier is None:
                    carry, plan_conf = router.choose_tier(f, probs)
                else:  # the router's own plan, and its probability that the forced tier is enough
                    cdf = router.tier_cdf(f)
                    own, _ = router.choose_tier(f, probs, cdf=cdf)
                    result.router_tier[idx] = own
                    carry = torch.full_like(own, force_tier)
                    plan_conf = cdf[:, force_tier]
                result.features[idx] = f
                result.confidence[idx] = plan_conf
                stop = carry == k
            else:
                carry = router.stop_score(level, f if need_feats else None, probs)
                fires = carry >= router.knob
                deciding = None  # the images whose decision this exit explains (None: all)
                if force_tier is None:
                    stop = fires
                else:
                    stop = torch.full_like(fires, force_tier == k)
                    # the router's own choice: the first exit reached where its stop rule fires;
                    # features and decided_at stay those of that exit (what explains the choice)
                    own = result.router_tier[idx]
                    undecided = own < 0
                    deciding = _positions(undecided)
                    result.router_tier[idx] = torch.where(fires & undecided, k, own)
                conf_here = carry
                rows = _take(idx, deciding)
                result.decided_at[rows] = k  # the cascade's too: it reads no features, but decides here
                if need_feats:
                    result.features[rows] = _take(f, deciding)
            stop_i = _positions(stop)
            stopped_logits = _take(out.logits, stop_i)
            if result.heatmap is not None:
                hidden = None if out.hidden is None else _take(out.hidden, stop_i)
                out = HeadOutput(_take(out.attention, stop_i), _take(out.pooled, stop_i), stopped_logits, hidden)
                cam = None if cam is None else _take(cam, stop_i)
        sel = _take(idx, stop_i)
        result.logits[sel] = stopped_logits
        result.tier[sel] = k
        if conf_here is not None:
            result.confidence[sel] = _take(conf_here, stop_i)
        if result.heatmap is not None and len(sel):
            if cam is None:
                cam = cam_from_gradient(out.attention, head.logit_gradient(out, None))
            up = torch.nn.functional.interpolate(
                cam.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False
            )
            result.heatmap[sel] = up.squeeze(1)
        if stop is None:  # HEAVY: every image stops
            return h[:0], idx[:0], None if carry is None else carry[:0]
        keep_i = _positions(~stop)
        return h[keep_i], idx[keep_i], None if carry is None else carry[keep_i]


def _positions(mask: Tensor | None) -> Tensor | None:
    """Row indices of a ``(n,)`` bool mask (``None``: all rows). Indexing with them once per
    mask instead of with the mask itself spares a ``nonzero`` per indexed tensor; the rows of a
    channels-last map keep that layout."""
    return None if mask is None else mask.nonzero().squeeze(1)


def _take(t: Tensor, rows: Tensor | None) -> Tensor:
    """``t[rows]`` (``rows=None``: ``t`` itself, no copy)."""
    return t if rows is None else t[rows]


def _part(carry: Tensor | None, start: int, size: int) -> Tensor | None:
    return None if carry is None else carry[start : start + size]
