"""Convert a bias-table ESC checkpoint (naive/Flex-trained) into upstream's FlashBias form.

Examples (from the repository root)::

    python export/to_flashbias.py --weights ESC_DIV2K_X2.pth --rank 48 -o ESC_DIV2K_FB_R48_X2.pth
    python export/to_flashbias.py --weights ESC_Real_X4_GAN.pth --rank 48 --dataset ../shared/data/Set5

Each block's relative-position table is expanded to its dense (heads, w^2, w^2) bias and
factored by SVD at ``--rank`` (``flashbias_q = U_r sqrt(S_r)``, ``flashbias_k = V_r sqrt(S_r)``,
as upstream's own loader does); every other tensor is copied. The output is an official-format
checkpoint (``params_ema``) that ``models.load_model`` recognises as FlashBias and every exporter
takes without a bias: mask-free attention (ONNX ``Attention`` with no mask, TensorRT
``--attention native``, Core ML SDPA, flash kernels).

Below full rank (w^2 = 1024 for 32x32 windows) the bias is approximated: the summary gives its
relative error per block, and with ``--dataset`` (benchmark layout ``DIR/LR_bicubic/X{S}`` +
``DIR/HR``) the PSNR (Y channel, ``scale`` pixels shaved) of the original and the converted model
on every picture, and the change. Upstream's FlashBias note: up to 0.05 dB on trained weights,
"do not use for academic evaluation".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from export import common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="to_flashbias", description="Convert a bias-table ESC checkpoint to FlashBias factors (SVD).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--weights", required=True, help="table checkpoint (.pth/.safetensors) or official:NAME")
    p.add_argument("--rank", type=int, required=True,
                   help="rank of the factors (upstream releases rank 48; full rank = window^2 is exact)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="output .pth (default: <input stem>_FB_R<rank>.pth beside the input)")
    p.add_argument("--dataset", type=Path, default=None,
                   help="benchmark-layout folder (LR_bicubic/X<scale> + HR) to measure the PSNR change on")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the PSNR runs (default: torch's)")
    return p


def default_output(source: Path, rank: int) -> Path:
    return source.with_name(f"{source.stem}_FB_R{rank}.pth")


def scored_pairs(dataset: Path, scale: int) -> list[tuple[Path, Path]]:
    """The (LR, HR) pairs of a benchmark-layout folder, or a ValueError naming what is missing."""
    from runtimes.datasets import find_images

    _, pairs = find_images(dataset, scale)
    scored = [(lr, hr) for lr, hr in pairs if hr is not None]
    if not scored:
        raise ValueError(f"{dataset} has no LR_bicubic/X{scale} pictures with an HR partner; pass a benchmark-layout "
                         f"folder (e.g. Set5) or drop --dataset")
    return scored


def psnr_change(original: torch.nn.Module, converted: torch.nn.Module, pairs: list[tuple[Path, Path]],
                scale: int) -> list[tuple[str, float, float]]:
    """(picture, PSNR of the original, PSNR of the converted) for every (LR, HR) pair."""
    from tqdm import tqdm

    from runtimes import imageio
    from runtimes.datasets import to_uint8
    from validation.metrics import psnr

    rows = []
    for lr, hr in tqdm(pairs, desc="PSNR", file=sys.stderr, leave=False):
        x = imageio.to_tensor(imageio.read_image(lr).rgb)
        target = imageio.read_image(hr).rgb[: x.shape[-2] * scale, : x.shape[-1] * scale]
        scores = []
        for model in (original, converted):
            with torch.inference_mode():
                out = model(x)[0].permute(1, 2, 0).numpy()
            scores.append(psnr(to_uint8(out), to_uint8(target), crop_border=scale))
        rows.append((lr.stem, *scores))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import models
    from models import hub
    from models.flashbias import bias_error_summary, to_flashbias

    source = hub.resolve(args.weights) if hub.is_official(args.weights) else Path(args.weights)
    if args.threads:
        torch.set_num_threads(args.threads)
    converted, reports = to_flashbias(source, args.rank)
    model = models.load_model(converted)          # recognised and strictly loaded, as a user will
    pairs = scored_pairs(args.dataset, model.scale) if args.dataset is not None else []   # checked before writing
    output = args.output or default_output(source, args.rank)
    with common.atomic_output(output) as tmp:
        torch.save({"params_ema": converted}, tmp)
    errors = bias_error_summary(reports)
    d = model.descriptor
    rows = [("input", str(source)), ("model", f"{d.variant} x{d.scale}, {len(reports)} blocks, window {d.window_size}"),
            ("bias", f"{d.bias} (from tables of {(2 * d.window_size - 1) ** 2} entries)"),
            ("bias error", f"relative (Frobenius) worst {errors['worst_relative_error']:.3g}, mean "
                           f"{errors['mean_relative_error']:.3g}; max abs {errors['worst_abs_error']:.3g}")]
    if pairs:
        scores = psnr_change(models.load_model(source), model, pairs, d.scale)
        for name, before, after in scores:
            rows.append((f"PSNR {name}", f"{before:.3f} -> {after:.3f} dB ({after - before:+.4f})"))
        mean_before = sum(s[1] for s in scores) / len(scores)
        mean_after = sum(s[2] for s in scores) / len(scores)
        rows.append(("PSNR mean", f"{mean_before:.3f} -> {mean_after:.3f} dB ({mean_after - mean_before:+.4f}, "
                                  f"{len(scores)} pictures, Y, {d.scale} px shaved)"))
    rows += [("output", f"{output} ({common.human_size(common.path_size(output))})"),
             ("use", f"python export/to_onnx.py --weights {output} --opset 23   # mask-free Attention")]
    common.print_summary("FlashBias conversion", rows)
    return 0


if __name__ == "__main__":
    common.run_cli(main)
