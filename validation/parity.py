"""Runtime parity: does a deployed artifact compute what the PyTorch model computes?

For every LR image of a dataset the artifact's runner and the PyTorch reference
(fp32, same tiling) upscale the image; the two outputs are clamped to [0, 1] and
compared with :func:`validation.compare.compare` (max / mean / p99 absolute error, PSNR
between them).  Each output is also rounded to 8 bits, as the SR convention does, and
scored against HR (PSNR / SSIM on Y, ``scale`` pixels shaved) where HR exists.

Pass thresholds, by the artifact's precision (on the clamped outputs, before rounding):

* fp32: max abs error <= 1e-4;
* fp16: max abs error <= 2e-2 and PSNR(runtime vs PyTorch) >= 50 dB.

``--atol`` / ``--min-psnr`` override them.  Exit status: 0 every image passed, 1 some
image failed parity (or could not be read), 2 usage error.

Dataset layouts: the benchmark layout ``DIR/LR_bicubic/X{S}/{name}x{S}.png`` with
``DIR/HR/{name}.png`` (HR metrics reported), or a flat folder of images (no HR metrics).

The reference is the PyTorch model of ``--weights``; when the artifact is itself a
checkpoint, ``--weights`` defaults to it (the comparison then checks the runner's
precision/attention/device against the fp32 CPU model).  A fixed-shape artifact is tiled
at its shape and the reference is tiled identically, so only the runtime differs.

Usage::

    python validation/parity.py --artifact esc_light_x4.onnx --weights esc_light_x4.pth \\
        --dataset ../shared/data/Set5 --scale 4 --json parity.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file: make the repo root importable so `validation` and `runtimes` resolve.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from models.errors import ESCError
from runtimes import imageio
from runtimes.base import Runner, RunnerError, load, runner_class_for
from runtimes.cli_args import add_runner_args, positive_int, runner_options
from runtimes.datasets import IMAGE_SUFFIXES, find_images, to_uint8
from validation.compare import THRESHOLDS, ComparisonResult, Threshold, compare
from validation.metrics import psnr, ssim

__all__ = ["THRESHOLDS", "ImageParity", "ParityReport", "Threshold", "find_images", "main", "run_parity"]


@dataclass
class ImageParity:
    """One image's parity and quality figures."""

    name: str
    lr: str
    hr: str | None
    lr_size: tuple[int, int]
    comparison: ComparisonResult | None
    runtime_psnr: float | None = None
    runtime_ssim: float | None = None
    reference_psnr: float | None = None
    reference_ssim: float | None = None
    runtime_seconds: float = 0.0
    reference_seconds: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.error is None and self.comparison is not None and self.comparison.passed

    def as_dict(self) -> dict[str, Any]:
        def num(value: float | None) -> float | str | None:
            return value if value is None or math.isfinite(value) else str(value)

        return {
            "name": self.name, "lr": self.lr, "hr": self.hr, "lr_size": list(self.lr_size),
            "passed": self.passed, "error": self.error, "notes": self.notes,
            "comparison": self.comparison.as_dict() if self.comparison else None,
            "runtime": {"psnr_y": num(self.runtime_psnr), "ssim_y": num(self.runtime_ssim),
                        "seconds": round(self.runtime_seconds, 4)},
            "reference": {"psnr_y": num(self.reference_psnr), "ssim_y": num(self.reference_ssim),
                          "seconds": round(self.reference_seconds, 4)},
        }


