"""Bundles: export from a real Lightning checkpoint, load with torch + safetensors, refuse tampering."""

from __future__ import annotations

import functools
import json
import pickle
import re
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eexit.bundle import MANIFEST_NAME, SEAL_KEY, WEIGHTS_NAME, BundleError, export_bundle, file_sha256, load_bundle
from eexit.checkpoint import load_checkpoint, read_checkpoint
from eexit.data.synthetic import make_shapes
from eexit.routing.calibrate import Calibration
from eexit.routing.decisions import decisions_from_output
from eexit.types import ExitLevel


@pytest.fixture
def bundle_copy(calibrated_run, tmp_path: Path) -> Path:
    """A private copy of the run's bundle, safe to tamper with."""
    return Path(shutil.copytree(calibrated_run["bundle"], tmp_path / "bundle"))


def test_train_exports_a_bundle_without_pickle(calibrated_run) -> None:
    bundle = Path(calibrated_run["bundle"])
    assert sorted(p.name for p in bundle.iterdir()) == [MANIFEST_NAME, WEIGHTS_NAME]
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert manifest["weights"]["sha256"] == file_sha256(bundle / WEIGHTS_NAME)
    info = calibrated_run["data"]
    assert manifest["class_names"] == info.class_names
    assert manifest["input"]["size"] == [info.image_size, info.image_size]
    assert manifest["input"]["mean"] == info.mean and manifest["input"]["std"] == info.std
    for kind, entry in manifest["routers"].items():
        assert [t["exit"] for t in entry["tiers"]] == [lv.key for lv in ExitLevel], kind
        assert 0 <= entry["config"]["knob"] <= 1.0 + 1e-6
    assert len(manifest["explanation"]["baseline_features"]) == 7
    assert {"torch", "safetensors", "eexit"} <= set(manifest["versions"])
    # the weights file is safetensors (a JSON header, no pickle opcodes)
    raw = (bundle / WEIGHTS_NAME).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert "net.heads.3.classifier.2.weight" in header and "router.gate.net.0.weight" in header
    assert b"\x80\x04\x95" not in raw[:16]


def test_loaded_bundle_equals_the_lightning_checkpoint(calibrated_run) -> None:
    ckpt = load_checkpoint(calibrated_run["ckpt"])
    cal = Calibration.from_state(ckpt.extra["calibration"])
    bundle = load_bundle(calibrated_run["bundle"])
    x, _, _ = make_shapes(96, num_classes=4, image_size=16, seed=5)
    with torch.no_grad():
        ref, got = ckpt.net(x).logits, bundle.net(x).logits
    for level in ExitLevel:
        assert (ref[level] - got[level]).abs().max().item() <= 1e-5, level.name
    names = bundle.class_names
    for kind in ("gate", "staged", "cascade"):
        for knob in (None, 0.3, 0.6, 0.9):  # the calibrated knob and a spread of tiers
            a, b = cal.routed(ckpt.net, kind), bundle.routed(kind, optimize=False)
            if knob is not None:
                a.router.set_knob(knob)
                b.router.set_knob(knob)
            out_a, out_b = a(x), b(x)
            assert torch.equal(out_a.tier, out_b.tier), (kind, knob)
            assert (out_a.logits - out_b.logits).abs().max().item() <= 1e-5
            rows_a = [d.to_dict() for d in decisions_from_output(out_a, cal.tier_costs[kind], names, kind)]
            rows_b = [
                d.to_dict() for d in decisions_from_output(out_b, bundle.calibration.tier_costs[kind], names, kind)
            ]
            assert rows_a == rows_b, (kind, knob)


