"""Registry, backbone feature maps and exit heads."""

from __future__ import annotations

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


def test_exit_level_parse() -> None:
    assert ExitLevel.parse("Heavy") is ExitLevel.HEAVY
    assert ExitLevel.parse(0) is ExitLevel.TINY
    assert ExitLevel.TINY.key == "tiny"
    with pytest.raises(ValueError, match="expected one of: tiny, light, medium, heavy"):
        ExitLevel.parse("huge")
