"""The seven routing complexity features on crafted inputs with known answers, and on a real network."""

from __future__ import annotations

import math

import pytest
import torch

from eexit.explain.gradcam import gradcam
from eexit.models import create_model
from eexit.routing.features import (
    EDGE_THRESHOLD,
    FEATURE_NAMES,
    NUM_FEATURES,
    activation_sparsity,
    attention_entropy,
    complexity_features,
    confidence_margin,
    feature_variance,
    gradient_magnitude,
    saliency_sparsity,
    spatial_complexity,
)


def one_hot_cam(b: int = 2, h: int = 8, w: int = 8, value: float = 3.0) -> torch.Tensor:
    cam = torch.zeros(b, h, w)
    cam[:, h // 2, w - 1] = value
    return cam


def flat_cam(b: int = 2, h: int = 8, w: int = 8, value: float = 0.7) -> torch.Tensor:
    return torch.full((b, h, w), value)


def random_inputs(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(b, 3, 16, 16, generator=g),
        "stage_map": torch.relu(torch.randn(b, 8, 16, 16, generator=g)),
        "cam": torch.relu(torch.randn(b, 4, 4, generator=g)),
        "logits": torch.randn(b, 5, generator=g),
        "logit_grad": torch.randn(b, 8, generator=g),
    }


def test_names_and_count():
    assert NUM_FEATURES == 7 == len(FEATURE_NAMES)
    assert FEATURE_NAMES == (
        "attention_entropy",
        "saliency_sparsity",
        "gradient_magnitude",
        "feature_variance",
        "spatial_complexity",
        "confidence_margin",
        "activation_sparsity",
    )


# --- attention entropy ------------------------------------------------------------------------


def test_entropy_one_hot_is_zero_and_flat_is_one():
    assert torch.allclose(attention_entropy(one_hot_cam()), torch.zeros(2), atol=1e-6)
    assert torch.allclose(attention_entropy(flat_cam()), torch.ones(2), atol=1e-6)


def test_entropy_known_value_and_scale_invariance():
    # two equal hot spots among N = 16: entropy log 2 / log 16 = 1/4
    cam = torch.zeros(1, 4, 4)
    cam[0, 0, 0] = cam[0, 3, 3] = 2.0
    assert attention_entropy(cam).item() == pytest.approx(0.25, abs=1e-6)
    # general map against the textbook formula, and invariance to the cam's scale
    cam = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(1))
    p = cam.flatten(1) / cam.flatten(1).sum(1, keepdim=True)
    expected = -(p * p.log()).sum(1) / math.log(30)
    assert torch.allclose(attention_entropy(cam), expected, atol=1e-5)
    assert torch.allclose(attention_entropy(cam * 1e3), expected, atol=1e-5)
    assert torch.allclose(attention_entropy(cam * 1e-6), expected, atol=1e-5)


def test_entropy_single_position_is_zero():
    assert attention_entropy(torch.ones(2, 1, 1)).tolist() == [0.0, 0.0]


# --- saliency sparsity ------------------------------------------------------------------------


def test_saliency_sparsity_flat_is_one_one_hot_is_one_over_n():
    assert torch.allclose(saliency_sparsity(flat_cam()), torch.ones(2))
    assert torch.allclose(saliency_sparsity(one_hot_cam()), torch.full((2,), 1 / 64))


def test_saliency_sparsity_threshold_is_inclusive_and_relative():
    cam = torch.tensor([[[4.0, 2.0], [1.99, 0.0]]])  # 2.0 is exactly half the peak: counts
    assert saliency_sparsity(cam).item() == pytest.approx(0.5)
    assert saliency_sparsity(cam, rel_threshold=0.25).item() == pytest.approx(0.75)
    assert saliency_sparsity(cam * 100).item() == pytest.approx(0.5)


# --- gradient magnitude -----------------------------------------------------------------------


