"""Run a serialized TensorRT engine (``.engine`` / ``.plan``) built by ``export/to_trt.py``.

* TensorRT is imported when a runner is made, never at module import; without it (or
  without a CUDA GPU) a :class:`~runtimes.base.RunnerError` says what to install.
* The ``esc::window_attention`` plugin is registered before deserialising
  (:func:`export.trt_plugin.register_plugin`). Engines built with the AOT implementation
  carry the kernel and would load without it; JIT engines need it.
* I/O goes through torch CUDA tensors (no copies through the host): the input shape is set
  per call (``set_input_shape``) within the engine's optimisation profile; batches above
  the profile's max batch are split, below its min batch padded by repetition; images
  smaller than the profile's min sides are padded (edge replication) and cropped.
* :meth:`TensorRTRunner.upscale` tiles (through the base class) when an image exceeds the
  profile's max height or width and no tile was asked for.
* Metadata (scale, variant, precision, attention form) comes from the JSON sidecar
  ``<engine>.json`` that ``export/to_trt.py`` writes; without it pass ``scale=`` or the
  runner measures the scale with one call at the profile's min shape.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import Runner, RunnerError

__all__ = ["TensorRTRunner", "read_sidecar", "sidecar_path"]

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


def sidecar_path(engine: str | os.PathLike[str]) -> Path:
    """``x.engine`` -> ``x.engine.json``."""
    p = Path(engine)
    return p.with_name(p.name + ".json")


def read_sidecar(engine: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar's content, or ``{}`` when there is none (or it is unreadable)."""
    path = sidecar_path(engine)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    key = str(trt_dtype).rsplit(".", 1)[-1].upper()
    if key not in _TORCH_DTYPES:
        raise RunnerError(f"unsupported TensorRT tensor type {trt_dtype}")
    return _TORCH_DTYPES[key]


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
        from export.trt_plugin import TensorRTUnavailableError, import_tensorrt, register_plugin

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
        self.sidecar = read_sidecar(self.artifact)
        meta = dict(self.sidecar.get("metadata", {}))

        with torch.cuda.device(self._device):
            try:
                self.plugin = register_plugin()
            except Exception as exc:  # the AOT engines still load without the Python plugin
                self.plugin = {"registered": False, "error": f"{type(exc).__name__}: {exc}"}
            self._logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            engine = self._runtime.deserialize_cuda_engine(Path(self.artifact).read_bytes())
            if engine is None:
                built = self.sidecar.get("tensorrt_version"), self.sidecar.get("gpu")
                raise RunnerError(
                    f"TensorRT {trt.__version__} could not deserialize {self.artifact}"
                    + (f" (built with TensorRT {built[0]} on {built[1]})" if built[0] else "")
                    + ": engines only load with the TensorRT version and GPU model they were built for; rebuild it "
                      "with export/to_trt.py on this machine")
            self.engine = engine
            self.context = engine.create_execution_context()
        if self.context is None:
            raise RunnerError(f"TensorRT could not create an execution context for {self.artifact} (out of memory?)")
        self._read_io()
        self._read_metadata(meta, scale)

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

    def _read_metadata(self, meta: dict[str, Any], scale: int | None) -> None:
        found = meta.get("esc.scale")
        found = int(found) if found not in (None, "") else None
        if found is not None and scale is not None and found != scale:
            raise RunnerError(f"{self.artifact} upscales x{found} (sidecar metadata), but scale={scale} was given")
        if found is None and scale is None:
            found = self._measure_scale()
        self.scale = int(found if found is not None else scale)
        self.input_multiple = int(meta.get("esc.input_multiple") or 1)
        self.precision = str(self.sidecar.get("precision") or meta.get("esc.precision")
                             or {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.input_dtype, "fp32"))
        self.variant = meta.get("esc.variant") or None
        self.attention = meta.get("esc.attention") or None

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
        stream = torch.cuda.current_stream(self._device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RunnerError(f"TensorRT failed to run {self.artifact} on input {tuple(x.shape)} (see its log)")
        return out

    @torch.no_grad()
    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(batch.shape)}")
        (lo, _, hi) = self.profile
        b, _, h, w = batch.shape
        if h > hi[2] or w > hi[3]:
            raise ValueError(f"{h}x{w} exceeds the engine's max {hi[2]}x{hi[3]}: use upscale(), which tiles")
        if self.fixed_shape is not None and (h, w) != self.fixed_shape:
            raise ValueError(f"{self.artifact} takes {self.fixed_shape[0]}x{self.fixed_shape[1]} inputs, got {h}x{w} "
                             f"(use upscale(), which tiles at the fixed shape)")
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
        expected = (b, 3, h * self.scale, w * self.scale)
        if tuple(out.shape) != expected:
            raise RunnerError(f"{self.artifact} returned {tuple(out.shape)} for input {tuple(batch.shape)}; "
                              f"expected {expected} (is scale x{self.scale} right?)")
        return out.to(device=batch.device, dtype=torch.float32)

    # -- tiling beyond the profile -------------------------------------------------------------------
    def _auto_tile(self, size: tuple[int, int], tile: int | None, fixed_shape: tuple[int, int] | None) -> int | None:
        hi = self.profile[2]
        if tile is None and fixed_shape is None and self.fixed_shape is None and (size[0] > hi[2] or size[1] > hi[3]):
            return min(hi[2], hi[3])
        return tile

    @torch.no_grad()
    def upscale(self, image: torch.Tensor, tile: int | None = None, overlap: int = 16, batch_size: int = 4,
                progress: bool = False, fixed_shape: tuple[int, int] | None = None) -> torch.Tensor:
        """As :meth:`Runner.upscale`; tiles at the profile's max side when the image is larger."""
        tile = self._auto_tile(tuple(image.shape[-2:]), tile, fixed_shape)
        return super().upscale(image, tile=tile, overlap=overlap, batch_size=batch_size, progress=progress,
                               fixed_shape=fixed_shape)

    @torch.no_grad()
    def upscale_alpha(self, alpha: torch.Tensor, tile: int | None = None, overlap: int = 16, batch_size: int = 4,
                      progress: bool = False, fixed_shape: tuple[int, int] | None = None) -> torch.Tensor:
        tile = self._auto_tile(tuple(alpha.shape[-2:]), tile, fixed_shape)
        return super().upscale_alpha(alpha, tile=tile, overlap=overlap, batch_size=batch_size, progress=progress,
                                     fixed_shape=fixed_shape)

    # -- reporting ------------------------------------------------------------------------------------
    def runtime_details(self) -> dict[str, Any]:
        lo, opt, hi = self.profile
        return {
            "runtime_version": getattr(self.trt, "__version__", None),
            "device_name": torch.cuda.get_device_name(self._device),
            "profile": {"min": list(lo), "opt": list(opt), "max": list(hi)},
            "io_dtype": str(self.input_dtype).replace("torch.", ""),
            "plugin": self.sidecar.get("plugin") or ("registered" if self.plugin.get("registered") else None),
            "built_with": {"tensorrt": self.sidecar.get("tensorrt_version"), "gpu": self.sidecar.get("gpu")},
            "weights_sha256": self.sidecar.get("metadata", {}).get("esc.weights_sha256"),
        }

    def close(self) -> None:
        """Release the execution context and the engine (idempotent)."""
        self.context = None  # type: ignore[assignment]
        self.engine = None  # type: ignore[assignment]


