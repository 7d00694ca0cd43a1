"""Run an ESC or RIB-family checkpoint (or any upscaling ``nn.Module``) in PyTorch eager mode.

Accepted artifacts: a ``.pth`` / ``.pt`` / ``.safetensors`` checkpoint (read strictly by
:func:`models.load_model`), ``official:NAME`` (downloaded once), ``torch:PATH`` (the same,
with the runner named explicitly) or an ``nn.Module`` already in memory.

Precision: ``fp32`` everywhere; ``fp16`` on CUDA only: PyTorch's CPU half-precision
convolutions are either missing or far slower than fp32, so asking for fp16 on the CPU is
refused with an explanation instead of silently running fp32 or crawling.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from .base import Runner, RunnerError

__all__ = ["TorchRunner"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RunnerError(f"unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N')") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunnerError(
                f"device {device!r} asked for, but this PyTorch build sees no CUDA device "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RunnerError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise RunnerError(f"the torch runner supports 'cpu' and 'cuda[:N]', not {device!r}")
    return dev


class TorchRunner(Runner):
    """PyTorch eager execution of an ESC model.

    Options (through :func:`runtimes.base.load` or the constructor):
        attention: attention back-end (ESC: ``sdpa``, ``naive``, ``flex``, ``fused``, ...,
            see :mod:`models.attention`; ESC-RIB/SST: ``sdpa``, ``naive``, ``concat``, see
            :mod:`models.rib.backends`).  Default ``sdpa``.
        precision: ``fp32`` (default) or ``fp16`` (CUDA only).
        threads: ``torch.set_num_threads`` value (process-wide in PyTorch).
        scale: required only for a plain ``nn.Module`` without an ESC descriptor.
        deploy: apply the exact deploy-time folds when loading a checkpoint (default
            True; modules passed in are used as they are).
        variant: the published variant a checkpoint holds, where its weights and file
            name cannot tell: RIB windows are not stored, so SST weights in a file named
            without ``plus`` need ``variant="sst"`` or ``"sst_plus"`` (the loader refuses
            to guess and names both).
    """

    name = "torch"
    options = ("attention", "precision", "threads", "scale", "deploy", "variant")

    def __init__(
        self,
        artifact: str | os.PathLike[str] | nn.Module,
        device: str = "cpu",
        attention: str | None = None,
        precision: str = "fp32",
        threads: int | None = None,
        scale: int | None = None,
        deploy: bool = True,
        variant: str | None = None,
    ) -> None:
        if precision not in _DTYPES:
            raise RunnerError(f"precision must be one of {', '.join(_DTYPES)}, not {precision!r}")
        dev = _check_device(device)
        if precision == "fp16" and dev.type != "cuda":
            raise RunnerError(
                "precision fp16 needs a CUDA device: PyTorch's CPU half-precision convolutions are "
                "unsupported or much slower than fp32. Use precision='fp32' on the CPU, or device='cuda'")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise RunnerError(f"threads must be a positive int, got {threads!r}")
            torch.set_num_threads(threads)
        self.device = str(dev)
        self.precision = precision
        self.dtype = _DTYPES[precision]

        if isinstance(artifact, nn.Module):
            self.artifact = "<nn.Module>"
            model = artifact
            if precision != "fp32" or dev.type != "cpu" or attention is not None:
                model = copy.deepcopy(model)  # never change the caller's module in place
            if variant is not None:
                raise RunnerError("variant= applies to checkpoint files; a module in memory is already built")
            if attention is not None:
                if not hasattr(model, "set_attention"):
                    raise RunnerError(f"{type(model).__name__} has no attention back-ends to choose from")
                model.set_attention(attention)
        else:
            from models import load_model

            self.artifact = os.fspath(artifact)
            model = load_model(self.artifact, attention=attention or "sdpa", deploy=deploy, variant=variant)
        self.model = model.to(device=dev, dtype=self.dtype).eval()

        descriptor = getattr(self.model, "descriptor", None)
        if descriptor is not None:
            if scale is not None and scale != descriptor.scale:
                raise RunnerError(f"the model upscales x{descriptor.scale}, but scale={scale} was given")
            self.scale = int(descriptor.scale)
            self.input_multiple = int(descriptor.input_multiple)
            self.variant: str | None = descriptor.variant
            self.arch: str | None = descriptor.arch
            self.params: int | None = int(descriptor.params)
        else:
            if scale is None:
                raise RunnerError(
                    f"{type(self.model).__name__} has no ESC descriptor, so its scale is unknown; pass scale=N")
            self.scale = int(scale)
            self.input_multiple = 1
            self.variant = self.arch = None
            self.params = sum(p.numel() for p in self.model.parameters())
        self.attention: str | None = getattr(self.model, "attention", None)
        self.fixed_shape = None

    @property
    def memory_cost_key(self) -> str:
        """``torch:esc-sdpa`` for ESC with SDPA (measured: no score matrices), else ``torch``,
        the cost of a back-end that materialises them (naive) or was not measured."""
        return "torch:esc-sdpa" if self.arch == "esc" and self.attention == "sdpa" else "torch"

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.model(batch.to(device=self.device, dtype=self.dtype))
        return out.to(device=batch.device, dtype=torch.float32)

    def runtime_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "runtime_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "arch": self.arch,
            "params": self.params,
        }
        dev = torch.device(self.device)
        if dev.type == "cuda":
            details["device_name"] = torch.cuda.get_device_name(dev)
            details["cuda_version"] = torch.version.cuda
        return details

    def close(self) -> None:
        if torch.device(self.device).type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