def test_gradient_magnitude_is_l2_norm():
    g = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 2.0, 2.0]])
    assert torch.allclose(gradient_magnitude(g), torch.tensor([5.0, 0.0, 3.0]))


# --- feature variance -------------------------------------------------------------------------


def test_feature_variance_flat_is_zero():
    assert torch.allclose(feature_variance(flat_cam()), torch.zeros(2), atol=1e-7)


def test_feature_variance_one_saturated_cell():
    # 8 x 8 cam, grid 4: regions are 2 x 2; one region full -> region means: one 1, fifteen 0
    cam = torch.zeros(1, 8, 8)
    cam[0, 2:4, 4:6] = 5.0
    # population std of {1, 0 x 15} = sqrt(1/16 - 1/256) = sqrt(15) / 16
    assert feature_variance(cam, grid=4).item() == pytest.approx(math.sqrt(15) / 16, abs=1e-6)


def test_feature_variance_one_hot_and_half_split():
    # one-hot: the hot region's mean is 1/4 -> std = sqrt(15) / 64
    assert torch.allclose(feature_variance(one_hot_cam()), torch.full((2,), math.sqrt(15) / 64), atol=1e-6)
    # left half saturated, right half empty: region means 8 x 1 and 8 x 0 -> the maximum 0.5
    cam = torch.zeros(1, 8, 8)
    cam[0, :, :4] = 1.0
    assert feature_variance(cam).item() == pytest.approx(0.5, abs=1e-6)
    # a 2 x 2 grid sees the same split: means {1, 0, 1, 0}
    assert feature_variance(cam, grid=2).item() == pytest.approx(0.5, abs=1e-6)


def test_feature_variance_in_range_for_random_cams():
    cam = torch.relu(torch.randn(16, 7, 7, generator=torch.Generator().manual_seed(2)))
    v = feature_variance(cam)
    assert (v >= 0).all() and (v <= 0.5).all()


# --- spatial complexity -----------------------------------------------------------------------


def checkerboard(block: int, size: int = 16, channels: int = 1) -> torch.Tensor:
    idx = torch.arange(size) // block
    board = ((idx[:, None] + idx[None, :]) % 2).float() * 2 - 1  # +-1
    return board.expand(1, channels, size, size).clone()


def test_spatial_complexity_constant_image_is_zero():
    assert spatial_complexity(torch.full((2, 3, 16, 16), 1.7)).tolist() == [0.0, 0.0]


def test_spatial_complexity_checkerboard_is_high():
    # 2-pixel blocks of +-1: every interior pixel sits next to a block boundary
    assert spatial_complexity(checkerboard(2)).item() >= 0.9
    assert spatial_complexity(checkerboard(2, channels=3)).item() >= 0.9
    # a one-pixel board is invisible to Sobel (the two pixels it compares are alike)
    assert spatial_complexity(checkerboard(1)).item() == 0.0
    # coarser boards have fewer edge pixels
    assert spatial_complexity(checkerboard(4)).item() < spatial_complexity(checkerboard(2)).item()


def test_spatial_complexity_step_edge_known_fraction():
    # 8 x 8, left half -1, right half +1: of the 6 x 6 interior pixels, the 2 columns next to the
    # step have magnitude (1 - (-1)) / 2 = 1 > threshold, the rest 0 -> 12 / 36
    img = torch.full((1, 1, 8, 8), -1.0)
    img[..., 4:] = 1.0
    assert spatial_complexity(img).item() == pytest.approx(1 / 3)
    # magnitude 1 is above 0.99 but not above 1.01
    assert spatial_complexity(img, threshold=0.99).item() == pytest.approx(1 / 3)
    assert spatial_complexity(img, threshold=1.01).item() == 0.0


