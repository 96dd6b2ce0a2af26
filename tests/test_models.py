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


def test_registered_models_have_their_documented_stages_and_record_their_own_name() -> None:
    """Each registry name builds its documented widths and depths (resnet18's stages hold as many
    parameters as torchvision's resnet18 layer1-4) and records that name in its spec, so that the
    spec rebuilds the same network."""
    from torchvision.models import resnet18 as tv_resnet18

    from eexit.models.backbone import ResNetBackbone

    assert list_models() == sorted(list_models())
    documented = {
        "resnet_narrow": ([32, 64, 128, 256], 1),
        "resnet18": ([64, 128, 256, 512], 2),
        "resnet_micro": ([8, 8, 16, 16], 1),
    }
    for name, (widths, depth) in documented.items():
        net = create_model(name, in_chans=3, num_classes=10)
        assert [len(s) for s in net.backbone.stages] == [depth] * 4, name
        assert [f["num_chs"] for f in net.backbone.feature_info] == widths, name
        assert net.spec["name"] == name
        spec = dict(net.spec)
        rebuilt = create_model(spec.pop("name"), **spec)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in net.state_dict().items()
        }
    tv = tv_resnet18()
    tv_count = sum(p.numel() for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4) for p in layer.parameters())
    ours = create_model("resnet18", in_chans=3, num_classes=10).backbone.stages
    # torchvision's resnet18 holds 11,689,512 parameters: less its fc (513,000), conv1 (9,408) and bn1 (128)
    assert sum(p.numel() for p in ours.parameters()) == tv_count == 11_166_976
    assert sum(len(s) for s in ResNetBackbone(depths=(3, 1, 2, 1)).stages) == 7


def test_bottleneck_feature_info_counts_the_expanded_channels() -> None:
    net = create_model("resnet_micro", in_chans=1, num_classes=3, block="bottleneck").eval()
    assert [f["num_chs"] for f in net.backbone.feature_info] == [32, 32, 64, 64]  # planes * 4
    feats = net.backbone.forward_features(torch.randn(2, 1, 16, 16))
    assert [f.shape[1] for f in feats] == [32, 32, 64, 64]
    assert [h.num_chs for h in net.heads] == [32, 32, 64, 64]


def test_head_convs_go_to_their_exits_in_order_and_keep_or_halve_the_map() -> None:
    net = create_model("resnet_micro", in_chans=1, num_classes=3, head_conv=[16, 0, 12, 0], head_conv_kernel=3)
    assert [h.num_chs for h in net.heads] == [16, 8, 12, 16]  # the conv's channels, else the stage map's
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        maps = [h.forward_parts(f).attention for h, f in zip(net.heads, net.backbone.forward_features(x), strict=True)]
    assert [tuple(a.shape[1:]) for a in maps] == [(16, 16, 16), (8, 8, 8), (12, 4, 4), (16, 2, 2)]  # 3x3, padded
    halved = create_model("resnet_micro", in_chans=1, num_classes=3, head_conv=8, head_conv_stride=2)
    with torch.no_grad():
        out = halved.heads[0].forward_parts(halved.backbone.forward_features(x)[0])
    assert tuple(out.attention.shape) == (2, 8, 8, 8)


def _randomise_batchnorm(net: torch.nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_inference_copy_folds_the_third_batchnorm_of_bottleneck_blocks_and_is_channels_last() -> None:
    from eexit.models.inference import inference_copy

    torch.manual_seed(0)
    net = create_model("resnet_micro", in_chans=1, num_classes=4, block="bottleneck", head_conv=[8, 0, 0, 0])
    _randomise_batchnorm(net)
    net.eval()
    fast = inference_copy(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        ref = net(x).logits
        got = fast(x.contiguous(memory_format=torch.channels_last)).logits
    for level in ExitLevel:
        assert torch.allclose(ref[level], got[level], atol=1e-4), level.name
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not any(p.requires_grad for p in fast.parameters())
    plain = inference_copy(net, channels_last=False)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
