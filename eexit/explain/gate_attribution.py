"""Explain routing decisions: attribute a gate's scalar output per image to its input features.

A router's gate maps ``(B, F)`` standardised complexity features to a scalar per image that
means "more compute": for the one-shot gate the expected tier
``s(f) = sum_t t * softmax(gate(f))_t`` (:class:`ExpectedTier`), for a staged gate its
continue-probability. :func:`explain_gate` attributes ``s(f) - s(baseline)`` to the ``F``
features with one of Captum's methods, where the baseline is the mean feature vector of
calibration images whose oracle tier is TINY. A positive attribution pushes the image towards
more compute, a negative one towards less.

Every method is checked for completeness, ``sum_i attr_i = s(f) - s(baseline)``: the returned
``delta`` is the gap, computed here for every method (not only those for which Captum reports
one).

* ``deeplift`` (default): one forward and one backward pass on the input and baseline batch;
  exact completeness (``delta`` ~ 1e-7) on ReLU gates wrapped in :class:`ExpectedTier`. It
  needs the gate's non-linearities as modules (``nn.ReLU(inplace=False)``, ``nn.Sigmoid()``),
  not functional calls (``F.relu``/``torch.sigmoid`` are then treated as linear and
  completeness breaks, which ``delta`` shows), and each module used once per forward.
  Modules with ``inplace=True`` (which Captum's hooks do not reliably support across
  versions) are handled by explaining a deep copy of the gate with ``inplace=False``; the gate
  itself is never changed. Gates should use ``nn.ReLU(inplace=False)`` anyway.
* ``integrated_gradients``: Gauss-Legendre path integral, 50 steps by default, evaluated in
  chunks of ``internal_batch_size`` (default ``max(1024, n_steps)``) path points; ``delta``
  is the quadrature error (~4e-3 on a random 7-32-4 gate at 50 steps).
* ``shapley_value_sampling``: 25 random feature permutations by default; complete by
  construction (each permutation's marginal contributions telescope).
* ``kernel_shap``: a weighted linear surrogate per image (slow: one regression per image);
  fitted here by closed-form weighted least squares in torch, so scikit-learn is not needed.
* ``feature_ablation``: ``s(f) - s(f with feature i set to the baseline)``; not complete on
  non-additive gates.

For an additive score ``w . f + b`` every method returns ``w * (f - baseline)`` exactly.
"""

from __future__ import annotations

import copy
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from captum._utils.common import _run_forward
from captum._utils.gradient import compute_gradients
from captum._utils.models.linear_model.model import LinearModel
from captum.attr import DeepLift, FeatureAblation, IntegratedGradients, KernelShap, ShapleyValueSampling
from torch import Tensor, nn
from torch.utils.data import DataLoader

from eexit.models.inference import without_autocast

METHODS = ("deeplift", "integrated_gradients", "shapley_value_sampling", "kernel_shap", "feature_ablation")
DEFAULT_METHOD = "deeplift"

# Keyword arguments passed to each method's ``attribute`` unless the caller overrides them.
# ``perturbations_per_eval`` batches all of one image's (or one permutation's) perturbations
# into one forward pass; it is set from the number of features when left out.
_DEFAULT_KWARGS: dict[str, dict[str, Any]] = {
    "deeplift": {},
    "integrated_gradients": {"n_steps": 50, "method": "gausslegendre"},
    "shapley_value_sampling": {"n_samples": 25},
    "kernel_shap": {"n_samples": 200},
    "feature_ablation": {},
}

_IG_CHUNK = 1024

# Captum's informational warnings that every call would otherwise emit.
_QUIET = (
    r"Setting forward, backward hooks and attributes on non-linear",
    r"You are providing multiple inputs for Lime / Kernel SHAP",
)
# Captum's notes on every call, silenced once here for Captum's modules only: a
# ``warnings.catch_warnings`` per call is not thread-safe (two threads restoring the filters in
# turn lost one's and left the other's installed for good)
for _message in _QUIET:
    warnings.filterwarnings("ignore", message=_message, module=r"captum\.")


class ExpectedTier(nn.Module):
    """Expected tier of a tier classifier: ``(B, F)`` -> ``(B,)`` ``sum_t t * softmax(gate(f))_t``.

    The softmax is an ``nn.Softmax`` module applied to logits centred per image (softmax is
    shift-invariant, so the value is unchanged). Captum's DeepLift rescale rule for
    ``nn.Softmax`` subtracts a constant from the multipliers; with centred logits the logit
    differences sum to zero per image, so that constant cancels and DeepLift's attributions
    sum exactly to ``s(f) - s(baseline)``. No operation here is in place.

    Args:
        gate: module mapping features ``(B, F)`` to tier logits ``(B, T)``, e.g.
            ``OneShotGate.logits_module()``. For DeepLift its activations must be modules
            (``nn.ReLU(inplace=False)``), each used once per forward.
    """

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate
        self.softmax = nn.Softmax(dim=1)

    def forward(self, features: Tensor) -> Tensor:
        """Features ``(B, F)`` -> expected tier ``(B,)`` in ``[0, T - 1]``."""
        logits = self.gate(features)
        if logits.dim() != 2:
            raise ValueError(f"the gate must return tier logits of shape (B, T); got {tuple(logits.shape)}")
        probs = self.softmax(logits - logits.mean(dim=1, keepdim=True))
        tiers = torch.arange(probs.shape[1], device=probs.device, dtype=probs.dtype)
        return probs @ tiers


