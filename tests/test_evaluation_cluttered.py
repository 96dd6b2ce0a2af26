"""The cluttered-scene set: deterministic per seed, masks that cover the (unoccluded) target."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eexit.data.cluttered import LEVELS, ClutterLevel, make_cluttered
from tests.conftest import FASHION_DIR, needs_fashion


def _objects(m: int = 30, size: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright blobs on a black background (like Fashion-MNIST items), three classes."""
    g = torch.Generator().manual_seed(seed)
    objects = torch.zeros(m, 1, size, size)
    for i in range(m):
        r, c = torch.randint(0, size // 2, (2,), generator=g).tolist()
        objects[i, 0, r : r + size // 2 + 1, c : c + size // 2 + 1] = 0.4 + 0.6 * torch.rand(1, generator=g)
    return objects, torch.arange(m) % 3


def test_same_seed_same_scenes_other_seed_other_scenes() -> None:
    objects, labels = _objects()
    a = make_cluttered(objects, labels, 12, 24, seed=5)
    b = make_cluttered(objects, labels, 12, 24, seed=5)
    c = make_cluttered(objects, labels, 12, 24, seed=6)
    for name in ("images", "masks", "labels", "levels", "boxes", "source_index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (12, 1, 24, 24) and a.masks.shape == (12, 24, 24)
    assert a.images.min() >= 0 and a.images.max() <= 1


@pytest.mark.parametrize("silhouette", [True, False])
def test_masks_cover_the_visible_target(silhouette: bool) -> None:
    objects, labels = _objects()
    s = make_cluttered(objects, labels, 16, 26, seed=1, silhouette=silhouette)
    for i in range(len(s)):
        top, left, h, w = s.boxes[i].tolist()
        src = objects[s.source_index[i], 0]
        level = LEVELS[int(s.levels[i])]
        assert s.labels[i] == labels[s.source_index[i]]
        assert int(s.levels[i]) == i % len(LEVELS)
        expected = torch.zeros(26, 26, dtype=torch.bool)
        expected[top : top + h, left : left + w] = src > 0.1 if silhouette else True
        assert torch.equal(s.masks[i], expected), i  # the mask is the target's pixels, nothing else
        inside = s.images[i, 0][s.masks[i]]
        # pasted last: every target pixel shows the object at the level's contrast (not occluded)
        target_pixels = (src * level.contrast)[expected[top : top + h, left : left + w]]
        assert torch.allclose(inside, target_pixels), i


def test_levels_control_clutter() -> None:
    objects, labels = _objects()
    clean, busy = ClutterLevel(0, 0.0, 1.0), ClutterLevel(3, 0.3, 0.6)
    s = make_cluttered(objects, labels, 20, 30, levels=(clean, busy), seed=2)
    outside = [s.images[i, 0][~s.masks[i]] for i in range(len(s))]
    for i in range(len(s)):
        if s.levels[i] == 0:
            assert outside[i].abs().max() == 0, "a clean scene has nothing outside the target"
        else:
            assert outside[i].mean() > 0.05, "texture and distractors fill a busy scene"
    with pytest.raises(ValueError, match="canvas_size"):
        make_cluttered(objects, labels, 2, 8)
    with pytest.raises(ValueError, match="two classes"):
        make_cluttered(objects, torch.zeros_like(labels), 2, 30)


@needs_fashion
def test_fashion_mnist_objects_use_silhouette_masks(tmp_path: Path) -> None:
    from torchvision.datasets import FashionMNIST

    from eexit.data.fashion_mnist import prepare_raw_folder

    prepare_raw_folder(tmp_path, FASHION_DIR)
    ds = FashionMNIST(str(tmp_path), train=False, download=False)
    x = ds.data[:64].unsqueeze(1).float() / 255
    s = make_cluttered(x, ds.targets[:64], 8, 56, seed=0)  # silhouette mode chosen from the dark borders
    boxes = s.boxes[:, 2] * s.boxes[:, 3]
    cover = s.masks.flatten(1).sum(1)
    assert (cover > 0).all() and (cover < boxes).all(), "silhouettes, not whole boxes"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 0.0, 1.0), "distractors must be an integer >= 0"),
        ((1.5, 0.0, 1.0), "distractors must be an integer >= 0"),
        ((0, 2.0, 1.0), r"texture must be in \[0, 1\]"),
        ((0, 0.0, 3.0), r"contrast must be in \(0, 1\]"),
        ((0, 0.0, 0.0), r"contrast must be in \(0, 1\]"),
    ],
)
def test_clutter_levels_that_break_the_scene_contract_are_refused(args: tuple, message: str) -> None:
    # texture 2 and contrast 3 gave pixels up to 2-3 (scenes promise [0, 1]); contrast 0 a black,
    # fully "visible" target; -1 distractors silently meant none
    with pytest.raises(ValueError, match=message):
        ClutterLevel(*args)


