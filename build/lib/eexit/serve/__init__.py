"""Serving a bundle: image inputs (``eexit.serve.images``) and batched routed prediction
(``eexit.serve.predict``). Nothing here imports Lightning, Hydra, W&B or torchmetrics."""
