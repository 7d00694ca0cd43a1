"""Print the parameter count of every variant and scale next to the published figure.

    python -m models.params

Counts come from building each network (on the meta device: no memory, no weights);
they include the attention bias tables (ESC) and the RIB bias MLPs (ESC-RIB, SST), as
upstream's counts do. The golden vectors' indexes, made by the upstream code, pin six ESC
and four RIB-family counts in the tests. The plus variants differ from their base only
in window sizes, so their counts are equal.
"""
from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence

import torch

from .config import VARIANTS
from .loader import create_model


def count(name: str, scale: int) -> int:
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return create_model(name, scale).num_params()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.params", description="Print the parameter count of every variant and scale.",
        epilog="examples:\n  python -m models.params\n  esc-deploy params --model esc_rib --model sst",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=sorted(VARIANTS), metavar="NAME",
                        help="only this variant (repeatable; default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    chosen = build_parser().parse_args(argv).model
    width = max(len(name) for name in VARIANTS)
    print(f"{'variant':<{width}} {'scale':>5} {'params':>12} {'paper':>10}")
    for name, variant in VARIANTS.items():
        if chosen and name not in chosen:
            continue
        for scale in variant.scales:
            paper = variant.paper_params_k.get(scale)
            shown = f"{paper / 1000:.1f}M" if paper else "-"
            print(f"{name:<{width}} {'x' + str(scale):>5} {count(name, scale):>12,} {shown:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
