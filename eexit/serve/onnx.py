"""ONNX export of the one-shot routed pieces and an onnxruntime runner (the ``onnx`` extra).

Pieces, each with a dynamic batch axis:

* ``first.onnx``: image ``(B, C, H, W)`` -> stem + S1 map ``h1``, TINY logits, TINY features ``(B, 7)``
* ``gate.onnx``: TINY features -> tier ``(B,)`` (int64) and the gate's confidence, knob baked in
* ``stage1.onnx`` ... ``stage3.onnx``: previous map -> next map and that exit's logits

``OnnxRoutedRunner`` runs them as ``RoutedClassifier`` does with the one-shot gate: S1 for every
image, then each further stage only for the images whose tier needs it. It needs numpy and
onnxruntime only. Exporting needs torch and onnx.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eexit.digest import file_sha256
from eexit.types import ExitLevel

if TYPE_CHECKING:  # torch is imported by the exporting functions only: the runner needs none
    from torch import Tensor, nn

PIECES = ("first", "gate", "stage1", "stage2", "stage3")
META_NAME = "routing.json"


def require_onnx() -> None:
    """Raise ``ImportError`` with the install hint when the ``onnx`` package (which
    ``torch.onnx.export`` needs) is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install '.[onnx]' (the onnx extra)") from None


def export_piece(
    module: nn.Module, path: Path, example: Tensor, inputs: list[str], outputs: list[str], opset: int = 17
) -> None:
    """Write ``module`` (one input) to ``path`` as an ONNX piece whose named inputs and outputs
    all have a dynamic batch axis, traced on ``example`` ``(B, ...)``."""
    import torch

    axes = {n: {0: "batch"} for n in inputs + outputs}
    with warnings.catch_warnings():  # shape checks traced as constants: the input size is fixed
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )


def export_onnx(
    bundle_dir: str | Path, out_dir: str | Path | None = None, opset: int = 17, knob: float | None = None
) -> Path:
    """Export the bundle's network and its one-shot gate as ONNX pieces.

    Args:
        bundle_dir: a bundle (``eexit export``); loaded and verified first.
        out_dir: where to write (default: ``<bundle>/onnx``).
        opset: ONNX opset version.
        knob: the gate's knob to bake in (default: the bundle's calibrated knob).

    Returns:
        The directory holding the ``.onnx`` files and ``routing.json`` (classes, input, knob).
    """
    import torch
    from torch import nn

    require_onnx()

    from eexit.bundle import load_bundle
    from eexit.routing.engine import exit_features

    bundle = load_bundle(bundle_dir)
    net, cal = bundle.net, bundle.calibration
    gate = cal.routers["gate"]
    if knob is not None:
        gate.set_knob(knob)
    out = Path(out_dir) if out_dir is not None else Path(bundle_dir) / "onnx"
    out.mkdir(parents=True, exist_ok=True)

    class First(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            h = self.net.backbone.forward_stage(0, self.net.backbone.forward_stem(x))
            parts = self.net.heads[0].forward_parts(h)
            f, _ = exit_features(x, h, parts, self.net.heads[0], **cal.feature_kwargs)
            return h, parts.logits, f

    class Stage(nn.Module):
        def __init__(self, k: int) -> None:
            super().__init__()
            self.net, self.k = net, k

        def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
            h = self.net.backbone.forward_stage(self.k, h)
            return h, self.net.heads[self.k](h)

    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = gate

        def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
            return self.gate.choose_tier(f)

    size = bundle.input_size
    x = torch.zeros(2, bundle.channels, *size)
    with torch.no_grad():
        h1, _, f = First()(x)
        maps = [h1]
        for k in range(1, len(ExitLevel)):
            maps.append(Stage(k)(maps[-1])[0])

    export_piece(First(), out / "first.onnx", x, ["image"], ["map", "logits", "features"], opset)
    export_piece(Gate(), out / "gate.onnx", f, ["features"], ["tier", "confidence"], opset)
    for k in range(1, len(ExitLevel)):
        export_piece(Stage(k), out / f"stage{k}.onnx", maps[k - 1], ["map_in"], ["map", "logits"], opset)
    meta = {
        "class_names": bundle.class_names,
        "input": bundle.manifest["input"],
        "router": "gate",
        "knob": float(gate.knob),
        "tiers": bundle.manifest["routers"]["gate"]["tiers"],
        "bundle_sha256": bundle.manifest["weights"]["sha256"],
        # what the runner checks each piece against: pieces of two exports are not mixed
        "pieces_sha256": {p: file_sha256(out / f"{p}.onnx") for p in PIECES},
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return out


class OnnxRoutedRunner:
    """Routed inference with onnxruntime on the pieces written by ``export_onnx``.

    Args:
        onnx_dir: the directory of the pieces.
        providers: onnxruntime execution providers (default: CPU).

    Raises:
        FileNotFoundError: a piece or ``routing.json`` is missing.
        ValueError: a piece differs from the one ``routing.json`` was written with (its sha256),
            or the pieces' shapes do not chain or disagree with ``routing.json``'s input and
            classes; the message names the piece.
    """

    def __init__(self, onnx_dir: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        d = Path(onnx_dir)
        missing = [f"{p}.onnx" for p in PIECES if not (d / f"{p}.onnx").is_file()]
        missing += [] if (d / META_NAME).is_file() else [META_NAME]
        if missing:
            raise FileNotFoundError(f"{d} lacks ONNX pieces: {', '.join(missing)} (write them with export_onnx)")
        self.meta = json.loads((d / META_NAME).read_text())
        stored = self.meta.get("pieces_sha256")  # absent in exports before 2026-12-07: shapes checked only
        if stored is not None:
            changed = [f"{p}.onnx" for p in PIECES if file_sha256(d / f"{p}.onnx") != stored.get(p)]
            if changed:
                raise ValueError(
                    f"{d}: {', '.join(changed)} differ from the pieces {META_NAME} was written with (replaced or "
                    "edited after the export): export the bundle again"
                )
        opts = ort.SessionOptions()
        self.sessions = {
            p: ort.InferenceSession(str(d / f"{p}.onnx"), opts, providers=providers or ["CPUExecutionProvider"])
            for p in PIECES
        }
        self._check_shapes(d)

    def _check_shapes(self, d: Path) -> None:
        """Refuse pieces whose shapes do not chain (image -> first -> stage1 -> ... , features ->
        gate) or disagree with ``routing.json``'s input and classes, naming the piece."""

        def shape(arg) -> list:  # the static dimensions after the batch axis (None where symbolic)
            return [dim if isinstance(dim, int) else None for dim in arg.shape[1:]]

        def io(piece: str) -> tuple[dict, dict]:
            sess = self.sessions[piece]
            return {a.name: shape(a) for a in sess.get_inputs()}, {a.name: shape(a) for a in sess.get_outputs()}

        spec, k = self.meta["input"], len(self.meta["class_names"])
        problems = []
        ins, outs = io("first")
        if ins.get("image") != [spec["channels"], *spec["size"]]:
            problems.append(f"first.onnx takes images {ins.get('image')}, {META_NAME} says {spec}")
        if outs.get("logits") != [k]:
            problems.append(f"first.onnx gives {outs.get('logits')} logits, {META_NAME} names {k} classes")
        gate_in, _ = io("gate")
        if gate_in.get("features") != outs.get("features"):
            problems.append(
                f"gate.onnx takes features {gate_in.get('features')}, first.onnx gives {outs.get('features')}"
            )
        prev, prev_name = outs.get("map"), "first.onnx"
        for i in range(1, len(ExitLevel)):
            ins, outs = io(f"stage{i}")
            if ins.get("map_in") != prev:
                problems.append(f"stage{i}.onnx takes maps {ins.get('map_in')}, {prev_name} gives {prev}")
            if outs.get("logits") != [k]:
                problems.append(f"stage{i}.onnx gives {outs.get('logits')} logits, {META_NAME} names {k} classes")
            prev, prev_name = outs.get("map"), f"stage{i}.onnx"
        if problems:
            raise ValueError(f"{d}: the ONNX pieces do not fit together: {'; '.join(problems)}")

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Route a normalised batch ``(B, C, H, W)`` float32.

        Returns:
            ``logits (B, K)`` of the deciding exit, ``tier (B,)``, ``confidence (B,)`` and the
            TINY ``features (B, 7)``. An image with a NaN or infinite pixel is not run, as in
            the torch engine: NaN logits, tier HEAVY, confidence and features 0.

        Raises:
            TypeError: for integer (not normalised) pixels.
            ValueError: for a batch of another shape than the bundle's input.
        """
        if not np.issubdtype(np.asarray(x).dtype, np.floating):
            raise TypeError(
                f"expected normalised floating-point images, got {np.asarray(x).dtype} (convert to float and "
                "normalise with the bundle's mean and std first)"
            )
        x = np.ascontiguousarray(x, dtype=np.float32)
        spec = self.meta["input"]
        want = (spec["channels"], *spec["size"])
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"expected a normalised batch of shape (B, {', '.join(map(str, want))}) as the bundle's input "
                f"says, got {tuple(x.shape)}"
            )
        finite = np.isfinite(x).all(axis=(1, 2, 3))
        if len(x) == 0 or not finite.all():  # outputs of images that are not run (none for B = 0)
            k = len(self.meta["class_names"])
            out = {
                "logits": np.full((len(x), k), np.nan, np.float32),
                "tier": np.full(len(x), len(ExitLevel) - 1, np.int64),
                "confidence": np.zeros(len(x), np.float32),
                "features": np.zeros((len(x), 7), np.float32),  # the 7 complexity features (no torch import here)
            }
            if finite.any():
                for key, value in self(x[finite]).items():
                    out[key][finite] = value
            return out
        h, logits0, feats = self.sessions["first"].run(None, {"image": x})
        tier, confidence = self.sessions["gate"].run(None, {"features": feats})
        logits = np.zeros_like(logits0)
        logits[tier == 0] = logits0[tier == 0]
        active = np.flatnonzero(tier > 0)
        h = h[active]
        for k in range(1, len(ExitLevel)):
            if len(active) == 0:
                break
            h, lg = self.sessions[f"stage{k}"].run(None, {"map_in": np.ascontiguousarray(h)})
            stop = tier[active] == k
            logits[active[stop]] = lg[stop]
            active, h = active[~stop], h[~stop]
        return {"logits": logits, "tier": tier, "confidence": confidence, "features": feats}
