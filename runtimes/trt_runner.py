"""Run a serialized TensorRT engine (``.engine`` / ``.plan``) built by ``export/to_trt.py``.

* TensorRT is imported when a runner is made, never at module import; without it (or
  without a CUDA GPU) a :class:`~runtimes.base.RunnerError` says what to install.
* The ``esc::window_attention`` plugin is registered before deserialising
  (:func:`runtimes.plugin_ops.tensorrt_plugin.register_plugin`). Engines built with the AOT
  implementation carry the kernel and load without it; JIT engines need it, so when
  deserialising fails the registration error is named first (and is the ``__cause__``).
* Engines run on the runner's own CUDA stream, ordered after the caller's stream (the
  input) and before it (the output), not on torch's legacy default stream.
* I/O goes through torch CUDA tensors (no copies through the host): the input shape is set
  per call (``set_input_shape``) within the engine's optimisation profile; batches above
  the profile's max batch are split, below its min batch padded by repetition; images
  smaller than the profile's min sides are padded (edge replication) and cropped.
* :meth:`TensorRTRunner.default_tile`: ``upscale`` tiles at the profile's max side when an
  image exceeds the profile's max height or width and no tile was asked for.
* Metadata (scale, variant, precision, attention form) comes from the sidecar
  ``<engine>.json`` (:func:`runtimes.metadata.read_sidecar`) that ``export/to_trt.py``
  writes; without it pass ``scale=`` or the runner measures the scale with one call at the
  profile's min shape.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import Runner, RunnerError, artifact_scale, metadata_errors
from .metadata import ArtifactMetadata, read_sidecar
from .plugin_ops.contract import PLUGIN_ID

__all__ = ["TensorRTRunner"]

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    key = str(trt_dtype).rsplit(".", 1)[-1].upper()
    if key not in _TORCH_DTYPES:
        raise RunnerError(f"unsupported TensorRT tensor type {trt_dtype}")
    return _TORCH_DTYPES[key]


def deserialize_engine(runtime: Any, artifact: str, trt_version: str, build: dict[str, Any],
                       plugin_error: BaseException | None) -> Any:
    """``runtime.deserialize_cuda_engine`` of ``artifact``, or a :class:`RunnerError` naming the likely cause.

    A failed plugin registration comes first in the message and is the error's
    ``__cause__``: an engine that uses the plugin cannot load without it, and TensorRT's
    own failure ("built for another version or GPU") would otherwise hide it.
    """
    engine = runtime.deserialize_cuda_engine(Path(artifact).read_bytes())
    if engine is not None:
        return engine
    built_with = (f" (built with TensorRT {build['tensorrt_version']} on {build.get('gpu')})"
                  if build.get("tensorrt_version") else "")
    if plugin_error is not None:
        raise RunnerError(
            f"TensorRT {trt_version} could not deserialize {artifact}{built_with}. The {PLUGIN_ID} plugin could "
            f"not be registered, which engines using it need: {type(plugin_error).__name__}: {plugin_error}. Fix "
            f"that first; if it persists, the engine was built for another TensorRT version or GPU: rebuild it with "
            f"export/to_trt.py on this machine") from plugin_error
    raise RunnerError(f"TensorRT {trt_version} could not deserialize {artifact}{built_with}: engines only load with "
                      f"the TensorRT version and GPU model they were built for; rebuild it with export/to_trt.py on "
                      f"this machine")


class TensorRTRunner(Runner):
    """TensorRT execution of a serialized ESC engine on a CUDA device.

    Options:
        scale: needed only when the engine has no sidecar (else measured once).
        verbose: TensorRT's INFO log while deserialising.
    """

    name = "tensorrt"
    options = ("scale", "verbose")

    def __init__(self, artifact: str | os.PathLike[str], device: str = "cuda", scale: int | None = None,
                 verbose: bool = False) -> None:
        self.artifact = os.fspath(artifact)
        if not Path(self.artifact).is_file():
            raise RunnerError(f"no such TensorRT engine: {self.artifact}")
        from .plugin_ops.tensorrt_plugin import (
            TensorRTUnavailableError,
            import_tensorrt,
            register_plugin,
        )

        try:
            trt, _ = import_tensorrt()
        except TensorRTUnavailableError as exc:
            raise RunnerError(f"cannot run the TensorRT engine {self.artifact}: {exc}") from exc
        if not str(device).startswith("cuda"):
            raise RunnerError(f"TensorRT engines run on an NVIDIA GPU: use device='cuda' (--device cuda), "
                              f"not {device!r}")
        if not torch.cuda.is_available():
            raise RunnerError(f"cannot run the TensorRT engine {self.artifact}: this PyTorch sees no CUDA device "
                              f"(torch {torch.__version__}); TensorRT needs an NVIDIA GPU and driver")
        self._device = torch.device(device)
        if self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self.device = str(self._device)
        self.trt = trt
        with metadata_errors():
            self.metadata, self.build = read_sidecar(self.artifact)

        with torch.cuda.device(self._device):
            plugin_error: Exception | None = None
            try:
                self.plugin = register_plugin()
            except Exception as exc:  # AOT engines still load without the Python plugin; JIT ones do not
                plugin_error = exc
                self.plugin = {"registered": False, "error": f"{type(exc).__name__}: {exc}"}
            self._logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self.engine = deserialize_engine(self._runtime, self.artifact, str(trt.__version__), self.build,
                                             plugin_error)
            self.context = self.engine.create_execution_context()
            # TensorRT's own stream: enqueueing on torch's legacy default stream would serialise
            # with every other piece of work and add implicit synchronisation.
            self._stream = torch.cuda.Stream(self._device)
        if self.context is None:
            raise RunnerError(f"TensorRT could not create an execution context for {self.artifact} (out of memory?)")
        self._read_io()
        self._read_metadata(scale)

    # -- construction helpers ------------------------------------------------------------------
    def _read_io(self) -> None:
        trt = self.trt
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_name = "lr" if "lr" in inputs else (inputs[0] if len(inputs) == 1 else None)
        self.output_name = "sr" if "sr" in outputs else (outputs[0] if len(outputs) == 1 else None)
        if self.input_name is None or self.output_name is None:
            raise RunnerError(f"{self.artifact}: expected an input 'lr' and an output 'sr' (or a single input and "
                              f"output); found inputs {inputs} and outputs {outputs}")
        self.input_dtype = _torch_dtype(self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = _torch_dtype(self.engine.get_tensor_dtype(self.output_name))
        shapes = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.profile = tuple(tuple(int(v) for v in s) for s in shapes)   # (min, opt, max), each (N, 3, H, W)
        lo, _, hi = self.profile
        self.fixed_shape = (lo[2], lo[3]) if (lo[2], lo[3]) == (hi[2], hi[3]) else None

    def _read_metadata(self, scale: int | None) -> None:
        meta: ArtifactMetadata = self.metadata
        # No sidecar and no scale=: the engine's own output size tells (one call at the profile's min).
        measured = self._measure_scale() if meta.scale is None and scale is None else None
        self.scale = artifact_scale(meta, scale, f"{self.artifact} (sidecar {Path(self.artifact).name}.json)",
                                    static_scale=measured)
        self.input_multiple = int(meta.input_multiple or 1)
        self.precision = str(self.build.get("precision") or meta.precision
                             or {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.input_dtype, "fp32"))
        self.variant = meta.variant
        self.attention = meta.attention

    def _measure_scale(self) -> int:
        lo = self.profile[0]
        probe = torch.rand(lo, device=self._device)
        out = self._run(probe.to(self.input_dtype))
        if out.shape[2] % lo[2] or out.shape[3] % lo[3] or out.shape[2] // lo[2] != out.shape[3] // lo[3]:
            raise RunnerError(f"{self.artifact}: cannot tell the scale ({tuple(lo)} -> {tuple(out.shape)}); "
                              f"pass scale=N")
        return out.shape[2] // lo[2]

    # -- inference ----------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """One engine call on a CUDA tensor already in the profile and the input dtype."""
        if self.context is None:
            raise RunnerError(f"the TensorRT context for {self.artifact} was closed")
        x = x.contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            lo, _, hi = self.profile
            raise RunnerError(f"{self.artifact}: input shape {tuple(x.shape)} is outside the engine's profile "
                              f"{tuple(lo)} .. {tuple(hi)}")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                          device=self._device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        caller = torch.cuda.current_stream(self._device)
        self._stream.wait_stream(caller)           # x was written on the caller's stream
        x.record_stream(self._stream)
        out.record_stream(self._stream)
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            cause = self.plugin.get("error")
            raise RunnerError(f"TensorRT failed to run {self.artifact} on input {tuple(x.shape)} (see its log)"
                              + (f"; the {PLUGIN_ID} plugin was not registered: {cause}" if cause else ""))
        caller.wait_stream(self._stream)           # the caller's later work sees the output
        return out

    def check_size(self, height: int, width: int) -> None:
        """The base rule (a fixed profile takes its one size), plus the profile's max sides."""
        super().check_size(height, width)
        hi = self.profile[2]
        if height > hi[2] or width > hi[3]:
            raise RunnerError(f"{height}x{width} exceeds the engine's max {hi[2]}x{hi[3]}: use upscale(), which tiles")

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        (lo, _, hi) = self.profile
        b, _, h, w = batch.shape
        with torch.cuda.device(self._device):
            x = batch.detach().to(device=self._device, dtype=torch.float32)
            ph, pw = max(lo[2] - h, 0), max(lo[3] - w, 0)
            if ph or pw:   # below the profile's min sides: replicate the border, crop the output
                x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            x = x.to(self.input_dtype)
            outs = []
            for start in range(0, b, hi[0]):
                chunk = x[start:start + hi[0]]
                real = chunk.shape[0]
                if real < lo[0]:
                    chunk = torch.cat([chunk, chunk[-1:].expand(lo[0] - real, -1, -1, -1)])
                outs.append(self._run(chunk)[:real])
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
            out = out[:, :, : h * self.scale, : w * self.scale]
        return out.to(device=batch.device, dtype=torch.float32)

    # -- tiling beyond the profile -------------------------------------------------------------------
    def default_tile(self, size: tuple[int, int]) -> int | None:
        """The profile's smaller max side when ``size`` exceeds the profile, else one call."""
        hi = self.profile[2]
        if self.fixed_shape is None and (size[0] > hi[2] or size[1] > hi[3]):
            return min(hi[2], hi[3])
        return None

    # -- reporting ------------------------------------------------------------------------------------
    def runtime_details(self) -> dict[str, Any]:
        lo, opt, hi = self.profile
        return {
            "runtime_version": getattr(self.trt, "__version__", None),
            "device_name": torch.cuda.get_device_name(self._device),
            "profile": {"min": list(lo), "opt": list(opt), "max": list(hi)},
            "io_dtype": str(self.input_dtype).replace("torch.", ""),
            "plugin": self.build.get("plugin") or ("registered" if self.plugin.get("registered") else None),
            "built_with": {"tensorrt": self.build.get("tensorrt_version"), "gpu": self.build.get("gpu")},
            "weights_sha256": self.metadata.weights_sha256,
        }

    def close(self) -> None:
        """Release the execution context and the engine (idempotent)."""
        self.context = None  # type: ignore[assignment]
        self.engine = None  # type: ignore[assignment]


