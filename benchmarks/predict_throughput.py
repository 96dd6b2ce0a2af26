"""Do routing savings survive the real serving path? ``eexit predict`` images/s, routed vs always-HEAVY.

Writes N Fashion-MNIST test images as PNG files, then runs the CLI's own code path
(``eexit.cli.main(["predict", ...])``: decode, batch, route, attribute, JSON lines) on them with
the bundle's router and with ``--tier heavy`` (the router still runs, as when serving),
alternating, ``--repeats`` times each, and reports the images/s of both in their fastest run (as
the other benchmarks do: on a shared machine the slow spells are interference, not the code;
``ratio_median`` is the ratio of the medians), their ratio and
the goal ``ratio >= 0.8 / flops_ratio`` (``flops_ratio``: the bundle's routed FLOPs over
HEAVY's at its knob, from calibration). Each CLI run includes its start-up (loading and
verifying the bundle); ``serving_loop`` gives the same per-image work with the bundle loaded
once, as a server holds it, and the load's seconds. Also reported: the same ratio for the model alone on
decoded tensors (no files, no JSON), also against the plain HEAVY exit without the router
(``ratio_vs_plain_heavy``: what serving the whole network without routing would cost), the
FLOPs ratio and the accuracies realised on these images.

    python benchmarks/predict_throughput.py [--bundle DIR | --ckpt CKPT] [-n 2000] [--batch 256]

Without ``--bundle``/``--ckpt`` it exports the newest calibrated checkpoint under ``logs/train``.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, emit, machine
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")


def newest_calibrated_checkpoint() -> Path:
    found = sorted((ROOT / "logs" / "train").glob("runs/*/checkpoints/epoch_*.ckpt"), key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        meta = torch.load(path, map_location="cpu", weights_only=False).get("eexit", {})
        if "calibration" in meta:
            return path
    raise SystemExit(f"no calibrated checkpoint under {ROOT / 'logs/train'}: run train.py or pass --ckpt / --bundle")


def write_images(out: Path, n: int) -> list[int]:
    """The first ``n`` Fashion-MNIST test images as PNG files; returns their labels."""
    with gzip.open(FASHION / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16)
    with gzip.open(FASHION / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    images = images.reshape(-1, 28, 28)
    for i in range(n):
        Image.fromarray(images[i]).save(out / f"{i:05d}.png")
    return labels[:n].tolist()


def run_cli(bundle: str, folder: Path, batch: int, tier: str | None) -> tuple[float, list[dict]]:
    from eexit.cli import main

    argv = ["predict", "--bundle", bundle, str(folder), "--batch-size", str(batch), "--no-progress"]
    argv += ["--tier", tier] if tier else []
    sink = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sink):
        rc = main(argv)
    seconds = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"eexit predict failed with exit code {rc}")
    return seconds, [json.loads(line) for line in sink.getvalue().splitlines()]


def serving_loop(bundle_dir: str, folder: Path, batch: int, repeats: int) -> dict:
    """The CLI's per-image work without its start-up: with the bundle loaded once (as a server
    holds it), ``predict_rows`` (decode, batch, route, attribute) and the JSON encoding of each
    row, routed vs ``--tier heavy``, alternating; images/s in the fastest run of each, their ratio,
    and the seconds ``eexit predict`` spends loading and verifying the bundle (the median over
    ``repeats`` loads; part of each CLI run above, the same for both paths)."""
    from eexit.bundle import load_bundle
    from eexit.serve.images import expand_inputs
    from eexit.serve.predict import predict_rows

    loads = []
    for _ in range(repeats):
        start = time.perf_counter()
        bundle = load_bundle(bundle_dir)
        bundle.routed(bundle.serve_router)  # the inference copy the first batch would build
        loads.append(time.perf_counter() - start)
    paths = expand_inputs([str(folder)])
    encoder = json.JSONEncoder(allow_nan=False)
    times: dict[str, list[float]] = {"routed": [], "heavy": []}
    for r in range(repeats + 1):  # the first pass warms up
        for key, tier in (("routed", None), ("heavy", 3)):
            start = time.perf_counter()
            for row in predict_rows(bundle, paths, batch_size=batch, force_tier=tier):
                encoder.encode(row)
            if r:
                times[key].append(time.perf_counter() - start)
    ips = {k: len(paths) / min(v) for k, v in times.items()}
    return {
        "routed_images_per_s": ips["routed"],
        "heavy_images_per_s": ips["heavy"],
        "ratio": ips["routed"] / ips["heavy"],
        "bundle_load_s": statistics.median(loads),
    }


def model_only(bundle_dir: str, folder: Path, batch: int, repeats: int) -> dict:
    """Routed vs forced-HEAVY images/s of the routed classifier on decoded tensors."""
    from eexit.bundle import load_bundle
    from eexit.serve.images import load_image
    from eexit.types import ExitLevel

    bundle = load_bundle(bundle_dir)
    files = sorted(folder.iterdir())
    x = torch.stack([load_image(str(f), bundle.channels, bundle.input_size[0], bundle.mean, bundle.std) for f in files])
    model = bundle.routed()
    plain = model.net  # the same inference copy, HEAVY exit only: no TINY head, features or gate
    to_cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    runs = {
        "routed": lambda c: model(c),
        "heavy": lambda c: model(c, force_tier=3),
        "heavy_plain": lambda c: plain.predict_exit(to_cl(c), ExitLevel.HEAVY),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up pass, as the CLI and the serving loop get
            for i in range(0, len(x), batch):
                fn(x[i : i + batch])
        for _ in range(repeats):
            for key, fn in runs.items():
                start = time.perf_counter()
                for i in range(0, len(x), batch):
                    fn(x[i : i + batch])
                times[key].append(time.perf_counter() - start)
    ips = {k: len(x) / min(v) for k, v in times.items()}
    return {
        "routed_images_per_s": ips["routed"],
        "heavy_images_per_s": ips["heavy"],
        "heavy_plain_images_per_s": ips["heavy_plain"],
        "ratio": ips["routed"] / ips["heavy"],
        "ratio_vs_plain_heavy": ips["routed"] / ips["heavy_plain"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="bundle directory")
    parser.add_argument("--ckpt", help="calibrated checkpoint to export first")
    parser.add_argument("-n", "--num-images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not 1 <= args.num_images <= 10_000:
        parser.error("--num-images must be 1 or more and at most 10000 (the test images)")
    for name, value in (("--batch", args.batch), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{name} must be 1 or more")

    from eexit.bundle import export_bundle, load_bundle

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.bundle:
            bundle_dir = source = args.bundle
        else:
            ckpt = Path(args.ckpt) if args.ckpt else newest_calibrated_checkpoint()
            bundle_dir, source = str(export_bundle(ckpt, tmp / "bundle")), f"exported from {ckpt}"
        bundle = load_bundle(bundle_dir)
        folder = tmp / "images"
        folder.mkdir()
        labels = write_images(folder, args.num_images)

        run_cli(bundle_dir, folder, args.batch, None)  # warm-up (imports, allocator)
        times: dict[str, list[float]] = {"routed": [], "heavy": []}
        rows: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for key, tier in (("routed", None), ("heavy", "heavy")):
                seconds, rows[key] = run_cli(bundle_dir, folder, args.batch, tier)
                times[key].append(seconds)
        ips = {k: args.num_images / min(v) for k, v in times.items()}
        ratio = ips["routed"] / ips["heavy"]
        ratio_median = statistics.median(times["heavy"]) / statistics.median(times["routed"])
        flops_ratio = bundle.flops_ratio()
        acc = {k: float(np.mean([r["label_index"] == y for r, y in zip(rows[k], labels, strict=True)])) for k in rows}
        mflops = {k: float(np.mean([r["mflops"] for r in rows[k]])) for k in rows}
        tiers = [r["tier"] for r in rows["routed"]]
        loop = serving_loop(bundle_dir, folder, args.batch, args.repeats)
        model = model_only(bundle_dir, folder, args.batch, args.repeats)

    emit(
        {
            "benchmark": "predict_throughput",
            "bundle": source,
            "router": bundle.serve_router,
            "num_images": args.num_images,
            "batch_size": args.batch,
            "repeats": args.repeats,
            "routed_images_per_s": round(ips["routed"], 1),
            "heavy_images_per_s": round(ips["heavy"], 1),
            "ratio": round(ratio, 3),
            "ratio_median": round(ratio_median, 3),
            "flops_ratio": round(flops_ratio, 4),
            "goal_ratio": round(0.8 / flops_ratio, 3),
            "goal_met": bool(ratio >= 0.8 / flops_ratio),
            "realised_flops_ratio": round(mflops["routed"] / mflops["heavy"], 4),
            "tier_fractions": {t: round(tiers.count(t) / len(tiers), 4) for t in ("tiny", "light", "medium", "heavy")},
            "accuracy_routed": round(acc["routed"], 4),
            "accuracy_heavy": round(acc["heavy"], 4),
            "serving_loop": {k: round(v, 3) for k, v in loop.items()},
            "model_only": {k: round(v, 3) for k, v in model.items()},
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    sys.exit(main())
