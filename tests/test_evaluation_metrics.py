"""Faithfulness, localisation and consistency metrics on inputs whose answers are known."""

from __future__ import annotations

import pytest
import torch

from eexit.evaluation.consistency import consistency_scores
from eexit.evaluation.faithfulness import deletion_insertion, pixel_ranks
from eexit.evaluation.localization import (
    energy_retained,
    localization_metrics,
    overlap_scores,
    pointing_game,
    top_fraction_mask,
)


def _linear_model(weights: torch.Tensor):
    """Two-class score: ``sigmoid(sum(w * x) - t)`` with ``t`` half the clean evidence."""
    threshold = 0.5 * weights.sum(dim=(1, 2, 3))

    def score(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        reps = x.shape[0] // weights.shape[0]
        w, t = weights.repeat(reps, 1, 1, 1), threshold.repeat(reps)
        evidence = (w * x).sum(dim=(1, 2, 3)) - t
        p1 = torch.sigmoid(evidence)
        return torch.where(classes == 1, p1, 1 - p1)

    return score


@pytest.fixture
def synthetic_case():
    g = torch.Generator().manual_seed(0)
    b, size = 16, 12
    images = 0.5 + 0.5 * torch.rand(b, 1, size, size, generator=g)
    weights = torch.exp(2.0 * torch.randn(b, 1, size, size, generator=g))  # heavy-tailed evidence
    return images, weights, torch.ones(b, dtype=torch.long), g


def test_perfect_map_beats_random_map_on_deletion_and_insertion(synthetic_case) -> None:
    images, weights, classes, g = synthetic_case
    score = _linear_model(weights)
    perfect = (weights * images)[:, 0]  # each pixel's exact contribution to the evidence
    rand = torch.rand(perfect.shape, generator=g)
    good = deletion_insertion(score, images, perfect, classes, steps=16)
    bad = deletion_insertion(score, images, rand, classes, steps=16)
    worst = deletion_insertion(score, images, -perfect, classes, steps=16)
    assert (good.deletion_auc < bad.deletion_auc).float().mean() > 0.9
    assert good.deletion_auc.mean() < bad.deletion_auc.mean() < worst.deletion_auc.mean()
    assert (good.insertion_auc > bad.insertion_auc).float().mean() > 0.9
    assert good.insertion_auc.mean() > bad.insertion_auc.mean() > worst.insertion_auc.mean()
    # both curves start and end where they must: the clean image and the all-baseline image
    clean, empty = score(images, classes), score(torch.zeros_like(images), classes)
    assert torch.allclose(good.deletion_curve[:, 0], clean) and torch.allclose(good.deletion_curve[:, -1], empty)
    assert torch.allclose(good.insertion_curve[:, 0], empty) and torch.allclose(good.insertion_curve[:, -1], clean)


def test_curve_batching_does_not_change_the_result(synthetic_case) -> None:
    images, weights, classes, g = synthetic_case
    score = _linear_model(weights)
    sal = torch.rand(images.shape[0], 6, 6, generator=g)  # low-res map, resampled inside
    one = deletion_insertion(score, images, sal, classes, steps=10, max_batch=16)
    many = deletion_insertion(score, images, sal, classes, steps=10, max_batch=10_000)
    assert torch.allclose(one.deletion_curve, many.deletion_curve)
    assert torch.allclose(one.insertion_auc, many.insertion_auc)


def test_more_images_than_max_batch_go_through_in_groups(synthetic_case) -> None:
    images, weights, classes, g = synthetic_case
    shared = weights[0:1]  # one weight map for every image: the score does not depend on batch order
    seen: list[int] = []

    def score(x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return torch.sigmoid((shared * x).sum(dim=(1, 2, 3)) - 0.5 * shared.sum())

    sal = torch.rand(images.shape[0], 6, 6, generator=g)
    whole = deletion_insertion(score, images, sal, classes, steps=10, max_batch=10_000)
    seen.clear()
    grouped = deletion_insertion(score, images, sal, classes, steps=10, max_batch=5)  # 16 images
    assert max(seen) <= 5
    assert torch.allclose(grouped.deletion_curve, whole.deletion_curve)
    assert torch.allclose(grouped.insertion_auc, whole.insertion_auc)


def test_empty_batch_gives_empty_curves() -> None:
    res = deletion_insertion(
        lambda x, c: x.sum(dim=(1, 2, 3)),
        torch.zeros(0, 1, 8, 8),
        torch.zeros(0, 4, 4),
        torch.zeros(0, dtype=torch.long),
        steps=4,
    )
    assert res.deletion_curve.shape == (0, 5) and res.insertion_auc.shape == (0,)
    with pytest.raises(ValueError, match="max_batch"):
        deletion_insertion(
            lambda x, c: x.sum(dim=(1, 2, 3)),
            torch.zeros(1, 1, 8, 8),
            torch.zeros(1, 4, 4),
            torch.zeros(1, dtype=torch.long),
            max_batch=0,
        )


def test_pixel_ranks_put_the_most_relevant_pixel_first() -> None:
    sal = torch.tensor([[[0.1, 0.9], [0.5, 0.3]]])
    assert pixel_ranks(sal, (2, 2)).tolist() == [[3, 0, 1, 2]]


def test_overlap_scores_on_hand_made_masks() -> None:
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, :2, :2] = True  # 4 pixels
    pred = torch.zeros(1, 4, 4, dtype=torch.bool)
    pred[0, 0, :3] = True  # 3 pixels, 2 of them in the target
    s = overlap_scores(pred, target)
    assert s["iou"].item() == pytest.approx(2 / 5)
    assert s["dice"].item() == pytest.approx(4 / 7)
    assert s["precision"].item() == pytest.approx(2 / 3)
    assert s["recall"].item() == pytest.approx(1 / 2)
    same = overlap_scores(target, target)
    assert all(v.item() == pytest.approx(1.0) for v in same.values())


def test_pointing_game_energy_and_top_fraction() -> None:
    target = torch.zeros(3, 4, 4, dtype=torch.bool)
    target[:, :2, :2] = True
    sal = torch.zeros(3, 4, 4)
    sal[0, 1, 0] = 1.0  # peak inside
    sal[1, 3, 3] = 1.0  # peak far outside
    sal[2, 2, 2] = 1.0  # peak diagonal-adjacent to the mask
    assert pointing_game(sal, target).tolist() == [True, False, False]
    assert pointing_game(sal, target, tolerance=1).tolist() == [True, False, True]
    assert energy_retained(torch.ones(1, 4, 4), target[:1]).item() == pytest.approx(0.25)
    assert energy_retained(sal, target).tolist() == [1.0, 0.0, 0.0]
    ramp = torch.arange(16.0).view(1, 4, 4)
    keep = top_fraction_mask(ramp, 0.25)
    assert keep.sum().item() == 4 and keep[0, 3].all()  # the four largest values: the last row
    perfect = localization_metrics(target[:1].float(), target[:1], fractions=(0.25,))
    assert perfect["iou@25"].item() == pytest.approx(1.0) and perfect["pointing_game"].item() == 1.0
    # an all-zero map's raster-order "top pixels" and "maximum" lie in this top-left mask: it
    # localises nothing and scores 0 everywhere
    assert pointing_game(torch.zeros(1, 4, 4), target[:1]).item()  # the raw argmax: pixel (0, 0)
    blank = localization_metrics(torch.zeros(1, 4, 4), target[:1], fractions=(0.25,))
    assert all(v.item() == 0.0 for v in blank.values()), blank


def test_consistency_identical_and_disjoint_cams() -> None:
    g = torch.Generator().manual_seed(1)
    cam = torch.rand(2, 8, 8, generator=g)
    same = consistency_scores([cam, cam, cam, cam])
    assert same["tiny"]["kl"].abs().max() < 1e-6
    assert torch.allclose(same["tiny"]["cosine"], torch.ones(2))
    assert torch.allclose(same["light"]["iou_top20"], torch.ones(2))
    left, right = torch.zeros(2, 8, 8), torch.zeros(2, 8, 8)
    left[:, :, :2], right[:, :, -2:] = 1.0, 1.0  # 25% of pixels each, no overlap
    apart = consistency_scores([left, left, left, right])
    assert torch.allclose(apart["tiny"]["cosine"], torch.zeros(2))
    assert torch.allclose(apart["tiny"]["iou_top20"], torch.zeros(2))
    assert (apart["tiny"]["kl"] > same["tiny"]["kl"] + 1.0).all()
    # an all-zero cam has no top region: no overlap with HEAVY's, even where HEAVY looks at the
    # first rows (where an all-zero map's raster-order "top pixels" lie)
    top = torch.zeros(2, 8, 8)
    top[:, 0, :] = 1.0
    blank = torch.zeros(2, 8, 8)
    for cams in ([blank, blank, blank, top], [top, top, top, blank], [blank] * 4):
        assert torch.equal(consistency_scores(cams)["tiny"]["iou_top20"], torch.zeros(2))
    # a cam at another resolution is resampled to the largest one
    coarse = consistency_scores([cam, cam, cam, torch.nn.functional.avg_pool2d(cam.unsqueeze(1), 2).squeeze(1)])
    assert coarse["tiny"]["cosine"].min() > 0.5


def _pixel_sum_score(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=(1, 2, 3)) / 10


def test_deletion_insertion_curves_and_areas_on_exact_values() -> None:
    # pixels 4, 3, 2, 1 (sum 10) ranked by themselves; the score is the pixel sum / 10
    image = torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])
    res = deletion_insertion(_pixel_sum_score, image, image[:, 0], torch.zeros(1, dtype=torch.long), steps=4)
    torch.testing.assert_close(res.deletion_curve, torch.tensor([[1.0, 0.6, 0.3, 0.1, 0.0]]))
    torch.testing.assert_close(res.insertion_curve, torch.tensor([[0.0, 0.4, 0.7, 0.9, 1.0]]))
    # trapezoids of width 1/4 over [0, 1] (the mean of the points would give 0.4 and 0.6)
    torch.testing.assert_close(res.deletion_auc, torch.tensor([0.375]))
    torch.testing.assert_close(res.insertion_auc, torch.tensor([0.625]))
    # 3 steps on 4 pixels: the nearest pixel counts 0, 1, 3, 4 (1.33 -> 1, 2.67 -> 3)
    three = deletion_insertion(_pixel_sum_score, image, image[:, 0], torch.zeros(1, dtype=torch.long), steps=3)
    torch.testing.assert_close(three.deletion_curve, torch.tensor([[1.0, 0.6, 0.1, 0.0]]))


