"""Attention-consistency loss: distributions, KL, and which parameters it moves."""

from __future__ import annotations

import pytest
import torch

from eexit.losses import MultiExitLoss, attention_kl, cam_to_distribution
from eexit.models import create_model
from eexit.types import ExitLevel


def test_cam_to_distribution_sums_to_one_and_resamples() -> None:
    cam = torch.rand(3, 4, 4)
    p = cam_to_distribution(cam, size=(8, 8))
    assert p.shape == (3, 64)
    assert torch.allclose(p.sum(dim=1), torch.ones(3))
    assert (p > 0).all()
    zero = cam_to_distribution(torch.zeros(1, 4, 4))
    assert torch.allclose(zero, torch.full((1, 16), 1 / 16))  # an empty cam is uniform


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cams_give_finite_distributions_and_loss(dtype: torch.dtype) -> None:
    cams = torch.rand(4, 5, 5).to(dtype)
    cams[1] = 0  # Grad-CAM's ReLU removed everything: in float16 the 1e-12 floor is 0 -> 0 / 0
    p = cam_to_distribution(cams, size=(10, 10))
    assert p.dtype == torch.float32 and torch.isfinite(p).all()
    assert torch.allclose(p.sum(dim=1), torch.ones(4)) and torch.allclose(p[1], torch.full((100,), 0.01))
    # the whole loss under CPU autocast (what 16-mixed / bf16-mixed training runs)
    torch.manual_seed(0)
    net = create_model("resnet_micro", in_chans=1, num_classes=4, head="mlp")
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 4, (8,))
    with torch.autocast("cpu", dtype=dtype):
        out = net(x, with_cams=True, targets=y, create_graph=True)
        out.cams[ExitLevel.HEAVY] = out.cams[ExitLevel.HEAVY] * 0  # every teacher map empty
        parts = MultiExitLoss(attn_weight=1.0)(out.logits, y, out.cams)
    assert torch.isfinite(parts.total) and all(torch.isfinite(v) for v in parts.attn_kl.values())


def test_kl_is_zero_for_equal_maps_and_positive_otherwise() -> None:
    p = cam_to_distribution(torch.rand(2, 5, 5))
    assert torch.allclose(attention_kl(p, p), torch.zeros(2), atol=1e-7)
    q = cam_to_distribution(torch.rand(2, 5, 5))
    assert (attention_kl(p, q) > 0).all()


def test_loss_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="attn_weight"):
        MultiExitLoss(attn_weight=-0.1)
    with pytest.raises(ValueError, match="unknown exit 'huge'"):
        MultiExitLoss(exit_weights={"huge": 1.0})
    with pytest.raises(ValueError, match="teacher"):
        MultiExitLoss(consistency_exits=["tiny", "heavy"])
    # a zero temperature gives a NaN KL and a negative one inverts the attention: both refused
    for t in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            MultiExitLoss(temperature=t)
    for eps in (-1e-3, 0.0):  # 0 turns an all-zero cam (common at initialisation) into 0 / 0
        with pytest.raises(ValueError, match=r"eps must be > 0 \(an all-zero cam would be 0 / 0\)"):
            MultiExitLoss(eps=eps)
    assert MultiExitLoss(eps=0.0, temperature=0.5).eps == 0.0  # unused with a temperature
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        MultiExitLoss(label_smoothing=1.0)
    assert MultiExitLoss(temperature=0.5).temperature == 0.5


def _kl_only_grads(attn_weight: float):
    torch.manual_seed(0)
    net = create_model("resnet_micro", in_chans=1, num_classes=4, head="mlp")
    loss_fn = MultiExitLoss(exit_weights={lv.key: 0.0 for lv in ExitLevel}, attn_weight=attn_weight)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 4, (8,))
    out = net(x, with_cams=True, targets=y, create_graph=True)
    parts = loss_fn(out.logits, y, out.cams)
    net.zero_grad()
    parts.total.backward()
    return net, parts


def _grad_norm(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_kl_moves_early_exits_and_leaves_the_teacher_without_gradient() -> None:
    net, parts = _kl_only_grads(attn_weight=1.0)
    assert parts.total.item() > 0
    for level in (ExitLevel.TINY, ExitLevel.LIGHT, ExitLevel.MEDIUM):
        assert _grad_norm(net.heads[level]) > 0, f"{level.name} head gets no gradient from the KL"
    assert _grad_norm(net.backbone.stages[0]) > 0
    # HEAVY's cam is detached: its head and the stage only it uses get nothing
    assert _grad_norm(net.heads[ExitLevel.HEAVY]) == 0
    assert _grad_norm(net.backbone.stages[3]) == 0


def test_an_optimizer_step_on_the_kl_changes_students_not_teacher() -> None:
    net, _ = _kl_only_grads(attn_weight=1.0)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("heads.0.") for n in changed)
    assert not any(n.startswith(("heads.3.", "backbone.stages.3.")) for n in changed)


def test_lambda_zero_gives_plain_cross_entropy() -> None:
    torch.manual_seed(0)
    net = create_model("resnet_micro", in_chans=1, num_classes=4)
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 4, (4,))
    out = net(x, with_cams=True, targets=y)
    base = MultiExitLoss(attn_weight=0.0)(out.logits, y, out.cams)
    egt = MultiExitLoss(attn_weight=2.0)(out.logits, y, out.cams)
    assert torch.allclose(base.total, base.ce_total)
    assert torch.allclose(egt.total, egt.ce_total + 2.0 * sum(egt.attn_kl.values()))
    assert base.attn_kl.keys() == {"tiny", "light", "medium"}  # still measured at lambda 0


def test_attention_kl_is_kl_of_the_student_from_the_teacher_exactly() -> None:
    # KL(teacher || student): the early exit (student) is pulled to cover where HEAVY looks; the
    # other direction also is 0 for equal maps and positive otherwise
    import math

    teacher, student = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]])
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert attention_kl(teacher, student).item() == pytest.approx(expected, abs=1e-6)
    assert attention_kl(student, teacher).item() != pytest.approx(expected, abs=1e-3)


def test_cam_distribution_does_not_depend_on_the_cam_scale() -> None:
    # the cam is divided by its peak before eps is added: a cam 5x larger (a more confident exit)
    # gives the same distribution
    cam = torch.rand(2, 4, 4) + torch.eye(4)
    p, p5 = cam_to_distribution(cam, eps=1e-3), cam_to_distribution(5 * cam, eps=1e-3)
    assert torch.allclose(p, p5, atol=1e-7)
    peak = cam.flatten(1).amax(1, keepdim=True)
    expected = cam.flatten(1) / peak + 1e-3
    assert torch.allclose(p, expected / expected.sum(1, keepdim=True), atol=1e-7)
