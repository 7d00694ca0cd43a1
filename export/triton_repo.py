"""Write a standard Triton Inference Server model repository for an exported ESC artifact.

Layout (``repo/`` may already hold other models; only these folders are replaced)::

    repo/<name>/config.pbtxt            onnxruntime backend (.onnx) or tensorrt_plan (.engine/.plan)
    repo/<name>/1/model.onnx | model.plan
    repo/<name>_tiled/config.pbtxt      only for fixed-shape engines: Python backend that
    repo/<name>_tiled/1/model.py        tiles any image size through <name> (export/triton_tiler.py)

``config.pbtxt`` declares input ``lr`` / output ``sr`` (the graph's own names) with ``-1``
for height and width (the engine's sides when its shape is fixed), dynamic batching with
preferred batch sizes and a queue delay, an instance group (``count`` is the replica
count inside one server), a warm-up sample so the first client does not pay for
initialisation, and the ``esc.*`` metadata as ``parameters`` so clients can read the scale.

Why the text is written by hand rather than through ``model_config_pb2``: exporting must
not need tritonclient; the tests parse every generated file with the protobuf schema
tritonclient ships, so a malformed field fails there.

Atomic: every model folder is staged in full and moved into place only when all of them
were written (:func:`export.common.atomic_output`), so a failure leaves the old folders.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from export.common import atomic_output
from models.errors import ESCError
from runtimes.metadata import ArtifactMetadata, read_onnx_metadata, read_sidecar, sidecar_path

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["EngineInfo", "RepoOptions", "TritonRepoError", "engine_config", "inspect_artifact", "tiler_config",
           "write_repository"]

TILER_SOURCE = Path(__file__).with_name("triton_tiler.py")
_ONNX_SUFFIXES = (".onnx",)
_PLAN_SUFFIXES = (".engine", ".plan")
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
#: Warm-up side for dynamic engines: one 32x32 ESC attention window.
_WARMUP_SIDE = 32


class TritonRepoError(ESCError, ValueError):
    """An artifact or option the repository writer cannot use; the message names the fix."""


@dataclass(frozen=True)
class EngineInfo:
    """What the config needs to know about an artifact."""

    path: Path
    platform: str  # "onnxruntime_onnx" or "tensorrt_plan"
    input_name: str
    output_name: str
    dtype: str  # "float32" / "float16"
    scale: int
    fixed_shape: tuple[int, int] | None
    static_batch: int | None  # None: the batch dimension is dynamic
    batch_limit: int | None  # largest batch the engine accepts (TensorRT profile), None: any
    warmup_shape: tuple[int, int]
    metadata: dict[str, str]
    side_files: tuple[Path, ...] = ()  # ONNX external data, copied beside model.onnx

    @property
    def file_name(self) -> str:
        return "model.plan" if self.platform == "tensorrt_plan" else "model.onnx"


@dataclass(frozen=True)
class RepoOptions:
    """Serving choices; ``kind`` ``auto`` is CPU for ONNX and GPU for TensorRT."""

    name: str = "esc"
    max_batch: int = 8
    preferred: tuple[int, ...] = (4, 8)
    delay_us: int = 2000
    instances: int = 1
    kind: str = "auto"
    overlap: int = 16
    max_side: int = 4096


def _onnx_info(path: Path) -> EngineInfo:
    import onnx

    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError or its own errors for a bad file
        raise TritonRepoError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
                              f"re-export it with python export/to_onnx.py") from None
    custom = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise TritonRepoError(f"{path} uses custom operator domain(s) {', '.join(custom)} (plugin-form ONNX), which "
                              f"Triton's onnxruntime backend cannot run; export with --attention sdpa, or build a "
                              f"TensorRT engine with python export/to_trt.py and pass that")
    if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
        raise TritonRepoError(f"{path} has {len(proto.graph.input)} inputs and {len(proto.graph.output)} outputs; "
                              f"an ESC graph has one of each (lr -> sr)")
    tensor = proto.graph.input[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if len(dims) != 4 or dims[1] != 3:
        raise TritonRepoError(f"{path}: input {proto.graph.input[0].name!r} has shape {dims}; expected N x 3 x H x W")
    dtype = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}.get(tensor.elem_type)
    if dtype is None:
        raise TritonRepoError(f"{path}: input element type {tensor.elem_type} is neither float32 nor float16")
    meta = read_onnx_metadata(path)
    fixed = (dims[2], dims[3]) if dims[2] and dims[3] else None
    return EngineInfo(path=path, platform="onnxruntime_onnx", input_name=proto.graph.input[0].name,
                      output_name=proto.graph.output[0].name, dtype=dtype, scale=_scale(meta, path),
                      fixed_shape=fixed, static_batch=dims[0], batch_limit=None,
                      warmup_shape=fixed or (_WARMUP_SIDE, _WARMUP_SIDE), metadata=meta.to_props(),
                      side_files=_external_data(proto, path))


def _external_data(proto: "onnx.ModelProto", path: Path) -> tuple[Path, ...]:
    """Weight files an ONNX model keeps beside itself (they travel with ``model.onnx``)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    names = {ExternalDataInfo(t).location for t in proto.graph.initializer if uses_external_data(t)}
    files = tuple(path.parent / name for name in sorted(names))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise TritonRepoError(f"{path} keeps its weights in {', '.join(missing)}, which is not beside it")
    return files


