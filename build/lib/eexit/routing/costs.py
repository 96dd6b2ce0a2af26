"""Per-tier cost of the routed path, router included: FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` on the real routed code, and latency measured with
``torch.utils.benchmark`` on this machine."""

from __future__ import annotations

import itertools
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from eexit.models.inference import fused_conv_geometry
from eexit.routing.engine import RoutedClassifier
from eexit.routing.routers import NUM_TIERS
from eexit.types import ExitLevel

COST_KEYS = ("mflops", "latency_ms")
"""The ``TierCost`` fields a knob can minimise (``router.cost``)."""


@dataclass
class TierCost:
    """Cost of sending one image to a tier (the whole path: stages, heads, router).

    Attributes:
        exit: the tier's exit name.
        mflops: FLOPs per image / 1e6 (multiply-add = 2 FLOPs).
        latency_ms: milliseconds per image in a batch of ``batch_size`` on ``device``, with
            ``num_threads`` torch threads.
        num_threads: torch's intra-op threads while timing (costs stored before this field was
            recorded were timed on one thread).
        latency_basis: ``"forced"``: timed with every image of the batch forced to this tier
            (each stage on the full batch); ``"routed"``: rescaled to the router's own mixed
            batches, where later stages run on sub-batches (``rescale_to_routed_batch``).
    """

    exit: str
    mflops: float
    latency_ms: float
    batch_size: int
    device: str
    num_threads: int = 1
    latency_basis: str = "forced"

    def to_dict(self) -> dict:
        return asdict(self)


def count_flops(fn, *args, **kwargs) -> int:
    """Total FLOPs of one call, counted by ``FlopCounterMode``."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def valid_taps(size: int, out: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Pairs (output position, kernel tap) of one spatial dimension of a convolution whose input
    position lies inside the map, not on its zero padding.

    ``FlopCounterMode`` counts ``out * kernel`` pairs per dimension; a 3x3 convolution with padding
    1 on a 4 x 4 map has 10 of 12 valid pairs per dimension, so 100 of the 144 counted
    multiply-adds per channel pair read the map (the rest multiply padding zeros).
    """
    return sum(1 for o in range(out) for k in range(kernel) if 0 <= o * stride - padding + k * dilation < size)


def _conv_flops_without_padding(x_shape, w_shape, out_shape, stride, padding, dilation) -> int:
    """``2 * multiply-adds`` of a (non-transposed) convolution whose input is not zero padding."""
    c_out, c_in_per_group, *kernel = w_shape
    spatial = math.prod(
        valid_taps(size, out, k, s, p, d)
        for size, out, k, s, p, d in zip(x_shape[2:], out_shape[2:], kernel, stride, padding, dilation, strict=True)
    )
    return 2 * x_shape[0] * c_out * c_in_per_group * spatial


def _aten_conv_without_padding(
    x_shape, w_shape, _bias, stride, padding, dilation, transposed, *args, out_shape=None, **kwargs
) -> int:
    if transposed or isinstance(padding, str):
        return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=transposed)
    return _conv_flops_without_padding(x_shape, w_shape, out_shape, stride, padding, dilation)


def _fused_conv_without_padding(x_shape, second, third, *args, out_shape=None, **kwargs) -> int:
    w_shape, padding, stride, dilation = fused_conv_geometry(second, third, *args)
    return _conv_flops_without_padding(x_shape, w_shape, out_shape, stride, padding, dilation)


def count_flops_without_padding(fn, *args, **kwargs) -> int:
    """``count_flops``, except that a convolution's multiply-adds on its zero padding are not
    counted (see ``valid_taps``).

    A diagnostic beside the standard count, which is what every cost of this package reports:
    oneDNN's direct convolutions skip the taps that fall on padding, so on small maps (HEAVY's
    last stage runs on 4 x 4 maps in the default Fashion-MNIST model, where 31% of the counted
    multiply-adds are padding) time follows this count more closely than the standard one.
    """
    mapping = {torch.ops.aten.convolution: _aten_conv_without_padding}
    pointwise = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    if pointwise is not None:
        mapping[pointwise] = _fused_conv_without_padding
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def measure_latency(fn, min_run_time: float = 0.5, num_threads: int | None = None) -> float:
    """Median seconds of ``fn()`` (``torch.utils.benchmark``).

    Args:
        fn: the call to time.
        min_run_time: seconds of timing at least.
        num_threads: torch threads while timing (default: ``torch.get_num_threads()``, as the
            model is served; ``benchmark.Timer`` alone would time on one thread).
    """
    # imported here: torch.utils.benchmark pulls in cpp_extension (setuptools), which loading a
    # bundle and serving never need; its import-time notice "No CUDA runtime is found, using
    # CUDA_HOME=..." is about building C++ extensions, which timing never does: silenced
    if "torch.utils.cpp_extension" not in sys.modules:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    threads = torch.get_num_threads() if num_threads is None else num_threads
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


TIMING_ROUNDS = 3
"""Interleaved rounds of ``measure_latencies``: a burst of load on the machine (another job, a
test run) lasting a whole timing window inflated one tier's latency tenfold in one calibration
(cascade MEDIUM 0.96 ms per image, its HEAVY 0.64); timed in rounds, it has to last through
every round of that call to count."""


