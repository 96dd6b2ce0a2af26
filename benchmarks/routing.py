"""Routing benchmark: train (or load) a model, calibrate the three routers on the calibration
split, and measure them on the test split against always-HEAVY, in one process.

Prints one JSON object on its last line with acc_heavy; per router (gate, staged, cascade)
acc, flops_ratio (mean routed FLOPs / HEAVY's, router included), wall_speedup (routed batched
inference vs always-HEAVY on the same test set, in calls of the first ``--serve-batch`` size,
by default ``--batch``; ``wall_speedup_by_batch``: for each size) and tier distribution;
flops_ratio_oracle, overhead_time_ratio (features + gate time / HEAVY time, in the engine's
flow: the TINY path with them minus without them; ``overhead_time_ratio_isolated``: features
and gate alone on stored maps), routing_accuracy (one-shot tier == oracle tier), latency_error
(one-shot expected vs measured latency; ``latency_error_remeasured``: with the tier latencies
measured again right after the wall-clock timing, so that the machine's drift since calibration
does not count) and explain_ms_per_decision per attribution method;
``part_throughput``: FLOPs, time and GFLOP/s of the stem, each stage and each head (where the
wall clock departs from FLOPs); ``flops_ratio_without_padding`` per router and
``mflops_per_exit_without_padding``: the same costs without the multiply-adds on zero padding,
which oneDNN skips (``count_flops_without_padding``; a diagnostic of why time departs from the
standard count, which every goal uses); and ``curves``: each router's accuracy vs FLOPs-ratio trade-off
on the test split (its knob swept; the fixed exits and the oracle as points). ``--plot FILE.png``
also draws them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import compose_train_cfg, emit, machine
from omegaconf import open_dict

from eexit.checkpoint import load_checkpoint
from eexit.config import ConfigError
from eexit.evaluation.pipeline import check_data_matches
from eexit.explain.gate_attribution import METHODS, ExpectedTier, explain_gate
from eexit.models.inference import inference_copy
from eexit.routing.calibrate import calibrate, calibration_settings
from eexit.routing.calibration import collect_records, evaluate_tiers, oracle_tiers, sweep
from eexit.routing.costs import count_flops, count_flops_without_padding, measure_routed_tier_costs
from eexit.routing.engine import DEFAULT_CHUNK_SIZE, exit_features, predict_exit_chunked
from eexit.training import build_datamodule, train
from eexit.types import ExitLevel

DATA_OVERRIDES = {
    "fashion_mnist": [],
    "cifar10": ["data=cifar10", "data.num_workers=2"],
}


def batches(loader, limit: int | None = None):
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        yield x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATA_OVERRIDES), default="fashion_mnist")
    parser.add_argument("--quick", action="store_true", help="short training and subsets (< 5 min)")
    parser.add_argument("--ckpt", help="use this trained checkpoint instead of training")
    parser.add_argument("--batch", type=int, default=256, help="data loader batch size (and first served batch)")
    parser.add_argument(
        "--serve-batch",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes (images per routed call) to time; default: --batch and 1024",
    )
    parser.add_argument("--plot", help="write the trade-off curves to this PNG")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the fastest counts)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for training")
    args = parser.parse_args()
    torch.manual_seed(0)

    quick = ["data.limit_train=8000", "trainer.max_epochs=2"] if args.quick else []
    overrides = ["logger=csv", *DATA_OVERRIDES[args.data], *quick, *args.overrides]  # the user's last: they win
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_train_cfg(overrides, Path(tmp))
        with open_dict(cfg):
            cfg.data.batch_size = args.batch
        if args.ckpt:
            loaded = load_checkpoint(args.ckpt)
            net = loaded.net
            dm = build_datamodule(cfg)
            try:  # a checkpoint of another data set: refused here, not deep in the first forward
                check_data_matches(loaded, dm.info, "--ckpt")
            except ConfigError as err:
                parser.error(f"{err} (--data {args.data}; extra overrides: {args.overrides or 'none'})")
            split = (loaded.data or {}).get("split")
            if split:  # calibrate on the images this model's training held out
                dm.use_split(split)
        else:
            _, objs = train(cfg)
            net = load_checkpoint(objs["best_ckpt"]).net
            dm = objs["datamodule"]
    train_s = time.time() - t0
    net.eval()
    dm.setup("calibrate")
    limit = 10 if args.quick else None  # batches of the calibration / test split
    calib = list(batches(dm.calib_dataloader(), limit))
    test = list(batches(dm.test_dataloader(), limit))
    # calibration's timing batch comes from the calibration split (its latencies are rescaled on
    # it): nothing of the fit sees a test image, as in train.py and evaluate.py
    rc = cfg.router
    calib_example = torch.cat([x for x, _ in calib])[: rc.latency_batch]
    example = test[0][0]  # the benchmark's own timings below run on test images

    t1 = time.time()
    cal = calibrate(net, calib, calib_example, **calibration_settings(rc, cfg.get("seed")))
    calib_s = time.time() - t1
    records = collect_records(net, test, cal.feature_kwargs)
    x1 = example[:1]
    heavy_flops = count_flops(net.predict_exit, x1, ExitLevel.HEAVY) / 1e6
    plain_flops = [count_flops(net.predict_exit, x1, lv) / 1e6 for lv in ExitLevel]
    # the same without the multiply-adds on zero padding (which oneDNN skips): where time departs
    # from the standard count because HEAVY's last stage runs on small, padding-heavy maps
    unpadded_flops = [count_flops_without_padding(net.predict_exit, x1, lv) / 1e6 for lv in ExitLevel]
    acc_heavy = records.correct[:, -1].float().mean().item()
    oracle = oracle_tiers(records.correct)
    _, oracle_flops, oracle_frac = evaluate_tiers(oracle, records, plain_flops)

    chunk = DEFAULT_CHUNK_SIZE
    fast = inference_copy(net)  # the network as the routed engine serves it (BN folded, channels-last)
    to_cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    # always-HEAVY at its best: the network as trained or its inference copy (in the routed
    # engine's chunks, i.e. whole batches up to the chunk size)
    heavy_fns = {
        "trained": lambda x: predict_exit_chunked(net, x, ExitLevel.HEAVY, chunk),
        "inference_copy": lambda x: predict_exit_chunked(fast, to_cl(x), ExitLevel.HEAVY, chunk),
    }
    routed = {kind: cal.routed(net, kind, optimize=True) for kind in ("gate", "staged", "cascade")}
    # the same test images served in calls of each batch size (the engine regroups a call's
    # images into chunks of `chunk`; bigger calls give the later stages fuller chunks)
    serve_batches = args.serve_batch or [args.batch, *([1024] if args.batch != 1024 else [])]
    images = torch.cat([x for x, _ in test])
    times_by_batch = {
        sb: interleaved_times({**heavy_fns, **routed}, list(images.split(sb)), rounds=args.rounds)
        for sb in serve_batches
    }
    times = times_by_batch[serve_batches[0]]
    t_heavy = min(times[k] for k in heavy_fns)
    result = {
        "data": args.data,
        "quick": args.quick,
        "acc_heavy": acc_heavy,
        "acc_per_exit": {lv.key: records.correct[:, int(lv)].float().mean().item() for lv in ExitLevel},
        "mflops_heavy": heavy_flops,
        "mflops_per_exit_plain": dict(zip([lv.key for lv in ExitLevel], plain_flops, strict=True)),
        "mflops_per_exit_without_padding": dict(zip([lv.key for lv in ExitLevel], unpadded_flops, strict=True)),
        "flops_ratio_oracle": oracle_flops / heavy_flops,
        "oracle_tier_fractions": oracle_frac,
        "test_images": len(records),
    }
    result["heavy_ms_per_image"] = {k: 1e3 * times[k] / len(records) for k in heavy_fns}
    result["serve_batches"] = serve_batches
    result["chunk_size"] = chunk
    for kind, model in routed.items():
        outs = [model(x) for x, _ in test]
        tier = torch.cat([o.tier for o in outs])
        labels = torch.cat([y for _, y in test])
        acc = (torch.cat([o.logits.argmax(1) for o in outs]) == labels).float().mean().item()
        mflops = torch.tensor([c.mflops for c in cal.tier_costs[kind]])[tier].mean().item()
        t_routed = times[kind]
        entry = {
            "acc": acc,
            "flops_ratio": mflops / heavy_flops,
            "wall_speedup": t_heavy / t_routed,
            "tier_fractions": torch.bincount(tier, minlength=4).div(len(tier)).tolist(),
            "knob": float(model.router.knob),
            "tier_mflops": [c.mflops for c in cal.tier_costs[kind]],
            "tier_latency_ms": [c.latency_ms for c in cal.tier_costs[kind]],
        }
        entry["meets_speed_goal"] = entry["wall_speedup"] >= 0.8 / entry["flops_ratio"]
        with torch.no_grad():
            unpadded = torch.tensor(
                [count_flops_without_padding(model, x1, force_tier=int(lv)) / 1e6 for lv in ExitLevel]
            )
        entry["flops_ratio_without_padding"] = unpadded[tier].mean().item() / unpadded_flops[-1]
        entry["meets_speed_goal_without_padding"] = entry["wall_speedup"] >= 0.8 / entry["flops_ratio_without_padding"]
        entry["wall_speedup_by_batch"] = {
            sb: min(t[k] for k in heavy_fns) / t[kind] for sb, t in times_by_batch.items()
        }
        entry["meets_speed_goal_by_batch"] = {
            sb: v >= 0.8 / entry["flops_ratio"] for sb, v in entry["wall_speedup_by_batch"].items()
        }
        result[kind] = entry
        if kind == "gate":
            result["routing_accuracy"] = (tier == oracle).float().mean().item()
            expected_s = sum(cal.tier_costs[kind][t].latency_ms for t in tier.tolist()) / 1e3
            result["latency_error"] = abs(expected_s - t_routed) / t_routed
            # the same with the tier latencies measured again now: without the machine's drift
            # since calibration, what is left is the error of the latency model itself
            now = [c.latency_ms for c in measure_routed_tier_costs(model, example, min_run_time=0.3)]
            expected_now = sum(now[t] for t in tier.tolist()) / 1e3
            result["latency_error_remeasured"] = abs(expected_now - times[kind]) / times[kind]

    result["curves"] = tradeoff_curves(cal, records, heavy_flops, plain_flops, oracle_flops, result)
    if args.plot:
        plot_curves(result["curves"], args.plot, f"{args.data}: routed accuracy vs compute (test split)")

    # router overhead: features + gate on the TINY tensors of each chunk, against the HEAVY
    # forward of the same chunks (the work the routed engine adds on top of the stages), measured
    # two ways: in place, as the engine pays it (TINY path with features and gate minus the TINY
    # path alone, so the features read the maps the stage has just written), and in isolation
    # (features and gate alone on stored maps, run between HEAVY passes that evict them)
    gate = cal.routers["gate"]
    with torch.no_grad():
        example_cl = example.contiguous(memory_format=torch.channels_last)
        chunks = example_cl.split(chunk)
        head0 = fast.heads[0]

        def tiny_path(route: bool):
            for c in chunks:
                h1 = fast.backbone.forward_stage(0, fast.backbone.forward_stem(c))
                out0 = head0.forward_parts(h1)
                if route:
                    f, _ = exit_features(c, h1, out0, head0, **cal.feature_kwargs)
                    gate.choose_tier(f, None)

        pieces = []
        for c in chunks:
            maps = fast.backbone.forward_features(c)
            pieces.append((c, maps[0], head0.forward_parts(maps[0])))

        def route_only():
            for c, h1, out0 in pieces:
                f, _ = exit_features(c, h1, out0, head0, **cal.feature_kwargs)
                gate.choose_tier(f, None)

        overhead = interleaved_times(
            {
                "tiny": lambda _: tiny_path(False),
                "tiny_routed": lambda _: tiny_path(True),
                "route_only": lambda _: route_only(),
                "heavy": lambda _: predict_exit_chunked(fast, example_cl, ExitLevel.HEAVY, chunk),
            },
            [None] * 40,
            rounds=args.rounds,
        )
    t_heavy_batch = overhead["heavy"]
    result["overhead_time_ratio"] = (overhead["tiny_routed"] - overhead["tiny"]) / t_heavy_batch
    result["overhead_time_ratio_isolated"] = overhead["route_only"] / t_heavy_batch
    result["tiny_path_time_ratio"] = overhead["tiny"] / t_heavy_batch

    result["part_throughput"] = part_throughput(fast, example_cl[:chunk], args.rounds)

    feats = records.features[:, 0][:256]
    score = ExpectedTier(gate.logits_module())
    explain = {}
    for method in METHODS:
        kwargs = {"n_samples": 50} if method in ("kernel_shap", "shapley_value_sampling") else {}
        t = time.perf_counter()
        res = explain_gate(score, feats, cal.baseline_features, method=method, **kwargs)
        explain[method] = {
            "ms_per_decision": 1e3 * (time.perf_counter() - t) / len(feats),
            "max_delta": float(res.delta.max()),
        }
    result["explain_ms_per_decision"] = {m: v["ms_per_decision"] for m, v in explain.items()}
    result["explain_max_delta"] = {m: v["max_delta"] for m, v in explain.items()}
    result["calibration_fit"] = cal.fit_summary
    result["seconds"] = {"train": train_s, "calibrate": calib_s, "total": time.time() - t0}
    result["machine"] = machine()
    emit(result)


def interleaved_times(fns: dict, batches: list, rounds: int) -> dict[str, float]:
    """Seconds each function takes over all ``batches``, timed batch by batch in turn (the
    order rotating), so that the slow spells of a shared machine hit every function alike;
    ``rounds`` passes over the batches after a warm-up pass, the fastest pass counting."""
    names = list(fns)
    best = dict.fromkeys(names, float("inf"))
    with torch.no_grad():
        for r in range(rounds + 1):
            total = dict.fromkeys(names, 0.0)
            for i, x in enumerate(batches):
                for j in range(len(names)):
                    name = names[(i + j) % len(names)]
                    start = time.perf_counter()
                    fns[name](x)
                    total[name] += time.perf_counter() - start
            if r:  # pass 0 warms up
                best = {n: min(best[n], total[n]) for n in names}
    return best


def part_throughput(fast, x: torch.Tensor, rounds: int) -> dict:
    """Where the wall clock departs from FLOPs: each part of the inference copy (stem, each
    stage, each exit head) timed on the maps of one chunk ``x``, interleaved, with its FLOPs per
    image, ms per image and GFLOP/s; ``tiny_path_vs_heavy``: the TINY path's GFLOP/s over
    HEAVY's (1 when time follows FLOPs; below 1, TINY costs more time than its FLOPs say)."""
    bb = fast.backbone
    with torch.no_grad():
        maps = [bb.forward_stem(x), *bb.forward_features(x)]  # each part's input, then HEAVY's map
    parts = {"stem": (bb.forward_stem, x)}
    for i, level in enumerate(ExitLevel):
        parts[f"stage/{level.key}"] = (lambda h, i=i: bb.forward_stage(i, h), maps[i])
        parts[f"head/{level.key}"] = (fast.heads[i].forward_parts, maps[i + 1])
    with torch.no_grad():
        flops = {name: count_flops(fn, inp[:1]) for name, (fn, inp) in parts.items()}
        unpadded = {name: count_flops_without_padding(fn, inp[:1]) for name, (fn, inp) in parts.items()}
    secs = interleaved_times(
        {name: (lambda _, f=fn, a=inp: f(a)) for name, (fn, inp) in parts.items()}, [None] * 10, rounds
    )
    n = len(x) * 10
    table = {
        name: {
            "mflops": flops[name] / 1e6,
            "ms_per_image": 1e3 * secs[name] / n,
            "gflops_per_s": flops[name] * n / secs[name] / 1e9,
            "mflops_without_padding": unpadded[name] / 1e6,
            "gflops_per_s_without_padding": unpadded[name] * n / secs[name] / 1e9,
        }
        for name in parts
    }
    tiny = ["stem", "stage/tiny", "head/tiny"]
    heavy = ["stem", *(f"stage/{lv.key}" for lv in ExitLevel), "head/heavy"]

    def speed(names, counts=flops):
        return sum(counts[k] for k in names) * n / sum(secs[k] for k in names)

    return {
        "parts": table,
        "tiny_path_vs_heavy": speed(tiny) / speed(heavy),
        "tiny_path_vs_heavy_without_padding": speed(tiny, unpadded) / speed(heavy, unpadded),
    }


