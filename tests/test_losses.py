"""Attention-consistency loss: distributions, KL, and which parameters it moves."""

from __future__ import annotations

import math

import pytest
import torch

from eexit.losses import LossOutput, MultiExitLoss, attention_kl, cam_to_distribution
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


def test_cam_resampling_is_bilinear_with_pixel_centres() -> None:
    """Pins the resampling of a cam to the common size: bilinear with ``align_corners=False``
    (pixel centres), so a 1x2 map ``[0, 1]`` becomes ``[0, .25, .75, 1]`` at 1x4 before the eps
    smoothing (corner-aligned sampling gives ``[0, 1/3, 2/3, 1]``)."""
    p = cam_to_distribution(torch.tensor([[[0.0, 1.0]]]), size=(1, 4), eps=1e-3)
    expected = torch.tensor([0.0, 0.25, 0.75, 1.0]) + 1e-3
    assert torch.allclose(p[0], expected / expected.sum(), atol=1e-7)


def test_temperature_softmax_divides_the_peak_normalised_cam() -> None:
    """Pins ``P = softmax(cam / max / T)``: a lower temperature sharpens the distribution."""
    p = cam_to_distribution(torch.tensor([[[0.0, 3.0]]]), temperature=0.5)
    e2 = math.exp(2.0)  # (3 / 3) / 0.5
    assert p[0].tolist() == pytest.approx([1 / (1 + e2), e2 / (1 + e2)], abs=1e-7)


def test_attn_kl_mean_averages_the_exits_and_is_zero_without_them() -> None:
    """Pins ``LossOutput.attn_kl_mean`` (logged as ``{stage}/loss/attn_kl``): the mean over the
    consistency exits, not their sum; 0 when no KL was measured."""
    total = torch.tensor(5.0)
    out = LossOutput(total, {"tiny": total}, {"tiny": torch.tensor(0.3), "light": torch.tensor(0.6)})
    assert out.attn_kl_mean.item() == pytest.approx(0.45)
    assert LossOutput(total, {"tiny": total}, {}).attn_kl_mean.item() == 0.0


def _hand_logits() -> list[torch.Tensor]:
    # four exits, a batch of 2, 3 classes: each exit its own logits
    return [torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]) * (k + 1) for k in range(len(ExitLevel))]


def _hand_cams() -> list[torch.Tensor]:
    # TINY 2x2, LIGHT and MEDIUM 2x2, HEAVY 4x4 (the largest: the common size)
    g = torch.Generator().manual_seed(3)
    return [torch.rand(2, 2, 2, generator=g) for _ in range(3)] + [torch.rand(2, 4, 4, generator=g)]


def test_total_is_weighted_smoothed_ce_plus_lambda_times_batch_mean_kl_exactly() -> None:
    """Pins ``MultiExitLoss`` on hand-made logits and cams: ``sum_k w_k CE_ls(logits_k, y) +
    lambda * sum_students mean_batch KL(P_HEAVY || P_k)``, with label smoothing applied to every
    exit's cross-entropy, the KL a mean over the batch (not a sum) and every cam resampled to the
    largest cam's size (HEAVY's 4x4)."""
    logits, cams, y = _hand_logits(), _hand_cams(), torch.tensor([0, 2])
    weights = {"tiny": 0.5, "light": 1.0, "medium": 2.0, "heavy": 3.0}
    loss = MultiExitLoss(
        exit_weights=weights, attn_weight=0.7, consistency_exits=["tiny", "medium"], label_smoothing=0.2
    )
    out = loss(logits, y, cams)

    def smoothed_ce(z: torch.Tensor) -> float:
        logp = torch.log_softmax(z, dim=1)
        k = z.shape[1]
        per = [-(0.8 * logp[i, int(t)] + 0.2 / k * logp[i].sum()) for i, t in enumerate(y)]
        return float(sum(per) / len(per))

    ce = {lv.key: smoothed_ce(logits[lv]) for lv in ExitLevel}
    teacher = cam_to_distribution(cams[ExitLevel.HEAVY], (4, 4))
    kl = {
        s: float(attention_kl(teacher, cam_to_distribution(cams[ExitLevel.parse(s)], (4, 4))).mean())
        for s in ("tiny", "medium")
    }
    assert {k: v.item() for k, v in out.ce.items()} == pytest.approx(ce, abs=1e-6)
    assert {k: v.item() for k, v in out.attn_kl.items()} == pytest.approx(kl, abs=1e-6)
    expected = sum(weights[k] * ce[k] for k in ce) + 0.7 * sum(kl.values())
    assert out.total.item() == pytest.approx(expected, abs=1e-5)


def test_a_positive_lambda_without_cams_is_refused() -> None:
    """Pins the error for ``attn_weight > 0`` without cams (silently training without the KL
    term otherwise); at lambda 0 the cams are optional."""
    logits, y = _hand_logits(), torch.tensor([0, 2])
    with pytest.raises(ValueError, match="attn_weight > 0 needs the cams"):
        MultiExitLoss(attn_weight=0.5)(logits, y)
    out = MultiExitLoss(attn_weight=0.0)(logits, y)
    assert out.attn_kl == {} and torch.allclose(out.total, out.ce_total)


def test_settings_hold_the_loss_under_its_config_names() -> None:
    """Pins ``MultiExitLoss.settings`` (what a checkpoint records and a resume compares): every
    value as given, one ``cam_size`` number as a square, missing exit weights as 1."""
    loss = MultiExitLoss(
        exit_weights={"tiny": 0.5},
        attn_weight=0.3,
        consistency_exits=["light"],
        cam_size=4,
        eps=0.01,
        label_smoothing=0.1,
    )
    assert loss.settings == {
        "exit_weights": {"tiny": 0.5, "light": 1.0, "medium": 1.0, "heavy": 1.0},
        "attn_weight": 0.3,
        "consistency_exits": ["light"],
        "cam_size": [4, 4],
        "eps": 0.01,
        "temperature": None,
        "label_smoothing": 0.1,
    }
