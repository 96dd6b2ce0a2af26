"""Routed inference, calibration, knob sweeps and decisions on a small trained-in-test model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eexit.data.synthetic import make_shapes
from eexit.models import create_model
from eexit.routing.calibrate import Calibration, calibrate
from eexit.routing.calibration import (
    ExitRecords,
    SweepPoint,
    choose_knob,
    collect_records,
    monotone_drops,
    oracle_tiers,
    simulate,
    sweep,
)
from eexit.routing.decisions import attribute_output, decisions_from_output
from eexit.routing.engine import RoutedClassifier
from eexit.routing.routers import safe_to_stop
from eexit.types import ExitLevel

KINDS = ("gate", "staged", "cascade")


@pytest.fixture(scope="module")
def trained():
    """A micro network trained for a few steps on generated shapes (exits differ in accuracy)."""
    torch.manual_seed(0)
    net = create_model("resnet_micro", in_chans=1, num_classes=4)
    x, y, _ = make_shapes(768, num_classes=4, image_size=16, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(60):
        idx = torch.randint(0, 512, (64,))
        loss = sum(torch.nn.functional.cross_entropy(lg, y[idx]) for lg in net(x[idx]).logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    calib = [(x[512 + i : 512 + i + 64], y[512 + i : 512 + i + 64]) for i in range(0, 256, 64)]
    cal = calibrate(net, calib, x[:32], min_run_time=0.01)
    return net, cal, x[:256], y[:256], calib


def test_oracle_tier_is_smallest_right_exit_and_tiny_when_none_is_right() -> None:
    correct = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert oracle_tiers(correct).tolist() == [1, 0, 3, 0]


def test_staged_target_stops_where_no_later_exit_does_better() -> None:
    correct = torch.tensor(
        [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool
    )
    expected = torch.tensor(
        [[1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool
    )  # rows: always right; right from LIGHT; never right (stop anywhere); only TINY; only MEDIUM;
    # TINY and HEAVY right (LIGHT and MEDIUM would lose the image)
    assert torch.equal(safe_to_stop(correct), expected)


def test_knob_margin_keeps_standard_errors_between_the_drop_and_the_target() -> None:
    cheap = SweepPoint(0.2, accuracy=0.90, mean_cost=1.0, tier_fractions=[1, 0, 0, 0], drop_se=0.01)
    safe = SweepPoint(0.8, accuracy=0.915, mean_cost=2.0, tier_fractions=[0, 1, 0, 0], drop_se=0.002)
    heavy = SweepPoint(1.0, accuracy=0.92, mean_cost=4.0, tier_fractions=[0, 0, 0, 1], drop_se=0.0)
    points = [cheap, safe, heavy]
    assert choose_knob(points, 0.92, max_drop=0.02, margin_se=0.0) is cheap  # drop 0.02 fits exactly
    assert choose_knob(points, 0.92, max_drop=0.02, margin_se=1.0) is safe  # 0.02 + 0.01 > 0.02
    assert choose_knob(points, 0.92, max_drop=0.0, margin_se=1.0) is heavy


def _points(drops: list[float], heavy: float = 0.9, se: float = 0.0) -> list[SweepPoint]:
    """Sweep points of ascending cost 1, 2, ... with these accuracy drops against ``heavy``."""
    return [SweepPoint(i / 10, heavy - d, float(i + 1), [1, 0, 0, 0], se) for i, d in enumerate(drops)]


def test_monotone_drops_pool_each_rise_with_the_points_before_it() -> None:
    points = _points([0.05, 0.01, 0.03, 0.02, 0.0])
    # 0.01 < 0.03 is a rise in cost order: pooled to 0.02, then with 0.02 as well (0.02, 0.02, 0.02)
    fitted = monotone_drops(points, 0.9)
    assert fitted == pytest.approx([0.05, 0.02, 0.02, 0.02, 0.0])
    shuffled = [points[i] for i in (3, 0, 4, 2, 1)]  # given out of cost order: fitted in cost order
    assert monotone_drops(shuffled, 0.9) == pytest.approx([0.02, 0.05, 0.0, 0.02, 0.02])
    assert monotone_drops(_points([0.04, 0.03, 0.0]), 0.9) == pytest.approx([0.04, 0.03, 0.0])  # already monotone


def test_a_dip_of_noise_inside_the_target_does_not_set_the_monotone_knob() -> None:
    # the second point dips inside the 0.5-point target between points well outside it
    points = _points([0.03, 0.004, 0.012, 0.009, 0.006, 0.001, 0.0])
    assert choose_knob(points, 0.9, max_drop=0.005, monotone=False) is points[1]
    # fitted: 0.03, (0.004 + 0.012 + 0.009) / 3 for points 1-3, then 0.006, 0.001, 0
    assert monotone_drops(points, 0.9) == pytest.approx([0.03, *[0.025 / 3] * 3, 0.006, 0.001, 0.0])
    assert choose_knob(points, 0.9, max_drop=0.005) is points[5]
    assert choose_knob(points, 0.9, max_drop=0.0, margin_se=1.0) is points[6]


def test_the_monotone_fit_never_passes_a_point_whose_own_drop_misses_the_target() -> None:
    # pooled with the dip before it, the second point's fitted drop (0.4 points) plus its small
    # standard error would pass, while its own drop (0.7) misses: the larger drop counts
    points = [
        SweepPoint(0.0, 0.9 - 0.001, 1.0, [1, 0, 0, 0], 0.0045),
        SweepPoint(0.5, 0.9 - 0.007, 2.0, [0, 1, 0, 0], 0.0005),
        SweepPoint(1.0, 0.9, 3.0, [0, 0, 0, 1], 0.0),
    ]
    assert monotone_drops(points, 0.9)[1] == pytest.approx(0.004)
    assert choose_knob(points, 0.9, max_drop=0.005, margin_se=1.0) is points[2]
    assert choose_knob(points, 0.9, max_drop=0.005, margin_se=1.0, monotone=False) is points[2]


def _mixed_model(net, cal: Calibration, kind: str, x: torch.Tensor) -> RoutedClassifier:
    """The routed classifier of ``kind`` with a knob in the middle of its range on ``x``, so that
    the images go to a mix of tiers."""
    model = cal.routed(net, kind)
    records = collect_records(net, [(x, torch.zeros(len(x), dtype=torch.long))], cal.feature_kwargs)
    mixed = [p for p in sweep(model.router, records, [1, 2, 3, 4]) if max(p.tier_fractions) < 0.9]
    if mixed:
        model.router.set_knob(mixed[len(mixed) // 2].knob)
    return model


@pytest.mark.parametrize("chunk_size", [None, 7, 128])
@pytest.mark.parametrize("kind", KINDS)
def test_stages_run_once_per_image_and_logits_equal_direct_exit(trained, kind: str, chunk_size: int | None) -> None:
    net, cal, x, _, _ = trained
    model = _mixed_model(net, cal, kind, x)
    model.chunk_size = chunk_size  # None: the whole batch at once; 7: many chunks and a remainder
    records = collect_records(net, [(x, torch.zeros(len(x), dtype=torch.long))], cal.feature_kwargs)
    seen = {k: 0 for k in range(4)}
    hooks = [
        stage.register_forward_hook(lambda m, inp, out, k=k: seen.__setitem__(k, seen[k] + inp[0].shape[0]))
        for k, stage in enumerate(net.backbone.stages)
    ]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    tiers = out.tier
    for k in range(4):
        assert seen[k] == int((tiers >= k).sum()), f"stage {k} ran on {seen[k]} images"
    for level in ExitLevel:
        sel = tiers == int(level)
        if sel.any():
            direct = net.predict_exit(x[sel], level)
            assert torch.allclose(out.logits[sel], direct, atol=1e-5), level.name
    assert torch.equal(simulate(model.router, records, float(model.router.knob)), tiers)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_routing_gives_the_decisions_of_one_whole_batch(trained, kind: str) -> None:
    net, cal, x, _, _ = trained
    model = _mixed_model(net, cal, kind, x)
    model.chunk_size = None
    whole = model(x, with_heatmap=True)
    model.chunk_size = 5
    chunked = model(x, with_heatmap=True)
    assert len(set(whole.tier.tolist())) > 1, "the knob should give a mix of tiers"
    assert torch.equal(whole.tier, chunked.tier)
    assert torch.equal(whole.decided_at, chunked.decided_at)
    for name in ("logits", "confidence", "features", "heatmap"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), atol=1e-5), name


@pytest.mark.parametrize("kind", KINDS)
def test_optimized_serving_path_gives_the_same_decisions(trained, kind: str) -> None:
    net, cal, x, _, _ = trained
    plain, fast = cal.routed(net, kind), cal.routed(net, kind, optimize=True)
    assert fast.net is not net and plain.net is net
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.net.modules())
    a, b = plain(x, with_heatmap=True), fast(x, with_heatmap=True)
    assert torch.equal(a.tier, b.tier)
    for name in ("logits", "confidence", "features", "heatmap"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-4), name


@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("forced", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_forced_tier_reports_the_forced_exit_and_the_routers_own_choice(
    trained, kind: str, forced: int, chunk_size: int | None
) -> None:
    net, cal, x, _, _ = trained
    model = _mixed_model(net, cal, kind, x)
    model.chunk_size = chunk_size
    own = model(x)
    out = model(x, force_tier=forced)
    assert own.router_tier is None and not own.forced and out.forced
    assert (out.tier == forced).all()
    assert torch.allclose(out.logits, net.predict_exit(x, forced), atol=1e-5)
    same = own.tier == forced  # images the router sends there itself: the same confidence
    assert torch.allclose(out.confidence[same], own.confidence[same])
    if kind == "gate":  # the plan is made at TINY: the router's choice is always known
        assert torch.equal(out.router_tier, own.tier)
        assert torch.allclose(out.confidence, model.router.tier_cdf(own.features)[:, forced])
    else:  # decided exit by exit: known up to the forced exit, unknown (-1) past it
        known = own.tier <= forced
        assert torch.equal(out.router_tier[known], own.tier[known])
        assert (out.router_tier[~known] == -1).all()
    # what explains the router's own choice: the features and exit of that choice
    known = out.router_tier >= 0
    assert torch.equal(out.decided_at[known], own.decided_at[known])
    assert torch.allclose(out.features[known], own.features[known], atol=1e-6)
    rows = decisions_from_output(out, cal.tier_costs[kind], ["a", "b", "c", "d"], kind)
    assert all(r.forced and r.tier == ExitLevel(forced).key for r in rows)
    assert [r.router_tier for r in rows] == [ExitLevel(t).key if t >= 0 else None for t in out.router_tier.tolist()]
    unforced = decisions_from_output(own, cal.tier_costs[kind], ["a", "b", "c", "d"], kind)
    assert all(not r.forced and r.router_tier == r.tier for r in unforced)


def test_chunk_size_must_be_positive(trained) -> None:
    net, cal, _, _, _ = trained
    with pytest.raises(ValueError, match="chunk_size"):
        RoutedClassifier(net, cal.routers["gate"], chunk_size=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_forced_tier_that_names_no_exit_is_refused(trained, kind: str) -> None:
    net, cal, x, _, _ = trained
    model = cal.routed(net, kind)
    for bad in (7, -1, True, "huge"):  # 7 and -1 sent every image to HEAVY, True to LIGHT
        with pytest.raises(ValueError, match="unknown exit"):
            model(x[:4], force_tier=bad)
    assert (model(x[:4], force_tier="medium").tier == 2).all()


@pytest.mark.parametrize("kind", KINDS)
def test_knob_sweep_is_monotone_on_the_calibration_split(trained, kind: str) -> None:
    net, cal, _, _, calib = trained
    records = collect_records(net, calib, cal.feature_kwargs)
    router = cal.routers[kind]
    points = sweep(router, records, [c.mflops for c in cal.tier_costs[kind]])
    costs = [p.mean_cost for p in points]
    assert costs == sorted(costs)
    assert costs[0] < costs[-1]
    previous = None
    for p in points:
        tier = simulate(router, records, p.knob)
        if previous is not None:
            assert (tier >= previous).all(), "a higher knob sent an image to a cheaper tier"
        previous = tier


def test_tier_costs_grow_with_the_tier_and_include_the_router(trained) -> None:
    _, cal, _, _, _ = trained
    for kind in KINDS:
        flops = [c.mflops for c in cal.tier_costs[kind]]
        assert flops == sorted(flops) and flops[0] > 0
        assert all(c.latency_ms > 0 for c in cal.tier_costs[kind])
    # the staged gate computes features at every exit it passes; the cascade computes none
    assert cal.tier_costs["staged"][3].mflops > cal.tier_costs["cascade"][3].mflops


def test_calibration_round_trips_through_its_state(trained) -> None:
    net, cal, x, _, _ = trained
    state = json.loads(json.dumps(cal.to_state()))
    again = Calibration.from_state(state)
    for kind in KINDS:
        a, b = cal.routed(net, kind)(x), again.routed(net, kind)(x)
        assert torch.equal(a.tier, b.tier)
        assert torch.allclose(a.logits, b.logits)


def test_decisions_serialise_to_json(trained) -> None:
    net, cal, x, _, _ = trained
    out = cal.routed(net, "gate")(x[:8], with_heatmap=True)
    assert out.heatmap.shape == (8, 16, 16)
    decisions = decisions_from_output(out, cal.tier_costs["gate"], ["a", "b", "c", "d"])
    assert len(decisions) == 8
    for d in decisions:
        row = json.loads(d.to_json())
        assert row["tier"] in {lv.key for lv in ExitLevel}
        assert 0 <= row["confidence"] <= 1 and 0 <= row["probability"] <= 1
        assert row["mflops"] > 0 and row["latency_ms"] > 0
        assert len(row["features"]) == 7 and row["label"] in "abcd"


def test_tier_latencies_are_rescaled_to_the_routed_batch(trained, monkeypatch) -> None:
    from eexit.routing import costs as costs_mod

    net, cal, x, _, _ = trained
    gate = cal.routers["gate"]
    knob = float(gate.knob)
    model = cal.routed(net, "gate", optimize=True)
    example = x[:64]
    # 0.1 / 0.2 / 0.3 / 0.4 ms per image when every image is forced to the tier
    forced = [costs_mod.TierCost(lv.key, 1.0 + lv, 0.1 * (1 + lv), 64, "cpu", 1) for lv in ExitLevel]
    try:
        gate.set_knob(0.9999)  # most images past TINY
        tiers = model(example).tier.tolist()
        assert any(t > 0 for t in tiers)
        base, past = 0.1, sum(0.1 * t for t in tiers)
        bounded = (
            (64 * base + 100 * past, costs_mod.MAX_RESCALE),
            (64 * base + 0.01 * past, 1 / costs_mod.MAX_RESCALE),
        )
        for batch_ms, factor in ((64 * base + 1.5 * past, 1.5), *bounded):  # beyond the bound either way: noise
            monkeypatch.setattr(costs_mod, "measure_latency", lambda fn, min_run_time, ms=batch_ms: ms / 1e3)
            out = costs_mod.rescale_to_routed_batch(model, example, forced, 0.01)
            assert [c.latency_basis for c in out] == ["routed"] * 4
            assert [c.mflops for c in out] == [1.0, 2.0, 3.0, 4.0] and out[0].latency_ms == base
            assert [c.latency_ms for c in out] == pytest.approx([base + factor * 0.1 * t for t in range(4)])
            if factor == 1.5:  # the batch's per-image latencies add up to its measured time
                assert sum(out[t].latency_ms for t in tiers) == pytest.approx(batch_ms)
        # a noisy timing with LIGHT and MEDIUM below TINY (a busy machine): raised to TINY's
        # first, so that no tier comes out cheaper than a cheaper tier, nor negative
        noisy = [replace(c, latency_ms=ms) for c, ms in zip(forced, (1.0, 0.01, 0.02, 3.0), strict=True)]
        out = costs_mod.rescale_to_routed_batch(model, example, noisy, 0.01)
        latencies = [c.latency_ms for c in out]
        assert latencies == sorted(latencies) and latencies[0] == 1.0 and latencies[1] == 1.0
        gate.set_knob(0.0)  # every image stops at TINY: nothing to rescale
        assert costs_mod.rescale_to_routed_batch(model, example, forced, 0.01) is forced
    finally:
        gate.set_knob(knob)


def test_round_significant_equals_python_formatting() -> None:
    from eexit.routing.decisions import round_significant

    g = torch.Generator().manual_seed(0)
    # float32 values over their whole range of magnitudes, both signs, exact powers of ten
    x = torch.randn(20000, generator=g) * torch.pow(10.0, torch.randint(-40, 38, (20000,), generator=g).float())
    x = torch.cat([x.float(), torch.tensor([1e-45, -3.4e38, 1.0, 10.0, 1e-7, 0.5, 123456789.0])])
    for digits in (1, 3, 7, 9, 12):  # (at 15 digits, float64 rounding of x * 10**p decides near-ties)
        got = round_significant(x, digits).tolist()
        want = [float(f"{v:.{digits}g}") for v in x.double().tolist()]
        assert got == want  # the float64 nearest to the decimal: Python prints the decimal itself
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    out = round_significant(special, 7)
    assert out[:4].tolist() == [0.0, -0.0, float("inf"), float("-inf")] and out[4].isnan()
    for bad in (0, 16):
        with pytest.raises(ValueError, match="digits must be between 1 and 15"):
            round_significant(x, bad)
    # 9 digits give back every float32 exactly; 7 do not
    neighbours = torch.tensor([0.99999994, 0.9999999, 0.99999982])
    assert torch.equal(round_significant(neighbours, 9).float(), neighbours)
    assert len(set(round_significant(neighbours, 7).tolist())) < 3


def test_decision_rows_round_and_never_hold_non_finite_numbers(trained) -> None:
    from eexit.routing.decisions import decision_rows

    net, cal, x, _, _ = trained
    out = cal.routed(net, "gate")(x[:6])
    attr = torch.randn(6, 7, dtype=torch.float64)
    delta = torch.rand(6, dtype=torch.float64) * 1e-9
    full = decision_rows(out, cal.tier_costs["gate"], None, "gate", attr, delta)
    assert [vars(d) for d in decisions_from_output(out, cal.tier_costs["gate"], None, "gate", attr, delta)] == full
    short = decision_rows(out, cal.tier_costs["gate"], None, "gate", attr, delta, digits=4)
    for a, b in zip(full, short, strict=True):
        assert b["confidence"] == float(f"{a['confidence']:.4g}") and b["mflops"] == float(f"{a['mflops']:.4g}")
        assert b["attributions"] == {k: float(f"{v:.4g}") for k, v in a["attributions"].items()}
        assert b["attribution_delta"] == float(f"{a['attribution_delta']:.4g}")
        assert {k: v for k, v in a.items() if not isinstance(v, float | dict)} == {
            k: v for k, v in b.items() if not isinstance(v, float | dict)
        }
    out.confidence[1] = float("nan")
    out.features[2, 3] = float("inf")
    attr[0, 5] = float("nan")
    rows = decision_rows(out, cal.tier_costs["gate"], None, "gate", attr, delta, digits=7)
    assert rows[1]["confidence"] == 0.0 and rows[0]["confidence"] > 0
    assert rows[2]["features"]["feature_variance"] is None and rows[0]["attributions"]["confidence_margin"] is None
    json.dumps(rows, allow_nan=False)  # raises on NaN / Infinity
    cascade = decision_rows(cal.routed(net, "cascade")(x[:3]), cal.tier_costs["cascade"], None, "cascade")
    assert all(r["features"] is None and r["attributions"] is None for r in cascade)


@pytest.mark.parametrize("kind", ["gate", "staged"])
def test_decision_attributions_sum_to_the_output_change_within_delta(trained, kind: str) -> None:
    from eexit.routing.decisions import attribute_output

    net, cal, x, _, _ = trained
    model = cal.routed(net, kind)
    out = model(x[:64])
    res = attribute_output(cal, kind, out)
    assert res.attributions.shape == (64, 7)
    gap = (res.attributions.sum(1) - (res.output - res.baseline_output)).abs()
    assert torch.all(gap <= res.delta + 1e-6)
    assert res.delta.max().item() < 1e-4  # DeepLift is exact on these gates
    if kind == "gate":  # the explained output is the expected tier of the one-shot gate
        probs = cal.routers["gate"].tier_probs(out.features)
        assert torch.allclose(res.output, (probs * torch.arange(4.0)).sum(1), atol=1e-5)
    decisions = decisions_from_output(out, cal.tier_costs[kind], None, kind, res.attributions, res.delta)
    assert json.loads(decisions[0].to_json())["attributions"].keys() == set(decisions[0].features)


def test_cascade_has_no_feature_attributions(trained) -> None:
    from eexit.routing.decisions import attribute_output

    net, cal, x, _, _ = trained
    assert attribute_output(cal, "cascade", cal.routed(net, "cascade")(x[:4])) is None


def test_standardize_keeps_constant_features_in_their_own_unit() -> None:
    from eexit.routing.routers import Standardize

    x = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 5.0]])
    scale = Standardize(2).fit(x)
    assert scale.std.tolist()[0] == 1.0  # constant on calibration: a serve-time 0.01 stays 0.01
    assert scale(torch.tensor([[0.01, 3.0]])).tolist()[0] == pytest.approx([0.01, 0.0])
    with pytest.raises(ValueError, match="shape"):
        Standardize(2).fit(torch.zeros(0, 2))
    # a large constant: float32 rounding alone gave it a std above 1e-6 (a serve-time +1e-3 became 25)
    big = Standardize(1).fit(torch.full((5000, 1), 123.456))
    assert big.std.item() == 1.0
    assert big(torch.tensor([[123.457]])).item() == pytest.approx(1e-3, abs=1e-4)


def test_gate_fit_depends_on_data_and_seed_only_and_leaves_the_global_rng(trained) -> None:
    from eexit.routing.routers import OneShotGate

    net, cal, _, _, calib = trained
    records = collect_records(net, calib, cal.feature_kwargs)
    feats, tiers = records.features[:, 0], oracle_tiers(records.correct)
    torch.manual_seed(1)
    a = OneShotGate().fit(feats, tiers, seed=3, epochs=20)
    after_fit = torch.rand(3)
    torch.manual_seed(2)  # another global state before building and fitting: the same gate
    b = OneShotGate().fit(feats, tiers, seed=3, epochs=20)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    torch.manual_seed(1)
    OneShotGate()  # building draws from the global generator; fitting does not touch it
    assert torch.equal(torch.rand(3), after_fit)


def test_a_gate_fit_on_the_cpu_leaves_the_cuda_generators_unseeded(trained, monkeypatch) -> None:
    from eexit.routing.routers import OneShotGate

    net, cal, _, _, calib = trained
    records = collect_records(net, calib, cal.feature_kwargs)
    seeded = []  # torch.manual_seed would reseed every CUDA generator too (lazily without a GPU)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    OneShotGate().fit(records.features[:, 0], oracle_tiers(records.correct), seed=3, epochs=2)
    assert seeded == []


def test_calibration_takes_its_batches_from_a_generator_and_refuses_a_bad_cost_key(trained) -> None:
    net, cal, x, _, calib = trained
    from_gen = calibrate(net, (b for b in calib), x[:32], min_run_time=0.01)  # read once only
    for kind, fit in cal.fit_summary.items():  # (other tests set the routers' knobs; the summary keeps the fit's)
        assert from_gen.fit_summary[kind]["knob"] == fit["knob"], kind
    with pytest.raises(ValueError, match=r"unknown cost key 'flops' \(router\.cost\)"):
        calibrate(net, calib, x[:32], cost_key="flops", min_run_time=0.01)


def test_knob_candidates_skip_non_finite_scores(trained) -> None:
    from eexit.routing.calibration import knob_candidates

    net, cal, _, _, calib = trained
    records = collect_records(net, calib, cal.feature_kwargs)
    clean = knob_candidates(cal.routers["cascade"], records)
    records.probs[0] = float("nan")  # one corrupt image
    knobs = knob_candidates(cal.routers["cascade"], records)
    assert all(k == k for k in knobs) and len(knobs) > 100
    assert knobs[0] == 0.0 and knobs[-1] == clean[-1]


@pytest.mark.parametrize("kind", KINDS)
def test_the_calibrated_knob_is_the_knob_served(trained, kind: str) -> None:
    # knobs are swept as float32 values: the router's float32 buffer serves exactly the knob
    # whose accuracy and cost calibration reported
    from eexit.routing.calibration import knob_candidates

    net, cal, _, _, calib = trained
    records = collect_records(net, calib, cal.feature_kwargs)
    knobs = knob_candidates(cal.routers[kind], records)
    assert knobs == torch.tensor(knobs, dtype=torch.float32).tolist()
    assert knobs[-1] > 1.0
    fitted = cal.fit_summary[kind]["knob"]  # (other tests move the routers' knobs)
    assert fitted == float(torch.tensor(fitted, dtype=torch.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_a_knob_that_is_no_finite_number_is_refused(trained, kind: str) -> None:
    router = Calibration.from_state(trained[1].to_state()).routers[kind]  # a copy: others keep theirs
    before = float(router.knob)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="knob must be a finite number"):
            router.set_knob(bad)
    assert float(router.knob) == before
    router.set_knob(0.25)
    assert float(router.knob) == 0.25
    if router.one_shot:  # a knob given per call is checked alike (NaN sent every image to TINY)
        f = torch.rand(4, 7)
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="knob must be a finite number"):
                router.choose_tier(f, knob=bad)


@pytest.mark.parametrize("kind", ["gate", "staged"])
def test_routers_take_features_of_any_float_dtype(trained, kind: str) -> None:
    router = trained[1].routers[kind]
    f = torch.rand(5, 7)
    if kind == "gate":
        assert torch.allclose(router.tier_cdf(f.double()), router.tier_cdf(f), atol=1e-6)
        assert torch.equal(router.choose_tier(f.double())[0], router.choose_tier(f)[0])
    else:
        assert torch.allclose(router.stop_score(ExitLevel.TINY, f.double()), router.stop_score(ExitLevel.TINY, f))


def test_a_network_in_training_mode_is_refused(trained) -> None:
    # BatchNorm in training mode: each chunk normalised by its own statistics (tiers changed with
    # the chunk size) and the running statistics updated by inference
    net, cal, x, _, _ = trained
    routed = cal.routed(net, "gate")
    net.train()
    try:
        before = [b.clone() for b in net.buffers()]
        with pytest.raises(ValueError, match=r"network is in training mode.*call \.eval\(\)"):
            routed(x[:8])
        assert all(torch.equal(a, b) for a, b in zip(before, net.buffers(), strict=True))
    finally:
        net.eval()
    assert routed(x[:8]).tier.shape == (8,)


def test_calibration_refuses_a_split_too_small_to_cross_fit(trained) -> None:
    net, _, x, y, _ = trained
    with pytest.raises(ValueError, match=r"at least 16 held-out images.*data\.calib_size"):
        calibrate(net, [(x[:5], y[:5])], x[:4], min_run_time=0.01)
    with pytest.raises(ValueError, match=r"at least 16 held-out images.*got 0"):  # an empty split
        calibrate(net, [], x[:4], min_run_time=0.01)


def test_latencies_are_timed_in_interleaved_rounds_and_the_fastest_counts(monkeypatch) -> None:
    from eexit.routing import costs as costs_mod

    calls: list[tuple[str, float]] = []
    # what each call's timing window gives, round by round: a burst of load during one window
    script = {"a": iter([1.0, 1.1, 0.9]), "b": iter([10.0, 2.0, 2.1])}

    def fake_measure(fn, min_run_time):
        calls.append((fn(), min_run_time))
        return next(script[fn()])

    monkeypatch.setattr(costs_mod, "measure_latency", fake_measure)
    assert costs_mod.measure_latencies([lambda: "a", lambda: "b"], min_run_time=0.3, rounds=3) == [0.9, 2.0]
    assert [name for name, _ in calls] == ["a", "b"] * 3  # interleaved, not a then b
    assert all(t == pytest.approx(0.1) for _, t in calls)  # the time is split over the rounds
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        costs_mod.measure_latencies([lambda: "a"], rounds=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bfloat16_network_routes_with_float32_features_and_confidence(trained, kind: str) -> None:
    import copy

    net, cal, x, _, _ = trained
    model = _mixed_model(net, cal, kind, x)
    low = copy.deepcopy(net).to(torch.bfloat16)
    routed = RoutedClassifier(low, model.router, cal.feature_kwargs)
    xb = x.to(torch.bfloat16)
    for force in (None, int(ExitLevel.MEDIUM)):
        out = routed(xb, force_tier=force, with_heatmap=True)
        assert out.features.dtype == out.confidence.dtype == torch.float32  # not rounded to the net's dtype
        assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.features).all()
        assert ((out.confidence >= 0) & (out.confidence <= 1)).all()
        for level in ExitLevel:
            sel = out.tier == int(level)
            if sel.any():
                assert torch.allclose(out.logits[sel].float(), low.predict_exit(xb[sel], level).float(), atol=0.05)
        if kind == "cascade" and force is None:  # its confidence: the softmax of the exit, taken in float32
            early = out.tier < int(ExitLevel.HEAVY)
            top = torch.softmax(out.logits[early].float(), dim=1).amax(dim=1)
            assert early.any() and torch.equal(out.confidence[early], top)


def test_the_cascade_reports_the_exit_where_it_decided(trained) -> None:
    net, cal, x, _, _ = trained
    model = _mixed_model(net, cal, "cascade", x)
    out = model(x)
    assert len(out.tier.unique()) > 1, "the knob should mix tiers"
    # the exit whose stop rule fired; an image sent on to HEAVY was decided at MEDIUM
    assert torch.equal(out.decided_at, out.tier.clamp(max=int(ExitLevel.MEDIUM)))


@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_images_with_non_finite_pixels_are_not_run_and_leave_the_others_alone(trained, kind: str, optimize) -> None:
    # the inference copy's fused conv + ReLU turns NaN into finite, confident logits: such images
    # must be reported as not run on both paths, not given an answer
    net, cal, x, _, _ = trained
    model = _mixed_model(net, cal, kind, x[:64])
    if optimize:
        model = RoutedClassifier(net, model.router, cal.feature_kwargs, optimize=True)
    clean = model(x[:8], with_heatmap=True)
    bad = x[:8].clone()
    bad[3] = float("nan")
    bad[5, :, 2:4, 2:4] = float("nan")  # four pixels are enough
    bad[6, 0, 0, 0] = float("inf")
    out = model(bad, with_heatmap=True)
    broken = torch.tensor([3, 5, 6])
    keep = torch.ones(8, dtype=torch.bool)
    keep[broken] = False
    assert out.logits[broken].isnan().all() and torch.isfinite(out.logits[keep]).all()
    assert out.tier[broken].tolist() == [3, 3, 3] and out.confidence[broken].tolist() == [0.0, 0.0, 0.0]
    assert not out.features[broken].any() and not out.heatmap[broken].any()
    for name in ("tier", "decided_at"):
        assert torch.equal(getattr(out, name)[keep], getattr(clean, name)[keep]), name
    for name in ("logits", "confidence", "features", "heatmap"):
        assert torch.allclose(getattr(out, name)[keep], getattr(clean, name)[keep], atol=1e-5), name
    forced = model(bad, force_tier=int(ExitLevel.LIGHT))
    assert (forced.tier == 1).all() and forced.router_tier[broken].tolist() == [-1, -1, -1]
    assert torch.equal(forced.router_tier[keep], model(x[:8], force_tier=1).router_tier[keep])
    assert model(torch.full_like(x[:4], float("nan"))).logits.isnan().all()  # no image left to run
    # the decisions say so: no label and no confidence for an image without a prediction, also
    # for finite pixels large enough to overflow the logits (the router itself may be sure of
    # its tier on such an image; the row must not look like an answer)
    bad[7] = 3.4e38
    out = model(bad)
    unanswered = set((~torch.isfinite(out.logits).all(dim=1)).nonzero().flatten().tolist())
    # (the inference copy's fused kernels may keep an overflow finite, depending on the exit)
    assert unanswered == {3, 5, 6, 7} or (optimize and unanswered == {3, 5, 6})
    expl = attribute_output(cal, kind, out)
    attributions, deltas = (None, None) if expl is None else (expl.attributions, expl.delta)
    rows = decisions_from_output(out, cal.tier_costs[kind], router=kind, attributions=attributions, deltas=deltas)
    for i, row in enumerate(rows):
        answered = i not in unanswered
        assert (row.label is not None) == answered and (row.label_index is not None) == answered, i
        assert (row.router_tier is not None) == answered, i
        # no explanation of the placeholder features of an image without a prediction
        explained = answered and expl is not None
        assert (row.attributions is not None) == explained and (row.attribution_delta is not None) == explained, i
        if not answered:
            assert row.confidence == 0.0 and row.probability == 0.0, i
    assert rows[0].label_index == int(out.logits[0].argmax())
    json.dumps([r.to_dict() for r in rows], allow_nan=False)


def test_routed_inputs_are_checked_and_cast_to_the_network(trained) -> None:
    net, cal, x, _, _ = trained
    model = cal.routed(net, "gate", input_size=tuple(x.shape[-2:]))
    reference = model(x[:6])
    wrong = [
        (x[0], ValueError, r"expected images of shape \(B, C, H, W\), got shape \(1, 16, 16\) \(one image"),
        (x[:2].repeat(1, 3, 1, 1), ValueError, r"expected images with 1 channel\(s\), got 3"),
        (x[:2, :, :8, :8], ValueError, "expected images of 16x16 pixels .* got 8x8: resize them first"),
        ((x[:2] * 50).to(torch.uint8), TypeError, "expected normalised floating-point images, got torch.uint8"),
        (x[:2].numpy(), TypeError, "expected a tensor of images"),
    ]
    for bad, error, message in wrong:
        with pytest.raises(error, match=message):
            model(bad)
    double = model(x[:6].double())  # run in the network's float32
    assert double.logits.dtype == torch.float32 and torch.equal(double.tier, reference.tier)
    assert torch.allclose(double.logits, reference.logits, atol=1e-5)
    assert cal.routed(net, "gate")(x[:2, :, :8, :8]).tier.shape == (2,)  # no input_size: any size


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calibration_follows_the_networks_device(trained) -> None:
    import copy

    net, cal_cpu, x, _, calib = trained
    gpu = copy.deepcopy(net).cuda()
    cal = calibrate(gpu, calib, x[:32], min_run_time=0.01)  # CPU batches, network on the GPU
    for kind, router in cal.routers.items():
        assert all(t.device.type == "cuda" for t in router.buffers()), kind
        out = cal.routed(gpu, kind)(x.cuda())
        assert out.tier.device.type == "cuda"
        # the same routing as the CPU calibration up to float rounding in the fits
        ref = cal_cpu.routed(net, kind)(x)
        assert (out.tier.cpu() == ref.tier).float().mean() >= 0.9, kind
    Calibration.from_state(json.loads(json.dumps(cal.to_state())))  # stored as plain numbers


def test_calibration_settings_read_the_router_group_and_refuse_a_non_boolean_monotone() -> None:
    from omegaconf import OmegaConf

    from eexit.routing.calibrate import calibration_settings

    rc = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "router" / "default.yaml")
    settings = calibration_settings(rc, 42)
    assert settings == {
        "max_drop": rc.max_drop,
        "margin_se": rc.margin_se,
        "monotone": True,
        "cost_key": rc.cost,
        "min_run_time": rc.latency_min_run_time,
        "seed": 42,
    }
    assert calibration_settings({}, None)["seed"] == 0
    with pytest.raises(ValueError, match=r"router\.monotone must be true or false, got 'false'"):
        calibration_settings({"monotone": "false"}, 0)


def test_valid_taps_count_the_kernel_positions_that_read_the_map() -> None:
    from eexit.routing.costs import valid_taps

    # 3x3, padding 1 on 4 positions: the first and last output each lose one tap
    assert valid_taps(4, 4, 3, stride=1, padding=1) == 10
    # stride 2 from 14 to 7: only the first output reaches into the padding
    assert valid_taps(14, 7, 3, stride=2, padding=1) == 20
    assert valid_taps(5, 3, 3, stride=1, padding=0) == 9  # no padding: every tap counts
    assert valid_taps(5, 5, 3, stride=1, padding=2, dilation=2) == 11  # dilated: two lost at each end


@pytest.mark.parametrize("optimize", [False, True])
def test_flops_without_padding_drop_only_the_padding_taps(optimize: bool) -> None:
    from eexit.models.inference import inference_copy
    from eexit.routing.costs import count_flops, count_flops_without_padding

    conv = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), torch.nn.ReLU()).eval()
    x = torch.randn(2, 8, 4, 4)
    if optimize:  # the inference copy runs a fused oneDNN conv + ReLU where it can
        net = create_model("resnet_micro", in_chans=8, num_classes=4)
        net.backbone.stem = conv
        conv = inference_copy(net).backbone.stem
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert count_flops(conv, x) == 2 * 2 * 16 * 8 * 4 * 4 * 9
        assert count_flops_without_padding(conv, x) == 2 * 2 * 16 * 8 * 10 * 10
        # no padding: both counts agree
        valid = torch.nn.Conv2d(8, 16, 3, padding=0, bias=False)
        assert count_flops_without_padding(valid, x) == count_flops(valid, x) == 2 * 2 * 16 * 8 * 2 * 2 * 9


def test_fused_residual_convs_count_without_padding_as_the_plain_network(trained) -> None:
    from eexit.models.inference import inference_copy
    from eexit.routing.costs import count_flops, count_flops_without_padding

    net = trained[0]
    fast = inference_copy(net)
    x = trained[2][:1]
    with torch.no_grad():
        for level in ExitLevel:
            plain = count_flops_without_padding(net.predict_exit, x, level)
            assert plain == count_flops_without_padding(
                fast.predict_exit, x.contiguous(memory_format=torch.channels_last), level
            )
            assert 0 < plain < count_flops(net.predict_exit, x, level)


def test_one_shot_gate_picks_the_cheapest_tier_whose_cumulative_probability_reaches_the_knob() -> None:
    from eexit.routing.routers import OneShotGate

    gate = OneShotGate(num_features=7)
    gate.tier_probs = lambda f: torch.tensor([[0.5, 0.2, 0.2, 0.1]]).expand(len(f), 4)
    cdf = gate.tier_cdf(torch.zeros(1, 7))
    assert torch.allclose(cdf, torch.tensor([[0.5, 0.7, 0.9, 1.0]]))
    for knob, tier in ((0.5, 0), (0.6, 1), (0.7, 1), (0.95, 3), (1.0, 3)):  # >= the knob: a tie stops there
        chosen, confidence = gate.choose_tier(torch.zeros(1, 7), knob=knob)
        assert int(chosen) == tier, knob
        assert float(confidence) == pytest.approx(float(cdf[0, tier]))


def test_staged_gate_learns_to_stop_images_no_later_exit_gets_right() -> None:
    # half the images no exit gets right (stopping early loses nothing), the other half only
    # HEAVY gets right: the staged gate learns "safe to stop", not "this exit is right" (which
    # is false for both halves and would send the hopeless images all the way to HEAVY)
    from eexit.routing.routers import StagedGate

    g = torch.Generator().manual_seed(0)
    n = 128
    features = 0.1 * torch.randn(n, 4, 7, generator=g)
    hopeless = torch.arange(n) < n // 2
    features[:, :, 0] += torch.where(hopeless, 2.0, -2.0)[:, None]
    correct = torch.zeros(n, 4, dtype=torch.bool)
    correct[~hopeless, 3] = True
    gate = StagedGate().fit(features, correct, epochs=100).eval()
    with torch.no_grad():
        scores = [gate.stop_score(level, features[:, int(level)]) for level in list(ExitLevel)[:-1]]
    for level, score in zip(list(ExitLevel)[:-1], scores, strict=True):
        assert float(score[hopeless].min()) > 0.9, level.name
        assert float(score[~hopeless].max()) < 0.1, level.name


def test_staged_attributions_explain_the_continue_probability_against_the_deciding_exits_baseline(trained) -> None:
    # the staged gate's explained output is the continue-probability (1 - stop score) at the
    # exit that decided, and its reference the mean features of images that exit gets right:
    # completeness alone holds for any output and any baseline
    net, cal, x, _, _ = trained
    model = _mixed_model(net, cal, "staged", x)
    router = cal.routers["staged"]
    try:
        out = model(x[:64])
        res = attribute_output(cal, "staged", out)
        decided = out.decided_at.unique().tolist()
        assert len(decided) > 1, "the knob should mix the deciding exits"
        for k in decided:
            sel = out.decided_at == k
            stop = router.stop_score(ExitLevel(k), out.features[sel])
            torch.testing.assert_close(res.output[sel], 1.0 - stop, atol=1e-6, rtol=0)
            reference = 1.0 - router.stop_score(ExitLevel(k), cal.exit_baselines[k][None])
            torch.testing.assert_close(res.baseline_output[sel], reference.expand(int(sel.sum())), atol=1e-6, rtol=0)
        assert not torch.allclose(cal.exit_baselines[0], cal.baseline_features)  # the two references differ
    finally:
        router.set_knob(cal.fit_summary["staged"]["knob"])


@pytest.mark.parametrize("kind", ["staged", "cascade"])
def test_an_image_whose_stop_score_equals_the_knob_stops_as_calibration_simulated(trained, kind: str) -> None:
    # the knob is swept over the routers' own scores (ties are the rule, not an accident):
    # serving must stop an image whose score equals the knob, as calibration's simulate does
    net, cal, x, _, _ = trained
    model = cal.routed(net, kind)
    router = model.router
    records = collect_records(net, [(x, torch.zeros(len(x), dtype=torch.long))], cal.feature_kwargs)
    with torch.no_grad():
        scores = router.stop_score(ExitLevel.TINY, records.features[:, 0], records.probs[:, 0])
    j = int(scores.argsort()[len(scores) // 2])
    try:
        router.set_knob(float(scores[j]))
        assert float(router.knob) == float(scores[j])  # an exact tie
        tiers = model(x).tier
        assert int(tiers[j]) == int(ExitLevel.TINY)
        assert torch.equal(tiers, simulate(router, records, float(router.knob)))
    finally:
        router.set_knob(cal.fit_summary[kind]["knob"])


@pytest.mark.parametrize("kind", ["staged", "cascade"])
def test_staged_confidence_is_the_stop_score_and_its_complement_at_heavy(trained, kind: str) -> None:
    # an image stopped at exit k reports the stop score there; one sent on to HEAVY reports the
    # probability that stopping at MEDIUM would have lost it, 1 - MEDIUM's stop score
    net, cal, x, _, _ = trained
    model = _mixed_model(net, cal, kind, x)
    router = model.router
    try:
        out = model(x)
        records = collect_records(net, [(x, torch.zeros(len(x), dtype=torch.long))], cal.feature_kwargs)
        scores = torch.stack(
            [
                router.stop_score(lv, records.features[:, int(lv)], records.probs[:, int(lv)])
                for lv in list(ExitLevel)[:-1]
            ],
            dim=1,
        )
        heavy = out.tier == int(ExitLevel.HEAVY)
        assert heavy.any() and (~heavy).any(), "the knob should send some images to HEAVY and stop others"
        expected = torch.where(
            heavy, 1.0 - scores[:, int(ExitLevel.MEDIUM)], scores.gather(1, out.tier.clamp(max=2)[:, None]).squeeze(1)
        )
        torch.testing.assert_close(out.confidence, expected, atol=1e-5, rtol=0)
    finally:
        router.set_knob(cal.fit_summary[kind]["knob"])


def test_the_accuracy_drops_standard_error_is_the_paired_per_image_one() -> None:
    # 4 images, TINY wrong on the first, HEAVY right on all: at knob 0 the cascade stops all at
    # TINY, the per-image drops are [1, 0, 0, 0]: std 0.5 (n - 1), standard error 0.5 / sqrt(4)
    from eexit.routing.calibration import ExitRecords, sweep_folds
    from eexit.routing.routers import ConfidenceCascade

    probs = torch.zeros(4, 4, 2)
    probs[:, :, 0] = 0.9
    probs[:, :, 1] = 0.1
    probs[0, 0] = torch.tensor([0.2, 0.8])
    records = ExitRecords(torch.zeros(4, 4, 7), probs, torch.zeros(4, dtype=torch.long))
    (point,) = sweep_folds([(ConfidenceCascade(), records)], [1.0, 2.0, 3.0, 4.0], knobs=[0.0])
    assert point.tier_fractions == [1.0, 0.0, 0.0, 0.0] and point.accuracy == pytest.approx(0.75)
    assert point.drop_se == pytest.approx(0.25)


def test_tier_flops_are_per_image_whatever_the_timing_batch(trained) -> None:
    from eexit.routing.costs import count_flops, measure_tier_costs

    net, cal, x, _, _ = trained
    model = cal.routed(net, "cascade", optimize=True)
    costs = measure_tier_costs(model, x[:8], min_run_time=0.001, rounds=1)
    for level, cost in zip(ExitLevel, costs, strict=True):
        per_image = count_flops(model, x[:8], force_tier=int(level)) / 8 / 1e6
        assert cost.mflops == pytest.approx(per_image, rel=1e-6), level.name
        assert cost.batch_size == 8


def test_each_knob_is_fitted_on_images_its_router_did_not_learn_from(trained, monkeypatch) -> None:
    # two-fold cross-fit: each half is routed by a gate that learned on the other half (an
    # in-sample fit picks knobs on predictions the gate memorised)
    from eexit.routing import calibrate as calibrate_mod
    from eexit.routing.routers import OneShotGate, StagedGate

    net, _, x, _, calib = trained
    records = collect_records(net, calib)

    def rows(t: torch.Tensor) -> set[tuple[float, ...]]:
        return {tuple(r) for r in t.reshape(len(t), -1).tolist()}

    learned: dict[int, set] = {}
    for cls in (OneShotGate, StagedGate):
        original = cls.fit

        def fit(self, features, *args, _original=original, **kwargs):
            learned[id(self)] = rows(features[:, 0] if features.dim() == 3 else features)
            return _original(self, features, *args, **kwargs)

        monkeypatch.setattr(cls, "fit", fit)
    swept: list = []
    original_sweep = calibrate_mod.sweep_folds
    monkeypatch.setattr(
        calibrate_mod, "sweep_folds", lambda folds, *a, **k: swept.append(list(folds)) or original_sweep(folds, *a, **k)
    )
    # the costs are not what this test is about: one stand-in, not a timing per router
    from eexit.routing.costs import TierCost

    flat = [TierCost(lv.key, 1.0 + lv, 1.0 + lv, 16, "cpu") for lv in ExitLevel]
    monkeypatch.setattr(calibrate_mod, "measure_tier_costs", lambda *a, **k: list(flat))
    monkeypatch.setattr(calibrate_mod, "rescale_to_routed_batch", lambda model, example, costs, *a, **k: costs)
    calibrate(net, [], x[:16], records=records, min_run_time=0.001)
    learned_folds = [folds for folds in swept if len(folds) == 2]
    assert len(learned_folds) == 2  # the one-shot and the staged gate
    everything = rows(records.features[:, 0])
    for folds in learned_folds:
        routed = [rows(recs.features[:, 0]) for _, recs in folds]
        assert routed[0] | routed[1] == everything and not routed[0] & routed[1]
        for (router, _), seen in zip(folds, routed, strict=True):
            assert learned[id(router)] and not learned[id(router)] & seen


# ------------------------------------------ mutation audit: knob sweeps and fits on crafted records


def _two_class_records(conf: torch.Tensor, correct: torch.Tensor, features: torch.Tensor | None = None) -> ExitRecords:
    """Records of two classes (label 0): exit k of image i gives its predicted class the
    probability ``conf[i, k]`` and predicts the label when ``correct[i, k]``; ``features``
    ``(n, 4, 7)`` (zeros by default)."""
    n = len(conf)
    top = torch.where(correct, 0, 1)  # the class each exit predicts
    probs = torch.zeros(n, 4, 2)
    probs.scatter_(2, top[:, :, None], conf[:, :, None])
    probs.scatter_(2, (1 - top)[:, :, None], (1 - conf)[:, :, None])
    features = torch.zeros(n, 4, 7) if features is None else features
    return ExitRecords(features, probs, torch.zeros(n, dtype=torch.long))


def _cascade_records(tiny_conf: list[float], correct: list[list[int]]) -> ExitRecords:
    """Two-class records whose exits say: TINY's top softmax ``tiny_conf[i]``, the other exits
    0.95, and exit k predicts the label when ``correct[i][k]``."""
    conf = torch.tensor([[c, 0.95, 0.95, 0.95] for c in tiny_conf])
    return _two_class_records(conf, torch.tensor(correct, dtype=torch.bool))


def test_sweep_folds_scores_each_fold_on_its_own_records() -> None:
    """The tiers of the folds are compared with the records in the same fold order."""
    from eexit.routing.calibration import sweep_folds
    from eexit.routing.routers import ConfidenceCascade

    confident = _cascade_records([0.9], [[1, 1, 1, 1]])  # one image TINY is sure of, and right
    unsure = _cascade_records([0.6] * 3, [[0, 1, 1, 1]] * 3)  # three TINY is unsure of, and wrong
    cascade = ConfidenceCascade()
    (point,) = sweep_folds([(cascade, confident), (cascade, unsure)], [1.0, 2.0, 3.0, 4.0], knobs=[0.8])
    # the sure image stops at TINY, the three unsure ones at LIGHT: every image right
    assert point.accuracy == 1.0 and point.tier_fractions == [0.25, 0.75, 0.0, 0.0]
    assert point.mean_cost == pytest.approx((1.0 + 3 * 2.0) / 4)


def test_sweep_folds_tries_the_knob_candidates_of_every_fold() -> None:
    from eexit.routing.calibration import _ABOVE_ONE, sweep_folds
    from eexit.routing.routers import ConfidenceCascade

    a = _cascade_records([0.9, 0.9], [[1, 1, 1, 1]] * 2)
    b = _cascade_records([0.6, 0.6], [[0, 1, 1, 1]] * 2)
    cascade = ConfidenceCascade()
    knobs = [p.knob for p in sweep_folds([(cascade, a), (cascade, b)], [1.0, 2.0, 3.0, 4.0])]
    # quantiles of the scores of both folds (interpolated between them), and both ends
    assert {float(torch.tensor(v)) for v in (0.6, 0.9, 0.95)} <= set(knobs)
    assert knobs[0] == 0.0 and knobs[-1] == _ABOVE_ONE and knobs == sorted(set(knobs))


def test_a_sweep_with_given_knobs_tries_those_knobs_only() -> None:
    from eexit.routing.routers import ConfidenceCascade

    records = _cascade_records([0.9, 0.6], [[1, 1, 1, 1], [0, 1, 1, 1]])
    points = sweep(ConfidenceCascade(), records, [1.0, 2.0, 3.0, 4.0], knobs=[0.7, 0.5])
    assert [p.knob for p in points] == [0.5, 0.7]  # ascending
    assert [p.tier_fractions for p in points] == [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]


def test_the_drop_se_of_a_one_image_sweep_is_zero_not_nan() -> None:
    from eexit.routing.calibration import sweep_folds
    from eexit.routing.routers import ConfidenceCascade

    records = _cascade_records([0.6], [[0, 1, 1, 1]])
    (point,) = sweep_folds([(ConfidenceCascade(), records)], [1.0, 2.0, 3.0, 4.0], knobs=[0.0])
    assert point.accuracy == 0.0 and point.drop_se == 0.0


def test_knob_candidates_are_the_stop_scores_of_every_exit_before_heavy() -> None:
    from eexit.routing.calibration import _ABOVE_ONE, knob_candidates
    from eexit.routing.routers import ConfidenceCascade

    records = _cascade_records([0.6, 0.6], [[1, 1, 1, 1]] * 2)
    records.probs[:, 1] = torch.tensor([0.7, 0.3])  # LIGHT's top softmax 0.7
    records.probs[:, 2] = torch.tensor([0.2, 0.8])  # MEDIUM's 0.8; HEAVY's 0.95 is never a stop score
    knobs = knob_candidates(ConfidenceCascade(), records)
    assert {float(torch.tensor(v)) for v in (0.6, 0.7, 0.8)} <= set(knobs)
    assert knobs[0] == 0.0 and knobs[-2] == float(torch.tensor(0.8)) and knobs[-1] == _ABOVE_ONE


def test_one_shot_knob_candidates_are_the_cumulative_probabilities_below_heavy() -> None:
    from eexit.routing.calibration import _ABOVE_ONE, knob_candidates
    from eexit.routing.routers import OneShotGate

    gate = OneShotGate(num_features=7)
    gate.tier_probs = lambda f: torch.tensor([[0.5, 0.25, 0.125, 0.125]]).expand(len(f), 4)
    records = _cascade_records([0.6, 0.6], [[1, 1, 1, 1]] * 2)
    knobs = knob_candidates(gate, records)
    assert {0.0, 0.5, 0.75, 0.875, _ABOVE_ONE} <= set(knobs)
    assert knobs[-2] == 0.875 and knobs[-1] == _ABOVE_ONE  # not HEAVY's cumulative 1.0


def test_without_a_finite_score_the_knobs_are_still_both_ends() -> None:
    from eexit.routing.calibration import _ABOVE_ONE, knob_candidates
    from eexit.routing.routers import ConfidenceCascade

    records = _cascade_records([0.6, 0.6], [[1, 1, 1, 1]] * 2)
    records.probs[:] = float("nan")
    assert knob_candidates(ConfidenceCascade(), records) == [0.0, _ABOVE_ONE]  # all to TINY, all to HEAVY


def test_points_of_equal_cost_share_one_fitted_drop_and_the_more_accurate_one_is_chosen() -> None:
    # two knobs route at the same cost (e.g. the same tier mix) with different accuracy
    worse = SweepPoint(0.1, 0.88, 1.0, [1, 0, 0, 0], 0.0)
    better = SweepPoint(0.2, 0.895, 1.0, [1, 0, 0, 0], 0.0)
    heavy = SweepPoint(1.0, 0.9, 4.0, [0, 0, 0, 1], 0.0)
    for points in ([worse, better, heavy], [better, worse, heavy]):
        assert monotone_drops(points, 0.9) == pytest.approx([0.0125, 0.0125, 0.0])
        assert choose_knob(points, 0.9, max_drop=0.02) is better
        assert choose_knob(points, 0.9, max_drop=0.02, monotone=False) is better


def test_when_no_knob_meets_the_target_the_cheapest_most_accurate_is_chosen() -> None:
    points = [
        SweepPoint(0.1, 0.80, 1.0, [1, 0, 0, 0], 0.0),
        SweepPoint(0.2, 0.85, 2.0, [0, 1, 0, 0], 0.0),
        SweepPoint(0.3, 0.85, 3.0, [0, 0, 1, 0], 0.0),
        SweepPoint(0.4, 0.84, 4.0, [0, 0, 0, 1], 0.0),
    ]
    for monotone in (True, False):
        assert choose_knob(points, 0.9, max_drop=0.01, monotone=monotone) is points[1]


def test_tier_profiles_are_the_10th_and_90th_percentiles_of_each_tiers_images() -> None:
    from eexit.routing.calibrate import tier_profiles
    from eexit.routing.features import FEATURE_NAMES

    # eleven TINY images whose features are 0, 1, ..., 10 (times the feature's index + 1), and
    # one HEAVY image; no image of LIGHT or MEDIUM
    values = torch.arange(11.0)[:, None] * torch.arange(1.0, 8.0)[None]
    features = torch.cat([values, torch.full((1, 7), 100.0)])
    tiers = torch.tensor([0] * 11 + [3])
    profiles = tier_profiles(features, tiers)
    assert list(profiles) == ["tiny", "heavy"]
    assert list(profiles["tiny"]) == list(FEATURE_NAMES)
    for i, name in enumerate(FEATURE_NAMES):
        assert profiles["tiny"][name] == pytest.approx([1.0 * (i + 1), 9.0 * (i + 1)])
        assert profiles["heavy"][name] == [100.0, 100.0]  # one image: both percentiles are its value


# --------------------------------- mutation audit: calibrate() on crafted records, fixed tier costs

# which exits get each of 16 images right: oracle tiers 0 (six, two of them no exit right),
# 1 (four), 2 (three) and 3 (three); TINY right on 4, HEAVY on 12
_CRAFTED_CORRECT = [
    [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0],
    [0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 0, 1], [0, 1, 1, 0],
    [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1],
    [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1],
]  # fmt: skip


def _calibrate_watched(
    mp: pytest.MonkeyPatch, net, example: torch.Tensor, records: ExitRecords, costs: list, calls: dict, **kwargs
) -> Calibration:
    """``calibrate`` on ``records`` with fixed tier ``costs``, gate fits of 5 epochs instead of 300
    (what is tested is which images and arguments they get) and ``choose_knob`` / ``sweep_folds``
    watched: ``calls["choose_knob"]`` gets the arguments of each knob fit and ``calls["folds"]``
    the records of each cross-fitted pair of folds."""
    import functools

    from eexit.routing import calibrate as calibrate_mod
    from eexit.routing import routers

    original_choose_knob, original_sweep = calibrate_mod.choose_knob, calibrate_mod.sweep_folds

    def watched_choose_knob(points, *args):
        calls.setdefault("choose_knob", []).append(args)
        return original_choose_knob(points, *args)

    def watched_sweep(folds, *args, **kw):
        if len(folds) == 2:
            calls.setdefault("folds", []).append([recs for _, recs in folds])
        return original_sweep(folds, *args, **kw)

    mp.setattr(routers, "_fit_classifier", functools.partial(routers._fit_classifier, epochs=5))
    mp.setattr(calibrate_mod, "measure_tier_costs", lambda *a, **k: list(costs))
    mp.setattr(calibrate_mod, "rescale_to_routed_batch", lambda model, example, costs, *a, **k: costs)
    mp.setattr(calibrate_mod, "choose_knob", watched_choose_knob)
    mp.setattr(calibrate_mod, "sweep_folds", watched_sweep)
    return calibrate(net, [], example, records=records, min_run_time=0.001, **kwargs)


@pytest.fixture(scope="module")
def crafted_calibration():
    """``calibrate`` on 16 crafted records (the fewest it accepts) with tier costs 1..4 MFLOPs,
    a loose target and ``choose_knob`` / ``sweep_folds`` watched: ``(cal, records, net, example,
    calls)`` with ``calls`` as ``_calibrate_watched`` records them."""
    from eexit.routing.costs import TierCost

    g = torch.Generator().manual_seed(0)
    features = torch.rand(16, 4, 7, generator=g)
    conf = 0.5 + 0.5 * torch.rand(16, 4, generator=g)  # top softmax of each exit
    records = _two_class_records(conf, torch.tensor(_CRAFTED_CORRECT, dtype=torch.bool), features)
    torch.manual_seed(0)
    net = create_model("resnet_micro", in_chans=1, num_classes=2).eval()
    example = torch.randn(4, 1, 16, 16, generator=g)
    calls: dict[str, list] = {}
    flat = [TierCost(lv.key, 1.0 + lv, 1.0 + lv, 16, "cpu") for lv in ExitLevel]
    with pytest.MonkeyPatch.context() as mp:
        cal = _calibrate_watched(
            mp, net, example, records, flat, calls, max_drop=0.3, margin_se=0.5, monotone=False, seed=3
        )
    return cal, records, net, example, calls


def test_calibration_accepts_exactly_the_fewest_images_it_needs(crafted_calibration) -> None:
    cal = crafted_calibration[0]
    assert set(cal.routers) == set(KINDS) and set(cal.fit_summary) == set(KINDS)


def test_every_knob_is_fitted_with_the_given_target_margin_and_monotone_setting(crafted_calibration) -> None:
    cal, _, _, _, calls = crafted_calibration
    heavy = 12 / 16  # HEAVY's accuracy on the split, not TINY's (4 / 16)
    assert calls["choose_knob"] == [(heavy, 0.3, 0.5, False)] * 3
    for kind in KINDS:
        assert cal.fit_summary[kind]["accuracy_heavy"] == heavy, kind


def test_the_served_routers_keep_the_fitted_knobs_and_the_summary_their_accuracy(crafted_calibration) -> None:
    from eexit.routing.calibration import sweep_folds

    cal, records, _, _, _ = crafted_calibration
    for kind in KINDS:
        summary = cal.fit_summary[kind]
        assert float(cal.routers[kind].knob) == summary["knob"], kind
    # the cascade learns nothing: its summary is its own in-sample routing at that knob
    cascade = cal.fit_summary["cascade"]
    (point,) = sweep_folds([(cal.routers["cascade"], records)], [1.0, 2.0, 3.0, 4.0], knobs=[cascade["knob"]])
    assert cascade["accuracy"] == point.accuracy and cascade["tier_fractions"] == point.tier_fractions
    assert cascade["accuracy"] < cascade["accuracy_heavy"]  # the loose target lets it lose some


def test_the_flops_ratio_weighs_each_tiers_flops_by_its_fraction_against_one_heavy_image(crafted_calibration) -> None:
    from eexit.routing.costs import count_flops

    cal, _, net, example, _ = crafted_calibration
    heavy_mflops = count_flops(net.predict_exit, example[:1], ExitLevel.HEAVY) / 1e6
    for kind in KINDS:
        fractions = cal.fit_summary[kind]["tier_fractions"]
        expected = sum(f * (1.0 + t) for t, f in enumerate(fractions)) / heavy_mflops
        assert cal.fit_summary[kind]["flops_ratio"] == pytest.approx(expected, rel=1e-9), kind


def test_the_explanation_baselines_and_tier_profiles_come_from_the_right_images(crafted_calibration) -> None:
    from eexit.routing.calibrate import tier_profiles

    cal, records, _, _, _ = crafted_calibration
    correct = torch.tensor(_CRAFTED_CORRECT, dtype=torch.bool)
    oracle = torch.tensor([0] * 6 + [1] * 4 + [2] * 3 + [3] * 3)
    tiny = records.features[:, 0]
    # one-shot gate: TINY features of the images whose oracle tier is TINY (none right included)
    torch.testing.assert_close(cal.baseline_features, tiny[:6].mean(0), atol=0, rtol=0)
    # staged gate, per exit: that exit's features of the images that exit gets right
    for k in range(4):
        torch.testing.assert_close(cal.exit_baselines[k], records.features[correct[:, k], k].mean(0), atol=0, rtol=0)
    assert cal.tier_profiles == tier_profiles(tiny, oracle)
    state = Calibration.from_state(json.loads(json.dumps(cal.to_state())))
    torch.testing.assert_close(state.exit_baselines, cal.exit_baselines)
    torch.testing.assert_close(state.baseline_features, cal.baseline_features)


def test_the_cross_fitting_halves_follow_the_seed(crafted_calibration, monkeypatch) -> None:
    cal, records, net, example, calls = crafted_calibration

    def halves(recorded: list) -> list[set]:
        """The two halves of a cross-fit as sets of image numbers (the features identify them)."""
        rows = {tuple(f.flatten().tolist()): i for i, f in enumerate(records.features)}
        return [{rows[tuple(f.flatten().tolist())] for f in recs.features} for recs in recorded]

    seed3 = halves(calls["folds"][0])
    assert [len(h) for h in seed3] == [8, 8] and seed3[0] | seed3[1] == set(range(16))
    assert halves(calls["folds"][1]) == seed3  # the one-shot and the staged gate: one split
    seen: dict[str, list] = {}
    _calibrate_watched(monkeypatch, net, example, records, cal.tier_costs["gate"], seen, seed=4)
    assert halves(seen["folds"][0]) != seed3  # another seed, another split


# ---------------------------------------- mutation audit: decision rows of a crafted routed batch


def _crafted_costs() -> list:
    """Tier costs whose latencies and MFLOPs differ from each other and across tiers."""
    from eexit.routing.costs import TierCost

    return [
        TierCost(lv.key, mflops=10.0 * (lv + 1), latency_ms=0.5 * (lv + 1), batch_size=8, device="cpu")
        for lv in ExitLevel
    ]


def test_decision_rows_take_the_cost_of_the_served_tier_and_the_label_of_the_top_class() -> None:
    from eexit.routing.decisions import decision_rows
    from eexit.routing.engine import RoutedOutput
    from eexit.routing.features import FEATURE_NAMES

    logits = torch.tensor([[0.0, 1.0, 3.0], [2.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    features = torch.arange(21.0).view(3, 7) / 32
    out = RoutedOutput(
        logits, torch.tensor([0, 2, 3]), torch.tensor([0.75, 0.5, 0.25]), features, torch.tensor([0, 0, 0])
    )
    rows = decision_rows(out, _crafted_costs(), ["cat", "dog", "eel"])
    assert [(r["tier"], r["latency_ms"], r["mflops"]) for r in rows] == [
        ("tiny", 0.5, 10.0),
        ("medium", 1.5, 30.0),
        ("heavy", 2.0, 40.0),
    ]
    assert [(r["label"], r["label_index"]) for r in rows] == [("eel", 2), ("cat", 0), ("dog", 1)]
    assert [r["confidence"] for r in rows] == [0.75, 0.5, 0.25]
    probs = torch.softmax(logits.double(), dim=1).amax(dim=1).tolist()
    assert [r["probability"] for r in rows] == pytest.approx(probs, abs=1e-7)
    assert rows[1]["features"] == dict(zip(FEATURE_NAMES, features[1].tolist(), strict=True))
    assert [r["label"] for r in decision_rows(out, _crafted_costs())] == ["2", "0", "1"]  # no class names


def test_a_forced_row_costs_the_forced_exit_not_the_routers_own_choice() -> None:
    from eexit.routing.decisions import decision_rows
    from eexit.routing.engine import RoutedOutput

    out = RoutedOutput(
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
        torch.tensor([3, 3, 3]),
        torch.tensor([0.9, 0.8, 0.7]),
        torch.zeros(3, 7),
        torch.tensor([1, 2, 0]),
        router_tier=torch.tensor([1, -1, 0]),
    )
    rows = decision_rows(out, _crafted_costs())
    assert all(r["forced"] and r["tier"] == "heavy" for r in rows)
    assert [(r["latency_ms"], r["mflops"]) for r in rows] == [(2.0, 40.0)] * 3
    assert [r["router_tier"] for r in rows] == ["light", None, "tiny"]


def test_an_image_with_one_non_finite_logit_has_no_prediction() -> None:
    from eexit.routing.decisions import decision_rows
    from eexit.routing.engine import RoutedOutput

    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, float("inf"), 1.0], [float("nan"), 1.0, 0.0]])
    out = RoutedOutput(logits, torch.tensor([1, 1, 1]), torch.full((3,), 0.5), torch.zeros(3, 7), torch.ones(3))
    rows = decision_rows(out, _crafted_costs(), ["a", "b", "c"])
    assert [r["label"] for r in rows] == ["c", None, None]
    assert [r["confidence"] for r in rows] == [0.5, 0.0, 0.0] and [r["router_tier"] for r in rows] == [
        "light",
        None,
        None,
    ]
    json.dumps(rows, allow_nan=False)


def _hand_calibration(exit_baselines: torch.Tensor | None) -> Calibration:
    """A calibration of untrained routers (seeded) with distinct explanation baselines."""
    from eexit.routing.routers import ConfidenceCascade, OneShotGate, StagedGate

    torch.manual_seed(0)
    routers = {"gate": OneShotGate().eval(), "staged": StagedGate().eval(), "cascade": ConfidenceCascade().eval()}
    costs = {k: _crafted_costs() for k in routers}
    return Calibration(routers, costs, torch.full((7,), 0.25), {}, exit_baselines)


def test_the_one_shot_gate_is_explained_against_the_oracle_tiny_baseline() -> None:
    from eexit.explain.gate_attribution import ExpectedTier
    from eexit.routing.engine import RoutedOutput

    cal = _hand_calibration(torch.rand(4, 7, generator=torch.Generator().manual_seed(1)))
    features = torch.rand(5, 7, generator=torch.Generator().manual_seed(2))
    out = RoutedOutput(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long), torch.ones(5), features, torch.zeros(5))
    res = attribute_output(cal, "gate", out)
    score = ExpectedTier(cal.routers["gate"].logits_module())
    with torch.no_grad():
        torch.testing.assert_close(res.baseline_output, score(cal.baseline_features[None])[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(res.output, score(features), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.attributions.sum(1), res.output - res.baseline_output, atol=1e-5, rtol=0)


def test_staged_decisions_without_exit_baselines_cannot_be_explained() -> None:
    from eexit.routing.engine import RoutedOutput

    cal = _hand_calibration(None)
    out = RoutedOutput(
        torch.zeros(2, 3),
        torch.zeros(2, dtype=torch.long),
        torch.ones(2),
        torch.rand(2, 7),
        torch.zeros(2, dtype=torch.long),
    )
    with pytest.raises(ValueError, match=r"no per-exit explanation baselines \(exit_baselines\).*--no-attributions"):
        attribute_output(cal, "staged", out)
    assert attribute_output(cal, "gate", out) is not None  # the one-shot gate needs none


def test_calibration_settings_without_a_router_group_are_calibrates_own_defaults() -> None:
    import inspect

    from eexit.routing.calibrate import DEFAULT_MARGIN_SE, calibration_settings

    settings = calibration_settings({}, None)
    assert settings == {
        "max_drop": 0.005,
        "margin_se": DEFAULT_MARGIN_SE,
        "monotone": True,
        "cost_key": "mflops",
        "min_run_time": 0.3,
        "seed": 0,
    }
    defaults = {k: p.default for k, p in inspect.signature(calibrate).parameters.items() if k in settings}
    assert defaults == settings and DEFAULT_MARGIN_SE == 1.645


def test_records_are_collected_with_the_feature_settings_the_router_is_served_with() -> None:
    """The knob is fitted on the features serving computes: ``collect_records`` passes its
    ``feature_kwargs`` on (a lower edge threshold raises ``spatial_complexity``)."""
    from eexit.routing.features import FEATURE_NAMES
    from eexit.routing.routers import OneShotGate

    torch.manual_seed(0)
    net = create_model("resnet_micro", in_chans=1, num_classes=3).eval()
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    batches = [(x, torch.zeros(6, dtype=torch.long))]
    kwargs = {"edge_threshold": 0.05, "grid": 2}
    records = collect_records(net, batches, kwargs)
    served = RoutedClassifier(net, OneShotGate().eval(), kwargs)(x)
    torch.testing.assert_close(records.features[:, 0], served.features, atol=1e-6, rtol=0)
    default = collect_records(net, batches)
    edges = FEATURE_NAMES.index("spatial_complexity")
    assert bool((records.features[:, 0, edges] > default.features[:, 0, edges]).all())


# --- pinned by the mutation audit of the routing modules (hand-built routers, untrained net) ----


def _micro_net() -> torch.nn.Module:
    """An untrained micro network in eval mode (its routing needs no training to be checked)."""
    torch.manual_seed(0)
    return create_model("resnet_micro", in_chans=1, num_classes=4).eval()


def test_standardize_centres_on_the_mean_and_divides_by_the_population_std() -> None:
    """Samples 1, 3, 5: mean 3 and population std sqrt(8/3) (not the n - 1 one), divided by; a
    spread at most 1e-6 of the feature's magnitude keeps the unit std."""
    from eexit.routing.routers import Standardize

    scale = Standardize(1).fit(torch.tensor([[1.0], [3.0], [5.0]]))
    assert scale.mean.item() == pytest.approx(3.0) and scale.std.item() == pytest.approx((8 / 3) ** 0.5)
    assert scale(torch.tensor([[7.0]])).item() == pytest.approx(4 / (8 / 3) ** 0.5, rel=1e-6)
    # "nearly constant" is relative to the feature's magnitude: a spread of 0.5 around 1e6 is
    # below 1e-6 of it (unit kept), the same spread around 0 is not
    near = Standardize(2).fit(torch.tensor([[1e6 - 0.5, -0.5], [1e6 + 0.5, 0.5]]))
    assert near.std.tolist() == [1.0, 0.5]


