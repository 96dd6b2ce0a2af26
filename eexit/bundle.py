"""Export a trained, calibrated model as a bundle and load it back with torch and safetensors only.

A bundle is a directory:

* ``model.safetensors``: the network's weights (``net.*``) and the routers' weights
  (``router.<kind>.*``); no pickle. Its metadata seals a copy of the manifest (below), so an
  edited ``bundle.json`` is detected.
* ``bundle.json``: the manifest: architecture spec, classes, input size and normalisation, the
  tier table of every router (exit, MFLOPs, latency), the served router and every router's knob,
  feature statistics, the explanation baselines, package versions and the weights' sha256.

Loading checks, in order: the weights file's sha256 against the manifest, the manifest against
the copy sealed in the weights file, the spec's consistency with the data section, and the
spec's parameter names and shapes against the tensors in the file. Any mismatch raises
``BundleError`` saying what differs. This module (and what it imports) uses neither Lightning
nor Hydra, W&B or torchmetrics: a bundle serves where only torch is installed.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import eexit
from eexit.checkpoint import first_line
from eexit.digest import file_sha256
from eexit.models.net import MultiExitNet
from eexit.models.registry import create_model
from eexit.routing.calibrate import Calibration
from eexit.routing.engine import RoutedClassifier
from eexit.routing.features import FEATURE_NAMES, complexity_features
from eexit.types import ExitLevel

log = logging.getLogger(__name__)

FORMAT = "eexit-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "bundle.json"
WEIGHTS_NAME = "model.safetensors"
SEAL_KEY = "eexit.manifest"
RESIZE_RULE = "shorter side to size (bilinear, antialiased), then centre crop to size x size"
SCALE_RULE = "pixel / full scale of the mode (255; 65535 for 16-bit), then (x - mean) / std per channel"
ALPHA_RULE = "transparent pixels are composited over black"


class BundleError(ValueError):
    """A bundle that cannot be served as it is; the message says which file and what differs."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _versions() -> dict[str, str]:
    out = {"eexit": eexit.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("safetensors", "torchvision", "pillow", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _differences(a: Any, b: Any, path: str = "", limit: int = 5) -> list[str]:
    """Paths (``spec.widths[1]``) where two JSON values differ, with both values; at most ``limit``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a:
                out.append(f"{sub}: missing from {MANIFEST_NAME} (export had {_short(b[key])})")
            elif key not in b:
                out.append(f"{sub}: added in {MANIFEST_NAME} ({_short(a[key])}), not in the export")
            else:
                out += _differences(a[key], b[key], sub, limit)
            if len(out) >= limit:
                break
        return out[:limit]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += _differences(x, y, f"{path}[{i}]", limit)
            if len(out) >= limit:
                break
        return out[:limit]
    if a != b:
        return [f"{path}: {MANIFEST_NAME} has {_short(a)}, the export had {_short(b)}"]
    return []


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def build_manifest(
    spec: dict, data: dict, calibration: Calibration, serve: str, source: str | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest (without its ``weights`` section) and the router tensors of a calibration.

    Args:
        spec: the network's spec (``MultiExitNet.spec``).
        data: the data section (``DataInfo.to_dict()``): classes, channels, size, mean, std.
        calibration: the fitted routers, tier costs and statistics.
        serve: the router used by default when serving.
        source: where the model came from (recorded only).
    """
    if serve not in calibration.routers:
        raise BundleError(f"router {serve!r} to serve is not calibrated; calibrated: {sorted(calibration.routers)}")
    state = calibration.to_state()
    router_tensors: dict[str, torch.Tensor] = {}
    routers = {}
    for kind, router in calibration.routers.items():
        for name, tensor in router.state_dict().items():
            router_tensors[f"router.{kind}.{name}"] = tensor.detach().cpu().contiguous()
        routers[kind] = {
            "config": state["routers"][kind]["config"],
            "tiers": state["tier_costs"][kind],
            "fit_summary": state["fit_summary"].get(kind, {}),
        }
    size = int(data["image_size"])
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "spec": spec,
        "data": data,
        "class_names": list(data.get("class_names") or [str(i) for i in range(int(data["num_classes"]))]),
        "input": {
            "channels": int(data["in_chans"]),
            "size": [size, size],
            "mean": list(data["mean"]),
            "std": list(data["std"]),
            "resize": RESIZE_RULE,
            "scale": SCALE_RULE,
            "alpha": ALPHA_RULE,
        },
        "serve": {"router": serve, "knob": state["routers"][serve]["config"]["knob"]},
        "routers": routers,
        "feature_statistics": {
            "names": state["feature_names"],
            "feature_kwargs": state["feature_kwargs"],
            "tier_profiles": state["tier_profiles"],
        },
        "explanation": {
            "method": "deeplift",
            "baseline_features": state["baseline_features"],
            "exit_baselines": state["exit_baselines"],
        },
        "versions": _versions(),
    }
    return manifest, router_tensors


def export_bundle(ckpt_path: str | Path, out_dir: str | Path, serve: str = "gate", trust: bool = False) -> Path:
    """Write the bundle of a calibrated checkpoint written by ``MultiExitModule``.

    Args:
        ckpt_path: the Lightning checkpoint (must hold ``eexit.calibration``).
        out_dir: the bundle directory (created; existing bundle files are replaced).
        serve: the router ``eexit predict`` uses by default.
        trust: unpickle everything the checkpoint holds (see ``eexit.checkpoint.read_checkpoint``).

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: no checkpoint at ``ckpt_path``.
        BundleError: the checkpoint holds no calibration or no data section.
    """
    from eexit.checkpoint import load_checkpoint  # reads the Lightning checkpoint (pickle): export only

    loaded = load_checkpoint(ckpt_path, trust=trust)
    if "calibration" not in loaded.extra:
        raise BundleError(
            f"{ckpt_path} holds no router calibration: train.py calibrates and exports the best checkpoint; for "
            "this one, `python evaluate.py ckpt_path=... export_bundle=DIR` calibrates it on the held-out split "
            "and writes its bundle"
        )
    if not loaded.data:
        raise BundleError(f"{ckpt_path} has no data section (classes, input size, normalisation)")
    try:
        calibration = Calibration.from_state(loaded.extra["calibration"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        reason = f"missing {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise BundleError(f"{ckpt_path}: its router calibration (eexit.calibration) is malformed: {reason}") from None
    return write_bundle(loaded.net, loaded.data, calibration, out_dir, serve, source=str(Path(ckpt_path).name))


def write_bundle(
    net: MultiExitNet,
    data: dict,
    calibration: Calibration,
    out_dir: str | Path,
    serve: str = "gate",
    source: str | None = None,
) -> Path:
    """Write a bundle from a network, its data section and its calibration (see ``export_bundle``)."""
    out = Path(out_dir)
    manifest, router_tensors = build_manifest(net.spec, data, calibration, serve, source)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update(router_tensors)
    bad = non_finite_tensors(tensors)
    if bad:
        raise BundleError(f"{source or 'the model'} holds non-finite weights, not exported: {_listing(bad)}")
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to write
    weights = out / WEIGHTS_NAME
    tmp = out / f".{WEIGHTS_NAME}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", SEAL_KEY: _canonical(manifest)})
    tmp.replace(weights)
    manifest["weights"] = {
        "file": WEIGHTS_NAME,
        "sha256": file_sha256(weights),
        "bytes": weights.stat().st_size,
        "tensors": len(tensors),
    }
    tmp = out / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    tmp.replace(out / MANIFEST_NAME)
    os.chmod(weights, (out / MANIFEST_NAME).stat().st_mode & 0o777)  # as readable as the manifest
    log.info("bundle written to %s (%d tensors, sha256 %s)", out, len(tensors), manifest["weights"]["sha256"][:12])
    return out


@dataclass
class Bundle:
    """A verified bundle, ready to serve.

    Attributes:
        net: the network in eval mode.
        calibration: routers (with knobs), tier costs and statistics.
        manifest: the parsed ``bundle.json``.
        path: the bundle directory.
    """

    net: MultiExitNet
    calibration: Calibration
    manifest: dict
    path: Path
    _served: dict[tuple[str, torch.device, torch.dtype], RoutedClassifier] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def serve_router(self) -> str:
        return str(self.manifest["serve"]["router"])

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.manifest["input"]["size"]
        return int(h), int(w)

    @property
    def channels(self) -> int:
        return int(self.manifest["input"]["channels"])

    @property
    def mean(self) -> list[float]:
        return [float(v) for v in self.manifest["input"]["mean"]]

    @property
    def std(self) -> list[float]:
        return [float(v) for v in self.manifest["input"]["std"]]

    def flops_ratio(self, router: str | None = None) -> float:
        """Mean FLOPs of the routed path over HEAVY's on the calibration split, at the knob."""
        return float(self.calibration.fit_summary[router or self.serve_router]["flops_ratio"])

    def routed(self, router: str | None = None, optimize: bool = True) -> RoutedClassifier:
        """The routed classifier of ``router`` (default: the bundle's served router).

        Args:
            router: ``gate``, ``staged`` or ``cascade``.
            optimize: serve an inference copy of the network (BatchNorm folded, channels-last;
                same decisions up to float rounding, see ``RoutedClassifier``), built once per
                router and device and dtype of ``self.net`` and kept (also when several threads
                ask at once): it does not follow later in-place changes of ``self.net``'s
                weights (load the bundle again); ``False``: the network exactly as loaded.
        """
        kind = router or self.serve_router
        if not optimize:
            return self.calibration.routed(self.net, kind, input_size=self.input_size)
        weight = next(self.net.parameters())
        key = (kind, weight.device, weight.dtype)  # a copy per place: bundle.net may have been moved since
        with _SERVED_LOCK:  # a server's threads asking at once built a copy each and kept one
            if key not in self._served:
                self._served[key] = self.calibration.routed(self.net, kind, optimize=True, input_size=self.input_size)
            return self._served[key]


_SERVED_LOCK = threading.Lock()


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST_NAME
    if not file.is_file():
        raise FileNotFoundError(f"not a bundle: {file} does not exist")

    def no_constants(name: str) -> None:  # NaN / Infinity are not JSON (Python's parser allows them)
        raise BundleError(f"{file} holds {name}, which is not JSON (exported bundles never do)")

    def finite(text: str) -> float:  # 1e999 parses to inf
        value = float(text)
        if not math.isfinite(value):
            raise BundleError(f"{file} holds the number {text}, which is not finite in float64")
        return value

    try:
        manifest = json.loads(file.read_text(), parse_constant=no_constants, parse_float=finite)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{file} is not an eexit bundle manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{file} is not an eexit bundle manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{file}: bundle format version {manifest.get('format_version')!r}; this eexit reads {FORMAT_VERSION}"
        )
    sections = ("spec", "data", "class_names", "input", "serve", "routers", "explanation", "feature_statistics")
    for key in (*sections, "weights"):
        if key not in manifest:
            raise BundleError(f"{file}: section {key!r} is missing")
        kind = list if key == "class_names" else dict
        if not isinstance(manifest[key], kind):
            raise BundleError(f"{file}: section {key!r} must be a JSON {'array' if kind is list else 'object'}")
    for kind, entry in manifest["routers"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
            raise BundleError(f"{file}: routers.{kind} must be an object with a 'config' object")
    size = manifest["input"].get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise BundleError(f"{file}: input.size must be [height, width] in pixels, got {size!r}")
    # the weights section is not sealed (it holds the hash): its file must be a plain name in the bundle
    name = manifest["weights"].get("file", WEIGHTS_NAME)
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise BundleError(f"{file}: weights.file must be a file name inside the bundle directory, got {name!r}")
    return manifest


def _calibration_state(manifest: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """``Calibration.from_state``'s input from the manifest and the ``router.*`` tensors."""
    routers_state = {}
    for kind, entry in manifest["routers"].items():
        prefix = f"router.{kind}."
        routers_state[kind] = {
            "config": entry["config"],
            "state": {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)},
        }
    return {
        "routers": routers_state,
        "tier_costs": {kind: entry["tiers"] for kind, entry in manifest["routers"].items()},
        "baseline_features": manifest["explanation"]["baseline_features"],
        "exit_baselines": manifest["explanation"]["exit_baselines"],
        "tier_profiles": manifest["feature_statistics"]["tier_profiles"],
        "fit_summary": {kind: entry.get("fit_summary", {}) for kind, entry in manifest["routers"].items()},
        "feature_kwargs": manifest["feature_statistics"].get("feature_kwargs", {}),
    }


def _check_consistency(manifest: dict, file: Path) -> None:
    spec, data, inp = manifest["spec"], manifest["data"], manifest["input"]
    problems = []
    if int(spec.get("num_classes", -1)) != len(manifest["class_names"]):
        problems.append(
            f"spec.num_classes is {spec.get('num_classes')} but there are {len(manifest['class_names'])} class names"
        )
    if int(spec.get("in_chans", -1)) != int(inp["channels"]):
        problems.append(f"spec.in_chans is {spec.get('in_chans')} but input.channels is {inp['channels']}")
    if not (len(inp["mean"]) == len(inp["std"]) == int(inp["channels"])):
        problems.append(
            f"input.mean / input.std have {len(inp['mean'])} / {len(inp['std'])} values for {inp['channels']} channels"
        )
    if any(float(s) <= 0 for s in inp["std"]):
        problems.append(f"input.std must be positive, got {inp['std']}")
    if manifest["serve"]["router"] not in manifest["routers"]:
        problems.append(f"serve.router {manifest['serve']['router']!r} is not one of {sorted(manifest['routers'])}")
    if int(data.get("num_classes", -1)) != int(spec.get("num_classes", -2)):
        problems.append(f"data.num_classes {data.get('num_classes')} != spec.num_classes {spec.get('num_classes')}")
    problems += _data_input_problems(data, inp)
    problems += _value_problems(manifest)
    if problems:
        raise BundleError(f"{file} is inconsistent: " + "; ".join(problems))


def _data_input_problems(data: dict, inp: dict) -> list[str]:
    """Where the ``data`` section (what evaluate checks a dataset against and normalises with)
    and the ``input`` section (what predict serves with) disagree; keys a section lacks are not
    compared."""
    pairs = [("in_chans", data.get("in_chans"), "channels", inp.get("channels"))]
    if data.get("image_size") is not None and isinstance(inp.get("size"), list):
        pairs.append(("image_size", [data["image_size"]] * 2, "size", inp["size"]))
    pairs += [(key, data.get(key), key, inp.get(key)) for key in ("mean", "std")]
    return [
        f"data.{d_key} is {d_value} but input.{i_key} is {i_value}"
        for d_key, d_value, i_key, i_value in pairs
        if d_value is not None and i_value is not None and d_value != i_value
    ]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value, n: int | None = None) -> bool:
    """A JSON array of finite numbers (of length ``n``, if given)."""
    return isinstance(value, list) and all(_is_number(v) for v in value) and (n is None or len(value) == n)


