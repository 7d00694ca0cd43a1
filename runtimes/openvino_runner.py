"""Run an exported ESC ``.onnx`` (or an OpenVINO IR ``.xml``) with OpenVINO.

Artifacts: ``openvino:PATH.onnx`` (the ONNX file written by :mod:`export.onnx_export`,
read directly by OpenVINO's ONNX frontend) or ``PATH.xml`` (an IR converted elsewhere).
The runner reads the same ``esc.*`` metadata as :mod:`runtimes.onnx_runner` when the file
is ONNX; otherwise the scale comes from the static output/input shapes or ``scale=``.

Precision: OpenVINO's CPU plugin runs in bf16 by default on CPUs with AMX/AVX512-BF16,
which would make an "fp32" row silently lower-precision.  The runner therefore sets
``INFERENCE_PRECISION_HINT`` to ``f32`` for ``precision="fp32"`` (``f16`` for ``fp16``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import Runner, RunnerError, artifact_scale, metadata_errors
from .metadata import ArtifactMetadata, read_onnx_metadata

__all__ = ["OpenVINORunner"]

_DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU", "auto": "AUTO"}
_PRECISION_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


def _onnx_metadata(path: str) -> ArtifactMetadata:
    """The ``esc.*`` metadata of an ONNX file; empty for an IR ``.xml`` (it has none)."""
    if not path.lower().endswith(".onnx"):
        return ArtifactMetadata()
    with metadata_errors():
        return read_onnx_metadata(path)


class OpenVINORunner(Runner):
    """OpenVINO execution of an ESC graph.

    Options:
        ov_device: OpenVINO device (``CPU`` default, ``GPU``, ``AUTO``...).  ``device``
            must be ``"cpu"``: OpenVINO does not run on CUDA devices.
        precision: ``fp32`` (default, forces f32 inference) or ``fp16``/``bf16`` hints.
        threads: ``INFERENCE_NUM_THREADS``.
        hint: performance hint, ``LATENCY`` (default) or ``THROUGHPUT``.
        scale: needed only when neither metadata nor static shapes give the factor.
    """

    name = "openvino"
    options = ("ov_device", "precision", "threads", "hint", "scale")

    def __init__(self, artifact: str | os.PathLike[str], device: str = "cpu", ov_device: str | None = None,
                 precision: str = "fp32", threads: int | None = None, hint: str = "LATENCY",
                 scale: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise RunnerError(f"openvino is not importable ({exc}); pip install openvino") from exc
        self.artifact = os.fspath(artifact)
        if not Path(self.artifact).is_file():
            raise RunnerError(f"no such model file: {self.artifact}")
        if str(device) != "cpu":
            raise RunnerError(f"the OpenVINO runner takes device='cpu' (OpenVINO does not run on {device!r}); "
                              f"pick an OpenVINO device with ov_device=")
        if precision not in _PRECISION_HINTS:
            raise RunnerError(f"precision must be one of {', '.join(_PRECISION_HINTS)}, not {precision!r}")
        self.device = "cpu"
        self.ov_device = _DEVICES.get(str(ov_device or "cpu").lower(), str(ov_device).upper())
        self.precision = precision
        self.threads = threads
        self._ov_version = ov.__version__
        core = ov.Core()
        if self.ov_device not in core.available_devices and self.ov_device != "AUTO":
            raise RunnerError(f"OpenVINO device {self.ov_device} is not available; available: "
                              f"{', '.join(core.available_devices)}")
        config: dict[str, Any] = {"PERFORMANCE_HINT": str(hint).upper()}
        if self.ov_device == "CPU":
            config["INFERENCE_PRECISION_HINT"] = _PRECISION_HINTS[precision]
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise RunnerError(f"threads must be a positive int, got {threads!r}")
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            model = core.read_model(self.artifact)
            self.compiled = core.compile_model(model, self.ov_device, config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
            raise RunnerError(f"OpenVINO cannot compile {self.artifact} for {self.ov_device}: {text}") from exc
        self.request = self.compiled.create_infer_request()

        inp, out = self.compiled.inputs[0], self.compiled.outputs[0]
        self.io_dtype = np.float16 if inp.get_element_type() == ov.Type.f16 else np.float32
        pshape, oshape = inp.get_partial_shape(), out.get_partial_shape()
        self.fixed_shape = None
        if pshape.rank.is_static and len(pshape) == 4 and pshape[2].is_static and pshape[3].is_static:
            self.fixed_shape = (pshape[2].get_length(), pshape[3].get_length())
        self.metadata = _onnx_metadata(self.artifact)
        static = None
        if self.fixed_shape is not None and oshape.rank.is_static and oshape[2].is_static:
            static = oshape[2].get_length() // self.fixed_shape[0]
        self.scale = artifact_scale(self.metadata, scale, self.artifact, static)
        self.input_multiple = int(self.metadata.input_multiple or 1)
        self.variant = self.metadata.variant
        self.attention = self.metadata.attention

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy().astype(self.io_dtype))
        outs = [self.request.infer({0: array[i:i + 1]})[0] for i in range(array.shape[0])] \
            if self.fixed_shape is not None else [self.request.infer({0: array})[0]]
        out = np.concatenate(outs) if len(outs) > 1 else outs[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(batch.device)

    def runtime_details(self) -> dict[str, Any]:
        return {"runtime_version": self._ov_version, "ov_device": self.ov_device, "threads": self.threads,
                "opset": self.metadata.opset}

    def close(self) -> None:
        self.request = None  # type: ignore[assignment]
        self.compiled = None


