"""Model-agnostic image I/O for the super-resolution runners.

Every runner sees the same thing: an :class:`Image` whose colour is float32
RGB in [0, 1] and whose alpha, if any, is a separate float32 plane.  The
original colour mode and bit depth travel with it so that :func:`write_image`
can hand the user back a file of the same kind they gave us (a grey 16-bit
PNG stays a grey 16-bit PNG).

Design choices, and why:

* **16-bit PNG is decoded with pypng.**  Pillow opens 16-bit RGB/RGBA PNGs as
  8-bit modes and silently drops the low byte, so every PNG whose IHDR says
  bit depth 16 is decoded by pypng instead (all colour types: grey, grey +
  alpha, RGB, RGBA; tRNS and sBIT are honoured through ``asDirect``).  Pillow
  still opens the file first, which validates it and gives us its EXIF.
  16-bit *colour* TIFFs would be truncated the same way and are refused;
  16-bit grey TIFF (Pillow mode ``I;16``) is read at full precision.
* **Grey write-back uses ITU-R BT.601 luma** (0.299 R + 0.587 G + 0.114 B),
  the weights Pillow itself uses for ``convert("L")``.  A grey input is
  replicated to RGB for the model; if the model keeps it grey the weights sum
  to one and the luma is that grey exactly, and if it drifts into colour the
  result is the perceptual brightness rather than an unweighted mean.
* **Alpha is kept as its own plane.**  The runners upscale it separately (see
  ``runtimes.tiling.upscale_alpha``) and re-attach it; the writer only
  re-attaches what it is given, and an :class:`Image` whose mode has an alpha
  channel must carry one (and vice versa), so alpha cannot be lost silently.
* **Rounding, not truncation**, when going back to integers: truncation
  would bias every pixel down by half a step and break exact round trips.
* **Atomic writes**: the file is encoded in memory first (so an unsupported
  mode/format combination fails before anything touches the disk), written
  to a temporary file in the destination folder and moved into place with
  ``os.replace``, so a reader never sees a half-written output.

Metadata (ICC profile, EXIF, XMP, DPI) is not carried over: orientation is
applied to the pixels on read, so writing the EXIF back would rotate twice.
"""

from __future__ import annotations

import io
import os
import secrets
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import png
import torch
from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError

__all__ = [
    "Image",
    "ImageReadError",
    "from_tensor",
    "read_image",
    "to_tensor",
    "write_image",
]

Mode = Literal["L", "LA", "RGB", "RGBA"]
BitDepth = Literal[8, 16]

#: Formats we read and write.  Others that Pillow can open (GIF, ICO, PSD, …)
#: are refused rather than half-supported.
SUPPORTED_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "BMP", "TIFF"})
#: Pillow reports JPEGs that embed extra preview pictures (many phone and
#: camera photos) as "MPO"; their first frame is the ordinary JPEG image.
_READ_FORMATS: frozenset[str] = SUPPORTED_FORMATS | {"MPO"}

#: ITU-R BT.601 luma weights, as used by Pillow's RGB -> L conversion.
BT601_LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GREY16_MODES = ("I;16", "I;16B", "I;16L")
_EXIF_ORIENTATION = 0x0112
# Lossy encoders default to quality 75 (JPEG) / 80 (WebP), which visibly
# smears the detail a super-resolution model just produced.  4:4:4 chroma
# (subsampling=0) keeps colour edges as sharp as the luma ones.
_SAVE_OPTIONS: dict[str, dict[str, int]] = {
    "JPEG": {"quality": 95, "subsampling": 0},
    "WEBP": {"quality": 95},
}


