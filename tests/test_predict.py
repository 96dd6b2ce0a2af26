"""``eexit predict``: any image mode and size, one line per input, errors for exactly the broken files."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eexit.bundle import load_bundle
from eexit.cli import main
from eexit.data.synthetic import make_shapes
from eexit.serve.images import ImageError, decode, expand_inputs, load_image
from eexit.types import ExitLevel

ROOT = Path(__file__).resolve().parents[1]
EXITS = {lv.key for lv in ExitLevel}


def _strict_json(line: str) -> dict:
    def no_constants(name: str):
        raise AssertionError(f"non-finite number {name} in output: {line}")

    return json.loads(line, parse_constant=no_constants)


def _shape_u8(seed: int, size: int = 16) -> np.ndarray:
    x, _, _ = make_shapes(1, num_classes=4, image_size=size, seed=seed)
    return (x[0, 0].clamp(0, 1) * 255).round().byte().numpy()


def _exif_jpeg(im: Image.Image, orientation: int | None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture
def mixed_folder(tmp_path: Path) -> tuple[Path, set[str]]:
    """Good images of many modes and sizes plus broken files; returns the folder and the broken names."""
    d = tmp_path / "inputs"
    (d / "sub").mkdir(parents=True)
    g = Image.fromarray(_shape_u8(0))
    g.save(d / "gray16.png")
    Image.fromarray(_shape_u8(1, 40)).crop((0, 0, 40, 30)).save(d / "gray_40x30.png")
    Image.merge("RGB", [g, g.transpose(Image.Transpose.FLIP_LEFT_RIGHT), g]).resize((20, 20)).save(d / "rgb20.png")
    rgba = g.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))))
    rgba.save(d / "rgba.png")
    g.convert("LA").save(d / "sub" / "la.png")
    g.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(d / "palette.png")
    g.convert("P").save(d / "palette_t.png", transparency=0)
    Image.fromarray(_shape_u8(2).astype(np.uint16) * 257).save(d / "deep16.png")  # mode I;16
    g.convert("1").save(d / "bilevel.png")
    Image.fromarray(_shape_u8(3)).resize((3, 3)).save(d / "tiny3.gif")
    (d / "rotated.jpg").write_bytes(_exif_jpeg(Image.fromarray(_shape_u8(4, 32)).crop((0, 0, 32, 16)), 6))
    g.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(_shape_u8(5).astype(np.float32) / 255.0).save(d / "float.tiff")  # mode F
    # broken inputs
    (d / "notes.txt").write_text("not an image\n")
    (d / "empty.png").write_bytes(b"")
    png = (d / "gray16.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    jpg = (d / "rotated.jpg").read_bytes()
    (d / "sub" / "truncated.jpg").write_bytes(jpg[: len(jpg) * 2 // 3])
    (d / "garbage.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    # PostScript named like a PNG: Pillow would hand it to Ghostscript
    (d / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n")
    inf = _shape_u8(6).astype(np.float32)  # 0..255 float image with one infinite pixel
    inf[0, 0] = np.inf
    Image.fromarray(inf).save(d / "inf.tiff")
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # hidden: skipped, no line
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), 16)[None, :]).save(d / "strip.png")  # 1 x 4096
    broken = {"notes.txt", "empty.png", "truncated.png", "truncated.jpg", "garbage.bin", "eps.png", "inf.tiff"}
    return d, broken | {"missing.png", "empty_folder"}


def test_predict_folder_of_good_and_broken_files(calibrated_run, mixed_folder, capsys) -> None:
    folder, broken = mixed_folder
    missing = str(folder.parent / "missing.png")
    empty = folder.parent / "empty_folder"
    empty.mkdir(exist_ok=True)
    bundle_dir = calibrated_run["bundle"]
    args = [str(folder), missing, str(empty), "--batch-size", "4", "--no-progress"]
    rc = main(["predict", "--bundle", bundle_dir, *args])
    lines = capsys.readouterr().out.splitlines()
    expected_paths = [*expand_inputs([str(folder)]), missing, str(empty)]
    assert rc == 1
    assert len(lines) == len(expected_paths) == 23  # 14 good images, 7 broken files, 1 missing, 1 empty folder
    rows = [_strict_json(line) for line in lines]
    assert [r["path"] for r in rows] == expected_paths  # input order, across batches
    errors = {Path(r["path"]).name: r["error"] for r in rows if "error" in r}
    assert set(errors) == broken
    assert "empty" in errors["empty.png"] and "not an image" in errors["notes.txt"]
    assert "truncated" in errors["truncated.png"] and "truncated" in errors["truncated.jpg"]
    assert "no such file" in errors["missing.png"] and "folder with no (visible) files" in errors["empty_folder"]
    assert "not an image in a supported format" in errors["eps.png"] and "non-finite" in errors["inf.tiff"]
    assert not any(Path(r["path"]).name == ".DS_Store" for r in rows)
    bundle = load_bundle(bundle_dir)
    routed = bundle.routed()
    for r in rows:
        if "error" in r:
            continue
        assert r["tier"] in EXITS and r["label"] in bundle.class_names
        assert 0 <= r["probability"] <= 1 and 0 <= r["confidence"] <= 1
        assert r["mflops"] > 0 and r["latency_ms"] > 0
        assert len(r["features"]) == 7 and all(v is not None for v in r["features"].values())
        assert len(r["attributions"]) == 7 and all(v is not None for v in r["attributions"].values())
        # the batched CLI gives the decision the routed classifier gives this image alone
        x = load_image(r["path"], bundle.channels, bundle.input_size[0], bundle.mean, bundle.std)
        alone = routed(x.unsqueeze(0))
        assert r["tier"] == ExitLevel(int(alone.tier[0])).key and r["label_index"] == int(alone.logits.argmax())


def test_image_conversions(tmp_path: Path) -> None:
    # EXIF orientation 6: stored 32x16, shown rotated by 90 degrees clockwise
    stored = Image.fromarray(_shape_u8(4, 32)).crop((0, 0, 32, 16))
    (tmp_path / "exif.jpg").write_bytes(_exif_jpeg(stored, 6))
    (tmp_path / "plain.jpg").write_bytes(_exif_jpeg(stored, None))
    shown = decode(str(tmp_path / "exif.jpg"))
    assert shown.size == (16, 32)
    plain = decode(str(tmp_path / "plain.jpg")).transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(shown), np.asarray(plain))
    # 16-bit: scaled by 65535 (PIL's own convert("L") would clip mid-grey to white)
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "mid16.png")
    x = load_image(str(tmp_path / "mid16.png"), 1, 8, [0.0], [1.0])
    assert torch.allclose(x, torch.full((1, 8, 8), 32768 / 65535), atol=1e-6)
    # a transparent pixel is black; grey repeats into RGB; RGB reduces to luma; normalisation
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3], rgba[:4, :, 3] = 200, 255
    Image.fromarray(rgba).save(tmp_path / "half.png")
    x = load_image(str(tmp_path / "half.png"), 3, 8, [0.5] * 3, [0.25] * 3)
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x[:, :4], torch.tensor((200 / 255 - 0.5) / 0.25)) and torch.allclose(
        x[:, 4:], torch.tensor(-2.0)
    )
    Image.fromarray(np.dstack([np.full((4, 6), v, np.uint8) for v in (255, 0, 0)])).save(tmp_path / "red.png")
    x = load_image(str(tmp_path / "red.png"), 1, 4, [0.0], [1.0])  # resized 4x6 -> 4x4 (centre crop)
    assert x.shape == (1, 4, 4) and torch.allclose(x, torch.tensor(76 / 255))  # ITU-R 601-2: 0.299 * 255


def test_explain_writes_the_figures_and_tier_forces_the_exit(calibrated_run, tmp_path: Path, capsys) -> None:
    for i in range(3):
        Image.fromarray(_shape_u8(i)).save(tmp_path / f"img{i}.png")
    out = tmp_path / "explain"
    rc = main(
        [
            "predict",
            "--bundle",
            calibrated_run["bundle"],
            str(tmp_path / "img*.png"),
            "--explain",
            str(out),
            "--tier",
            "heavy",
        ]
    )
    rows = [_strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(rows) == 3
    assert all(r["tier"] == "heavy" and r["forced"] for r in rows)
    # the router's own choice is reported beside the forced exit, as routing these images gives it
    bundle = load_bundle(calibrated_run["bundle"])
    x = torch.stack(
        [load_image(r["path"], bundle.channels, bundle.input_size[0], bundle.mean, bundle.std) for r in rows]
    )
    own = bundle.routed()(x)
    assert [r["router_tier"] for r in rows] == [ExitLevel(t).key for t in own.tier.tolist()]
    for r in rows:
        assert set(r["explanation"]) == {"cam", "radar", "attributions"}
        for f in r["explanation"].values():
            with Image.open(f) as im:
                assert im.format == "PNG" and im.width > 100
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".eexit-predict.lock"]  # no temp files
    assert len([p for p in out.iterdir() if not p.name.startswith(".")]) == 9


def test_loading_and_predicting_imports_no_lightning_or_hydra(calibrated_run, tmp_path: Path) -> None:
    for i in range(2):
        Image.fromarray(_shape_u8(i)).save(tmp_path / f"img{i}.png")
    script = (
        "import json, sys\n"
        "from eexit.cli import main\n"
        f"rc = main(['predict', '--bundle', {calibrated_run['bundle']!r}, {str(tmp_path)!r}])\n"
        "heavy = ('lightning', 'pytorch_lightning', 'lightning_fabric', 'hydra', 'omegaconf', 'wandb', 'torchmetrics',"
        " 'setuptools')\n"
        "tools = ('torch.utils.benchmark', 'torch.utils.cpp_extension')  # calibration only: setuptools, a CUDA warning\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(tools))\n"
        "print(json.dumps({'rc': rc, 'loaded': loaded}))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result == {"rc": 0, "loaded": []}
    assert "CUDA_HOME" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert len(lines) == 3 and all("tier" in json.loads(line) for line in lines[:2])


@pytest.mark.parametrize("channels", [1, 3])
def test_training_images_are_decoded_as_they_are_served(tmp_path: Path, channels: int) -> None:
    """The ImageFolder loader and transform give the pixels `eexit predict` feeds the model."""
    from eexit.data.image_folder import ImageFolderDataModule
    from eexit.data.image_folder import load_image as load_training_image

    stored = Image.fromarray(_shape_u8(4, 32)).crop((0, 0, 32, 16))
    (tmp_path / "exif.jpg").write_bytes(_exif_jpeg(stored, 6))
    rgba = np.zeros((12, 12, 4), dtype=np.uint8)
    rgba[..., :3], rgba[:6, :, 3] = 200, 255
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "mid16.png")
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
    mean, std = [0.5] * channels, [0.25] * channels
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, mean=mean, std=std, in_chans=channels, augment=False)
    transform = dm.transform(train=False)
    for name in ("exif.jpg", "alpha.png", "mid16.png"):
        path = str(tmp_path / name)
        trained_on = transform(load_training_image(path))
        served = load_image(path, channels, 8, mean, std)
        assert trained_on.shape == served.shape == (channels, 8, 8), name
        # 16-bit pixels are rounded to 8 bits for training: at most half a grey level apart
        assert (trained_on - served).abs().max() <= 0.5 / 255 / 0.25 + 1e-5, name


def test_decoding_ahead_in_a_thread_or_in_turn_gives_the_same_rows(calibrated_run, mixed_folder) -> None:
    # which path runs by default depends on the machine's free cores: both must give the same rows
    from eexit.serve.predict import decode_ahead, predict_rows

    folder, broken = mixed_folder
    bundle = load_bundle(calibrated_run["bundle"])
    paths = expand_inputs([str(folder)])
    ahead = list(predict_rows(bundle, paths, batch_size=4, decode_in_background=True))
    in_turn = list(predict_rows(bundle, paths, batch_size=4, decode_in_background=False))
    assert len(ahead) == len(in_turn) == len(paths)
    assert {Path(r["path"]).name for r in ahead if "error" in r} == broken - {"missing.png", "empty_folder"}
    for a, b in zip(ahead, in_turn, strict=True):
        assert a.keys() == b.keys() and a["path"] == b["path"]
        if "error" in a:
            assert a["error"] == b["error"]
        else:
            assert (a["tier"], a["label_index"]) == (b["tier"], b["label_index"])
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)
    assert decode_ahead(True) and not decode_ahead(False)
    assert decode_ahead(None, torch.device("cuda"))  # the CPU is free while a GPU runs the model
    assert decode_ahead(None, torch.device("cpu")) == decode_ahead(None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_bundle_cast_to_another_dtype_predicts_with_its_attributions(calibrated_run, tmp_path: Path, dtype) -> None:
    # decoded images are float32: the routed engine casts them to the network's dtype (a oneDNN
    # error stopped the whole run before); the attributions run in the gate's float32
    from eexit.serve.predict import predict_rows

    for i in range(6):
        Image.fromarray(_shape_u8(i)).save(tmp_path / f"img{i}.png")
    paths = expand_inputs([str(tmp_path)])
    bundle = load_bundle(calibrated_run["bundle"])
    reference = list(predict_rows(bundle, paths))
    bundle.net.to(dtype)
    rows = list(predict_rows(bundle, paths))
    assert len(rows) == 6 and not any("error" in r for r in rows)
    agree = sum(
        r["tier"] == ref["tier"] and r["label_index"] == ref["label_index"]
        for r, ref in zip(rows, reference, strict=True)
    )
    assert agree >= 5, (rows, reference)
    assert all(len(r["attributions"]) == 7 for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_bundle_moved_to_the_gpu_after_loading_predicts_as_on_the_cpu(calibrated_run, tmp_path: Path) -> None:
    # the routers and explanation baselines stay where load_bundle put them: routing copies the
    # router to the network's device, attributions run where the calibration is
    from eexit.serve.predict import predict_rows

    for i in range(6):
        Image.fromarray(_shape_u8(i)).save(tmp_path / f"img{i}.png")
    paths = expand_inputs([str(tmp_path)])
    bundle = load_bundle(calibrated_run["bundle"])
    reference = list(predict_rows(bundle, paths, router="staged"))
    bundle.net.cuda()
    rows = list(predict_rows(bundle, paths, router="staged"))
    assert [(r["tier"], r["label_index"]) for r in rows] == [(r["tier"], r["label_index"]) for r in reference]
    for r, ref in zip(rows, reference, strict=True):
        assert r["attributions"] == pytest.approx(ref["attributions"], abs=1e-3)


def _png(path: Path, im: Image.Image, **kwargs) -> str:
    im.save(path, format="PNG", **kwargs)
    return str(path)


def test_png_fast_path_gives_the_pixels_of_the_pil_path(tmp_path: Path, monkeypatch) -> None:
    from PIL import PngImagePlugin

    from eexit.serve import images

    gray = Image.fromarray(_shape_u8(3))
    rgb = Image.merge("RGB", [gray, gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gray.point(lambda v: 255 - v)])
    gamma = PngImagePlugin.PngInfo()
    gamma.add(b"gAMA", (45455).to_bytes(4, "big"))  # libpng must not apply it (Pillow does not)
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "plain text")
    mention = PngImagePlugin.PngInfo()  # a text that merely names the EXIF chunk: no EXIF
    mention.add_text("comment", "no eXIf here")
    exif = Image.Exif()
    exif[0x0112] = 6
    raw_exif = PngImagePlugin.PngInfo()  # ImageMagick's way of storing EXIF, which Pillow reads too
    raw = exif.tobytes()
    raw_exif.add_text("Raw profile type exif", f"\nexif\n{len(raw):8d}\n{raw.hex()}\n")
    cases = {  # name: (file, model channels, fast path expected)
        "gray": (_png(tmp_path / "g.png", gray), 1, True),
        "gray_to_rgb": (_png(tmp_path / "g3.png", gray), 3, True),
        "rgb": (_png(tmp_path / "c.png", rgb), 3, True),
        "gamma": (_png(tmp_path / "gm.png", gray, pnginfo=gamma), 1, True),
        "text": (_png(tmp_path / "t.png", rgb, pnginfo=text), 3, True),
        "text_naming_exif": (_png(tmp_path / "tx.png", rgb, pnginfo=mention), 3, True),
        "gray_trns": (_png(tmp_path / "gt.png", gray, transparency=0), 3, False),  # tRNS: composited, by PIL
        "rgb_trns": (_png(tmp_path / "ct.png", rgb, transparency=(0, 0, 0)), 1, False),  # luma: PIL
        "rgb_to_luma": (_png(tmp_path / "cl.png", rgb), 1, False),
        "exif": (_png(tmp_path / "e.png", rgb, exif=exif.tobytes()), 3, False),
        "raw_profile_exif": (_png(tmp_path / "re.png", rgb, pnginfo=raw_exif), 3, False),
        "icc_profile": (_png(tmp_path / "icc.png", gray, icc_profile=b"not a real profile"), 1, False),
        "palette": (_png(tmp_path / "p.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)), 3, False),
        "rgba": (_png(tmp_path / "a.png", rgb.convert("RGBA")), 3, False),
        "16bit": (_png(tmp_path / "w.png", Image.fromarray(np.full((16, 16), 40000, np.uint16))), 1, False),
        "other_size": (_png(tmp_path / "s.png", gray.resize((20, 16))), 1, False),
    }
    fast_results = []  # what the fast decoder returned (None: it handed the file to PIL)
    real = images._decode_plain_png
    monkeypatch.setattr(images, "_decode_plain_png", lambda *a: fast_results.append(real(*a)) or fast_results[-1])
    for name, (path, channels, fast) in cases.items():
        fast_results.clear()
        got = images.load_pixels(path, channels, 16)
        assert (bool(fast_results) and fast_results[-1] is not None) == fast, name
        want = images._pixels_hwc(images.decode(path), channels, 16).transpose(2, 0, 1)
        assert got.shape == (channels, 16, 16) and got.dtype == want.dtype, name
        assert np.array_equal(got, want), name
    # broken files go to PIL, which names the problem: truncated, or a chunk with a bad CRC
    # (which libpng would only warn about)
    data = Path(cases["gray"][0]).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(images.ImageError, match="truncated"):
        images.load_pixels(str(tmp_path / "cut.png"), 1, 16)
    texted = bytearray(Path(cases["text"][0]).read_bytes())
    at = texted.index(b"plain text")
    texted[at] ^= 1  # the tEXt chunk's CRC no longer matches
    (tmp_path / "crc.png").write_bytes(bytes(texted))
    fast_results.clear()
    with pytest.raises(images.ImageError):
        images.load_pixels(str(tmp_path / "crc.png"), 3, 16)
    assert not fast_results
    with pytest.raises(images.ImageError, match="channel"):  # the fast path checks channels too
        images.load_pixels(cases["gray"][0], 4, 16)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def _crafted_png(rows: bytes, size: int = 16, idat_parts: int = 1, between: bytes = b"") -> bytes:
    """An 8-bit grayscale PNG of ``size x size`` whose image data is ``rows`` (filter byte and
    pixels per row), deflated and cut into ``idat_parts`` IDAT chunks, every CRC correct."""
    stream = zlib.compress(rows)
    cut = [stream[i * len(stream) // idat_parts : (i + 1) * len(stream) // idat_parts] for i in range(idat_parts)]
    ihdr = size.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    idats = [_png_chunk(b"IDAT", c) for c in cut]
    if between:
        idats.insert(1, between)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + b"".join(idats) + _png_chunk(b"IEND", b"")


def test_png_image_data_libpng_cannot_decode_goes_to_pil(tmp_path: Path) -> None:
    # torchvision's libpng decoder kills the process on these (valid CRCs, broken image data):
    # the fast path must leave them to PIL, which names the problem; the rest of the run goes on
    from eexit.serve import images

    rows = b"".join(b"\x00" + bytes(range(i, i + 16)) for i in range(16))
    good = _crafted_png(rows, idat_parts=2)
    assert images._plain_png(good, 16)
    assert np.array_equal(images.load_pixels(_write(tmp_path / "ok.png", good), 1, 16)[0, 3], np.arange(3, 19))
    stream = zlib.compress(rows)
    broken = {
        "few_rows": _crafted_png(rows[: 17 * 12]),  # a complete stream with too few rows
        "short_stream": _crafted_png(rows).replace(_png_chunk(b"IDAT", stream), _png_chunk(b"IDAT", stream[:-9])),
        "bad_filter": _crafted_png(b"\x07" + rows[1:]),
        "too_many_rows": _crafted_png(rows + rows[:17]),
        "split_idat": _crafted_png(rows, idat_parts=2, between=_png_chunk(b"tEXt", b"k\x00v")),
    }
    for name, data in broken.items():
        assert not images._plain_png(data, 16), name
    result = subprocess.run(  # in a child process: were libpng reached, it would crash the test run
        [
            sys.executable,
            "-c",
            "import sys; from eexit.serve import images\n"
            "for p in sys.argv[1:]:\n"
            "    try: images.load_pixels(p, 1, 16); print(p, 'ok')\n"
            "    except images.ImageError as e: print(p, 'error')",
            *(_write(tmp_path / f"{n}.png", d) for n, d in broken.items()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
    assert len(outcome) == len(broken)
    assert outcome[str(tmp_path / "short_stream.png")] == "error"
    assert outcome[str(tmp_path / "few_rows.png")] == "error"  # PIL alone would zero-fill the rows
    # the same on the PIL path (another size than the bundle's): missing rows are an error
    rows20 = b"".join(b"\x00" + bytes(range(i, i + 20)) for i in range(20))
    with pytest.raises(images.ImageError, match=r"holds 252 of the 420 bytes its rows need"):
        images.load_pixels(_write(tmp_path / "few20.png", _crafted_png(rows20[: 21 * 12], size=20)), 1, 16)
    assert images.load_pixels(_write(tmp_path / "all20.png", _crafted_png(rows20, size=20)), 1, 16).shape == (1, 16, 16)


def _interlaced_png(pixels: np.ndarray, keep: int | None = None) -> bytes:
    """An 8-bit grayscale Adam7-interlaced PNG of ``pixels`` ``(h, w)`` uint8 whose complete
    image stream holds the first ``keep`` bytes of its passes' rows (all with ``None``)."""
    rows = b"".join(
        b"".join(b"\x00" + r.tobytes() for r in pixels[y0::dy, x0::dx])
        for x0, y0, dx, dy in (
            (0, 0, 8, 8),
            (4, 0, 8, 8),
            (0, 4, 4, 8),
            (2, 0, 4, 4),
            (0, 2, 2, 4),
            (1, 0, 2, 2),
            (0, 1, 1, 2),
        )
        if pixels[y0::dy, x0::dx].size
    )
    h, w = pixels.shape
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 0, 0, 0, 1])
    idat = _png_chunk(b"IDAT", zlib.compress(rows[:keep]))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + idat + _png_chunk(b"IEND", b"")


