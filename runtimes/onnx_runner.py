"""Run an exported ESC ``.onnx`` file with ONNX Runtime.

What the runner reads from the file (written by :mod:`export.onnx_export`):

* the input ``lr`` and output ``sr`` (or the graph's only input/output), NCHW,
  ``float32`` or ``float16`` (then this runner converts, callers always see float32);
* fixed shapes: when the graph's input height and width are numbers (``esc.shape`` is
  ``"HxW"``), every call must have that size and :meth:`Runner.upscale` tiles at it; a
  numeric batch dimension is honoured by splitting / padding batches here;
* ``metadata_props``: ``esc.scale`` (required, or pass ``scale=``), ``esc.input_multiple``,
  ``esc.variant``, ``esc.attention``, ``esc.precision``, ``esc.opset``, ... reported by
  :meth:`describe`.

Execution providers: ``provider="cpu"`` (default on ``device="cpu"``), ``"cuda"``
(default on ``device="cuda"``) or ``"tensorrt"`` (ONNX Runtime's TensorRT EP), each
followed by the slower ones as fallback for unsupported nodes.  If the requested one is
not in :func:`onnxruntime.get_available_providers`, or ONNX Runtime silently dropped it
when building the session (missing CUDA/TensorRT libraries), a :class:`RunnerError` says
so and lists what is available: a "CUDA" benchmark that ran on the CPU is worse than none.

Plugin seam: every session in the toolkit (this runner's, the exporters' parity checks)
is made by :func:`make_session`, which runs the hooks in :data:`SESSION_OPTIONS_HOOKS`
on its ``SessionOptions``.  A module that provides custom operators (e.g. the fused
window-attention kernel) appends a hook that calls ``so.register_custom_ops_library(...)``
when ``model.custom_domains`` asks for it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import onnxruntime as ort
import torch

if TYPE_CHECKING:
    import onnx

from .base import Runner, RunnerError, artifact_scale, metadata_errors
from .metadata import ArtifactMetadata

__all__ = [
    "PROVIDERS",
    "SESSION_OPTIONS_HOOKS",
    "OnnxModelInfo",
    "OnnxRunner",
    "OnnxSource",
    "add_session_options_hook",
    "make_session",
]

#: Short provider names -> the ONNX Runtime execution-provider chain they request.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
_FULL_NAMES = {chain[0]: short for short, chain in PROVIDERS.items()}
_STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "pkg.onnxscript.torch_lib.common"}
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


#: What :func:`make_session` builds a session from: a path, serialized bytes or a proto.
OnnxSource = Union[str, "os.PathLike[str]", bytes, "onnx.ModelProto"]


class OnnxModelInfo:
    """What a session-options hook may inspect before the session exists.

    ``path``: the ``.onnx`` file, or ``None`` for a graph given in memory.  ``proto``
    (loaded on first use, without external weights), ``metadata`` (``metadata_props``
    as a dict) and ``custom_domains`` (operator domains outside the ONNX / ONNX Runtime
    standard ones) are computed lazily so a hook that does not look costs nothing.
    """

    def __init__(self, source: OnnxSource) -> None:
        self.source = source
        self.path = Path(source) if isinstance(source, (str, os.PathLike)) else None

    @functools.cached_property
    def proto(self) -> Any:
        import onnx

        if self.path is not None:
            return onnx.load(str(self.path), load_external_data=False)
        if isinstance(self.source, bytes):
            return onnx.load_from_string(self.source)
        return self.source

    @functools.cached_property
    def metadata(self) -> dict[str, str]:
        return {p.key: p.value for p in self.proto.metadata_props}

    @functools.cached_property
    def custom_domains(self) -> list[str]:
        domains = {node.domain for node in self.proto.graph.node}
        domains |= {node.domain for f in self.proto.functions for node in f.node}
        local = {f.domain for f in self.proto.functions}
        return sorted(domains - _STANDARD_DOMAINS - local)

    @functools.cached_property
    def opset(self) -> int | None:
        for entry in self.proto.opset_import:
            if entry.domain in ("", "ai.onnx"):
                return int(entry.version)
        return None

    def label(self) -> str:
        """How messages name the graph: its path, or ``<in-memory graph>``."""
        return str(self.path) if self.path is not None else "<in-memory graph>"


#: ``hook(session_options, model_info)`` callables run, in order, on every new
#: session's options.  Append to it (or use :func:`add_session_options_hook`).
SessionOptionsHook = Callable[[ort.SessionOptions, OnnxModelInfo], None]
SESSION_OPTIONS_HOOKS: list[SessionOptionsHook] = []


def add_session_options_hook(hook: SessionOptionsHook) -> SessionOptionsHook:
    """Register ``hook`` (usable as a decorator); registering twice is a no-op."""
    if hook not in SESSION_OPTIONS_HOOKS:
        SESSION_OPTIONS_HOOKS.append(hook)
    return hook


def _session_options_for(model: OnnxModelInfo, threads: int | None = None) -> ort.SessionOptions:
    """The ``SessionOptions`` for ``model``: threads, full graph optimisation, then the hooks.

    Logging is limited to errors: the toolkit checks what matters itself (which
    providers really run, parity), and ONNX Runtime's warnings drown its messages.
    The CPU memory arena is off: it keeps every block a call reserved and a call of
    another tile shape reserves more, so a tiled upscale grew past any budget (four
    tile shapes of a 1024x1024 picture: 7.9 GiB held after the fourth call). Without
    it the memory goes back after each call and the planner's per-call cost holds.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = False
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    for hook in SESSION_OPTIONS_HOOKS:
        hook(so, model)
    return so


