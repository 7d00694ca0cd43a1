"""``python -m runtimes.upscale``: every real input keeps its kind, failures are isolated,
inputs are never overwritten, user errors exit 2 without a traceback.

Cost note: the esc_light golden model runs at roughly 0.5 s per 32x32 attention window on
these 2-core CPU machines, so upscaling all of ``real_inputs`` (about 1.2 million LR pixels
counting the alpha planes) with it would take over ten minutes, and tiling does not
reduce the work (it adds the overlap).  The sweep over every real input therefore uses
a tiny ESC checkpoint built here (same architecture and loader, 8x8 windows, one block,
x2; about 13k parameters): the I/O path under test (mode, alpha, bit depth, EXIF,
naming, error handling) is identical.  The esc_light golden checkpoint itself runs
through the CLI on a crop of the 16-bit RGBA real input (alpha and 16-bit path).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import png
import pytest

from runtimes.imageio import read_image
from runtimes.upscale import main

REPO = Path(__file__).resolve().parents[1]
IMAGES = ("00003.png", "00017_gray.png", "0014.jpg", "OST_009.png", "children-alpha.png",
          "tree_alpha_16bit.png", "wolf_gray.jpg")


@pytest.fixture(scope="module")
def real_inputs(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "real_inputs"
    if not path.is_dir():
        pytest.skip(f"missing shared data: {path}")
    return path


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "runtimes.upscale", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_every_real_input_keeps_size_mode_and_bit_depth(real_inputs: Path, tiny_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    out_dir = tmp_path / "out"  # does not exist yet: the CLI creates it
    # Whole images (no --tile): on these shared CPUs tiling only adds the overlap's work;
    # the tiled path runs in the golden test below and in tests/test_runners.py.
    result = run_cli(real_inputs, out_dir, "--artifact", tiny_checkpoint, "--threads", "2")
    assert result.returncode == 1, result.stderr  # the LICENSE file fails, the rest succeed
    assert "LICENSE" in result.stderr and "not a recognised image file" in result.stderr
    assert "Traceback" not in result.stderr
    assert "upscaled 7 file(s), 1 failed" in result.stdout
    assert "ran: runner=torch" in result.stdout and "variant=esc" in result.stdout
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(IMAGES)
    for name in IMAGES:
        src, dst = read_image(real_inputs / name), read_image(out_dir / name)
        assert (dst.height, dst.width) == (2 * src.height, 2 * src.width), name
        assert dst.mode == src.mode, name
        assert dst.bit_depth == src.bit_depth, name
        assert (dst.alpha is None) == (src.alpha is None), name
    # The 16-bit file really is 16-bit on disk, with alpha (pypng reads the header).
    _, _, _, info = png.Reader(filename=str(out_dir / "tree_alpha_16bit.png")).read()
    assert info["bitdepth"] == 16 and info["alpha"] and not info["greyscale"]
    # Grey stays single-channel on disk.
    from PIL import Image

    with Image.open(out_dir / "00017_gray.png") as im:
        assert im.mode == "L"
    with Image.open(out_dir / "wolf_gray.jpg") as im:
        assert im.mode == "L"


def _write_png16_rgba(path: Path, pixels: np.ndarray) -> None:
    h, w, _ = pixels.shape
    png.Writer(width=w, height=h, alpha=True, greyscale=False, bitdepth=16).write(
        path.open("wb"), pixels.reshape(h, w * 4).tolist())


@pytest.mark.slow
def test_golden_esc_light_through_the_cli(real_inputs: Path, golden_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """esc_light x4 (golden weights), tiled, on a 40x48 crop of the 16-bit RGBA real input."""
    rows = png.Reader(filename=str(real_inputs / "tree_alpha_16bit.png")).asDirect()[2]
    full = np.array([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(256, 342, 4)
    crop = full[100:140, 150:198]
    assert crop[..., 3].min() != crop[..., 3].max(), "the crop should have a non-constant alpha"
    src = tmp_path / "crop16.png"
    _write_png16_rgba(src, crop)
    dst = tmp_path / "crop16_x4.png"
    code = main([str(src), str(dst), "--artifact", str(golden_dir / "esc_light_x4_35x35_b1.pth"),
                 "--tile", "32", "--overlap", "8", "--threads", "2", "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    image = read_image(dst)
    assert (image.height, image.width, image.mode, image.bit_depth) == (160, 192, "RGBA", 16)
    assert "variant=esc_light" in out.out and "scale=4" in out.out and "upscaled 1 file(s), 0 failed" in out.out


def test_output_equal_to_input_is_refused(real_inputs: Path, tiny_checkpoint: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    shutil.copy(real_inputs / "0014.jpg", src.with_suffix(".jpg"))
    src = src.with_suffix(".jpg")
    before = src.read_bytes()
    art = ["--artifact", str(tiny_checkpoint), "--quiet"]

    assert main([str(src), str(src), *art]) == 2
    assert "error:" in capsys.readouterr().err
    assert main([str(src.parent), str(src.parent), *art]) == 2  # directory onto itself
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert main([str(src), str(src.parent), *art]) == 2  # into its own folder, same name
    capsys.readouterr()
    link = tmp_path / "link.jpg"
    link.symlink_to(src)
    assert main([str(src), str(link), *art]) == 2  # same file under another name
    capsys.readouterr()

    # Directory mode: an output path that is an input (here through a symlink) is skipped.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / src.name).symlink_to(src)
    shutil.copy(real_inputs / "0014.jpg", src.parent / "b.jpg")
    assert main([str(src.parent), str(out_dir), *art]) == 1
    err = capsys.readouterr().err
    assert f"skipped {src}" in err and "is an input file" in err
    assert src.read_bytes() == before
    assert read_image(out_dir / "b.jpg").width == 2 * 179


def test_corrupt_files_are_named_and_skipped(real_inputs: Path, tiny_checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(real_inputs / "0014.jpg", src / "good.jpg")
    data = (real_inputs / "00003.png").read_bytes()
    (src / "truncated.png").write_bytes(data[: len(data) // 3])
    (src / "notes.txt").write_text("not an image")
    code = main([str(src), str(tmp_path / "out"), "--artifact", str(tiny_checkpoint), "--quiet"])
    out = capsys.readouterr()
    assert code == 1
    assert "truncated.png" in out.err and "notes.txt" in out.err and "Traceback" not in out.err
    assert "upscaled 1 file(s), 2 failed" in out.out
    assert (tmp_path / "out" / "good.jpg").is_file()
    assert not (tmp_path / "out" / "truncated.png").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--artifact", "missing.pth"], "no such artifact: missing.pth"),
        (["--artifact", "model.xyz"], "supported artifacts: files ending in .pth"),
        (["--artifact", "{tiny}", "--precision", "fp16"], "fp16 needs a CUDA device"),
        (["--artifact", "{tiny}", "--provider", "cuda"], "does not take option(s) provider"),
        (["--artifact", "{tiny}", "--tile", "0"], "expected a positive integer"),
        (["--artifact", "{tiny}", "--tile", "32", "--overlap", "16"], "overlap=16 is too large"),
    ],
)
def test_user_errors_exit_2_without_traceback(extra: list[str], message: str, real_inputs: Path,
                                              tiny_checkpoint: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(real_inputs / "0014.jpg"), str(tmp_path / "out.png")]
    args += [a.replace("{tiny}", str(tiny_checkpoint)) for a in extra]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse rejects bad flag values itself, also with status 2
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert "error: " in err and message in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_missing_input_is_a_usage_error(tiny_checkpoint: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.png"), str(tmp_path / "o.png"), "--artifact", str(tiny_checkpoint)]) == 2
    assert "error: input not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------
# runtimes.cli_args: the size syntax and runner flags every command shares
# ----------------------------------------------------------------------------------


def test_sizes_are_width_by_height_everywhere() -> None:
    from runtimes.cli_args import format_size, parse_size

    assert parse_size("1280x720") == (720, 1280) and parse_size(" 64X32 ") == (32, 64)
    assert format_size(*parse_size("1280x720")) == "1280x720"
    for bad in ("720", "1280x", "0x720", "1280*720", "-1x5"):
        with pytest.raises(ValueError, match=r"WIDTHxHEIGHT, e\.g\. 1280x720"):
            parse_size(bad)


def test_upscale_and_parity_share_the_runner_flags() -> None:
    import argparse

    from runtimes.cli_args import runner_options
    from runtimes.upscale import build_parser as upscale_parser
    from validation.parity import build_parser as parity_parser

    flags = ["--artifact", "a.onnx", "--provider", "cuda", "--threads", "2", "--tile", "64", "--overlap", "8"]

    def runner_flags(parser: argparse.ArgumentParser) -> set[str]:
        group = next(g for g in parser._action_groups if g.title and g.title.startswith("runner"))
        return {a.option_strings[0] for a in group._group_actions}

    up = upscale_parser().parse_args(["in.png", "out.png", *flags])
    par = parity_parser().parse_args([*flags, "--dataset", "d", "--scale", "4"])
    assert runner_flags(upscale_parser()) == runner_flags(parity_parser())
    assert runner_options(up) == runner_options(par) == {"provider": "cuda", "threads": 2}
    assert (up.tile, up.overlap, up.batch_size) == (par.tile, par.overlap, par.batch_size) == (64, 8, None)
    assert runner_options(up, scale=up.scale) == runner_options(up)  # --scale not given: not passed on


def test_variant_flag_picks_sst_for_a_file_named_without_plus(shared_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """SST and SST+ differ only in window sizes, which the weights do not hold: --variant decides."""
    source = shared_dir / "golden_rib" / "sst_x4_40x52_b1.pth"
    if not source.is_file():
        pytest.skip(f"missing shared data: {source}")
    weights = tmp_path / "my_weights.pth"  # a name that says neither sst nor plus
    shutil.copy(source, weights)
    src = tmp_path / "tiny.png"
    png.from_array(np.random.default_rng(0).integers(0, 256, (8, 10 * 3), dtype=np.uint8), "RGB").save(str(src))
    common = [str(src), str(tmp_path / "tiny_x4.png"), "--artifact", str(weights), "--threads", "1", "--quiet"]

    assert main(common) != 0
    err = capsys.readouterr().err
    assert "both sst (" in err and "sst_plus (" in err, err  # the refusal names both candidates

    assert main([*common, "--variant", "sst"]) == 0, capsys.readouterr().err
    assert read_image(tmp_path / "tiny_x4.png").width == 40