def test_interlaced_png_whose_image_data_ends_between_passes_is_an_error(tmp_path: Path) -> None:
    # PIL zero-fills the passes missing after a complete stream that ends between two passes
    from eexit.serve import images

    pixels = (np.arange(13 * 20).reshape(13, 20) % 251 + 1).astype(np.uint8)  # no zero pixel
    whole = _write(tmp_path / "whole.png", _interlaced_png(pixels))
    assert np.array_equal(np.asarray(Image.open(whole)), pixels)  # a valid interlaced PNG
    assert images.load_pixels(whole, 1, 16).shape == (1, 16, 16)
    # passes 1-2 of a 20 x 13 image: 2 rows of 1 + 3 bytes, 2 rows of 1 + 2 bytes
    cut = _write(tmp_path / "cut.png", _interlaced_png(pixels, keep=14))
    assert (np.asarray(Image.open(cut)) == 0).sum() > 200  # what PIL alone gives: zeros, no error
    with pytest.raises(images.ImageError, match=r"holds 14 of the 286 bytes its rows need"):
        images.load_pixels(cut, 1, 16)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_batch_normalisation_equals_per_image_and_drops_non_finite_images(tmp_path: Path) -> None:
    from eexit.serve.images import load_pixels, normalise_batch

    good = _png(tmp_path / "g.png", Image.fromarray(_shape_u8(5)))
    nan = np.full((16, 16), 0.5, np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    Image.fromarray(np.full((16, 16), 0.25, np.float32), mode="F").save(tmp_path / "quarter.tif")
    pixels = [load_pixels(p, 1, 16) for p in (good, str(tmp_path / "nan.tif"), str(tmp_path / "quarter.tif"))]
    x, usable = normalise_batch(pixels, [0.3], [0.2])
    assert usable.tolist() == [True, False, True]
    u8 = torch.from_numpy(np.asarray(Image.open(good), dtype=np.float32) / 255.0)
    assert torch.equal(x[0, 0], (u8 - 0.3) / 0.2)  # ToTensor then Normalize, bit for bit
    assert torch.allclose(x[2], torch.full((1, 16, 16), (0.25 - 0.3) / 0.2))
    with pytest.raises(ValueError, match="non-finite"):
        load_image(str(tmp_path / "nan.tif"), 1, 16, [0.3], [0.2])
    # a batch of 8-bit images (the usual case): torchvision's ToTensor + Normalize, bit for bit
    from torchvision import transforms

    rgb = [Image.fromarray(np.dstack([_shape_u8(s), _shape_u8(s + 1), _shape_u8(s + 2)])) for s in range(3)]
    files = [_png(tmp_path / f"c{i}.png", im) for i, im in enumerate(rgb)]
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    x, usable = normalise_batch([load_pixels(f, 3, 16) for f in files], mean, std)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    assert usable.all() and torch.equal(x, torch.stack([reference(im) for im in rgb]))


def test_an_image_past_pillows_bomb_limit_is_named_in_a_warning(
    calibrated_run, tmp_path: Path, monkeypatch, caplog, recwarn, capsys
) -> None:
    # Pillow's DecompressionBombWarning does not say which file; predict logs one that does
    Image.fromarray(_shape_u8(1, 40)).save(tmp_path / "big.png")
    Image.fromarray(_shape_u8(2, 30)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 40 warns (2 x the limit would fail)
    with caplog.at_level(logging.WARNING, logger="eexit.serve.images"):
        rc = main(["predict", "--bundle", calibrated_run["bundle"], str(tmp_path)])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all("label" in r for r in rows)
    named = [r.getMessage() for r in caplog.records if "decompression-bomb" in r.getMessage()]
    assert len(named) == 1 and named[0].startswith(str(tmp_path / "big.png")) and "40 x 40" in named[0]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.skipif(sys.platform != "linux", reason="file names of arbitrary bytes: Linux file systems")
def test_a_file_name_that_is_not_utf8_round_trips_through_the_json_path(calibrated_run, tmp_path: Path, capsys) -> None:
    name = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(name, "wb") as f:  # (older Pillow versions do not take a bytes path)
        Image.fromarray(_shape_u8(1)).save(f, format="PNG")
    assert main(["predict", "--bundle", calibrated_run["bundle"], str(tmp_path), "--no-attributions"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.isascii() and "caf\\udce9.png" in line  # valid JSON text: the byte as an escape
    row = json.loads(line)
    assert os.fsencode(row["path"]) == name and row["label"] is not None


def test_predict_gives_an_error_line_for_an_image_with_nan_and_keeps_the_others(
    calibrated_run, tmp_path: Path, capsys
) -> None:
    size = load_bundle(calibrated_run["bundle"]).input_size[0]
    Image.fromarray(_shape_u8(1, size)).save(tmp_path / "a_good.png")
    nan = np.full((size, size), 0.5, np.float32)
    nan[0, 0] = np.nan
    Image.fromarray(nan, mode="F").save(tmp_path / "b_nan.tif")
    rc = main(["predict", "--bundle", calibrated_run["bundle"], str(tmp_path)])
    rows = [_strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 1 and [Path(r["path"]).name for r in rows] == ["a_good.png", "b_nan.tif"]
    assert "tier" in rows[0] and "non-finite" in rows[1]["error"]
    rc = main(["predict", "--bundle", calibrated_run["bundle"], str(tmp_path / "b_nan.tif")])  # nothing usable
    rows = [_strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 1 and len(rows) == 1 and "non-finite" in rows[0]["error"]


def test_folders_expand_to_every_visible_file_below_in_order(tmp_path: Path) -> None:
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "__MACOSX").mkdir()  # a macOS archive's resource forks: skipped as training skips them
    for rel in (
        "z.png",
        "a.jpg",
        "b/c.png",
        "b/deep/d.txt",
        ".DS_Store",
        "b/.hidden.png",
        ".git/x.png",
        "__MACOSX/z.png",
    ):
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(tmp_path / "z.png")
    (tmp_path / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "self.png").symlink_to(tmp_path / "self.png")  # a link to itself
    (tmp_path / "looped").symlink_to(tmp_path / "b", target_is_directory=True)  # not entered
    # broken links are listed: each gets its error line instead of vanishing from the output
    names = ("a.jpg", "b/c.png", "b/deep/d.txt", "broken.png", "link.png", "self.png", "z.png")
    want = [str(tmp_path / r) for r in names]
    assert expand_inputs([str(tmp_path)]) == want
    assert expand_inputs([str(tmp_path) + "/"]) == want
    assert expand_inputs([str(tmp_path / "b"), str(tmp_path / "missing.png"), str(tmp_path / "*.jpg")]) == [
        str(tmp_path / "b" / "c.png"),
        str(tmp_path / "b" / "deep" / "d.txt"),
        str(tmp_path / "missing.png"),  # kept: loading it gives its error line
        str(tmp_path / "a.jpg"),
    ]
    # a literal name with glob characters may be either: the message says neither was found
    for missing in ("*.gif", "photo[1].png"):
        with pytest.raises(ImageError, match="no such file, and no file matches it as a pattern"):
            decode(str(tmp_path / missing))
    with pytest.raises(ImageError, match="no such file"):
        decode(str(tmp_path / "missing.png"))
    # a name the file system refuses (too long) is kept too, and its error is its own
    too_long = [str(tmp_path / ("x" * 300 + ".png")), str(tmp_path / ("y" * 300) / "*.png")]
    assert expand_inputs([*too_long, str(tmp_path / "a.jpg")]) == [*too_long, str(tmp_path / "a.jpg")]
    for name in too_long:
        with pytest.raises(ImageError, match=r"File name too long|no such file"):
            decode(name)
    with pytest.raises(ImageError, match="is a directory"):
        decode(str(tmp_path / "b"))
    with pytest.raises(ImageError, match=r"broken symbolic link .*nowhere\.png"):
        decode(str(tmp_path / "broken.png"))
    with pytest.raises(ImageError, match="unreadable: Too many levels of symbolic links"):
        decode(str(tmp_path / "self.png"))


def test_a_thin_strip_is_resized_without_a_huge_intermediate(tmp_path: Path) -> None:
    # 1 x 2,000,000 pixels in 8 KB: resizing the short side to 28 first made a 28 x 56e6 image (4 GB)
    Image.new("L", (2_000_000, 1), 200).save(tmp_path / "strip.png")
    code = (
        "import resource, sys\n"
        "from eexit.serve.images import load_pixels\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "a = load_pixels(sys.argv[1], 1, 28)\n"
        "grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024\n"
        "print(a.shape, int(a.min()), int(a.max()), round(grew_mb))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "strip.png")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shape, lo, hi, grew_mb = done.stdout.rsplit(")", 1)[0] + ")", *map(int, done.stdout.rsplit(")", 1)[1].split())
    assert shape == "(1, 28, 28)" and lo == hi == 200
    assert grew_mb < 200, f"decoding a 1 x 2e6 strip took {grew_mb} MB more"


def test_explain_figures_fail_one_by_one_and_set_the_exit_code(calibrated_run, tmp_path: Path, capsys) -> None:
    Image.fromarray(_shape_u8(0)).save(tmp_path / "img0.png")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    args = ["predict", "--bundle", calibrated_run["bundle"], str(tmp_path / "img0.png"), "--router", "gate"]
    assert main([*args, "--explain", str(not_a_dir)]) == 2  # a clear error, not a traceback
    assert "file" in capsys.readouterr().err
    out = tmp_path / "explain"
    (out / "000000_img0_cam.png").mkdir(parents=True)  # the cam figure cannot be written
    assert main([*args, "--explain", str(out)]) == 1
    (row,) = [_strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert set(row["explanation"]) == {"radar", "attributions"} and row["explanation_error"].startswith("cam: ")


def test_staged_radar_only_for_features_of_tiny(calibrated_run, tmp_path: Path) -> None:
    from eexit.serve.predict import predict_rows

    for i in range(8):
        Image.fromarray(_shape_u8(i)).save(tmp_path / f"img{i}.png")
    paths = sorted(str(p) for p in tmp_path.glob("img*.png"))
    bundle = load_bundle(calibrated_run["bundle"])
    staged = bundle.calibration.routers["staged"]
    seen = set()
    for knob in (0.0, 2.0):  # stops at TINY for every image / never before HEAVY (scores are <= 1)
        staged.knob.fill_(knob)
        bundle._served.clear()  # the served classifiers are built once per router
        rows = list(predict_rows(bundle, paths, router="staged", explain_dir=tmp_path / f"explain{knob}"))
        for r in rows:
            assert ("radar" in r["explanation"]) == (r["tier"] == "tiny"), r
            assert "cam" in r["explanation"] and "attributions" in r["explanation"]
            seen.add(r["tier"])
    assert "tiny" in seen and seen - {"tiny"}, seen  # both cases happened


def test_an_unreadable_subfolder_is_listed_for_its_error_line(tmp_path: Path, monkeypatch) -> None:
    import eexit.serve.images as images

    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "x.png").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    scandir = os.scandir

    def denied(path):  # as os.scandir behaves for a folder without read permission (root has them all)
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(images.os, "scandir", denied)
    assert expand_inputs([str(tmp_path)]) == [str(tmp_path / "a.png"), str(tmp_path / "locked")]
    monkeypatch.setattr(images.os, "access", lambda path, mode: Path(path).name != "locked")
    with pytest.raises(ImageError, match="unreadable folder: permission denied"):
        decode(str(tmp_path / "locked"))


def test_fifos_devices_and_quoted_globs_of_folders(tmp_path: Path) -> None:
    (tmp_path / "tree" / "a").mkdir(parents=True)
    for rel in ("tree/top.png", "tree/a/x.png"):
        (tmp_path / rel).write_bytes(b"x")
    os.mkfifo(tmp_path / "tree" / "pipe")
    # a quoted glob matching folders gives their files, as the shell's expansion does
    assert expand_inputs([str(tmp_path / "tree" / "*")]) == [
        str(tmp_path / "tree" / r) for r in ("a/x.png", "pipe", "top.png")
    ]
    # a FIFO (listed in its folder or named) is refused without blocking on it; so is a device
    for path in (str(tmp_path / "tree" / "pipe"), "/dev/zero"):
        with pytest.raises(ImageError, match=r"not a regular file \(a (FIFO|device)\)"):
            decode(path)


def test_an_explain_path_that_is_a_file_is_refused_before_routing(calibrated_run, tmp_path: Path, capsys) -> None:
    Image.fromarray(_shape_u8(0)).save(tmp_path / "a.png")
    (tmp_path / "taken").write_text("")
    rc = main(
        ["predict", "--bundle", calibrated_run["bundle"], str(tmp_path / "a.png"), "--explain", str(tmp_path / "taken")]
    )
    assert rc == 2 and "explain folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--tier", "huge"], "argument --tier: unknown exit 'huge'; expected one of: tiny, light, medium, heavy"),
        (["--tier", "\uff13"], "argument --tier: unknown exit '\uff13'"),  # a full-width 3 is no index
        (["--tier", "\u00b2"], "argument --tier: unknown exit '\u00b2'"),  # isdigit() but no int()
        (["--router", "fast"], "argument --router: invalid choice: 'fast'"),
        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
        (["--batch-size", "lots"], "argument --batch-size: expected an integer >= 1, got 'lots'"),
    ],
)
def test_bad_options_are_refused_before_the_bundle_is_read(tmp_path: Path, capsys, option, message) -> None:
    with pytest.raises(SystemExit) as stop:  # argparse's usage error, exit status 2
        main(["predict", "--bundle", str(tmp_path / "no_bundle"), *option, str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "no_bundle" not in err


_NO_CUDA = [] if torch.cuda.is_available() else [("cuda", "--device 'cuda': this machine has no CUDA device")]
_TOO_HIGH = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("banana", "--device 'banana' is not a device (expected cpu, cuda, cuda:N or mps)"),
        ("meta", "--device 'meta': only cpu, cuda and mps are supported"),
        ("cpu:1", "--device 'cpu:1': there is one cpu device (cpu or cpu:0)"),
        *_NO_CUDA,
        *([] if not _TOO_HIGH else [(f"cuda:{_TOO_HIGH}", f"this machine has {_TOO_HIGH} CUDA device(s)")]),
    ],
)
def test_a_device_this_machine_lacks_is_refused_before_the_bundle_is_read(
    tmp_path: Path, capsys, device: str, message: str
) -> None:
    rc = main(["predict", "--bundle", str(tmp_path / "no_bundle"), "--device", device, str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert message in " ".join(captured.err.split()) and "no_bundle" not in captured.err


def test_predict_on_an_explicit_cpu_device_gives_the_default_rows(calibrated_run, tmp_path: Path, capsys) -> None:
    for i in range(3):
        Image.fromarray(_shape_u8(i)).save(tmp_path / f"img{i}.png")
    args = ["predict", "--bundle", calibrated_run["bundle"], str(tmp_path), "--no-progress"]
    assert main(args) == 0
    default = capsys.readouterr()
    for device in ("cpu", "cpu:0"):  # safetensors takes no index: cpu:0 is read as cpu
        assert main([*args, "--device", device]) == 0
        explicit = capsys.readouterr()
        assert explicit.out == default.out and len(explicit.out.splitlines()) == 3
    assert "latency_ms were measured" not in explicit.err  # calibrated on the CPU: nothing to note


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predict_on_cuda_gives_the_cpu_decisions_and_notes_the_latencies(
    calibrated_run, tmp_path: Path, capsys
) -> None:
    for i in range(6):
        Image.fromarray(_shape_u8(i)).save(tmp_path / f"img{i}.png")
    args = ["predict", "--bundle", calibrated_run["bundle"], str(tmp_path), "--no-progress"]
    assert main(args) == 0
    cpu = [_strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert main([*args, "--device", "cuda"]) == 0
    captured = capsys.readouterr()
    gpu = [_strict_json(line) for line in captured.out.splitlines()]
    assert [(r["tier"], r["label_index"]) for r in gpu] == [(r["tier"], r["label_index"]) for r in cpu]
    assert "latency_ms were measured on cpu" in captured.err


def test_help_and_option_errors_need_no_torch() -> None:
    # the parser names the routers and exits without the library behind them: `eexit --help` and
    # a mistyped option answer at once (importing torch takes 1.5-2 s on the 2-core CPU)
    script = (
        "import json, sys\n"
        "from eexit.cli import main\n"
        "codes = []\n"
        "for argv in (['--help'], ['predict', '--help'], ['predict', '--bundle', 'b', '--router', 'fast', 'x']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as stop:\n"
        "        codes.append(stop.code)\n"
        "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules}))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"codes": [0, 0, 2], "torch": False}
    assert "invalid choice: 'fast'" in proc.stderr


def test_the_parser_names_every_router_kind() -> None:
    from eexit.routing.routers import ROUTERS
    from eexit.types import ROUTER_KINDS

    assert sorted(ROUTER_KINDS) == sorted(ROUTERS)


def test_dash_reads_one_image_from_standard_input(calibrated_run, tmp_path: Path, capsys, monkeypatch) -> None:
    image = tmp_path / "shape.png"
    Image.fromarray(_shape_u8(4, 40)).save(image)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(image.read_bytes())))
    # '-' twice: standard input holds one image, the second '-' is an error line
    rc = main(["predict", "--bundle", calibrated_run["bundle"], "-", str(image), "-", "--no-progress"])
    piped, from_file, again = [_strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 1
    assert piped["path"] == "-" and from_file["path"] == str(image)
    # the same decision; the two rows of one batch may differ in the last float32 digit (a batched
    # GEMM may round its rows alike or not, by their position), so the floats compare to 1e-6
    assert piped.keys() == from_file.keys()
    for key in piped.keys() - {"path"}:
        a, b = piped[key], from_file[key]
        if isinstance(a, dict):
            assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-6, abs=1e-7), key
        elif isinstance(a, float):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-7), key
        else:
            assert a == b, key
    assert again == {"path": "-", "error": "standard input is empty (or an earlier '-' input read it)"}


def test_dash_on_a_terminal_is_refused_without_waiting(calibrated_run, capsys, monkeypatch) -> None:
    class Terminal(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(io.BytesIO(b"")))
    assert main(["predict", "--bundle", calibrated_run["bundle"], "-", "--no-progress"]) == 1
    (row,) = [_strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert row["path"] == "-" and row["error"].startswith("standard input is a terminal")


def test_colour_spaces_without_a_direct_gray_conversion_load_for_both_channel_counts(tmp_path: Path) -> None:
    from eexit.serve import images

    lab = Image.fromarray(np.stack([_shape_u8(5), np.full((16, 16), 128, np.uint8), _shape_u8(6)], axis=2), "LAB")
    path = tmp_path / "lab.tif"
    lab.save(path)
    assert Image.open(path).mode == "LAB"
    rgb = images.load_pixels(str(path), 3, 16)
    gray = images.load_pixels(str(path), 1, 16)  # PIL has no LAB -> L: it goes through RGB
    assert rgb.shape == (3, 16, 16) and gray.shape == (1, 16, 16) and gray.dtype == np.uint8
    expected = np.asarray(Image.fromarray(rgb.transpose(1, 2, 0)).convert("L"))
    assert np.array_equal(gray[0], expected)


def test_dash_means_standard_input_even_beside_a_folder_named_dash(tmp_path: Path, monkeypatch) -> None:
    from eexit.serve import images
    from eexit.serve.predict import _safe_name

    (tmp_path / "-").mkdir()
    (tmp_path / "-" / "a.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["-", "./-"]) == ["-", "-/a.png"]
    assert _safe_name(3, "-") == "000003_stdin"
    monkeypatch.setattr(sys, "stdin", None)  # e.g. started with stdin closed
    with pytest.raises(ImageError, match="standard input is closed"):
        images.load_pixels("-", 1, 16)
    closed = io.TextIOWrapper(io.BytesIO(b""))
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)
    with pytest.raises(ImageError, match="standard input is closed"):
        images.load_pixels("-", 1, 16)


def test_files_over_the_size_bound_are_refused_and_a_file_at_it_is_read(tmp_path: Path, monkeypatch) -> None:
    from eexit.serve import images

    Image.fromarray(np.full((28, 28), 7, np.uint8)).save(tmp_path / "a.png")
    size = (tmp_path / "a.png").stat().st_size
    monkeypatch.setattr(images, "MAX_FILE_BYTES", size)
    assert images._read(str(tmp_path / "a.png")) == (tmp_path / "a.png").read_bytes()  # exactly at the bound
    monkeypatch.setattr(images, "MAX_FILE_BYTES", size - 1)
    with pytest.raises(ImageError, match=r"a\.png: file too large"):
        images._read(str(tmp_path / "a.png"))


def test_a_file_that_grows_while_read_is_read_to_its_end_within_the_bound(tmp_path: Path, monkeypatch) -> None:
    from eexit.serve import images

    path = tmp_path / "grows.bin"
    path.write_bytes(b"x" * 10)
    real_fstat = os.fstat
    monkeypatch.setattr(images.os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], 4, *real_fstat(fd)[7:])))
    with open(path, "rb") as f:  # fstat says 4 bytes, the file holds 10 (it grew after the stat)
        assert images._read_bounded(f, str(path)) == b"x" * 10
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 8)
    with open(path, "rb") as f, pytest.raises(ImageError, match="file too large"):
        images._read_bounded(f, str(path))


