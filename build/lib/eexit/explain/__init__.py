"""Explanations: hook-free Grad-CAM of every exit."""

from eexit.explain.gradcam import gradcam, normalize_per_image

__all__ = ["gradcam", "normalize_per_image"]