def measure_latencies(
    fns: Sequence[Callable[[], object]], min_run_time: float = 0.5, rounds: int = TIMING_ROUNDS
) -> list[float]:
    """Seconds of each call: ``rounds`` interleaved rounds (every call timed once per round, for
    ``min_run_time / rounds`` seconds, by ``measure_latency``); the fastest round's median counts.

    Args:
        fns: the calls to time.
        min_run_time: seconds of timing per call, over all rounds.
        rounds: timing rounds (1: one median per call, as ``measure_latency``).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    best = [math.inf] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], measure_latency(fn, min_run_time / rounds))
    return best


@torch.no_grad()
def measure_tier_costs(
    model: RoutedClassifier, example: Tensor, min_run_time: float = 0.5, rounds: int = TIMING_ROUNDS
) -> list[TierCost]:
    """FLOPs and latency per image of each tier, forcing every image of ``example`` there.

    Args:
        model: the routed classifier (its router is part of the measured path).
        example: a batch ``(B, C, H, W)`` like the data to serve.
        min_run_time: seconds of timing per tier.
        rounds: interleaved timing rounds (``measure_latencies``).
    """
    model.eval()
    b = example.shape[0]
    flops = [count_flops(model, example[:1], force_tier=int(level)) for level in ExitLevel]
    seconds = measure_latencies(
        [lambda level=level: model(example, force_tier=int(level)) for level in ExitLevel], min_run_time, rounds
    )
    costs = [
        TierCost(level.key, f / 1e6, 1e3 * t / b, b, str(example.device), torch.get_num_threads())
        for level, f, t in zip(ExitLevel, flops, seconds, strict=True)
    ]
    assert len(costs) == NUM_TIERS
    return _monotone_latencies(costs)


def _monotone_latencies(costs: list[TierCost]) -> list[TierCost]:
    """Each tier's latency at least the one before it: a tier runs every stage of the cheaper
    ones and more, so a smaller figure is timing noise (a busy machine measured TINY at 3.7 ms
    and LIGHT at 0.03 ms per image), which would make later tiers look cheaper, and their
    rescaled latencies negative."""
    if all(a.latency_ms <= b.latency_ms for a, b in itertools.pairwise(costs)):
        return costs
    floor, out = 0.0, []
    for c in costs:
        floor = max(floor, c.latency_ms)
        out.append(c if c.latency_ms >= floor else replace(c, latency_ms=floor))
    return out


MAX_RESCALE = 4.0
"""Bound of ``rescale_to_routed_batch``'s factor (either way): beyond it the timing is noise."""


@torch.no_grad()
def rescale_to_routed_batch(
    model: RoutedClassifier,
    example: Tensor,
    costs: list[TierCost],
    min_run_time: float = 0.5,
    rounds: int = TIMING_ROUNDS,
) -> list[TierCost]:
    """Tier latencies that add up to the time of the router's own mixed batch.

    ``measure_tier_costs`` forces every image of a batch to one tier, so each stage runs on the
    full batch; routed, the stages past TINY run on the sub-batches that reach them, at a higher
    cost per image (and the regrouping costs too): summed over a routed batch, the forced
    latencies came out 17-24% below its measured time (Fashion-MNIST, gate, 2-core CPU). Here
    the batch is routed as served (the router's knob must be set), timed, and the part of each
    tier's latency past TINY (``latency_t - latency_TINY``; TINY's path runs on the whole batch
    either way) is scaled by the one factor that makes the batch's per-image latencies add up
    to that time. FLOPs are unchanged.

    Args:
        model: the routed classifier, its knob fitted.
        example: the batch ``(B, C, H, W)`` the costs were measured on.
        costs: ``measure_tier_costs(model, example)``.
        min_run_time: seconds of timing.
        rounds: timing rounds of the routed batch (``measure_latencies``; one call, so they run
            back to back).

    Returns:
        The four costs with ``latency_basis="routed"``, latencies non-decreasing with the tier
        (a latency below a cheaper tier's is raised to it first); where no image of ``example``
        goes past TINY there is nothing to rescale: the costs as given (so raised, if needed).
    """
    costs = _monotone_latencies(costs)  # so that every tier's part past TINY is >= 0
    tiers = model(example).tier.tolist()
    base = costs[0].latency_ms
    past_tiny = sum(costs[t].latency_ms - base for t in tiers)
    if past_tiny <= 0:
        return costs
    (seconds,) = measure_latencies([lambda: model(example)], min_run_time, rounds)
    batch_ms = 1e3 * seconds
    factor = min(max((batch_ms - base * len(tiers)) / past_tiny, 1.0 / MAX_RESCALE), MAX_RESCALE)
    return [
        replace(c, latency_ms=base + factor * (c.latency_ms - base) if i else c.latency_ms, latency_basis="routed")
        for i, c in enumerate(costs)
    ]


def measure_routed_tier_costs(model: RoutedClassifier, example: Tensor, min_run_time: float = 0.5) -> list[TierCost]:
    """``measure_tier_costs`` then ``rescale_to_routed_batch``: the costs of a router whose knob
    is already fitted, as calibration stores them."""
    forced = measure_tier_costs(model, example, min_run_time)
    return rescale_to_routed_batch(model, example, forced, min_run_time)