def test_error_messages_show_paths_with_brackets_as_they_are(tmp_path: Path, capsys) -> None:
    # rich would read "[/bold]" as markup: a traceback, or "[bold]" swallowed from the path
    for name in ("no[/bold]bundle", "no[bold]bundle"):
        assert main(["predict", "--bundle", str(tmp_path / name), str(tmp_path)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"error: bundle directory not found: {tmp_path / name}" in err


def test_a_reader_that_goes_away_ends_predict_quietly(calibrated_run, tmp_path: Path) -> None:
    for i in range(40):
        Image.fromarray(_shape_u8(i % 5)).save(tmp_path / f"img{i:02d}.png")
    script = (
        "import sys; from eexit.cli import main; "
        f"sys.exit(main(['predict', '--bundle', {calibrated_run['bundle']!r}, {str(tmp_path)!r}, "
        "'--batch-size', '4', '--no-progress', '--no-attributions']))"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = child.stdout.readline()
    child.stdout.close()  # like `| head -1`
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 1
    assert _strict_json(first.decode())["path"].endswith("img00.png")
    assert "Broken pipe" not in err and "Traceback" not in err and "error" not in err


def test_an_image_whose_logits_overflow_gets_an_error_line(calibrated_run, tmp_path: Path, capsys) -> None:
    # input statistics that pass the bundle's checks can still make a network overflow: such an
    # image has no answer (no label from the argmax of NaN), its line says so, the exit code is 1
    from eexit.serve.predict import predict_rows

    bundle = load_bundle(calibrated_run["bundle"])
    for i in range(3):
        Image.fromarray(_shape_u8(i)).save(tmp_path / f"img{i}.png")
    paths = sorted(str(p) for p in tmp_path.glob("*.png"))
    good = list(predict_rows(bundle, paths, attributions=False))
    assert all("label" in r for r in good)
    bundle.manifest["input"]["std"] = [1e-38] * len(bundle.std)  # inputs near 1e38: finite, the net overflows
    rows = list(predict_rows(bundle, paths, attributions=False))
    assert [r["path"] for r in rows] == paths
    overflow = [r for r in rows if "error" in r]
    assert overflow and all(set(r) == {"path", "error"} and "not finite" in r["error"] for r in overflow)
    assert all(r["label"] is not None for r in rows if "error" not in r)


def test_a_bundle_path_that_is_a_file_is_named_as_such(tmp_path: Path, capsys) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert main(["predict", "--bundle", str(tmp_path / "model.safetensors"), str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{tmp_path / 'model.safetensors'} is a file, not a bundle" in err


def _images(folder: Path, n: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_shape_u8(i, size)).save(folder / f"img{i}.png")
    return folder


def test_rows_go_to_stdout_while_the_progress_bar_is_on_a_terminal(calibrated_run, tmp_path: Path) -> None:
    # rich's live display took sys.stdout over and printed every row on stderr: on a terminal,
    # `eexit predict ... > rows.jsonl` left the file empty
    import pty

    size = load_bundle(calibrated_run["bundle"]).input_size[0]
    folder = _images(tmp_path / "imgs", 5, size)
    main_fd, terminal = pty.openpty()
    try:
        command = [sys.executable, "-m", "eexit.cli", "predict", "--bundle", calibrated_run["bundle"], str(folder)]
        proc = subprocess.run(
            [*command, "--batch-size", "2", "--no-attributions"],  # 5 inputs > one batch: the bar is shown
            stdout=subprocess.PIPE,
            stderr=terminal,
            stdin=subprocess.DEVNULL,
            timeout=300,
            env={**os.environ, "COLUMNS": "80"},
        )
    finally:
        os.close(terminal)
        os.close(main_fd)
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert proc.returncode == 0 and [Path(r["path"]).name for r in rows] == [f"img{i}.png" for i in range(5)]


def test_two_runs_cannot_write_figures_into_one_explain_folder(calibrated_run, tmp_path: Path, capsys) -> None:
    import fcntl

    size = load_bundle(calibrated_run["bundle"]).input_size[0]
    folder, out = _images(tmp_path / "imgs", 2, size), tmp_path / "explain"
    out.mkdir()
    with open(out / ".eexit-predict.lock", "a+b") as other:  # another run holds the folder
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["predict", "--bundle", calibrated_run["bundle"], str(folder), "--explain", str(out)]) == 2
        assert "is being written by another eexit predict run" in capsys.readouterr().err
        assert capsys.readouterr().out == "" and not [p for p in out.iterdir() if not p.name.startswith(".")]
    assert main(["predict", "--bundle", calibrated_run["bundle"], str(folder), "--explain", str(out)]) == 0


def test_an_explain_folder_that_cannot_be_locked_is_written_unguarded(
    calibrated_run, tmp_path: Path, monkeypatch, caplog, capsys
) -> None:
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")  # NFS without lockd

    monkeypatch.setattr(fcntl, "flock", no_locks)
    size = load_bundle(calibrated_run["bundle"]).input_size[0]
    folder, out = _images(tmp_path / "imgs", 2, size), tmp_path / "explain"
    with caplog.at_level(logging.WARNING, logger="eexit.serve.predict"):
        assert main(["predict", "--bundle", calibrated_run["bundle"], str(folder), "--explain", str(out)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert any("cannot be locked" in r.getMessage() for r in caplog.records)


def test_a_figure_that_fails_to_write_leaves_no_file_under_its_name(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    from eexit.explain import figures

    def half_then_fail(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG\r\n")  # what a full disk leaves
        raise OSError(28, "No space left on device")

    fig = figures.attribution_bars({"attention_entropy": 0.5, "confidence_margin": -0.25}, "why")
    long_name = tmp_path / ("x" * 240 + "_attr.png")  # a name the file system takes: so does the save
    assert figures.save(fig, long_name) == long_name and long_name.stat().st_size > 1000
    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(OSError, match=r"No space left on device: '.*a_attr\.png'"):  # the figure's name
        figures.save(fig, tmp_path / "a_attr.png")
    assert list(tmp_path.iterdir()) == [long_name]


def test_ctrl_c_ends_predict_with_130_and_no_traceback(calibrated_run, tmp_path: Path, monkeypatch, capsys) -> None:
    import eexit.serve.predict as serve_predict

    def interrupted(*args, **kwargs):
        yield {"path": "first.png", "error": "whatever"}
        raise KeyboardInterrupt

    monkeypatch.setattr(serve_predict, "predict_rows", interrupted)
    size = load_bundle(calibrated_run["bundle"]).input_size[0]
    folder = _images(tmp_path / "imgs", 1, size)
    assert main(["predict", "--bundle", calibrated_run["bundle"], str(folder)]) == 130
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ['{"path": "first.png", "error": "whatever"}']  # rows so far stand
    assert captured.err.strip().endswith("interrupted") and "Traceback" not in captured.err


def test_sigterm_ends_predict_with_143_and_whole_rows(calibrated_run, tmp_path: Path) -> None:
    # with SIGTERM's default action the rows still in stdout's buffer were lost, the last one cut
    import signal
    import time

    size = load_bundle(calibrated_run["bundle"]).input_size[0]
    folder = _images(tmp_path / "imgs", 1000, size)
    out = tmp_path / "rows.jsonl"
    command = [sys.executable, "-m", "eexit.cli", "predict", "--bundle", calibrated_run["bundle"], str(folder)]
    with out.open("wb") as stdout:
        child = subprocess.Popen([*command, "--batch-size", "1"], stdout=stdout, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while out.stat().st_size == 0 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until the first buffer of rows reached the file: mid-run
        child.send_signal(signal.SIGTERM)
        err = child.stderr.read().decode()
        assert child.wait(timeout=120) == 128 + signal.SIGTERM, err
    text = out.read_text()
    rows = [_strict_json(line) for line in text.splitlines()]
    assert text.endswith("\n") and 0 < len(rows) < 1000
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in folder.iterdir())[: len(rows)]
    assert err.strip().endswith("terminated") and "Traceback" not in err


def test_progress_is_reported_per_batch_and_per_image_when_figures_are_written(calibrated_run, tmp_path: Path) -> None:
    from eexit.serve.predict import predict_rows

    bundle = load_bundle(calibrated_run["bundle"])
    paths = [str(p) for p in sorted(_images(tmp_path / "imgs", 5, bundle.input_size[0]).iterdir())]
    calls: list[int] = []
    rows = list(predict_rows(bundle, paths, batch_size=2, attributions=False, on_batch=calls.append))
    assert len(rows) == 5 and calls == [2, 2, 1]
    calls.clear()
    list(predict_rows(bundle, paths[:3], batch_size=2, explain_dir=tmp_path / "ex", on_batch=calls.append))
    assert calls == [1, 1, 1]  # the figures take a while: the bar moves with each image


def _served_batch(bundle, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, bundle.channels, *bundle.input_size, generator=g)


@pytest.mark.parametrize("kind", ["gate", "staged"])
def test_threads_sharing_a_bundle_route_and_explain_as_one_thread_does(calibrated_run, kind: str) -> None:
    # a server's thread pool: Captum's DeepLift hooked the router's own module and kept its
    # tensors on it for the length of a call; two threads explaining at once (or one routing
    # while another explained) mixed them up: most calls failed, some returned wrong attributions
    from concurrent.futures import ThreadPoolExecutor

    from eexit.routing.decisions import attribute_output

    bundle = load_bundle(calibrated_run["bundle"])
    routed = bundle.routed(kind)
    batches = [_served_batch(bundle, 1 + i % 5, seed=i) for i in range(24)]
    outs = [routed(x) for x in batches]
    expected = [attribute_output(bundle.calibration, kind, o) for o in outs]

    def explain(i: int):
        routed(batches[i % 24])  # routing beside the explanations, on the same router
        return attribute_output(bundle.calibration, kind, outs[i % 24])

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(explain, range(240)))
    for i, got in enumerate(results):
        want = expected[i % 24]
        assert torch.allclose(got.attributions, want.attributions, atol=1e-6), i
        assert torch.allclose(got.delta, want.delta, atol=1e-6), i


def test_routing_and_explaining_under_a_callers_autocast_run_in_float32(calibrated_run) -> None:
    # a server wrapping its handlers in bfloat16 autocast: the routed engine failed with an
    # index_put dtype mismatch; the routers' knobs were fitted in float32
    from eexit.routing.decisions import attribute_output

    bundle = load_bundle(calibrated_run["bundle"])
    x = _served_batch(bundle, 16)
    for kind in ("gate", "staged", "cascade"):
        plain = bundle.routed(kind)(x, with_heatmap=True)
        plain_attr = attribute_output(bundle.calibration, kind, plain)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = bundle.routed(kind)(x, with_heatmap=True)
            under_attr = attribute_output(bundle.calibration, kind, under)
        assert torch.equal(under.tier, plain.tier) and torch.equal(under.logits, plain.logits), kind
        assert under.logits.dtype == torch.float32 and torch.equal(under.heatmap, plain.heatmap)
        if plain_attr is not None:
            assert torch.equal(under_attr.attributions, plain_attr.attributions)


def test_the_fused_kernels_step_aside_under_torch_compile(calibrated_run, monkeypatch) -> None:
    # Inductor's recompile for a second batch size did not expect the fused ops' output strides
    import eexit.models.inference as inference

    x = torch.zeros(2, 3, 8, 8)
    assert inference._fusable(x) == (inference._POINTWISE is not None and torch.backends.mkldnn.is_available())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not inference._fusable(x)


@pytest.mark.slow
@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="Inductor needs a C++ compiler")
def test_a_compiled_routed_classifier_takes_several_batch_sizes(calibrated_run) -> None:
    bundle = load_bundle(calibrated_run["bundle"])
    routed = bundle.routed()
    compiled = torch.compile(routed)
    for n in (7, 32):
        x = _served_batch(bundle, n, seed=n)
        got, want = compiled(x), routed(x)
        assert torch.equal(got.tier, want.tier) and torch.allclose(got.logits, want.logits, atol=1e-4)


def test_images_held_in_memory_predict_as_their_files_do(calibrated_run, tmp_path: Path) -> None:
    # a service receiving uploads: encoded bytes or PIL images, no temporary files
    from eexit.serve.images import InMemoryImage
    from eexit.serve.predict import predict_images, predict_rows

    bundle = load_bundle(calibrated_run["bundle"])
    pictures = [Image.fromarray(_shape_u8(i, 40)).convert(mode) for i, mode in enumerate(["L", "RGB", "RGBA", "P"])]
    files, encoded = [], []
    for i, im in enumerate(pictures):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        encoded.append(buf.getvalue())
        files.append(_write(tmp_path / f"img{i}.png", buf.getvalue()))
    from_files = list(predict_rows(bundle, files))
    names = [f"upload-{i}" for i in range(4)]
    for images in (encoded, pictures):
        rows = predict_images(bundle, images, names=names)
        assert [r["path"] for r in rows] == names
        for got, want in zip(rows, from_files, strict=True):
            assert {k: v for k, v in got.items() if k != "path"} == {k: v for k, v in want.items() if k != "path"}
    broken = predict_images(bundle, [encoded[0][:60], b"", b"not an image", encoded[1]])
    assert [r["path"] for r in broken] == ["image-0", "image-1", "image-2", "image-3"]
    assert ["error" in r for r in broken] == [True, True, True, False]
    assert "truncated" in broken[0]["error"] and "empty" in broken[1]["error"] and "not an image" in broken[2]["error"]
    with pytest.raises(TypeError, match=r"upload: an in-memory image is encoded bytes or a PIL image.*fromarray"):
        InMemoryImage("upload", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="1 names for 2 images"):
        predict_images(bundle, encoded[:2], names=["a"])


def test_sigterm_while_an_image_is_decoded_ends_the_run(calibrated_run, tmp_path: Path, monkeypatch, capsys) -> None:
    # the signal landed in the per-image `except Exception` that keeps the other inputs' results:
    # the run went on, with one image's error "cannot read: _Terminated"
    import signal

    import eexit.serve.predict as serve_predict

    real, calls = serve_predict.load_pixels, []

    def terminated_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve_predict, "load_pixels", terminated_on_the_third)
    folder = _images(tmp_path / "imgs", 6, load_bundle(calibrated_run["bundle"]).input_size[0])
    args = ["predict", "--bundle", calibrated_run["bundle"], str(folder), "--batch-size", "2", "--no-progress"]
    assert main(args) == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) <= 2 and "error" not in captured.out  # at most the first batch
    assert captured.err.strip().endswith("terminated")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_a_lazily_opened_png_missing_rows_is_refused_as_its_bytes_are(calibrated_run) -> None:
    # PIL zero-fills the rows of a complete image stream that ends early; the bytes were checked,
    # a PIL image opened (not yet loaded) from the same bytes was predicted on half-black pixels
    from eexit.serve.predict import predict_images

    bundle = load_bundle(calibrated_run["bundle"])
    size = bundle.input_size[0]
    short = _crafted_png(b"".join(b"\x00" + bytes(range(i, i + size)) for i in range(size // 2)), size=size)
    lazy = Image.open(io.BytesIO(short))
    rows = predict_images(bundle, [short, lazy, memoryview(bytearray(short))])
    assert all("error" in r and "bytes its rows need" in r["error"] for r in rows), rows
    whole = _crafted_png(b"".join(b"\x00" + bytes(range(i, i + size)) for i in range(size)), size=size)
    assert "error" not in predict_images(bundle, [Image.open(io.BytesIO(whole))])[0]


def test_a_dark_16_bit_image_keeps_its_16_bit_scale(tmp_path: Path) -> None:
    # all pixels 200 of 65535: nearly black, not 200 / 255 (a peak under 256 is no sign of 8-bit data)
    from eexit.serve.images import _pixels_hwc

    path = tmp_path / "dark16.png"
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint16)).save(path)
    pixels = _pixels_hwc(decode(str(path)), 1, 8)
    assert np.allclose(pixels, 200 / 65535, atol=1e-6)


def test_palette_transparency_is_composited_over_black(tmp_path: Path) -> None:
    """A palette image's tRNS alphas are honoured: a transparent entry is black, a half-transparent
    one its colour times alpha / 255 (over black), an opaque one its colour; the luma of the same."""
    from eexit.serve.images import load_pixels

    im = Image.new("P", (4, 4))
    im.putpalette([200, 100, 50, 10, 20, 30, 90, 180, 240] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2, 1] * 4)
    path = tmp_path / "palette_alpha.png"
    im.save(path, transparency=b"\x00\xff\x80")  # alphas 0, 255, 128 for entries 0, 1, 2
    half = [round(c * 128 / 255) for c in (90, 180, 240)]  # 45, 90, 120
    want_rgb = np.array([[0, 0, 0], [10, 20, 30], half, [10, 20, 30]], dtype=np.uint8)  # one row, by column
    rgb = load_pixels(str(path), 3, 4)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 4, 4)
    assert np.array_equal(rgb, np.broadcast_to(want_rgb.T[:, None, :], (3, 4, 4)))
    # ITU-R 601-2 luma of the composited colours: 0, 18, 80, 18
    luma = load_pixels(str(path), 1, 4)
    assert np.array_equal(luma, np.broadcast_to(np.array([0, 18, 80, 18], dtype=np.uint8), (1, 4, 4)))


def test_a_transparent_colour_gives_the_same_pixels_in_every_encoding(tmp_path: Path) -> None:
    """One picture with a transparent colour (PNG tRNS) saved as palette, grey, RGB and bilevel
    PNG, and as a GIF: every encoding gives the same pixels, the transparent ones black (as
    RGBA / LA alpha is composited), also at the served size, where the grey and RGB files would
    otherwise take the libpng fast path, which ignores tRNS."""
    from eexit.serve.images import load_pixels

    a = np.full((4, 4), 255, np.uint8)
    a[:2] = 100  # the top half grey 100, the bottom half white = the transparent colour
    grey = Image.fromarray(a)
    files = {
        "grey": (grey, 255),
        "palette": (grey.convert("P"), grey.convert("P").getpixel((0, 3))),
        "rgb": (grey.convert("RGB"), (255, 255, 255)),
        "gif": (grey.convert("P"), grey.convert("P").getpixel((0, 3))),
    }
    want = np.zeros((4, 4), np.uint8)
    want[:2] = 100
    for name, (im, transparent) in files.items():
        path = tmp_path / (f"{name}.gif" if name == "gif" else f"{name}.png")
        im.save(path, transparency=transparent)
        for channels in (1, 3):
            got = load_pixels(str(path), channels, 4)
            assert got.shape == (channels, 4, 4), name
            assert np.array_equal(got, np.broadcast_to(want, got.shape)), (name, channels, got[0])
    bilevel = Image.fromarray(a > 128).convert("1")  # white = transparent
    bilevel.save(tmp_path / "bilevel.png", transparency=1)
    assert not load_pixels(str(tmp_path / "bilevel.png"), 1, 4).any()  # black, and white made black
    wide = Image.fromarray(a.astype(np.uint16) * 257)  # 16-bit grey, white = 65535 transparent
    wide.save(tmp_path / "wide.png", transparency=65535)
    assert np.allclose(load_pixels(str(tmp_path / "wide.png"), 1, 4)[0], want / 255.0, atol=1e-6)
    # without a transparent colour nothing changes: white stays white
    grey.save(tmp_path / "plain.png")
    assert np.array_equal(load_pixels(str(tmp_path / "plain.png"), 1, 4)[0], a)


def test_exif_orientation_in_a_png_raw_profile_text_chunk_is_applied(tmp_path: Path) -> None:
    """EXIF stored ImageMagick's way, in a PNG text chunk 'Raw profile type exif' (no eXIf chunk),
    rotates the image as it says: orientation 6 is a quarter turn clockwise."""
    from PIL import PngImagePlugin

    from eexit.serve.images import load_pixels

    exif = Image.Exif()
    exif[0x0112] = 6
    raw = exif.tobytes()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(raw):8d}\n{raw.hex()}\n")
    stored = (np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3).astype(np.uint8)  # 4 rows x 6 cols
    Image.fromarray(stored).save(tmp_path / "wide.png", pnginfo=info)
    shown = decode(str(tmp_path / "wide.png"))
    assert shown.size == (4, 6)  # width x height: turned upright
    assert np.array_equal(np.asarray(shown), np.rot90(stored, k=-1))
    # at the served size (where an EXIF-less PNG would take the libpng fast path), rotated too
    square = (np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5).astype(np.uint8)
    Image.fromarray(square).save(tmp_path / "square.png", pnginfo=info)
    got = load_pixels(str(tmp_path / "square.png"), 3, 4)
    assert np.array_equal(got, np.rot90(square, k=-1).transpose(2, 0, 1))


def test_centre_crop_offsets_round_as_torchvision_does(tmp_path: Path) -> None:
    """An odd margin of 3 pixels: the crop starts at round(3 / 2) = 2 (torchvision's
    ``center_crop``), not at 3 // 2 = 1, along the width and along the height."""
    from torchvision.transforms import functional as tf

    from eexit.serve.images import load_pixels

    # 4 x 7, no resize needed: the crop keeps columns 2..5, whose values are 60, 90, 120, 150
    columns = np.tile(np.arange(7, dtype=np.uint8) * 30, (4, 1))
    Image.fromarray(columns).save(tmp_path / "columns.png")
    got = load_pixels(str(tmp_path / "columns.png"), 1, 4)[0]
    assert np.array_equal(got, np.tile(np.array([60, 90, 120, 150], dtype=np.uint8), (4, 1)))
    ref = np.asarray(tf.center_crop(tf.resize(Image.fromarray(columns), 4), 4))
    assert np.array_equal(got, ref)
    # 14 rows x 8 columns: resized to 7 x 4, then 3 rows to crop: it starts at row 2
    rows = np.add.outer(np.arange(14) * 17, np.arange(8) * 2).astype(np.uint8)
    Image.fromarray(rows).save(tmp_path / "rows.png")
    got = load_pixels(str(tmp_path / "rows.png"), 1, 4)[0]
    resized = np.asarray(Image.fromarray(rows).resize((4, 7), Image.Resampling.BILINEAR))
    assert np.array_equal(got, resized[2:6])
    ref = np.asarray(tf.center_crop(tf.resize(Image.fromarray(rows), 4), 4))
    assert np.array_equal(got, ref)


def test_a_quoted_recursive_glob_reaches_every_depth_and_an_existing_name_is_no_pattern(tmp_path: Path) -> None:
    """A quoted ``**`` glob matches files at any depth (the shell's globstar); an existing file
    whose name holds glob characters (``photo[1].png``) is that file, not the pattern it also
    spells (which would match ``photo1.png``)."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("top.png", "a/mid.png", "a/b/deep.png", "photo[1].png", "photo1.png"):
        (tmp_path / rel).write_bytes(b"x")
    every = [str(tmp_path / r) for r in ("a/b/deep.png", "a/mid.png", "photo1.png", "photo[1].png", "top.png")]
    assert expand_inputs([str(tmp_path / "**" / "*.png")]) == every
    assert expand_inputs([str(tmp_path / "photo[1].png")]) == [str(tmp_path / "photo[1].png")]


def test_the_orientation_tag_of_a_tiff_is_applied(tmp_path: Path) -> None:
    """A TIFF holds its orientation as a tag (no EXIF block in ``info``): orientation 6, a quarter
    turn clockwise, is applied as a JPEG's is."""
    stored = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6) * 10
    Image.fromarray(stored).save(tmp_path / "turned.tif", tiffinfo={274: 6})
    shown = decode(str(tmp_path / "turned.tif"))
    assert shown.size == (4, 6) and np.array_equal(np.asarray(shown), np.rot90(stored, k=-1))


def test_held_pil_images_without_pixels_or_past_twice_the_bomb_limit_are_refused(monkeypatch) -> None:
    """A PIL image a caller holds gets a file's checks: a 0 x 4 image has no pixels, one over twice
    Pillow's pixel limit is too large (as Pillow refuses such a file); both are ``ImageError``s."""
    from eexit.serve.images import InMemoryImage, load_pixels

    with pytest.raises(ImageError, match=r"empty: image has no pixels \(0x4\)"):
        load_pixels(InMemoryImage("empty", Image.new("L", (0, 4))), 1, 4)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="big: image too large: 400 pixels"):
        load_pixels(InMemoryImage("big", Image.new("L", (20, 20))), 1, 4)
    assert load_pixels(InMemoryImage("fine", Image.new("L", (14, 14))), 1, 4).shape == (1, 4, 4)  # 196 <= 200