def _plan_info(path: Path) -> EngineInfo:
    meta, build = read_sidecar(path)
    profile = build.get("profile")
    if not profile:
        raise TritonRepoError(f"{path} has no sidecar {sidecar_path(path).name} with its shape profile; build the "
                              f"engine with python export/to_trt.py, which writes both")
    lo, opt, hi = profile["min"], profile["opt"], profile["max"]
    fixed = (lo[2], lo[3]) if (lo[2], lo[3]) == (hi[2], hi[3]) else None
    return EngineInfo(path=path, platform="tensorrt_plan", input_name="lr", output_name="sr",
                      dtype=meta.io_dtype or "float32", scale=_scale(meta, path), fixed_shape=fixed,
                      static_batch=lo[0] if lo[0] == hi[0] == 1 else None, batch_limit=hi[0],
                      warmup_shape=(opt[2], opt[3]), metadata=meta.to_props())


def _scale(meta: ArtifactMetadata, path: Path) -> int:
    if meta.scale is None:
        raise TritonRepoError(f"{path} has no esc.scale metadata, so the output size is unknown; re-export it with "
                              f"this toolkit")
    return meta.scale


def inspect_artifact(artifact: str | os.PathLike[str]) -> EngineInfo:
    """Read what the config needs from an ``.onnx`` file or a TensorRT ``.engine``/``.plan``."""
    path = Path(artifact)
    if not path.is_file():
        raise TritonRepoError(f"no such artifact: {path}")
    suffix = path.suffix.lower()
    if suffix in _ONNX_SUFFIXES:
        return _onnx_info(path)
    if suffix in _PLAN_SUFFIXES:
        return _plan_info(path)
    raise TritonRepoError(f"{path}: Triton serves .onnx files and TensorRT .engine/.plan files, not {suffix or 'this'}"
                          f"; export one first: python export/to_onnx.py --weights CHECKPOINT")


# -- config text ------------------------------------------------------------------------------
def _dims(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _tensor(name: str, dtype: str, dims: Sequence[int]) -> str:
    return f'  {{\n    name: "{name}"\n    data_type: {_TRITON_TYPES[dtype]}\n    dims: {_dims(dims)}\n  }}'


def _quote(text: str) -> str:
    """A protobuf text-format string literal (quotes and backslashes escaped)."""
    return json.dumps(text, ensure_ascii=False)


def _parameters(values: dict[str, str]) -> str:
    return "".join(f'parameters {{\n  key: {_quote(k)}\n  value {{ string_value: {_quote(v)} }}\n}}\n'
                   for k, v in sorted(values.items()))


def _instance_group(count: int, kind: str) -> str:
    return f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]\n"


def _kind(info: EngineInfo, options: RepoOptions) -> str:
    kind = options.kind if options.kind != "auto" else ("gpu" if info.platform == "tensorrt_plan" else "cpu")
    if info.platform == "tensorrt_plan" and kind != "gpu":
        raise TritonRepoError("a TensorRT plan runs only on a GPU instance; use --kind gpu (or auto)")
    return f"KIND_{kind.upper()}"


def engine_max_batch(info: EngineInfo, options: RepoOptions) -> int:
    """``max_batch_size`` of the engine model: 0 when its batch dimension is fixed."""
    if info.static_batch is not None:
        return 0
    return min(options.max_batch, info.batch_limit) if info.batch_limit else options.max_batch