def test_spatial_complexity_threshold_units_are_per_pixel_slope():
    # a linear ramp of slope s per pixel has Sobel magnitude s everywhere
    ramp = torch.arange(12.0).view(1, 1, 1, 12).expand(1, 1, 12, 12)
    below, above = 0.8 * EDGE_THRESHOLD, 1.2 * EDGE_THRESHOLD
    assert spatial_complexity(ramp * below).item() == 0.0
    assert spatial_complexity(ramp * above).item() == 1.0
    # a vertical ramp counts the same (x and y Sobel)
    assert spatial_complexity((ramp * above).transpose(-1, -2)).item() == 1.0


def test_spatial_complexity_uses_channel_mean():
    # opposite edges in two channels cancel in the channel-mean image
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 4.0
    img = torch.cat([edge, -edge, torch.zeros_like(edge)], dim=1)
    assert spatial_complexity(img).item() == 0.0
    # the same edge in one of three channels is a third as strong (4 / 3 / 2 = 0.67 per pixel)
    img = torch.cat([edge, torch.zeros_like(edge), torch.zeros_like(edge)], dim=1)
    assert spatial_complexity(img, threshold=0.6).item() == pytest.approx(1 / 3)
    assert spatial_complexity(img, threshold=0.7).item() == 0.0


def test_spatial_complexity_tiny_images_and_dtypes():
    assert spatial_complexity(torch.randn(2, 1, 2, 2)).shape == (2,)
    out = spatial_complexity(checkerboard(2).double())
    assert out.dtype == torch.float32
    assert spatial_complexity(checkerboard(2).to(torch.bfloat16)).item() >= 0.9