class ImageReadError(ValueError):
    """The file exists but cannot be used as an input image.

    The message starts with the path and says why: not an image, corrupt or
    truncated, or a format/mode this toolkit does not support.  Missing or
    unreadable files raise the usual ``OSError`` subclasses instead.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageReadError], tuple[Path, str]]:
        # The default pickling replays ``self.args`` (the one message) into
        # __init__, which takes two; this keeps the error intact across
        # process pools that read images in workers.
        return type(self), (self.path, self.reason)


@dataclass
class Image:
    """A decoded image in the form every runner works with.

    Attributes:
        rgb: float32 array of shape (H, W, 3) with values in [0, 1]; grey
            sources are replicated to three channels.
        alpha: float32 array of shape (H, W) in [0, 1], or ``None`` when the
            source had no alpha.
        mode: colour mode of the source, and the mode :func:`write_image`
            writes back.
        bit_depth: bits per channel of the source (8 or 16).
        path: where the image was read from (``None`` for images made in
            memory); :func:`write_image` refuses to overwrite it.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    mode: Mode
    bit_depth: BitDepth
    path: Path | None = None

    def __post_init__(self) -> None:
        # Validate here so a malformed Image fails where it is built, not
        # deep inside a writer or a model.
        self.rgb = np.asarray(self.rgb, dtype=np.float32)
        if self.rgb.ndim != 3 or self.rgb.shape[2] != 3:
            raise ValueError(f"rgb must have shape (H, W, 3), got {self.rgb.shape}")
        if self.mode not in ("L", "LA", "RGB", "RGBA"):
            raise ValueError(f"mode must be L, LA, RGB or RGBA, got {self.mode!r}")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {self.bit_depth!r}")
        has_alpha_mode = self.mode.endswith("A")
        if self.alpha is None:
            if has_alpha_mode:
                raise ValueError(f"mode {self.mode} needs an alpha plane, got None")
        else:
            if not has_alpha_mode:
                raise ValueError(
                    f"mode {self.mode} has no alpha channel but an alpha plane was given"
                )
            self.alpha = np.asarray(self.alpha, dtype=np.float32)
            if self.alpha.shape != self.rgb.shape[:2]:
                raise ValueError(
                    f"alpha shape {self.alpha.shape} does not match rgb {self.rgb.shape[:2]}"
                )
        if self.path is not None:
            self.path = Path(self.path)

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def read_image(path: str | os.PathLike[str]) -> Image:
    """Decode ``path`` into an :class:`Image`.

    EXIF orientation is applied to the pixels, palette and other colour
    models are converted to RGB(A), and grey is replicated to RGB.

    Raises:
        ImageReadError: the file is not an image, is corrupt or truncated,
            or uses a format or mode this toolkit does not support.
        OSError: the file cannot be opened at all (missing, permissions…).
    """
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(26)
        fh.seek(0)
        try:
            pil = PILImage.open(fh)
        except UnidentifiedImageError:
            raise ImageReadError(path, "not a recognised image file") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageReadError(path, f"corrupt image header ({exc})") from exc
        except PILImage.DecompressionBombError as exc:
            raise ImageReadError(path, str(exc)) from exc
        with pil:
            if pil.format not in _READ_FORMATS:
                raise ImageReadError(
                    path,
                    f"unsupported format {pil.format}; expected one of "
                    f"{', '.join(sorted(SUPPORTED_FORMATS))}",
                )
            if pil.format != "MPO" and getattr(pil, "n_frames", 1) > 1:
                raise ImageReadError(
                    path, f"{pil.n_frames} frames/pages; only single-frame images are supported"
                )
            if _is_16bit_png(head):
                pixels, bit_depth = _decode_png16(path, pil, fh)
            else:
                pixels, bit_depth = _decode_with_pillow(path, pil)
    return _image_from_pixels(pixels, bit_depth, path)


def _is_16bit_png(head: bytes) -> bool:
    """True when the PNG IHDR (always the first chunk) declares 16 bits."""
    return len(head) >= 26 and head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and head[24] == 16


