"""Latency of one model in several PyTorch modes, side by side in one run.

    python benchmarks/model_modes.py --model esc --scale 4 --size 180x320 \
        --modes naive,sdpa,naive+deploy,sdpa+deploy,sdpa+deploy+grouped --repeat 5

A mode is an attention back-end, optionally ``+deploy`` (the exact deploy-time folds) and
``+grouped`` (the dynamic 3x3 as one grouped convolution, the eager fast form).
Modes are interleaved round by round so drifting machine load hits them alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 180x320, got {text!r}") from None
    return h, w


def build(model: str, scale: int, mode: str) -> torch.nn.Module:
    """``attention[+deploy][+grouped]``: a back-end, the deploy folds, the grouped dynamic 3x3 (eager fast form)."""
    attention, *flags = mode.split("+")
    unknown = set(flags) - {"deploy", "grouped"}
    if unknown:
        raise SystemExit(f"error: unknown mode flag(s) {', '.join(sorted(unknown))} in {mode!r}; "
                         f"use attention[+deploy][+grouped], e.g. sdpa+deploy+grouped")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: latency does not depend on them
        net = create_model(model, scale, attention=attention, deploy="deploy" in flags)
    return net.set_dynamic_kernel_form("grouped") if "grouped" in flags else net


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esc")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--size", type=parse_size, default=(180, 320), help="LR input HxW")
    parser.add_argument("--modes", default="naive,sdpa,naive+deploy,sdpa+deploy")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    modes = args.modes.split(",")
    models = {m: build(args.model, args.scale, m) for m in modes}
    x = torch.rand(1, 3, *args.size)
    times: dict[str, list[float]] = {m: [] for m in modes}
    with torch.inference_mode():
        for m in modes:
            for _ in range(args.warmup):
                models[m](x)
        for _ in range(args.repeat):
            for m in modes:
                start = time.perf_counter()
                models[m](x)
                times[m].append((time.perf_counter() - start) * 1000)
    print(f"{args.model} x{args.scale}, input {args.size[0]}x{args.size[1]}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.repeat} runs interleaved")
    print(f"{'mode':<16} {'median ms':>10} {'min ms':>10}")
    for m in modes:
        print(f"{m:<16} {statistics.median(times[m]):>10.1f} {min(times[m]):>10.1f}")


if __name__ == "__main__":
    main()