def test_float_and_32_bit_images_at_the_top_of_their_scale_are_white(tmp_path: Path) -> None:
    """A float image whose peak is exactly 1.0 is on the 0-1 scale and a 32-bit integer image whose
    peak is exactly 255 on the 0-255 scale: both are white (not 1 / 255, not 255 / 65535)."""
    from eexit.serve.images import load_pixels

    Image.fromarray(np.full((4, 4), 1.0, np.float32)).save(tmp_path / "one.tif")
    Image.fromarray(np.full((4, 4), 255, np.int32)).save(tmp_path / "i255.tif")
    assert Image.open(tmp_path / "i255.tif").mode == "I"
    for name in ("one.tif", "i255.tif"):
        assert np.allclose(load_pixels(str(tmp_path / name), 1, 4), 1.0), name


def test_training_pixels_of_a_float_image_with_nan_or_infinity_are_defined() -> None:
    """``to_model_mode`` (the training decode) holds no NaN in 8 bits: NaN and -inf are black, +inf
    white, finite pixels keep their scale."""
    from eexit.serve.images import to_model_mode

    f = np.array([[np.nan, np.inf], [-np.inf, 0.5]], np.float32)
    assert np.array_equal(np.asarray(to_model_mode(Image.fromarray(f), 1)), [[0, 255], [0, 128]])