def test_loading_initialises_nothing_at_random(calibrated_run) -> None:
    # the network and the routers are built on the meta device and take the file's tensors: no
    # random initialisation (time on large networks) and the caller's random stream is untouched
    torch.manual_seed(123)
    state = torch.get_rng_state()
    bundle = load_bundle(calibrated_run["bundle"])
    assert torch.equal(torch.get_rng_state(), state)
    modules = [bundle.net, *bundle.calibration.routers.values()]
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    assert tensors and not any(t.is_meta for t in tensors)
    assert all(p.requires_grad for p in bundle.net.parameters())
    assert {t.dtype for t in bundle.net.parameters()} == {torch.float32}


def test_export_command_writes_the_same_weights(calibrated_run, tmp_path: Path) -> None:
    from eexit.cli import main

    assert main(["export", calibrated_run["ckpt"], str(tmp_path / "b"), "--router", "staged"]) == 0
    bundle = load_bundle(tmp_path / "b")
    assert bundle.serve_router == "staged"
    with (
        safe_open(str(tmp_path / "b" / WEIGHTS_NAME), "pt") as f,
        safe_open(str(Path(calibrated_run["bundle"]) / WEIGHTS_NAME), "pt") as g,
    ):
        assert set(f.keys()) == set(g.keys())
        for key in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
            assert torch.equal(f.get_tensor(key), g.get_tensor(key)), key


def test_export_refuses_an_uncalibrated_checkpoint(calibrated_run, tmp_path: Path) -> None:
    ckpt = torch.load(calibrated_run["ckpt"], map_location="cpu", weights_only=False)
    del ckpt["eexit"]["calibration"]
    path = tmp_path / "raw.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(BundleError, match="no router calibration"):
        export_bundle(path, tmp_path / "b")


def test_one_changed_weight_byte_is_refused(bundle_copy: Path, capsys) -> None:
    from eexit.cli import main

    assert main(["info", str(bundle_copy)]) == 0  # info shows a bundle's manifest, verified
    out = capsys.readouterr()
    assert "'format': 'eexit-bundle'" in out.out and "bundle verified" in out.err
    weights = bundle_copy / WEIGHTS_NAME
    raw = bytearray(weights.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n + 100] ^= 0x01  # one bit of one tensor value
    weights.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"model\.safetensors was changed after export: its sha256 is [0-9a-f]{64}"):
        load_bundle(bundle_copy)
    assert main(["info", str(bundle_copy)]) == 2 and "changed after export" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("path", "value", "names"),
    [
        (("spec", "widths", 3), 32, r"spec\.widths\[3\]: bundle\.json has 32, the export had 16"),
        (("routers", "gate", "config", "knob"), 0.01, r"routers\.gate\.config\.knob: bundle\.json has 0\.01"),
        (("input", "mean", 0), 0.5, r"input\.mean\[0\]"),
    ],
)
def test_an_edited_manifest_is_refused_naming_what_differs(bundle_copy: Path, path, value, names: str) -> None:
    file = bundle_copy / MANIFEST_NAME
    manifest = json.loads(file.read_text())
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    file.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"bundle\.json was edited after export .*{names}"):
        load_bundle(bundle_copy)


