"""Parity of every function of a saved package with PyTorch, through the numpy interpreter.

Why not only :func:`export.verify.verify_artifact`: that goes through the runner, which
runs a package's default function; a multifunction package ships one function per tile
and each must be checked. Inputs and outputs follow the package's I/O: image packages
get 0..255 pixels and return 0..255, fp16-I/O packages get float16. The comparison is
:func:`validation.compare.compare` against the one threshold table.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from runtimes.coreml.interpreter import Interpreter
from runtimes.coreml.reader import load_program
from validation.compare import ComparisonResult, compare, threshold_for

from .lint import function_names

__all__ = ["function_for", "function_parity", "package_parity"]


def function_for(path: str | os.PathLike, h: int, w: int) -> str:
    """The function of the package whose fixed input is (h, w) (the only one if not multifunction)."""
    names = function_names(path)
    for name in names:
        shape = load_program(path, function=name).inputs[0].shape
        if shape is not None and tuple(shape[-2:]) == (h, w):
            return name
    return names[0]


def function_parity(path: str | os.PathLike, reference: nn.Module, x: torch.Tensor, precision: str,
                    function: str | None = None, interpreter_precision: str = "auto") -> ComparisonResult:
    """Run ``function`` (default: the one for ``x``'s size) on ``x`` and compare with ``reference(x)``.

    Both sides are clamped to [0, 1] (what a picture keeps); the bound is the parity
    table's entry for ``precision``.
    """
    name = function or function_for(path, x.shape[-2], x.shape[-1])
    program = load_program(path, function=name)
    image_io = str(program.metadata.get("esc.image_io", "false")) == "true"
    interp = Interpreter(program, precision=interpreter_precision)
    dtype = np.float16 if program.inputs[0].dtype == "FLOAT16" else np.float32
    feed = x.detach().float().numpy() * (255.0 if image_io else 1.0)
    y = np.asarray(interp.run({program.inputs[0].name: feed.astype(dtype)})[program.outputs[0]], dtype=np.float32)
    if image_io:
        y = y / 255.0
    with torch.no_grad():
        expected = reference(x.float()).float()
    limit = threshold_for(precision)
    return compare(expected.clamp(0, 1).numpy(), np.clip(y, 0, 1), atol=limit.atol, min_psnr=limit.min_psnr,
                   name=f"{name} {tuple(x.shape)}")


def package_parity(path: str | os.PathLike, reference: nn.Module, inputs: list[torch.Tensor], precision: str,
                   interpreter_precision: str = "auto") -> list[ComparisonResult]:
    """:func:`function_parity` for each input (each goes to the function of its size)."""
    return [function_parity(path, reference, x, precision, interpreter_precision=interpreter_precision)
            for x in inputs]