def test_an_unexpected_error_decoding_one_input_becomes_its_error_line(
    calibrated_run, tmp_path: Path, monkeypatch
) -> None:
    """An exception that is no ``ImageError`` (a decoder bug, say) costs only its own input: its
    row names the exception, the other inputs are predicted."""
    import eexit.serve.predict as serve_predict

    bundle = load_bundle(calibrated_run["bundle"])
    paths = [str(p) for p in sorted(_images(tmp_path / "imgs", 3, bundle.input_size[0]).iterdir())]
    real = serve_predict.load_pixels

    def flaky(source, *args):
        if source == paths[1]:
            raise RuntimeError("decoder bug")
        return real(source, *args)

    monkeypatch.setattr(serve_predict, "load_pixels", flaky)
    rows = list(serve_predict.predict_rows(bundle, paths, attributions=False))
    assert [r["path"] for r in rows] == paths
    assert rows[1] == {"path": paths[1], "error": "cannot read: RuntimeError: decoder bug"}
    assert rows[0]["label"] is not None and rows[2]["label"] is not None


def test_rows_round_their_floats_to_nine_significant_digits(calibrated_run, tmp_path: Path) -> None:
    """The floats of predict's rows carry ``ROW_DIGITS`` (9) significant digits: each is the full
    value rounded, not its 17-digit float64 text."""
    from eexit.serve.predict import ROW_DIGITS, predict_rows

    bundle = load_bundle(calibrated_run["bundle"])
    paths = [str(p) for p in sorted(_images(tmp_path / "imgs", 3, bundle.input_size[0]).iterdir())]
    rows, full = list(predict_rows(bundle, paths)), list(predict_rows(bundle, paths, digits=None))
    assert ROW_DIGITS == 9

    def rounded(v: float) -> float:
        return float(f"{v:.9g}")

    for r, f in zip(rows, full, strict=True):
        for key in ("probability", "confidence"):
            assert r[key] == rounded(f[key]), key
        for key in ("features", "attributions"):
            assert r[key] == {k: rounded(v) for k, v in f[key].items()}, key


