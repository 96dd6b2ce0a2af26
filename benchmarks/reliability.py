"""Resume and DDP figures: ``python benchmarks/reliability.py [--skip-ddp] [--skip-resume]``.

Resume: an uninterrupted run (A) against a run SIGKILLed in the middle of epoch 1 and resumed
with ``ckpt_path=last`` (B); max abs difference of the final weights and of the final val/test
metrics, and the wall time of each process. DDP: 2 CPU processes (gloo, batch 16 each) against
one process (batch 32) on the same global batches; max abs difference of the final val/test
metrics and the wall times. All runs: synthetic data, micro model, 3 epochs, ``train.py`` as a
subprocess (process start included in the times). Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import ROOT, emit, machine

COMMON = [
    "data=synthetic",
    "model=micro",
    "experiment=egt",
    "logger=csv",
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "seed=11",
    "callbacks.last_checkpoint.every_n_train_steps=5",
    "router.latency_min_run_time=0.01",
    "router.latency_batch=16",
]
KILL = ["+callbacks.kill._target_=tests.test_resume.KillAtStep", "+callbacks.kill.step=17"]
DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=16"]


def run(log_dir: Path, name: str, extra: list[str]) -> tuple[int, float]:
    """Run ``train.py``; return its exit code and wall time (s)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            *COMMON,
            f"paths.log_dir={log_dir}",
            f"hydra.run.dir={log_dir}/train/runs/{name}",
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    took = time.perf_counter() - start
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(proc.stderr[-3000:])
    return proc.returncode, took


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged val/test values of a run's CSV log."""
    (path,) = run_dir.glob("csv/*/metrics.csv")
    last: dict[str, float] = {}
    for row in csv.DictReader(path.open()):
        last.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return {k: v for k, v in last.items() if k.startswith(("val/", "test/"))}


def metric_diffs(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: abs(a[k] - b[k]) for k in sorted(a.keys() & b.keys())}


def weight_diff(a: Path, b: Path) -> float:
    sa, sb = (torch.load(p, weights_only=False)["state_dict"] for p in (a, b))
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def bench_resume(tmp: Path) -> dict:
    _, t_a = run(tmp / "a", "a", [])
    rc, t_killed = run(tmp / "b", "killed", KILL)
    assert rc == -signal.SIGKILL, rc
    _, t_resumed = run(tmp / "b", "resumed", ["ckpt_path=last"])
    diffs = metric_diffs(final_metrics(tmp / "a/train/runs/a"), final_metrics(tmp / "b/train/runs/resumed"))
    return {
        "max_abs_weight_diff": weight_diff(
            tmp / "a/train/runs/a/checkpoints/last.ckpt", tmp / "b/train/runs/killed/checkpoints/last.ckpt"
        ),
        "max_abs_metric_diff": max(diffs.values()),
        "metrics_compared": len(diffs),
        "wall_s": {"uninterrupted": t_a, "killed_at_step_17": t_killed, "resumed": t_resumed},
    }


def bench_ddp(tmp: Path) -> dict:
    _, t_single = run(tmp / "single", "single", ["data.batch_size=32"])
    _, t_ddp = run(tmp / "ddp", "ddp", DDP)
    diffs = metric_diffs(final_metrics(tmp / "single/train/runs/single"), final_metrics(tmp / "ddp/train/runs/ddp"))
    return {
        "metric_abs_diff": diffs,
        "max_abs_metric_diff": max(diffs.values()),
        "wall_s": {"single_batch32": t_single, "ddp_2x16": t_ddp},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--skip-resume", action="store_true")
    args = parser.parse_args()
    result: dict = {"benchmark": "reliability", "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_resume:
            result["resume"] = bench_resume(Path(tmp) / "resume")
        if not args.skip_ddp:
            result["ddp"] = bench_ddp(Path(tmp) / "ddp")
    emit(result)


if __name__ == "__main__":
    main()