def tradeoff_curves(cal, records, heavy_flops: float, plain_flops: list[float], oracle_flops: float, result: dict):
    """Accuracy vs FLOPs ratio: each router's knob swept on the test records (at most 40
    points each, ascending cost), the fixed exits, the oracle and each router's calibrated knob."""
    curves: dict = {"exits": {}, "calibrated": {}}
    for kind in ("gate", "staged", "cascade"):
        tier_cost = [c.mflops for c in cal.tier_costs[kind]]
        points = sweep(cal.routers[kind], records, tier_cost)
        step = max(1, len(points) // 40)
        keep = points[::step] + ([points[-1]] if (len(points) - 1) % step else [])
        curves[kind] = [[p.mean_cost / heavy_flops, p.accuracy] for p in keep]
        curves["calibrated"][kind] = [result[kind]["flops_ratio"], result[kind]["acc"]]
    for level, flops in zip(ExitLevel, plain_flops, strict=True):
        curves["exits"][level.key] = [flops / heavy_flops, records.correct[:, int(level)].float().mean().item()]
    curves["oracle"] = [oracle_flops / heavy_flops, records.correct.any(dim=1).float().mean().item()]
    return curves


def plot_curves(curves: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for kind, color in (("gate", "tab:red"), ("staged", "tab:green"), ("cascade", "tab:blue")):
        xs, ys = zip(*curves[kind], strict=True)
        ax.plot(xs, [100 * y for y in ys], "-", color=color, label=kind)
        cx, cy = curves["calibrated"][kind]
        ax.plot([cx], [100 * cy], "o", color=color, markeredgecolor="black")
    for name, (x, y) in curves["exits"].items():
        ax.plot([x], [100 * y], "ks")
        ax.annotate(name.upper(), (x, 100 * y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ox, oy = curves["oracle"]
    ax.plot([ox], [100 * oy], "k*", markersize=10, label="oracle")
    heavy = 100 * curves["exits"]["heavy"][1]
    ax.set_ylim(min(100 * y for _, y in curves["exits"].values()) - 1, max(heavy, 100 * oy) + 1)
    ax.axhline(heavy - 0.5, color="gray", ls=":", lw=1, label="HEAVY - 0.5 pt")
    ax.set_xlabel("mean FLOPs / HEAVY FLOPs")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