def engine_config(info: EngineInfo, options: RepoOptions) -> str:
    """``config.pbtxt`` of the engine model."""
    max_batch = engine_max_batch(info, options)
    h, w = info.fixed_shape or (-1, -1)
    batch_dims = [info.static_batch] if max_batch == 0 else []
    in_dims = [*batch_dims, 3, h, w]
    out_dims = [*batch_dims, 3, h * info.scale if h > 0 else -1, w * info.scale if w > 0 else -1]
    backend = 'platform: "tensorrt_plan"' if info.platform == "tensorrt_plan" else 'backend: "onnxruntime"'
    parts = [f'name: "{options.name}"\n{backend}\nmax_batch_size: {max_batch}\n',
             f"input [\n{_tensor(info.input_name, info.dtype, in_dims)}\n]\n",
             f"output [\n{_tensor(info.output_name, info.dtype, out_dims)}\n]\n"]
    if max_batch > 1:
        preferred = [b for b in options.preferred if b <= max_batch]
        parts.append("dynamic_batching {\n" + (f"  preferred_batch_size: {_dims(preferred)}\n" if preferred else "")
                     + f"  max_queue_delay_microseconds: {options.delay_us}\n}}\n")
    parts.append(_instance_group(options.instances, _kind(info, options)))
    wh, ww = info.warmup_shape
    warm_dims = [*batch_dims, 3, wh, ww]
    parts.append(f'model_warmup [\n  {{\n    name: "random_{ww}x{wh}"\n    batch_size: 1\n    inputs {{\n'
                 f'      key: "{info.input_name}"\n      value {{\n        data_type: {_TRITON_TYPES[info.dtype]}\n'
                 f"        dims: {_dims(warm_dims)}\n        random_data: true\n      }}\n    }}\n  }}\n]\n")
    parts.append(_parameters(info.metadata))
    return "".join(parts)


def tiler_config(info: EngineInfo, options: RepoOptions) -> str:
    """``config.pbtxt`` of the Python-backend model that tiles through the fixed-shape engine."""
    assert info.fixed_shape is not None, "only fixed-shape engines need the tiler"
    th, tw = info.fixed_shape
    if min(th, tw) <= 2 * options.overlap:
        raise TritonRepoError(f"--overlap {options.overlap} is too large for the engine's {tw}x{th} windows; "
                              f"it must be below {min(th, tw) // 2}")
    params = {"engine_model": options.name, "engine_input": info.input_name, "engine_output": info.output_name,
              "engine_dtype": info.dtype, "tile_height": str(th), "tile_width": str(tw),
              "overlap": str(options.overlap), "scale": str(info.scale),
              "engine_batch": str(engine_max_batch(info, options)), "max_side": str(options.max_side)}
    return "".join([f'name: "{options.name}_tiled"\nbackend: "python"\nmax_batch_size: 0\n',
                    f"input [\n{_tensor('lr', 'float32', [-1, 3, -1, -1])}\n]\n",
                    f"output [\n{_tensor('sr', 'float32', [-1, 3, -1, -1])}\n]\n",
                    _instance_group(options.instances, "KIND_CPU"), _parameters(params)])


def _check_options(options: RepoOptions) -> None:
    if not options.name or any(c in options.name for c in "/\\ \"") or options.name.startswith("."):
        raise TritonRepoError(f"model name {options.name!r} must be a plain folder name (no slashes, spaces, quotes)")
    if options.max_batch < 1 or options.instances < 1 or options.delay_us < 0 or options.overlap < 0:
        raise TritonRepoError("--max-batch and --instances must be >= 1, --delay-us and --overlap >= 0")
    bad = [b for b in options.preferred if not 1 <= b <= options.max_batch]
    if bad:
        raise TritonRepoError(f"preferred batch size(s) {bad} must lie in 1..--max-batch ({options.max_batch})")


def write_repository(artifact: str | os.PathLike[str], repo: str | os.PathLike[str],
                     options: RepoOptions = RepoOptions()) -> tuple[EngineInfo, list[Path]]:
    """Write the model folder(s) for ``artifact`` into ``repo``; returns the info and the files written."""
    _check_options(options)
    info = inspect_artifact(artifact)
    texts = {options.name: engine_config(info, options)}
    if info.fixed_shape is not None:
        texts[f"{options.name}_tiled"] = tiler_config(info, options)
    root = Path(repo)
    with ExitStack() as stack:
        for model, text in texts.items():
            staged = stack.enter_context(atomic_output(root / model))
            (staged / "1").mkdir(parents=True)
            (staged / "config.pbtxt").write_text(text)
            if model == options.name:
                shutil.copyfile(info.path, staged / "1" / info.file_name)
                for side in info.side_files:
                    shutil.copyfile(side, staged / "1" / side.name)
            else:
                shutil.copyfile(TILER_SOURCE, staged / "1" / "model.py")
    written = [root / model / "config.pbtxt" for model in texts]
    written += [root / options.name / "1" / name for name in (info.file_name, *(f.name for f in info.side_files))]
    written += [root / model / "1" / "model.py" for model in texts if model != options.name]
    return info, written
