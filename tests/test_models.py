"""Registry, backbone feature maps and exit heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eexit.models import create_model, list_models
from eexit.types import ExitLevel


def test_registry_lists_and_rejects() -> None:
    assert {"resnet_narrow", "resnet18", "resnet_micro"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'resnet999'"):
        create_model("resnet999")


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "reductions"),
    [
        ("resnet_narrow", {"stem_stride": 2, "strides": (1, 2, 2, 1)}, 28, [2, 4, 8, 8]),
        ("resnet18", {}, 32, [1, 2, 4, 8]),
        ("resnet18", {"stem": "standard"}, 64, [4, 8, 16, 32]),
    ],
)
def test_forward_features_follow_feature_info(name, kwargs, size, reductions) -> None:
    net = create_model(name, in_chans=3, num_classes=10, **kwargs).eval()
    feats = net.backbone.forward_features(torch.randn(2, 3, size, size))
    assert [f["reduction"] for f in net.backbone.feature_info] == reductions
    for f, info in zip(feats, net.backbone.feature_info, strict=True):
        assert f.shape[1] == info["num_chs"]
        assert f.shape[-1] == -(-size // info["reduction"])
    assert net.min_input_size == reductions[-1]


def test_every_exit_gives_logits_and_predict_exit_matches() -> None:
    torch.manual_seed(0)
    net = create_model("resnet_micro", in_chans=1, num_classes=6).eval()
    x = torch.randn(3, 1, 16, 16)
    out = net(x)
    assert len(out.logits) == len(ExitLevel)
    for level in ExitLevel:
        assert out[level].shape == (3, 6)
        assert torch.allclose(net.predict_exit(x, level), out[level], atol=1e-6)
    assert torch.equal(net.predict_exit(x, "heavy"), net.predict_exit(x, ExitLevel.HEAVY))
    for bad in (-1, 4, 3.0, "huge"):  # -1 ran no stage and fed the stem's map to the HEAVY head
        with pytest.raises(ValueError, match="unknown exit"):
            net.predict_exit(x, bad)


def test_exit_level_parse() -> None:
    assert ExitLevel.parse("Heavy") is ExitLevel.HEAVY
    assert ExitLevel.parse(0) is ExitLevel.TINY
    assert ExitLevel.TINY.key == "tiny"
    with pytest.raises(ValueError, match="expected one of: tiny, light, medium, heavy"):
        ExitLevel.parse("huge")
    # any integer type names an exit (NumPy's, a 0-d integer tensor); booleans, floats and
    # out-of-range indices do not
    assert ExitLevel.parse(np.int64(2)) is ExitLevel.MEDIUM
    assert ExitLevel.parse(torch.tensor(3)) is ExitLevel.HEAVY
    for bad in (True, 1.0, 1.5, torch.tensor(1.0), 4, -1, None):
        with pytest.raises(ValueError, match="unknown exit"):
            ExitLevel.parse(bad)


@pytest.mark.parametrize("name", ["resnet_micro", "resnet_narrow"])
def test_inference_copy_folds_every_batchnorm_and_keeps_logits_and_cams(name: str) -> None:
    from eexit.models.inference import inference_copy

    torch.manual_seed(0)
    net = create_model(name, in_chans=3, num_classes=5, head="mlp", head_conv=[16, 0, 0, 0])
    for m in net.modules():  # running statistics far from the identity, so folding matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = inference_copy(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()), "the original is left as it is"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref = net(x, with_cams=True)
        got = fast(x.contiguous(memory_format=torch.channels_last), with_cams=True)
    for level in ExitLevel:
        assert torch.allclose(ref.logits[level], got.logits[level], atol=1e-4), level.name
        scale = ref.cams[level].abs().max().clamp_min(1e-6)
        assert (ref.cams[level] - got.cams[level]).abs().max() / scale < 1e-4, level.name


@pytest.mark.parametrize("name", ["resnet_micro", "resnet_narrow"])
def test_inference_copy_fuses_pointwise_ops_and_counts_their_flops(name: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from eexit.models.inference import ConvReLU, FusedBasicBlock, inference_copy

    torch.manual_seed(0)
    net = create_model(name, in_chans=1, num_classes=4, head="mlp", head_conv=[8, 0, 0, 0]).eval()
    fast = inference_copy(net)
    assert sum(isinstance(m, FusedBasicBlock) for m in fast.modules()) == sum(len(s) for s in net.backbone.stages)
    assert sum(isinstance(m, ConvReLU) for m in fast.modules()) == 2  # the stem and TINY's head conv
    x = torch.randn(3, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    fused_op = torch.ops.mkldnn._convolution_pointwise
    for level in ExitLevel:
        with torch.no_grad(), FlopCounterMode(display=False) as plain:
            ref = net.predict_exit(x, level)
        with torch.no_grad(), FlopCounterMode(display=False) as served:
            got = fast.predict_exit(x, level)
        assert torch.allclose(ref, got, atol=1e-4), level.name
        # the fused oneDNN calls ran, and they count as the convolutions they replace
        if torch.backends.mkldnn.is_available():
            assert fused_op in served.get_flop_counts()["Global"], level.name
        assert served.get_total_flops() == plain.get_total_flops() > 0, level.name
    # where the fused kernels do not apply (autograd), the same modules run the plain ops
    xg = x.clone().requires_grad_(True)
    out = fast.backbone.forward_features(xg)[-1]
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(out, net.backbone.forward_features(x)[-1], atol=1e-4)