def test_kl_is_heavy_against_the_exit_and_cams_meet_at_the_largest_size() -> None:
    eps = 1e-3
    heavy = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # 2 x 2
    tiny = torch.ones(1, 1, 1)  # 1 x 1: resampled up to 2 x 2 (all ones), not HEAVY down to 1 x 1
    s = consistency_scores([tiny, tiny, tiny, heavy], eps=eps)["tiny"]
    p = torch.tensor([1 + eps, eps, eps, eps]) / (1 + 4 * eps)  # HEAVY's distribution; the exit's is uniform
    kl_heavy_exit = float((p * (p / 0.25).log()).sum())  # KL(P_HEAVY || P_tiny)
    kl_exit_heavy = float((0.25 * (0.25 / p).log()).sum())
    assert s["kl"].item() == pytest.approx(kl_heavy_exit, rel=1e-5)
    assert abs(kl_heavy_exit - kl_exit_heavy) > 0.5
    assert s["cosine"].item() == pytest.approx(0.5)  # [1, 0, 0, 0] . [1, 1, 1, 1] / (1 * 2)
    assert s["iou_top20"].item() == pytest.approx(1.0)  # top pixel (0, 0) in both (ties by position)


def test_top_fraction_rounds_to_the_nearest_pixel_count() -> None:
    ramp = torch.arange(9.0).view(1, 3, 3)
    keep = top_fraction_mask(ramp, 0.3)  # 2.7 pixels -> 3
    assert keep.sum().item() == 3 and keep[0, 2].all()
    assert top_fraction_mask(ramp, 0.01).sum().item() == 1  # never less than one pixel