def test_spatial_complexity_equals_a_conv2d_sobel_reference():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 10)
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
    kernel = torch.stack([gx, gx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    g = torch.nn.functional.conv2d(x.mean(dim=1, keepdim=True), kernel)
    for t in (0.1, 0.25, 0.5):
        ref = (g.square().sum(dim=1) > t * t).float().flatten(1).mean(dim=1)
        assert torch.equal(spatial_complexity(x, threshold=t), ref)
    with torch.inference_mode():
        assert spatial_complexity(x).shape == (4,)


# --- confidence margin ------------------------------------------------------------------------


def test_confidence_margin_extremes_and_known_value():
    assert confidence_margin(torch.tensor([[30.0, 0.0, 0.0]])).item() == pytest.approx(1.0, abs=1e-6)
    assert confidence_margin(torch.tensor([[2.0, 2.0, 2.0]])).item() == pytest.approx(0.0, abs=1e-7)
    # softmax of [log 2, 0, 0] = [0.5, 0.25, 0.25] -> margin 0.25 (order of classes irrelevant)
    lg = torch.tensor([[math.log(2), 0.0, 0.0], [0.0, 0.0, math.log(2)]])
    assert torch.allclose(confidence_margin(lg), torch.full((2,), 0.25), atol=1e-6)
    assert confidence_margin(torch.tensor([[5.0], [1.0]])).tolist() == [1.0, 1.0]


# --- activation sparsity ----------------------------------------------------------------------


def test_activation_sparsity_known_count():
    m = torch.ones(2, 4, 3, 3)  # 36 activations per image
    m[0].view(-1)[:9] = 0.0
    m[1].view(-1)[::2] = 0.0  # 18 zeros
    assert torch.allclose(activation_sparsity(m), torch.tensor([0.25, 0.5]))
    assert activation_sparsity(torch.zeros(1, 2, 2, 2)).item() == 1.0
    assert activation_sparsity(torch.full((1, 2, 2, 2), 1e-30)).item() == 0.0
    assert activation_sparsity(torch.zeros(0, 8, 4, 4)).shape == (0,)  # an empty batch


# --- zero cams, fused function ----------------------------------------------------------------


def test_all_zero_cam_is_treated_as_flat():
    cam = torch.zeros(3, 4, 4)
    assert attention_entropy(cam).tolist() == [1.0, 1.0, 1.0]
    assert saliency_sparsity(cam).tolist() == [1.0, 1.0, 1.0]
    assert feature_variance(cam).tolist() == [0.0, 0.0, 0.0]
    inp = random_inputs()
    inp["cam"] = cam
    f = complexity_features(**inp)
    assert torch.isfinite(f).all()
    assert f[:, 0].tolist() == [1.0, 1.0, 1.0] and f[:, 1].tolist() == [1.0, 1.0, 1.0]


def test_mixed_zero_and_nonzero_cams_in_one_batch():
    cam = torch.stack([torch.zeros(4, 4), one_hot_cam(1, 4, 4)[0]])
    assert attention_entropy(cam).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert saliency_sparsity(cam).tolist() == pytest.approx([1.0, 1 / 16])


def test_complexity_features_stacks_individual_functions_in_order():
    inp = random_inputs(b=4)
    f = complexity_features(**inp, grid=2, edge_threshold=0.4)
    assert f.shape == (4, NUM_FEATURES) and f.dtype == torch.float32
    expected = {
        "attention_entropy": attention_entropy(inp["cam"]),
        "saliency_sparsity": saliency_sparsity(inp["cam"]),
        "gradient_magnitude": gradient_magnitude(inp["logit_grad"]),
        "feature_variance": feature_variance(inp["cam"], grid=2),
        "spatial_complexity": spatial_complexity(inp["image"], threshold=0.4),
        "confidence_margin": confidence_margin(inp["logits"]),
        "activation_sparsity": activation_sparsity(inp["stage_map"]),
    }
    for i, name in enumerate(FEATURE_NAMES):
        assert torch.equal(f[:, i], expected[name]), name


def test_complexity_features_is_per_image():
    inp = random_inputs(b=5, seed=3)
    full = complexity_features(**inp)
    for i in range(5):
        one = complexity_features(**{k: v[i : i + 1] for k, v in inp.items()})
        assert torch.allclose(one[0], full[i], atol=1e-6)


def test_complexity_features_finite_on_degenerate_inputs():
    inp = random_inputs(b=2)
    inp["logits"] = torch.tensor([[float("nan")] * 5, [1e30, -1e30, 0.0, 0.0, 0.0]])
    inp["logit_grad"] = torch.tensor([[float("inf")] * 8, [float("nan")] * 8])
    f = complexity_features(**inp)
    assert f.shape == (2, 7) and torch.isfinite(f).all()


def test_complexity_features_float64_and_half_inputs_give_float32():
    inp = random_inputs(b=2)
    for dtype in (torch.float64, torch.bfloat16):
        f = complexity_features(**{k: v.to(dtype) for k, v in inp.items()})
        assert f.dtype == torch.float32 and torch.isfinite(f).all()


def test_ranges_on_random_inputs():
    f = complexity_features(**random_inputs(b=32, seed=4))
    bounded = [i for i, n in enumerate(FEATURE_NAMES) if n != "gradient_magnitude"]
    assert (f[:, bounded] >= 0).all() and (f[:, bounded] <= 1).all()
    assert (f[:, FEATURE_NAMES.index("feature_variance")] <= 0.5).all()
    assert (f[:, FEATURE_NAMES.index("gradient_magnitude")] >= 0).all()


# --- on a real network ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["inference", "grad"])
def test_complexity_features_on_real_network(mode):
    torch.manual_seed(0)
    net = create_model("resnet_micro", in_chans=1, num_classes=4).eval()
    x = torch.randn(6, 1, 16, 16)
    ctx = torch.inference_mode() if mode == "inference" else torch.enable_grad()
    with ctx:
        outs = net.forward_heads(x)
        stage_map = net.backbone.forward_stage(0, net.backbone.forward_stem(x))
        cam = gradcam(net.heads[0], outs[0])
        grad = net.heads[0].logit_gradient(outs[0], None)
        f = complexity_features(x, stage_map, cam, outs[0].logits, grad)
    assert f.shape == (6, NUM_FEATURES) and f.dtype == torch.float32
    assert torch.isfinite(f).all()
    assert torch.allclose(f[:, FEATURE_NAMES.index("confidence_margin")], confidence_margin(outs[0].logits))
    # the stage map is post-ReLU: a real fraction of zeros, not 0 or 1
    sparsity = f[:, FEATURE_NAMES.index("activation_sparsity")]
    assert ((sparsity > 0) & (sparsity < 1)).all()
    assert torch.allclose(f[:, FEATURE_NAMES.index("gradient_magnitude")], grad.norm(dim=1), atol=1e-6)
    assert torch.allclose(f[:, 0], attention_entropy(cam), atol=1e-6)


def test_features_carry_no_gradient_and_accept_inputs_that_require_grad():
    inp = {k: v.clone().requires_grad_(True) for k, v in random_inputs(b=2).items()}
    f = complexity_features(**inp)
    assert not f.requires_grad and torch.isfinite(f).all()
    assert not attention_entropy(inp["cam"]).requires_grad


def test_activation_sparsity_is_layout_independent():
    torch.manual_seed(0)
    stage_map = torch.relu(torch.randn(3, 8, 5, 6))
    cl = stage_map.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    assert torch.equal(activation_sparsity(cl), activation_sparsity(stage_map))


@pytest.mark.parametrize("per_image", [1, 3, 4, 508, 1024, 6272, 4 * 131, 4 * 127 * 3 + 4])
def test_activation_sparsity_counts_exactly_at_every_size(per_image):
    # the fast count reads 0/1 bytes as int32 words summed in blocks: exact whatever the size
    # (multiples of 4 or not, word counts prime or with large divisors), sign or value; 1024
    # values are 256 words, where blocks of 256 would overflow a byte lane
    g = torch.Generator().manual_seed(per_image)
    x = torch.randn(5, per_image, generator=g)
    x[torch.rand(5, per_image, generator=g) < 0.6] = 0.0
    x[0] = 0.0
    x[1] = -3.0  # negatives are nonzero
    if per_image > 2:
        x[2, :2] = -0.0  # negative zero is zero
    zeros = (x == 0).sum(dim=1).float() / per_image
    assert torch.equal(activation_sparsity(x), 1.0 - (x != 0).sum(dim=1).float() / per_image)
    assert torch.allclose(activation_sparsity(x), zeros, atol=1e-6)
    assert activation_sparsity(x)[0].item() == 1.0 and activation_sparsity(x)[1].item() == 0.0


@pytest.mark.parametrize(("h", "w", "grid"), [(7, 7, 4), (8, 8, 4), (5, 9, 3), (2, 3, 4), (14, 14, 2)])
def test_feature_variance_regions_equal_adaptive_pooling(h, w, grid):
    # region means come from a cached pooling matrix: the same bins as adaptive_avg_pool2d, also
    # where the grid does not divide the map or exceeds it
    cam = torch.relu(torch.randn(6, h, w, generator=torch.Generator().manual_seed(h * w)))
    mn = cam.flatten(1) / cam.flatten(1).amax(dim=1, keepdim=True)
    ref = torch.nn.functional.adaptive_avg_pool2d(mn.view(-1, 1, h, w), grid).flatten(1).std(dim=1, correction=0)
    assert torch.allclose(feature_variance(cam, grid=grid), ref, atol=1e-6)


def test_activation_sparsity_of_a_bool_map_at_an_odd_offset():
    # a bool input is not copied by .bool(): a view starting mid-word must still count exactly
    g = torch.Generator().manual_seed(9)
    flat = torch.rand(121, generator=g) > 0.5
    view = flat[1:].view(3, 40)  # contiguous rows of 40, storage offset 1
    assert view.is_contiguous() and view.storage_offset() == 1
    assert torch.equal(activation_sparsity(view), 1.0 - view.sum(dim=1).float() / 40)


# --- pinned by the mutation audit of the routing modules --------------------------------------


def test_entropy_never_leaves_its_range_by_rounding() -> None:
    """A flat 7 x 7 cam's entropy rounds to 1 + 1.2e-7 in float32 before the clamp: exactly 1."""
    assert attention_entropy(flat_cam(1, 7, 7)).item() == 1.0
    near_flat = 1.0 + 1e-6 * torch.rand(256, 4, 4, generator=torch.Generator().manual_seed(0))
    entropy = attention_entropy(near_flat)
    assert (entropy <= 1.0).all() and (entropy >= 0.0).all()


def test_feature_variance_refuses_a_grid_below_one() -> None:
    """A grid of 0 regions has no region means (their std would be NaN): refused by name."""
    with pytest.raises(ValueError, match="grid must be >= 1, got 0"):
        feature_variance(flat_cam(), grid=0)
    with pytest.raises(ValueError, match="grid must be >= 1"):
        complexity_features(**random_inputs(b=2), grid=0)


@pytest.mark.parametrize("transpose", [False, True])
def test_spatial_complexity_pads_an_image_thin_in_one_direction_only(transpose: bool) -> None:
    """A 1 x 8 step image (or 8 x 1) is replicate-padded across its thin side only: of its 6
    interior positions along the long side, the 2 beside the step (magnitude 1) are edges."""
    img = torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]).view(1, 1, 1, 8)
    if transpose:
        img = img.transpose(-1, -2)
    assert spatial_complexity(img).tolist() == [pytest.approx(1 / 3)]
    wide = torch.randn(3, 2, 2, 9, generator=torch.Generator().manual_seed(0))  # 2 rows: padded to 3
    assert torch.isfinite(spatial_complexity(wide)).all() and spatial_complexity(wide).shape == (3,)


