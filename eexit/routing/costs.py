"""Per-tier cost of the routed path, router included: FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` on the real routed code, and latency measured with
``torch.utils.benchmark`` on this machine."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from eexit.routing.engine import RoutedClassifier
from eexit.routing.routers import NUM_TIERS
from eexit.types import ExitLevel


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
    """

    exit: str
    mflops: float
    latency_ms: float
    batch_size: int
    device: str
    num_threads: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def count_flops(fn, *args, **kwargs) -> int:
    """Total FLOPs of one call, counted by ``FlopCounterMode``."""
    with FlopCounterMode(display=False) as counter:
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
    threads = torch.get_num_threads() if num_threads is None else num_threads
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


@torch.no_grad()
def measure_tier_costs(model: RoutedClassifier, example: Tensor, min_run_time: float = 0.5) -> list[TierCost]:
    """FLOPs and latency per image of each tier, forcing every image of ``example`` there.

    Args:
        model: the routed classifier (its router is part of the measured path).
        example: a batch ``(B, C, H, W)`` like the data to serve.
        min_run_time: seconds of timing per tier.
    """
    model.eval()
    costs = []
    b = example.shape[0]
    for level in ExitLevel:
        flops = count_flops(model, example[:1], force_tier=int(level))
        seconds = measure_latency(lambda level=level: model(example, force_tier=int(level)), min_run_time)
        costs.append(
            TierCost(level.key, flops / 1e6, 1e3 * seconds / b, b, str(example.device), torch.get_num_threads())
        )
    assert len(costs) == NUM_TIERS
    return costs
