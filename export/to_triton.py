"""Write a Triton Inference Server model repository for an exported ESC artifact.

Examples (from the repository root)::

    python export/to_triton.py artifacts/esc_x4.onnx -o model_repository
    python export/to_triton.py esc_x4_fp16.engine -o model_repository --max-batch 16 --preferred 8,16 --instances 2
    python export/to_triton.py esc_x4_256x256.onnx -o model_repository --name esc_fixed --overlap 32

Writes ``<repo>/<name>/config.pbtxt`` and ``<repo>/<name>/1/model.onnx`` (onnxruntime
backend) or ``model.plan`` (tensorrt_plan), with dynamic batching, an instance group and a
warm-up sample; a fixed-shape artifact also gets ``<name>_tiled``, a Python-backend model
that accepts any image size and tiles it through ``<name>``.  Other models already in the
repository are left alone; the folders written here are replaced atomically.  Serve the
repository with NVIDIA's Triton container (the summary prints the command); ``--instances``
sets how many copies of the model one server runs, and more servers behind a load
balancer scale further.  See :mod:`export.triton_repo` for what the config holds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export import common  # noqa: E402
from export.triton_repo import EngineInfo, RepoOptions, engine_max_batch, write_repository  # noqa: E402
from runtimes.cli_args import non_negative_int, positive_int  # noqa: E402

#: The NGC release whose Triton (2.51) PyTriton 0.7 bundles; a TensorRT plan must be built with
#: the TensorRT of the container that serves it, so pass --container for yours.
DEFAULT_CONTAINER = "nvcr.io/nvidia/tritonserver:24.10-py3"


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes like 4,8; got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    defaults = RepoOptions()
    p = argparse.ArgumentParser(
        prog="to_triton", description="Write a Triton Inference Server model repository for an ESC artifact.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("artifact", type=Path, help="exported .onnx, or TensorRT .engine/.plan (with its .json sidecar)")
    p.add_argument("-o", "--output", type=Path, default=Path("model_repository"),
                   help="repository folder (default model_repository; created if missing)")
    p.add_argument("--name", default=defaults.name, help=f"model name (default {defaults.name})")
    p.add_argument("--max-batch", type=positive_int, default=defaults.max_batch,
                   help=f"max_batch_size (default {defaults.max_batch}; capped by a TensorRT profile)")
    p.add_argument("--preferred", type=_batch_sizes, default=defaults.preferred,
                   help="preferred batch sizes of the dynamic batcher (default 4,8)")
    p.add_argument("--delay-us", type=non_negative_int, default=defaults.delay_us,
                   help=f"max_queue_delay_microseconds (default {defaults.delay_us})")
    p.add_argument("--instances", type=positive_int, default=defaults.instances,
                   help="model instances (replicas) per server (default 1)")
    p.add_argument("--kind", choices=("auto", "cpu", "gpu"), default=defaults.kind,
                   help="instance kind (default auto: CPU for ONNX, GPU for TensorRT)")
    p.add_argument("--overlap", type=non_negative_int, default=defaults.overlap,
                   help=f"tiler context pixels for fixed-shape artifacts (default {defaults.overlap})")
    p.add_argument("--max-side", type=positive_int, default=defaults.max_side,
                   help=f"the tiler refuses larger images (default {defaults.max_side})")
    p.add_argument("--container", default=DEFAULT_CONTAINER, help=f"image in the printed command "
                                                                   f"(default {DEFAULT_CONTAINER})")
    return p


def serve_command(repo: Path, info: EngineInfo, container: str) -> str:
    """The ``docker run`` line that serves ``repo`` with NVIDIA's Triton container."""
    gpus = "--gpus all " if info.platform == "tensorrt_plan" else ""
    return (f"docker run --rm {gpus}-p 8000:8000 -p 8001:8001 -p 8002:8002 -v {repo.resolve()}:/models "
            f"{container} tritonserver --model-repository=/models")


def _batching(info: EngineInfo, options: RepoOptions) -> str:
    max_batch = engine_max_batch(info, options)
    if max_batch <= 1:
        return f"none: the engine's batch dimension is fixed at {info.static_batch or 1}"
    preferred = [b for b in options.preferred if b <= max_batch]
    return f"dynamic: max_batch_size {max_batch}, preferred {preferred}, queue delay {options.delay_us} us"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = RepoOptions(name=args.name, max_batch=args.max_batch, preferred=args.preferred, delay_us=args.delay_us,
                          instances=args.instances, kind=args.kind, overlap=args.overlap, max_side=args.max_side)
    info, written = write_repository(args.artifact, args.output, options)
    shape = f"fixed {info.fixed_shape[1]}x{info.fixed_shape[0]}" if info.fixed_shape else "any HxW (-1)"
    entry_name = f"{args.name}_tiled" if info.fixed_shape else args.name
    entry = f"{entry_name} (any size, tiled through {args.name})" if info.fixed_shape else entry_name
    rows = [
        ("artifact", f"{info.path} ({info.platform}, x{info.scale}, {info.dtype} I/O, input {shape})"),
        ("written", "\n".join(str(p) for p in written)),
        ("batching", _batching(info, options)),
        ("replicas", f"{options.instances} instance(s) per server; raise --instances, or run more servers"),
        ("send to", f"model {entry}: input {info.input_name!r} N x 3 x H x W -> output {info.output_name!r}"),
        ("use", serve_command(args.output, info, args.container)),
        ("use (client)", f"python -m runtimes.serve_client photos/ out/ --url http://127.0.0.1:8000 --model {entry_name}"),
    ]
    if info.platform == "tensorrt_plan":
        rows.append(("note", "the plan runs only with the TensorRT version and GPU it was built for: pick the "
                             "container release with that TensorRT (--container); a plugin engine also needs its "
                             "plugin library loaded by the server"))
    common.print_summary("Triton model repository", rows)
    return 0


if __name__ == "__main__":
    common.run_cli(main)
