"""Upscale an image, or a folder of images, with any ESC artifact.

    python -m runtimes.upscale INPUT OUTPUT --artifact ART [--memory-budget 4GB | --tile T
        --overlap O --batch-size B] [--device cpu --provider cpu|cuda|tensorrt ...]

INPUT is an image file or a directory (its image files, not recursive); OUTPUT is a file
or a directory (created when missing).  Each output keeps its input's kind: grey stays
grey, RGBA keeps an alpha plane (upscaled separately with the same model, see
:func:`runtimes.tiling.upscale_alpha`), 16-bit PNG stays 16-bit; EXIF orientation is
applied when reading.  In directory mode an output keeps its input's file name, except
that a 16-bit image whose format cannot hold 16 bits is written as ``.png``.

Memory: tile side, overlap and batch are chosen per image from a memory budget
(``--memory-budget``, default half the available RAM, or half the free memory of the
CUDA device) and the runtime's measured cost per pixel (:mod:`runtimes.memory`); tiles
start on the model's attention-window grid with its measured context as overlap, so a
tiled picture stays within one 8-bit level of the untiled one.  ``--tile`` /
``--overlap`` / ``--batch-size`` override the choice.  One ``tiling:`` line on stderr
says what was chosen.

Safety and failures: the input is never overwritten (OUTPUT resolving to INPUT is an
error; in directory mode any output path that is one of the inputs is skipped).  A file
that is corrupt or not a supported image is named on stderr and skipped while the rest
proceed.  Exit status: 0 when every file was written, 1 when some failed or were
skipped, 2 for usage errors (missing artifact, bad flags, missing input).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from models.errors import ESCError
from runtimes import imageio
from runtimes.base import Runner, load
from runtimes.cli_args import add_runner_args, positive_int, runner_options
from runtimes.datasets import IMAGE_SUFFIXES
from runtimes.memory import BudgetError, TilePlan, parse_budget

__all__ = ["UsageError", "budget_arg", "main", "plan_outputs", "upscale_file"]

#: Suffixes treated as images when INPUT is a directory (others are ignored silently
#: only if they are hidden files; see :func:`_collect`).


class UsageError(Exception):
    """A mistake in the command line: printed as ``error: ...``, exit status 2."""


EXAMPLES = """examples:
  python -m runtimes.upscale photo.png photo_x4.png --artifact artifacts/esc_x4.onnx
  python -m runtimes.upscale photos/ upscaled/ --artifact official:ESC_light_X4 --memory-budget 2GB
  python -m runtimes.upscale big.png big_x4.png --artifact esc_x4.onnx --tile 512 --overlap 96
  esc-deploy upscale frame.png frame_x4.png --artifact esc_x4.engine --device cuda

exit status: 0 all files written, 1 some files failed or were skipped, 2 usage error."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtimes.upscale",
        description="Upscale an image or a directory of images with an ESC model "
                    "(.pth/.safetensors/official:NAME checkpoint, or an exported .onnx, .engine, .mlpackage).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, help="image file or directory of images")
    parser.add_argument("output", type=Path, help="output file, or directory (created if missing)")
    add_runner_args(parser, artifact_help="model to run: checkpoint (.pth, .safetensors, official:NAME, "
                                          "torch:PATH) or an exported artifact (.onnx, .engine, .mlpackage)")
    parser.add_argument("--scale", type=positive_int, default=None,
                        help="upscaling factor, only for ONNX files without esc.scale metadata")
    parser.add_argument("--memory-budget", type=budget_arg, default=None, metavar="SIZE",
                        help="memory the upscale may use, e.g. 4GB or 512MB (default: half the available RAM, "
                             "or half the free CUDA memory); picks tile, overlap and batch unless given")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    # Unset means "chosen from the memory budget" (runtimes.memory.plan_tiles).
    parser.set_defaults(overlap=None, batch_size=None)
    return parser


