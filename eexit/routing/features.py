"""The seven routing complexity features, batched, from tensors an exit already computed.

All features come from the exit's forward pass and its hook-free Grad-CAM (see
``eexit.explain.gradcam``): no backward pass through the backbone, no hooks, no Python loop over
the batch. Notation: ``M`` is the exit's cam ``(B, h, w)`` for its predicted class,
``N = h * w`` its number of positions, ``Mn = M / max M`` the peak-normalised cam (computed once
and shared by the three cam features in ``complexity_features``) and ``P = M / sum M``.

| index | feature | range | meaning |
|---|---|---|---|
| 0 | attention_entropy | [0, 1] | 0 one focused position .. 1 attention spread evenly |
| 1 | saliency_sparsity | [1/N, 1] | fraction of positions with ``M >= 0.5 max M`` (small = compact) |
| 2 | gradient_magnitude | [0, inf) | ``||dy_c/dz||_2`` at the head (how hard the features drive y_c) |
| 3 | feature_variance | [0, 0.5] | std of the g x g region means of ``Mn`` (0 = even, high = one region) |
| 4 | spatial_complexity | [0, 1] | edge density of the input (fraction of Sobel magnitudes > threshold) |
| 5 | confidence_margin | [0, 1] | top-1 minus top-2 softmax probability |
| 6 | activation_sparsity | [0, 1] | fraction of exactly-zero (post-ReLU) activations of the stage map |

Conventions:
    * An all-zero cam (Grad-CAM's ReLU removed everything) carries no spatial information and is
      treated as a flat (uniform) cam: entropy 1, saliency sparsity 1, feature variance 0.
    * A single-position cam (``N = 1``) has entropy 0.
    * ``gradient_magnitude`` is unbounded and depends on the head's weight scale; routers must
      standardise it (they standardise every feature).
    * ``spatial_complexity`` expects images normalised to roughly zero mean / unit std per
      channel (as the data modules do). The Sobel kernel is scaled by 1/8, so the magnitude is the
      intensity change per pixel in those units (a linear ramp of slope ``s`` gives ``s``; a step
      of height ``s`` gives ``s / 2`` on the two pixels beside it). The default threshold
      ``EDGE_THRESHOLD = 0.25`` counts a pixel as an edge where the channel-mean image changes by
      more than a quarter of a dataset standard deviation per pixel (about 16 grey levels per
      pixel on CIFAR-10, 22 on Fashion-MNIST). Only interior pixels are counted (a ``valid``
      convolution), so image borders never create edges.
    * Everything is computed in float32 whatever the input dtype, under ``torch.no_grad`` (the
      features are decision inputs: the results carry no gradient); devices follow the inputs;
      ``complexity_features`` replaces any NaN by 0 and +-Inf by the largest finite float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

FEATURE_NAMES: tuple[str, ...] = (
    "attention_entropy",
    "saliency_sparsity",
    "gradient_magnitude",
    "feature_variance",
    "spatial_complexity",
    "confidence_margin",
    "activation_sparsity",
)
NUM_FEATURES = len(FEATURE_NAMES)

SALIENCY_THRESHOLD = 0.5
"""Relative threshold of ``saliency_sparsity``: positions with ``M >= 0.5 * max M`` count."""
GRID = 4
"""Default grid of ``feature_variance``: region means over a 4 x 4 partition of the cam."""
EDGE_THRESHOLD = 0.25
"""Default Sobel magnitude threshold of ``spatial_complexity``, in normalised units per pixel."""


def _normalised_cam(cam: Tensor) -> Tensor:
    """``(B, h, w)`` cam -> ``(B, N)`` float32 ``M / max M`` in [0, 1]; all-zero maps become ones."""
    if cam.dim() != 3:
        raise ValueError(f"expected a cam of shape (B, h, w), got {tuple(cam.shape)}")
    flat = cam.flatten(1).float()
    peak = flat.amax(dim=1, keepdim=True)
    alive = peak > 0
    return torch.where(alive, flat / torch.where(alive, peak, torch.ones_like(peak)), torch.ones_like(flat))


def _entropy(mn: Tensor) -> Tensor:
    """Normalised entropy of ``P = Mn / sum Mn`` from ``(B, N)`` ``Mn`` -> ``(B,)`` in [0, 1].

    Uses ``-sum P log P = log S - sum(Mn log Mn) / S`` with ``S = sum Mn >= 1`` (the peak is 1),
    so ``P`` itself is never materialised; ``0 log 0 = 0``.
    """
    n = mn.shape[1]
    s = mn.sum(dim=1)
    if n < 2:
        return torch.zeros_like(s)
    # sum Mn log Mn with 0 log 0 = 0 (clamp: log of a tiny positive times 0 is 0); in place: fast
    h = s.log() - mn.clamp_min(1e-30).log_().mul_(mn).sum(dim=1) / s
    return (h / math.log(n)).clamp_(0.0, 1.0)


def _sparsity(mn: Tensor, rel_threshold: float) -> Tensor:
    """Fraction of ``(B, N)`` positions with ``Mn >= rel_threshold`` -> ``(B,)``."""
    # 1[Mn >= t] = clamp(sign(Mn - t) + 1, max=1): arithmetic is ~2.5x faster than a bool
    # comparison plus a cast on CPU
    return (mn - rel_threshold).sign_().add_(1.0).clamp_max_(1.0).mean(dim=1)


def _region_spread(mn: Tensor, h: int, w: int, grid: int) -> Tensor:
    """Population std of the ``grid x grid`` region means of ``Mn`` ``(B, N)`` -> ``(B,)`` in [0, 0.5]."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if torch.onnx.is_in_onnx_export():
        # ONNX cannot export adaptive pooling whose grid does not divide the map: the same
        # region means as separable pooling matrices (equal up to float rounding)
        ph, pw = _pool_matrix(h, grid, mn), _pool_matrix(w, grid, mn)
        regions = torch.einsum("ih,bhw,jw->bij", ph, mn.view(-1, h, w), pw).flatten(1)
    else:
        regions = F.adaptive_avg_pool2d(mn.view(-1, 1, h, w), grid).flatten(1)
    return regions.std(dim=1, correction=0)


