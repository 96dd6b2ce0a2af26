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

import functools
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
    """Population std of the ``grid x grid`` region means of ``Mn`` ``(B, N)`` -> ``(B,)`` in [0, 0.5].

    The region means are those of ``adaptive_avg_pool2d(Mn, grid)`` (bins
    ``[floor(i n / g), ceil((i + 1) n / g))``), computed as one ``(B, N) @ (N, grid**2)`` product
    with a cached pooling matrix: several times faster than the pooling op on small maps, equal
    up to float rounding, and exportable to ONNX whether or not the grid divides the map.
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    pool = _pool_matrix(int(h), int(w), grid, mn.dtype, mn.device)
    regions = mn @ pool
    # population std written out: 3x faster than Tensor.std on a (B, 16) tensor on CPU
    return (regions - regions.mean(dim=1, keepdim=True)).square_().mean(dim=1).sqrt_()


def _bins(n: int, grid: int) -> list[list[float]]:
    """``(grid, n)`` rows averaging adaptive pooling's bins ``[floor(i n / g), ceil((i + 1) n / g))``."""
    rows = []
    for i in range(grid):
        lo, hi = (i * n) // grid, -(-((i + 1) * n) // grid)
        rows.append([1.0 / (hi - lo) if lo <= j < hi else 0.0 for j in range(n)])
    return rows


@functools.lru_cache(maxsize=32)
def _pool_matrix(h: int, w: int, grid: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(h * w, grid**2)``: ``flat_map @ matrix`` gives the ``grid x grid`` region means in
    row-major order (built from Python numbers, so an ONNX trace records it as a constant)."""
    ph, pw = torch.tensor(_bins(h, grid), dtype=torch.float64), torch.tensor(_bins(w, grid), dtype=torch.float64)
    # region (i, j) weight of position (y, x) = ph[i, y] * pw[j, x]
    return torch.einsum("iy,jx->yxij", ph, pw).reshape(h * w, grid * grid).to(dtype=dtype, device=device)


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
    interior pixel, computed separably (``[1, 2, 1]`` smoothing across, shifted difference along;
    several times faster than a ``conv2d`` on CPU, same values); the feature is the fraction of
    those pixels whose gradient magnitude exceeds ``threshold`` (compared squared, no sqrt, and
    in unscaled units: ``|8 g|^2 > 64 t^2`` is exact because 64 is a power of two).

    Args:
        image: ``(B, C, H, W)`` image normalised to roughly zero mean / unit std per channel.
            Images smaller than 3 x 3 are replicate-padded.
        threshold: magnitude threshold in normalised units per pixel (see the module docstring).

    Returns:
        ``(B,)`` float32 in [0, 1]: 0 for a constant image, 1 for a checkerboard of 2 x 2 squares
        with a step above the threshold. (A one-pixel checkerboard gives 0: Sobel compares the
        pixels on either side of each one, which are alike there.)
    """
    if image.dim() != 4:
        raise ValueError(f"expected an image of shape (B, C, H, W), got {tuple(image.shape)}")
    x = image if image.dtype in (torch.float32, torch.float64) else image.float()
    if x.shape[-2] < 3 or x.shape[-1] < 3:
        pad_h, pad_w = max(0, 3 - x.shape[-2]), max(0, 3 - x.shape[-1])
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), mode="replicate")
    m = x.mean(dim=1) if x.shape[1] > 1 else x[:, 0]
    # few passes, results written in place: on CPU these maps are small and each op's cost is
    # mostly its memory traffic and allocation
    across = torch.add(m[:, :-2], m[:, 2:]).add_(m[:, 1:-1], alpha=2)  # (B, H-2, W) smoothed in y
    gx = across[:, :, 2:] - across[:, :, :-2]  # (B, H-2, W-2), 8 x the x response
    along = torch.add(m[:, :, :-2], m[:, :, 2:]).add_(m[:, :, 1:-1], alpha=2)  # (B, H, W-2) in x
    gy = along[:, 2:] - along[:, :-2]
    mag2 = gx.mul_(gx).addcmul_(gy, gy).flatten(1)
    n = mag2.shape[1]
    # 1[mag2 > 64 t^2] = clamp(sign(mag2 - 64 t^2), min=0), in place: about 2x faster than a
    # comparison to bool and a bool sum on CPU
    return mag2.sub_(64.0 * threshold * threshold).sign_().clamp_min_(0.0).sum(dim=1).float().div_(n)