def test_predict_rows_refuses_an_unknown_router_and_an_empty_batch(calibrated_run, tmp_path: Path) -> None:
    """``predict_rows`` checks its arguments before any image is read, with messages naming them."""
    from eexit.serve.predict import predict_rows

    bundle = load_bundle(calibrated_run["bundle"])
    paths = [str(p) for p in _images(tmp_path / "imgs", 1, bundle.input_size[0]).iterdir()]
    with pytest.raises(ValueError, match=r"unknown router 'fast'; this bundle has \['cascade', 'gate', 'staged'\]"):
        list(predict_rows(bundle, paths, router="fast"))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        list(predict_rows(bundle, paths, batch_size=0))


def test_a_figure_whose_drawing_raises_a_value_error_is_that_figures_error(
    calibrated_run, tmp_path: Path, monkeypatch
) -> None:
    """A ``ValueError`` drawing one figure (matplotlib refusing some data) is reported in the row's
    ``explanation_error``; the other figures are written and the row keeps its decision."""
    from eexit.explain import figures
    from eexit.serve.predict import predict_rows

    def refused(*args, **kwargs):
        raise ValueError("no data to draw")

    monkeypatch.setattr(figures, "radar_chart", refused)
    bundle = load_bundle(calibrated_run["bundle"])
    paths = [str(p) for p in _images(tmp_path / "imgs", 1, bundle.input_size[0]).iterdir()]
    (row,) = predict_rows(bundle, paths, router="gate", explain_dir=tmp_path / "ex", attributions=True)
    assert row["label"] is not None and set(row["explanation"]) == {"cam", "attributions"}
    assert row["explanation_error"] == "radar: ValueError: no data to draw"


