"""Where eager PyTorch spends an ESC call: torch.profiler's operator table for one forward.

    python benchmarks/profile_eager.py --model esc --scale 4 --size 128x128 --form grouped

Why it exists: eager PyTorch was 3.9x slower than OpenVINO on the same graph (issue 13);
this table is how that was taken apart. On a 2-core AVX-512 CPU (PyTorch 2.13, esc x4,
128x128 input, deployed, sdpa) one profiled call showed: the 16-channel 13x13 convolution
~16% (oneDNN, NCHW), SDPA on its *math* kernel with the float bias ~40% (full 1024x1024
scores per window plus isneginf/all/where guards), the shifted dynamic 3x3 multiply-adds
~9%, and an identity reflect-pad gather of the qkv map ~2%. The model now asks for the CPU
flash kernel (with unit-stride q/k/v, which it needs), skips zero pads and offers the grouped
dynamic 3x3 (``--form grouped``): on a quiet machine one call went from 3.3 s to 1.6 s, and
the 13x13 convolution (~43%, ~58 GFLOP/s) is now the largest item.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402
from models.layers import DYNAMIC_KERNEL_FORMS  # noqa: E402
from runtimes.cli_args import SIZE_SYNTAX, parse_size  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmarks/profile_eager.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esc", help="ESC variant (default esc)")
    parser.add_argument("--scale", type=int, default=4, choices=(2, 3, 4))
    parser.add_argument("--size", type=parse_size, default=(128, 128), metavar="WIDTHxHEIGHT",
                        help=f"input size ({SIZE_SYNTAX}; default 128x128)")
    parser.add_argument("--attention", default="sdpa", help="attention back-end (default sdpa)")
    parser.add_argument("--form", default="grouped", choices=DYNAMIC_KERNEL_FORMS,
                        help="dynamic 3x3 form (default grouped, the eager fast form)")
    parser.add_argument("--rows", type=int, default=20, help="operator rows to print (default 20)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: time does not depend on them
        model = create_model(args.model, args.scale, attention=args.attention, deploy=True)
    model.set_dynamic_kernel_form(args.form)
    h, w = args.size
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)  # warm-up: oneDNN primitives are created on the first call
        start = time.perf_counter()
        model(x)
        plain_ms = (time.perf_counter() - start) * 1e3
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(x)
    print(f"{args.model} x{args.scale} {w}x{h}, {args.attention}, form {args.form}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads: {plain_ms:.0f} ms unprofiled")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