@dataclass
class GateAttribution:
    """Attributions of a gate's scalar output for a batch of routing decisions.

    Attributes:
        attributions: ``(B, F)`` contribution of each feature to ``output - baseline_output``;
            positive pushes towards more compute.
        delta: ``(B,)`` completeness gap ``|sum_i attributions_i - (output - baseline_output)|``.
        output: ``(B,)`` the explained score ``s(f)``.
        baseline_output: ``()`` the score of the baseline ``s(baseline)``.
        method: the attribution method used (one of ``METHODS``).
    """

    attributions: Tensor
    delta: Tensor
    output: Tensor
    baseline_output: Tensor
    method: str = DEFAULT_METHOD

    def to(self, device: torch.device | str) -> GateAttribution:
        """The same attributions on ``device``."""
        moved = (t.to(device) for t in (self.attributions, self.delta, self.output, self.baseline_output))
        return GateAttribution(*moved, method=self.method)


def _wls_train(model: LinearModel, dataloader: DataLoader, construct_kwargs: dict, **_: Any) -> dict[str, float]:
    """Closed-form weighted least squares with intercept (the train_fn of Captum's ``LinearModel``).

    Replaces Captum's default ``SkLearnLinearRegression`` surrogate of ``KernelShap`` (same
    objective, no scikit-learn); solved in float64 because the endpoint samples carry weight 1e6.
    """
    xs, ys, ws = zip(*dataloader, strict=True)
    x, y, w = torch.cat(xs).double(), torch.cat(ys).double().reshape(-1), torch.cat(ws).double().reshape(-1)
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    root_w = w.clamp_min(0).sqrt().unsqueeze(1)
    # gelsd (SVD) is CPU-only; the surrogate has F + 1 unknowns, so solve it on the CPU.
    solution = torch.linalg.lstsq((root_w * design).cpu(), (root_w * y.unsqueeze(1)).cpu(), driver="gelsd").solution
    solution = solution.squeeze(1).to(device=x.device, dtype=torch.float32)
    model._construct_model_params(
        norm_type=None, weight_values=solution[:-1].view(1, -1), bias_value=solution[-1:], **construct_kwargs
    )
    return {"train_time": 0.0}


def _as_batch(features: Tensor, baseline: Tensor) -> tuple[Tensor, Tensor]:
    """Validate shapes and return ``features (B, F)`` and ``baseline (B, F)`` on one device/dtype."""
    if not isinstance(features, Tensor) or not isinstance(baseline, Tensor):
        raise TypeError("features and baseline must be torch tensors")
    if features.dim() != 2:
        raise ValueError(f"features must have shape (B, F); got {tuple(features.shape)}")
    batch, num_features = features.shape
    if num_features == 0:
        raise ValueError(f"features must be a (B, F) batch with F >= 1; got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point; got {features.dtype}")
    if baseline.dim() == 2 and baseline.shape[0] == 1:
        baseline = baseline[0]
    if baseline.dim() != 1 or baseline.shape[0] != num_features:
        raise ValueError(
            f"baseline must have shape ({num_features},) or (1, {num_features}) to match features (B, F) = {tuple(features.shape)}; got {tuple(baseline.shape)}"
        )
    if not (torch.isfinite(features).all() and torch.isfinite(baseline).all()):
        raise ValueError("features and baseline must be finite")
    x = features.detach().clone()
    # one row at least: an empty batch still scores its baseline
    b = baseline.detach().to(device=x.device, dtype=x.dtype).unsqueeze(0).expand(max(batch, 1), -1).contiguous()
    return x, b


def _refuse_non_finite(values: Tensor, x: Tensor, subject: str) -> None:
    """Raise naming the first row of ``x`` ``(B, F)`` whose entry of ``values`` ``(B,)`` is not
    finite (``subject``: what is not, with its verb, e.g. ``"the score is"``)."""
    if bool(torch.isfinite(values).all()):
        return
    rows = (~torch.isfinite(values)).nonzero().flatten().tolist()
    raise ValueError(
        f"{subject} not finite for {len(rows)} of {len(x)} feature rows "
        f"(first: row {rows[0]}, features {x[rows[0]].tolist()}): features out of the range the gate can take"
    )


