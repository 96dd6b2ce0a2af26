"""Turn user files into model inputs: expand files / folders / globs, decode any image with PIL.

Every input becomes either a normalised tensor ``(C, S, S)`` or an ``ImageError`` whose message
names the reason (not an image, truncated, empty, unreadable, ...); one bad file never stops the
others. Conversions:

* EXIF orientation is applied (``ImageOps.exif_transpose``).
* 8-bit modes (``L``, ``RGB``, ``P``, ``1``, ``CMYK``, ``YCbCr``, ...) go through PIL's own
  conversions to ``L`` or ``RGB`` (as the training data modules do); alpha (``RGBA``, ``LA``,
  palette transparency) is composited over black first.
* 16-bit (``I;16*``) and 32-bit integer (``I``) images are scaled by 65535 (``I`` by 255 when
  no value exceeds 255), float (``F``) images by 1 (or 255 when a value exceeds 1); grayscale
  is repeated for an RGB model, RGB reduced to luma (ITU-R 601-2, PIL's ``L`` formula) for a
  grayscale one.
* Resize: the shorter side to the bundle's size (bilinear, antialiased), then a centre crop
  (torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on PIL images).
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

_GLOB_CHARS = "*?["
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


class ImageError(ValueError):
    """A file that cannot be used as an image; ``reason`` says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files, folders (every file below, recursively, sorted) and globs -> a list of paths.

    A path that does not exist and is not a glob, or a glob matching nothing, is kept as it is:
    loading it later yields an error for that input rather than silently dropping it.
    """
    out: list[str] = []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.is_file())
        elif not p.exists() and any(c in arg for c in _GLOB_CHARS):
            matches = sorted(m for m in glob.glob(arg, recursive=True) if not Path(m).is_dir())
            out += matches or [arg]
        else:
            out.append(arg)
    return out


def _read(path: str) -> bytes:
    if any(c in path for c in _GLOB_CHARS) and not os.path.exists(path):
        raise ImageError(path, "no file matches this pattern")
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise ImageError(path, "is a directory") from None
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except PermissionError:
        raise ImageError(path, "unreadable: permission denied") from None
    except OSError as err:
        raise ImageError(path, f"unreadable: {err.strerror or err}") from None
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    return data


def decode(path: str) -> Image.Image:
    """Read and fully decode one image file (EXIF orientation applied).

    Raises:
        ImageError: the file is missing, unreadable, empty, not an image or truncated.
    """
    data = _read(path)
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except UnidentifiedImageError:
        raise ImageError(path, f"not an image (no image format recognised in {len(data)} bytes)") from None
    except Image.DecompressionBombError as err:
        raise ImageError(path, f"image too large: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        text = str(err)
        reason = f"truncated or corrupt image: {text}" if text else f"corrupt image ({type(err).__name__})"
        raise ImageError(path, reason) from None
    if im.width == 0 or im.height == 0:
        raise ImageError(path, f"image has no pixels ({im.width}x{im.height})")
    # Pillow keeps EXIF in ``info`` (JPEG, PNG, WebP, ...) or in TIFF tags: skip the parse otherwise
    if im.format == "TIFF" or "exif" in im.info or "Raw profile type exif" in im.info:
        with contextlib.suppress(Exception):  # a broken EXIF block: keep the pixels as stored
            im = ImageOps.exif_transpose(im)
    return im


def _resize_box(w: int, h: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """torchvision's Resize(size) then CenterCrop(size): new (w, h) and the crop box."""
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    left, top = round((nw - size) / 2.0), round((nh - size) / 2.0)
    return (nw, nh), (left, top, left + size, top + size)


def _resize_8bit(im: Image.Image, size: int) -> Image.Image:
    if im.size == (size, size):
        return im
    new, box = _resize_box(im.width, im.height, size)
    return im.resize(new, Image.Resampling.BILINEAR).crop(box)


def _wide_to_array(im: Image.Image, size: int | None) -> np.ndarray:
    """16/32-bit integer or float image -> ``(S, S)`` float32 in [0, 1] (``size=None``: as it is)."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        full = 1.0 if not np.isfinite(a).all() or a.max(initial=0.0) <= 1.0 else 255.0
    elif im.mode == "I":
        full = 65535.0 if a.max(initial=0.0) > 255 else 255.0
    else:
        full = 65535.0
    a = np.clip(a / full, 0.0, 1.0).astype(np.float32)
    f = Image.fromarray(a)  # float32 -> mode "F"
    if size is not None and f.size != (size, size):
        new, box = _resize_box(f.width, f.height, size)
        f = f.resize(new, Image.Resampling.BILINEAR).crop(box)
    return np.array(f, dtype=np.float32)


def _to_8bit(im: Image.Image, channels: int) -> Image.Image:
    """An 8-bit-mode image -> ``L`` (1 channel) or ``RGB`` (3), alpha composited over black."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def to_model_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any decoded image -> an 8-bit ``L`` or ``RGB`` image, with the conversions of the module
    docstring (wide modes scaled, then rounded to 8 bits). The training data modules use it,
    so that a model is trained on the pixels it is served."""
    if channels not in (1, 3):
        raise ValueError(f"models with {channels} input channels are not supported (1 or 3)")
    if im.mode in _WIDE_MODES:
        gray = Image.fromarray(np.round(_wide_to_array(im, None) * 255.0).astype(np.uint8))
        return gray if channels == 1 else gray.convert("RGB")
    return _to_8bit(im, channels)


def to_array(im: Image.Image, channels: int, size: int) -> np.ndarray:
    """A decoded image -> ``(S, S, channels)`` float32 in [0, 1] (see the module docstring)."""
    if channels not in (1, 3):
        raise ValueError(f"models with {channels} input channels are not supported (1 or 3)")
    if im.mode in _WIDE_MODES:
        gray = _wide_to_array(im, size)[..., None]
        return np.repeat(gray, channels, axis=2) if channels == 3 else gray
    a = np.asarray(_resize_8bit(_to_8bit(im, channels), size), dtype=np.float32) / 255.0
    return a[..., None] if a.ndim == 2 else a


def load_array(path: str, channels: int, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """One file -> a normalised ``(channels, size, size)`` float32 array (``mean``/``std`` of
    shape ``(channels, 1, 1)``); the fast path of ``load_image`` for batches.

    Raises:
        ImageError: the file cannot be used; the reason is in the message.
    """
    im = decode(path)
    try:
        a = to_array(im, channels, size)
    except (OSError, ValueError) as err:
        raise ImageError(path, f"cannot convert mode {im.mode} to the model's {channels} channel(s): {err}") from None
    x = (a.transpose(2, 0, 1) - mean) / std
    if not np.isfinite(x).all():
        raise ImageError(path, "image has non-finite pixel values")
    return np.ascontiguousarray(x, dtype=np.float32)


def norm_arrays(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``mean``/``std`` as float32 ``(C, 1, 1)`` arrays for ``load_array``."""
    return np.asarray(mean, np.float32).reshape(-1, 1, 1), np.asarray(std, np.float32).reshape(-1, 1, 1)


def load_image(path: str, channels: int, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """One file -> a normalised ``(channels, size, size)`` float32 tensor.

    Raises:
        ImageError: the file cannot be used; the reason is in the message.
    """
    return torch.from_numpy(load_array(path, channels, size, *norm_arrays(mean, std)))
