"""Batched routed prediction over image files: one JSON-ready row per input, in input order.

Rows of images hold the path and the ``RoutingDecision`` (label, probability, tier, confidence,
latency_ms, mflops, features, attributions, and with a forced tier ``forced`` and the router's
own ``router_tier``), its floats rounded to ``ROW_DIGITS`` significant digits; rows of inputs
that could not be used hold the path and an ``error``. Where a core is free of torch's
threads, the next batch is decoded in a background thread while the model runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the explain folder is not guarded
    fcntl = None

from eexit.bundle import Bundle
from eexit.routing.decisions import attribute_output, decision_rows
from eexit.routing.engine import RoutedOutput
from eexit.serve.images import (
    NON_FINITE,
    STDIN,
    ImageError,
    ImageSource,
    InMemoryImage,
    load_pixels,
    normalise_batch,
    source_name,
)
from eexit.types import ExitLevel

log = logging.getLogger(__name__)

Loaded = list[tuple[str, np.ndarray | None, str | None]]

ROW_DIGITS = 9
"""Significant digits of the floats in predict's rows: 9 give back every float32 value exactly
(the model computes in float32; the float64 text of those values has 17)."""


def _load_chunk(sources: Sequence[ImageSource], bundle: Bundle) -> Loaded:
    """``(path, pixels, None)`` or ``(path, None, reason)`` per input (``load_pixels``; an
    in-memory image's name stands for its path)."""
    size = bundle.input_size[0]
    out: Loaded = []
    for source in sources:
        p = source_name(source)
        try:
            out.append((p, load_pixels(source, bundle.channels, size), None))
        except ImageError as err:
            out.append((p, None, err.reason))
        except Exception as err:  # never lose the other inputs' results
            out.append((p, None, f"cannot read: {type(err).__name__}: {err}"))
    return out


def _normalised(loaded: Loaded, bundle: Bundle) -> tuple[Loaded, Tensor | None]:
    """The chunk's usable images as one normalised batch ``(n, C, S, S)``; images with
    non-finite values become errors."""
    good = [a for _, a, _ in loaded if a is not None]
    if not good:
        return loaded, None
    x, usable = normalise_batch(good, bundle.mean, bundle.std)
    if usable.all():
        return loaded, x
    if not usable.any():
        return [(p, None, e or NON_FINITE) for p, _, e in loaded], None
    flags = iter(usable.tolist())
    loaded = [(p, a, e) if a is None or next(flags) else (p, None, NON_FINITE) for p, a, e in loaded]
    return loaded, x[usable]


def _safe_name(index: int, path: str) -> str:
    if path == STDIN:
        return f"{index:06d}_stdin"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:60] or "image"
    return f"{index:06d}_{stem}"


def _explain_one(
    bundle: Bundle, router: str, x: Tensor, heatmap: Tensor, row: dict, out_dir: Path, index: int, decided_at: int
) -> tuple[dict[str, str], dict[str, str]]:
    """Write the image's figures; returns ``{figure: file}`` and ``{figure: error}`` (each figure
    is written on its own: one that cannot be saved does not stop the others)."""
    from eexit.explain.figures import attribution_bars, cam_overlay, radar_chart, save

    base = out_dir / _safe_name(index, row["path"])
    title = f"{row['label']} ({row['probability']:.2f}) - exit {row['tier'].upper()}"
    if row.get("forced"):
        title += f" (forced; router: {(row.get('router_tier') or 'later').upper()})"
    figures: dict[str, Callable[[], Path]] = {
        "cam": lambda: save(cam_overlay(x, bundle.mean, bundle.std, heatmap, title), f"{base}_cam.png")
    }
    own = (row.get("router_tier") or f"past {row['tier']}").upper()  # the router's choice (forced or not)
    # the tiers' profiles are of TINY's features; the staged gate's features are those of the exit
    # where its rule fired, so they are drawn only when that is TINY; the cascade has no features
    if router == "gate" or (router == "staged" and decided_at == int(ExitLevel.TINY)):
        radar_title = f"features vs tiers' typical TINY profiles; routed {own}"
        profiles = bundle.calibration.tier_profiles
        figures["radar"] = lambda: save(radar_chart(row["features"], profiles, radar_title), f"{base}_radar.png")
    if router != "cascade" and row.get("attributions"):
        bars_title = f"why {own} ({router} router)"
        figures["attributions"] = lambda: save(attribution_bars(row["attributions"], bars_title), f"{base}_attr.png")
    files, errors = {}, {}
    for name, write in figures.items():
        try:
            files[name] = str(write())
        except (OSError, ValueError) as err:
            errors[name] = f"{type(err).__name__}: {err}"
    return files, errors