def test_energy_ignores_negative_saliency() -> None:
    target = torch.tensor([[[True, False], [False, False]]])
    sal = torch.tensor([[[2.0, -1.0], [0.0, 1.0]]])  # mass 2 inside, 1 outside once negatives are 0
    assert energy_retained(sal, target).item() == pytest.approx(2 / 3)


def test_overlap_scores_of_empty_regions() -> None:
    empty = torch.zeros(1, 2, 2, dtype=torch.bool)
    one = empty.clone()
    one[0, 0, 0] = True
    both_empty = overlap_scores(empty, empty)
    assert both_empty["iou"].item() == 1.0 and both_empty["dice"].item() == 1.0
    assert both_empty["precision"].item() == 0.0 and both_empty["recall"].item() == 0.0
    no_target = overlap_scores(one, empty)
    assert no_target["iou"].item() == 0.0 and no_target["recall"].item() == 0.0
    assert no_target["precision"].item() == 0.0


class _SumNet:
    """Four exits on (B, 1, 1, 3) images: exit k's logits are ``[a_k * sum(x), 0]``."""

    slopes = (1.0, -1.0, 2.0, 0.5)  # LIGHT predicts class 1, the others class 0

    def predict_exit(self, x: torch.Tensor, level) -> torch.Tensor:
        s = self.slopes[int(level)] * x.sum(dim=(1, 2, 3))
        return torch.stack([s, torch.zeros_like(s)], dim=1)

    def __call__(self, x: torch.Tensor, with_cams: bool = False):
        from types import SimpleNamespace

        logits = [self.predict_exit(x, k) for k in range(4)]
        return SimpleNamespace(logits=logits, cams=[x[:, 0] for _ in range(4)])