def _pool_matrix(n: int, grid: int, like: Tensor) -> Tensor:
    """``(grid, n)`` rows averaging adaptive pooling's bins ``[floor(i n / g), ceil((i + 1) n / g))``
    (built from Python numbers, so an ONNX trace records it as a constant)."""
    n = int(n)
    rows = []
    for i in range(grid):
        lo, hi = (i * n) // grid, -(-((i + 1) * n) // grid)
        rows.append([1.0 / (hi - lo) if lo <= j < hi else 0.0 for j in range(n)])
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


@torch.no_grad()
def attention_entropy(cam: Tensor) -> Tensor:
    """Normalised entropy of the cam seen as a distribution over positions.

    ``-sum P log P / log N`` with ``P = M / sum M``.

    Args:
        cam: non-negative Grad-CAM ``(B, h, w)``.

    Returns:
        ``(B,)`` float32 in [0, 1]: 0 for one focused position, 1 for an even spread (and for an
        all-zero cam, treated as flat); 0 when ``N = 1``.
    """
    return _entropy(_normalised_cam(cam))


@torch.no_grad()
def saliency_sparsity(cam: Tensor, rel_threshold: float = SALIENCY_THRESHOLD) -> Tensor:
    """Fraction of positions whose saliency is at least ``rel_threshold`` times the peak.

    Args:
        cam: non-negative Grad-CAM ``(B, h, w)``.
        rel_threshold: relative threshold in (0, 1].

    Returns:
        ``(B,)`` float32 in [1/N, 1]: 1/N for a single hot spot, 1 for a flat (or all-zero) cam.
    """
    return _sparsity(_normalised_cam(cam), rel_threshold)


@torch.no_grad()
def gradient_magnitude(logit_grad: Tensor) -> Tensor:
    """L2 norm of the target logit's gradient with respect to the head's pooled vector.

    Args:
        logit_grad: ``dy_c/dz`` ``(B, C)`` (``ExitHead.logit_gradient``).

    Returns:
        ``(B,)`` float32 >= 0, unbounded: its scale follows the head's weights, so it is only
        comparable within one trained network (routers standardise it). For a linear head it is
        ``||W[c]||``, a per-class constant.
    """
    return torch.linalg.vector_norm(logit_grad.flatten(1).float(), dim=1)


@torch.no_grad()
def feature_variance(cam: Tensor, grid: int = GRID) -> Tensor:
    """Spread of the cam's mass across a coarse ``grid x grid`` partition of the image.

    The cam is peak-normalised (``M / max M``), averaged over each region with
    ``adaptive_avg_pool2d`` and the population standard deviation of the ``grid**2`` region means
    is returned.

    Args:
        cam: non-negative Grad-CAM ``(B, h, w)``.
        grid: regions per side (cams smaller than the grid are replicated by the pooling).

    Returns:
        ``(B,)`` float32 in [0, 0.5]: 0 for a flat (or all-zero) cam; large when the salient
        mass sits in few regions (one fully saturated region of 16 gives ``sqrt(15) / 16``).
    """
    h, w = cam.shape[-2:]
    return _region_spread(_normalised_cam(cam), h, w, grid)