@torch.no_grad()
def _route(bundle: Bundle, router: str, x: Tensor, force_tier: int | None, with_heatmap: bool) -> RoutedOutput:
    # decoded on the CPU; the engine moves the batch to the network's device and dtype
    return bundle.routed(router)(x, force_tier=force_tier, with_heatmap=with_heatmap)


def serving_device(name: str) -> torch.device:
    """The device ``name`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``; ``cpu:0`` and ``mps:0`` read
    as ``cpu`` and ``mps``), refused with a message that names it where it is no device or this
    machine does not have it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device (expected cpu, cuda, cuda:N or mps)") from None
    if device.type in ("cpu", "mps"):  # one device each: cpu:0 / mps:0 name it too (safetensors takes no index)
        if device.index not in (None, 0):
            raise ValueError(f"--device {name!r}: there is one {device.type} device ({device.type} or {device.type}:0)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {name!r}: MPS is not available on this machine")
        return torch.device(device.type)
    if device.type != "cuda":
        raise ValueError(f"--device {name!r}: only cpu, cuda and mps are supported")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {name!r}: this machine has no CUDA device (torch {torch.__version__})")
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def decode_ahead(requested: bool | None = None, device: torch.device | None = None) -> bool:
    """Whether to decode the next batch in a background thread while the model runs.

    ``None`` (auto): when the network runs off the CPU (``device``), or where the machine has a
    core that torch's intra-op threads leave free. Without one, the decoder thread preempts
    torch's threads, which wait for each other at every op: on the 2-core CPU the model then ran
    2-2.5x slower inside ``predict`` than alone, and the whole run was slower than decoding in turn.
    """
    if requested is not None:
        return requested
    if device is not None and device.type != "cpu":
        return True
    return (os.cpu_count() or 1) > torch.get_num_threads()


def predict_rows(
    bundle: Bundle,
    paths: Sequence[ImageSource],
    router: str | None = None,
    batch_size: int = 256,
    force_tier: ExitLevel | int | None = None,
    explain_dir: str | Path | None = None,
    attributions: bool = True,
    on_batch: Callable[[int], None] | None = None,
    decode_in_background: bool | None = None,
    digits: int | None = ROW_DIGITS,
) -> Iterator[dict]:
    """Route every image of ``paths`` and yield one row per path, in order.

    Args:
        bundle: the loaded bundle.
        paths: image files (see ``eexit.serve.images.expand_inputs``; ``-`` reads standard
            input) or ``InMemoryImage``s (their ``name`` is the rows' ``path``).
        router: router kind (default: the bundle's served router).
        batch_size: images per routed batch.
        force_tier: send every image to this exit (the router still runs).
        explain_dir: also write each image's cam overlay, radar chart and attribution chart here.
        attributions: compute the features' Captum attributions of each decision.
        on_batch: progress: called with the number of inputs of each finished batch, or with 1
            for each finished input when figures are written (they take a while).
        decode_in_background: decode the next batch in a thread while the model runs (``None``:
            when the network is off the CPU or a core is free of torch's threads, see
            ``decode_ahead``).
        digits: significant digits of the rows' floats (``None``: full float64 text of the
            float32 results; see ``decision_rows``).

    Yields:
        ``{"path", **RoutingDecision}`` for images, ``{"path", "error"}`` for unusable inputs.
    """
    router = router or bundle.serve_router
    if router not in bundle.calibration.routers:
        raise ValueError(f"unknown router {router!r}; this bundle has {sorted(bundle.calibration.routers)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tier = None if force_tier is None else int(ExitLevel.parse(force_tier))
    out_dir = Path(explain_dir) if explain_dir is not None else None
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # checked before any image is routed: no result is lost
            # with exist_ok, FileExistsError means the path exists and is no folder
            why = "a file of that name exists" if isinstance(err, FileExistsError) else err.strerror
            raise ValueError(f"explain folder {out_dir} cannot be created: {why}") from None
    with _explain_folder_lock(out_dir):
        yield from _rows(
            bundle, paths, router, batch_size, tier, out_dir, attributions, on_batch, decode_in_background, digits
        )


def predict_images(
    bundle: Bundle,
    images: Sequence[bytes | Image.Image],
    names: Sequence[str] | None = None,
    **kwargs,
) -> list[dict]:
    """``predict_rows`` for images a program holds: encoded bytes (an upload, decoded as a file
    is) or PIL images. One row per image, in order; an unusable one gets an ``error`` row.

    Args:
        bundle: the loaded bundle.
        images: encoded images or PIL images.
        names: the rows' ``path`` for each image (default ``image-0``, ``image-1``, ...).
        **kwargs: ``predict_rows``'s (``router``, ``batch_size``, ``force_tier``, ...).
    """
    if names is not None and len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    labels = list(names) if names is not None else [f"image-{i}" for i in range(len(images))]
    return list(predict_rows(bundle, [InMemoryImage(n, im) for n, im in zip(labels, images, strict=True)], **kwargs))


EXPLAIN_LOCK = ".eexit-predict.lock"
"""The file in an ``--explain`` folder that a run holds locked (``fcntl.flock``) while it writes."""


@contextlib.contextmanager
def _explain_folder_lock(out_dir: Path | None) -> Iterator[None]:
    """Hold ``out_dir``'s lock while the rows are made: two runs writing figures into one folder
    would overwrite each other's (the files are named by position in the run and image name), and
    half the rows would point to another image's figures. The lock is the kernel's: it goes with
    the process, a killed run leaves none behind. Not on platforms without ``fcntl``."""
    handle = None
    if out_dir is not None and fcntl is not None:
        # a folder we cannot write into: each figure's own error says so
        with contextlib.suppress(OSError):
            handle = open(out_dir / EXPLAIN_LOCK, "a+b")  # noqa: SIM115 (held open for the run)
    if handle is None:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"explain folder {out_dir} is being written by another eexit predict run (or by an unfinished "
                "predict_rows of this process): give each run its own folder"
            ) from None
        except OSError as err:  # no locks on this file system (NFS without lockd, ...): run unguarded
            log.warning(
                "explain folder %s cannot be locked (%s): another run writing into it is not detected",
                out_dir,
                err.strerror,
            )
        yield


def _rows(
    bundle: Bundle,
    paths: Sequence[ImageSource],
    router: str,
    batch_size: int,
    tier: int | None,
    out_dir: Path | None,
    attributions: bool,
    on_batch: Callable[[int], None] | None,
    decode_in_background: bool | None,
    digits: int | None,
) -> Iterator[dict]:
    """``predict_rows`` once its arguments are checked (and the explain folder is held)."""
    costs = bundle.calibration.tier_costs[router]
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    index = 0
    per_image = on_batch is not None and out_dir is not None  # figures take a while: progress per image
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eexit-decode") as pool:
        ahead = decode_ahead(decode_in_background, next(bundle.net.parameters()).device)
        pending = pool.submit(_load_chunk, chunks[0], bundle) if chunks and ahead else None
        for c in range(len(chunks)):
            loaded = pending.result() if ahead else _load_chunk(chunks[c], bundle)
            if ahead and c + 1 < len(chunks):
                pending = pool.submit(_load_chunk, chunks[c + 1], bundle)
            loaded, x = _normalised(loaded, bundle)
            rows_good: list[dict] = []
            if x is not None:
                out = _route(bundle, router, x, tier, out_dir is not None)
                expl = attribute_output(bundle.calibration, router, out) if attributions else None
                rows_good = decision_rows(
                    out,
                    costs,
                    bundle.class_names,
                    router,
                    None if expl is None else expl.attributions,
                    None if expl is None else expl.delta,
                    digits=digits,
                )
            g = 0
            for path, tensor, error in loaded:
                if tensor is None:
                    yield {"path": path, "error": error}
                elif rows_good[g]["label"] is None:  # logits that overflowed: no answer to give
                    yield {"path": path, "error": "the network's outputs for this image are not finite"}
                    g += 1
                else:
                    row = {"path": path, **rows_good[g]}
                    if out_dir is not None:
                        files, errors = _explain_one(
                            bundle, router, x[g], out.heatmap[g], row, out_dir, index, int(out.decided_at[g])
                        )
                        row["explanation"] = files
                        if errors:
                            row["explanation_error"] = "; ".join(f"{k}: {v}" for k, v in errors.items())
                    g += 1
                    yield row
                index += 1
                if per_image:
                    on_batch(1)
            if on_batch is not None and not per_image:
                on_batch(len(loaded))