def test_one_shot_cdf_ends_at_exactly_one_and_so_does_a_knob_of_one() -> None:
    """The cumulative tier probabilities' last column is set to 1, not left to the softmax's
    rounding: a knob of 1 sends every image to HEAVY at most, with confidence exactly 1."""
    from eexit.routing.routers import OneShotGate

    torch.manual_seed(0)
    gate = OneShotGate()
    f = torch.randn(256, 7, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(gate.tier_probs(f).cumsum(dim=1)[:, -1], torch.ones(256))  # rounding is real
    cdf = gate.tier_cdf(f)
    assert torch.equal(cdf[:, -1], torch.ones(256))
    tier, confidence = gate.choose_tier(f, knob=1.0)
    heavy = tier == int(ExitLevel.HEAVY)
    assert heavy.any() and torch.equal(confidence[heavy], torch.ones(int(heavy.sum())))


def test_one_shot_gate_learns_on_standardised_features_it_is_served() -> None:
    """Features far from zero (around 100) that separate TINY from HEAVY images: the gate is trained
    on the standardised features, the same ones it reads at serving, and routes them apart."""
    from eexit.routing.routers import OneShotGate

    g = torch.Generator().manual_seed(0)
    n = 128
    heavy = torch.arange(n) % 2 == 1
    features = 100.0 + torch.randn(n, 7, generator=g)
    features[:, 0] += torch.where(heavy, 5.0, -5.0)
    oracle = torch.where(heavy, int(ExitLevel.HEAVY), int(ExitLevel.TINY))
    gate = OneShotGate().fit(features, oracle, epochs=60)
    with torch.no_grad():
        tier, _ = gate.choose_tier(features, knob=0.5)
    assert torch.equal(tier, oracle)


def test_staged_gate_fits_each_exit_on_its_own_features_and_target() -> None:
    """Half the images are right from MEDIUM on, half everywhere; each exit's features sit 10 apart.
    Each exit standardises with its own statistics, learns its own "safe to stop" target (stop the
    first half only at MEDIUM) and is served with its own scale."""
    from eexit.routing.routers import StagedGate

    g = torch.Generator().manual_seed(0)
    n = 128
    late = torch.arange(n) < n // 2
    features = 0.1 * torch.randn(n, 4, 7, generator=g) + 10.0 * torch.arange(4.0)[None, :, None]
    features[:, :, 0] += torch.where(late, 2.0, -2.0)[:, None]
    correct = torch.ones(n, 4, dtype=torch.bool)
    correct[late, :2] = False
    gate = StagedGate().fit(features, correct, epochs=60).eval()
    for k in range(3):
        assert torch.allclose(gate.scales[k].mean, features[:, k].double().mean(0).float(), atol=1e-5), k
    with torch.no_grad():
        scores = [gate.stop_score(level, features[:, int(level)]) for level in list(ExitLevel)[:-1]]
    for level in (ExitLevel.TINY, ExitLevel.LIGHT):
        assert float(scores[level][late].max()) < 0.1 and float(scores[level][~late].min()) > 0.9, level.name
    assert float(scores[ExitLevel.MEDIUM].min()) > 0.9


@pytest.mark.parametrize("kind", ["gate", "staged"])
def test_a_router_rebuilt_from_its_config_takes_its_state(kind: str) -> None:
    """``config`` records the knob, the width and the feature count: a router of non-default size
    is rebuilt with its knob and the same shapes, loads its state strictly and gives the same scores."""
    from eexit.routing.routers import OneShotGate, StagedGate, build_router

    torch.manual_seed(0)
    router = OneShotGate(num_features=5, hidden=8) if kind == "gate" else StagedGate(num_features=5, hidden=4)
    router.set_knob(0.3)
    again = build_router(router.config())
    assert float(again.knob) == pytest.approx(0.3)  # the knob from the config alone
    again.load_state_dict(router.state_dict())
    f = torch.randn(6, 5)
    with torch.no_grad():
        if kind == "gate":
            assert torch.equal(again.tier_cdf(f), router.tier_cdf(f))
        else:
            assert torch.equal(again.stop_score(ExitLevel.LIGHT, f), router.stop_score(ExitLevel.LIGHT, f))


def test_predict_exit_chunked_runs_every_chunk() -> None:
    """Ten images in chunks of 4 (4 + 4 + 2): the logits of all ten, as one call gives them."""
    from eexit.routing.engine import predict_exit_chunked

    net = _micro_net()
    x = torch.randn(10, 1, 16, 16)
    for level in ExitLevel:
        chunked = predict_exit_chunked(net, x, level, chunk_size=4)
        assert chunked.shape == (10, 4)
        assert torch.allclose(chunked, net.predict_exit(x, level), atol=1e-5), level.name


def test_a_non_square_input_size_is_height_then_width() -> None:
    """``input_size=(16, 12)`` takes 16-row, 12-column images and refuses the transposed ones."""
    from eexit.routing.routers import ConfidenceCascade

    model = RoutedClassifier(_micro_net(), ConfidenceCascade(), input_size=(16, 12))
    assert model(torch.randn(2, 1, 16, 12)).tier.shape == (2,)
    with pytest.raises(ValueError, match=r"expected images of 16x12 pixels .* got 12x16"):
        model(torch.randn(2, 1, 12, 16))


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_batch_routes_to_an_empty_output(kind: str, chunk_size: int | None) -> None:
    """A batch of no image gives empty outputs of the right shapes, whatever the chunking."""
    from eexit.routing.routers import ROUTERS

    model = RoutedClassifier(_micro_net(), ROUTERS[kind](), chunk_size=chunk_size)
    out = model(torch.empty(0, 1, 16, 16), with_heatmap=True)
    assert out.logits.shape == (0, 4) and out.tier.shape == out.confidence.shape == (0,)
    assert out.features.shape == (0, 7) and out.heatmap.shape == (0, 16, 16)


@pytest.mark.parametrize("knob", [0.0, 2.0])  # 0: every image stops at TINY; 2: none stops before HEAVY
def test_the_heatmap_is_the_deciding_exits_cam_upsampled_bilinearly(knob: float) -> None:
    """The heatmap is the Grad-CAM of the exit that answered, for its predicted class, upsampled
    to the input size with ``bilinear`` and ``align_corners=False`` (HEAVY's 2 x 2 cam shows it)."""
    from eexit.explain.gradcam import gradcam
    from eexit.routing.routers import ConfidenceCascade

    net = _micro_net()
    router = ConfidenceCascade()
    router.set_knob(knob)
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    out = RoutedClassifier(net, router)(x, with_heatmap=True)
    level = ExitLevel.TINY if knob == 0.0 else ExitLevel.HEAVY
    assert (out.tier == int(level)).all()
    with torch.no_grad():
        cam = gradcam(net.heads[level], net.forward_heads(x)[level])
    expected = torch.nn.functional.interpolate(cam[:, None], size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(out.heatmap, expected[:, 0], atol=1e-6)


def test_the_staged_gate_computes_no_features_at_heavy(monkeypatch) -> None:
    """Features feed the stop rule of an early exit; HEAVY has none, so an image sent all the
    way computes them at TINY, LIGHT and MEDIUM only (their cost is part of each tier's)."""
    from eexit.routing import engine
    from eexit.routing.routers import StagedGate

    net = _micro_net()
    torch.manual_seed(0)
    router = StagedGate()
    router.set_knob(2.0)  # above any stop score: every image goes on to HEAVY
    seen: list[int] = []
    original = engine.exit_features

    def recording(image, stage_map, out, head, *args, **kwargs):
        seen.append(next(k for k, h in enumerate(net.heads) if h is head))
        return original(image, stage_map, out, head, *args, **kwargs)

    monkeypatch.setattr(engine, "exit_features", recording)
    out = RoutedClassifier(net, router)(torch.randn(4, 1, 16, 16))
    assert (out.tier == int(ExitLevel.HEAVY)).all()
    assert seen == [0, 1, 2]


def test_an_image_whose_logits_overflow_gets_confidence_zero_not_nan() -> None:
    """Finite pixels large enough to overflow the logits (NaN): the cascade's stop score (the
    top softmax probability) is NaN, and the routed output itself reports confidence 0, not only
    the decision rows built from it; the gates score finite features and stay finite."""
    from eexit.routing.routers import ROUTERS

    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    x[1] = 3.4e38
    for kind in KINDS:
        out = RoutedClassifier(_micro_net(), ROUTERS[kind]())(x)
        assert out.logits[1].isnan().any() and torch.isfinite(out.confidence).all(), kind
    assert out.confidence[1].item() == 0.0 and (out.confidence[[0, 2]] > 0).all()  # the cascade


def test_tier_costs_are_per_image_on_the_served_threads_and_timed_in_eval_mode(monkeypatch) -> None:
    """``measure_tier_costs`` divides each tier's batch time by the batch size, records the
    threads and device, raises a latency below a cheaper tier's to it, and puts the model in eval
    mode itself (a model left in training mode would be refused)."""
    from eexit.routing import costs as costs_mod
    from eexit.routing.routers import ConfidenceCascade

    model = RoutedClassifier(_micro_net(), ConfidenceCascade())
    model.train()
    monkeypatch.setattr(costs_mod, "measure_latencies", lambda fns, *a, **k: [0.008, 0.016, 0.024, 0.032])
    costs = costs_mod.measure_tier_costs(model, torch.randn(8, 1, 16, 16))
    assert not model.net.training
    assert [c.latency_ms for c in costs] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert all(c.batch_size == 8 and c.device == "cpu" for c in costs)
    assert all(c.num_threads == torch.get_num_threads() and c.latency_basis == "forced" for c in costs)
    # a noisy timing with LIGHT below TINY: raised to TINY's, so that no tier looks cheaper
    monkeypatch.setattr(costs_mod, "measure_latencies", lambda fns, *a, **k: [0.016, 0.008, 0.024, 0.016])
    costs = costs_mod.measure_tier_costs(model, torch.randn(8, 1, 16, 16))
    assert [c.latency_ms for c in costs] == pytest.approx([2.0, 2.0, 3.0, 3.0])


def test_latency_is_timed_on_the_threads_the_model_is_served_with(monkeypatch) -> None:
    """``measure_latency`` times on ``torch.get_num_threads()`` threads unless told otherwise
    (``benchmark.Timer`` alone would time on one)."""
    from torch.utils import benchmark

    from eexit.routing.costs import measure_latency

    threads: list[int] = []

    class FakeTimer:
        def __init__(self, stmt: str, globals: dict, num_threads: int) -> None:
            threads.append(num_threads)

        def blocked_autorange(self, min_run_time: float):
            return type("Measurement", (), {"median": 0.25})()

    monkeypatch.setattr(benchmark, "Timer", FakeTimer)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert measure_latency(lambda: None, 0.01) == 0.25
    assert measure_latency(lambda: None, 0.01, num_threads=1) == 0.25
    assert threads == [3, 1]


def test_routed_tier_costs_are_the_forced_ones_rescaled(monkeypatch) -> None:
    """``measure_routed_tier_costs`` returns the forced costs rescaled to the routed batch."""
    from eexit.routing import costs as costs_mod

    forced, routed = ["forced"], ["routed"]
    calls: list[tuple] = []
    monkeypatch.setattr(costs_mod, "measure_tier_costs", lambda model, example, t: calls.append(("m", t)) or forced)
    monkeypatch.setattr(
        costs_mod,
        "rescale_to_routed_batch",
        lambda model, example, costs, t: calls.append(("r", costs, t)) or routed,
    )
    assert costs_mod.measure_routed_tier_costs("model", "example", min_run_time=0.2) is routed
    assert calls == [("m", 0.2), ("r", forced, 0.2)]