class _MirrorNet:
    """Four identity-weighted linear heads on the attention ``[x, x mirrored left-right]`` with
    bias ``[0, 1]``: every exit predicts class 1; class 0's cam is ``relu(x) / 4``, class 1's
    the mirrored map."""

    def __init__(self) -> None:
        from eexit.models import ExitHead

        self.heads = []
        for _ in range(4):
            head = ExitHead(in_chs=2, num_classes=2, kind="linear")
            with torch.no_grad():
                head.classifier.weight.copy_(torch.eye(2))
                head.classifier.bias.copy_(torch.tensor([0.0, 1.0]))
            self.heads.append(head)

    def forward_heads(self, x: torch.Tensor):
        a = torch.cat([x, x.flip(-1)], dim=1)
        return [head.forward_parts(a) for head in self.heads]


def test_cluttered_localization_explains_the_target_class_on_normalised_scenes() -> None:
    from eexit.data.cluttered import ClutteredScenes
    from eexit.evaluation.cluttered import cluttered_localization

    # a bright target pixel at (0, 0) of class 0 on a 0.6 background: normalised with mean 0.6
    # and std 0.4 the background is 0, the target 1
    image = torch.tensor([[[1.0, 0.6], [0.6, 0.6]]])
    mask = torch.tensor([[True, False], [False, False]])
    scenes = ClutteredScenes(
        images=image.expand(2, 1, 2, 2).clone(),
        masks=mask.expand(2, 2, 2).clone(),
        labels=torch.tensor([0, 0]),
        levels=torch.tensor([0, 1]),
        boxes=torch.zeros(2, 4, dtype=torch.long),
        source_index=torch.zeros(2, dtype=torch.long),
    )
    out, first = cluttered_localization(_MirrorNet(), scenes, [0.6], [0.4], fractions=(0.25,), batch_size=1)
    for key in ("tiny", "heavy"):
        # class 0's cam peaks on the target (HEAVY's class 1 would point at (0, 1))
        assert out[f"cluttered/pointing_game/{key}"] == pytest.approx(1.0)
        assert out[f"cluttered/iou@25/{key}"] == pytest.approx(1.0)
        # all the cam's mass on the target (unnormalised, the background would hold 1.8 of 2.8)
        assert out[f"cluttered/energy/{key}"] == pytest.approx(1.0)
        assert out[f"cluttered/acc/{key}"] == 0.0
        assert out[f"cluttered/pointing_game_level1/{key}"] == pytest.approx(1.0)
    assert out["cluttered/mask_fraction"] == pytest.approx(0.25)
    assert len(first) == 4 and first[0].shape == (1, 2, 2)


def test_scenes_from_test_un_normalise_the_objects() -> None:
    from eexit.evaluation.cluttered import scenes_from_test

    objects = torch.zeros(2, 1, 4, 4)
    objects[:, :, 1:3, 1:3] = 0.8
    mean, std = [0.5], [0.25]
    s = scenes_from_test(
        (objects - 0.5) / 0.25, torch.tensor([0, 1]), mean, std, 2, levels=(ClutterLevel(0, 0.0, 1.0),)
    )
    assert s.images.shape == (2, 1, 8, 8)  # canvas twice the image side
    for i in range(2):  # a clean level: the target's pixels are the object's, in [0, 1] units
        torch.testing.assert_close(s.images[i, 0][s.masks[i]], torch.full((4,), 0.8))
