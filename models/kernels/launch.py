"""The fused kernel's launch grid and CUDA's limits on it, shared by every launcher.

The kernel runs one program per (query block, window, batch x head): grid
``(w^2 / BLOCK_M, ceil(H/w) * ceil(W/w), B * heads)``. CUDA allows at most 65535 on
the y and z axes, so a large input (about 8192x8192 at window 32) or a large
batch x heads cannot be launched. The JIT launcher checks each call; the TensorRT
builder must check the profile's *maximum* shape before building, because the AOT
kernel's grid is an expression TensorRT evaluates at run time, too late for a
message. Both call :func:`grid_limit_problem`.
"""
from __future__ import annotations

import math

MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions y and z


def launch_grid(batch: int, height: int, width: int, window: int, heads: int,
                block_m: int) -> tuple[int, int, int]:
    """``(w^2 / block_m, ceil(H/w) * ceil(W/w), batch * heads)`` for concrete sizes."""
    return (window * window) // block_m, math.ceil(height / window) * math.ceil(width / window), batch * heads


def grid_limit_problem(batch: int, height: int, width: int, window: int, heads: int) -> str | None:
    """What exceeds CUDA's grid limit for this input, with the largest allowed size; None if it fits.

    Sizes in messages are ``WIDTHxHEIGHT`` (the toolkit's one size syntax).
    """
    _, windows, batch_heads = launch_grid(batch, height, width, window, heads, 1)
    problems = []
    if windows > MAX_GRID_YZ:
        cols = math.ceil(width / window)
        tallest = (MAX_GRID_YZ // cols) * window
        square = math.isqrt(MAX_GRID_YZ) * window
        problems.append(
            f"{width}x{height} (WIDTHxHEIGHT) makes {windows} windows of {window}x{window}, more than the "
            f"{MAX_GRID_YZ} one kernel launch can cover (CUDA grid axis y): the largest allowed size is "
            f"{width}x{tallest} at this width, {square}x{square} for a square input")
    if batch_heads > MAX_GRID_YZ:
        problems.append(
            f"batch {batch} x {heads} heads = {batch_heads} exceeds CUDA's {MAX_GRID_YZ} limit on grid axis z: "
            f"the largest allowed batch is {MAX_GRID_YZ // heads}")
    return "; ".join(problems) or None
