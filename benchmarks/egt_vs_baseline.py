"""EGT (lambda > 0) against the plain multi-exit baseline (lambda = 0): same seed, data, model.

Trains both through ``eexit.training.train`` on the default config (Fashion-MNIST, narrow
ResNet) and prints one JSON object on its last line:
    kl_per_exit_baseline / kl_per_exit_egt   test KL(P_HEAVY || P_k) per early exit
    kl_reduction                             relative drop of the mean early-exit test KL
    acc_per_exit_baseline / acc_per_exit_egt test accuracy per exit
    step_time_ratio                          EGT training step / plain multi-exit step (same
                                             batch, same process, median of interleaved steps)
``--quick`` trains on a subset for fewer epochs (under 3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import compose_train_cfg, emit, machine

from eexit.training import build_datamodule, build_module, train
from eexit.types import ExitLevel

EARLY = [lv.key for lv in ExitLevel if lv != ExitLevel.HEAVY]


def step_times(cfgs: dict[str, object], steps: int, batch_size: int) -> dict[str, float]:
    """Median seconds per training step (forward, loss, backward, optimizer) for each config."""
    runs = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        dm = build_datamodule(cfg)
        module = build_module(cfg, dm)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
        runs[name] = (module, opt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, dm.info.in_chans, dm.info.image_size, dm.info.image_size, generator=g)
    y = torch.randint(0, dm.info.num_classes, (batch_size,), generator=g)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(steps + 3):
        for name, (module, opt) in runs.items():  # interleaved, so drift hits both alike
            t0 = time.perf_counter()
            loss_fn = module.loss_fn
            out = module.net(x, with_cams=loss_fn.needs_cams, targets=y, create_graph=loss_fn.needs_cams)
            loss = loss_fn(out.logits, y, out.cams if loss_fn.needs_cams else None).total
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="subset and fewer epochs (< 3 min)")
    parser.add_argument("--attn-weight", type=float, default=None, help="lambda of the EGT run (default: config's)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = parser.parse_args()

    # no router calibration: this benchmark compares training, not routing
    quick = ["data.limit_train=6000", "trainer.max_epochs=2", "+trainer.limit_test_batches=20"] if args.quick else []
    common = [f"seed={args.seed}", "logger=csv", "router.calibrate=false", *quick, *args.overrides]  # the user's win
    t_start = time.time()
    results, cfgs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, experiment in (("baseline", "baseline"), ("egt", "egt")):
            extra = (
                [f"model.loss.attn_weight={args.attn_weight}"] if name == "egt" and args.attn_weight is not None else []
            )
            cfg = compose_train_cfg([f"experiment={experiment}", *common, *extra], Path(tmp) / name)
            cfgs[name] = cfg
            metrics, _ = train(cfg)
            results[name] = metrics
        t_train = time.time() - t_start
        steps = step_times(cfgs, steps=10 if args.quick else 30, batch_size=cfgs["egt"].data.batch_size)

    kl = {n: {k: results[n][f"test/attn_kl/{k}"] for k in EARLY} for n in results}
    acc = {n: {lv.key: results[n][f"test/acc/{lv.key}"] for lv in ExitLevel} for n in results}
    mean_kl = {n: sum(kl[n].values()) / len(EARLY) for n in kl}
    acc_delta = {k: acc["egt"][k] - acc["baseline"][k] for k in acc["egt"]}
    emit(
        {
            "kl_per_exit_baseline": kl["baseline"],
            "kl_per_exit_egt": kl["egt"],
            "kl_reduction": 1.0 - mean_kl["egt"] / mean_kl["baseline"],
            "acc_per_exit_baseline": acc["baseline"],
            "acc_per_exit_egt": acc["egt"],
            "acc_delta_points": {k: 100 * v for k, v in acc_delta.items()},
            "step_time_ratio": steps["egt"] / steps["baseline"],
            "step_ms": {k: 1e3 * v for k, v in steps.items()},
            "attn_weight": float(cfgs["egt"].model.loss.attn_weight),
            "quick": args.quick,
            "train_seconds": t_train,
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