@dataclass
class ParityReport:
    """Everything a parity run found; ``as_dict`` is what ``--json`` writes."""

    artifact: str
    reference: str
    runtime: dict[str, Any]
    reference_runtime: dict[str, Any]
    precision: str
    threshold: Threshold
    dataset: str
    layout: str
    scale: int
    tile: int | None
    overlap: int | None
    images: list[ImageParity]

    @property
    def passed(self) -> bool:
        return bool(self.images) and all(image.passed for image in self.images)

    def summary(self) -> dict[str, Any]:
        done = [i.comparison for i in self.images if i.comparison is not None]

        def mean(values: list[float | None]) -> float | None:
            kept = [v for v in values if v is not None and math.isfinite(v)]
            return float(np.mean(kept)) if kept else None

        return {
            "passed": self.passed,
            "images": len(self.images),
            "failed": sum(not i.passed for i in self.images),
            "worst_max_abs": max((c.max_abs for c in done), default=None),
            "min_psnr_vs_reference": min((c.psnr for c in done), default=None),
            "mean_runtime_psnr_y": mean([i.runtime_psnr for i in self.images]),
            "mean_reference_psnr_y": mean([i.reference_psnr for i in self.images]),
            "mean_runtime_ssim_y": mean([i.runtime_ssim for i in self.images]),
            "mean_reference_ssim_y": mean([i.reference_ssim for i in self.images]),
        }

    def as_dict(self) -> dict[str, Any]:
        summary = self.summary()
        if summary["min_psnr_vs_reference"] is not None and not math.isfinite(summary["min_psnr_vs_reference"]):
            summary["min_psnr_vs_reference"] = str(summary["min_psnr_vs_reference"])
        return {
            "artifact": self.artifact, "reference": self.reference, "runtime": self.runtime,
            "reference_runtime": self.reference_runtime, "precision": self.precision,
            "threshold": {"atol": self.threshold.atol, "min_psnr": self.threshold.min_psnr,
                          "text": self.threshold.describe()},
            "dataset": self.dataset, "layout": self.layout, "scale": self.scale, "tile": self.tile,
            "overlap": self.overlap, "summary": summary, "images": [i.as_dict() for i in self.images],
        }

    def table(self) -> str:
        """A fixed-width text table, one row per image, then a summary line."""
        header = (f"{'image':<14} {'LR size':>9} {'max|d|':>9} {'mean|d|':>9} {'PSNR d':>8}  "
                  f"{'runtime PSNR/SSIM':>18}  {'torch PSNR/SSIM':>18}  result")
        lines = [header, "-" * len(header)]

        def q(p: float | None, s: float | None) -> str:
            return "-" if p is None else f"{p:.2f} / {s:.4f}"

        for i in self.images:
            size = f"{i.lr_size[1]}x{i.lr_size[0]}" if i.lr_size != (0, 0) else "-"
            if i.comparison is None:
                lines.append(f"{i.name:<14} {size:>9} {'-':>9} {'-':>9} {'-':>8}  {'-':>18}  {'-':>18}  ERROR: {i.error}")
                continue
            c = i.comparison
            p = "inf" if not math.isfinite(c.psnr) else f"{c.psnr:.2f}"
            lines.append(f"{i.name:<14} {size:>9} {c.max_abs:>9.2e} {c.mean_abs:>9.2e} {p:>8}  "
                         f"{q(i.runtime_psnr, i.runtime_ssim):>18}  {q(i.reference_psnr, i.reference_ssim):>18}  "
                         f"{'pass' if i.passed else 'FAIL'}")
        s = self.summary()
        lines.append("-" * len(header))
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"parity {verdict}: {s['images'] - s['failed']}/{s['images']} images within "
                     f"{self.threshold.describe()} ({self.precision})")
        return "\n".join(lines)


def _quality(sr: np.ndarray, hr: np.ndarray, scale: int) -> tuple[float, float]:
    return psnr(sr, hr, crop_border=scale), ssim(sr, hr, crop_border=scale)


