"""Our hook-free Grad-CAM against Captum's LayerGradCam, and exact values on hand-set weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam
from torch import nn

from eexit.explain.gradcam import gradcam, normalize_per_image
from eexit.models import ExitHead, create_model
from eexit.types import ExitLevel


def _captum_cam(net, x: torch.Tensor, level: int, target: torch.Tensor) -> torch.Tensor:
    lgc = LayerGradCam(lambda inp: net(inp).logits[level], net.cam_layer(level))
    return lgc.attribute(x, target=target, relu_attributions=True).squeeze(1)


@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("head_conv", [0, 24])
def test_gradcam_equals_captum_for_every_exit(head: str, head_conv: int) -> None:
    torch.manual_seed(0)
    net = create_model("resnet_narrow", in_chans=3, num_classes=7, head=head, head_conv=head_conv).eval()
    x = torch.randn(6, 3, 32, 32)
    out = net(x, with_cams=True)  # targets=None: each exit's own prediction
    for level in ExitLevel:
        target = out.logits[level].argmax(dim=1)
        ours = normalize_per_image(out.cams[level])
        ref = normalize_per_image(_captum_cam(net, x, level, target))
        assert (
            ours.shape
            == ref.shape
            == (6, *net.heads[level].attention(net.backbone.forward_features(x)[level]).shape[-2:])
        )
        assert (ours - ref).abs().max().item() <= 1e-5, f"{head} head, exit {level.name}"
        assert ours.amax().item() > 0, "a map of zeros would make the comparison empty"


def test_gradcam_with_label_targets_and_callable_target_matches_captum() -> None:
    torch.manual_seed(1)
    net = create_model("resnet_micro", in_chans=1, num_classes=5, head="mlp").eval()
    x = torch.randn(4, 1, 16, 16)
    labels = torch.tensor([0, 1, 2, 3])
    by_label = net(x, with_cams=True, targets=labels).cams
    by_callable = net(x, with_cams=True, targets=lambda logits: logits[torch.arange(4), labels]).cams
    for level in ExitLevel:
        ref = _captum_cam(net, x, level, labels)
        assert torch.allclose(by_label[level], ref, atol=1e-6, rtol=1e-4)
        assert torch.allclose(by_callable[level], ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_targets_as_integers_lists_and_arrays_and_bad_targets_refused(head: str) -> None:
    torch.manual_seed(2)
    net = create_model("resnet_micro", in_chans=1, num_classes=5, head=head).eval()
    x = torch.randn(3, 1, 16, 16)
    ref = net(x, with_cams=True, targets=torch.tensor([2, 2, 2])).cams
    for target in (2, np.int64(2), torch.tensor(2), [2, 2, 2], np.array([2, 2, 2])):
        cams = net(x, with_cams=True, targets=target).cams
        assert all(torch.equal(a, b) for a, b in zip(cams, ref, strict=True)), repr(target)
    for target, error, message in (
        (torch.tensor([-1, 0, 1]), ValueError, r"class indices must be in \[0, 5\)"),  # not "the last class"
        ([0, 1, 5], ValueError, r"in \[0, 5\), got values from 0 to 5"),
        (torch.tensor([2.7, 0.0, 1.0]), TypeError, "integer class indices, got torch.float32"),
        ([0, 1], ValueError, r"expected 3 class indices \(one per image\), got shape \(2,\)"),
        (True, TypeError, "class indices"),
        ("cat", TypeError, "class indices"),
    ):
        with pytest.raises(error, match=message):
            net(x, with_cams=True, targets=target)


def test_exact_values_on_hand_weighted_linear_head() -> None:
    head = ExitHead(in_chs=2, num_classes=2, kind="linear")
    with torch.no_grad():
        head.classifier.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
        head.classifier.bias.zero_()
    a = torch.tensor([[[[4.0, 0.0], [2.0, 1.0]], [[0.0, 2.0], [1.0, 1.0]]]])  # (1, 2, 2, 2)
    out = head.forward_parts(a)
    # class 0: alpha = W[0] / (h*w) = [0.25, -0.25]; cam = relu(0.25*A0 - 0.25*A1)
    cam0 = gradcam(head, out, torch.tensor([0]))
    assert torch.equal(cam0, torch.tensor([[[1.0, 0.0], [0.25, 0.0]]]))
    # class 1: alpha = [0.125, 0.5]; cam = 0.125*A0 + 0.5*A1
    cam1 = gradcam(head, out, torch.tensor([1]))
    assert torch.equal(cam1, torch.tensor([[[0.5, 1.0], [0.75, 0.625]]]))
    # z = mean A = [1.75, 1.0] -> logits [0.75, 2.875]: the predicted class is 1
    assert torch.equal(gradcam(head, out, None), cam1)


def test_exact_values_on_hand_weighted_mlp_head() -> None:
    head = ExitHead(in_chs=2, num_classes=2, kind="mlp", hidden=2)
    first, _, last = head.classifier
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))  # hidden 2 is negative -> inactive
        first.bias.zero_()
        last.weight.copy_(torch.tensor([[2.0, 3.0], [-1.0, 1.0]]))
        last.bias.zero_()
    a = torch.tensor([[[[2.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    out = head.forward_parts(a)
    # dy0/dz = W2[0] * relu'(h) @ W1 = [2, 0] @ W1 = [2, 0]; alpha = [0.5, 0]
    cam = gradcam(head, out, torch.tensor([0]))
    assert torch.equal(cam, torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))


def test_gradcam_is_differentiable_without_backbone_backward_for_weights() -> None:
    torch.manual_seed(0)
    net = create_model("resnet_micro", in_chans=1, num_classes=3, head="mlp")
    x = torch.randn(2, 1, 16, 16)
    out = net(x, with_cams=True, targets=torch.tensor([0, 1]), create_graph=True)
    out.cams[ExitLevel.TINY].sum().backward()
    stem_grad = net.backbone.stem[0].weight.grad
    assert stem_grad is not None and stem_grad.abs().sum() > 0
    assert net.heads[ExitLevel.TINY].classifier[0].weight.grad.abs().sum() > 0  # through alpha


def test_gradcam_runs_under_inference_mode() -> None:
    net = create_model("resnet_micro", in_chans=1, num_classes=3).eval()
    with torch.inference_mode():
        out = net(torch.randn(2, 1, 16, 16), with_cams=True)
    assert all(torch.isfinite(c).all() and (c >= 0).all() for c in out.cams)


def test_a_callable_target_works_under_inference_mode() -> None:
    # autograd differentiates a callable target: it runs outside inference mode on a copy of the
    # pooled vector (it failed with "element 0 of tensors does not require grad" before)
    torch.manual_seed(0)
    net = create_model("resnet_micro", in_chans=1, num_classes=5, head="mlp").eval()
    x = torch.randn(4, 1, 16, 16)
    ref = net(x, with_cams=True, targets=torch.full((4,), 3)).cams
    with torch.inference_mode():
        cams = net(x, with_cams=True, targets=lambda logits: logits[:, 3]).cams
    for a, b in zip(cams, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_identity_attention_layer_is_the_stage_output() -> None:
    net = create_model("resnet_micro", in_chans=1, num_classes=3, head_conv=0)
    assert isinstance(net.cam_layer(ExitLevel.TINY), nn.Identity)


def test_mlp_gradient_from_the_forward_hidden_equals_autograd() -> None:
    # the closed-form MLP gradient reuses the forward pass's hidden activation; it must equal
    # autograd's gradient of the target logit, and the recomputed form (no hidden given)
    torch.manual_seed(3)
    head = ExitHead(in_chs=6, num_classes=4, kind="mlp", hidden=8)
    out = head.forward_parts(torch.relu(torch.randn(5, 6, 3, 3)))
    assert out.hidden is not None and out.hidden.shape == (5, 8) and (out.hidden >= 0).all()
    target = torch.tensor([0, 1, 2, 3, 1])
    z = out.pooled.detach().requires_grad_(True)
    (ref,) = torch.autograd.grad(head.classifier(z)[torch.arange(5), target].sum(), z)
    assert torch.allclose(head.logit_gradient(out, target), ref, atol=1e-6)
    assert torch.allclose(head._class_gradient(out.pooled, target), ref, atol=1e-6)
    assert head.forward_parts(torch.randn(2, 6, 3, 3)).logits.shape == (2, 4)
    assert ExitHead(in_chs=6, num_classes=4).forward_parts(torch.randn(2, 6, 3, 3)).hidden is None


def test_targets_given_as_numbers_are_range_checked_whatever_the_logits_device() -> None:
    from eexit.models.heads import class_indices

    # on a GPU the check of a tensor already there is skipped (reading it back would stall every
    # call); numbers and arrays are checked on the host before they move ("meta" stands in for a
    # device whose values cannot be read)
    logits = torch.empty(3, 5, device="meta")
    for target in ([0, 1, 5], np.array([0, -1, 2]), 7):
        with pytest.raises(ValueError, match=r"class indices must be in \[0, 5\)"):
            class_indices(target, logits)
    t = class_indices([0, 1, 4], logits)
    assert t.device.type == "meta" and t.dtype == torch.long


def test_normalize_per_image_divides_each_map_by_its_maximum() -> None:
    cam = torch.tensor([[[0.0, 2.0], [1.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]], [[3.0, 0.0], [0.0, 0.0]]])
    expected = torch.tensor([[[0.0, 0.5], [0.25, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    assert torch.equal(normalize_per_image(cam), expected)
    assert torch.equal(normalize_per_image(torch.zeros(1, 2, 2, dtype=torch.float16)), torch.zeros(1, 2, 2).half())
