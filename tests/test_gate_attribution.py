"""Captum attributions of gate decisions: exact values, completeness, validation, side effects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eexit.explain.gate_attribution import DEFAULT_METHOD, METHODS, ExpectedTier, GateAttribution, explain_gate

NUM_FEATURES = 7
W = torch.tensor([1.5, -2.0, 0.5, 0.0, 3.0, -0.25, 1.0])
BIAS = 0.7


class LinearScore(nn.Module):
    """Hand-weighted additive score ``w . f + b``: ``(B, 7)`` -> ``(B,)``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(NUM_FEATURES, 1)
        with torch.no_grad():
            self.linear.weight.copy_(W.view(1, -1))
            self.linear.bias.fill_(BIAS)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(f).squeeze(1)


class ContinueProbability(nn.Module):
    """A staged gate's continue-probability with the sigmoid as a module: ``sigmoid(-logit)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.sigmoid = nn.Sigmoid()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.sigmoid(-self.net(f).squeeze(1))


def make_gate(seed: int = 0, inplace: bool = False, num_out: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    gate = nn.Sequential(nn.Linear(NUM_FEATURES, 32), nn.ReLU(inplace=inplace), nn.Linear(32, num_out))
    return gate.eval()


def make_data(batch: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = 1.5 * torch.randn(batch, NUM_FEATURES, generator=g)
    baseline = 0.3 * torch.randn(NUM_FEATURES, generator=g)
    return features, baseline


def reference_expected_tier(gate: nn.Module, f: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        p = torch.softmax(gate(f), dim=1)
    return (p * torch.arange(p.shape[1], dtype=p.dtype)).sum(1)


# ---------------------------------------------------------------- exact values on a linear score


@pytest.mark.parametrize("method", METHODS)
def test_linear_score_gives_w_times_difference(method: str) -> None:
    torch.manual_seed(0)
    score = LinearScore()
    features, baseline = make_data(batch=6 if method == "kernel_shap" else 32)
    res = explain_gate(score, features, baseline, method)

    assert isinstance(res, GateAttribution)
    assert res.method == method
    expected = W * (features - baseline)
    torch.testing.assert_close(res.attributions, expected, atol=1e-5, rtol=0)
    assert res.delta.shape == (features.shape[0],)
    assert float(res.delta.max()) < 1e-5
    torch.testing.assert_close(res.output, features @ W + BIAS, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.baseline_output, baseline @ W + BIAS, atol=1e-5, rtol=0)
    assert res.baseline_output.dim() == 0


def test_default_method_is_deeplift() -> None:
    assert DEFAULT_METHOD == "deeplift"
    assert DEFAULT_METHOD in METHODS
    features, baseline = make_data(batch=4)
    assert explain_gate(LinearScore(), features, baseline).method == "deeplift"


# ------------------------------------------------------------------------- the expected tier


def test_expected_tier_matches_definition_and_range() -> None:
    gate = make_gate()
    features, _ = make_data(batch=64)
    with torch.no_grad():
        s = ExpectedTier(gate)(features)
    assert s.shape == (64,)
    torch.testing.assert_close(s, reference_expected_tier(gate, features), atol=1e-6, rtol=0)
    assert float(s.min()) >= 0.0
    assert float(s.max()) <= 3.0


def test_expected_tier_rejects_non_2d_logits() -> None:
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        ExpectedTier(nn.Flatten(0))(torch.randn(3, NUM_FEATURES))


def test_positive_attribution_means_more_compute() -> None:
    # Only feature 0 matters, and raising it moves probability from tier 0 to tier 3.
    gate = nn.Linear(NUM_FEATURES, 4)
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.zero_()
        gate.weight[:, 0] = torch.tensor([-2.0, 0.0, 0.0, 2.0])
    baseline = torch.zeros(NUM_FEATURES)
    features = torch.zeros(2, NUM_FEATURES)
    features[0, 0], features[1, 0] = 1.0, -1.0
    features[:, 1:] = torch.randn(2, NUM_FEATURES - 1)
    for method in ("deeplift", "integrated_gradients", "shapley_value_sampling"):
        res = explain_gate(ExpectedTier(gate), features, baseline, method)
        assert res.attributions[0, 0] > 0.1, method  # more compute than the baseline
        assert res.attributions[1, 0] < -0.1, method  # less compute than the baseline
        torch.testing.assert_close(res.attributions[:, 1:], torch.zeros(2, NUM_FEATURES - 1), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ completeness on an MLP gate


@pytest.mark.parametrize("method", ["deeplift", "integrated_gradients"])
def test_completeness_on_mlp_gate(method: str) -> None:
    gate = make_gate()
    score = ExpectedTier(gate)
    features, baseline = make_data(batch=64)
    res = explain_gate(score, features, baseline, method)

    s_f = reference_expected_tier(gate, features)
    s_b = reference_expected_tier(gate, baseline.unsqueeze(0))[0]
    torch.testing.assert_close(res.output, s_f, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.baseline_output, s_b, atol=1e-6, rtol=0)
    assert float((s_f - s_b).abs().max()) > 0.1  # the decisions really differ from the baseline's

    gap = (res.attributions.sum(1) - (s_f - s_b)).abs()
    assert torch.all(gap <= res.delta + 1e-5)
    torch.testing.assert_close(res.delta, gap, atol=1e-5, rtol=0)
    if method == "deeplift":
        assert float(res.delta.max()) < 1e-4
    else:
        assert float(res.delta.max()) < 5e-2


def test_integrated_gradients_delta_shrinks_with_steps() -> None:
    score = ExpectedTier(make_gate())
    features, baseline = make_data(batch=32)
    coarse = explain_gate(
        score, features, baseline, "integrated_gradients", n_steps=4, integration_method="riemann_trapezoid"
    )
    fine = explain_gate(score, features, baseline, "integrated_gradients", n_steps=200)
    assert float(fine.delta.mean()) < float(coarse.delta.mean())
    # the fine path integral agrees with DeepLift's exact decomposition in total
    dl = explain_gate(score, features, baseline, "deeplift")
    torch.testing.assert_close(fine.attributions.sum(1), dl.attributions.sum(1), atol=5e-3, rtol=0)


def test_sampling_methods_are_complete_on_mlp_gate() -> None:
    torch.manual_seed(0)
    score = ExpectedTier(make_gate())
    features, baseline = make_data(batch=4)
    svs = explain_gate(score, features, baseline, "shapley_value_sampling")
    assert float(svs.delta.max()) < 1e-5  # each permutation telescopes
    ks = explain_gate(score, features, baseline, "kernel_shap", n_samples=300)
    assert float(ks.delta.max()) < 1e-3  # endpoints carry weight 1e6 in the regression
    # two estimates of the same Shapley values
    torch.testing.assert_close(ks.attributions, svs.attributions, atol=0.1, rtol=0)


def test_feature_ablation_reports_its_completeness_gap() -> None:
    score = ExpectedTier(make_gate())
    features, baseline = make_data(batch=16)
    res = explain_gate(score, features, baseline, "feature_ablation")
    s_b = res.baseline_output
    gap = (res.attributions.sum(1) - (res.output - s_b)).abs()
    torch.testing.assert_close(res.delta, gap, atol=1e-6, rtol=0)
    assert float(res.delta.max()) > 1e-3  # not complete on a non-additive gate, and it says so


def test_continue_probability_deeplift_is_complete() -> None:
    score = ContinueProbability(make_gate(num_out=1))
    features, baseline = make_data(batch=32)
    res = explain_gate(score, features, baseline, "deeplift")
    assert float(res.delta.max()) < 1e-4
    assert float(res.output.min()) >= 0.0
    assert float(res.output.max()) <= 1.0


def test_inplace_relu_gate_is_handled_without_changing_it() -> None:
    features, baseline = make_data(batch=16)
    inplace_gate = make_gate(inplace=True)
    res = explain_gate(ExpectedTier(inplace_gate), features, baseline, "deeplift")
    ref = explain_gate(ExpectedTier(make_gate(inplace=False)), features, baseline, "deeplift")
    assert float(res.delta.max()) < 1e-4
    torch.testing.assert_close(res.attributions, ref.attributions, atol=1e-6, rtol=0)
    assert inplace_gate[1].inplace is True


# ------------------------------------------------------------------------------ validation


def test_unknown_method_names_it_and_lists_methods() -> None:
    features, baseline = make_data(batch=2)
    with pytest.raises(ValueError, match="'lime'") as info:
        explain_gate(LinearScore(), features, baseline, method="lime")
    for name in METHODS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("features", "baseline", "match"),
    [
        (torch.randn(NUM_FEATURES), torch.zeros(NUM_FEATURES), r"features must have shape \(B, F\); got \(7,\)"),
        (
            torch.randn(2, 3, NUM_FEATURES),
            torch.zeros(NUM_FEATURES),
            r"features must have shape \(B, F\); got \(2, 3, 7\)",
        ),
        (torch.randn(3, 0), torch.zeros(0), r"F >= 1"),
        (torch.randn(4, NUM_FEATURES), torch.zeros(6), r"baseline must have shape \(7,\) or \(1, 7\).*got \(6,\)"),
        (torch.randn(4, NUM_FEATURES), torch.zeros(4, NUM_FEATURES), r"baseline must have shape.*got \(4, 7\)"),
        (torch.full((4, NUM_FEATURES), float("nan")), torch.zeros(NUM_FEATURES), r"finite"),
    ],
)
def test_shape_errors_are_clear(features: torch.Tensor, baseline: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        explain_gate(LinearScore(), features, baseline)


@pytest.mark.parametrize("method", METHODS)
def test_an_empty_batch_gives_empty_results(method: str) -> None:
    _, baseline = make_data(batch=1)
    res = explain_gate(ExpectedTier(make_gate()), torch.zeros(0, NUM_FEATURES), baseline, method=method)
    assert res.attributions.shape == (0, NUM_FEATURES) and res.delta.shape == (0,) and res.output.shape == (0,)
    full = explain_gate(ExpectedTier(make_gate()), baseline.view(1, -1), baseline, method=method)
    assert torch.allclose(res.baseline_output, full.baseline_output, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_features_that_overflow_the_gate_are_refused_not_answered_with_nan(method: str) -> None:
    # finite features, but 3e38 * a weight overflows float32: NaN attributions (KernelShap's
    # least squares crashed in oneMKL); the error names the row
    features, baseline = make_data(batch=3)
    features[1] = 3e38
    scaled = nn.Sequential(nn.Linear(NUM_FEATURES, NUM_FEATURES), make_gate()).eval()
    with torch.no_grad():  # a standardisation by a small std: 3e38 / 0.25 overflows
        scaled[0].weight.copy_(4.0 * torch.eye(NUM_FEATURES))
        scaled[0].bias.zero_()
    with pytest.raises(ValueError, match=r"score is not finite for 1 of 3 feature rows \(first: row 1"):
        explain_gate(ExpectedTier(scaled), features, baseline, method=method)
    # a finite score, but the sampled outputs' differences overflow (Shapley), or KernelShap's
    # least-squares fit fails inside Captum (a oneMKL error)
    failure = {
        "shapley_value_sampling": r"attributions are not finite for 1 of 3 feature rows",
        "kernel_shap": r"kernel_shap failed on features too large for float arithmetic \(up to 3e\+38",
    }
    if method in failure:
        with pytest.raises(ValueError, match=failure[method]):
            explain_gate(ExpectedTier(make_gate()), features, baseline, method=method)


def test_non_tensor_and_integer_inputs_are_rejected() -> None:
    with pytest.raises(TypeError, match="tensors"):
        explain_gate(LinearScore(), [[0.0] * NUM_FEATURES], torch.zeros(NUM_FEATURES))
    with pytest.raises(TypeError, match="floating point"):
        explain_gate(LinearScore(), torch.ones(2, NUM_FEATURES, dtype=torch.long), torch.zeros(NUM_FEATURES))


def test_score_fn_must_return_one_score_per_image() -> None:
    features, baseline = make_data(batch=4)
    with pytest.raises(ValueError, match=r"one score per image \(B,\); got \(5, 4\)"):
        explain_gate(make_gate(), features, baseline)  # raw logits, not wrapped in ExpectedTier


def test_reserved_keywords_are_rejected() -> None:
    features, baseline = make_data(batch=2)
    with pytest.raises(ValueError, match="target"):
        explain_gate(LinearScore(), features, baseline, target=0)


def test_deeplift_needs_a_module_other_methods_take_callables() -> None:
    features, baseline = make_data(batch=4)
    score = LinearScore()

    def fn(f: torch.Tensor) -> torch.Tensor:
        return score(f)

    with pytest.raises(TypeError, match=r"nn\.Module"):
        explain_gate(fn, features, baseline, "deeplift")
    res = explain_gate(fn, features, baseline, "feature_ablation")
    torch.testing.assert_close(res.attributions, W * (features - baseline), atol=1e-5, rtol=0)


def test_baseline_shapes_f_and_1f_agree() -> None:
    score = ExpectedTier(make_gate())
    features, baseline = make_data(batch=8)
    a = explain_gate(score, features, baseline)
    b = explain_gate(score, features, baseline.unsqueeze(0))
    torch.testing.assert_close(a.attributions, b.attributions)


# ---------------------------------------------------------------------------- side effects


@pytest.mark.parametrize("method", METHODS)
def test_gate_is_not_modified(method: str) -> None:
    torch.manual_seed(0)
    gate = make_gate()
    score = ExpectedTier(gate)
    before = {k: v.clone() for k, v in score.state_dict().items()}
    features, baseline = make_data(batch=3)
    features_before, baseline_before = features.clone(), baseline.clone()

    explain_gate(score, features, baseline, method, **({"n_samples": 50} if method == "kernel_shap" else {}))

    after = score.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    for p in score.parameters():
        assert p.grad is None
    for m in score.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert not hasattr(m, "input") and not hasattr(m, "output")
    assert not gate.training
    assert torch.equal(features, features_before) and torch.equal(baseline, baseline_before)
    assert not features.requires_grad


@pytest.mark.parametrize("method", ["deeplift", "integrated_gradients", "shapley_value_sampling", "feature_ablation"])
def test_works_under_no_grad_and_inference_mode(method: str) -> None:
    torch.manual_seed(0)
    score = ExpectedTier(make_gate())
    features, baseline = make_data(batch=8)
    torch.manual_seed(1)
    ref = explain_gate(score, features, baseline, method)
    torch.manual_seed(1)
    with torch.no_grad():
        res = explain_gate(score, features, baseline, method)
    torch.testing.assert_close(res.attributions, ref.attributions)
    torch.testing.assert_close(res.delta, ref.delta)
    torch.manual_seed(1)
    with torch.inference_mode():
        inf_features, inf_baseline = features.clone(), baseline.clone()
        res = explain_gate(score, inf_features, inf_baseline, method)
    torch.testing.assert_close(res.attributions, ref.attributions)
    for p in score.parameters():
        assert p.grad is None


def test_results_are_detached() -> None:
    res = explain_gate(ExpectedTier(make_gate()), *make_data(batch=4))
    for t in (res.attributions, res.delta, res.output, res.baseline_output):
        assert not t.requires_grad
        assert t.grad_fn is None


@pytest.mark.parametrize("method", METHODS)
def test_features_of_another_dtype_are_explained_in_the_gates(method: str) -> None:
    torch.manual_seed(0)
    gate = ExpectedTier(make_gate())
    features, baseline = make_data(batch=8)
    torch.manual_seed(1)  # the sampling methods draw the same permutations / coalitions
    ref = explain_gate(gate, features, baseline, method)
    torch.manual_seed(1)
    res = explain_gate(gate, features.double(), baseline.double(), method)  # crashed in the Linear before
    assert res.attributions.dtype == torch.float32
    torch.testing.assert_close(res.attributions, ref.attributions, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_runs_on_the_inputs_device(method: str) -> None:
    torch.manual_seed(0)
    score = LinearScore().cuda()
    features, baseline = make_data(batch=4)
    res = explain_gate(score, features.cuda(), baseline.cuda(), method)
    for t in (res.attributions, res.delta, res.output, res.baseline_output):
        assert t.device.type == "cuda"
    torch.testing.assert_close(res.attributions.cpu(), W * (features - baseline), atol=1e-5, rtol=0)


def test_deeplift_summed_gradients_equal_captums_per_row_gradients():
    # explain_gate gives Captum's DeepLift the gradient of the scores' sum instead of the
    # gradients of the unbound rows: the attributions must be the same
    from captum.attr import DeepLift

    from eexit.explain.gate_attribution import _summed_gradients

    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1), torch.nn.Sigmoid())
    x, b = torch.randn(64, 7, requires_grad=True), torch.randn(1, 7).expand(64, 7)
    reference = DeepLift(model).attribute(x, baselines=b, target=0)
    fast = DeepLift(model)
    fast.gradient_func = _summed_gradients
    got = fast.attribute(x, baselines=b, target=0)
    assert torch.allclose(got, reference, atol=1e-7, rtol=1e-6)
    # and through explain_gate on a scalar score (one per row), completeness holds
    score = torch.nn.Sequential(model, torch.nn.Flatten(0))
    res = explain_gate(score, x.detach(), b[0], method="deeplift")
    assert torch.allclose(res.attributions.sum(dim=1), score(x.detach()) - score(b[:1]).expand(64), atol=1e-5)


def test_deeplift_follows_weights_changed_in_place_between_calls() -> None:
    # DeepLift explains a per-thread copy of the score module, kept between calls: it must be
    # made anew when the module's tensors change
    import copy

    from eexit.explain.gate_attribution import explain_gate

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 1), nn.Flatten(0))
    x, base = torch.randn(5, 7), torch.zeros(7)
    first = explain_gate(net, x, base, method="deeplift").attributions
    assert torch.equal(explain_gate(net, x, base, method="deeplift").attributions, first)
    with torch.no_grad():
        net[0].weight.mul_(-2.0)
    changed = explain_gate(net, x, base, method="deeplift")
    fresh = explain_gate(copy.deepcopy(net), x, base, method="deeplift")
    assert not torch.allclose(changed.attributions, first)
    assert torch.equal(changed.attributions, fresh.attributions) and float(changed.delta.max()) < 1e-5


# ----------------------------------------- mutation audit: each method's defaults, as Captum runs them


def test_integrated_gradients_defaults_to_50_gauss_legendre_steps() -> None:
    from captum.attr import IntegratedGradients

    score = ExpectedTier(make_gate())
    features, baseline = make_data(batch=8)
    res = explain_gate(score, features, baseline, "integrated_gradients")
    expected = IntegratedGradients(score).attribute(
        features, baselines=baseline.expand(8, -1), n_steps=50, method="gausslegendre"
    )
    torch.testing.assert_close(res.attributions, expected, atol=1e-6, rtol=0)


def test_integration_method_is_passed_to_captum_as_its_method() -> None:
    from captum.attr import IntegratedGradients

    score = ExpectedTier(make_gate())
    features, baseline = make_data(batch=8)
    res = explain_gate(score, features, baseline, "integrated_gradients", n_steps=4, integration_method="riemann_left")
    ig = IntegratedGradients(score)
    left = ig.attribute(features, baselines=baseline.expand(8, -1), n_steps=4, method="riemann_left")
    gauss = ig.attribute(features, baselines=baseline.expand(8, -1), n_steps=4, method="gausslegendre")
    torch.testing.assert_close(res.attributions, left, atol=1e-6, rtol=0)
    assert not torch.allclose(left, gauss, atol=1e-3)  # the two rules differ at 4 steps


def test_shapley_value_sampling_defaults_to_25_permutations() -> None:
    from captum.attr import ShapleyValueSampling

    score = ExpectedTier(make_gate())
    features, baseline = make_data(batch=4)
    torch.manual_seed(3)
    res = explain_gate(score, features, baseline, "shapley_value_sampling")
    torch.manual_seed(3)
    expected = ShapleyValueSampling(score).attribute(
        features, baselines=baseline.expand(4, -1), n_samples=25, perturbations_per_eval=NUM_FEATURES
    )
    torch.testing.assert_close(res.attributions, expected, atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore:You are providing multiple inputs")
def test_kernel_shap_defaults_to_200_coalitions_fitted_by_weighted_least_squares() -> None:
    from captum._utils.models.linear_model.model import LinearModel
    from captum.attr import KernelShap

    from eexit.explain.gate_attribution import _wls_train

    score = ExpectedTier(make_gate())
    features, baseline = make_data(batch=2)
    torch.manual_seed(3)
    res = explain_gate(score, features, baseline, "kernel_shap")
    reference = KernelShap(score)
    reference.interpretable_model = LinearModel(train_fn=_wls_train)
    torch.manual_seed(3)
    expected = reference.attribute(
        features, baselines=baseline.expand(2, -1), n_samples=200, perturbations_per_eval=200
    )
    torch.testing.assert_close(res.attributions, expected, atol=1e-6, rtol=0)


def test_a_baseline_that_is_not_finite_is_refused() -> None:
    features, baseline = make_data(batch=2)
    baseline[3] = float("inf")
    with pytest.raises(ValueError, match="features and baseline must be finite"):
        explain_gate(LinearScore(), features, baseline)


def test_deeplift_explains_a_copy_without_in_place_activations() -> None:
    from eexit.explain.gate_attribution import _deeplift_model

    gate = make_gate(inplace=True)
    score = ExpectedTier(gate)
    model = _deeplift_model(score)
    assert model is not score and model.gate[1] is not gate[1]
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert gate[1].inplace is True  # the gate itself is left as it is
    assert _deeplift_model(score) is model  # kept for the next call on the same tensors


@pytest.mark.parametrize("key", ["inputs", "baselines", "target"])
def test_each_keyword_explain_gate_sets_itself_is_refused_by_name(key: str) -> None:
    features, baseline = make_data(batch=2)
    with pytest.raises(ValueError, match=rf"'{key}' is set by explain_gate"):
        explain_gate(LinearScore(), features, baseline, **{key: baseline})