def _score_one(runner: Runner, reference: Runner, lr: Path, hr: Path | None, scale: int, tile: int | None,
               overlap: int | None, batch_size: int | None, threshold: Threshold) -> ImageParity:
    name = lr.stem
    try:
        image = imageio.read_image(lr)
    except (imageio.ImageReadError, OSError) as exc:
        return ImageParity(name, str(lr), str(hr) if hr else None, (0, 0), None, error=str(exc))
    x = imageio.to_tensor(image.rgb)
    item = ImageParity(name, str(lr), str(hr) if hr else None, (image.height, image.width), None)

    # The candidate's plan (its runtime's memory cost) tiles both sides, so only the runtime differs.
    plan = runner.plan_tiles((image.height, image.width), tile=tile, overlap=overlap, batch_size=batch_size)
    tiles = None if runner.fixed_shape else plan.tile
    t = time.perf_counter()
    out = runner.upscale(x, tile=tiles, overlap=plan.overlap, batch_size=plan.batch_size, memory_budget=plan.budget)
    item.runtime_seconds = time.perf_counter() - t
    t = time.perf_counter()
    ref = reference.upscale(x, tile=None if runner.fixed_shape else (tiles or max(image.height, image.width)),
                            overlap=plan.overlap, batch_size=plan.batch_size, fixed_shape=runner.fixed_shape)
    item.reference_seconds = time.perf_counter() - t

    out_c = out.clamp(0.0, 1.0)[0].permute(1, 2, 0).numpy()
    ref_c = ref.clamp(0.0, 1.0)[0].permute(1, 2, 0).numpy()
    item.comparison = compare(ref_c, out_c, atol=threshold.atol, min_psnr=threshold.min_psnr, name=name)

    if hr is not None:
        try:
            hr_img = imageio.read_image(hr)
        except (imageio.ImageReadError, OSError) as exc:
            item.notes.append(f"HR unreadable ({exc}); no quality metrics")
            return item
        th, tw = image.height * scale, image.width * scale
        if hr_img.height < th or hr_img.width < tw:
            item.notes.append(f"HR {hr_img.width}x{hr_img.height} smaller than SR {tw}x{th}; no quality metrics")
            return item
        if (hr_img.height, hr_img.width) != (th, tw):
            item.notes.append(f"HR cropped from {hr_img.width}x{hr_img.height} to {tw}x{th}")
        hr_u8 = to_uint8(hr_img.rgb[:th, :tw])
        item.runtime_psnr, item.runtime_ssim = _quality(to_uint8(out_c), hr_u8, scale)
        item.reference_psnr, item.reference_ssim = _quality(to_uint8(ref_c), hr_u8, scale)
    return item


def run_parity(
    runner: Runner,
    reference: Runner,
    dataset: str | Path,
    scale: int,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    threshold: Threshold | None = None,
    reference_name: str = "torch",
    progress: bool = False,
) -> ParityReport:
    """Compare ``runner`` with ``reference`` on every LR image of ``dataset``.

    ``threshold`` defaults to :data:`THRESHOLDS` for ``runner.precision``; ``tile``,
    ``overlap`` and ``batch_size`` left ``None`` are chosen by ``runner.plan_tiles``.
    Raises :class:`RunnerError` for a scale mismatch or an empty dataset.
    """
    dataset = Path(dataset)
    for label, r in (("artifact", runner), ("reference", reference)):
        if r.scale != scale:
            raise RunnerError(f"the {label} upscales x{r.scale}, but --scale {scale} was asked for")
    if threshold is None:
        if runner.precision not in THRESHOLDS:
            raise RunnerError(f"no parity threshold for precision {runner.precision!r}; pass --atol "
                              f"(known: {', '.join(THRESHOLDS)})")
        threshold = THRESHOLDS[runner.precision]
    layout, pairs = find_images(dataset, scale)
    if limit is not None:
        pairs = pairs[:limit]
    if not pairs:
        raise RunnerError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {dataset}")
    images = []
    for lr, hr in pairs:
        if progress:
            print(f"  {lr.name} ...", file=sys.stderr, flush=True)
        images.append(_score_one(runner, reference, lr, hr, scale, tile, overlap, batch_size, threshold))
    return ParityReport(
        artifact=runner.artifact, reference=f"{reference_name}:{reference.artifact}", runtime=runner.describe(),
        reference_runtime=reference.describe(), precision=runner.precision, threshold=threshold,
        dataset=str(dataset), layout=layout, scale=scale, tile=tile, overlap=overlap, images=images)


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------


EXAMPLES = """examples:
  python validation/parity.py --artifact artifacts/esc_x4.onnx --weights ESC_DIV2K_X4.pth \\
      --dataset ../shared/data/Set5 --scale 4
  python validation/parity.py --artifact ESC_DIV2K_X4.pth --precision fp16 --device cuda \\
      --dataset ../shared/data/Set5 --scale 4 --json parity.json
  esc-deploy parity --artifact esc_x4.mlpackage --weights ESC_DIV2K_X4.pth --dataset DIR --scale 4 --tile 128"""


