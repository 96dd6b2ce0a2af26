"""Turn user files into model inputs: expand files / folders / globs, decode any image with PIL.

Every input becomes either a normalised tensor ``(C, S, S)`` or an ``ImageError`` whose message
names the reason (not an image, truncated, empty, unreadable, ...); one bad file never stops the
others. Conversions:

* EXIF orientation is applied (``ImageOps.exif_transpose``).
* 8-bit modes (``L``, ``RGB``, ``P``, ``1``, ``CMYK``, ``YCbCr``, ...) go through PIL's own
  conversions to ``L`` or ``RGB`` (as the training data modules do); alpha (``RGBA``, ``LA``,
  and a transparent colour, PNG's ``tRNS`` or GIF's, in a palette, grey (8 or 16-bit), RGB or
  bilevel image) is composited over black first, so a picture gets the same pixels however it is
  encoded.
* 16-bit (``I;16*``) and 32-bit integer (``I``) images are scaled by 65535 (``I`` by 255 when
  no value exceeds 255), float (``F``) images by 1 (or 255 when a value exceeds 1); grayscale
  is repeated for an RGB model, RGB reduced to luma (ITU-R 601-2, PIL's ``L`` formula) for a
  grayscale one.
* Resize: the shorter side to the bundle's size (bilinear, antialiased), then a centre crop
  (torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on PIL images).

Fast path: an 8-bit grayscale or RGB PNG already at the served size, without EXIF and with
sound chunks, that needs no conversion but a grey-to-RGB repeat is decoded by torchvision's
libpng decoder instead of PIL, in less than half the time (lossless, so the same pixels; a test
compares the two on many variants); anything else, or anything that decoder refuses, goes
through PIL. Pixels stay 8-bit until ``normalise_batch`` scales and normalises a whole batch at
once.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import logging
import os
import stat
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

_GLOB_CHARS = "*?["
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA", "AVIF", "JPEG2000", "QOI")
"""The Pillow formats decoded (raster photo and image formats). Others are refused unread:
Pillow would hand EPS / PostScript to Ghostscript, and scientific or game formats are not
images a classifier is served."""
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_TRANSPARENT_COLOUR_MODES = ("P", "L", "RGB", "1")
NON_FINITE = "image has non-finite pixel values"

log = logging.getLogger(__name__)


class ImageError(ValueError):
    """A file that cannot be used as an image; ``reason`` says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class InMemoryImage:
    """An image a program holds instead of a file (an upload in a web service, a frame): its
    encoded bytes, decoded as a file's are, or a PIL image, taken from the decoding on (EXIF
    orientation, conversions, resize). ``name`` stands for its path in rows and messages.

    Raises:
        TypeError: ``data`` is neither bytes nor a PIL image.
    """

    name: str
    data: bytes | bytearray | memoryview | Image.Image

    def __post_init__(self) -> None:
        if not isinstance(self.data, bytes | bytearray | memoryview | Image.Image):
            raise TypeError(
                f"{self.name}: an in-memory image is encoded bytes or a PIL image, got {type(self.data).__name__}"
                + (" (Image.fromarray makes one from an array)" if hasattr(self.data, "__array__") else "")
            )


ImageSource = str | InMemoryImage
"""What ``load_pixels`` and ``predict_rows`` take: a file path (``-``: standard input) or an
``InMemoryImage``."""