def test_exit_faithfulness_scores_each_exit_on_its_own_prediction() -> None:
    import math

    from eexit.evaluation.faithfulness import exit_faithfulness

    metrics, curves = exit_faithfulness(_SumNet(), torch.ones(2, 1, 1, 3), steps=2)
    for k, (key, a) in enumerate(zip(("tiny", "light", "medium", "heavy"), _SumNet.slopes, strict=True)):

        def q(s: float, a: float = a) -> float:  # probability of the exit's own class at pixel sum s
            return 1 / (1 + math.exp(-abs(a) * s))

        # 3 pixels, 2 steps: 0, 2 (1.5 rounded to even) and 3 pixels removed / inserted
        deletion = 0.5 * (q(3) / 2 + q(1) + q(0) / 2)
        insertion = 0.5 * (q(0) / 2 + q(2) + q(3) / 2)
        assert metrics[f"deletion_auc/{key}"] == pytest.approx(deletion, rel=1e-5), key
        assert metrics[f"insertion_auc/{key}"] == pytest.approx(insertion, rel=1e-5), key
        # the score depends on the pixel count only: a random map scores the same
        assert metrics[f"deletion_auc_random/{key}"] == pytest.approx(deletion, rel=1e-5), key
        assert metrics[f"insertion_auc_random/{key}"] == pytest.approx(insertion, rel=1e-5), key
        assert curves["deletion"][key] == pytest.approx([q(3), q(1), q(0)], rel=1e-5), k


class _HeadNet:
    """Four hand-weighted linear heads reading the input as their attention (B, 2, 2, 2): the
    early exits predict class 1, HEAVY (rows swapped) class 0 on ``_ATTENTION``."""

    def __init__(self) -> None:
        from eexit.models import ExitHead

        self.heads = []
        for weight in ([[1.0, -1.0], [0.5, 2.0]],) * 3 + ([[0.5, 2.0], [1.0, -1.0]],):
            head = ExitHead(in_chs=2, num_classes=2, kind="linear")
            with torch.no_grad():
                head.classifier.weight.copy_(torch.tensor(weight))
                head.classifier.bias.zero_()
            self.heads.append(head)

    def forward_heads(self, x: torch.Tensor):
        return [head.forward_parts(x) for head in self.heads]


_ATTENTION = torch.tensor([[[[4.0, 0.0], [2.0, 1.0]], [[0.0, 2.0], [1.0, 1.0]]]])  # z = [1.75, 1.0]


def test_exit_cams_explain_heavys_class_at_every_exit() -> None:
    from eexit.evaluation.consistency import exit_cams

    logits, cams = exit_cams(_HeadNet(), _ATTENTION)
    assert logits[0].argmax(1).tolist() == [1] and logits[3].argmax(1).tolist() == [0]
    # TINY's cam of class 0 (HEAVY's), not of its own class 1 ([[0.5, 1], [0.75, 0.625]])
    assert torch.equal(cams[0], torch.tensor([[[1.0, 0.0], [0.25, 0.0]]]))
    assert torch.equal(cams[3], torch.tensor([[[0.5, 1.0], [0.75, 0.625]]]))