def _session_error(info: OnnxModelInfo, exc: Exception) -> str:
    """One paragraph for a graph ONNX Runtime refused: its first line and the likely fix."""
    text = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
    hint = ""
    try:
        domains = info.custom_domains
    except Exception:  # the file may not even parse; the ORT message says why
        domains = []
    if domains:
        hint = (f" The graph uses custom operator domain(s) {', '.join(domains)}: register their "
                f"library with runtimes.onnx_runner.add_session_options_hook before loading.")
    elif "IR version" in text:
        hint = " Re-export with an older ir_version (onnxruntime 1.31 reads IR <= 13; 10 is safe)."
    return f"ONNX Runtime cannot load {info.label()}: {text}.{hint}"


def make_session(
    source: OnnxSource,
    *,
    providers: Sequence[str | tuple[str, dict[str, Any]]] = ("CPUExecutionProvider",),
    threads: int | None = None,
) -> ort.InferenceSession:
    """The one place the toolkit creates an ONNX Runtime session.

    Why one: the session-options hooks (custom-op libraries such as the fused
    window-attention reference op) must apply to every session, the runner's and the
    exporters' parity checks alike, or a graph that runs in one place fails in another.

    Args:
        source: an ``.onnx`` path, serialized bytes, or an ``onnx.ModelProto``.
        providers: execution providers in priority order, names or ``(name, options)``.
        threads: ``intra_op_num_threads`` (``None``: ONNX Runtime's default, all cores).

    Raises:
        RunnerError: ONNX Runtime cannot load the graph (the message says why and, for
            custom domains or a too-new IR version, what to do).
    """
    info = OnnxModelInfo(source)
    options = _session_options_for(info, threads)
    data = source.SerializeToString() if hasattr(source, "SerializeToString") else source
    try:
        return ort.InferenceSession(os.fspath(data) if info.path is not None else data, sess_options=options,
                                    providers=list(providers))
    except Exception as exc:  # ORT raises its own pybind exception types
        raise RunnerError(_session_error(info, exc)) from exc


