"""Evaluation: accuracy/compute trade-off, routing, attention consistency, explanation
faithfulness, cluttered-scene localisation, plots and the HTML report.

``evaluate(cfg)`` (``eexit.evaluation.pipeline``) runs everything; the modules hold the pieces:
``routing_eval``, ``consistency``, ``faithfulness``, ``gate_quality``, ``localization``,
``cluttered``, ``plots``, ``report``.
"""

from eexit.evaluation.pipeline import evaluate

__all__ = ["evaluate"]