def test_spatial_complexity_counts_only_magnitudes_strictly_above_the_threshold() -> None:
    """The step of height 2 has Sobel magnitude exactly 1: a threshold of exactly 1 counts no edge."""
    img = torch.full((1, 1, 8, 8), -1.0)
    img[..., 4:] = 1.0
    assert spatial_complexity(img, threshold=1.0).item() == 0.0
    assert spatial_complexity(img, threshold=1.0 - 2**-10).item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_spatial_complexity_of_a_low_precision_image_is_computed_in_float32(dtype: torch.dtype) -> None:
    """The Sobel sums of a half-precision image are taken in float32 (no rounding to 8 or 11 bits
    near the threshold): the same edges as the float32 copy of the same pixel values."""
    img = torch.randn(8, 3, 24, 24, generator=torch.Generator().manual_seed(5)).to(dtype)
    assert torch.equal(spatial_complexity(img), spatial_complexity(img.float()))


def test_confidence_margin_of_low_precision_logits_is_taken_in_float32() -> None:
    """bfloat16 logits are turned into probabilities in float32, not rounded to 8 bits first."""
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    assert torch.equal(confidence_margin(logits), confidence_margin(logits.float()))


def test_complexity_features_pass_their_saliency_threshold_and_read_a_non_square_cam() -> None:
    """``saliency_threshold`` reaches saliency sparsity, and a 3 x 5 cam's regions are taken over
    its own height and width (the grid does not divide it)."""
    inp = random_inputs(b=4, seed=8)
    inp["cam"] = torch.relu(torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(8)))
    f = complexity_features(**inp, grid=2, saliency_threshold=0.25)
    assert torch.equal(f[:, FEATURE_NAMES.index("saliency_sparsity")], saliency_sparsity(inp["cam"], 0.25))
    assert torch.allclose(f[:, FEATURE_NAMES.index("feature_variance")], feature_variance(inp["cam"], 2), atol=1e-7)
    assert not torch.equal(saliency_sparsity(inp["cam"], 0.25), saliency_sparsity(inp["cam"]))  # the knob matters