@torch.no_grad()
def spatial_complexity(image: Tensor, threshold: float = EDGE_THRESHOLD) -> Tensor:
    """Edge density of the input image.

    The x and y Sobel responses (kernels scaled by 1/8) of the channel-mean image at every
    interior pixel, computed separably with shifted differences and ``[1, 2, 1]`` smoothing (about
    3x faster than a ``conv2d`` on CPU, same values); the feature is the fraction of those pixels
    whose gradient magnitude exceeds ``threshold`` (compared squared, no sqrt).

    Args:
        image: ``(B, C, H, W)`` image normalised to roughly zero mean / unit std per channel.
            Images smaller than 3 x 3 are replicate-padded.
        threshold: magnitude threshold in normalised units per pixel (see the module docstring).

    Returns:
        ``(B,)`` float32 in [0, 1]: 0 for a constant image, near 1 for a fine checkerboard.
    """
    if image.dim() != 4:
        raise ValueError(f"expected an image of shape (B, C, H, W), got {tuple(image.shape)}")
    x = image if image.dtype in (torch.float32, torch.float64) else image.float()
    if x.shape[-2] < 3 or x.shape[-1] < 3:
        pad_h, pad_w = max(0, 3 - x.shape[-2]), max(0, 3 - x.shape[-1])
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), mode="replicate")
    m = x.mean(dim=1) if x.shape[1] > 1 else x[:, 0]
    dx = m[:, :, 2:] - m[:, :, :-2]
    dy = m[:, 2:, :] - m[:, :-2, :]
    gx = dx[:, :-2] + 2 * dx[:, 1:-1] + dx[:, 2:]
    gy = dy[:, :, :-2] + 2 * dy[:, :, 1:-1] + dy[:, :, 2:]
    mag2 = (gx.square() + gy.square()) * (1.0 / 64.0)
    # 1[mag2 > t^2] = clamp(sign(mag2 - t^2), min=0), faster than a bool comparison on CPU
    return (mag2 - threshold * threshold).sign_().clamp_min_(0.0).flatten(1).float().mean(dim=1)


@torch.no_grad()
def confidence_margin(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 softmax probability.

    Args:
        logits: ``(B, K)``.

    Returns:
        ``(B,)`` float32 in [0, 1]: near 1 for a confident exit, 0 for a tie (1 when ``K = 1``).
    """
    logits = logits.float()
    if logits.shape[1] < 2:
        return logits.new_ones(logits.shape[0])
    top = torch.softmax(logits, dim=1).topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


@torch.no_grad()
def activation_sparsity(stage_map: Tensor) -> Tensor:
    """Fraction of exactly-zero activations of a (post-ReLU) stage map.

    Args:
        stage_map: ``(B, C, h, w)`` (any shape with the batch first).

    Returns:
        ``(B,)`` float32 in [0, 1].
    """
    if (
        stage_map.dim() == 4
        and not stage_map.is_contiguous()
        and stage_map.is_contiguous(memory_format=torch.channels_last)
    ):
        stage_map = stage_map.permute(0, 2, 3, 1)  # a view: each image's values stay one dense run
    flat = stage_map.flatten(1)
    # |sign(x)| is 1 for nonzero x and 0 for +-0; summing it is ~6x faster than count_nonzero
    # or a bool comparison on CPU. Exact in float32 for up to 2**24 activations per image.
    nonzero = flat.float().sign().abs_().sum(dim=1)
    return 1.0 - nonzero / max(flat.shape[1], 1)


@torch.no_grad()
def complexity_features(
    image: Tensor,
    stage_map: Tensor,
    cam: Tensor,
    logits: Tensor,
    logit_grad: Tensor,
    *,
    grid: int = GRID,
    edge_threshold: float = EDGE_THRESHOLD,
    saliency_threshold: float = SALIENCY_THRESHOLD,
) -> Tensor:
    """All seven features of one exit in one pass, in ``FEATURE_NAMES`` order.

    The peak-normalised cam is computed once and shared by the three cam features.

    Args:
        image: the input images ``(B, C, H, W)`` (normalised).
        stage_map: the stage output the exit reads ``(B, C_k, h_k, w_k)`` (post-ReLU).
        cam: the exit's Grad-CAM for its predicted class ``(B, h, w)``.
        logits: the exit's logits ``(B, K)``.
        logit_grad: ``dy_c/dz`` at the exit head ``(B, C)``.
        grid: regions per side of ``feature_variance``.
        edge_threshold: Sobel magnitude threshold of ``spatial_complexity``.
        saliency_threshold: relative threshold of ``saliency_sparsity``.

    Returns:
        ``(B, 7)`` float32 on the inputs' device, finite (NaN -> 0, +-Inf -> +-float32 max).
    """
    mn = _normalised_cam(cam)
    h, w = cam.shape[-2:]
    feats = torch.stack(
        [
            _entropy(mn),
            _sparsity(mn, saliency_threshold),
            gradient_magnitude(logit_grad),
            _region_spread(mn, h, w, grid),
            spatial_complexity(image, edge_threshold),
            confidence_margin(logits),
            activation_sparsity(stage_map),
        ],
        dim=1,
    )
    return torch.nan_to_num(feats, nan=0.0)


__all__ = [
    "EDGE_THRESHOLD",
    "FEATURE_NAMES",
    "GRID",
    "NUM_FEATURES",
    "SALIENCY_THRESHOLD",
    "activation_sparsity",
    "attention_entropy",
    "complexity_features",
    "confidence_margin",
    "feature_variance",
    "gradient_magnitude",
    "saliency_sparsity",
    "spatial_complexity",
]