def _reseal(bundle: Path, manifest: dict) -> None:
    """Write ``manifest`` and seal it into the weights, as an export would (a forger can)."""
    weights = bundle / WEIGHTS_NAME
    body = {k: v for k, v in manifest.items() if k != "weights"}
    save_file(
        load_file(str(weights)),
        str(weights),
        metadata={"format": "pt", SEAL_KEY: json.dumps(body, sort_keys=True, separators=(",", ":"))},
    )
    manifest["weights"]["sha256"] = file_sha256(weights)
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_a_resealed_spec_that_does_not_fit_the_weights_is_refused(bundle_copy: Path) -> None:
    """Someone edits the spec and re-seals the file: the tensor shapes still give it away."""
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    manifest["spec"]["widths"][3] = 32
    _reseal(bundle_copy, manifest)
    with pytest.raises(BundleError, match=r"does not match the weights .*shape mismatch net\.backbone\.stages\.3"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("feature_statistics"), r"section 'feature_statistics' is missing"),
        (lambda m: m["routers"].update(gate=[1]), r"routers\.gate must be an object with a 'config' object"),
        (lambda m: m["input"].update(size=16), r"input\.size must be \[height, width\] in pixels, got 16"),
        (lambda m: m["explanation"].pop("baseline_features"), r"explanation\.baseline_features must be 7 numbers"),
        (lambda m: m["class_names"].pop(), r"bundle\.json is inconsistent: spec\.num_classes is 4 but there are 3"),
        # values predict reads later: refused at load, by key, instead of failing image by image
        (lambda m: m["class_names"].__setitem__(0, 7), r"class_names must be strings"),
        (lambda m: m["input"].update(size=[16, 20]), r"input\.size must be square"),
        (lambda m: m["input"].update(std=[1e-300] * 3), r"input\.mean .* do not normalise pixels to finite float32"),
        (lambda m: m["input"].update(mean=[1e300] * 3), r"do not normalise pixels to finite float32"),
        (lambda m: m["input"].update(mean="a"), r"input\.mean and input\.std must be arrays of numbers"),
        (lambda m: m["routers"]["gate"]["tiers"][0].update(device="tpu"), r"routers\.gate\.tiers\[0\]\.device is no"),
        (lambda m: m["routers"]["gate"]["tiers"][1].update(mflops="ten"), r"tiers\[1\]\.mflops must be a number"),
        (lambda m: m["routers"]["cascade"]["tiers"][3].update(latency_ms=None), r"cascade\.tiers\[3\]\.latency_ms"),
        (lambda m: m["routers"]["gate"]["tiers"].pop(), r"routers\.gate\.tiers must be 4 objects"),
        (lambda m: m["feature_statistics"].update(feature_kwargs={"bogus": 1}), r"feature_kwargs must map some of"),
        (lambda m: m["feature_statistics"].update(feature_kwargs={"grid": 0}), r"feature_kwargs\.grid must be a"),
        (lambda m: m["feature_statistics"]["tier_profiles"].update(tiny=[1]), r"tier_profiles must map exits to"),
        (lambda m: m["explanation"].update(exit_baselines=[[0.0] * 7] * 2), r"exit_baselines must be null or 4 rows"),
    ],
)
def test_a_resealed_malformed_manifest_is_refused_with_a_message(bundle_copy: Path, edit, message: str) -> None:
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    edit(manifest)
    _reseal(bundle_copy, manifest)
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(bundle_copy)
    assert "lacks or mistypes" not in str(err.value)  # one message, not a wrapped one


def test_missing_or_foreign_bundles_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="bundle directory not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="is not valid JSON"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: [m], r"a JSON list, not an object"),
        (lambda m: {**m, "weights": None}, r"section 'weights' must be a JSON object"),
        (lambda m: {**m, "class_names": "abc"}, r"section 'class_names' must be a JSON array"),
        (
            lambda m: {**m, "weights": {**m["weights"], "file": "../outside.safetensors"}},
            r"weights.file must be a file name",
        ),
        (
            lambda m: {**m, "weights": {**m["weights"], "file": "/tmp/x.safetensors"}},
            r"weights.file must be a file name",
        ),
    ],
)
def test_a_malformed_manifest_is_refused_with_a_message(bundle_copy: Path, edit, message: str) -> None:
    file = bundle_copy / MANIFEST_NAME
    file.write_text(json.dumps(edit(json.loads(file.read_text()))))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("value", "message"), [("NaN", "NaN, which is not JSON"), ("1e999", "1e999, which is not finite")]
)
def test_a_manifest_with_a_non_finite_number_is_refused_naming_the_file(bundle_copy: Path, value, message) -> None:
    file = bundle_copy / MANIFEST_NAME
    file.write_text(file.read_text().replace('"knob": ', f'"knob": {value}, "was": ', 1))
    with pytest.raises(BundleError, match=rf"bundle\.json holds (the number )?{message}"):
        load_bundle(bundle_copy)