def source_name(source: ImageSource) -> str:
    """The path of a file, the name of an in-memory image."""
    return source if isinstance(source, str) else source.name


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files, folders (every file below, recursively, sorted; hidden files and folders skipped)
    and globs -> a list of paths.

    A path that does not exist and is not a glob, a glob matching nothing, or a folder without
    files is kept as it is: loading it later yields an error for that input rather than silently
    dropping it. ``-`` (``STDIN``) stands for one image read from standard input.
    """
    out: list[str] = []
    for arg in inputs:
        # os.path's tests answer False on any OSError (a name too long, a folder that cannot be
        # searched), Path's raise some: such a path gets its own error line when it is loaded
        if arg == STDIN:  # even where a file or folder named '-' exists ('./-' names that)
            out.append(arg)
        elif os.path.isdir(arg):
            # str(Path): the spelling rglob gave (no "./", no trailing "/"); an empty folder is
            # kept, so that it gets its error line instead of vanishing from the output
            out += sorted(_files_below(str(Path(arg)))) or [arg]
        elif not os.path.lexists(arg) and any(c in arg for c in _GLOB_CHARS):
            # a matched folder expands as a folder argument does (a quoted 'photos/*' gives what
            # the shell's photos/* gives); matched folders holding no file give nothing
            matches = []
            for m in sorted(glob.glob(arg, recursive=True)):
                matches += sorted(_files_below(m)) if os.path.isdir(m) else [m]
            out += matches or [arg]
        else:
            out.append(arg)
    return out


def hidden_entry(name: str) -> bool:
    """A file or folder name that holds no image to read: hidden (``.DS_Store``, ``.git``,
    ``.ipynb_checkpoints``, macOS's ``._photo.jpg``) or a macOS archive's ``__MACOSX`` folder.
    Folder arguments of predict and the class folders of training skip such entries alike."""
    return name.startswith(".") or name == "__MACOSX"


def _files_below(folder: str, top: bool = True) -> Iterator[str]:
    """Every file below ``folder``, recursively: symlinks to files included, symlinked folders not
    entered (as ``Path.rglob``), hidden entries (``hidden_entry``: ``.DS_Store``, ``.git/``,
    ``__MACOSX/``) skipped. A broken symlink, a FIFO or device and an unreadable
    subfolder are listed themselves, so that each gets its error line instead of silently taking its images
    out of the run. ``os.scandir`` without a ``Path`` per entry: a tenth of ``rglob``'s time on
    large folders."""
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not hidden_entry(e.name)]
    except OSError:
        if not top:
            yield folder
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _files_below(entry.path, top=False)
            elif not _links_to_folder(entry):
                yield entry.path  # a FIFO, socket or device too: its line says it is no file
        except OSError:  # vanished while listed: nothing left to report
            continue


def _links_to_folder(entry: os.DirEntry) -> bool:
    """Whether a symlink leads to a folder (not entered, as ``Path.rglob``); a broken link or a
    link loop does not, so it is listed and its error line says what it is."""
    try:
        return entry.is_symlink() and entry.is_dir()
    except OSError:  # a link loop
        return False


MAX_FILE_BYTES = 1 << 30
"""Largest input file read (1 GiB): far above any image the pixel limit lets through."""


STDIN = "-"
"""The input name that reads one image from standard input (``cat a.png | eexit predict ... -``)."""


def _read_stdin() -> bytes:
    stream = sys.stdin
    try:
        terminal = stream is not None and stream.isatty()
    except ValueError:  # a closed stream
        stream = None
    if stream is None:
        raise ImageError(STDIN, "standard input is closed: pipe an image in (cat a.png | ... -)")
    if terminal:
        raise ImageError(STDIN, "standard input is a terminal, not an image: pipe one in (cat a.png | ... -)")
    data = getattr(stream, "buffer", stream).read(MAX_FILE_BYTES + 1)
    if not isinstance(data, bytes):
        raise ImageError(STDIN, "standard input is a text stream, not bytes")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(STDIN, f"standard input too large (over {MAX_FILE_BYTES >> 20} MiB)")
    if not data:
        raise ImageError(STDIN, "standard input is empty (or an earlier '-' input read it)")
    return data


def _read(path: str) -> bytes:
    if path == STDIN:
        return _read_stdin()
    try:
        with open(path, "rb", opener=_open_regular) as f:
            data = _read_bounded(f, path)
    except IsADirectoryError:
        if not os.access(path, os.R_OK | os.X_OK):
            raise ImageError(path, "unreadable folder: permission denied") from None
        empty = next(_files_below(path), None) is None
        raise ImageError(path, "a folder with no (visible) files" if empty else "is a directory") from None
    except FileNotFoundError:
        if os.path.islink(path):
            reason = f"broken symbolic link (its target {os.readlink(path)!r} does not exist)"
        elif any(c in path for c in _GLOB_CHARS):
            reason = "no such file, and no file matches it as a pattern"
        else:
            reason = "no such file"
        raise ImageError(path, reason) from None
    except PermissionError:
        raise ImageError(path, "unreadable: permission denied") from None
    except OSError as err:
        raise ImageError(path, f"unreadable: {err.strerror or err}") from None
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    return data


def _read_bounded(f: io.BufferedReader, path: str) -> bytes:
    """The whole file, refused over ``MAX_FILE_BYTES``.

    Reads the size ``fstat`` gives plus one byte (which tells whether the file grew since), not
    ``read(MAX_FILE_BYTES + 1)``: that allocates the whole bound for every file, and the 1 GiB
    allocation cost 3x the read itself on a 28x28 PNG (45 vs 13 us).
    """
    expected = os.fstat(f.fileno()).st_size
    if expected <= MAX_FILE_BYTES:
        data = f.read(expected + 1)
        if len(data) > expected:  # it grew since: read on, up to the bound
            data += f.read(MAX_FILE_BYTES + 1 - len(data))
        if len(data) <= MAX_FILE_BYTES:
            return data
    raise ImageError(path, f"file too large (over {MAX_FILE_BYTES >> 20} MiB)")


def _open_regular(path: str, flags: int) -> int:
    """``os.open`` that refuses, before reading, what is not a regular file: a FIFO would block the
    whole run until a writer appears, a device such as ``/dev/zero`` never ends. ``O_NONBLOCK``
    keeps the open of a FIFO itself from blocking; it is cleared again for the read."""
    fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "Is a directory", path)
        if not stat.S_ISREG(mode):
            kind = "FIFO" if stat.S_ISFIFO(mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "socket"
            raise ImageError(path, f"not a regular file (a {kind})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def decode(path: str) -> Image.Image:
    """Read and fully decode one image file (EXIF orientation applied).

    Raises:
        ImageError: the file is missing, unreadable, empty, not an image or truncated.
    """
    return _decode_bytes(path, _read(path))


@functools.cache
def _available_formats() -> tuple[str, ...]:
    """``IMAGE_FORMATS`` that this Pillow can open (AVIF, say, needs a recent one)."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


@functools.cache
def image_extensions() -> tuple[str, ...]:
    """The file endings (lower case, with the dot) Pillow gives the formats decoded here
    (``IMAGE_FORMATS`` this Pillow can open): ``.jpg``, ``.jfif``, ``.png``, ``.tif``, ``.avif``..."""
    formats = set(_available_formats())
    return tuple(sorted(ext for ext, fmt in Image.EXTENSION.items() if fmt in formats))


def _note_if_huge(path: str, im: Image.Image) -> None:
    """Log a warning naming the file when an opened image is past Pillow's decompression-bomb
    warning limit (Pillow's own ``DecompressionBombWarning`` does not say which file; twice the
    limit is an error, ``image too large``)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.width * im.height > limit:
        log.warning(
            "%s: %d x %d pixels (%.0f megapixels) is past Pillow's decompression-bomb warning limit of %.0f "
            "megapixels; decoding it takes %.1f GB or more",
            path,
            im.width,
            im.height,
            im.width * im.height / 1e6,
            limit / 1e6,
            im.width * im.height * len(im.getbands()) / 1e9,
        )


def _decode_bytes(path: str, data: bytes) -> Image.Image:
    """``decode`` of the file's bytes (``path`` names it in errors)."""
    try:
        im = Image.open(io.BytesIO(data), formats=_available_formats())
    except UnidentifiedImageError:
        raise ImageError(
            path, f"not an image in a supported format ({', '.join(_available_formats())}) in {len(data)} bytes"
        ) from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise _unusable(path, err) from None
    return _load_checked(path, im, data)


def _unusable(path: str, err: Exception) -> ImageError:
    """The ``ImageError`` for what Pillow raised opening or decoding an image."""
    if isinstance(err, Image.DecompressionBombError):
        return ImageError(path, f"image too large: {err}")
    text = str(err)
    return ImageError(path, f"truncated or corrupt image: {text}" if text else f"corrupt image ({type(err).__name__})")


def _load_checked(path: str, im: Image.Image, data: bytes | None) -> Image.Image:
    """An opened image's pixels decoded with the checks every input gets: Pillow's errors named,
    a PNG's missing rows (PIL zero-fills them; checked on the file's ``data`` when known), no
    empty image, EXIF orientation applied."""
    try:
        _note_if_huge(path, im)
        im.load()
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise _unusable(path, err) from None
    if data is not None and im.format == "PNG" and im.width and im.height:
        short = _png_rows_missing(data)
        if short:
            raise ImageError(path, f"truncated or corrupt image: {short}")
    return _oriented(path, im)


def _oriented(path: str, im: Image.Image) -> Image.Image:
    """A loaded image with pixels, EXIF orientation applied."""
    if im.width == 0 or im.height == 0:
        raise ImageError(path, f"image has no pixels ({im.width}x{im.height})")
    # Pillow keeps EXIF in ``info`` (JPEG, PNG, WebP, ...) or in TIFF tags: skip the parse otherwise
    if im.format == "TIFF" or "exif" in im.info or "Raw profile type exif" in im.info:
        with contextlib.suppress(Exception):  # a broken EXIF block: keep the pixels as stored
            im = ImageOps.exif_transpose(im)
    return im


def _loaded_pil(path: str, im: Image.Image) -> Image.Image:
    """A PIL image a caller holds (perhaps not loaded yet: PIL reads lazily), with the checks
    and the orientation of a decoded file."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.width * im.height > 2 * limit:  # as Pillow refuses such a file's bytes
        raise ImageError(path, f"image too large: {im.width * im.height} pixels, over twice Pillow's limit of {limit}")
    # a PNG not decoded yet: its bytes, for the missing-rows check that files get
    return _load_checked(path, im, _unread_png_bytes(im))


def _unread_png_bytes(im: Image.Image) -> bytes | None:
    """The whole file of a lazily opened PNG whose pixels PIL has not read yet, or ``None``."""
    fp = getattr(im, "fp", None)
    if im.format != "PNG" or fp is None or not getattr(im, "tile", None):  # tile: what load() has still to read
        return None
    try:
        pos = fp.tell()
        fp.seek(0)
        data = fp.read(MAX_FILE_BYTES + 1)
        fp.seek(pos)
    except (OSError, ValueError, AttributeError):  # closed, unseekable: decoded as it comes
        return None
    return data if isinstance(data, bytes) and data.startswith(_PNG_SIGNATURE) else None


def _resize_box(w: int, h: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """torchvision's Resize(size) then CenterCrop(size): new (w, h) and the crop box."""
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    left, top = round((nw - size) / 2.0), round((nh - size) / 2.0)
    return (nw, nh), (left, top, left + size, top + size)


MAX_INTERMEDIATE = 64
"""Resize-then-crop makes an intermediate image of at most this many times ``size**2`` pixels;
beyond it (aspect ratios over 64:1) only the crop's source region is resampled."""


def _resize_crop(im: Image.Image, size: int) -> Image.Image:
    """torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on a PIL image (bilinear).

    The full intermediate of an extreme aspect ratio would be huge (a 1 x 2,000,000 PNG of 8 KB
    became a 28 x 56,000,000 image, 4 GB): past ``MAX_INTERMEDIATE`` PIL resamples only the
    source box of the crop, with the same filter scale (equal up to rounding).
    """
    if im.size == (size, size):
        return im
    new, box = _resize_box(im.width, im.height, size)
    if new[0] * new[1] <= MAX_INTERMEDIATE * size * size:
        return im.resize(new, Image.Resampling.BILINEAR).crop(box)
    sx, sy = im.width / new[0], im.height / new[1]
    source = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return im.resize((size, size), Image.Resampling.BILINEAR, box=source)


def _wide_to_array(im: Image.Image, size: int | None) -> np.ndarray:
    """16/32-bit integer or float image -> ``(S, S)`` float32 in [0, 1] (``size=None``: as it is)."""
    # one float32 copy, scaled in place: a large 16-bit or float image is not multiplied in float64
    # copies (float32 holds 16-bit values exactly; 32-bit integers above 2^24 clip to 1 anyway)
    a = np.array(im, dtype=np.float32)
    finite = np.isfinite(a)
    all_finite = bool(finite.all())
    peak = a.max(initial=0.0) if all_finite else a[finite].max(initial=0.0)
    if im.mode == "F":
        full = 1.0 if peak <= 1.0 else 255.0
    elif im.mode == "I":
        full = 65535.0 if peak > 255 else 255.0
    else:
        full = 65535.0
    bad = None if all_finite else a[~finite]
    transparent = im.info.get("transparency")
    if isinstance(transparent, int) and im.mode != "F":
        # a 16-bit grey PNG's transparent colour (tRNS) is composited over black, as in 8-bit images
        a[a == np.float32(transparent)] = 0.0
    np.divide(a, np.float32(full), out=a)
    np.clip(a, 0.0, 1.0, out=a)
    if bad is not None:  # NaN and +-inf stay as they were (clipping turns inf white): refused later
        a[~finite] = bad
    f = Image.fromarray(a)  # float32 -> mode "F"
    if size is not None:
        f = _resize_crop(f, size)
    return np.array(f, dtype=np.float32)


def _to_8bit(im: Image.Image, channels: int) -> Image.Image:
    """An 8-bit-mode image -> ``L`` (1 channel) or ``RGB`` (3), alpha composited over black."""
    if im.mode in _TRANSPARENT_COLOUR_MODES and im.info.get("transparency") is not None:
        # a transparent colour (PNG tRNS, GIF): PIL gives its pixels alpha 0; a palette image,
        # the grey one a PNG optimiser makes of it and the RGB one must all give the same pixels
        im = im.convert("RGBA")
    elif im.mode == "P":
        im = im.convert("RGB")
    if im.mode in ("La", "RGBa"):  # premultiplied alpha: the colour bands are the image over black
        bands = im.split()[:-1]
        im = Image.merge("L" if len(bands) == 1 else "RGB", bands)
    if im.mode in _ALPHA_MODES:
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")  # a same-mode convert is a copy
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    if im.mode == target:
        return im
    try:
        return im.convert(target)
    except ValueError:  # no direct conversion (LAB to L): through RGB, as an RGB model sees it
        return im.convert("RGB").convert(target)


def to_model_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any decoded image -> an 8-bit ``L`` or ``RGB`` image, with the conversions of the module
    docstring (wide modes scaled, then rounded to 8 bits). The training data modules use it,
    so that a model is trained on the pixels it is served."""
    if channels not in (1, 3):
        raise ValueError(f"models with {channels} input channels are not supported (1 or 3)")
    if im.mode in _WIDE_MODES:
        wide = np.nan_to_num(_wide_to_array(im, None), nan=0.0, posinf=1.0, neginf=0.0)  # 8 bits hold no NaN
        gray = Image.fromarray(np.round(wide * 255.0).astype(np.uint8))
        return gray if channels == 1 else gray.convert("RGB")
    return _to_8bit(im, channels)


def _pixels_hwc(im: Image.Image, channels: int, size: int) -> np.ndarray:
    """A decoded image -> ``(S, S, channels)``: uint8 for 8-bit modes, float32 in [0, 1] for wide ones."""
    if channels not in (1, 3):
        raise ValueError(f"models with {channels} input channels are not supported (1 or 3)")
    if im.mode in _WIDE_MODES:
        gray = _wide_to_array(im, size)[..., None]
        return np.repeat(gray, channels, axis=2) if channels == 3 else gray
    a = np.asarray(_resize_crop(_to_8bit(im, channels), size))
    return a[..., None] if a.ndim == 2 else a


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# chunks that change no pixel for PIL or for libpng without transforms (and none it warns about,
# such as iCCP); any other chunk sends the file to PIL (tRNS too: its transparent colour is
# composited over black there, which libpng without transforms would not do)
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_PLAIN_CHUNKS = frozenset(
    (b"IHDR", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"tIME", b"bKGD", b"sBIT", *_TEXT_CHUNKS)
)
_EXIF_TEXT_KEY = b"Raw profile type exif\x00"  # the text chunk in which Pillow also finds EXIF


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """The chunks of a PNG after its signature, up to ``IEND`` or the end of ``data``: each
    chunk's type and the offsets of its body, ``data[start:end]`` (followed by its CRC in
    ``data[end:end + 4]``). The last chunk's body and CRC may run past a truncated file's end."""
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        start = pos + 8
        end = start + int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : start]
        yield kind, start, end
        if kind == b"IEND":
            return
        pos = end + 4


def _plain_png(data: bytes, size: int) -> bool:
    """Whether ``data`` is a PNG that libpng decodes to the pixels the PIL path gives.

    That is an 8-bit grayscale (colour type 0) or RGB (2), non-interlaced PNG of ``size x size``
    pixels (no conversion, alpha, palette or resize), without EXIF (no orientation), holding only
    the chunks of ``_PLAIN_CHUNKS``, each with a correct CRC (PIL refuses a file with a bad one
    where libpng only warns about it), up to ``IEND``, whose image data (one run of ``IDAT``
    chunks) inflates to exactly the rows of the image, each with a valid filter byte.

    libpng is only given files it decodes without an error: torchvision's decoder does not
    recover from libpng's errors (a short image stream or a bad filter byte kills the process),
    so every other file goes to PIL, which names the problem.
    """
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return False
    if int.from_bytes(data[16:20], "big") != size or int.from_bytes(data[20:24], "big") != size:
        return False
    # bit depth 8, grayscale or RGB, compression 0, filter method 0, no interlacing
    if data[24] != 8 or data[25] not in (0, 2) or data[26:29] != b"\x00\x00\x00":
        return False
    idat: list[bytes] = []
    idat_done = False  # the run of IDAT chunks has ended (libpng refuses a second run)
    for kind, start, end in _png_chunks(data):
        if end + 4 > len(data) or kind not in _PLAIN_CHUNKS:
            return False
        if zlib.crc32(data[start - 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            return False
        if kind in _TEXT_CHUNKS and data[start:end].startswith(_EXIF_TEXT_KEY):
            return False
        if kind == b"IDAT":
            if idat_done:
                return False
            idat.append(data[start:end])
        elif idat:
            idat_done = True
        if kind == b"IEND":
            return _rows_are_complete(b"".join(idat), size, 1 if data[25] == 0 else 3)
    return False  # no IEND: truncated


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
"""The seven passes of an interlaced PNG: first column, first row, column step, row step."""


def _png_data_size(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes of a PNG's inflated image data: every row's filter byte and packed pixels (for an
    interlaced image, the rows of each non-empty Adam7 pass)."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        cols, rows = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        if cols and rows:  # an empty pass has no rows, not even filter bytes
            total += rows * (1 + (cols * bits_per_pixel + 7) // 8)
    return total


def _png_rows_missing(data: bytes) -> str | None:
    """Why a PNG that PIL decoded lacks rows, or ``None``: PIL zero-fills the rows of a complete
    image stream that ends early (no error; for an interlaced image, one that ends between two
    passes), so the IDAT data is inflated and counted against the size its header implies
    (streamed: a large image is not held twice)."""
    if len(data) < 33 or data[28] not in (0, 1) or data[25] not in _PNG_CHANNELS:
        return None
    width, height, depth = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), data[24]
    expected = _png_data_size(width, height, _PNG_CHANNELS[data[25]] * depth, interlaced=data[28] == 1)
    inflate, total = zlib.decompressobj(), 0
    try:
        for kind, start, end in _png_chunks(data):
            if total >= expected:
                break
            if kind == b"IDAT":
                chunk = memoryview(data)[start:end]
                while chunk and total < expected:
                    total += len(inflate.decompress(chunk, 1 << 20))
                    chunk = inflate.unconsumed_tail
    except zlib.error:
        return None  # a corrupt stream: PIL's own error (or its pixels) stands
    return None if total >= expected else f"its image data holds {total} of the {expected} bytes its rows need"


def _rows_are_complete(stream: bytes, size: int, channels: int) -> bool:
    """Whether a PNG's zlib ``stream`` inflates (checksum included, nothing after it) to exactly
    ``size`` rows of ``1 + size * channels`` bytes, each starting with a filter type 0-4."""
    row = 1 + size * channels
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(stream, row * size + 1)
    except zlib.error:
        return False
    return (
        inflate.eof
        and not inflate.unused_data
        and not inflate.unconsumed_tail
        and len(raw) == row * size
        and max(raw[::row]) <= 4
    )


@functools.cache
def _libpng_decoder() -> Callable[[Tensor], Tensor] | None:
    """torchvision's libpng decoder ``(N,) uint8 bytes -> (C, H, W) uint8``, pixels as stored, or
    ``None`` where this torchvision has none.

    The op itself: its Python wrapper ``torchvision.io.decode_png`` warns on every call that
    torchvision's image codecs are deprecated (in favour of TorchCodec); when they are removed,
    every image goes through PIL, with the same pixels.
    """
    try:
        import torchvision.io  # noqa: F401  (loads the image ops; the models import torchvision already)

        op = torch.ops.image.decode_png
    except (ImportError, AttributeError, RuntimeError):
        return None
    return lambda data: op(data, 0, False)  # mode 0 = ImageReadMode.UNCHANGED, no EXIF rotation


def _decode_plain_png(data: bytes, channels: int) -> np.ndarray | None:
    """``(C, S, S)`` uint8 pixels of a ``_plain_png`` decoded by libpng, or ``None`` when the model
    needs a conversion that is PIL's (RGB to luma), no libpng decoder is available or it refuses
    the file (PIL then decodes it and names the problem)."""
    gray = data[25] == 0
    decoder = _libpng_decoder()
    if decoder is None or channels not in (1, 3) or (channels == 1 and not gray):
        return None
    try:
        chw = decoder(torch.frombuffer(bytearray(data), dtype=torch.uint8)).numpy()
    except (RuntimeError, ValueError):
        return None
    if chw.shape[0] != (1 if gray else 3):
        return None
    return np.repeat(chw, 3, axis=0) if channels == 3 and gray else chw


def load_pixels(source: ImageSource, channels: int, size: int) -> np.ndarray:
    """One image -> its pixels before normalisation (see the module docstring).

    Args:
        source: the image file, or an ``InMemoryImage``.
        channels: the model's input channels (1 or 3).
        size: the served square size.

    Returns:
        ``(channels, size, size)``: uint8 for 8-bit images (``normalise_batch`` divides them by
        255), float32 in [0, 1] for wide ones.

    Raises:
        ImageError: the image cannot be used; the reason is in the message.
    """
    path = source_name(source)
    if isinstance(source, InMemoryImage) and isinstance(source.data, Image.Image):
        im = _loaded_pil(path, source.data)
    else:
        data = _read(path) if isinstance(source, str) else _held_bytes(source)
        if _plain_png(data, size):
            pixels = _decode_plain_png(data, channels)
            if pixels is not None:
                return pixels
        im = _decode_bytes(path, data)
    try:
        a = _pixels_hwc(im, channels, size)
    except (OSError, ValueError) as err:
        raise ImageError(path, f"cannot convert mode {im.mode} to the model's {channels} channel(s): {err}") from None
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def _held_bytes(source: InMemoryImage) -> bytes:
    """An in-memory image's encoded bytes, bounded as a file's are (checked before any copy)."""
    size = memoryview(source.data).nbytes
    if not size:
        raise ImageError(source.name, "empty (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise ImageError(source.name, f"too large (over {MAX_FILE_BYTES >> 20} MiB)")
    return source.data if isinstance(source.data, bytes) else memoryview(source.data).tobytes()


def normalise_batch(pixels: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    """``load_pixels`` results -> the normalised batch and which images are usable.

    8-bit pixels are divided by 255 (as ``ToTensor`` does), then ``(x - mean) / std`` per channel
    (as ``Normalize`` does), for the whole batch at once.

    Args:
        pixels: ``(C, S, S)`` arrays, uint8 or float32 in [0, 1].
        mean: per-channel mean.
        std: per-channel std.

    Returns:
        ``(B, C, S, S)`` float32 and ``(B,)`` bool: False for an image with a non-finite value
        (a float image holding NaN or infinity), whose row must not be used. (8-bit images are
        always finite where ``std`` is positive, as a loaded bundle's is.)
    """
    if not pixels:
        raise ValueError("normalise_batch needs at least one image")
    wide = [i for i, a in enumerate(pixels) if a.dtype != np.uint8]
    if wide:
        x = torch.from_numpy(np.stack([a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a for a in pixels]))
    else:
        x = torch.from_numpy(np.stack(pixels)).float().div_(255.0)
    c = x.shape[1]
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)).div_(
        torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    )
    usable = torch.ones(len(pixels), dtype=torch.bool)
    if wide:  # only float sources can hold NaN / infinity
        usable[wide] = torch.isfinite(x[wide]).flatten(1).all(dim=1)
    return x, usable


def load_image(source: ImageSource, channels: int, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """One image (a file or an ``InMemoryImage``) -> a normalised ``(channels, size, size)``
    float32 tensor.

    Raises:
        ImageError: the image cannot be used; the reason is in the message.
    """
    x, usable = normalise_batch([load_pixels(source, channels, size)], mean, std)
    if not usable[0]:
        raise ImageError(source_name(source), NON_FINITE)
    return x[0]