def _value_problems(manifest: dict) -> list[str]:
    """The sealed values predict reads, each checked for its type and range (named by key), so that
    a bundle that loads also serves: nothing here fails later, per image."""
    problems = []
    names = manifest["class_names"]
    if not all(isinstance(n, str) for n in names):
        problems.append("class_names must be strings")
    inp = manifest["input"]
    h, w = inp["size"]
    if h != w:
        problems.append(f"input.size must be square (images are resized and centre-cropped to it), got {[h, w]}")
    if not (_numbers(inp["mean"]) and _numbers(inp["std"])):
        problems.append(f"input.mean and input.std must be arrays of numbers, got {inp['mean']!r} / {inp['std']!r}")
    else:  # pixels in [0, 1] must normalise to finite float32 values
        mean = torch.tensor(inp["mean"], dtype=torch.float32)
        std = torch.tensor(inp["std"], dtype=torch.float32)
        ends = torch.stack([(0 - mean) / std, (1 - mean) / std])
        if not bool(torch.isfinite(ends).all()):
            problems.append(
                f"input.mean {inp['mean']} and input.std {inp['std']} do not normalise pixels to finite float32 values"
            )
    exits = [lv.key for lv in ExitLevel]
    for kind, entry in manifest["routers"].items():
        tiers = entry.get("tiers")
        if not (isinstance(tiers, list) and len(tiers) == len(exits) and all(isinstance(t, dict) for t in tiers)):
            problems.append(f"routers.{kind}.tiers must be {len(exits)} objects, one per exit")
            continue
        for i, t in enumerate(tiers):
            key = f"routers.{kind}.tiers[{i}]"
            for name in ("mflops", "latency_ms"):
                if not (_is_number(t.get(name)) and t[name] >= 0):
                    problems.append(f"{key}.{name} must be a number >= 0, got {t.get(name)!r}")
            if not (
                isinstance(t.get("batch_size"), int) and not isinstance(t["batch_size"], bool) and t["batch_size"] > 0
            ):
                problems.append(f"{key}.batch_size must be a positive integer, got {t.get('batch_size')!r}")
            try:
                torch.device(t.get("device"))
            except (RuntimeError, TypeError):
                problems.append(f"{key}.device is no torch device: {t.get('device')!r}")
    stats = manifest["feature_statistics"]
    kwargs = stats.get("feature_kwargs", {})
    known = {  # the features' numeric settings (grid, thresholds), from their signature
        p.name
        for p in inspect.signature(complexity_features).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and _is_number(p.default)
    }
    if not (isinstance(kwargs, dict) and set(kwargs) <= known and all(_is_number(v) for v in kwargs.values())):
        problems.append(
            f"feature_statistics.feature_kwargs must map some of {sorted(known)} to numbers, got {kwargs!r}"
        )
    elif "grid" in kwargs and not (isinstance(kwargs["grid"], int) and kwargs["grid"] > 0):
        problems.append(f"feature_statistics.feature_kwargs.grid must be a positive integer, got {kwargs['grid']!r}")
    profiles = stats.get("tier_profiles")
    if not (
        isinstance(profiles, dict)
        and set(profiles) <= set(exits)
        and all(
            isinstance(p, dict) and set(p) == set(FEATURE_NAMES) and all(_numbers(v, 2) for v in p.values())
            for p in profiles.values()
        )
    ):
        problems.append("feature_statistics.tier_profiles must map exits to {feature: [low, high]} for the 7 features")
    expl = manifest["explanation"]
    if not _numbers(expl.get("baseline_features"), len(FEATURE_NAMES)):
        problems.append(f"explanation.baseline_features must be {len(FEATURE_NAMES)} numbers")
    rows = expl.get("exit_baselines")
    if rows is not None and not (
        isinstance(rows, list) and len(rows) == len(exits) and all(_numbers(r, len(FEATURE_NAMES)) for r in rows)
    ):
        problems.append(f"explanation.exit_baselines must be null or {len(exits)} rows of {len(FEATURE_NAMES)} numbers")
    return problems