def test_consistency_metrics_average_over_images_of_every_batch() -> None:
    import math

    from eexit.evaluation.consistency import consistency_metrics

    x = _ATTENTION.repeat(2, 1, 1, 1)
    batches = [(x, torch.tensor([0, 0])), (x, torch.tensor([0, 1]))]
    m = consistency_metrics(_HeadNet(), batches)
    cosine = 0.6875 / math.sqrt(1.0625 * 2.203125)  # [1, 0, .25, 0] against [.5, 1, .75, .625]
    assert m["cosine/tiny"] == pytest.approx(cosine, rel=1e-6)
    assert m["acc/heavy"] == pytest.approx(3 / 4) and m["acc/tiny"] == pytest.approx(1 / 4)


class _Linear(torch.nn.Module):
    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + 0.5


class _Product(torch.nn.Module):
    """``x0 * x1 + x2``: not additive, so feature ablation misses completeness where x0 = x1 = 1."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] * x[:, 1] + x[:, 2]


def _staged_cal(module: torch.nn.Module, scale: float = 1.0):
    from types import SimpleNamespace

    router = SimpleNamespace(
        continue_module=lambda level: module, scales=[SimpleNamespace(std=torch.full((3,), scale))]
    )
    return SimpleNamespace(
        routers={"staged": router}, exit_baselines=[torch.zeros(3)], baseline_features=torch.full((3,), 7.0)
    )


def test_gate_quality_uses_the_staged_gates_tiny_baseline() -> None:
    from eexit.evaluation.gate_quality import gate_score_and_baseline

    cal = _staged_cal(_Linear([1.0, 1.0, 1.0]))
    _, baseline, scale = gate_score_and_baseline(cal, "staged")
    assert torch.equal(baseline, torch.zeros(3)) and torch.equal(scale, torch.ones(3))


def test_infidelity_of_an_additive_gate_is_zero_and_sensitivity_follows_the_feature_scale() -> None:
    from eexit.evaluation.gate_quality import gate_explanation_quality

    features = torch.tensor([[1.0, 0.0, 0.0], [2.0, -1.0, 3.0]])
    radius, scale = 0.1, 100.0
    q = gate_explanation_quality(
        _staged_cal(_Linear([1.0, 2.0, -1.0]), scale), "staged", features, perturb_radius=radius
    )
    # attributions w * (f - 0) predict every subset's change exactly
    assert q["infidelity"] == pytest.approx(0.0, abs=1e-9)
    assert q["completeness_delta_max"] == pytest.approx(0.0, abs=1e-6)
    # features moved by up to radius * scale = 10 change the attributions w * f by up to 10 * |w|:
    # relative to |w * f| = 1 for the first image that is far above what moves of 0.1 could give
    w = torch.tensor([1.0, 2.0, -1.0])
    assert float(w.norm()) * radius < q["sensitivity_max"] <= float(w.norm()) * radius * scale


def test_completeness_gap_reported_is_the_largest_over_images() -> None:
    from eexit.evaluation.gate_quality import gate_explanation_quality

    features = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # gaps 1 (1 + 1 vs 1) and 0
    q = gate_explanation_quality(_staged_cal(_Product()), "staged", features, method="feature_ablation")
    assert q["completeness_delta_max"] == pytest.approx(1.0)


def test_fixed_exit_costs_are_per_image(monkeypatch) -> None:
    """The fixed exits' latency is the batch's time over its images, and their FLOPs those of one
    image, whatever the timing batch (the routers' tier costs are per image too)."""
    from eexit.evaluation import routing_eval
    from eexit.models import create_model
    from eexit.routing.costs import count_flops
    from eexit.types import ExitLevel

    net = create_model("resnet_micro", in_chans=1, num_classes=4).eval()
    example = torch.randn(8, 1, 16, 16)
    monkeypatch.setattr(
        routing_eval, "measure_latencies", lambda fns, min_run_time: [0.004 * (i + 1) for i in range(4)]
    )
    costs = routing_eval.exit_costs(net, example, 0.01)
    assert [c["latency_ms"] for c in costs] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # 4 ms .. 16 ms over 8 images
    for level, cost in zip(ExitLevel, costs, strict=True):
        assert cost["mflops"] == pytest.approx(count_flops(net.predict_exit, example, level) / 8 / 1e6)
