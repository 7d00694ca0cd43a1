"""Tests for runtimes.imageio: reading, writing, round trips, failure modes."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from pathlib import Path

import numpy as np
import png
import pytest
from optional_deps import need
from conftest import SHARED_DIR
import torch
from PIL import Image as PILImage
from PIL import ImageOps

from runtimes.imageio import (
    Image,
    ImageReadError,
    from_tensor,
    read_image,
    to_tensor,
    write_image,
)

REAL_INPUTS = SHARED_DIR / "data" / "real_inputs"
needs_real_inputs = pytest.mark.skipif(
    not REAL_INPUTS.is_dir(), reason=f"shared real inputs not found at {REAL_INPUTS}"
)

#: (mode, bit depth) we expect for the known shared inputs.
EXPECTED = {
    "00003.png": ("RGB", 8),
    "00017_gray.png": ("L", 8),
    "0014.jpg": ("RGB", 8),
    "OST_009.png": ("RGB", 8),
    "children-alpha.png": ("RGBA", 8),
    "tree_alpha_16bit.png": ("RGBA", 16),
    "wolf_gray.jpg": ("L", 8),
}


def real_input(name: str) -> Path:
    return REAL_INPUTS / name


def levels(image: Image) -> np.ndarray:
    """Integer levels (H, W, 3 or 4) of an Image, for exact comparisons."""
    planes = image.rgb if image.alpha is None else np.dstack([image.rgb, image.alpha])
    return np.rint(planes.astype(np.float64) * (2**image.bit_depth - 1)).astype(np.int64)


def pil_array(path: Path) -> np.ndarray:
    with PILImage.open(path) as pil:
        return np.asarray(pil)


def random_levels(shape: tuple[int, ...], bit_depth: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**bit_depth, size=shape)


# --------------------------------------------------------------------------
# Real inputs
# --------------------------------------------------------------------------


@needs_real_inputs
@pytest.mark.parametrize(
    "name", sorted(p.name for p in REAL_INPUTS.iterdir()) if REAL_INPUTS.is_dir() else ["absent"]
)
def test_reads_every_real_input(name: str) -> None:
    path = real_input(name)
    if name == "LICENSE":
        with pytest.raises(ImageReadError, match="LICENSE"):
            read_image(path)
        return
    image = read_image(path)
    assert image.rgb.dtype == np.float32 and image.rgb.ndim == 3 and image.rgb.shape[2] == 3
    assert 0.0 <= image.rgb.min() and image.rgb.max() <= 1.0
    assert image.path == path
    if image.alpha is not None:
        assert image.alpha.dtype == np.float32 and image.alpha.shape == image.rgb.shape[:2]
    if name in EXPECTED:
        assert (image.mode, image.bit_depth) == EXPECTED[name]
    if image.mode in ("L", "LA"):
        assert np.array_equal(image.rgb[..., 0], image.rgb[..., 1])
        assert np.array_equal(image.rgb[..., 0], image.rgb[..., 2])


@needs_real_inputs
def test_16bit_png_keeps_low_byte() -> None:
    path = real_input("tree_alpha_16bit.png")
    image = read_image(path)
    lv = levels(image)
    # Pillow truncates this file to its high bytes; ours must agree on those
    # (same orientation, channel order) and carry genuine low bytes as well.
    assert np.array_equal(lv >> 8, pil_array(path))
    assert np.unique(lv & 0xFF).size > 200
    assert (lv % 257 != 0).mean() > 0.5  # not 8-bit values scaled by 257


@needs_real_inputs
def test_16bit_real_roundtrip_exact(tmp_path: Path) -> None:
    image = read_image(real_input("tree_alpha_16bit.png"))
    out = tmp_path / "tree.png"
    write_image(out, image)
    again = read_image(out)
    assert (again.mode, again.bit_depth) == ("RGBA", 16)
    assert np.array_equal(levels(again), levels(image))


@needs_real_inputs
@pytest.mark.parametrize("name", ["00017_gray.png", "wolf_gray.jpg"])
def test_grey_real_roundtrip_exact(tmp_path: Path, name: str) -> None:
    out = tmp_path / "grey.png"
    write_image(out, read_image(real_input(name)))
    with PILImage.open(out) as written:
        assert written.mode == "L"
    expected = np.asarray(ImageOps.exif_transpose(PILImage.open(real_input(name))))
    assert np.array_equal(pil_array(out), expected)


@needs_real_inputs
def test_rgba_real_alpha_preserved(tmp_path: Path) -> None:
    out = tmp_path / "alpha.png"
    write_image(out, read_image(real_input("children-alpha.png")))
    written = pil_array(out)
    assert written.shape[2] == 4
    assert np.array_equal(written, pil_array(real_input("children-alpha.png")))


# --------------------------------------------------------------------------
# Synthetic round trips
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
@pytest.mark.parametrize("bit_depth", [8, 16])
def test_png_roundtrip_exact_every_mode(tmp_path: Path, mode: str, bit_depth: int) -> None:
    channels = len(mode)
    lv = random_levels((9, 14, channels), bit_depth)
    scale = 2**bit_depth - 1
    colour = lv[..., :1].repeat(3, axis=2) if mode in ("L", "LA") else lv[..., :3]
    alpha = lv[..., -1] / scale if mode.endswith("A") else None
    image = Image(rgb=colour / scale, alpha=alpha, mode=mode, bit_depth=bit_depth)  # type: ignore[arg-type]
    out = tmp_path / f"{mode}{bit_depth}.png"
    write_image(out, image)
    again = read_image(out)
    assert (again.mode, again.bit_depth) == (mode, bit_depth)
    assert np.array_equal(levels(again), levels(image))


def test_grey_write_uses_bt601_luma(tmp_path: Path) -> None:
    rgb = np.zeros((1, 3, 3), np.float32)
    rgb[0, 0] = (1, 0, 0)
    rgb[0, 1] = (0, 1, 0)
    rgb[0, 2] = (0, 0, 1)
    out = tmp_path / "luma.png"
    write_image(out, Image(rgb=rgb, alpha=None, mode="L", bit_depth=8))
    assert pil_array(out).tolist() == [[76, 150, 29]]  # rint(255 * (.299, .587, .114))


def test_write_rounds_instead_of_truncating(tmp_path: Path) -> None:
    lv = random_levels((6, 7, 3), 8)
    jitter = np.random.default_rng(1).uniform(-0.45, 0.45, size=lv.shape)
    rgb = (lv + jitter) / 255.0
    rgb[0, 0] = (-0.2, 1.3, 0.5)  # out-of-range model output is clamped
    out = tmp_path / "round.png"
    write_image(out, Image(rgb=rgb, alpha=None, mode="RGB", bit_depth=8))
    expected = lv.copy()
    expected[0, 0] = (0, 255, 128)
    assert np.array_equal(pil_array(out), expected)


def test_palette_with_transparency_becomes_rgba(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    pil = PILImage.new("P", (4, 3), 1)
    pil.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pil.putpixel((0, 0), 0)
    pil.save(path, transparency=0)
    image = read_image(path)
    assert image.mode == "RGBA"
    assert image.alpha is not None and image.alpha[0, 0] == 0.0 and image.alpha[1, 1] == 1.0
    assert image.rgb[1, 1].tolist() == [0.0, 1.0, 0.0]


def test_16bit_png_with_sbit_keeps_its_range(tmp_path: Path) -> None:
    """pypng rescales to the sBIT depth; values must still span [0, 1]."""
    twelve = random_levels((4, 6, 3), 12)
    sixteen = (twelve << 4) | (twelve >> 8)  # the PNG spec's left-bit-replication
    plain = tmp_path / "plain.png"
    write_image(plain, Image(rgb=sixteen / 65535, alpha=None, mode="RGB", bit_depth=16))
    chunks = list(png.Reader(filename=plain).chunks())
    chunks.insert(1, (b"sBIT", bytes([12, 12, 12])))  # right after IHDR
    marked = tmp_path / "sbit.png"
    with marked.open("wb") as fh:
        png.write_chunks(fh, chunks)
    image = read_image(marked)
    assert image.bit_depth == 16
    np.testing.assert_array_equal(np.rint(image.rgb.astype(np.float64) * 4095), twelve)


def test_16bit_grey_tiff_full_precision(tmp_path: Path) -> None:
    lv = random_levels((5, 6), 16).astype(np.uint16)
    path = tmp_path / "grey16.tif"
    PILImage.fromarray(lv).save(path)
    image = read_image(path)
    assert (image.mode, image.bit_depth) == ("L", 16)
    assert np.array_equal(levels(image)[..., 0], lv)


def test_16bit_colour_tiff_refused(tmp_path: Path) -> None:
    tifffile = need("tifffile", "tifffile is not installed (scikit-image brings it: pip install 'esc-deploy[all]')")
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, random_levels((5, 6, 3), 16).astype(np.uint16))
    with pytest.raises(ImageReadError, match="truncate"):
        read_image(path)


# --------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------


def test_jpeg_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:, :8] = 255  # left half white, as stored
    exif = PILImage.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    PILImage.fromarray(stored).save(path, exif=exif, quality=100)
    image = read_image(path)
    assert image.rgb.shape == (16, 8, 3)
    # Clockwise rotation puts the stored left column on top.
    assert image.rgb[:6].mean() > 0.9 and image.rgb[10:].mean() < 0.1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16bit_orientation_matches_pillow(tmp_path: Path, orientation: int) -> None:
    lv = random_levels((3, 5), 16).astype(np.uint16)
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented16.png"
    PILImage.fromarray(lv).save(path, exif=exif)  # Pillow writes I;16 as 16-bit grey PNG
    with PILImage.open(path) as pil:
        assert pil.getexif().get(0x0112) == orientation  # the tag really is in the file
        expected = np.asarray(ImageOps.exif_transpose(pil))
    assert expected.shape == ((5, 3) if orientation >= 5 else (3, 5))
    image = read_image(path)
    assert image.bit_depth == 16
    assert np.array_equal(levels(image)[..., 0], expected)


# --------------------------------------------------------------------------
# Failure modes
# --------------------------------------------------------------------------


def test_not_an_image_raises(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("definitely not a PNG")
    with pytest.raises(ImageReadError, match="notes.png.*not a recognised image"):
        read_image(path)


def test_read_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(ImageReadError("a/b.png", "corrupt")))
    assert isinstance(error, ImageReadError) and isinstance(error, ValueError)
    assert str(error) == "a/b.png: corrupt" and error.reason == "corrupt"


def test_missing_file_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "absent.png")


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_truncated_png_raises(tmp_path: Path, bit_depth: int) -> None:
    whole = tmp_path / "whole.png"
    lv = random_levels((64, 64, 3), bit_depth)  # noise: does not compress away
    write_image(whole, Image(rgb=lv / (2**bit_depth - 1), alpha=None, mode="RGB", bit_depth=bit_depth))  # type: ignore[arg-type]
    data = whole.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(cut)


def test_unsupported_format_raises(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    PILImage.new("P", (2, 2)).save(path)
    with pytest.raises(ImageReadError, match="unsupported format GIF"):
        read_image(path)


def test_refuses_to_overwrite_source(tmp_path: Path) -> None:
    src = tmp_path / "src.png"
    PILImage.new("RGB", (3, 3), (1, 2, 3)).save(src)
    image = read_image(src)
    (tmp_path / "sub").mkdir()
    for same in (src, tmp_path / "sub" / ".." / "src.png"):
        with pytest.raises(ValueError, match="source"):
            write_image(same, image)
    link = tmp_path / "link.png"
    link.symlink_to(src)
    with pytest.raises(ValueError, match="source"):
        write_image(link, image)
    assert pil_array(src)[0, 0].tolist() == [1, 2, 3]
    write_image(tmp_path / "other.png", image)  # any other path is fine


@pytest.mark.parametrize(
    ("name", "mode", "bit_depth", "match"),
    [
        ("out.jpg", "RGB", 16, "only be written as PNG"),
        ("out.jpg", "RGBA", 8, "cannot write"),
        ("out.xyz", "RGB", 8, "unsupported output extension"),
    ],
)
def test_unwritable_combinations(tmp_path: Path, name: str, mode: str, bit_depth: int, match: str) -> None:
    alpha = np.ones((2, 2), np.float32) if mode == "RGBA" else None
    image = Image(rgb=np.zeros((2, 2, 3)), alpha=alpha, mode=mode, bit_depth=bit_depth)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        write_image(tmp_path / name, image)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image(rgb=np.full((4, 4, 3), 0.5), alpha=None, mode="RGB", bit_depth=8)
    existing = tmp_path / "out.png"
    existing.write_bytes(b"previous contents")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        write_image(existing, image)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert existing.read_bytes() == b"previous contents"

    # A real failure too: the destination is a directory.
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OSError):
        write_image(tmp_path / "dir.png", image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "out.png"]


def test_atomic_write_replaces_and_keeps_umask_permissions(tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    write_image(out, Image(rgb=np.zeros((2, 2, 3)), alpha=None, mode="RGB", bit_depth=8))
    assert pil_array(out).shape == (2, 2, 3)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".bmp", ".tif"])
def test_other_formats_write_and_read(tmp_path: Path, suffix: str) -> None:
    rgb = np.linspace(0, 1, 8 * 8 * 3, dtype=np.float32).reshape(8, 8, 3)
    out = tmp_path / f"out{suffix}"
    write_image(out, Image(rgb=rgb, alpha=None, mode="RGB", bit_depth=8), atomic=False)
    again = read_image(out)
    assert again.mode == "RGB" and np.abs(again.rgb - rgb).max() < 0.05


def test_image_validation() -> None:
    with pytest.raises(ValueError, match="alpha"):
        Image(rgb=np.zeros((2, 2, 3)), alpha=None, mode="RGBA", bit_depth=8)
    with pytest.raises(ValueError, match="alpha"):
        Image(rgb=np.zeros((2, 2, 3)), alpha=np.zeros((2, 2)), mode="RGB", bit_depth=8)
    with pytest.raises(ValueError, match="shape"):
        Image(rgb=np.zeros((2, 2)), alpha=None, mode="L", bit_depth=8)
    with pytest.raises(ValueError, match="bit_depth"):
        Image(rgb=np.zeros((2, 2, 3)), alpha=None, mode="RGB", bit_depth=12)  # type: ignore[arg-type]
    image = Image(rgb=np.zeros((2, 2, 3), np.float64), alpha=None, mode="RGB", bit_depth=8)
    assert image.rgb.dtype == np.float32
    assert dataclasses.replace(image, bit_depth=16).bit_depth == 16


# --------------------------------------------------------------------------
# Tensor helpers
# --------------------------------------------------------------------------


def test_tensor_roundtrip_and_clamp() -> None:
    rgb = np.random.default_rng(2).uniform(-0.5, 1.5, size=(5, 7, 3)).astype(np.float32)
    t = to_tensor(rgb)
    assert t.shape == (1, 3, 5, 7) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    back = from_tensor(t * 2 - 0.5)
    assert back.shape == (5, 7, 3) and back.dtype == np.float32
    assert back.min() >= 0.0 and back.max() <= 1.0
    assert np.array_equal(from_tensor(to_tensor(np.clip(rgb, 0, 1))), np.clip(rgb, 0, 1))
    assert np.array_equal(from_tensor(t[0]), from_tensor(t))
    with pytest.raises(ValueError, match="batch"):
        from_tensor(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError):
        to_tensor(np.zeros((4, 4)))


def test_encoded_bytes_are_a_real_png(tmp_path: Path) -> None:
    """The 16-bit writer output is readable by Pillow too (it is a valid PNG)."""
    out = tmp_path / "grey16.png"
    lv = random_levels((4, 5), 16)
    write_image(out, Image(rgb=np.repeat(lv[..., None], 3, 2) / 65535, alpha=None, mode="L", bit_depth=16))
    with PILImage.open(io.BytesIO(out.read_bytes())) as pil:
        assert np.array_equal(np.asarray(pil), lv)