def _listing(names: list[str], limit: int = 5) -> str:
    return "; ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or +-inf (``"name (n of N values)"``)."""
    bad = []
    for name, t in tensors.items():
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"{name} ({n} of {t.numel()} values)")
    return bad


def _check_tensors(net: MultiExitNet, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Parameter names, shapes and dtypes the spec builds against the file's ``net.*`` tensors,
    and every tensor finite (a NaN weight gives NaN logits, which the fused serving kernels can
    even turn into confident wrong answers)."""
    bad = non_finite_tensors(tensors)
    if bad:
        raise BundleError(f"{file} holds non-finite weights: {_listing(bad)}")
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    dtypes = [
        f"{k}: {tensors[k].dtype} (a floating-point dtype expected)"
        for k, v in state.items()
        if v.is_floating_point() and k in tensors and not tensors[k].is_floating_point()
    ]
    if dtypes:
        raise BundleError(f"{file} holds weights of the wrong dtype: {_listing(dtypes)}")
    expected = {k: tuple(v.shape) for k, v in state.items()}
    found = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith("net.")}
    shapes = [
        f"{k}: spec builds {list(shape)}, file has {list(found[k])}"
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    parts = []
    if shapes:
        parts.append(f"shape mismatch {_listing(shapes)}")
    if missing:
        parts.append(f"missing from the file: {_listing(missing)}")
    if unexpected:
        parts.append(f"not built by the spec: {_listing(unexpected)}")
    if parts:
        raise BundleError(
            f"the spec in {file.parent / MANIFEST_NAME} does not match the weights in {file}: " + "; ".join(parts)
        )


@contextlib.contextmanager
def _safetensors_errors(weights: Path) -> Iterator[None]:
    """Turn safetensors' own error type (a file whose recorded hash was forged to match) into a
    ``BundleError`` naming the file."""
    try:
        yield
    except BundleError:
        raise
    except Exception as err:
        raise BundleError(
            f"{weights} is not a readable safetensors file: {first_line(str(err), type(err).__name__)}"
        ) from None


def load_bundle(path: str | Path, map_location: str | torch.device = "cpu") -> Bundle:
    """Load and verify a bundle.

    Raises:
        FileNotFoundError: the directory, its manifest or its weights file is missing.
        BundleError: the weights' hash, the sealed manifest, the spec or the tensors do not
            match; the message says what differs.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BundleError(
            f"{path} is a file, not a bundle: give the directory that holds {MANIFEST_NAME} and {WEIGHTS_NAME}"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"bundle directory not found: {path}")
    manifest = _read_manifest(path)
    weights = path / str(manifest["weights"].get("file", WEIGHTS_NAME))
    if not weights.is_file():
        raise FileNotFoundError(f"bundle weights not found: {weights}")
    recorded, actual = manifest["weights"].get("sha256"), file_sha256(weights)
    if actual != recorded:
        raise BundleError(
            f"{weights} was changed after export: its sha256 is {actual}, {MANIFEST_NAME} records {recorded}"
        )
    with _safetensors_errors(weights), safe_open(str(weights), framework="pt") as f:
        sealed = (f.metadata() or {}).get(SEAL_KEY)
    if sealed is None:
        raise BundleError(f"{weights} carries no sealed manifest (key {SEAL_KEY!r} in its metadata)")
    body = {k: v for k, v in manifest.items() if k != "weights"}
    if _canonical(body) != sealed:
        diffs = _differences(body, json.loads(sealed))
        raise BundleError(
            f"{path / MANIFEST_NAME} was edited after export (it differs from the copy sealed in {weights.name}): "
            + "; ".join(diffs or ["formatting of values"])
        )
    try:
        _check_consistency(manifest, path / MANIFEST_NAME)
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BundleError(f"{path / MANIFEST_NAME} lacks or mistypes a value: {type(err).__name__}: {err}") from None
    spec = dict(manifest["spec"])
    try:
        with torch.device("meta"):  # shapes only: every value comes from the file, none is initialised
            net = create_model(spec.pop("name"), **spec)
    except (TypeError, ValueError, KeyError) as err:
        raise BundleError(f"the spec in {path / MANIFEST_NAME} builds no network: {err}") from None
    with _safetensors_errors(weights):
        tensors = load_file(str(weights), device=str(map_location))
    _check_tensors(net, tensors, weights)
    # assign: the file's tensors become the network's (in the dtypes the spec builds)
    dtypes = {k: v.dtype for k, v in net.state_dict().items()}
    net.load_state_dict({k: tensors[f"net.{k}"].to(dtype) for k, dtype in dtypes.items()}, assign=True)
    net.to(map_location).eval()

    try:
        calibration = Calibration.from_state(_calibration_state(manifest, tensors))
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise BundleError(f"the routers in {path} cannot be rebuilt: {type(err).__name__}: {err}") from None
    for router in calibration.routers.values():
        router.to(map_location)
    calibration.baseline_features = calibration.baseline_features.to(map_location)
    if calibration.exit_baselines is not None:
        calibration.exit_baselines = calibration.exit_baselines.to(map_location)
    for kind, costs in calibration.tier_costs.items():
        if [c.exit for c in costs] != [lv.key for lv in ExitLevel]:
            raise BundleError(f"{path / MANIFEST_NAME}: routers.{kind}.tiers must list {[lv.key for lv in ExitLevel]}")
    return Bundle(net, calibration, manifest, path)