def build_parser() -> argparse.ArgumentParser:
    thresholds = "; ".join(f"{k}: {v.describe()}" for k, v in THRESHOLDS.items())
    parser = argparse.ArgumentParser(
        prog="python validation/parity.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Compare a deployed ESC artifact with the PyTorch reference on a dataset.\n\n"
            "Both outputs are clamped to [0, 1] and compared before rounding. Pass thresholds by the\n"
            f"artifact's precision: {thresholds}.\n"
            "Quality vs HR (PSNR/SSIM on Y, scale pixels shaved, outputs rounded to 8 bits) is\n"
            "reported, not checked. Exit status: 0 parity passed, 1 parity failed, 2 usage error."),
        epilog=EXAMPLES,
    )
    add_runner_args(parser, artifact_help="artifact to check (.onnx, .engine, .mlpackage, .pth, official:NAME, ...)")
    parser.add_argument("--reference", choices=("torch",), default="torch", help="reference runtime (torch)")
    parser.add_argument("--weights", default=None,
                        help="checkpoint of the reference model (required unless the artifact is a checkpoint)")
    parser.add_argument("--dataset", required=True, type=Path,
                        help="DIR with LR_bicubic/X{S}/ and HR/ (Set5 layout), or a flat folder of LR images")
    parser.add_argument("--scale", required=True, type=positive_int, help="upscaling factor S")
    parser.add_argument("--json", type=Path, default=None, help="write the full report as JSON here")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N images (sorted by name)")
    parser.add_argument("--reference-device", default="cpu",
                        help="device of the fp32 PyTorch reference (default cpu; TF32 is disabled on CUDA)")
    parser.add_argument("--atol", type=float, default=None, help="override the max abs error threshold")
    parser.add_argument("--min-psnr", type=float, default=None, help="override the PSNR threshold (dB)")
    parser.add_argument("--quiet", action="store_true", help="no per-image progress lines")
    parser.set_defaults(overlap=None, batch_size=None)  # unset: chosen like upscale's (memory budget)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        is_checkpoint = runner_class_for(args.artifact).name == "torch"
        weights = args.weights or (args.artifact if is_checkpoint else None)
        if weights is None:
            raise RunnerError(f"--weights is required: {args.artifact} is not a PyTorch checkpoint, so the "
                              f"reference model must be given as one (.pth / .safetensors / official:NAME)")
        options = runner_options(args)
        # --variant names what the checkpoint holds: the reference's, and the artifact's only if it is one too.
        variant = options.get("variant") if is_checkpoint else options.pop("variant", None)
        runner = load(args.artifact, device=args.device, **options)
        if torch.device(args.reference_device).type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        reference = load(weights if runner_class_for(weights).name == "torch" else f"torch:{weights}",
                         device=args.reference_device, precision="fp32", **({"variant": variant} if variant else {}))
        threshold = None
        if args.atol is not None or args.min_psnr is not None:
            base = THRESHOLDS.get(runner.precision, THRESHOLDS["fp32"])
            threshold = Threshold(atol=args.atol if args.atol is not None else base.atol,
                                  min_psnr=args.min_psnr if args.min_psnr is not None else base.min_psnr)
        report = run_parity(runner, reference, args.dataset, args.scale, tile=args.tile, overlap=args.overlap,
                            batch_size=args.batch_size, limit=args.limit, threshold=threshold,
                            reference_name=args.reference, progress=not args.quiet)
    except (ESCError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print(report.table())
    for item in report.images:
        if item.comparison is not None and not item.comparison.passed:
            print(f"  {item.comparison.summary()}")
        for note in item.notes:
            print(f"  {item.name}: {note}")
    info = report.runtime
    print(f"artifact: {info.get('runtime')} {info.get('runtime_version')} on {info.get('device')}"
          f"{' ' + str(info.get('providers')) if info.get('providers') else ''}, {report.precision}, "
          f"variant {info.get('variant')} x{report.scale}; reference: torch {torch.__version__} fp32 "
          f"on {report.reference_runtime.get('device')}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
