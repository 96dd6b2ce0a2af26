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