def _score(score_fn: Callable[[Tensor], Tensor], x: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``s(f)`` ``(B,)`` and ``s(baseline)`` ``()`` in one forward pass, with shape checks."""
    with torch.no_grad():
        out = score_fn(torch.cat([x, b[:1]]))
    if not isinstance(out, Tensor) or out.shape != (x.shape[0] + 1,):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"score_fn must map features (B, F) to one score per image (B,); got {shape} for B = {x.shape[0] + 1}"
        )
    return out[:-1].detach(), out[-1].detach()


_DEEPLIFT_COPIES = threading.local()
"""Per thread: ``{ids of the wrapped modules: (weak references to them, their tensors' signature, copy)}``."""


def _deeplift_model(score_fn: nn.Module) -> nn.Module:
    """The module DeepLift hooks: a private copy of ``score_fn``, without in-place activations.

    Captum registers hooks on the module's activations and keeps its inputs and outputs on them
    for the length of a call: on the router's own module, two threads explaining at once (a
    server's thread pool), or one explaining while another routes, mixed their tensors up (most
    calls failed, some returned wrong attributions with a large delta). A copy costs 0.5-1 ms on
    the CPU, as much as the attribution of a batch of 256: each thread keeps its copy per set of
    modules holding the tensors (routers build the wrappers and activations anew per call), and
    makes a new one when the structure (module types and settings) differs or a tensor changed
    (another storage or an in-place update)."""
    modules = list(score_fn.modules())
    owners = [
        m
        for m in modules
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
    ]
    tensors = [*score_fn.parameters(), *score_fn.buffers()]
    signature = (
        tuple((type(m), m.extra_repr()) for m in modules),
        tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors),
    )
    cache: dict = _DEEPLIFT_COPIES.__dict__.setdefault("copies", {})
    key = tuple(id(m) for m in owners)
    hit = cache.get(key)
    if hit is not None:
        refs, saved, model = hit
        if saved == signature and all(r() is m for r, m in zip(refs, owners, strict=True)):
            return model
    model = copy.deepcopy(score_fn)
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    if len(cache) >= 16:  # routers come and go: keep the copies of the recent ones only
        cache.clear()
    cache[key] = ([weakref.ref(m) for m in owners], signature, model)
    return model


def _summed_gradients(
    forward_fn: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    target_ind: Any = None,
    additional_forward_args: Any = None,
) -> tuple[Tensor, ...]:
    """Captum's ``compute_gradients`` for one score per row, with the same result computed as
    the gradient of the scores' sum: ``autograd.grad(unbind(y), x) == autograd.grad(y.sum(), x)``
    (gradients of several outputs add up), without the per-row views and autograd roots of
    ``unbind``, which cost DeepLift about 4x its arithmetic on a batch of 256 on a CPU."""
    if target_ind is not None or additional_forward_args is not None:
        return compute_gradients(forward_fn, inputs, target_ind, additional_forward_args)
    with torch.autograd.set_grad_enabled(True):
        outputs = _run_forward(forward_fn, inputs)  # Captum's call convention (DeepLift's takes none)
        if outputs.dim() > 1 and outputs[0].numel() != 1:
            raise ValueError(f"expected one score per row, got outputs of shape {tuple(outputs.shape)}")
        return torch.autograd.grad(outputs.sum(), inputs)


def _attribute(
    score_fn: Callable[[Tensor], Tensor], x: Tensor, b: Tensor, method: str, kwargs: dict[str, Any]
) -> Tensor:
    """One Captum ``attribute`` call; ``(B, F)`` attributions."""
    num_features = x.shape[1]
    if method in ("deeplift", "integrated_gradients"):
        x = x.requires_grad_()  # our own copy; saves Captum's warning about setting it
    if method == "deeplift":
        if not isinstance(score_fn, nn.Module):
            raise TypeError("deeplift needs score_fn to be an nn.Module (Captum hooks its non-linear submodules)")
        deeplift = DeepLift(_deeplift_model(score_fn))
        deeplift.gradient_func = _summed_gradients  # Captum's hook for the gradient computation
        with torch.enable_grad():
            return deeplift.attribute(x, baselines=b, **kwargs)
    if method == "integrated_gradients":
        # chunks of ~1024 path points: 3x faster than one (B * n_steps)-row pass on a CPU
        # (never below the batch: Captum then warns and runs one path step per chunk)
        kwargs.setdefault("internal_batch_size", max(_IG_CHUNK, int(kwargs.get("n_steps", 50)), len(x)))
        if "integration_method" in kwargs:  # Captum's ``method``, renamed to free explain_gate's
            kwargs["method"] = kwargs.pop("integration_method")
        with torch.enable_grad():
            return IntegratedGradients(score_fn).attribute(x, baselines=b, **kwargs)
    kwargs.setdefault("perturbations_per_eval", kwargs.get("n_samples", 1) if method == "kernel_shap" else num_features)
    if method == "shapley_value_sampling":
        algo = ShapleyValueSampling(score_fn)
    elif method == "feature_ablation":
        algo = FeatureAblation(score_fn)
    else:
        algo = KernelShap(score_fn)
        algo.interpretable_model = LinearModel(train_fn=_wls_train)
    with torch.no_grad():
        return algo.attribute(x, baselines=b, **kwargs)


def explain_gate(
    score_fn: nn.Module | Callable[[Tensor], Tensor],
    features: Tensor,
    baseline: Tensor,
    method: str = DEFAULT_METHOD,
    **method_kwargs: Any,
) -> GateAttribution:
    """Attribute a gate's scalar output per image to its input features with Captum.

    Works under ``torch.no_grad()`` and ``torch.inference_mode()`` callers (gradients are
    enabled internally where the method needs them), leaves the gate's parameters, buffers and
    ``.grad`` untouched, and runs on the device of ``features`` (``score_fn`` must be there too)
    in the dtype of the score module's parameters (features of another dtype are cast to it).
    The gate should be in eval mode.

    Args:
        score_fn: module mapping features ``(B, F)`` to one score per image ``(B,)`` where
            higher means more compute, e.g. ``ExpectedTier(gate.logits_module())`` or
            ``StagedGate.continue_module(level)`` (DeepLift is complete on it only if its
            sigmoid is an ``nn.Sigmoid`` module; ``delta`` shows the gap otherwise). Any
            callable works for the methods other than ``deeplift``.
        features: ``(B, F)`` features of the images to explain.
        baseline: ``(F,)`` or ``(1, F)`` reference features (mean features of the calibration
            images whose oracle tier is TINY).
        method: one of ``METHODS``.
        **method_kwargs: passed to the Captum method's ``attribute`` (e.g. ``n_steps`` and
            ``internal_batch_size`` for integrated gradients, whose Captum ``method`` is
            passed as ``integration_method`` (e.g. ``"riemann_trapezoid"``), ``n_samples`` and
            ``perturbations_per_eval`` for the sampling methods), overriding the defaults.

    Returns:
        :class:`GateAttribution` with ``attributions (B, F)``, completeness ``delta (B,)``,
        ``output (B,)`` and ``baseline_output ()``, all detached.

    Raises:
        ValueError: for an unknown method, badly shaped or non-finite inputs, a score function
            that does not return ``(B,)``, or a score that is not finite (features so large that
            the gate overflows). An empty batch ``(0, F)`` gives empty results.
        TypeError: for non-tensor or non-floating-point inputs, or ``deeplift`` on a plain
            callable.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {METHODS}")
    for key in ("inputs", "baselines", "target"):
        if key in method_kwargs:
            raise ValueError(f"{key!r} is set by explain_gate and cannot be passed as a method keyword")
    kwargs = {**_DEFAULT_KWARGS[method], **method_kwargs}
    # under a caller's autocast the gate would run, and be explained, in bfloat16 / float16
    with torch.inference_mode(False), without_autocast(getattr(features, "device", None)):
        x, b = _as_batch(features, baseline)
        param = next(score_fn.parameters(), None) if isinstance(score_fn, nn.Module) else None
        if param is not None:
            if param.device != x.device:
                raise ValueError(
                    f"features are on {x.device} but the score function's parameters on {param.device}: "
                    "move one of them"
                )
            if param.dtype != x.dtype:  # explained in the gate's own precision
                x, b = x.to(param.dtype), b.to(param.dtype)
        output, baseline_output = _score(score_fn, x, b)
        _refuse_non_finite(output, x, "the score is")  # features finite but past what the gate can take
        if len(x) == 0:  # nothing to attribute
            empty = x.new_zeros(0)
            return GateAttribution(x.new_zeros(x.shape), empty, output, baseline_output, method)
        try:
            attributions = _attribute(score_fn, x, b, method, kwargs)
        except RuntimeError as err:  # KernelShap's least squares on overflowing samples
            if method != "kernel_shap" or bool(torch.isfinite(x * x).all()):  # not the features' scale
                raise
            raise ValueError(
                f"{method} failed on features too large for float arithmetic (up to {x.abs().max().item():.3g}; "
                f"{type(err).__name__} in Captum's least squares): features out of the range the gate can take"
            ) from err
        attributions = attributions.detach().to(dtype=x.dtype).reshape(x.shape)
        delta = (attributions.sum(dim=1) - (output - baseline_output)).abs()
        _refuse_non_finite(delta, x, f"{method}'s attributions are")  # finite features whose differences overflow
    return GateAttribution(
        attributions=attributions, delta=delta, output=output, baseline_output=baseline_output, method=method
    )