def _decode_png16(path: Path, pil: PILImage.Image, fh: BinaryIO) -> tuple[np.ndarray, BitDepth]:
    """Decode a 16-bit PNG with pypng, at full precision.

    Returns an (H, W, C) float32 array in [0, 1] (C = 1..4 planes as in the
    file, tRNS expanded to an alpha plane).  ``asDirect`` may rescale to the
    file's sBIT depth, so values are normalised by the depth it reports.
    """
    try:
        orientation = int(pil.getexif().get(_EXIF_ORIENTATION, 1))
        fh.seek(0)
        width, height, rows, info = png.Reader(file=fh).asDirect()
        data = np.array([np.asarray(row, dtype=np.uint16) for row in rows])
    except (png.Error, zlib.error, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(path, f"corrupt or truncated PNG ({exc})") from exc
    planes = int(info["planes"])
    if data.shape != (height, width * planes):
        raise ImageReadError(path, "corrupt or truncated PNG (wrong number of pixel rows)")
    pixels = data.reshape(height, width, planes).astype(np.float32)
    pixels /= float(2 ** int(info["bitdepth"]) - 1)
    return _apply_orientation(pixels, orientation), 16


def _apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Numpy equivalent of ``ImageOps.exif_transpose`` for the pypng path.

    Tag values follow the EXIF/TIFF spec; the mapping mirrors Pillow's
    (2 = mirror, 3 = 180°, 4 = flip, 5 = transpose, 6 = 90° clockwise,
    7 = transverse, 8 = 90° counter-clockwise); anything else is left as is.
    """
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, k=1),
    }
    op = ops.get(orientation)
    return pixels if op is None else np.ascontiguousarray(op(pixels))


def _decode_with_pillow(path: Path, pil: PILImage.Image) -> tuple[np.ndarray, BitDepth]:
    """Decode any non-16-bit-PNG input with Pillow.

    Returns (H, W, C) float32 in [0, 1] with C = 1 (L), 2 (LA), 3 (RGB) or
    4 (RGBA), and the source bit depth.
    """
    if pil.format == "TIFF" and pil.mode not in _GREY16_MODES:
        bits_per_sample = pil.tag_v2.get(258, 8)  # BitsPerSample: int or per-channel tuple
        if max(np.atleast_1d(bits_per_sample)) > 8:
            raise ImageReadError(
                path,
                f"TIFF with {bits_per_sample} bits per sample in mode {pil.mode} is not "
                "supported (Pillow would truncate it to 8 bits); save it as a 16-bit PNG",
            )
    try:
        oriented = ImageOps.exif_transpose(pil)
        normalised = _normalise_mode(oriented)
        array = np.asarray(normalised)
    except PILImage.DecompressionBombError as exc:
        raise ImageReadError(path, str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(path, f"corrupt or truncated image ({exc})") from exc
    if normalised.mode not in ("L", "LA", "RGB", "RGBA", *_GREY16_MODES):
        raise ImageReadError(path, f"unsupported colour mode {pil.mode}")
    if array.dtype == np.uint8:
        bit_depth: BitDepth = 8
        pixels = array.astype(np.float32) / 255.0
    else:
        bit_depth = 16
        pixels = array.astype(np.float32) / 65535.0
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return pixels, bit_depth


def _normalise_mode(pil: PILImage.Image) -> PILImage.Image:
    """Convert Pillow's many modes to L, LA, RGB, RGBA (or I;16 grey).

    Palette images become RGB, or RGBA when they carry transparency; a
    single-colour transparency key (tRNS) on L/RGB becomes a real alpha
    channel; premultiplied La/RGBa are un-premultiplied; CMYK, YCbCr, LAB,
    HSV and RGBX become RGB.  32-bit integer and float modes are left alone
    and rejected by the caller.
    """
    mode = pil.mode
    has_key = "transparency" in pil.info
    if mode in ("P", "PA"):
        return pil.convert("RGBA" if has_key or mode == "PA" else "RGB")
    if mode == "1":
        return pil.convert("L")
    if mode == "L" and has_key:
        return pil.convert("LA")
    if mode == "RGB" and has_key:
        return pil.convert("RGBA")
    if mode == "La":
        return pil.convert("LA")
    if mode == "RGBa":
        return pil.convert("RGBA")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return pil.convert("RGB")
    return pil


def _image_from_pixels(pixels: np.ndarray, bit_depth: BitDepth, path: Path) -> Image:
    """Split (H, W, C) pixels into replicated RGB + optional alpha."""
    channels = pixels.shape[2]
    colour = pixels[:, :, : 1 if channels <= 2 else 3]
    rgb = np.ascontiguousarray(np.broadcast_to(colour, (*pixels.shape[:2], 3)), dtype=np.float32)
    alpha = np.ascontiguousarray(pixels[:, :, -1]) if channels in (2, 4) else None
    mode: Mode = ("L", "LA", "RGB", "RGBA")[channels - 1]  # type: ignore[assignment]
    return Image(rgb=rgb, alpha=alpha, mode=mode, bit_depth=bit_depth, path=path)


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def write_image(path: str | os.PathLike[str], image: Image, *, atomic: bool = True) -> None:
    """Write ``image`` to ``path`` in its original mode and bit depth.

    The format comes from the file extension (.png, .jpg/.jpeg, .webp, .bmp,
    .tif/.tiff).  16-bit images must go to PNG; to save one as 8-bit use
    ``dataclasses.replace(image, bit_depth=8)``.  Grey modes are written as
    BT.601 luma of ``image.rgb``; values are clamped to [0, 1] and rounded to
    the nearest integer level.

    Raises:
        ValueError: ``path`` is the file the image was read from, the
            extension is not a supported format, or the format cannot hold
            the image (e.g. alpha in JPEG, 16 bits in anything but PNG).
        OSError: the file cannot be written; with ``atomic=True`` no
            temporary file is left behind and an existing ``path`` is
            untouched.
    """
    target = Path(path)
    if image.path is not None and _same_file(target, image.path):
        raise ValueError(f"refusing to overwrite the source image {image.path}")
    fmt = _format_for_suffix(target)
    data = _encode(image, fmt, target)
    if atomic:
        _write_atomic(target, data)
    else:
        target.write_bytes(data)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (hard links and symlinks too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def _format_for_suffix(target: Path) -> str:
    fmt = PILImage.registered_extensions().get(target.suffix.lower())
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(
            f"{target}: unsupported output extension {target.suffix!r}; "
            "use .png, .jpg, .jpeg, .webp, .bmp, .tif or .tiff"
        )
    return fmt


def _integer_pixels(image: Image) -> np.ndarray:
    """(H, W) or (H, W, C) uint8/uint16 array in the image's original mode."""
    if image.mode in ("L", "LA"):
        colour = (image.rgb.astype(np.float64) @ np.asarray(BT601_LUMA))[:, :, None]
    else:
        colour = image.rgb.astype(np.float64)
    planes = [colour] if image.alpha is None else [colour, image.alpha[:, :, None].astype(np.float64)]
    stacked = np.concatenate(planes, axis=2)
    max_value = 255 if image.bit_depth == 8 else 65535
    levels = np.rint(np.clip(stacked, 0.0, 1.0) * max_value)
    out = levels.astype(np.uint8 if image.bit_depth == 8 else np.uint16)
    return out[:, :, 0] if out.shape[2] == 1 else out


def _encode(image: Image, fmt: str, target: Path) -> bytes:
    """Encode to bytes in memory so format errors happen before any file I/O."""
    pixels = _integer_pixels(image)
    buffer = io.BytesIO()
    if image.bit_depth == 16:
        if fmt != "PNG":
            raise ValueError(
                f"{target}: 16-bit images can only be written as PNG; "
                "use a .png path or dataclasses.replace(image, bit_depth=8)"
            )
        planes = 1 if pixels.ndim == 2 else pixels.shape[2]
        writer = png.Writer(
            width=image.width,
            height=image.height,
            greyscale=image.mode in ("L", "LA"),
            alpha=image.alpha is not None,
            bitdepth=16,
        )
        big_endian = pixels.astype(">u2").reshape(image.height, image.width * planes)
        writer.write_packed(buffer, (row.tobytes() for row in big_endian))
        return buffer.getvalue()
    try:
        PILImage.fromarray(pixels).save(buffer, format=fmt, **_SAVE_OPTIONS.get(fmt, {}))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{target}: cannot write a {image.mode} image as {fmt} ({exc})") from exc
    return buffer.getvalue()


def _write_atomic(target: Path, data: bytes) -> None:
    """Write via a temporary sibling file and ``os.replace``.

    The temporary file lives in the destination folder so the final rename
    never crosses file systems (where it would not be atomic).  It is created
    with mode 0o666 filtered by the umask, like a plain ``open``, so the
    final file gets the permissions the user expects.
    """
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------
# Tensor helpers
# --------------------------------------------------------------------------


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) array -> float32 tensor of shape (1, 3, H, W), clamped to [0, 1]."""
    array = np.asarray(rgb, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None].clamp(0.0, 1.0)


def from_tensor(t: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) tensor -> float32 (H, W, 3) array clamped to [0, 1].

    Models overshoot [0, 1] near edges; clamping here keeps that out of the
    writer and out of metrics.
    """
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ValueError(f"expected a batch of one image, got batch size {t.shape[0]}")
        t = t[0]
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a (1, 3, H, W) or (3, H, W) tensor, got shape {tuple(t.shape)}")
    chw = t.detach().to(device="cpu", dtype=torch.float32).clamp(0.0, 1.0)
    return np.ascontiguousarray(chw.permute(1, 2, 0).numpy())
