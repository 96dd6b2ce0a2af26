"""Routing: complexity features, gates and routed inference (see ``eexit.routing.features``)."""

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

__all__ = [
    "EDGE_THRESHOLD",
    "FEATURE_NAMES",
    "NUM_FEATURES",
    "activation_sparsity",
    "attention_entropy",
    "complexity_features",
    "confidence_margin",
    "feature_variance",
    "gradient_magnitude",
    "saliency_sparsity",
    "spatial_complexity",
]