def budget_arg(text: str) -> int:
    """argparse type for ``--memory-budget``: a bad size is a usage error (exit 2) naming the syntax."""
    try:
        return parse_budget(text)
    except BudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _same_path(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _collect(directory: Path) -> list[Path]:
    """Every non-hidden regular file in ``directory``, sorted: unsupported ones are reported."""
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def plan_outputs(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """(input, output) pairs for ``args.input``/``args.output``; raises UsageError for impossible requests.

    Public so every command that writes upscaled files (this one, ``runtimes.serve_client``)
    maps inputs to outputs and refuses overwriting the input in the same way.
    """
    src, dst = args.input, args.output
    if not src.exists():
        raise UsageError(f"input not found: {src}")
    if dst.exists() and _same_path(src, dst):
        raise UsageError(f"output {dst} is the input {src}; refusing to overwrite the input")
    if src.is_dir():
        if dst.exists() and not dst.is_dir():
            raise UsageError(f"input {src} is a directory, so output must be a directory, but {dst} is a file")
        return [(p, dst / p.name) for p in _collect(src)]
    if dst.is_dir() or (not dst.exists() and not dst.suffix):
        dst = dst / src.name
        if dst.exists() and _same_path(src, dst):
            raise UsageError(f"output {dst} is the input {src}; refusing to overwrite the input")
        return [(src, dst)]
    if dst.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"output {dst} has an unsupported extension {dst.suffix!r}; "
                         f"use one of {', '.join(IMAGE_SUFFIXES)} or a directory")
    return [(src, dst)]


def output_path(dst: Path, bit_depth: int) -> Path:
    """Where an image goes: ``dst``, or ``dst`` as ``.png`` for 16 bits in a format that cannot hold them."""
    return dst.with_suffix(".png") if bit_depth == 16 and dst.suffix.lower() != ".png" else dst


def upscale_file(runner: Runner, src: Path, dst: Path, tile: int | None, overlap: int | None,
                 batch_size: int | None, progress: bool = False, protect: Sequence[Path] = (),
                 memory_budget: int | None = None, plans: list[TilePlan] | None = None) -> Path:
    """Read ``src``, upscale colour (and alpha), write ``dst``; returns the path written.

    ``tile``/``overlap``/``batch_size`` left ``None`` are chosen by
    :meth:`runtimes.base.Runner.plan_tiles` within ``memory_budget`` bytes; the plan
    used is appended to ``plans`` when given.  A 16-bit image bound for a format other
    than PNG is written as ``.png`` beside it.  Raises ``ValueError`` (before any
    inference) when the output would be ``src`` or one of ``protect``.
    """
    image = imageio.read_image(src)
    dst = output_path(dst, image.bit_depth)
    for path in (src, *protect):
        if _same_path(dst, path):
            raise ValueError(f"its output path {dst} is an input file or another output; not overwriting it")
    x = imageio.to_tensor(image.rgb)
    plan = runner.plan_tiles((image.height, image.width), tile=tile, overlap=overlap, batch_size=batch_size,
                             memory_budget=memory_budget)
    if plans is not None:
        plans.append(plan)
    chosen = {"tile": None if runner.fixed_shape else plan.tile, "overlap": plan.overlap,
              "batch_size": plan.batch_size, "progress": progress, "memory_budget": plan.budget}
    sr = runner.upscale(x, **chosen)
    alpha = None
    if image.alpha is not None:
        a = torch.from_numpy(image.alpha)[None, None]
        alpha = runner.upscale_alpha(a, **chosen)[0, 0].numpy()
    out = dataclasses.replace(image, rgb=imageio.from_tensor(sr), alpha=alpha, path=src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    imageio.write_image(dst, out)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        pairs = plan_outputs(args)
        runner = load(args.artifact, device=args.device, **runner_options(args, scale=args.scale))
    except (UsageError, ESCError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    inputs = [p for p, _ in pairs]
    written: set[Path] = set()
    failed: list[str] = []
    done = 0
    plans: list[TilePlan] = []
    start = time.perf_counter()
    with runner:
        bar = tqdm(pairs, desc="images", unit="img", disable=args.quiet or len(pairs) < 2, file=sys.stderr)
        for src, dst in bar:
            if any(_same_path(dst, p) for p in inputs):
                failed.append(str(src))
                tqdm.write(f"skipped {src}: its output path {dst} is an input file", file=sys.stderr)
                continue
            try:
                final = upscale_file(runner, src, dst, args.tile, args.overlap, args.batch_size,
                                     progress=not args.quiet and len(pairs) == 1,
                                     protect=[*inputs, *written], memory_budget=args.memory_budget, plans=plans)
                if len(plans) == 1 or plans[-1].describe() != plans[-2].describe():
                    tqdm.write(plans[-1].describe(), file=sys.stderr)
            except imageio.ImageReadError as exc:
                failed.append(str(src))
                tqdm.write(f"skipped {exc}", file=sys.stderr)
                continue
            except ESCError as exc:  # a runner problem (e.g. overlap too large for the artifact)
                bar.close()
                print(f"error: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one bad file must not stop the others
                failed.append(str(src))
                tqdm.write(f"failed {src}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            written.add(final)
            done += 1
        bar.close()
        info = runner.describe()

    elapsed = time.perf_counter() - start
    ran = ", ".join(f"{k}={v}" for k, v in info.items() if v not in (None, [], ""))
    print(f"ran: {ran}")
    print(f"upscaled {done} file(s), {len(failed)} failed or skipped, in {elapsed:.1f}s")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