class _RunsCode:
    """What a crafted checkpoint can carry: unpickling it calls ``Path.touch`` on a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_unless_trusted(calibrated_run, tmp_path: Path, capsys) -> None:
    from eexit.cli import main

    marker = tmp_path / "code_ran"
    ckpt = torch.load(calibrated_run["ckpt"], map_location="cpu", weights_only=False)
    ckpt["eexit"]["payload"] = _RunsCode(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    with pytest.raises(
        ValueError, match=r"evil\.ckpt: refused to unpickle \w+, which an eexit checkpoint does not hold .*trust=True"
    ):
        load_checkpoint(evil)
    assert main(["info", str(evil)]) == 2 and "--trust-checkpoint" in capsys.readouterr().err
    assert main(["export", str(evil), str(tmp_path / "b")]) == 2
    assert not marker.exists()
    # the checkpoints training writes load without trust (optimizer settings, random states)
    assert "calibration" in load_checkpoint(calibrated_run["ckpt"]).extra
    load_checkpoint(evil, trust=True)  # the owner's explicit choice: the code runs
    assert marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"just some text\n",
            r"is not a checkpoint: a torch\.save file is a zip archive or a pickle, this one starts with b'just'",
        ),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), r"is not a checkpoint: .* starts with b'\\x89PNG'"),
        (b"", "is not a checkpoint: the file is empty"),
        (b"PK\x03\x04" + bytes(20), "is not a readable checkpoint: RuntimeError"),  # a broken zip archive
        (b"\x80\x02ctorch.optim.sgd\nSGD\n)R.", "is not a readable checkpoint: TypeError"),  # allowed class, bad call
        (pickle.dumps([1, 2, 3]), "is not a (readable )?checkpoint"),
    ],
    ids=["text", "png", "empty", "broken_zip", "allowed_class_bad_call", "plain_pickle"],
)
def test_a_file_that_is_no_checkpoint_gives_a_clear_error(tmp_path: Path, capsys, content: bytes, message: str) -> None:
    from eexit.cli import main

    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    for trust in (False, True):
        with pytest.raises(ValueError, match=rf"x\.ckpt {message}"):
            load_checkpoint(path, trust=trust)
    assert main(["info", str(path)]) == 2 and "x.ckpt" in capsys.readouterr().err
    torch.save([1, 2], path)  # a valid torch file that is no checkpoint
    with pytest.raises(ValueError, match=r"x\.ckpt is not a checkpoint \(it holds a list"):
        load_checkpoint(path)


def test_non_finite_or_integer_weights_are_refused_at_export_and_load(calibrated_run, bundle_copy, tmp_path) -> None:
    ckpt = torch.load(calibrated_run["ckpt"], map_location="cpu", weights_only=False)
    name = next(k for k in ckpt["state_dict"] if k.endswith("conv1.weight"))
    ckpt["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(BundleError, match=r"holds non-finite weights, not exported: net\..*conv1\.weight \(1 of"):
        export_bundle(tmp_path / "nan.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    # a forged bundle, re-sealed: NaN in a router's knob, then integer weights
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    weights = bundle_copy / WEIGHTS_NAME
    # copies: older safetensors map the file, which the forgeries below overwrite
    tensors = {k: v.clone() for k, v in load_file(str(weights)).items()}
    knob = next(k for k in tensors if k.startswith("router.") and k.endswith("knob"))
    for key, value in ((knob, torch.tensor(float("nan"))), (name, None)):
        forged = dict(tensors)
        forged[key] = value if value is not None else forged[f"net.{name.removeprefix('net.')}"].to(torch.int32)
        save_file(forged, str(weights))
        _reseal(bundle_copy, manifest)
        message = "non-finite weights" if value is not None else "wrong dtype"
        with pytest.raises(BundleError, match=message):
            load_bundle(bundle_copy)


def test_export_names_a_malformed_calibration_a_directory_and_a_forged_unreadable_weights_file(
    calibrated_run, bundle_copy: Path, tmp_path: Path
) -> None:
    ckpt = torch.load(calibrated_run["ckpt"], map_location="cpu", weights_only=False)
    ckpt["eexit"]["calibration"] = {"foo": 1}
    torch.save(ckpt, tmp_path / "badcal.ckpt")
    with pytest.raises(BundleError, match=r"badcal\.ckpt: its router calibration .* is malformed: missing 'routers'"):
        export_bundle(tmp_path / "badcal.ckpt", tmp_path / "out")
    with pytest.raises(ValueError, match=r"is a directory, not a checkpoint file \(a bundle"):
        export_bundle(bundle_copy, tmp_path / "out")
    # a truncated weights file whose recorded sha256 was forged to match
    weights = bundle_copy / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    manifest["weights"]["sha256"] = file_sha256(weights)
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"model\.safetensors is not a readable safetensors file"):
        load_bundle(bundle_copy)


def test_the_served_copy_follows_the_network_when_it_is_moved(calibrated_run) -> None:
    bundle = load_bundle(calibrated_run["bundle"])
    first = bundle.routed("gate")
    assert bundle.routed("gate") is first  # built once and kept
    bundle.net.to(torch.float64)  # moved after loading: a stale float32 copy would serve the old one
    served = bundle.routed("gate")
    assert served is not first
    assert next(served.net.parameters()).dtype == torch.float64
    x, _, _ = make_shapes(16, num_classes=4, image_size=16, seed=6)
    with torch.no_grad():
        out = served(x.double())
    assert torch.isfinite(out.logits).all() and len(out.tier) == 16


def test_checkpoints_hold_no_hydra_or_omegaconf_objects(calibrated_run) -> None:
    # Hydra >= 1.3.6 makes partials of a private class (_DeferredTarget), which a checkpoint
    # then pickled among its hyperparameters: other Hydra versions could not load the file
    import functools
    import zipfile

    from eexit.checkpoint import read_checkpoint

    with zipfile.ZipFile(calibrated_run["ckpt"]) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"hydra" not in pickled and b"omegaconf" not in pickled
    hparams = read_checkpoint(calibrated_run["ckpt"])["hyper_parameters"]
    assert type(hparams["optimizer"]) is functools.partial and hparams["optimizer"].func is torch.optim.AdamW


def test_a_checkpoint_missing_a_weight_is_refused_naming_it(calibrated_run, tmp_path: Path) -> None:
    # a non-strict load would leave that layer at its random initial weights, silently
    ckpt = torch.load(calibrated_run["ckpt"], map_location="cpu", weights_only=False)
    dropped = next(k for k in ckpt["state_dict"] if k.startswith("net.") and k.endswith("weight"))
    del ckpt["state_dict"][dropped]
    torch.save(ckpt, tmp_path / "partial.ckpt")
    with pytest.raises(
        ValueError, match=rf"partial\.ckpt: its spec and weights do not build a network: .*{dropped[4:]}"
    ):
        load_checkpoint(tmp_path / "partial.ckpt")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m["input"].update(channels=3, mean=m["input"]["mean"] * 3, std=m["input"]["std"] * 3),
            r"bundle\.json is inconsistent: spec\.in_chans is 1 but input\.channels is 3",
        ),
        (
            lambda m: m["spec"].update(in_chans=3),
            r"bundle\.json is inconsistent: spec\.in_chans is 3 but input\.channels is 1",
        ),
    ],
    ids=["input_channels", "spec_in_chans"],
)
def test_a_resealed_channel_count_the_network_does_not_take_is_refused_naming_both(
    bundle_copy: Path, edit, message: str
) -> None:
    """A bundle whose input channels disagree with its network's ``in_chans`` is refused at load,
    naming both values: with 3-channel inputs (mean and std to match) the 1-channel network would
    otherwise load, and every image would fail when served."""
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    assert manifest["spec"]["in_chans"] == manifest["input"]["channels"] == 1
    edit(manifest)
    _reseal(bundle_copy, manifest)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("data", "in_chans", 3), ("data", "image_size", 99), ("data", "mean", [0.25]), ("input", "std", [2.0])],
    ids=["in_chans", "image_size", "mean", "std"],
)
def test_a_resealed_data_section_that_disagrees_with_the_input_section_is_refused(
    bundle_copy: Path, section: str, key: str, value
) -> None:
    """evaluate checks a dataset against the ``data`` section and predict serves with ``input``:
    a bundle whose two sections disagree would be evaluated on other images than it serves."""
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    manifest[section][key] = value
    _reseal(bundle_copy, manifest)
    data, inp = manifest["data"], manifest["input"]
    expected = {
        "in_chans": f"data.in_chans is 3 but input.channels is {inp['channels']}",
        "image_size": f"data.image_size is [99, 99] but input.size is {inp['size']}",
        "mean": f"data.mean is [0.25] but input.mean is {inp['mean']}",
        "std": f"data.std is {data['std']} but input.std is [2.0]",
    }[key]
    with pytest.raises(BundleError, match=re.escape(expected)):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("name", ["LambdaLR", "MultiplicativeLR"])
def test_schedulers_that_call_a_given_function_are_refused_unless_trusted(tmp_path: Path, name: str) -> None:
    """Pins the schedulers left out of the safe globals: the ones that call a function given to
    them are refused by name (the other ``torch.optim`` classes load)."""
    path = tmp_path / "s.ckpt"
    torch.save({"scheduler": getattr(torch.optim.lr_scheduler, name)}, path)
    with pytest.raises(ValueError, match=rf"refused to unpickle torch\.optim\.lr_scheduler\.{name}\b"):
        read_checkpoint(path)
    assert read_checkpoint(path, trust=True)["scheduler"] is getattr(torch.optim.lr_scheduler, name)
    torch.save({"scheduler": functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2)}, path)
    assert read_checkpoint(path)["scheduler"].keywords == {"step_size": 2}


def test_export_asking_for_onnx_without_the_package_is_one_error_line(
    calibrated_run, tmp_path: Path, monkeypatch, capsys
) -> None:
    """``eexit export --onnx`` where the onnx package is missing: exit 2 and the install hint, no
    traceback, no half-written bundle (test_onnx.py, which has the same check, is skipped there)."""
    import sys

    from eexit.cli import main

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    out = tmp_path / "bundle"
    assert main(["export", calibrated_run["ckpt"], str(out), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert "ONNX export needs the onnx package" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="other-bundle"), r"is not an eexit bundle manifest \(format 'other-bundle'\)"),
        (lambda m: m.update(format_version=2), r"bundle format version 2; this eexit reads 1"),
    ],
    ids=["format", "format_version"],
)
def test_a_manifest_of_another_format_or_version_is_refused(bundle_copy: Path, edit, message: str) -> None:
    """The manifest's ``format`` and ``format_version`` are checked before anything else, even in a
    bundle re-sealed to match: a future or foreign layout is refused, naming the value."""
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    edit(manifest)
    _reseal(bundle_copy, manifest)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_a_weights_file_without_a_sealed_manifest_is_refused(bundle_copy: Path) -> None:
    """A weights file rewritten without the sealed copy of the manifest (its sha256 updated to
    match) is refused naming the metadata key, not compared against nothing."""
    weights = bundle_copy / WEIGHTS_NAME
    save_file({k: v.clone() for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    manifest["weights"]["sha256"] = file_sha256(weights)
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"model\.safetensors carries no sealed manifest \(key 'eexit\.manifest'"):
        load_bundle(bundle_copy)


def _swap_first_tiers(m: dict) -> None:
    tiers = m["routers"]["gate"]["tiers"]
    tiers[0], tiers[1] = tiers[1], tiers[0]


def _two_channel_statistics(m: dict) -> None:
    for section in ("data", "input"):
        m[section].update(mean=[0.0, 0.0], std=[1.0, 1.0])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: [m[s].update(std=[-1.0]) for s in ("data", "input")], r"input\.std must be positive, got \[-1\.0\]"),
        (lambda m: m["serve"].update(router="oracle"), r"serve\.router 'oracle' is not one of \['cascade', 'gate'"),
        (lambda m: m["data"].update(num_classes=5), r"data\.num_classes 5 != spec\.num_classes 4"),
        (_two_channel_statistics, r"input\.mean / input\.std have 2 / 2 values for 1 channels"),
        (
            lambda m: m["routers"]["gate"]["tiers"][1].update(mflops=-1.0),
            r"gate\.tiers\[1\]\.mflops must be a number >= 0",
        ),
        (
            lambda m: m["routers"]["staged"]["tiers"][2].update(batch_size=0),
            r"tiers\[2\]\.batch_size must be a positive",
        ),
        (
            lambda m: m["feature_statistics"]["tier_profiles"]["tiny"].update(attention_entropy=[0.0, 1.0, 2.0]),
            r"tier_profiles must map exits",
        ),
        (
            lambda m: m["feature_statistics"]["tier_profiles"]["tiny"].pop("attention_entropy"),
            r"tier_profiles must map exits",
        ),
        (
            lambda m: m["feature_statistics"]["tier_profiles"].update(
                huge=m["feature_statistics"]["tier_profiles"]["tiny"]
            ),
            r"tier_profiles must map exits",
        ),
        (_swap_first_tiers, r"routers\.gate\.tiers must list \['tiny', 'light', 'medium', 'heavy'\]"),
        (
            lambda m: [m["data"].pop("image_size"), m["input"].update(size=[0, 0])],
            r"input\.size must be \[height, width\] in pixels, got \[0, 0\]",
        ),
    ],
    ids=[
        "negative_std",
        "serve_router",
        "data_num_classes",
        "statistics_per_channel",
        "negative_mflops",
        "batch_size_0",
        "profile_of_3",
        "profile_missing_feature",
        "profile_of_unknown_exit",
        "tiers_out_of_order",
        "size_0",
    ],
)
def test_more_resealed_manifest_values_are_refused_by_key(bundle_copy: Path, edit, message: str) -> None:
    """Values a forger can re-seal that would load and then serve wrongly (or fail per image) are
    refused at load, each naming its key."""
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    edit(manifest)
    _reseal(bundle_copy, manifest)
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(bundle_copy)
    assert "lacks or mistypes" not in str(err.value)


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_weights_the_spec_does_not_build_or_lacks_are_named(bundle_copy: Path, change: str) -> None:
    """A re-sealed weights file with a ``net.*`` tensor the spec does not build, or without one it
    builds, is refused naming the tensor (not loaded non-strictly or failing with a KeyError)."""
    weights = bundle_copy / WEIGHTS_NAME
    tensors = {k: v.clone() for k, v in load_file(str(weights)).items()}
    name = next(k for k in tensors if k.startswith("net.") and k.endswith("conv1.weight"))
    if change == "extra":
        tensors["net.extra.weight"] = torch.zeros(3)
        message = r"not built by the spec: net\.extra\.weight"
    else:
        del tensors[name]
        message = r"missing from the file: " + re.escape(name)
    save_file(tensors, str(weights))
    _reseal(bundle_copy, json.loads((bundle_copy / MANIFEST_NAME).read_text()))
    with pytest.raises(BundleError, match=rf"does not match the weights in .*{message}"):
        load_bundle(bundle_copy)


def test_the_manifest_records_the_served_knob_and_the_weights_file(calibrated_run, tmp_path: Path) -> None:
    """``serve.knob`` is the served router's knob (staged here, not the gate's); ``weights``
    records the file's size and tensor count; ``source`` the checkpoint's name and ``created``
    the export time (UTC)."""
    from eexit.cli import main

    assert main(["export", calibrated_run["ckpt"], str(tmp_path / "b"), "--router", "staged"]) == 0
    manifest = json.loads((tmp_path / "b" / MANIFEST_NAME).read_text())
    routers = manifest["routers"]
    assert routers["staged"]["config"]["knob"] != routers["gate"]["config"]["knob"]
    assert manifest["serve"] == {"router": "staged", "knob": routers["staged"]["config"]["knob"]}
    weights = tmp_path / "b" / WEIGHTS_NAME
    assert manifest["weights"]["bytes"] == weights.stat().st_size
    assert manifest["weights"]["tensors"] == len(load_file(str(weights)))
    assert manifest["source"] == Path(calibrated_run["ckpt"]).name
    created = time.mktime(time.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(time.gmtime(0))
    assert abs(created - time.time()) < 3600


def test_export_refuses_a_checkpoint_without_a_data_section(calibrated_run, tmp_path: Path) -> None:
    """A checkpoint whose ``eexit.data`` (classes, input size, normalisation) is gone cannot be
    served: export refuses it, naming the checkpoint, and writes nothing."""
    ckpt = torch.load(calibrated_run["ckpt"], map_location="cpu", weights_only=False)
    del ckpt["eexit"]["data"]
    torch.save(ckpt, tmp_path / "nodata.ckpt")
    with pytest.raises(BundleError, match=r"nodata\.ckpt has no data section"):
        export_bundle(tmp_path / "nodata.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_edit_report_names_at_most_five_differences(bundle_copy: Path) -> None:
    """A manifest edited in many places is refused naming the first five differences only."""
    file = bundle_copy / MANIFEST_NAME
    manifest = json.loads(file.read_text())
    for i, name in enumerate(manifest["class_names"]):
        manifest["class_names"][i] = name + "!"
    manifest["spec"]["widths"] = [w + 1 for w in manifest["spec"]["widths"]]
    file.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="edited after export") as err:
        load_bundle(bundle_copy)
    assert str(err.value).count("bundle.json has") == 5


def test_a_bundle_serves_its_feature_settings_and_flops_ratios(bundle_copy: Path) -> None:
    """The loaded calibration takes the sealed ``feature_kwargs`` (the features' grid and
    thresholds) and each router's fit summary, which ``Bundle.flops_ratio`` reads per router."""
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    manifest["feature_statistics"]["feature_kwargs"] = {"grid": 2}
    for i, entry in enumerate(manifest["routers"].values()):  # distinct, so a wrong router shows
        entry["fit_summary"]["flops_ratio"] = 0.25 + 0.125 * i
    _reseal(bundle_copy, manifest)
    bundle = load_bundle(bundle_copy)
    assert bundle.calibration.feature_kwargs == {"grid": 2}
    ratios = {kind: entry["fit_summary"]["flops_ratio"] for kind, entry in manifest["routers"].items()}
    for kind, ratio in ratios.items():
        assert bundle.flops_ratio(kind) == pytest.approx(ratio)
    assert bundle.flops_ratio() == pytest.approx(ratios[manifest["serve"]["router"]])


def test_weights_stored_in_another_float_dtype_load_in_the_dtypes_the_spec_builds(bundle_copy: Path) -> None:
    """A re-sealed weights file holding float64 tensors loads into the float32 network the spec
    builds (the values converted), not into a network of mixed dtypes."""
    reference = load_bundle(bundle_copy)
    weights = bundle_copy / WEIGHTS_NAME
    tensors = {
        k: (v.double() if k.startswith("net.") and v.is_floating_point() else v.clone())
        for k, v in load_file(str(weights)).items()
    }
    save_file(tensors, str(weights))
    _reseal(bundle_copy, json.loads((bundle_copy / MANIFEST_NAME).read_text()))
    bundle = load_bundle(bundle_copy)
    assert {t.dtype for t in bundle.net.state_dict().values() if t.is_floating_point()} == {torch.float32}
    for (name, a), b in zip(reference.net.state_dict().items(), bundle.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