def _provider_chain(provider: str | Sequence[str] | None, device: str) -> tuple[list[str], str]:
    """(EP chain, short name of the EP that must run) from the provider option and device."""
    if provider is None:
        provider = "cuda" if str(device).startswith("cuda") else "cpu"
    if isinstance(provider, str):
        key = _FULL_NAMES.get(provider, provider.strip().lower())
        if key not in PROVIDERS:
            raise RunnerError(
                f"unknown ONNX Runtime provider {provider!r}; use one of {', '.join(PROVIDERS)} "
                f"(available in this install: {', '.join(ort.get_available_providers())})")
        return list(PROVIDERS[key]), key
    chain = [PROVIDERS[_FULL_NAMES.get(p, p.lower())][0] if _FULL_NAMES.get(p, p.lower()) in PROVIDERS else p
             for p in provider]
    if not chain:
        raise RunnerError("the provider list is empty")
    return chain, _FULL_NAMES.get(chain[0], chain[0])


class OnnxRunner(Runner):
    """ONNX Runtime execution of an exported ``.onnx`` ESC model.

    Options:
        provider: ``cpu``, ``cuda``, ``tensorrt`` (or a list of full EP names).
        provider_options: dict of options for the first (requested) provider.
        threads: ``intra_op_num_threads`` (default: ONNX Runtime's, all cores).
        scale / input_multiple: needed only when the file lacks ``esc.*`` metadata;
            when both are present they must agree.
    """

    name = "onnxruntime"
    options = ("provider", "provider_options", "threads", "scale", "input_multiple")

    def __init__(
        self,
        artifact: str | os.PathLike[str],
        device: str = "cpu",
        provider: str | Sequence[str] | None = None,
        provider_options: dict[str, Any] | None = None,
        threads: int | None = None,
        scale: int | None = None,
        input_multiple: int | None = None,
    ) -> None:
        self.artifact = os.fspath(artifact)
        if not Path(self.artifact).is_file():
            raise RunnerError(f"no such ONNX file: {self.artifact}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise RunnerError(f"threads must be a positive int, got {threads!r}")
        self.threads = threads
        chain, self.provider = _provider_chain(provider, device)
        available = ort.get_available_providers()
        if chain[0] not in available:
            raise RunnerError(
                f"ONNX Runtime provider {self.provider!r} ({chain[0]}) is not available in this install "
                f"(onnxruntime {ort.__version__}); available providers: {', '.join(available)}. "
                f"Install onnxruntime-gpu for CUDA/TensorRT, or use --provider cpu")
        chain = [p for p in chain if p in available]
        options: list[dict[str, Any]] = [dict(provider_options or {})] + [{} for _ in chain[1:]]
        device_index = torch.device(device).index if str(device).startswith("cuda") else None
        if device_index is not None and chain[0] != "CPUExecutionProvider":
            options[0].setdefault("device_id", device_index)

        self.info = OnnxModelInfo(self.artifact)
        self.session = make_session(self.artifact, providers=list(zip(chain, options)), threads=threads)
        used = self.session.get_providers()
        if chain[0] not in used:
            raise RunnerError(
                f"ONNX Runtime did not enable {chain[0]} for {self.artifact} (it ran with {', '.join(used)} "
                f"instead, usually because the CUDA/TensorRT libraries it needs are missing); available "
                f"providers: {', '.join(available)}")
        self.providers = used
        self.device = "cpu" if chain[0] == "CPUExecutionProvider" else f"cuda:{options[0].get('device_id', 0)}"

        self._read_io()
        props = self.session.get_modelmeta().custom_metadata_map
        with metadata_errors():
            self.metadata = ArtifactMetadata.from_props(props, source=self.artifact)
        self._read_metadata(scale, input_multiple)

    # -- construction helpers --------------------------------------------------------
    def _read_io(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input = next((i for i in inputs if i.name == "lr"), inputs[0] if len(inputs) == 1 else None)
        self.output = next((o for o in outputs if o.name == "sr"), outputs[0] if len(outputs) == 1 else None)
        if self.input is None or self.output is None:
            raise RunnerError(
                f"{self.artifact}: expected an input 'lr' and an output 'sr' (or a single input and output); "
                f"found inputs {[i.name for i in inputs]} and outputs {[o.name for o in outputs]}")
        if self.input.type not in _NUMPY_DTYPES:
            raise RunnerError(f"{self.artifact}: input {self.input.name} is {self.input.type}; "
                              f"float32 or float16 expected")
        self.io_dtype = _NUMPY_DTYPES[self.input.type]
        shape = list(self.input.shape)
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            raise RunnerError(f"{self.artifact}: input {self.input.name} has shape {shape}; (N, 3, H, W) expected")
        self.static_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        h, w = shape[2], shape[3]
        self.fixed_shape = (h, w) if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 else None

    def _static_scale(self) -> int | None:
        """The factor a fixed-shape graph's output height implies (files without metadata)."""
        out = self.output.shape
        if self.fixed_shape is not None and isinstance(out[2], int) and out[2] % self.fixed_shape[0] == 0:
            return out[2] // self.fixed_shape[0]
        return None

    def _read_metadata(self, scale: int | None, input_multiple: int | None) -> None:
        meta = self.metadata
        self.scale = artifact_scale(meta, scale, self.artifact, self._static_scale())
        self.input_multiple = int(meta.input_multiple or input_multiple or 1)
        if self.fixed_shape is not None and meta.fixed_shape is not None and meta.fixed_shape != self.fixed_shape:
            raise RunnerError(f"{self.artifact}: esc.shape metadata says {meta.shape} but the graph input is "
                              f"{self.fixed_shape[0]}x{self.fixed_shape[1]}")
        self.precision = meta.precision or ("fp16" if self.io_dtype == np.float16 else "fp32")
        self.variant = meta.variant
        self.attention = meta.attention

    # -- inference -------------------------------------------------------------------
    def _run(self, array: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise RunnerError(f"the ONNX Runtime session for {self.artifact} was closed")
        return self.session.run([self.output.name], {self.input.name: array})[0]

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        b = batch.shape[0]
        array = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy().astype(self.io_dtype, copy=False))
        n = self.static_batch
        if n is None or n == b:
            out = self._run(array)
        else:  # a static batch size: run in chunks of n, padding the last by repetition
            chunks = []
            for start in range(0, b, n):
                part = array[start:start + n]
                real = part.shape[0]
                if real < n:
                    part = np.concatenate([part, np.repeat(part[-1:], n - real, axis=0)])
                chunks.append(self._run(part)[:real])
            out = np.concatenate(chunks)
        return torch.from_numpy(out.astype(np.float32, copy=False)).to(batch.device)

    def runtime_details(self) -> dict[str, Any]:
        meta = self.metadata
        opset = meta.opset
        if opset is None:
            try:
                opset = self.info.opset
            except Exception:  # a file that loaded in ORT but not in onnx: no opset to report
                opset = None
        return {
            "runtime_version": ort.__version__,
            "provider": self.provider,
            "providers": list(self.providers),
            "io_dtype": np.dtype(self.io_dtype).name,
            "static_batch": self.static_batch,
            "threads": self.threads,
            "opset": opset,
            "arch": meta.arch,
            "weights_sha256": meta.weights_sha256,
            "toolkit_version": meta.toolkit_version,
        }

    def close(self) -> None:
        """Drop the session (describe() keeps working; infer() no longer does)."""
        self.session = None  # type: ignore[assignment]


# Plugin-form graphs (export/plugin_onnx.py): run the esc::window_attention node through its
# onnxruntime-extensions reference (the hook registers the custom-op library only for such graphs).
from .plugin_ops import session_options_hook as _plugin_ops_hook  # noqa: E402

add_session_options_hook(_plugin_ops_hook)