@torch.no_grad()
def confidence_margin(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 softmax probability.

    Args:
        logits: ``(B, K)``.

    Returns:
        ``(B,)`` float32 in [0, 1]: near 1 for a confident exit, 0 for a tie (1 when ``K = 1``).
    """
    return _margin(torch.softmax(logits.float(), dim=1))


def _margin(probs: Tensor) -> Tensor:
    """Top-1 minus top-2 of ``(B, K)`` probabilities -> ``(B,)`` float32 (1 when ``K = 1``)."""
    probs = probs.float()
    if probs.shape[1] < 2:
        return probs.new_ones(probs.shape[0])
    top = probs.topk(2, dim=1).values
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
    return 1.0 - _nonzero_count(flat).float() / max(flat.shape[1], 1)


_BLOCK_WORDS = 127
"""Words of four 0/1 bytes summed per block by ``_nonzero_count``: each byte lane of a block sum
stays <= 127, so no carry crosses lanes and the int32 sum cannot overflow."""


@functools.lru_cache(maxsize=64)
def _block_size(words: int) -> int:
    """The largest divisor of ``words`` that is at most ``_BLOCK_WORDS``."""
    return max(d for d in range(1, min(words, _BLOCK_WORDS) + 1) if words % d == 0)


def _nonzero_count(flat: Tensor) -> Tensor:
    """Exact number of nonzero entries per row of ``(B, L)`` -> ``(B,)`` int64.

    ``count_nonzero`` and a bool sum are slow on CPU (the sum of a 0/1 map costs 3-4 times the
    map's conversion to bool). Here the 0/1 bytes of ``flat.bool()`` are read as int32 words of
    four byte lanes and summed in int32 over blocks of at most ``_BLOCK_WORDS`` words (each lane
    then holds its count, < 128, without carries); the lanes of the block sums are read back as
    bytes and added. Exact; about 3x faster than a sign-and-sum over float32 on the 2-core CPU.
    """
    nonzero = flat.bool()
    b, n = nonzero.shape
    if torch.onnx.is_in_onnx_export() or b == 0 or n % 4 or not nonzero.is_contiguous() or nonzero.storage_offset() % 4:
        return nonzero.sum(dim=1)
    words = n // 4
    block = _block_size(words)
    lanes = nonzero.view(torch.uint8).view(torch.int32).view(b, words // block, block)
    return lanes.sum(dim=2, dtype=torch.int32).view(torch.uint8).view(b, -1).sum(dim=1)


@torch.no_grad()
def complexity_features(
    image: Tensor | None,
    stage_map: Tensor,
    cam: Tensor,
    logits: Tensor,
    logit_grad: Tensor,
    *,
    grid: int = GRID,
    edge_threshold: float = EDGE_THRESHOLD,
    saliency_threshold: float = SALIENCY_THRESHOLD,
    probs: Tensor | None = None,
    spatial: Tensor | None = None,
) -> Tensor:
    """All seven features of one exit in one pass, in ``FEATURE_NAMES`` order.

    The peak-normalised cam is computed once and shared by the three cam features.

    Args:
        image: the input images ``(B, C, H, W)`` (normalised), or ``None`` with ``spatial``.
        stage_map: the stage output the exit reads ``(B, C_k, h_k, w_k)`` (post-ReLU).
        cam: the exit's Grad-CAM for its predicted class ``(B, h, w)``.
        logits: the exit's logits ``(B, K)``.
        logit_grad: ``dy_c/dz`` at the exit head ``(B, C)``.
        grid: regions per side of ``feature_variance``.
        edge_threshold: Sobel magnitude threshold of ``spatial_complexity``.
        saliency_threshold: relative threshold of ``saliency_sparsity``.
        probs: ``softmax(logits)`` ``(B, K)`` when the caller has it already (not recomputed).
        spatial: ``spatial_complexity(image, edge_threshold)`` ``(B,)`` when the caller has it
            already (it depends on the image alone, so later exits reuse TINY's); ``image`` is
            then not read and may be ``None``.

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
            spatial_complexity(image, edge_threshold) if spatial is None else spatial.float(),
            confidence_margin(logits) if probs is None else _margin(probs),
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
