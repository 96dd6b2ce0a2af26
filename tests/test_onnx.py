"""ONNX pieces of the one-shot routed path give the same decisions as torch (the ``onnx`` extra)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import torch
from torch import Tensor, nn

from eexit.bundle import load_bundle
from eexit.data.synthetic import make_shapes
from eexit.digest import file_sha256
from eexit.serve.onnx import PIECES, OnnxRoutedRunner, export_onnx, export_piece


@pytest.mark.parametrize("knob", [None, 0.5, 0.9])
def test_onnx_decisions_equal_torch_decisions(calibrated_run, tmp_path: Path, knob: float | None) -> None:
    bundle = load_bundle(calibrated_run["bundle"])
    runner = OnnxRoutedRunner(export_onnx(calibrated_run["bundle"], tmp_path / "onnx", knob=knob))
    routed = bundle.routed("gate")
    if knob is not None:
        routed.router.set_knob(knob)
    x, _, _ = make_shapes(200, num_classes=4, image_size=16, seed=7)
    ref = routed(x)
    got = runner(x.numpy())
    assert np.array_equal(got["tier"], ref.tier.numpy())
    if knob == 0.9:  # the later pieces run too
        assert (got["tier"] > 0).any()
    assert np.array_equal(got["logits"].argmax(1), ref.logits.argmax(1).numpy())
    assert np.abs(got["logits"] - ref.logits.numpy()).max() <= 1e-4
    assert np.abs(got["confidence"] - ref.confidence.numpy()).max() <= 1e-4
    assert np.abs(got["features"] - ref.features.numpy()).max() <= 1e-4


def test_runner_names_missing_pieces(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"first\.onnx.*routing\.json"):
        OnnxRoutedRunner(tmp_path)


def test_runner_refuses_a_batch_of_the_wrong_shape(calibrated_run, tmp_path: Path) -> None:
    runner = OnnxRoutedRunner(export_onnx(calibrated_run["bundle"], tmp_path / "onnx"))
    c, (h, w) = runner.meta["input"]["channels"], runner.meta["input"]["size"]
    for bad in (np.zeros((2, c, h + 1, w), np.float32), np.zeros((c, h, w), np.float32)):
        with pytest.raises(ValueError, match=rf"expected a normalised batch of shape \(B, {c}, {h}, {w}\)"):
            runner(bad)
    empty = runner(np.zeros((0, c, h, w), np.float32))
    assert empty["logits"].shape == (0, len(runner.meta["class_names"])) and empty["tier"].shape == (0,)


def test_runner_treats_bad_pixels_as_the_torch_engine_does(calibrated_run, tmp_path: Path) -> None:
    bundle = load_bundle(calibrated_run["bundle"])
    runner = OnnxRoutedRunner(export_onnx(calibrated_run["bundle"], tmp_path / "onnx"))
    x, _, _ = make_shapes(8, num_classes=4, image_size=16, seed=3)
    x[2] = float("nan")
    x[5, :, 0, 0] = float("inf")
    ref = bundle.routed("gate")(x)
    got = runner(x.numpy())
    assert np.array_equal(got["tier"], ref.tier.numpy()) and got["tier"][[2, 5]].tolist() == [3, 3]
    assert np.array_equal(np.isnan(got["logits"]), ref.logits.isnan().numpy())
    assert np.isnan(got["logits"][[2, 5]]).all() and not np.isnan(np.delete(got["logits"], [2, 5], 0)).any()
    assert np.abs(got["confidence"] - ref.confidence.numpy()).max() <= 1e-4
    assert np.abs(got["features"] - ref.features.numpy()).max() <= 1e-4
    with pytest.raises(TypeError, match="expected normalised floating-point images, got uint8"):
        runner((x.nan_to_num(0).clamp(0, 1).numpy() * 255).astype(np.uint8))


def test_export_command_writes_onnx_pieces(calibrated_run, tmp_path: Path) -> None:
    from eexit.cli import main

    assert main(["export", calibrated_run["ckpt"], str(tmp_path / "b"), "--onnx"]) == 0
    runner = OnnxRoutedRunner(tmp_path / "b" / "onnx")
    x, _, _ = make_shapes(8, num_classes=4, image_size=16, seed=1)
    assert torch.equal(torch.from_numpy(runner(x.numpy())["tier"]), load_bundle(tmp_path / "b").routed()(x).tier)


def test_runner_refuses_pieces_that_do_not_belong_together(calibrated_run, tmp_path: Path) -> None:
    d = export_onnx(calibrated_run["bundle"], tmp_path / "onnx")
    other = export_onnx(calibrated_run["bundle"], tmp_path / "other", knob=1.0)  # every image to HEAVY
    shutil.copy(other / "gate.onnx", d / "gate.onnx")
    with pytest.raises(ValueError, match=r"gate\.onnx differ from the pieces routing\.json was written with"):
        OnnxRoutedRunner(d)
    # without the hashes (an older export, or an edited routing.json), the shapes must still chain
    meta = json.loads((d / "routing.json").read_text())
    del meta["pieces_sha256"]
    (d / "routing.json").write_text(json.dumps(meta))
    OnnxRoutedRunner(d)  # another knob: same shapes
    shutil.copy(d.parent / "other" / "stage1.onnx", d / "stage2.onnx")
    with pytest.raises(ValueError, match=r"stage2\.onnx takes maps \[.*\], stage1\.onnx gives"):
        OnnxRoutedRunner(d)
    shutil.copy(other / "stage2.onnx", d / "stage2.onnx")
    meta["class_names"] = meta["class_names"][:3]
    (d / "routing.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"first\.onnx gives \[4\] logits, routing\.json names 3 classes"):
        OnnxRoutedRunner(d)


class _Gate5(nn.Module):
    """A gate piece that takes 5 features (first.onnx gives 7)."""

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        return (f.sum(1) * 0).long(), f.mean(1)


class _Stage3Classes(nn.Module):
    """A stage piece that passes the map through and gives 3 logits."""

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return h, h.flatten(1)[:, :3]


def _replace_piece(
    d: Path, name: str, module: nn.Module, example: Tensor, inputs: list[str], outputs: list[str]
) -> None:
    """Write ``module`` as piece ``name`` and re-record the pieces' hashes in routing.json, as a
    forger who rewrites both can."""
    export_piece(module, d / f"{name}.onnx", example, inputs, outputs)
    meta = json.loads((d / "routing.json").read_text())
    meta["pieces_sha256"] = {p: file_sha256(d / f"{p}.onnx") for p in PIECES}
    (d / "routing.json").write_text(json.dumps(meta))


def test_runner_refuses_pieces_whose_shapes_disagree_with_routing_json(calibrated_run, tmp_path: Path) -> None:
    """Each shape check of the runner names its piece: an input size routing.json does not match,
    a gate taking another feature count than first.onnx gives, a later stage giving another
    number of classes (with the pieces' hashes re-recorded, so only the shapes give it away)."""
    d = export_onnx(calibrated_run["bundle"], tmp_path / "onnx")
    meta = json.loads((d / "routing.json").read_text())
    c, (h, w) = meta["input"]["channels"], meta["input"]["size"]
    edited = {**meta, "input": {**meta["input"], "size": [h + 1, w + 1]}}
    (d / "routing.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=rf"first\.onnx takes images \[{c}, {h}, {w}\], routing\.json says"):
        OnnxRoutedRunner(d)
    (d / "routing.json").write_text(json.dumps(meta))
    import onnxruntime

    map_in = onnxruntime.InferenceSession(str(d / "stage3.onnx")).get_inputs()[0].shape[1:]
    _replace_piece(d, "stage3", _Stage3Classes(), torch.zeros(2, *map_in), ["map_in"], ["map", "logits"])
    with pytest.raises(ValueError, match=r"stage3\.onnx gives \[3\] logits, routing\.json names 4 classes"):
        OnnxRoutedRunner(d)
    _replace_piece(d, "gate", _Gate5(), torch.zeros(2, 5), ["features"], ["tier", "confidence"])
    with pytest.raises(ValueError, match=r"gate\.onnx takes features \[5\], first\.onnx gives \[7\]"):
        OnnxRoutedRunner(d)


@pytest.mark.parametrize("knob", [None, 0.5])
def test_routing_json_records_the_knob_tiers_and_bundle_it_was_exported_from(
    calibrated_run, tmp_path: Path, knob: float | None
) -> None:
    """routing.json holds the knob baked into gate.onnx (the bundle's gate knob unless another is
    given), the gate's tier table, the bundle's weights hash, and every piece has a dynamic batch
    axis on its inputs and outputs."""
    bundle = load_bundle(calibrated_run["bundle"])
    d = export_onnx(calibrated_run["bundle"], tmp_path / "onnx", knob=knob)
    meta = json.loads((d / "routing.json").read_text())
    gate = bundle.manifest["routers"]["gate"]
    assert meta["router"] == "gate"
    assert meta["knob"] == pytest.approx(gate["config"]["knob"] if knob is None else knob)
    assert meta["tiers"] == gate["tiers"]
    assert meta["bundle_sha256"] == bundle.manifest["weights"]["sha256"]
    assert meta["class_names"] == bundle.class_names and meta["input"] == bundle.manifest["input"]
    runner = OnnxRoutedRunner(d)
    for piece, session in runner.sessions.items():
        for arg in (*session.get_inputs(), *session.get_outputs()):
            assert arg.shape[0] == "batch", (piece, arg.name, arg.shape)