def test_no_attributions_leaves_them_out_of_the_rows(calibrated_run, tmp_path: Path, capsys) -> None:
    """``--no-attributions`` skips Captum: the rows' ``attributions`` and ``attribution_delta`` are null."""
    folder = _images(tmp_path / "imgs", 2, load_bundle(calibrated_run["bundle"]).input_size[0])
    assert main(["predict", "--bundle", calibrated_run["bundle"], str(folder), "--no-attributions"]) == 0
    rows = [_strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all(r["attributions"] is None and r["attribution_delta"] is None for r in rows)
    assert all(len(r["features"]) == 7 for r in rows)


def test_tier_takes_an_exit_index_or_a_name_in_any_case() -> None:
    """``--tier`` reads ``0``-``3`` as exit indices and names in any case, as its lower-case key."""
    from eexit.cli import build_parser

    def tier(text: str) -> str:
        return build_parser().parse_args(["predict", "--bundle", "b", "x", "--tier", text]).tier

    assert [tier(t) for t in ("0", "3", "Medium", "LIGHT")] == ["tiny", "heavy", "medium", "light"]


def test_the_progress_bar_shows_past_one_batch_or_from_two_explained_inputs_unless_turned_off(
    calibrated_run, tmp_path: Path, capsys
) -> None:
    """Off a terminal, rows and bar apart: the bar (on stderr) shows when the inputs fill more than
    one batch, or from 2 inputs with ``--explain`` (figures take a while); never with ``--no-progress``."""
    folder = _images(tmp_path / "imgs", 2, load_bundle(calibrated_run["bundle"]).input_size[0])
    base = ["predict", "--bundle", calibrated_run["bundle"], str(folder), "--no-attributions"]

    def bar(*extra: str) -> bool:
        assert main([*base, *extra]) == 0
        return "2/2" in capsys.readouterr().err

    assert not bar()  # one batch: the rows themselves show the progress
    assert bar("--batch-size", "1")
    assert not bar("--batch-size", "1", "--no-progress")
    assert bar("--explain", str(tmp_path / "ex"))


def test_a_callers_own_sigterm_handler_is_left_in_place(monkeypatch) -> None:
    """``main`` turns SIGTERM into a clean stop only where it has its default action: a program
    that calls ``main`` with a handler of its own keeps receiving the signal."""
    import signal

    import eexit.cli as cli

    seen = []
    monkeypatch.setattr(cli, "_models", lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0)

    def own(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        assert cli.main(["models"]) == 0
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [own]


def test_a_non_finite_image_after_a_broken_file_in_one_batch_costs_only_its_own_row(
    calibrated_run, tmp_path: Path
) -> None:
    """In one batch [broken, good, NaN, good] each row keeps its own image: the broken file's
    error, a decision, the non-finite error, a decision equal to that image's alone."""
    from eexit.serve.predict import predict_rows

    bundle = load_bundle(calibrated_run["bundle"])
    size = bundle.input_size[0]
    folder = _images(tmp_path / "imgs", 2, size)
    nan = np.full((size, size), 0.5, np.float32)
    nan[0, 0] = np.nan
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths = [
        str(tmp_path / "broken.png"),
        str(folder / "img0.png"),
        str(tmp_path / "nan.tif"),
        str(folder / "img1.png"),
    ]
    rows = list(predict_rows(bundle, paths, batch_size=4, attributions=False))
    assert [r["path"] for r in rows] == paths
    assert "not an image" in rows[0]["error"] and "non-finite" in rows[2]["error"]
    alone = list(predict_rows(bundle, [paths[1], paths[3]], batch_size=1, attributions=False))
    for got, want in zip((rows[1], rows[3]), alone, strict=True):
        assert (got["label_index"], got["tier"]) == (want["label_index"], want["tier"])
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)


def test_an_overflowing_image_does_not_shift_the_next_images_decision(calibrated_run, tmp_path: Path) -> None:
    """An image whose logits overflow gets its error row; the image after it in the batch keeps its
    own decision (a black image stays finite under a tiny std: (0 - 0) / std = 0)."""
    from eexit.serve.predict import predict_rows

    bundle = load_bundle(calibrated_run["bundle"])
    size = bundle.input_size[0]
    assert bundle.mean == [0.0]
    Image.fromarray(_shape_u8(1, size)).save(tmp_path / "a_shape.png")
    Image.fromarray(np.zeros((size, size), np.uint8)).save(tmp_path / "b_black.png")
    paths = [str(tmp_path / "a_shape.png"), str(tmp_path / "b_black.png")]
    (black,) = predict_rows(bundle, paths[1:], attributions=False)
    bundle.manifest["input"]["std"] = [1e-38] * len(bundle.std)  # the shape overflows the network
    rows = list(predict_rows(bundle, paths, attributions=False))
    assert set(rows[0]) == {"path", "error"} and "not finite" in rows[0]["error"]
    assert (rows[1]["label_index"], rows[1]["tier"]) == (black["label_index"], black["tier"])


def test_two_images_of_one_name_in_two_folders_get_figures_of_their_own(calibrated_run, tmp_path: Path) -> None:
    """Figures are named by the input's position in the run and its name: ``a/x.png`` and
    ``b/x.png`` do not overwrite each other's figures."""
    from eexit.serve.predict import predict_rows

    bundle = load_bundle(calibrated_run["bundle"])
    size = bundle.input_size[0]
    for i, sub in enumerate(("a", "b")):
        (tmp_path / sub).mkdir()
        Image.fromarray(_shape_u8(i, size)).save(tmp_path / sub / "x.png")
    paths = [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")]
    rows = list(predict_rows(bundle, paths, router="gate", explain_dir=tmp_path / "ex"))
    cams = [r["explanation"]["cam"] for r in rows]
    assert [Path(c).name for c in cams] == ["000000_x_cam.png", "000001_x_cam.png"]
    assert all(Path(c).is_file() for c in cams)


def test_figure_names_keep_the_safe_characters_of_the_image_name() -> None:
    """A figure's name is the input's position and its file name's stem, reduced to letters,
    digits, ``.``, ``_`` and ``-`` (other runs become ``_``), at most 60 of them; an input without
    a name (an in-memory image named ``""``) is ``image``."""
    from eexit.serve.predict import _safe_name

    assert _safe_name(7, "/photos/caf\u00e9 au lait!.jpeg") == "000007_caf_au_lait_"
    assert _safe_name(12, "/p/" + "x" * 80 + ".png") == "000012_" + "x" * 60
    assert _safe_name(0, "") == "000000_image"
