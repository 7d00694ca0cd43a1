"""``esc-deploy``: one console command over every ESC command, so an installed toolkit needs no paths.

Each subcommand hands the rest of the line to the ``main(argv)`` of the script that
already implements it (``python export/to_trt.py ...`` and ``esc-deploy trt ...`` are the
same program), imported only when chosen so ``esc-deploy upscale`` never loads coremltools.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand -> (module whose ``main(argv)`` runs it, one line of help).
COMMANDS: dict[str, tuple[str, str]] = {
    "onnx": ("export.to_onnx", "export a model to ONNX (python export/to_onnx.py)"),
    "trt": ("export.to_trt", "build a TensorRT engine (python export/to_trt.py)"),
    "coreml": ("export.to_coreml", "export a Core ML package (python export/to_coreml.py)"),
    "flashbias": ("export.to_flashbias", "convert a bias-table checkpoint to FlashBias factors "
                                         "(python export/to_flashbias.py)"),
    "upscale": ("runtimes.upscale", "upscale images with any artifact (python -m runtimes.upscale)"),
    "parity": ("validation.parity", "compare an artifact with PyTorch on a dataset (python validation/parity.py)"),
    "bench": ("benchmarks.run", "latency table across models and runtimes (python benchmarks/run.py)"),
    "table": ("benchmarks.table", "merge results.json files from several machines into one table"),
    "params": ("models.params", "parameter count of every variant and scale"),
    "triton": ("export.to_triton", "write a Triton Inference Server model repository for an artifact"),
    "serve": ("runtimes.serve", "serve an artifact on a local Triton server (PyTriton)"),
    "serve-client": ("runtimes.serve_client", "upscale files through a running Triton server"),
    "quickstart": ("apps.quickstart", "export ESC x4, upscale sample photos, check parity"),
}

EXAMPLES = """examples:
  esc-deploy quickstart
  esc-deploy onnx --model esc --scale 4 --weights official:ESC_DIV2K_X4
  esc-deploy upscale photo.png photo_x4.png --artifact artifacts/esc_x4.onnx --tile 256 --overlap 32
  esc-deploy parity --artifact artifacts/esc_x4.onnx --weights ESC_DIV2K_X4.pth --dataset DIR --scale 4
  esc-deploy bench --models esc_light --runtimes torch,onnxruntime --output-size 1280x720
  esc-deploy serve artifacts/esc_x4.onnx --http-port 8000
  esc-deploy serve-client photos/ upscaled/ --url http://127.0.0.1:8000 --concurrency 4
  esc-deploy trt --help                      (every subcommand has its own --help)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esc-deploy", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export, run, verify and benchmark ESC super-resolution models.\n\ncommands:\n"
                    + "\n".join(f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items()))
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of the commands above")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the subcommand's own flags (see COMMAND --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the chosen subcommand and exit with its status (user errors: one ``error:`` line, status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:  # prints the help, or a usage error naming the commands
        args = build_parser().parse_args(argv)
        argv = [args.command, *args.args]
    from export.common import run_cli

    module = importlib.import_module(COMMANDS[argv[0]][0])
    run_cli(module.main, argv[1:])  # the subcommand parses the rest, its --help included


if __name__ == "__main__":
    main()
